import { STATUS_CODES } from "node:http";
import type { Service } from "moleculer";
import type { ApiSettingsSchema } from "moleculer-web";
import { version } from "../package.json";
import type { AuthLevel } from "./types";

/**
 * The OpenAPI 3.1 document of the REST API, generated from what the gateway actually serves: its
 * aliases (explicit and auto-generated from `rest`) and, for each, the action's definition as the
 * registry has it (`auth`, `params`, `openapi`) — for remote actions, as it arrived through discovery.
 * Nothing here is written twice, so the document cannot drift from the routes.
 *
 * moleculer-auto-openapi (the generator on npm) writes OpenAPI 3.0, knows nothing of `auth` or of our
 * error shape, and serves its own older copy of Swagger UI; hence this module.
 */

/** A JSON Schema, draft 2020-12: the dialect of OpenAPI 3.1. */
export type JsonSchema = { [keyword: string]: unknown };

/** What an action declares for the docs, next to its `rest`, `auth` and `params`. */
export interface ActionOpenApi {
	summary: string;
	/** Success statuses and their JSON bodies (a schema with a `title` becomes a named component); `null`: no body. */
	responses: Record<number, JsonSchema | null>;
	/** Errors beyond those the route itself implies (see `impliedErrors`), with when they happen. */
	errors?: Record<number, string>;
	/** Request headers the action reads through the gateway. */
	headers?: Record<string, { description: string; schema: JsonSchema }>;
}

declare module "moleculer" {
	interface ActionSchema {
		openapi?: ActionOpenApi;
	}
}

/** The parts of an action definition the document is made of (local, or as received from another node). */
export interface ActionInfo {
	name: string;
	auth?: AuthLevel;
	params?: Record<string, unknown>;
	openapi?: ActionOpenApi;
}

/** The parts of a moleculer-web alias (and of its route) the document is made of. */
export interface AliasInfo {
	method: string;
	fullPath: string;
	action: string | null;
	route: { opts: { authentication?: boolean; rateLimit?: unknown } };
}

export interface DocumentOptions {
	title: string;
	version: string;
	/** The gateway's global path (`/api`): the server URL, and stripped from every alias. */
	basePath: string;
}

export type OpenApiDocument = {
	openapi: "3.1.0";
	info: { title: string; version: string; description: string };
	servers: Array<{ url: string }>;
	tags: Array<{ name: string }>;
	paths: Record<string, Record<string, Operation>>;
	components: { schemas: Record<string, JsonSchema>; securitySchemes: Record<string, JsonSchema> };
};

type Operation = {
	operationId: string;
	summary: string;
	description: string;
	tags: string[];
	security?: Array<Record<string, string[]>>;
	parameters?: JsonSchema[];
	requestBody?: JsonSchema;
	responses: Record<string, JsonSchema>;
};

const BODY_METHODS = new Set(["post", "put", "patch"]);

/** The contract's error shape (`../shared/API.md`), produced by the gateway's `onError`. */
const ERROR_SCHEMA: JsonSchema = {
	type: "object",
	description: "Every error has this shape; `code` is the HTTP status.",
	required: ["name", "message", "code", "type", "data"],
	additionalProperties: false,
	properties: {
		name: { type: "string" },
		message: { type: "string" },
		code: { type: "integer" },
		type: { type: ["string", "null"] },
		data: {},
	},
};

/** A 422 lists the fields that failed in `data`. */
const VALIDATION_ERROR_SCHEMA: JsonSchema = {
	type: "object",
	allOf: [{ $ref: "#/components/schemas/Error" }],
	properties: {
		code: { const: 422 },
		data: {
			type: "array",
			items: { type: "object", required: ["field", "message"], properties: { field: { type: "string" }, message: { type: "string" } } },
		},
	},
};

/** The statuses of API.md's table, with what they mean for any route. */
const ERROR_DESCRIPTIONS: Record<number, string> = {
	400: "Malformed JSON, or a body that is not application/json",
	401: "Missing, invalid or expired bearer token",
	403: "Authenticated, but not allowed",
	404: "No such entity (someone else's is a 404 too)",
	409: "Conflict with the current state",
	413: "Body larger than 1 MiB",
	422: "Parameter validation failed; `data` lists the fields",
	429: "Too many requests from this client; retry later",
	503: "A service or database needed for the request is unavailable; retry later",
	504: "A timeout inside the system",
};

/**
 * The errors a route can answer whatever its action does, from the gateway's own rules: 401 where
 * the route authenticates (a bad token is refused on every route that reads one) or the action needs
 * a user, 403 for admin actions, 404 for routes with an entity id, 422 for actions with params, 400
 * and 413 for bodies, 429 for rate-limited routes, 503/504 everywhere.
 */
function impliedErrors(method: string, pathParams: string[], action: ActionInfo, route: AliasInfo["route"]): number[] {
	const statuses = [503, 504];
	if (BODY_METHODS.has(method)) statuses.push(400, 413);
	if (route.opts.authentication || action.auth !== "public") statuses.push(401);
	if (action.auth === "admin") statuses.push(403);
	if (pathParams.length > 0) statuses.push(404);
	if (Object.keys(action.params ?? {}).some((key) => !key.startsWith("$$"))) statuses.push(422);
	if (route.opts.rateLimit) statuses.push(429);
	return statuses;
}

function errorResponse(status: number, description: string): JsonSchema {
	const schema =
		status === 422
			? { $ref: "#/components/schemas/ValidationError" }
			: { type: "object", allOf: [{ $ref: "#/components/schemas/Error" }], properties: { code: { const: status } } };
	return { description, content: { "application/json": { schema } } };
}

/** Builds the document from the gateway's aliases and the registry's action definitions. */
export function buildOpenApiDocument(aliases: AliasInfo[], actions: Map<string, ActionInfo>, opts: DocumentOptions): OpenApiDocument {
	const components = new SchemaComponents({ Error: ERROR_SCHEMA, ValidationError: VALIDATION_ERROR_SCHEMA });
	const paths: OpenApiDocument["paths"] = {};
	const operationIds = new Set<string>();

	for (const alias of aliases) {
		// A function alias (the docs page) is no API operation.
		if (!alias.action) continue;
		const action = actions.get(alias.action);
		// Not in the registry right now (its service is down): the gateway answers 503, there is nothing to describe.
		if (!action) continue;
		// An action without `auth` is answered with 404 by the gateway's `authorize`: not part of the API.
		if (!action.auth) continue;
		if (!action.openapi) throw new Error(`${action.name} is served at ${alias.method} ${alias.fullPath} but declares no \`openapi\``);

		const method = alias.method.toLowerCase();
		if (!["get", "post", "put", "patch", "delete"].includes(method)) {
			throw new Error(`${action.name}: the route ${alias.method} ${alias.fullPath} needs one HTTP method`);
		}
		const path = toOpenApiPath(alias.fullPath, opts.basePath);
		if (paths[path]?.[method])
			throw new Error(`${method.toUpperCase()} ${path} is served twice (${paths[path][method].operationId}, ${action.name})`);
		if (operationIds.has(action.name)) throw new Error(`${action.name} is served at two routes`);
		operationIds.add(action.name);

		paths[path] ??= {};
		paths[path][method] = buildOperation(method, path, action, action.openapi, alias.route, components);
	}

	const sortedPaths = Object.fromEntries(Object.entries(paths).sort(([a], [b]) => a.localeCompare(b)));
	const tags = [...new Set(Object.values(sortedPaths).flatMap((ops) => Object.values(ops).flatMap((op) => op.tags)))].sort();
	return {
		openapi: "3.1.0",
		info: {
			title: opts.title,
			version: opts.version,
			description:
				"Generated from the gateway's routes and the services' action definitions. Routes that need a user take the " +
				"token that `POST /users/login` (or `/users/register`) answers as a bearer token; on the docs page, logging in " +
				'with "Try it out" authorizes the page.',
		},
		servers: [{ url: opts.basePath || "/" }],
		tags: tags.map((name) => ({ name })),
		paths: sortedPaths,
		components: {
			schemas: components.all(),
			securitySchemes: { bearerAuth: { type: "http", scheme: "bearer", bearerFormat: "JWT" } },
		},
	};
}

/** A running moleculer-web gateway, as the document needs it. */
export type Gateway = Service<ApiSettingsSchema> & { aliases: AliasInfo[] };

/** The gateway's global path (`/api`), or "" when it serves from the root. */
export function basePathOf(gateway: Service<ApiSettingsSchema>): string {
	const path = gateway.settings.path;
	return path && path !== "/" ? path : "";
}

/** The document of a running gateway: its current aliases, and the actions the registry knows now. */
export function gatewayOpenApi(gateway: Gateway): OpenApiDocument {
	const actions = new Map<string, ActionInfo>();
	for (const item of gateway.broker.registry.getActionList({ skipInternal: true, onlyAvailable: true, withEndpoints: false })) {
		if (item.action) actions.set(item.name, { ...item.action, name: item.name });
	}
	return buildOpenApiDocument(gateway.aliases, actions, { title: "moleculer-shop API", version, basePath: basePathOf(gateway) });
}

function buildOperation(
	method: string,
	path: string,
	action: ActionInfo,
	doc: ActionOpenApi,
	route: AliasInfo["route"],
	components: SchemaComponents,
): Operation {
	const pathParams = [...path.matchAll(/\{(\w+)\}/g)].map((m) => m[1]);
	const params = paramsToJsonSchema(action.name, action.params ?? {});
	const props = params.properties as Record<string, JsonSchema>;
	const required = (params.required ?? []) as string[];

	const parameters: JsonSchema[] = pathParams.map((name) => ({
		name,
		in: "path",
		required: true,
		schema: props[name] ?? { type: "string" },
	}));
	const rest = Object.keys(props).filter((name) => !pathParams.includes(name));
	let requestBody: JsonSchema | undefined;
	if (BODY_METHODS.has(method)) {
		if (rest.length > 0) {
			const bodyRequired = required.filter((name) => rest.includes(name));
			const schema = {
				type: "object",
				properties: Object.fromEntries(rest.map((name) => [name, props[name]])),
				...(bodyRequired.length > 0 ? { required: bodyRequired } : {}),
				...(params.additionalProperties === false ? { additionalProperties: false } : {}),
			};
			requestBody = { required: bodyRequired.length > 0, content: { "application/json": { schema } } };
		}
	} else {
		for (const name of rest) {
			const schema = props[name];
			if (schema.type === "object" || schema.type === "array")
				throw new Error(`${action.name}: the query parameter '${name}' must be a scalar`);
			parameters.push({ name, in: "query", required: required.includes(name), schema });
		}
	}
	for (const [name, header] of Object.entries(doc.headers ?? {})) {
		parameters.push({ name, in: "header", required: false, description: header.description, schema: header.schema });
	}

	const responses: Record<string, JsonSchema> = {};
	for (const [status, schema] of Object.entries(doc.responses)) {
		const description = STATUS_CODES[status] ?? status;
		responses[status] =
			schema === null ? { description } : { description, content: { "application/json": { schema: components.hoist(schema) } } };
	}
	const errors = new Map(impliedErrors(method, pathParams, action, route).map((s) => [s, ERROR_DESCRIPTIONS[s]]));
	for (const [status, description] of Object.entries(doc.errors ?? {})) errors.set(Number(status), description);
	for (const [status, description] of [...errors].sort(([a], [b]) => a - b)) responses[status] = errorResponse(status, description);

	const [tag] = action.name.split(".");
	return {
		operationId: action.name,
		summary: doc.summary,
		description: `${AUTH_DESCRIPTIONS[action.auth!]} Served by the action \`${action.name}\`.`,
		tags: [tag],
		...(action.auth === "public" ? {} : { security: [{ bearerAuth: [] }] }),
		...(parameters.length > 0 ? { parameters } : {}),
		...(requestBody ? { requestBody } : {}),
		responses,
	};
}

const AUTH_DESCRIPTIONS: Record<AuthLevel, string> = {
	public: "Anyone may call it.",
	user: "Needs the bearer token of a user.",
	admin: "Needs the bearer token of an admin.",
};

/** `/api/orders/:id/cancel` → `/orders/{id}/cancel` (every alias's full path starts with the gateway's path); only `:name` parameters are used here. */
function toOpenApiPath(fullPath: string, basePath: string): string {
	const path = fullPath.slice(basePath.length) || "/";
	if (/[*?{}()]/.test(path)) throw new Error(`The route ${fullPath} uses path syntax the document does not describe`);
	return path.replace(/:(\w+)/g, "{$1}");
}

/**
 * Named schemas: a response schema with a `title` is stored once under components/schemas and
 * referenced. Two different schemas with one title (two versions of a service answering at once)
 * is an error, not a silent pick.
 */
class SchemaComponents {
	private readonly schemas = new Map<string, { schema: JsonSchema; canonical: string }>();

	constructor(fixed: Record<string, JsonSchema>) {
		for (const [name, schema] of Object.entries(fixed)) this.schemas.set(name, { schema, canonical: canonicalJson(schema) });
	}

	hoist(schema: JsonSchema): JsonSchema {
		const inner = mapSubschemas(schema, (sub) => this.hoist(sub));
		if (typeof inner.title !== "string") return inner;
		const title = inner.title;
		const canonical = canonicalJson(inner);
		const known = this.schemas.get(title);
		if (known && known.canonical !== canonical) throw new Error(`Two different response schemas are called '${title}'`);
		this.schemas.set(title, { schema: inner, canonical });
		return { $ref: `#/components/schemas/${title}` };
	}

	all(): Record<string, JsonSchema> {
		return Object.fromEntries([...this.schemas].sort(([a], [b]) => a.localeCompare(b)).map(([name, { schema }]) => [name, schema]));
	}
}

/** Applies `fn` to the direct subschemas of `schema` under the keywords lib/api-schemas.ts nests with. */
function mapSubschemas(schema: JsonSchema, fn: (s: JsonSchema) => JsonSchema): JsonSchema {
	const out: JsonSchema = { ...schema };
	if (isSchema(schema.items)) out.items = fn(schema.items);
	if (isSchema(schema.additionalProperties)) out.additionalProperties = fn(schema.additionalProperties);
	if (isSchema(schema.properties)) {
		out.properties = Object.fromEntries(Object.entries(schema.properties).map(([k, v]) => [k, fn(v as JsonSchema)]));
	}
	return out;
}

function isSchema(value: unknown): value is JsonSchema {
	return typeof value === "object" && value !== null && !Array.isArray(value);
}

function canonicalJson(value: unknown): string {
	return JSON.stringify(value, (_key, v: unknown) =>
		isSchema(v) ? Object.fromEntries(Object.entries(v).sort(([a], [b]) => a.localeCompare(b))) : v,
	);
}

// ---------------------------------------------------------------------------------------------
// fastest-validator → JSON Schema

type Rule = Record<string, unknown>;

/** Keys every rule may have that change nothing in the schema (`trim`, `normalize`, `convert` act on the input before the checks). */
const NEUTRAL_KEYS = ["type", "optional", "default", "messages", "convert", "trim", "normalize"];

/** The rule types and properties this converter knows; anything else fails loudly rather than vanish from the docs. */
const CONVERTERS: Record<string, { keys: string[]; convert(rule: Rule, where: string): JsonSchema }> = {
	string: {
		keys: ["min", "max", "pattern"],
		convert: (rule, where) => ({
			type: "string",
			...bounds(rule, "minLength", "maxLength"),
			...(rule.pattern !== undefined ? { pattern: patternSource(rule.pattern, where) } : {}),
		}),
	},
	email: { keys: ["min", "max"], convert: (rule) => ({ type: "string", format: "email", ...bounds(rule, "minLength", "maxLength") }) },
	number: {
		keys: ["min", "max", "integer"],
		convert: (rule) => ({ type: rule.integer ? "integer" : "number", ...bounds(rule, "minimum", "maximum") }),
	},
	boolean: { keys: [], convert: () => ({ type: "boolean" }) },
	enum: {
		keys: ["values"],
		convert: (rule) => {
			const values = rule.values as unknown[];
			return { ...(values.every((v) => typeof v === "string") ? { type: "string" } : {}), enum: values };
		},
	},
	array: {
		keys: ["items", "min", "max", "unique"],
		convert: (rule, where) => ({
			type: "array",
			...(rule.items !== undefined ? { items: ruleToJsonSchema(rule.items, `${where}[]`) } : {}),
			...bounds(rule, "minItems", "maxItems"),
			...(rule.unique === true ? { uniqueItems: true } : {}),
		}),
	},
	object: {
		keys: ["props", "strict"],
		convert: (rule, where) => objectSchema((rule.props ?? {}) as Record<string, unknown>, rule.strict, where),
	},
	any: { keys: [], convert: () => ({}) },
};

function bounds(rule: Rule, minKey: string, maxKey: string): JsonSchema {
	return { ...(rule.min !== undefined ? { [minKey]: rule.min } : {}), ...(rule.max !== undefined ? { [maxKey]: rule.max } : {}) };
}

/**
 * A pattern as a JSON Schema string. A RegExp does not survive the registry's JSON (it arrives from
 * another node as `{}`), which is why our params write their patterns as strings.
 */
function patternSource(pattern: unknown, where: string): string {
	if (typeof pattern === "string") return pattern;
	if (pattern instanceof RegExp && pattern.flags === "") return pattern.source;
	throw new Error(`${where}: the pattern must be a string without flags (a RegExp arrives from other nodes as {})`);
}

/** One fastest-validator rule (object form) as a JSON Schema, with `default` kept for the docs. */
export function ruleToJsonSchema(rule: unknown, where: string): JsonSchema {
	if (!isSchema(rule) || typeof rule.type !== "string") throw new Error(`${where}: only rules in object form with a 'type' are supported`);
	const converter = CONVERTERS[rule.type];
	if (!converter) throw new Error(`${where}: the rule type '${rule.type}' is not supported`);
	const unknown = Object.keys(rule).filter((key) => !NEUTRAL_KEYS.includes(key) && !converter.keys.includes(key));
	if (unknown.length > 0) throw new Error(`${where}: the rule properties ${unknown.join(", ")} of '${rule.type}' are not supported`);
	const schema = converter.convert(rule, where);
	return rule.default !== undefined ? { ...schema, default: rule.default } : schema;
}

function isOptional(rule: unknown): boolean {
	return isSchema(rule) && (rule.optional === true || rule.default !== undefined);
}

/** `strict: true` refuses unknown properties (a 422); `"remove"` and the default let them through, dropped. */
function objectSchema(props: Record<string, unknown>, strict: unknown, where: string): JsonSchema {
	const properties = Object.fromEntries(Object.entries(props).map(([name, rule]) => [name, ruleToJsonSchema(rule, `${where}.${name}`)]));
	const required = Object.keys(props).filter((name) => !isOptional(props[name]));
	return {
		type: "object",
		properties,
		...(required.length > 0 ? { required } : {}),
		...(strict === true ? { additionalProperties: false } : {}),
	};
}

/** An action's whole `params` (the top-level `$$strict` included) as one object schema. */
export function paramsToJsonSchema(actionName: string, params: Record<string, unknown>): JsonSchema {
	const unknown = Object.keys(params).filter((key) => key.startsWith("$$") && key !== "$$strict");
	if (unknown.length > 0) throw new Error(`${actionName}: ${unknown.join(", ")} is not supported`);
	const props = Object.fromEntries(Object.entries(params).filter(([key]) => !key.startsWith("$$")));
	return objectSchema(props, params.$$strict, actionName);
}
