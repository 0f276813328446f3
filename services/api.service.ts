import type { IncomingMessage, ServerResponse } from "node:http";
import type { CallingOptions, Context, Service, ServiceSchema } from "moleculer";
import { Errors } from "moleculer";
import ApiGateway, { type ApiSettingsSchema } from "moleculer-web";
import { healthSchema, openApiDocumentSchema, readinessSchema } from "../lib/api-schemas";
import { config } from "../lib/config";
import { docsAssets, docsPage } from "../lib/docs-page";
import { ForbiddenError, UnauthorizedError, UnavailableError } from "../lib/errors";
import { gatewayOpenApi, type Gateway, type OpenApiDocument } from "../lib/openapi";
import type { AuthLevel, AuthUser, ShopMeta } from "../lib/types";

/** The services whose `health` action decides readiness. */
const READINESS_SERVICES = ["users", "products", "orders"] as const;
const READINESS_TIMEOUT_MS = 2_000;
const MAX_BODY = "1mb";

interface GatewayRequest extends IncomingMessage {
	$action?: { name: string; auth?: AuthLevel };
	$ctx: Context<unknown, ShopMeta>;
}

/** Errors that mean "a service needed for this request is not there": 503 per the contract, not 404/500. */
const UNAVAILABLE_ERRORS = new Set(["ServiceNotFoundError", "ServiceNotAvailableError", "QueueIsFullError"]);

/** The contract's error shape; a 5xx that is not one of ours never passes its message on. */
function errorBody(err: Errors.MoleculerError): { name: string; message: string; code: number; type: string | null; data: unknown } {
	return {
		name: err.name,
		message: err.message,
		code: err.code,
		type: err.type ?? null,
		data: err.data ?? null,
	};
}

export function toClientError(err: unknown): Errors.MoleculerError {
	if (!(err instanceof Error)) return new Errors.MoleculerServerError("Internal Server Error", 500, "INTERNAL_ERROR");
	const e = err as Errors.MoleculerError & { status?: number; type?: string };
	if (UNAVAILABLE_ERRORS.has(e.name)) return new UnavailableError();
	if (e.name === "RequestTimeoutError") return new Errors.MoleculerError("Request timed out", 504, "REQUEST_TIMEOUT");
	// body-parser's errors (moleculer-web may have wrapped them): its messages quote the input.
	if (e.type === "entity.parse.failed") return new Errors.MoleculerClientError("Malformed JSON body", 400, "MALFORMED_JSON");
	if (e.type === "entity.too.large" || e.status === 413) {
		return new Errors.MoleculerClientError("Request body too large", 413, "PAYLOAD_TOO_LARGE");
	}
	if (!(err instanceof Errors.MoleculerError) && typeof e.status === "number" && e.status >= 400 && e.status < 500) {
		return new Errors.MoleculerClientError(e.message, e.status, "BAD_REQUEST");
	}
	const code = typeof e.code === "number" && e.code >= 400 && e.code < 600 ? e.code : 500;
	if (code >= 500 && code !== 503 && code !== 504) {
		return new Errors.MoleculerServerError("Internal Server Error", 500, "INTERNAL_ERROR");
	}
	const clean = new Errors.MoleculerError(e.message, code, e.type, withoutInternals(e.data));
	clean.name = e.name;
	return clean;
}

/** Validation errors list the failing fields; Moleculer adds the node (hostname-pid) and action, which stay inside. */
function withoutInternals(data: unknown): unknown {
	if (!Array.isArray(data)) return data;
	return data.map((item: unknown) => {
		if (!item || typeof item !== "object") return item;
		const rest: Record<string, unknown> = { ...item };
		delete rest.nodeID;
		delete rest.action;
		return rest;
	});
}

const ApiService: ServiceSchema<ApiSettingsSchema> = {
	name: "api",
	mixins: [ApiGateway],

	settings: {
		port: config.port,
		ip: "0.0.0.0",
		path: "/api",
		// Two log lines per request by default; at info level they cost more than the call itself.
		logRequest: "debug",
		logResponse: "debug",
		log4XXResponses: false,
		logRouteRegistration: "debug",

		routes: [
			{
				// Login and registration are rate limited per client, before anything else matches.
				path: "/users",
				aliases: {
					"POST /login": "users.login",
					"POST /register": "users.register",
				},
				rateLimit: {
					window: 60_000,
					limit: config.auth.loginRateLimitPerMinute,
					headers: true,
					// The peer address: X-Forwarded-For is client-controlled unless a trusted proxy sets it.
					key: (req: IncomingMessage) => req.socket.remoteAddress ?? "unknown",
				},
				authentication: false,
				authorization: true,
				mappingPolicy: "restrict",
				bodyParsers: { json: { limit: MAX_BODY, strict: true } },
				use: [requireJsonBody],
				callOptions: { retries: 0 },
			},
			{
				// The docs page and the Swagger UI files it loads (before the route below, which would take every /api/docs/* URL).
				path: "/docs",
				aliases: { "GET /": docsPage },
				use: [docsAssets],
				authentication: false,
				authorization: false,
				mappingPolicy: "restrict",
			},
			{
				path: "",
				// Every action with a `rest` definition gets its route; `authorize` then requires `auth`.
				autoAliases: true,
				// Served by the rate-limited route above only.
				blacklist: ["users.login", "users.register"],
				aliases: {
					"GET /health": "api.health",
					"GET /health/ready": "api.ready",
					"GET /openapi.json": "api.openapi",
				},
				authentication: true,
				authorization: true,
				mappingPolicy: "restrict",
				bodyParsers: { json: { limit: MAX_BODY, strict: true } },
				use: [requireJsonBody],
				// Writes are never re-sent by the gateway (not every action is idempotent); reads may be, see callAction.
				callOptions: { retries: 0 },
				onBeforeCall(ctx: Context<unknown, ShopMeta>, route: unknown, req: IncomingMessage) {
					const key = req.headers["idempotency-key"];
					if (typeof key === "string" && key.length > 0) ctx.meta.idempotencyKey = key;
				},
			},
		],

		onError(this: { logger: Console }, req: IncomingMessage, res: ServerResponse, err: Error) {
			const clean = toClientError(err);
			if (clean.code >= 500 && clean.code !== 503 && clean.code !== 504) {
				this.logger.error(`Unexpected error on ${req.method} ${req.url}:`, err);
			}
			res.setHeader("Content-Type", "application/json; charset=utf-8");
			res.writeHead(clean.code);
			res.end(JSON.stringify(errorBody(clean)));
		},
	},

	actions: {
		/** moleculer-web's HTTP handler: re-running it would replay a request whose body is already read. */
		rest: { retryPolicy: { enabled: false } },

		/** Liveness of the gateway itself. */
		health: {
			auth: "public",
			openapi: { summary: "Liveness of the gateway", responses: { 200: healthSchema() } },
			handler(): { status: "ok" } {
				return { status: "ok" };
			},
		},

		/** Readiness: every business service answers its own `health`, which checks its database. */
		ready: {
			auth: "public",
			openapi: { summary: "Readiness: users, products and orders each answer with their database", responses: { 200: readinessSchema() } },
			async handler(
				ctx: Context<unknown, ShopMeta>,
			): Promise<{ status: "ok"; services: Record<string, string> } | ReturnType<typeof errorBody>> {
				const aliases = (this as unknown as { aliases: Array<{ action?: string; _generated?: boolean }> }).aliases;
				const results = await Promise.all(
					READINESS_SERVICES.map(async (name) => {
						try {
							await ctx.call(`${name}.health`, {}, { timeout: READINESS_TIMEOUT_MS, retries: 0 });
							// Routes are generated a moment after a service appears; until then its REST API would 404.
							// Only generated routes count: the explicit login/register aliases exist before users does.
							if (!aliases.some((alias) => alias._generated && alias.action?.startsWith(`${name}.`)))
								return [name, "no routes yet"] as const;
							return [name, "ok"] as const;
						} catch {
							return [name, "unavailable"] as const;
						}
					}),
				);
				const services = Object.fromEntries(results);
				if (results.some(([, status]) => status !== "ok")) {
					// Answered rather than thrown: "not ready" is an expected state that probes poll for, and
					// moleculer-web logs every thrown 5xx as an error with its stack.
					ctx.meta.$statusCode = 503;
					return errorBody(new UnavailableError("Not ready", "NOT_READY", { services }));
				}
				return { status: "ok", services };
			},
		},

		/** The OpenAPI document, generated per request from the current routes and the registry: it cannot lag behind them. */
		openapi: {
			auth: "public",
			openapi: { summary: "This API's OpenAPI 3.1 document", responses: { 200: openApiDocumentSchema() } },
			handler(): OpenApiDocument {
				return gatewayOpenApi(this as unknown as Gateway);
			},
		},
	},

	methods: {
		/**
		 * A GET may go to another replica when the one it was sent to crashed or left (a retryable error):
		 * reads are safe to repeat. A write is not re-sent; a client repeats it with its Idempotency-Key.
		 */
		callAction(this: Service, route: GatewayRoute, actionName: string, req: IncomingMessage, ...rest: unknown[]): Promise<unknown> {
			const effective = req.method === "GET" ? readRouteOf(route) : route;
			return baseCallAction.call(this, effective, actionName, req, ...rest);
		},

		/** Resolves the bearer token (if any) to the caller; an absent token is an anonymous caller. */
		async authenticate(ctx: Context<unknown, ShopMeta>, route: unknown, req: IncomingMessage): Promise<AuthUser | null> {
			const header = req.headers.authorization;
			if (!header) return null;
			const match = /^Bearer\s+(\S+)$/i.exec(header);
			if (!match) throw new UnauthorizedError();
			return ctx.call<AuthUser, { token: string }>("users.resolveToken", { token: match[1] });
		},

		/** Enforces the `auth` level that every REST-reachable action declares. */
		authorize(ctx: Context<unknown, ShopMeta>, route: unknown, req: GatewayRequest): void {
			const level = req.$action?.auth;
			// An action that declares nothing is not part of the REST API.
			if (!level) throw new Errors.MoleculerClientError("Not found", 404, "NOT_FOUND");
			if (level === "public") return;
			const user = ctx.meta.user;
			if (!user) throw new UnauthorizedError();
			if (level === "admin" && user.role !== "admin") throw new ForbiddenError();
		},
	},
};

type GatewayRoute = { callOptions?: CallingOptions } & Record<string, unknown>;

const baseCallAction = (ApiGateway.methods as Record<string, (this: Service, ...args: unknown[]) => Promise<unknown>>).callAction;

/** Each route as seen by GET requests: the same route, with the broker's retry policy for its calls. */
const readRoutes = new WeakMap<GatewayRoute, GatewayRoute>();
function readRouteOf(route: GatewayRoute): GatewayRoute {
	let read = readRoutes.get(route);
	if (!read) {
		read = Object.create(route, { callOptions: { value: { ...route.callOptions, retries: config.retry.retries } } }) as GatewayRoute;
		readRoutes.set(route, read);
	}
	return read;
}

/** JSON in: a body with another content type is a 400, not an empty object that fails validation later. */
function requireJsonBody(req: IncomingMessage, res: ServerResponse, next: (err?: Error) => void): void {
	const hasBody = Number(req.headers["content-length"] ?? 0) > 0 || req.headers["transfer-encoding"] !== undefined;
	const type = req.headers["content-type"] ?? "";
	if (hasBody && !/^application\/(.+\+)?json\b/i.test(type)) {
		next(new Errors.MoleculerClientError("Content-Type must be application/json", 400, "UNSUPPORTED_CONTENT_TYPE"));
		return;
	}
	next();
}

export default ApiService;
