import Ajv2020 from "ajv/dist/2020";
import addFormats from "ajv-formats";
import { ServiceBroker, Validators, type ActionSchema, type ServiceSchema } from "moleculer";
import { orderSchema, productSchema, userSchema } from "../../lib/api-schemas";
import { DOCS_ASSETS } from "../../lib/docs-page";
import {
	buildOpenApiDocument,
	paramsToJsonSchema,
	ruleToJsonSchema,
	type ActionInfo,
	type AliasInfo,
	type OpenApiDocument,
} from "../../lib/openapi";
import ApiService from "../../services/api.service";
import OrdersService from "../../services/orders.service";
import ProductsService from "../../services/products.service";
import UsersService from "../../services/users.service";
import { http } from "../support/cluster";
import { eventually } from "../support/eventually";
import { contractRoutes, openApiProblems } from "../support/openapi-spec";
import { OpenApiContract } from "../support/openapi-validator";

const SERVICES = [UsersService, ProductsService, OrdersService] as unknown as ServiceSchema[];

function paramsOf(service: unknown, action: string): Record<string, unknown> {
	return ((service as ServiceSchema).actions![action] as ActionSchema).params as Record<string, unknown>;
}

describe("fastest-validator rules as JSON Schema", () => {
	it("maps every rule kind the services use", () => {
		expect(ruleToJsonSchema({ type: "string", trim: true, min: 1, max: 5, pattern: "^a" }, "s")).toEqual({
			type: "string",
			minLength: 1,
			maxLength: 5,
			pattern: "^a",
		});
		expect(ruleToJsonSchema({ type: "email", normalize: true, max: 254 }, "e")).toEqual({
			type: "string",
			format: "email",
			maxLength: 254,
		});
		expect(ruleToJsonSchema({ type: "number", integer: true, min: 1, max: 100, convert: true, optional: true, default: 20 }, "n")).toEqual({
			type: "integer",
			minimum: 1,
			maximum: 100,
			default: 20,
		});
		expect(ruleToJsonSchema({ type: "number" }, "n")).toEqual({ type: "number" });
		expect(ruleToJsonSchema({ type: "enum", values: ["a", "b"] }, "x")).toEqual({ type: "string", enum: ["a", "b"] });
		expect(ruleToJsonSchema({ type: "enum", values: [1, "b"] }, "x")).toEqual({ enum: [1, "b"] });
		expect(ruleToJsonSchema({ type: "boolean" }, "b")).toEqual({ type: "boolean" });
		expect(ruleToJsonSchema({ type: "any" }, "a")).toEqual({});
		expect(
			ruleToJsonSchema(
				{ type: "array", min: 1, max: 3, unique: true, items: { type: "object", strict: true, props: { q: { type: "number" } } } },
				"a",
			),
		).toEqual({
			type: "array",
			minItems: 1,
			maxItems: 3,
			uniqueItems: true,
			items: { type: "object", properties: { q: { type: "number" } }, required: ["q"], additionalProperties: false },
		});
	});

	it("makes optional and defaulted fields not required, and keeps `$$strict: remove` permissive (unknown fields are dropped)", () => {
		expect(
			paramsToJsonSchema("a.b", {
				$$strict: "remove",
				x: { type: "string" },
				y: { type: "string", optional: true },
				z: { type: "number", default: 1 },
			}),
		).toEqual({
			type: "object",
			properties: { x: { type: "string" }, y: { type: "string" }, z: { type: "number", default: 1 } },
			required: ["x"],
		});
		expect(paramsToJsonSchema("a.b", { $$strict: true, x: { type: "string", optional: true } })).toEqual({
			type: "object",
			properties: { x: { type: "string" } },
			additionalProperties: false,
		});
	});

	it("takes a RegExp only where it is still one, and says why a pattern that came over the wire as {} is refused", () => {
		expect(ruleToJsonSchema({ type: "string", pattern: /^[a-f]+$/ }, "p")).toEqual({ type: "string", pattern: "^[a-f]+$" });
		const received = JSON.parse(JSON.stringify({ type: "string", pattern: /^x$/ })) as unknown;
		expect(() => ruleToJsonSchema(received, "users.get.id")).toThrow(
			/users\.get\.id: the pattern must be a string.*arrives from other nodes as \{\}/,
		);
		expect(() => ruleToJsonSchema({ type: "string", pattern: /^x$/i }, "p")).toThrow(/without flags/);
	});

	it("refuses what it does not know instead of leaving it out of the docs", () => {
		expect(() => ruleToJsonSchema({ type: "date" }, "a.b.when")).toThrow("a.b.when: the rule type 'date' is not supported");
		expect(() => ruleToJsonSchema({ type: "string", alpha: true }, "a.b.s")).toThrow(
			"a.b.s: the rule properties alpha of 'string' are not supported",
		);
		expect(() => ruleToJsonSchema("string|optional", "a.b.s")).toThrow(/object form/);
		expect(() => paramsToJsonSchema("a.b", { $$root: true })).toThrow("a.b: $$root is not supported");
	});

	/** The schema must accept exactly what the action's validator accepts, or the docs lie to a client. */
	const id = "0123456789abcdef01234567";
	it.each([
		["orders.create", "a line", { items: [{ productId: id, quantity: 1 }] }, true],
		["orders.create", "no line", { items: [] }, false],
		["orders.create", "a quantity of 0", { items: [{ productId: id, quantity: 0 }] }, false],
		["orders.create", "a malformed product id", { items: [{ productId: "not-an-id", quantity: 1 }] }, false],
		["orders.create", "51 lines", { items: Array(51).fill({ productId: id, quantity: 1 }) }, false],
		["orders.setStatus", "an upper-case id, shipped", { id: id.toUpperCase(), status: "shipped" }, true],
		["orders.setStatus", "cancelled", { id, status: "cancelled" }, false],
		["products.create", "zero price and stock, an unknown field", { name: "A", price: 0, stock: 0, currency: "EUR", extra: 1 }, true],
		["products.create", "a fractional price", { name: "A", price: 1.5, stock: 1 }, false],
		["products.create", "a lower-case currency", { name: "A", price: 1, stock: 1, currency: "usd" }, false],
		["products.create", "an empty name", { name: "", price: 1, stock: 1 }, false],
		["products.create", "a price over the maximum", { name: "A", price: 10_000_000_001, stock: 1 }, false],
		["products.list", "pageSize 100, a sort", { pageSize: 100, sort: "-price" }, true],
		["products.list", "pageSize 101", { pageSize: 101 }, false],
		["products.list", "an unknown sort", { sort: "password" }, false],
		["users.register", "a registration", { email: "a@b.co", password: "12345678", name: "N" }, true],
		["users.register", "a malformed email", { email: "not-an-email", password: "12345678", name: "N" }, false],
		["users.register", "a 7-character password", { email: "a@b.co", password: "1234567", name: "N" }, false],
	])("agrees with the validator of %s on %s", (actionName, _case, value, valid) => {
		const [service, action] = actionName.split(".");
		const params = paramsOf({ orders: OrdersService, products: ProductsService, users: UsersService }[service], action);
		const fastest = new Validators.Fastest().compile(params)(structuredClone(value));
		const ajv = addFormats(new Ajv2020({ strict: true })).compile(paramsToJsonSchema(actionName, params));
		expect(fastest === true).toBe(valid);
		expect(ajv(structuredClone(value))).toBe(valid);
	});
});

describe("the document from aliases and actions", () => {
	const authenticating = { opts: { authentication: true } };
	const alias = (method: string, fullPath: string, action: string | null, route: AliasInfo["route"] = authenticating): AliasInfo => ({
		method,
		fullPath,
		action,
		route,
	});
	const thing = { title: "Thing", type: "object", properties: { id: { type: "string" } }, required: ["id"], additionalProperties: false };
	const actions = (...list: ActionInfo[]) => new Map(list.map((a) => [a.name, a]));
	const opts = { title: "t", version: "1", basePath: "/api" };

	it("describes path, query and body parameters, security and the errors each kind of route can answer", () => {
		const doc = buildOpenApiDocument(
			[
				alias("GET", "/api/things", "things.list"),
				alias("GET", "/api/things/:id", "things.get"),
				alias("PATCH", "/api/things/:id", "things.update"),
				alias("POST", "/api/login", "things.login", { opts: { authentication: false, rateLimit: { limit: 1 } } }),
			],
			actions(
				{
					name: "things.list",
					auth: "public",
					params: { $$strict: "remove", page: { type: "number", integer: true, convert: true, optional: true, default: 1 } },
					openapi: { summary: "List", responses: { 200: { type: "array", items: thing } } },
				},
				{
					name: "things.get",
					auth: "user",
					params: { id: { type: "string" } },
					openapi: { summary: "Get", responses: { 200: thing } },
				},
				{
					name: "things.update",
					auth: "admin",
					params: { id: { type: "string" }, name: { type: "string" }, note: { type: "string", optional: true } },
					openapi: { summary: "Update", responses: { 200: thing }, errors: { 409: "Taken" } },
				},
				{
					name: "things.login",
					auth: "public",
					params: { email: { type: "string" } },
					openapi: { summary: "Log in", responses: { 200: null }, headers: { "X-Key": { description: "k", schema: { type: "string" } } } },
				},
			),
			opts,
		);
		expect(doc.servers).toEqual([{ url: "/api" }]);
		expect(Object.keys(doc.paths)).toEqual(["/login", "/things", "/things/{id}"]);
		const list = doc.paths["/things"].get;
		expect(list.parameters).toEqual([{ name: "page", in: "query", required: false, schema: { type: "integer", default: 1 } }]);
		expect(list.security).toBeUndefined();
		expect(list.responses["200"]).toEqual({
			description: "OK",
			content: { "application/json": { schema: { type: "array", items: { $ref: "#/components/schemas/Thing" } } } },
		});
		expect(doc.components.schemas.Thing).toEqual(thing);
		expect(Object.keys(list.responses)).toEqual(["200", "401", "422", "503", "504"]);

		const get = doc.paths["/things/{id}"].get;
		expect(get.security).toEqual([{ bearerAuth: [] }]);
		expect(get.parameters).toEqual([{ name: "id", in: "path", required: true, schema: { type: "string" } }]);
		expect(Object.keys(get.responses)).toEqual(["200", "401", "404", "422", "503", "504"]);

		const update = doc.paths["/things/{id}"].patch;
		expect(update.requestBody).toEqual({
			required: true,
			content: {
				"application/json": {
					schema: { type: "object", properties: { name: { type: "string" }, note: { type: "string" } }, required: ["name"] },
				},
			},
		});
		expect(Object.keys(update.responses)).toEqual(["200", "400", "401", "403", "404", "409", "413", "422", "503", "504"]);
		expect(update.responses["409"]).toMatchObject({ description: "Taken" });
		expect(update.responses["403"]).toEqual({
			description: "Authenticated, but not allowed",
			content: {
				"application/json": {
					schema: { type: "object", allOf: [{ $ref: "#/components/schemas/Error" }], properties: { code: { const: 403 } } },
				},
			},
		});

		const login = doc.paths["/login"].post;
		expect(Object.keys(login.responses)).toEqual(["200", "400", "413", "422", "429", "503", "504"]);
		expect(login.responses["200"]).toEqual({ description: "OK" });
		expect(login.parameters).toEqual([{ name: "X-Key", in: "header", required: false, description: "k", schema: { type: "string" } }]);
	});

	it("leaves out what the gateway does not serve as an API operation", () => {
		const doc = buildOpenApiDocument(
			[alias("GET", "/api/docs", null), alias("GET", "/api/api/list-aliases", "api.listAliases"), alias("GET", "/api/gone", "gone.list")],
			actions({ name: "api.listAliases" }),
			opts,
		);
		expect(doc.paths).toEqual({});
	});

	it("refuses what it cannot describe truthfully", () => {
		const ok = { summary: "s", responses: { 200: null } };
		const build =
			(aliases: AliasInfo[], ...list: ActionInfo[]) =>
			() =>
				buildOpenApiDocument(aliases, actions(...list), opts);
		expect(build([alias("GET", "/api/a", "a.a")], { name: "a.a", auth: "public" })).toThrow(
			"a.a is served at GET /api/a but declares no `openapi`",
		);
		expect(build([alias("*", "/api/a", "a.a")], { name: "a.a", auth: "public", openapi: ok })).toThrow(/needs one HTTP method/);
		expect(
			build(
				[alias("GET", "/api/a", "a.a"), alias("GET", "/api/a", "a.b")],
				{ name: "a.a", auth: "public", openapi: ok },
				{ name: "a.b", auth: "public", openapi: ok },
			),
		).toThrow("GET /a is served twice (a.a, a.b)");
		expect(build([alias("GET", "/api/a", "a.a"), alias("GET", "/api/b", "a.a")], { name: "a.a", auth: "public", openapi: ok })).toThrow(
			"a.a is served at two routes",
		);
		expect(
			build(
				[alias("GET", "/api/a", "a.a"), alias("GET", "/api/b", "a.b")],
				{ name: "a.a", auth: "public", openapi: { summary: "s", responses: { 200: thing } } },
				{ name: "a.b", auth: "public", openapi: { summary: "s", responses: { 200: { ...thing, required: [] } } } },
			),
		).toThrow("Two different response schemas are called 'Thing'");
		expect(
			build([alias("GET", "/api/a", "a.a")], {
				name: "a.a",
				auth: "public",
				params: { ids: { type: "array", items: { type: "string" } } },
				openapi: ok,
			}),
		).toThrow("a.a: the query parameter 'ids' must be a scalar");
		expect(build([alias("GET", "/api/a/*rest", "a.a")], { name: "a.a", auth: "public", openapi: ok })).toThrow(/path syntax/);
	});
});

/** Adds the gateway on a port of its own; returns its base URL. */
function startGateway(broker: ServiceBroker): string {
	const port = 30_000 + Math.floor(Math.random() * 10_000);
	broker.createService({ ...ApiService, settings: { ...ApiService.settings, port } });
	return `http://127.0.0.1:${port}/api`;
}

/** The document the one-process system served, to compare the split one with. */
let embeddedSpec: OpenApiDocument | undefined;

/** The whole system in one process, as `npm run dev` runs it. */
describe("the served document and docs page", () => {
	let broker: ServiceBroker;
	let base: string;
	let spec: OpenApiDocument;
	let contract: OpenApiContract;

	beforeAll(async () => {
		broker = new ServiceBroker({ logger: false });
		base = startGateway(broker);
		for (const schema of SERVICES) broker.createService(schema);
		await broker.start();
		await eventually(async () => ((await http(base, "GET", "/health/ready")).status === 200 ? true : undefined));
		spec = (await http<OpenApiDocument>(base, "GET", "/openapi.json")).body;
		embeddedSpec = spec;
		contract = new OpenApiContract(spec);
	});
	afterAll(() => broker.stop());

	it("is a valid OpenAPI 3.1 document", async () => {
		expect(spec.openapi).toBe("3.1.0");
		expect(await openApiProblems(spec)).toBeNull();
		// The validator does refuse a broken one.
		const get = spec.paths["/products/{id}"].get;
		const broken = { ...spec, paths: { ...spec.paths, "/products/{id}": { get: { ...get, responses: { 200: {} } } } } };
		expect(await openApiProblems(broken)).toMatch(/must have required property 'description'/);
		// What swagger-parser checks for 2.0 and 3.0 but not for 3.1: unique operationIds, every path parameter declared.
		const operations = Object.entries(spec.paths).flatMap(([p, ops]) => Object.values(ops).map((op) => ({ p, op })));
		expect(new Set(operations.map(({ op }) => op.operationId)).size).toBe(operations.length);
		for (const { p, op } of operations) {
			const declared = (op.parameters ?? []).filter((param) => param.in === "path").map((param) => param.name);
			expect(declared.sort()).toEqual([...p.matchAll(/\{(\w+)\}/g)].map((m) => m[1]).sort());
		}
	});

	it("documents every route of the contract, ../shared/API.md, with the contract's success status", () => {
		const routes = contractRoutes();
		// 17 in the route tables, 2 in the operations section: a parse that finds fewer is broken.
		expect(routes.length).toBeGreaterThanOrEqual(19);
		expect(routes.filter((r) => r.status).length).toBeGreaterThanOrEqual(17);
		for (const { route, status } of routes) {
			const [method, p] = route.split(" ");
			const op = spec.paths[p]?.[method.toLowerCase()];
			expect(op).toBeDefined();
			if (status) expect(Object.keys(op.responses)).toContain(status);
		}
	});

	it("documents every route the gateway serves, and serves every route it documents", async () => {
		const gateway = broker.getLocalService("api") as unknown as { aliases: AliasInfo[] };
		const id = "0123456789abcdef01234567";
		// Asked without a token or body: a served route answers (401, 422 …); one that is not is the gateway's "Not found".
		const probe = async (method: string, template: string) => {
			const res = await http<{ message?: string }>(base, method, template.replace(/[:{](\w+)}?/g, id));
			return !(res.status === 404 && res.body?.message === "Not found");
		};
		const served: string[] = [];
		for (const alias of gateway.aliases) {
			const route = `${alias.method} ${alias.fullPath.slice("/api".length)}`;
			if (alias.action && (await probe(alias.method, route.split(" ")[1]))) served.push(route.replace(/:(\w+)/g, "{$1}"));
		}
		const documented = Object.entries(spec.paths).flatMap(([p, ops]) => Object.keys(ops).map((m) => `${m.toUpperCase()} ${p}`));
		expect(served.sort()).toEqual([...documented].sort());
		for (const route of documented) expect(await probe(...(route.split(" ") as [string, string]))).toBe(true);
		// api.listAliases has a `rest` but no `auth`: auto-aliased, refused, and rightly not documented.
		expect(gateway.aliases.some((a) => a.action === "api.listAliases")).toBe(true);
	});

	it("declares the fields each service lets out, no more and no fewer", () => {
		for (const [name, schema] of [
			["users", userSchema()],
			["products", productSchema()],
			["orders", orderSchema()],
		] as const) {
			const fields = (broker.getLocalService(name).settings as { fields: string[] }).fields;
			expect(Object.keys(schema.properties as object).sort()).toEqual([...fields].sort());
		}
	});

	it("validates real responses, and catches an added, a renamed and a leaked field, or an undocumented status", async () => {
		const reg = await http<{ user: Record<string, unknown>; token: string }>(base, "POST", "/users/register", {
			body: { email: "docs@x.test", password: "password-1", name: "D" },
		});
		contract.assertResponse("POST", "/users/register", reg.status, reg.body);
		const me = await http<Record<string, unknown>>(base, "GET", "/users/me", { token: reg.body.token });
		contract.assertResponse("GET", "/users/me", me.status, me.body);
		for (const [method, url, opts] of [
			["GET", "/products?pageSize=5", {}],
			["GET", "/products/0123456789abcdef01234567", {}],
			["GET", "/products/nope", {}],
			["GET", "/users", { token: reg.body.token }],
			["DELETE", `/users/${String(reg.body.user.id)}`, { token: reg.body.token }],
			["GET", "/nope", {}],
			["GET", "/health", {}],
			["GET", "/openapi.json", {}],
		] as const) {
			const res = await http(base, method, url, opts);
			contract.assertResponse(method, url, res.status, res.body);
		}

		const { name, ...renamed } = me.body;
		expect(contract.problems("GET", "/users/me", 200, { ...me.body, passwordHash: "x" })).toEqual([
			expect.stringMatching(/GET \/users\/me .* 200: body must NOT have additional properties .*passwordHash/),
		]);
		expect(contract.problems("GET", "/users/me", 200, { ...renamed, fullName: name }).join("\n")).toMatch(
			/must have required property 'name'/,
		);
		expect(contract.problems("GET", "/users/me", 201, me.body)).toEqual([expect.stringMatching(/201: status not documented/)]);
		expect(contract.problems("DELETE", `/users/${String(me.body.id)}`, 204, { ok: true })).toEqual([
			expect.stringMatching(/without a body/),
		]);
		expect(contract.problems("POST", "/products/reserve", 200, {})).toEqual([expect.stringMatching(/in no operation of the spec/)]);
		expect(
			contract.problems("GET", "/products/0123456789abcdef01234567", 404, {
				name: "NotFoundError",
				message: "m",
				code: 500,
				type: null,
				data: null,
			}),
		).toEqual([expect.stringMatching(/body\/code must be equal to constant/)]);
	});

	it("serves the docs page and only the Swagger UI files it loads", async () => {
		const page = await fetch(`${base}/docs`);
		expect(page.status).toBe(200);
		expect(page.headers.get("content-type")).toBe("text/html; charset=utf-8");
		const html = await page.text();
		expect(html).toContain('url: "/api/openapi.json"');
		for (const file of DOCS_ASSETS) {
			expect(html).toContain(`/api/docs/${file}`);
			const asset = await fetch(`${base}/docs/${file}`);
			expect(asset.status).toBe(200);
			expect(Number(asset.headers.get("content-length"))).toBeGreaterThan(100);
		}
		// The package's demo page (a petstore from the internet) and anything else stay unserved.
		for (const file of ["index.html", "swagger-initializer.js", "package.json", "../package.json"]) {
			const res = await http(base, "GET", `/docs/${file}`);
			expect(res.status).toBe(404);
			expect(res.body).toMatchObject({ code: 404 });
		}
	});
});

/** Runs after the one-process system stopped: both would share the services' memory stores. */
describe("the document with the gateway on another node than the services", () => {
	const namespace = `openapi-${process.pid}`;
	let gatewayNode: ServiceBroker;
	let servicesNode: ServiceBroker;
	let splitBase: string;

	beforeAll(async () => {
		// The services' definitions reach the gateway through discovery, serialized as in the cluster.
		gatewayNode = new ServiceBroker({ namespace, nodeID: "gateway", transporter: "Fake", logger: false });
		servicesNode = new ServiceBroker({ namespace, nodeID: "services", transporter: "Fake", logger: false });
		splitBase = startGateway(gatewayNode);
		for (const schema of SERVICES) servicesNode.createService(schema);
		await Promise.all([gatewayNode.start(), servicesNode.start()]);
		await eventually(async () => ((await http(splitBase, "GET", "/health/ready")).status === 200 ? true : undefined));
	});
	afterAll(() => Promise.all([gatewayNode.stop(), servicesNode.stop()]));

	it("is the same as in one process", async () => {
		expect(embeddedSpec).toBeDefined();
		expect((await http(splitBase, "GET", "/openapi.json")).body).toEqual(embeddedSpec);
	});
});
