import { ServiceBroker } from "moleculer";
import { config } from "../../lib/config";
import { DOCS_ASSETS } from "../../lib/docs-page";
import type { OpenApiDocument } from "../../lib/openapi";
import { transporterFrom } from "../../moleculer.config";
import ApiService from "../../services/api.service";
import OrdersService from "../../services/orders.service";
import ProductsService from "../../services/products.service";
import UsersService from "../../services/users.service";
import { Cluster, http, type HttpResult } from "../support/cluster";
import { describeWithInfra, eventually, infra, uniqueName } from "../support/infra";
import { contractRoutes, openApiProblems } from "../support/openapi-spec";
import { OpenApiContract } from "../support/openapi-validator";

/**
 * The OpenAPI document and the docs page as the cluster serves them (gateway and services in separate
 * processes over RabbitMQ), and every REST route answering as the document says.
 */
describeWithInfra("OpenAPI document and docs page on the cluster", () => {
	const namespace = uniqueName("openapi");
	const ADMIN = { email: "admin@docs.test", password: "admin-password-1" };
	let cluster: Cluster;
	let client: ServiceBroker;
	let contract: OpenApiContract;
	let adminToken: string;

	/** Every request of this file goes through here: each response is checked against the document. */
	async function call<T = Record<string, unknown>>(
		method: string,
		path: string,
		opts: Parameters<typeof http>[3] = {},
	): Promise<HttpResult<T>> {
		const res = await http<T>(cluster.baseUrl, method, path, opts);
		contract.assertResponse(method, path, res.status, res.body);
		return res;
	}

	beforeAll(async () => {
		cluster = new Cluster({
			infra: infra!,
			namespace,
			env: {
				JWT_SECRET: "openapi-test-secret-that-is-long-enough",
				ADMIN_EMAIL: ADMIN.email,
				ADMIN_PASSWORD: ADMIN.password,
				LOGIN_RATE_LIMIT_PER_MINUTE: "1000",
			},
		});
		client = new ServiceBroker({
			namespace,
			nodeID: `${namespace}-test-client`,
			transporter: transporterFrom({ transporter: infra!.amqpUrl, amqp: config.amqp }),
			logger: false,
		});
		await Promise.all([cluster.startAll(), client.start()]);
		await client.waitForServices(["api", "users", "products", "orders"], 30_000);
		contract = await OpenApiContract.fetch(cluster.baseUrl);
		const login = await call<{ token: string }>("POST", "/users/login", { body: ADMIN });
		adminToken = login.body.token;
	}, 90_000);

	afterAll(async () => {
		await client?.stop();
		await cluster?.stopAll();
	});

	it("serves a valid document, the same as the whole system in one process", async () => {
		expect(await openApiProblems(contract.spec)).toBeNull();
		const port = 40_000 + Math.floor(Math.random() * 10_000);
		const embedded = new ServiceBroker({ logger: false });
		embedded.createService({ ...ApiService, settings: { ...ApiService.settings, port } });
		for (const schema of [UsersService, ProductsService, OrdersService]) embedded.createService(schema);
		await embedded.start();
		try {
			const base = `http://127.0.0.1:${port}/api`;
			await eventually(async () => ((await http(base, "GET", "/health/ready")).status === 200 ? true : undefined));
			expect((await http<OpenApiDocument>(base, "GET", "/openapi.json")).body).toEqual(contract.spec);
		} finally {
			await embedded.stop();
		}
	});

	it("serves the docs page and its Swagger UI files", async () => {
		const page = await fetch(`${cluster.baseUrl}/docs`);
		expect(page.status).toBe(200);
		expect(await page.text()).toContain('url: "/api/openapi.json"');
		for (const file of DOCS_ASSETS) expect((await fetch(`${cluster.baseUrl}/docs/${file}`)).status).toBe(200);
	});

	it("documents every route the gateway serves, and no other", async () => {
		const aliases = await client.call<Array<{ actionName: string | null; methods: string; fullPath: string }>>("api.listAliases");
		const actions = new Map(client.registry.getActionList({ skipInternal: true }).map((a) => [a.name, a.action]));
		const documented = Object.entries(contract.spec.paths).flatMap(([p, ops]) => Object.keys(ops).map((m) => `${m.toUpperCase()} ${p}`));
		const routed = aliases
			.filter((a) => a.actionName && actions.get(a.actionName)?.auth)
			.map((a) => `${a.methods} ${a.fullPath.slice("/api".length).replace(/:(\w+)/g, "{$1}")}`);
		expect(routed.sort()).toEqual([...documented].sort());
		// The others (api.listAliases has a `rest` but no `auth`) are refused like unknown routes.
		const unrouted = aliases.filter((a) => a.actionName && !actions.get(a.actionName)?.auth);
		expect(unrouted.map((a) => a.actionName)).toContain("api.listAliases");
		for (const a of unrouted) expect((await call(a.methods, a.fullPath.slice("/api".length))).status).toBe(404);
	});

	it("answers every route as documented: statuses and bodies, successes and errors", async () => {
		expect((await call("GET", "/health")).status).toBe(200);
		expect((await call("GET", "/health/ready")).status).toBe(200);
		expect((await call("GET", "/openapi.json")).status).toBe(200);
		expect((await call("GET", "/nope")).status).toBe(404);

		// Users
		const reg = await call<{ user: { id: string }; token: string }>("POST", "/users/register", {
			body: { email: "docs-user@example.com", password: "password-123", name: "Docs" },
		});
		expect(reg.status).toBe(201);
		const token = reg.body.token;
		expect(
			(await call("POST", "/users/register", { body: { email: "docs-user@example.com", password: "password-123", name: "D" } })).status,
		).toBe(409);
		expect((await call("POST", "/users/register", { body: { email: "nope", password: "x", name: "" } })).status).toBe(422);
		expect((await call("POST", "/users/register", { raw: '{"email":', headers: { "content-type": "application/json" } })).status).toBe(400);
		expect((await call("POST", "/users/register", { raw: "a=b", headers: { "content-type": "text/plain" } })).status).toBe(400);
		expect((await call("POST", "/users/register", { body: { name: "x".repeat(2 * 1024 * 1024) } })).status).toBe(413);
		expect((await call("POST", "/users/login", { body: { email: "docs-user@example.com", password: "wrong-password" } })).status).toBe(401);
		expect((await call("GET", "/users/me", { token })).status).toBe(200);
		expect((await call("GET", "/users/me")).status).toBe(401);
		expect((await call("GET", "/users/me", { token: "garbage" })).status).toBe(401);
		expect((await call("PATCH", "/users/me", { token, body: { name: "Docs B" } })).status).toBe(200);
		expect((await call("PATCH", "/users/me", { token, body: {} })).status).toBe(422);
		expect((await call("GET", "/users?page=1&pageSize=5&search=docs", { token: adminToken })).status).toBe(200);
		expect((await call("GET", "/users", { token })).status).toBe(403);
		expect((await call("GET", `/users/${reg.body.user.id}`, { token })).status).toBe(200);
		expect((await call("GET", "/users/0123456789abcdef01234567", { token })).status).toBe(404);
		expect((await call("GET", "/users/not-an-id", { token })).status).toBe(422);
		const leaver = await call<{ user: { id: string }; token: string }>("POST", "/users/register", {
			body: { email: "docs-leaver@example.com", password: "password-123", name: "L" },
		});
		expect((await call("DELETE", `/users/${leaver.body.user.id}`, { token: leaver.body.token })).status).toBe(204);

		// Products
		const product = await call<{ id: string }>("POST", "/products", {
			token: adminToken,
			body: { name: "Doc lamp", price: 1_999, stock: 5, sku: "DOC-1", category: "docs" },
		});
		expect(product.status).toBe(201);
		expect((await call("POST", "/products", { token: adminToken, body: { name: "Dup", price: 1, stock: 1, sku: "DOC-1" } })).status).toBe(
			409,
		);
		expect((await call("POST", "/products", { token: adminToken, body: { name: "Bad", price: -1, stock: 1 } })).status).toBe(422);
		expect((await call("POST", "/products", { token, body: { name: "Mine", price: 1, stock: 1 } })).status).toBe(403);
		expect((await call("POST", "/products", { body: { name: "Anon", price: 1, stock: 1 } })).status).toBe(401);
		// Without an sku: a list must show it as null, like a single product (moleculer-db would leave it out).
		await call("POST", "/products", { token: adminToken, body: { name: "Doc chair", price: 999, stock: 2, category: "docs" } });
		const listed = await call<{ rows: Array<{ sku: string | null }> }>(
			"GET",
			"/products?category=docs&minPrice=1&maxPrice=5000&sort=-price&pageSize=10",
		);
		expect(listed.body.rows.map((p) => p.sku)).toEqual(["DOC-1", null]);
		expect((await call("GET", "/products?sort=password")).status).toBe(422);
		expect((await call("GET", `/products/${product.body.id}`)).status).toBe(200);
		expect((await call("GET", "/products/0123456789abcdef01234567")).status).toBe(404);
		expect((await call("PATCH", `/products/${product.body.id}`, { token: adminToken, body: { stock: 3 } })).status).toBe(200);
		const doomed = await call<{ id: string }>("POST", "/products", { token: adminToken, body: { name: "Doomed", price: 1, stock: 1 } });
		expect((await call("DELETE", `/products/${doomed.body.id}`, { token: adminToken })).status).toBe(204);
		expect((await call("DELETE", `/products/${doomed.body.id}`, { token: adminToken })).status).toBe(404);

		// Orders
		const items = [{ productId: product.body.id, quantity: 1 }];
		const headers = { "idempotency-key": uniqueName("docs") };
		const order = await call<{ id: string }>("POST", "/orders", { token, body: { items }, headers });
		expect(order.status).toBe(201);
		expect((await call("POST", "/orders", { token, body: { items }, headers })).status).toBe(200);
		expect((await call("POST", "/orders", { token, body: { items: [{ productId: product.body.id, quantity: 99 }] } })).status).toBe(409);
		expect(
			(await call("POST", "/orders", { token, body: { items: [{ productId: "0123456789abcdef01234567", quantity: 1 }] } })).status,
		).toBe(404);
		expect((await call("GET", "/orders?status=confirmed", { token })).status).toBe(200);
		// The refused orders are kept as failed, without the total and currency a reservation sets: the document allows that.
		const failed = await call<{ rows: Array<Record<string, unknown>> }>("GET", "/orders?status=failed", { token });
		expect(failed.body.rows).toHaveLength(2);
		expect(failed.body.rows[0]).not.toHaveProperty("total");
		expect((await call("GET", `/orders?userId=${reg.body.user.id}`, { token: adminToken })).status).toBe(200);
		expect((await call("GET", `/orders/${order.body.id}`, { token })).status).toBe(200);
		expect((await call("PATCH", `/orders/${order.body.id}/status`, { token, body: { status: "shipped" } })).status).toBe(403);
		expect((await call("PATCH", `/orders/${order.body.id}/status`, { token: adminToken, body: { status: "delivered" } })).status).toBe(409);
		expect((await call("PATCH", `/orders/${order.body.id}/status`, { token: adminToken, body: { status: "shipped" } })).status).toBe(200);
		const second = await call<{ id: string }>("POST", "/orders", { token, body: { items } });
		expect((await call("POST", `/orders/${second.body.id}/cancel`, { token })).status).toBe(200);
		expect((await call("POST", `/orders/${second.body.id}/cancel`, { token })).status).toBe(409);

		// Routes beyond the contract (the services' admin routes): every GET that needs no parameter, as an admin.
		for (const [p, ops] of Object.entries(contract.spec.paths)) {
			if (ops.get && !p.includes("{") && !(ops.get.parameters ?? []).some((param) => param.required))
				await call("GET", p, { token: adminToken });
		}
		// Every route of the contract has answered a success.
		const routesOfContract = new Set(contractRoutes().map((r) => r.route));
		expect(contract.unexercised().filter((route) => routesOfContract.has(route))).toEqual([]);
	});
});
