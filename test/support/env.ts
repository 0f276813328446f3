// Tests run against whatever they start themselves; a developer's shell TRANSPORTER or MONGO_URI must
// not leak into the in-process unit tests, and logs stay quiet.
delete process.env.TRANSPORTER;
delete process.env.MONGO_URI;
process.env.LOGLEVEL ??= "warn";
process.env.NODE_ENV = "test";
