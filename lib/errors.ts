import { Errors } from "moleculer";

/**
 * The errors a client can see. Each carries the HTTP status of `../shared/API.md` as its `code`, and
 * moleculer-web answers `{ name, message, code, type, data }` from it.
 */

export class NotFoundError extends Errors.MoleculerClientError {
	constructor(what: string, data?: Record<string, unknown>) {
		super(`${what} not found`, 404, "NOT_FOUND", data);
		this.name = "NotFoundError";
	}
}

export class ConflictError extends Errors.MoleculerClientError {
	constructor(message: string, type = "CONFLICT", data?: Record<string, unknown>) {
		super(message, 409, type, data);
		this.name = "ConflictError";
	}
}

export class UnauthorizedError extends Errors.MoleculerClientError {
	constructor(message = "Missing, invalid or expired token", type = "UNAUTHORIZED") {
		super(message, 401, type);
		this.name = "UnauthorizedError";
	}
}

export class ForbiddenError extends Errors.MoleculerClientError {
	constructor(message = "Not allowed") {
		super(message, 403, "FORBIDDEN");
		this.name = "ForbiddenError";
	}
}

export class UnprocessableError extends Errors.MoleculerClientError {
	constructor(message: string, data: Array<{ field: string; message: string; type?: string }>) {
		super(message, 422, "VALIDATION_ERROR", data);
		this.name = "ValidationError";
	}
}

/**
 * A dependency (a database, another service) is not reachable right now. Not marked retryable: the
 * broker must not re-run the caller's action on it; the client retries, with an Idempotency-Key.
 */
export class UnavailableError extends Errors.MoleculerError {
	constructor(message = "Service unavailable", type = "SERVICE_UNAVAILABLE", data?: Record<string, unknown>) {
		super(message, 503, type, data);
		this.name = "ServiceUnavailableError";
	}
}

const MONGO_UNAVAILABLE = new Set([
	"MongoNetworkError",
	"MongoNetworkTimeoutError",
	"MongoServerSelectionError",
	"MongooseServerSelectionError",
	"MongoNotConnectedError",
	"MongoTopologyClosedError",
	"MongoPoolClearedError",
	"MongoExpiredSessionError",
]);

interface DriverError {
	name?: string;
	code?: unknown;
	errorType?: string;
	keyPattern?: Record<string, unknown>;
	message?: string;
	errors?: Record<string, unknown>;
}

/** A unique index refused a write: MongoDB's E11000, or nedb's uniqueViolated in the memory store. */
export function isDuplicateKeyError(err: unknown): boolean {
	const e = err as DriverError | null;
	return Boolean(e && (e.code === 11000 || e.code === 11001 || e.errorType === "uniqueViolated"));
}

/**
 * Turns a database driver error (mongoose, the MongoDB driver or the in-memory nedb) into the error
 * a client should see, or returns `null` when it is not a database error. Driver messages are never
 * passed on: they name hosts, collections and index internals.
 */
export function fromDatabaseError(err: unknown): Error | null {
	if (!err || typeof err !== "object") return null;
	const e = err as DriverError;
	if (isDuplicateKeyError(e)) {
		const fields = e.keyPattern ? Object.keys(e.keyPattern) : [];
		return new ConflictError("Duplicate value", "DUPLICATE", { fields });
	}
	if (e.name && MONGO_UNAVAILABLE.has(e.name)) return new UnavailableError("Database unavailable", "DATABASE_UNAVAILABLE");
	if (e.name === "MongooseError" && /buffering timed out|before initial connection/i.test(e.message ?? "")) {
		return new UnavailableError("Database unavailable", "DATABASE_UNAVAILABLE");
	}
	if (e.name === "CastError") return new UnprocessableError("Parameters validation error!", []);
	// A mongoose schema check (the last line of defence behind the params schemas): name the fields only.
	if (e.name === "ValidationError" && e.errors && typeof e.errors === "object") {
		return new UnprocessableError(
			"Parameters validation error!",
			Object.keys(e.errors).map((field) => ({ field, message: `'${field}' is invalid` })),
		);
	}
	return null;
}
