import { Errors, ServiceBroker } from "moleculer";
import ApiService from "../../services/api.service";
import OrdersService from "../../services/orders.service";
import ProductsService from "../../services/products.service";
import UsersService from "../../services/users.service";
import { config } from "../../lib/config";
import { http } from "../support/cluster";
import { eventually } from "../support/eventually";

/** The whole system in one process on embedded defaults (memory stores), as `npm run dev` runs it. */
describe("all services in one broker on the memory store", () => {
	const port = 30_000 + Math.floor(Math.random() * 10_000);
	const base = `http://127.0.0.1:${port}/api`;
	let broker: ServiceBroker;

	beforeAll(async () => {
		broker = new ServiceBroker({ logger: false, cacher: "Memory" });
		broker.createService({ ...ApiService, settings: { ...ApiService.settings, port } });
		for (const schema of [UsersService, ProductsService, OrdersService]) broker.createService(schema);
		await broker.start();
		// The gateway generates its routes a moment after the services appear; readiness says when.
		await eventually(async () => ((await http(base, "GET", "/health/ready")).status === 200 ? true : undefined));
	});
	afterAll(() => broker.stop());

	it("is live and ready", async () => {
		expect((await http(base, "GET", "/health")).body).toEqual({ status: "ok" });
		expect((await http(base, "GET", "/health/ready")).status).toBe(200);
	});

	it("registers, and routes only actions that declare `auth`", async () => {
		const reg = await http<{ token: string }>(base, "POST", "/users/register", {
			body: { email: "u@x.test", password: "password-1", name: "U" },
		});
		expect(reg.status).toBe(201);
		expect((await http(base, "GET", "/users/me", { token: reg.body.token })).status).toBe(200);
		// products.reserve has no `auth` and no `rest`: not reachable from outside.
		expect((await http(base, "POST", "/products/reserve", { body: {} })).status).toBe(404);
	});

	it("rate limits login attempts per client with a 429", async () => {
		const limit = config.auth.loginRateLimitPerMinute;
		const attempts = await Promise.all(
			Array.from({ length: limit + 5 }, () =>
				http(base, "POST", "/users/login", { body: { email: "nobody@x.test", password: "wrong-password" } }),
			),
		);
		const statuses = attempts.map((a) => a.status);
		// Registration earlier in this file counts against the same per-client window.
		expect(statuses.filter((s) => s === 401).length).toBeLessThanOrEqual(limit);
		expect(statuses.filter((s) => s === 429).length).toBeGreaterThanOrEqual(5);
		expect(statuses.every((s) => s === 401 || s === 429)).toBe(true);
	});

	it("lists the failing fields of a 422 without the node or action names", async () => {
		const res = await http<{ code: number; data: Array<Record<string, unknown>> }>(base, "GET", "/products?pageSize=500");
		expect(res.status).toBe(422);
		expect(res.body.data[0]).toMatchObject({ field: "pageSize" });
		expect(res.body.data.every((item) => !("nodeID" in item) && !("action" in item))).toBe(true);
	});

	it("answers a service error from inside with the contract's shape, never a stack", async () => {
		const res = await http<Record<string, unknown>>(base, "GET", "/products/0123456789abcdef01234567");
		expect(res.status).toBe(404);
		expect(res.body).toEqual({ name: "NotFoundError", message: "Product not found", code: 404, type: "NOT_FOUND", data: null });
	});
});

/** A replica that crashed or left rejects the calls it had (RequestRejectedError, retryable). */
describe("the gateway's failover for reads", () => {
	const port = 30_000 + Math.floor(Math.random() * 10_000);
	const base = `http://127.0.0.1:${port}/api`;
	const calls = { read: 0, write: 0 };
	let broker: ServiceBroker;

	/** Fails the first call of each action the way a crashed replica's caller sees it. */
	function firstCallRejected(action: keyof typeof calls) {
		return () => {
			calls[action] += 1;
			if (calls[action] === 1) throw new Errors.RequestRejectedError({ action: `flaky.${action}`, nodeID: "crashed-replica" });
			return { attempt: calls[action] };
		};
	}

	beforeAll(async () => {
		broker = new ServiceBroker({ logger: false, retryPolicy: { enabled: true, retries: 2, delay: 10 } });
		broker.createService({ ...ApiService, settings: { ...ApiService.settings, port } });
		broker.createService({
			name: "flaky",
			actions: {
				read: { auth: "public", rest: "GET /", handler: firstCallRejected("read") },
				write: { auth: "public", rest: "POST /", handler: firstCallRejected("write") },
			},
		});
		await broker.start();
		await eventually(async () => ((await http(base, "GET", "/flaky")).status !== 404 ? true : undefined));
		calls.read = 0;
	});
	afterAll(() => broker.stop());

	it("sends a GET to another replica when the first is gone", async () => {
		const res = await http(base, "GET", "/flaky");
		expect({ status: res.status, body: res.body, calls: calls.read }).toEqual({ status: 200, body: { attempt: 2 }, calls: 2 });
	});

	it("never re-sends a write: the client gets a 503 and repeats it with its Idempotency-Key", async () => {
		const res = await http(base, "POST", "/flaky", { body: {} });
		expect({ status: res.status, calls: calls.write }).toEqual({ status: 503, calls: 1 });
	});
});
