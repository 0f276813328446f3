import { ShopAmqpTransporter } from "../../lib/amqp-transporter";
import { ConfigError, loadConfig } from "../../lib/config";
import { brokerOptions, transporterFrom } from "../../moleculer.config";

describe("configuration", () => {
	it("runs everything in one process on embedded defaults", () => {
		const cfg = loadConfig({});
		expect(cfg.transporter).toBeNull();
		expect(cfg.mongo.uri).toBeNull();
		expect(brokerOptions(cfg).transporter).toBeNull();
	});

	it("tunes the AMQP transporter and accepts a RabbitMQ cluster", () => {
		const cfg = loadConfig({ TRANSPORTER: "amqp://a:5672, amqp://b:5672", AMQP_PREFETCH: "64" });
		const transporter = transporterFrom(cfg);
		expect(transporter).toBeInstanceOf(ShopAmqpTransporter);
		expect((transporter as ShopAmqpTransporter).opts).toMatchObject({
			url: ["amqp://a:5672?heartbeat=10", "amqp://b:5672?heartbeat=10"],
			prefetch: 64,
			socketOptions: { noDelay: true },
		});
	});

	it("leaves other transporters to Moleculer", () => {
		expect(transporterFrom(loadConfig({ TRANSPORTER: "nats://localhost:4222" }))).toBe("nats://localhost:4222");
		expect(transporterFrom(loadConfig({ TRANSPORTER: "TCP" }))).toBe("TCP");
	});

	it("refuses to start in production without a JWT secret, and rejects malformed values", () => {
		expect(() => loadConfig({ NODE_ENV: "production" })).toThrow(ConfigError);
		expect(() => loadConfig({ NODE_ENV: "production", JWT_SECRET: "short" })).toThrow(/32 characters/);
		expect(loadConfig({ NODE_ENV: "production", JWT_SECRET: "x".repeat(40) }).auth.jwtSecret).toBe("x".repeat(40));
		expect(() => loadConfig({ PORT: "eighty" })).toThrow(/PORT must be an integer/);
		expect(() => loadConfig({ AMQP_PREFETCH: "0" })).toThrow(/AMQP_PREFETCH/);
		expect(() => loadConfig({ RETRY_ENABLED: "maybe" })).toThrow(/RETRY_ENABLED/);
	});

	it("seeds an admin only when both the email and the password are set", () => {
		expect(loadConfig({ ADMIN_EMAIL: "a@b.c" }).auth.adminEmail).toBeNull();
		expect(loadConfig({ ADMIN_EMAIL: "a@b.c", ADMIN_PASSWORD: "secret-pass" }).auth.adminEmail).toBe("a@b.c");
	});
});
