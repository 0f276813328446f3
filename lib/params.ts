/**
 * fastest-validator schemas shared by the services' actions. Patterns are strings, not RegExps: action
 * schemas reach the gateway through discovery as JSON, where a RegExp becomes `{}`, and the OpenAPI
 * document (lib/openapi.ts) is generated from them.
 */

/** Every public action strips fields it does not declare: nothing unasked-for is stored or queried. */
export const STRICT = { $$strict: "remove" } as const;

/** Ids are MongoDB ObjectId hex strings; anything else is a 422 before it reaches a query. */
export const objectId = {
	type: "string",
	pattern: "^[0-9a-fA-F]{24}$",
	messages: { stringPattern: "'{field}' must be a 24-character hex id" },
} as const;

/** `?page=1&pageSize=20`, with pageSize at most 100 (query strings arrive as text, hence `convert`). */
export const pageParams = {
	page: { type: "number", integer: true, min: 1, max: 100_000, convert: true, optional: true, default: 1 },
	pageSize: { type: "number", integer: true, min: 1, max: 100, convert: true, optional: true, default: 20 },
} as const;

export const searchParam = { type: "string", trim: true, max: 100, optional: true } as const;
