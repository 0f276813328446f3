import type { Context, EventEndpoint, Service, ServiceSchema } from "moleculer";
import { config } from "../lib/config";
import type { JsonSchema } from "../lib/openapi";
import type { MongoDocument } from "../lib/db-adapters";
import { UnavailableError } from "../lib/errors";
import { LockSchema, type LockDoc } from "../lib/lock";
import { AmqpEventBus, type Log } from "../lib/messaging/amqp-bus";
import {
	PermanentEventError,
	domainEvent,
	errorSummary,
	EventBusyError,
	type BusObserver,
	type Delivery,
	type DomainEvent,
	type EventBus,
	type RetryPolicy,
} from "../lib/messaging/events";
import { Inbox, InboxSchema, type InboxDoc } from "../lib/messaging/inbox";
import { LocalEventBus } from "../lib/messaging/local-bus";
import { Outbox } from "../lib/messaging/outbox";
import { amqpUrls } from "../moleculer.config";
import type { DbMethods } from "./db.mixin";

/**
 * Domain events that are never lost (docs/events.md): a service that changes data writes its events
 * into the changed document (the outbox) and a relay publishes them to RabbitMQ with confirms; a
 * service that reacts to events declares `domainEvents` handlers, which get their own durable queue,
 * retries with a growing delay, a dead-letter queue, and an inbox so a redelivered event has its
 * effect once. Without an AMQP transporter (npm run dev, unit tests) the same path runs over
 * Moleculer's own events, in memory.
 *
 * Use with DbMixin (the outbox and the inbox live in the service's database):
 *
 *   mixins: [DbMixin(…), DomainEventsMixin({ outbox: {} })],
 *   domainEvents: { "user.deleted": { params: { id: objectId }, async handler(ctx) { … } } },
 *   … await this.updateWithEvents({ _id, status: "confirmed" }, { $set: … }, [{ type: "order.cancelled", payload }])
 */

/** `ctx.meta` of a domain event handler. */
export interface DomainEventMeta {
	domainEvent: Omit<DomainEvent, "payload"> & { attempt: number };
}

export interface DomainEventHandler<TThis> {
	/** fastest-validator schema of the payload; an event whose payload fails it is dead-lettered at once. */
	params?: Record<string, unknown>;
	/** Must be idempotent where it can run twice (see lib/messaging/inbox.ts); throw to have the event retried. */
	handler(this: TThis, ctx: Context<never, DomainEventMeta>): Promise<void>;
}

/** The schema key of a service that consumes domain events. */
export interface ConsumesDomainEvents<TThis> {
	domainEvents?: Record<string, DomainEventHandler<TThis>>;
}

/** An event to record with a write. Give `id` for an event that happens once per entity (`order.cancelled:<id>`). */
export interface NewDomainEvent {
	type: string;
	payload: Record<string, unknown>;
	id?: string;
}

export interface DomainEventsMethods {
	/**
	 * One conditional update of one document of the service's collection, with `events` recorded in
	 * the same write (published right after, and until RabbitMQ confirmed them). Every write to an
	 * existing document of the collection goes through here (see lib/messaging/outbox.ts: FerretDB).
	 */
	updateWithEvents<T>(query: MongoDocument & { _id: string }, update: MongoDocument, events?: NewDomainEvent[]): Promise<T | null>;
}

export interface DomainEventsOptions {
	/** The service records events in its documents (their schema needs `withOutbox`). */
	outbox?: {
		/** Documents matching this are deleted once their events are published (tombstones). */
		purgeDrained?: MongoDocument;
	};
}

/** A claim on an event is presumed dead after this; longer than any handler runs. */
const HANDLER_LEASE_MS = 60_000;
const INBOX_PURGE_INTERVAL_MS = 10 * 60_000;
const MAX_LIST = 1_000;

export const METRICS = {
	published: "shop.events.published.total",
	consumed: "shop.events.consumed.total",
	duplicates: "shop.events.duplicates.total",
	retried: "shop.events.retried.total",
	deadLettered: "shop.events.dead_lettered.total",
	outboxBacklog: "shop.outbox.backlog",
} as const;

interface Runtime {
	bus: EventBus;
	outbox: Outbox | null;
	inbox: Inbox | null;
	checks: Map<string, (payload: Record<string, unknown>) => unknown>;
	/** Deliveries seen per event id, for the TEST_EVENT_FAILURES hook. */
	injected: Map<string, number>;
	purgeTimer?: NodeJS.Timeout;
	purging?: Promise<unknown>;
	started: boolean;
}

type MixinThis = Service & DbMethods & DomainEventsMethods & { domainEventsRuntime: Runtime };
type Handlers = Record<string, DomainEventHandler<MixinThis>>;

const policy: RetryPolicy = {
	maxAttempts: config.events.maxAttempts,
	retryDelayMs: config.events.retryDelayMs,
	retryMaxDelayMs: config.events.retryMaxDelayMs,
};

const queueDepthSchema: JsonSchema = {
	title: "EventQueue",
	type: "object",
	properties: { name: { type: "string" }, messages: { type: "integer", minimum: 0 }, consumers: { type: "integer", minimum: 0 } },
	required: ["name", "messages", "consumers"],
	additionalProperties: false,
};

const eventQueuesSchema: JsonSchema = {
	title: "EventQueues",
	type: "object",
	properties: {
		durable: { type: "boolean", description: "false: no RabbitMQ, events travel in memory (development)" },
		outboxPending: { type: "integer", minimum: 0, description: "Events written but not yet published" },
		queues: { type: "array", items: queueDepthSchema },
	},
	required: ["durable", "outboxPending", "queues"],
	additionalProperties: false,
};

const deadLetterSchema: JsonSchema = {
	title: "DeadLetter",
	type: "object",
	properties: {
		id: { type: "string" },
		type: { type: "string" },
		source: { type: "string" },
		occurredAt: { type: "string" },
		payload: { type: "object" },
		error: {
			type: "object",
			properties: { name: { type: "string" }, message: { type: "string" } },
			required: ["name", "message"],
			additionalProperties: false,
		},
		attempts: { type: "integer", minimum: 0 },
		failedAt: { type: "string" },
	},
	required: ["id", "type", "source", "occurredAt", "payload", "error", "attempts", "failedAt"],
	additionalProperties: false,
};

const countSchema = (title: string, field: string): JsonSchema => ({
	title,
	type: "object",
	properties: { [field]: { type: "integer", minimum: 0 } },
	required: [field],
	additionalProperties: false,
});

const limit = { type: "number", integer: true, min: 1, max: MAX_LIST, convert: true, optional: true, default: 100 } as const;
const ids = { type: "array", min: 1, max: MAX_LIST, items: { type: "string", min: 1, max: 200 } } as const;

function registerMetrics(svc: Service): void {
	const metrics = svc.broker.metrics;
	const counters: Array<[string, string]> = [
		[METRICS.published, "Domain events published (confirmed by RabbitMQ)"],
		[METRICS.consumed, "Domain events handled"],
		[METRICS.duplicates, "Redelivered domain events skipped: handled before"],
		[METRICS.retried, "Failed domain event deliveries scheduled for a retry"],
		[METRICS.deadLettered, "Domain events parked in the dead-letter queue"],
	];
	for (const [name, description] of counters) {
		if (!metrics.hasMetric(name)) metrics.register({ type: "counter", name, description, labelNames: ["service", "event"] });
	}
	if (!metrics.hasMetric(METRICS.outboxBacklog)) {
		metrics.register({
			type: "gauge",
			name: METRICS.outboxBacklog,
			description: "Outbox entries not yet published",
			labelNames: ["service"],
		});
	}
}

function observer(svc: Service): BusObserver {
	return {
		retried(event, group, delayMs, err) {
			svc.broker.metrics.increment(METRICS.retried, { service: group, event: event?.type ?? "unknown" });
			const what = `Domain event ${event?.type} ${event?.id}`;
			if (err instanceof EventBusyError) svc.logger.debug(`${what} is being handled elsewhere; looking again in ${delayMs} ms.`);
			else svc.logger.warn(`${what} failed (${errorSummary(err).name}: ${errorSummary(err).message}); retrying in ${delayMs} ms.`);
		},
		deadLettered(event, group, err) {
			svc.broker.metrics.increment(METRICS.deadLettered, { service: group, event: event?.type ?? "unknown" });
			const { name, message } = errorSummary(err);
			svc.logger.error(
				`Domain event ${event?.type ?? "(malformed)"} ${event?.id ?? ""} moved to the dead-letter queue: ${name}: ${message}`,
			);
		},
	};
}

/** A stand-in for a failing handler, so tests can exercise retries and the dead-letter queue on real services. */
function injectTestFailure(runtime: Runtime, event: DomainEvent): void {
	const hook = config.events.failHandler;
	if (!hook || hook.event !== event.type) return;
	const seen = (runtime.injected.get(event.id) ?? 0) + 1;
	runtime.injected.set(event.id, seen);
	if (hook.times === "always" || seen <= hook.times) throw new Error(`Injected failure ${seen} of ${event.type} (TEST_EVENT_FAILURES)`);
}

function toArray<T>(value: T | T[] | undefined): T[] {
	if (value === undefined) return [];
	return Array.isArray(value) ? value : [value];
}

export function DomainEventsMixin(opts: DomainEventsOptions = {}): Partial<ServiceSchema> {
	const urls = amqpUrls(config);

	const schema: Partial<ServiceSchema<object, object, object, MixinThis>> & { merged(schema: Record<string, unknown>): void } = {
		/**
		 * Runs on the final schema (all mixins merged), so it works wherever this mixin sits in the list:
		 * start after the database is connected (moleculer-db's afterConnected), stop before it is closed.
		 */
		merged(final) {
			const own = final.afterConnected as ((this: MixinThis) => Promise<void>) | undefined;
			final.afterConnected = async function (this: MixinThis) {
				// The outbox before the service's own setup (which may write, e.g. orders' sweeper);
				// deliveries only after it.
				await prepareDomainEvents(this, opts);
				if (own) await own.call(this);
				await startDomainEvents(this);
			};
			// Lifecycle handlers stop in reverse order: last in the list, first to stop.
			final.stopped = [
				...toArray(final.stopped),
				async function (this: MixinThis) {
					await stopDomainEvents(this);
				},
			];
			const handlers = (final.domainEvents ?? {}) as Handlers;
			const consumes = Object.keys(handlers).length > 0;
			const actions = final.actions as Record<string, unknown>;
			if (!consumes) {
				for (const name of ["deadLetters", "replayDeadLetters", "discardDeadLetters"]) delete actions[name];
			} else if (!urls) {
				// Without RabbitMQ the events arrive as Moleculer events (balanced: once per service).
				const events = { ...((final.events ?? {}) as Record<string, unknown>) };
				for (const type of Object.keys(handlers)) {
					events[type] = function (this: MixinThis, ctx: Context) {
						return (this.domainEventsRuntime.bus as LocalEventBus).receive(this.name, ctx.params);
					};
				}
				final.events = events;
			}
		},

		created() {
			registerMetrics(this);
			const handlers = (this.schema as { domainEvents?: Handlers }).domainEvents ?? {};
			const checks = new Map<string, (payload: Record<string, unknown>) => unknown>();
			for (const [type, def] of Object.entries(handlers)) {
				if (def.params && this.broker.validator) checks.set(type, this.broker.validator.compile(def.params));
			}
			const log: Log = this.logger;
			const bus: EventBus = urls
				? new AmqpEventBus({
						urls,
						namespace: config.namespace,
						connectionName: `${config.namespace}.${this.name}.domain-events@${this.broker.nodeID}`,
						prefetch: config.events.prefetch,
						publishTimeoutMs: config.events.publishTimeoutMs,
						policy,
						socketOptions: { noDelay: config.amqp.noDelay },
						queueExpiresMs: config.events.queueExpiresMs,
						log,
						observer: observer(this),
						// Back after an outage: publish what piled up now, not when each entry's backoff ends.
						onConnected: () => this.domainEventsRuntime.outbox?.flush(),
					})
				: new LocalEventBus({ emit: (type, event) => this.broker.emit(type, event), policy, observer: observer(this) });
			this.domainEventsRuntime = { bus, outbox: null, inbox: null, checks, injected: new Map(), started: false };
		},

		actions: {
			eventQueues: {
				auth: "admin",
				rest: "GET /events/queues",
				openapi: {
					summary: "Domain events: this service's queue depths and unpublished outbox entries",
					responses: { 200: eventQueuesSchema },
				},
				async handler(): Promise<{ durable: boolean; outboxPending: number; queues: unknown[] }> {
					const { bus, outbox } = this.domainEventsRuntime;
					const consumes = Object.keys((this.schema as { domainEvents?: Handlers }).domainEvents ?? {}).length > 0;
					return {
						durable: bus.durable,
						outboxPending: outbox ? await outbox.backlog() : 0,
						queues: consumes ? await busCall(() => bus.queues(this.name)) : [],
					};
				},
			},

			deadLetters: {
				auth: "admin",
				rest: "GET /events/dead-letters",
				openapi: {
					summary: "Domain events this service gave up on, with the error (oldest first; they stay in the queue)",
					responses: {
						200: {
							title: "DeadLetterList",
							type: "object",
							properties: { rows: { type: "array", items: deadLetterSchema } },
							required: ["rows"],
							additionalProperties: false,
						},
					},
				},
				params: { $$strict: "remove", limit },
				async handler(ctx: Context<{ limit: number }>) {
					const letters = await busCall(() => this.domainEventsRuntime.bus.deadLetters(this.name, ctx.params.limit));
					return {
						rows: letters.map(({ event, error, attempts, failedAt }) => ({
							id: event.id,
							type: event.type,
							source: event.source,
							occurredAt: event.occurredAt,
							payload: event.payload,
							error,
							attempts,
							failedAt,
						})),
					};
				},
			},

			replayDeadLetters: {
				auth: "admin",
				rest: "POST /events/dead-letters/replay",
				openapi: {
					summary: "Hand dead letters (those with `ids`, or all) to this service's handler again, as first attempts",
					responses: { 200: countSchema("DeadLettersReplayed", "replayed") },
				},
				params: { $$strict: "remove", ids: { ...ids, optional: true }, limit },
				async handler(ctx: Context<{ ids?: string[]; limit: number }>) {
					const { ids: wanted, limit: max } = ctx.params;
					const replayed = await busCall(() => this.domainEventsRuntime.bus.replay(this.name, wanted, wanted ? MAX_LIST : max));
					this.logger.info(`Replayed ${replayed} dead-lettered domain event(s).`);
					return { replayed };
				},
			},

			discardDeadLetters: {
				auth: "admin",
				rest: "POST /events/dead-letters/discard",
				openapi: {
					summary: "Delete the dead letters with these `ids`",
					responses: { 200: countSchema("DeadLettersDiscarded", "discarded") },
				},
				params: { $$strict: "remove", ids },
				async handler(ctx: Context<{ ids: string[] }>) {
					const discarded = await busCall(() => this.domainEventsRuntime.bus.discard(this.name, ctx.params.ids, MAX_LIST));
					this.logger.warn(`Discarded ${discarded} dead-lettered domain event(s): ${ctx.params.ids.join(", ")}`);
					return { discarded };
				},
			},
		},

		methods: {
			async updateWithEvents<T>(
				query: MongoDocument & { _id: string },
				update: MongoDocument,
				events: NewDomainEvent[] = [],
			): Promise<T | null> {
				const { outbox } = this.domainEventsRuntime;
				if (!outbox) throw new Error(`${this.name} writes through the outbox before it started (or without DomainEventsMixin({ outbox }))`);
				const entries = events.map((e) => domainEvent(e.type, e.payload, this.name, e.id));
				const changed = await outbox.update(query, update, entries);
				if (changed && entries.length > 0) {
					if (config.events.crashBeforePublish) process.kill(process.pid, "SIGKILL");
					outbox.kick(query._id);
				}
				return changed as T | null;
			},
		},
	};
	return schema as Partial<ServiceSchema>;
}

/** The bus needs RabbitMQ for these; without it they are a 503, not a 500. */
async function busCall<T>(fn: () => Promise<T>): Promise<T> {
	try {
		return await fn();
	} catch (err) {
		throw new UnavailableError(`Domain events unavailable: ${errorSummary(err).message}`, "EVENT_BUS_UNAVAILABLE");
	}
}

/** Collections, outbox and inbox; nothing is published or consumed yet. */
async function prepareDomainEvents(svc: MixinThis, opts: DomainEventsOptions): Promise<void> {
	const runtime = svc.domainEventsRuntime;
	if (runtime.started) return;
	const handlers = (svc.schema as { domainEvents?: Handlers }).domainEvents ?? {};
	const { events } = config;

	if (opts.outbox) {
		const locks = await svc.adapter.collection<LockDoc>("outbox_locks", LockSchema);
		runtime.outbox = new Outbox(svc.adapter, locks, {
			name: svc.name,
			publish: (event) => runtime.bus.publish(event),
			relayIntervalMs: events.relayIntervalMs,
			relayMaxDelayMs: events.relayMaxDelayMs,
			publishTimeoutMs: events.publishTimeoutMs,
			purgeDrained: opts.outbox.purgeDrained,
			log: svc.logger,
			onPublished: (event) => svc.broker.metrics.increment(METRICS.published, { service: svc.name, event: event.type }),
			onBacklog: (entries) => svc.broker.metrics.set(METRICS.outboxBacklog, entries, { service: svc.name }),
		});
	}

	const types = Object.keys(handlers);
	if (types.length > 0) {
		const inbox = new Inbox(await svc.adapter.collection<InboxDoc>("inbox", InboxSchema), {
			retentionMs: events.inboxRetentionMs,
			leaseMs: HANDLER_LEASE_MS,
		});
		runtime.inbox = inbox;
		await runtime.bus.subscribe(svc.name, types, (delivery) => handleDelivery(svc, handlers, delivery));
	}
}

/** Connects (waiting for RabbitMQ as long as it takes), consumes, and starts the relay. */
async function startDomainEvents(svc: MixinThis): Promise<void> {
	const runtime = svc.domainEventsRuntime;
	if (runtime.started) return;
	const { inbox } = runtime;
	if (inbox) {
		const purge = () => {
			runtime.purging = inbox.purgeExpired().catch((err: Error) => svc.logger.warn(`Inbox purge failed: ${err.message}`));
		};
		purge();
		clearInterval(runtime.purgeTimer);
		runtime.purgeTimer = setInterval(purge, INBOX_PURGE_INTERVAL_MS);
		runtime.purgeTimer.unref();
	}
	await runtime.bus.start();
	runtime.outbox?.start();
	runtime.started = true;
	if (!runtime.bus.durable && svc.broker.transit) {
		svc.logger.warn("Domain events travel as Moleculer events (the transporter is not RabbitMQ): they are not durable.");
	}
}

async function stopDomainEvents(svc: MixinThis): Promise<void> {
	const runtime = svc.domainEventsRuntime;
	clearInterval(runtime.purgeTimer);
	await runtime.outbox?.stop();
	await runtime.bus.stop();
	await runtime.purging;
}

/** One delivery: checks, then the handler at most once per event id (the inbox), in a fresh Context. */
async function handleDelivery(svc: MixinThis, handlers: Handlers, { event, attempt }: Delivery): Promise<void> {
	const runtime = svc.domainEventsRuntime;
	const def = handlers[event.type];
	if (!def) throw new PermanentEventError(`${svc.name} has no handler for ${event.type}`);
	const check = runtime.checks.get(event.type);
	if (check) {
		const result = await check(event.payload);
		if (result !== true) {
			const fields = (result as Array<{ field?: string }>).map((e) => e.field).join(", ");
			throw new PermanentEventError(`Invalid ${event.type} payload (${fields})`);
		}
	}
	const outcome = await runtime.inbox!.once(event, async () => {
		injectTestFailure(runtime, event);
		const { payload, ...envelope } = event;
		const ctx = svc.broker.ContextFactory.create(svc.broker, null as unknown as EventEndpoint, payload, {
			meta: { domainEvent: { ...envelope, attempt } },
		});
		await def.handler.call(svc, ctx as Context<never, DomainEventMeta>);
	});
	const labels = { service: svc.name, event: event.type };
	if (outcome === "duplicate") {
		svc.broker.metrics.increment(METRICS.duplicates, labels);
		svc.logger.info(`Domain event ${event.type} ${event.id} was handled before; skipped.`);
	} else {
		svc.broker.metrics.increment(METRICS.consumed, labels);
	}
}
