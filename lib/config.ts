/**
 * The one place where the process environment is read and validated.
 *
 * Everything else (moleculer.config.ts, services, scripts) imports the typed `config` object, so a
 * typo in a variable fails at start with a clear message instead of becoming a silent default.
 */

export type NodeEnv = "development" | "production" | "test";

export interface AmqpConfig {
	/** Messages a node takes from RabbitMQ before acking; Moleculer's default of 1 serialises every call. */
	prefetch: number;
	/** TCP_NODELAY on the broker socket; without it each small packet waits for Nagle's algorithm. */
	noDelay: boolean;
	/** Unused queues of stopped nodes are removed by RabbitMQ after this many ms. */
	autoDeleteQueuesMs: number;
	eventTimeToLiveMs: number | null;
	heartbeatTimeToLiveMs: number | null;
	heartbeatSeconds: number;
}

export interface Config {
	nodeEnv: NodeEnv;
	namespace: string;
	nodeID: string | undefined;
	logLevel: "fatal" | "error" | "warn" | "info" | "debug" | "trace";
	/** Transporter connection string(s); `null` runs every service in one process. */
	transporter: string | null;
	amqp: AmqpConfig;
	serializer: "JSON" | "CBOR" | "Notepack" | "MsgPack";
	cacher: string | null;
	requestTimeoutMs: number;
	retry: { enabled: boolean; retries: number; delayMs: number; maxDelayMs: number };
	circuitBreaker: { enabled: boolean; threshold: number; minRequestCount: number; halfOpenTimeMs: number };
	bulkhead: { enabled: boolean; concurrency: number; maxQueueSize: number };
	/** How long a stopping node keeps serving in-flight requests before it disconnects. */
	shutdownDelayMs: number;
	/** A node that sent no heartbeat for `timeout` seconds is taken as crashed; its requests fail over. */
	heartbeat: { intervalSeconds: number; timeoutSeconds: number };
	port: number;
	metricsPort: number | null;
	mongo: {
		uri: string | null;
		/** Each service gets its own database: `<dbPrefix><service name>`. */
		dbPrefix: string;
		serverSelectionTimeoutMs: number;
		maxPoolSize: number;
	};
	auth: {
		jwtSecret: string;
		jwtExpiresIn: string;
		passwordHashMemoryKiB: number;
		adminEmail: string | null;
		adminPassword: string | null;
		loginRateLimitPerMinute: number;
	};
	orders: {
		/** A `pending` order older than this is considered abandoned by a dead node and is resolved. */
		pendingTimeoutMs: number;
		sweepIntervalMs: number;
		/** Test hook (NODE_ENV=test only): the orders process dies right after a reservation, before confirming. */
		crashAfterReserve: boolean;
	};
	events: DomainEventsConfig;
}

/** Domain events with at-least-once delivery (lib/messaging, mixins/domain-events.mixin.ts, docs/events.md). */
export interface DomainEventsConfig {
	/** Unacknowledged domain events a consuming node works on at once. */
	prefetch: number;
	/** Deliveries of one event (the first plus retries) before it is parked in the dead-letter queue. */
	maxAttempts: number;
	/** Delay before the first retry; each further retry waits twice as long, up to `retryMaxDelayMs`. */
	retryDelayMs: number;
	retryMaxDelayMs: number;
	/** How long a publish waits for RabbitMQ's confirm before it counts as failed (the outbox retries it). */
	publishTimeoutMs: number;
	/** How often the outbox relay looks for unpublished events (it is also woken right after each write). */
	relayIntervalMs: number;
	/** Backoff cap between attempts to publish an outbox entry while RabbitMQ is away. */
	relayMaxDelayMs: number;
	/** Processed event ids are remembered this long; a redelivery later than that would be handled again. */
	inboxRetentionMs: number;
	/**
	 * Test and preview deployments only: RabbitMQ deletes a service's event queues (with their messages)
	 * once unused this long, so short-lived namespaces leave nothing behind. Never in production.
	 */
	queueExpiresMs: number | null;
	/** Test hook (NODE_ENV=test only): the handler of `event` fails its first `times` deliveries of each event. */
	failHandler: { event: string; times: number | "always" } | null;
	/** Test hook (NODE_ENV=test only): the process dies right after a write that carries events, before publishing. */
	crashBeforePublish: boolean;
}

export class ConfigError extends Error {
	constructor(message: string) {
		super(message);
		this.name = "ConfigError";
	}
}

type Env = Record<string, string | undefined>;

/** Development-only secret so `npm run dev` works out of the box; refused when NODE_ENV=production. */
const DEVELOPMENT_JWT_SECRET = "development-only-secret-do-not-use-in-production";

function str(env: Env, name: string): string | null {
	const value = env[name]?.trim();
	return value ? value : null;
}

function int(env: Env, name: string, fallback: number, min = 0, max = Number.MAX_SAFE_INTEGER): number {
	const raw = str(env, name);
	if (raw === null) return fallback;
	if (!/^-?\d+$/.test(raw)) throw new ConfigError(`${name} must be an integer, got "${raw}"`);
	const value = Number(raw);
	if (value < min || value > max) throw new ConfigError(`${name} must be between ${min} and ${max}, got ${value}`);
	return value;
}

function optionalInt(env: Env, name: string, min = 0, max = Number.MAX_SAFE_INTEGER): number | null {
	return str(env, name) === null ? null : int(env, name, 0, min, max);
}

function fraction(env: Env, name: string, fallback: number): number {
	const raw = str(env, name);
	if (raw === null) return fallback;
	const value = Number(raw);
	if (!Number.isFinite(value) || value <= 0 || value > 1) throw new ConfigError(`${name} must be a number in (0, 1], got "${raw}"`);
	return value;
}

function bool(env: Env, name: string, fallback: boolean): boolean {
	const raw = str(env, name)?.toLowerCase();
	if (raw === undefined || raw === null) return fallback;
	if (["1", "true", "yes", "on"].includes(raw)) return true;
	if (["0", "false", "no", "off"].includes(raw)) return false;
	throw new ConfigError(`${name} must be true or false, got "${raw}"`);
}

/** `TEST_EVENT_FAILURES=<event>:<count|always>`, e.g. `user.deleted:2`. */
function failHandler(env: Env, name: string): DomainEventsConfig["failHandler"] {
	const raw = str(env, name);
	if (raw === null) return null;
	const match = /^([\w.-]+):(\d+|always)$/.exec(raw);
	if (!match) throw new ConfigError(`${name} must look like <event>:<count|always>, got "${raw}"`);
	return { event: match[1], times: match[2] === "always" ? "always" : Number(match[2]) };
}

function oneOf<T extends string>(env: Env, name: string, allowed: readonly T[], fallback: T): T {
	const raw = str(env, name);
	if (raw === null) return fallback;
	const match = allowed.find((candidate) => candidate.toLowerCase() === raw.toLowerCase());
	if (!match) throw new ConfigError(`${name} must be one of ${allowed.join(", ")}, got "${raw}"`);
	return match;
}

export function loadConfig(env: Env = process.env): Config {
	const nodeEnv = oneOf(env, "NODE_ENV", ["development", "production", "test"] as const, "development");

	const jwtSecret = str(env, "JWT_SECRET");
	if (nodeEnv === "production" && !jwtSecret) {
		throw new ConfigError("JWT_SECRET is required when NODE_ENV=production");
	}
	if (jwtSecret && nodeEnv === "production" && jwtSecret.length < 32) {
		throw new ConfigError("JWT_SECRET must be at least 32 characters in production");
	}

	const adminEmail = str(env, "ADMIN_EMAIL");
	const adminPassword = str(env, "ADMIN_PASSWORD");

	return {
		nodeEnv,
		namespace: str(env, "NAMESPACE") ?? "shop",
		nodeID: str(env, "NODE_ID") ?? undefined,
		logLevel: oneOf(env, "LOGLEVEL", ["fatal", "error", "warn", "info", "debug", "trace"] as const, "info"),
		transporter: str(env, "TRANSPORTER"),
		amqp: {
			prefetch: int(env, "AMQP_PREFETCH", 100, 1, 65535),
			noDelay: bool(env, "AMQP_NO_DELAY", true),
			autoDeleteQueuesMs: int(env, "AMQP_AUTO_DELETE_QUEUES_MS", 120_000, 0),
			eventTimeToLiveMs: optionalInt(env, "AMQP_EVENT_TTL_MS", 1),
			heartbeatTimeToLiveMs: optionalInt(env, "AMQP_HEARTBEAT_TTL_MS", 1),
			heartbeatSeconds: int(env, "AMQP_HEARTBEAT_SECONDS", 10, 0, 3600),
		},
		serializer: oneOf(env, "SERIALIZER", ["JSON", "CBOR", "Notepack", "MsgPack"] as const, "JSON"),
		cacher: str(env, "CACHER") ?? "Memory",
		requestTimeoutMs: int(env, "REQUEST_TIMEOUT_MS", 10_000, 0),
		retry: {
			enabled: bool(env, "RETRY_ENABLED", true),
			retries: int(env, "RETRY_RETRIES", 2, 0, 20),
			delayMs: int(env, "RETRY_DELAY_MS", 100, 0),
			maxDelayMs: int(env, "RETRY_MAX_DELAY_MS", 1_000, 0),
		},
		circuitBreaker: {
			enabled: bool(env, "CIRCUIT_BREAKER_ENABLED", true),
			threshold: fraction(env, "CIRCUIT_BREAKER_THRESHOLD", 0.5),
			minRequestCount: int(env, "CIRCUIT_BREAKER_MIN_REQUESTS", 20, 1),
			halfOpenTimeMs: int(env, "CIRCUIT_BREAKER_HALF_OPEN_MS", 10_000, 0),
		},
		bulkhead: {
			enabled: bool(env, "BULKHEAD_ENABLED", true),
			concurrency: int(env, "BULKHEAD_CONCURRENCY", 100, 1),
			maxQueueSize: int(env, "BULKHEAD_MAX_QUEUE", 1_000, 0),
		},
		shutdownDelayMs: int(env, "SHUTDOWN_DELAY_MS", 1_000, 0),
		heartbeat: {
			intervalSeconds: int(env, "HEARTBEAT_INTERVAL_SECONDS", 3, 1, 60),
			timeoutSeconds: int(env, "HEARTBEAT_TIMEOUT_SECONDS", 10, 2, 600),
		},
		port: int(env, "PORT", 3000, 0, 65535),
		metricsPort: optionalInt(env, "METRICS_PORT", 1, 65535),
		mongo: {
			uri: str(env, "MONGO_URI"),
			dbPrefix: str(env, "MONGO_DB_PREFIX") ?? "shop-",
			serverSelectionTimeoutMs: int(env, "MONGO_SERVER_SELECTION_TIMEOUT_MS", 5_000, 100),
			maxPoolSize: int(env, "MONGO_MAX_POOL_SIZE", 20, 1),
		},
		auth: {
			jwtSecret: jwtSecret ?? DEVELOPMENT_JWT_SECRET,
			jwtExpiresIn: str(env, "JWT_EXPIRES_IN") ?? "1h",
			passwordHashMemoryKiB: int(env, "PASSWORD_HASH_MEMORY_KIB", 19_456, 1_024),
			adminEmail: adminEmail && adminPassword ? adminEmail : null,
			adminPassword: adminEmail && adminPassword ? adminPassword : null,
			loginRateLimitPerMinute: int(env, "LOGIN_RATE_LIMIT_PER_MINUTE", 30, 1),
		},
		orders: {
			pendingTimeoutMs: int(env, "ORDER_PENDING_TIMEOUT_MS", 60_000, 1_000),
			sweepIntervalMs: int(env, "ORDER_SWEEP_INTERVAL_MS", 15_000, 100),
			crashAfterReserve: nodeEnv === "test" && bool(env, "TEST_CRASH_AFTER_RESERVE", false),
		},
		events: domainEvents(env, nodeEnv),
	};
}

function domainEvents(env: Env, nodeEnv: NodeEnv): DomainEventsConfig {
	const retryDelayMs = int(env, "EVENTS_RETRY_DELAY_MS", 1_000, 10, 3_600_000);
	const retryMaxDelayMs = int(env, "EVENTS_RETRY_MAX_DELAY_MS", 60_000, 10, 86_400_000);
	if (retryMaxDelayMs < retryDelayMs) {
		throw new ConfigError(`EVENTS_RETRY_MAX_DELAY_MS (${retryMaxDelayMs}) must not be below EVENTS_RETRY_DELAY_MS (${retryDelayMs})`);
	}
	return {
		prefetch: int(env, "EVENTS_PREFETCH", 10, 1, 1_000),
		maxAttempts: int(env, "EVENTS_MAX_ATTEMPTS", 5, 1, 20),
		retryDelayMs,
		retryMaxDelayMs,
		publishTimeoutMs: int(env, "EVENTS_PUBLISH_TIMEOUT_MS", 5_000, 100, 120_000),
		relayIntervalMs: int(env, "OUTBOX_RELAY_INTERVAL_MS", 1_000, 50, 600_000),
		relayMaxDelayMs: int(env, "OUTBOX_RETRY_MAX_DELAY_MS", 30_000, 100, 3_600_000),
		inboxRetentionMs: int(env, "INBOX_RETENTION_MS", 7 * 24 * 3_600_000, 60_000),
		queueExpiresMs: optionalInt(env, "EVENTS_QUEUE_EXPIRES_MS", 60_000),
		failHandler: nodeEnv === "test" ? failHandler(env, "TEST_EVENT_FAILURES") : null,
		crashBeforePublish: nodeEnv === "test" && bool(env, "TEST_CRASH_BEFORE_PUBLISH", false),
	};
}

export const config: Config = loadConfig();
