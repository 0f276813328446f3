/* global process */
// Validates the OpenAPI document on stdin with swagger-parser; prints why and exits 1 if it is invalid.
// A separate process because swagger-parser loads ES modules, which jest's module loader cannot
// require() without --experimental-vm-modules; plain Node 24 can.
const SwaggerParser = require("@apidevtools/swagger-parser");

let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => (input += chunk));
process.stdin.on("end", () => {
	SwaggerParser.validate(JSON.parse(input)).then(
		() => process.exit(0),
		(err) => {
			process.stderr.write(String(err && err.message ? err.message : err));
			process.exit(1);
		},
	);
});
