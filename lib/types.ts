import "moleculer";

/**
 * Who may call an action through the gateway. An action without `auth` is not reachable from REST
 * at all (it is for other services, the REPL and tests).
 *   - public: anyone;  user: any valid token;  admin: a token of an admin.
 */
export type AuthLevel = "public" | "user" | "admin";

declare module "moleculer" {
	interface ActionSchema {
		auth?: AuthLevel;
	}
}

export type Role = "customer" | "admin";

/** The caller, as the gateway resolved it from the bearer token; carried to every service in `ctx.meta`. */
export interface AuthUser {
	id: string;
	email: string;
	role: Role;
}

export interface ShopMeta {
	user?: AuthUser;
	/** Set by the gateway from the `Idempotency-Key` header. */
	idempotencyKey?: string;
	$statusCode?: number;
	$location?: string;
	$responseHeaders?: Record<string, string>;
}

/** The list answer of `../shared/API.md`. */
export interface Page<T> {
	rows: T[];
	total: number;
	page: number;
	pageSize: number;
	totalPages: number;
}
