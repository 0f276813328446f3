import type { JsonSchema } from "./openapi";
import { ORDER_STATUSES } from "./order-state";

/**
 * JSON Schemas of what the REST API answers, for the actions' `openapi.responses`. Each lists every
 * field and allows no other, so a response with a field added, renamed or leaked (a hash, a hold)
 * fails the contract tests. A `title` makes the schema a named component of the OpenAPI document
 * (and a named type in a generated client).
 *
 * Every call builds new objects: action definitions reach the gateway through discovery, serialized
 * by Moleculer, which drops any object it meets a second time within one action (its circular
 * reference guard), so no two places of a declaration may share one.
 */

/** An object whose properties are all present (but those named in `optional`) and which has no others. */
function entity(title: string, properties: Record<string, JsonSchema>, optional: string[] = []): JsonSchema {
	return {
		title,
		type: "object",
		properties,
		required: Object.keys(properties).filter((key) => !optional.includes(key)),
		additionalProperties: false,
	};
}

const id = (): JsonSchema => ({ type: "string", pattern: "^[0-9a-f]{24}$" });
const timestamp = (): JsonSchema => ({ type: "string", format: "date-time" });
const money = (): JsonSchema => ({ type: "integer", minimum: 0, description: "Integer minor units (cents)" });
const currency = (): JsonSchema => ({ type: "string", pattern: "^[A-Z]{3}$", description: "ISO 4217" });
const count = (): JsonSchema => ({ type: "integer", minimum: 0 });
const orderStatus = (): JsonSchema => ({ enum: [...ORDER_STATUSES] });

export function userSchema(): JsonSchema {
	return entity("User", {
		id: id(),
		email: { type: "string", format: "email" },
		name: { type: "string" },
		role: { enum: ["customer", "admin"] },
		createdAt: timestamp(),
		updatedAt: timestamp(),
	});
}

/** The answer of registration and login. */
export function authResultSchema(): JsonSchema {
	return entity("AuthResult", { user: userSchema(), token: { type: "string", description: "A JWT: send it as the bearer token" } });
}

export function productSchema(): JsonSchema {
	return entity("Product", {
		id: id(),
		name: { type: "string" },
		description: { type: "string" },
		price: money(),
		currency: currency(),
		stock: count(),
		category: { type: "string" },
		sku: { type: ["string", "null"] },
		createdAt: timestamp(),
		updatedAt: timestamp(),
	});
}

/** `total` and `currency` are known once the reservation answered: a failed order has neither. */
export function orderSchema(): JsonSchema {
	const line = entity("OrderLine", {
		productId: id(),
		name: { type: "string" },
		unitPrice: money(),
		quantity: { type: "integer", minimum: 1 },
		lineTotal: money(),
	});
	const historyEntry = entity("OrderHistoryEntry", { status: orderStatus(), at: timestamp() });
	return entity(
		"Order",
		{
			id: id(),
			userId: id(),
			items: { type: "array", items: line },
			total: money(),
			currency: currency(),
			status: orderStatus(),
			history: { type: "array", items: historyEntry },
			createdAt: timestamp(),
			updatedAt: timestamp(),
		},
		["total", "currency"],
	);
}

/** The contract's list answer around `item`, named `<item's title>Page`. */
export function pageOf(item: JsonSchema): JsonSchema {
	return entity(`${String(item.title)}Page`, {
		rows: { type: "array", items: item },
		total: count(),
		page: { type: "integer", minimum: 1 },
		pageSize: { type: "integer", minimum: 1, maximum: 100 },
		totalPages: count(),
	});
}

export function healthSchema(): JsonSchema {
	return entity("Health", { status: { const: "ok" } });
}

export function readinessSchema(): JsonSchema {
	return entity("Readiness", { status: { const: "ok" }, services: { type: "object", additionalProperties: { const: "ok" } } });
}

/** GET /openapi.json answers the document itself; its validity is checked by an OpenAPI validator, not here. */
export function openApiDocumentSchema(): JsonSchema {
	return {
		type: "object",
		required: ["openapi", "info", "paths", "components"],
		properties: { openapi: { const: "3.1.0" }, info: { type: "object" }, paths: { type: "object" }, components: { type: "object" } },
	};
}
