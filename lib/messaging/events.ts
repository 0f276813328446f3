import { randomUUID } from "node:crypto";

/**
 * Domain events: the envelope every message carries, the names of the RabbitMQ objects, and the
 * retry policy. Shared by the outbox (producer), the transports and the consumers.
 */

export interface DomainEvent<P = Record<string, unknown>> {
	/** Unique per event; consumers remember it (the inbox) so a redelivery has its effect once. */
	id: string;
	/** Also the routing key, e.g. `user.deleted`. */
	type: string;
	/** The producing service. */
	source: string;
	occurredAt: string;
	payload: P;
}

/**
 * An event for the outbox. Give `id` when the event can happen once per entity (`user.deleted:<id>`):
 * a retried request that writes it again then yields the same event, not a second one.
 */
export function domainEvent<P extends Record<string, unknown>>(
	type: string,
	payload: P,
	source: string,
	id: string = randomUUID(),
): DomainEvent<P> {
	return { id, type, source, occurredAt: new Date().toISOString(), payload };
}

/** A handler's failure that no retry can fix (malformed message, invalid payload, no handler): dead-lettered at once. */
export class PermanentEventError extends Error {
	constructor(message: string) {
		super(message);
		this.name = "PermanentEventError";
	}
}

/** Another node is handling this very event right now: try again later, without counting an attempt. */
export class EventBusyError extends Error {
	constructor(eventId: string) {
		super(`Event ${eventId} is being handled elsewhere`);
		this.name = "EventBusyError";
	}
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
	return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** Checks the envelope of a message from the wire; the payload is checked by the handler's `params`. */
export function parseEvent(raw: unknown): DomainEvent {
	const event = typeof raw === "string" || Buffer.isBuffer(raw) ? safeJson(raw.toString()) : raw;
	if (
		!isPlainObject(event) ||
		typeof event.id !== "string" ||
		event.id.length === 0 ||
		typeof event.type !== "string" ||
		typeof event.source !== "string" ||
		typeof event.occurredAt !== "string" ||
		!isPlainObject(event.payload)
	) {
		throw new PermanentEventError("Malformed domain event envelope");
	}
	return { id: event.id, type: event.type, source: event.source, occurredAt: event.occurredAt, payload: event.payload };
}

function safeJson(text: string): unknown {
	try {
		return JSON.parse(text);
	} catch {
		throw new PermanentEventError("Domain event is not JSON");
	}
}

export interface RetryPolicy {
	maxAttempts: number;
	retryDelayMs: number;
	retryMaxDelayMs: number;
}

/** How long to wait after failed attempt `attempt` (1-based) before the next: doubling, capped. */
export function retryDelay(policy: RetryPolicy, attempt: number): number {
	return Math.min(policy.retryDelayMs * 2 ** (attempt - 1), policy.retryMaxDelayMs);
}

/** Every distinct retry delay the policy uses (one RabbitMQ retry queue each). */
export function retryDelays(policy: RetryPolicy): number[] {
	const delays = Array.from({ length: Math.max(policy.maxAttempts - 1, 0) }, (_, i) => retryDelay(policy, i + 1));
	return [...new Set(delays)];
}

export type FailureStep = { retryInMs: number; nextAttempt: number } | { deadLetter: true };

/** What to do with a delivery whose handler failed on attempt `attempt`. */
export function afterFailure(policy: RetryPolicy, attempt: number, err: unknown): FailureStep {
	// Not the handler's fault: come back after the shortest delay, as the same attempt.
	if (err instanceof EventBusyError) return { retryInMs: retryDelay(policy, 1), nextAttempt: attempt };
	if (err instanceof PermanentEventError || attempt >= policy.maxAttempts) return { deadLetter: true };
	return { retryInMs: retryDelay(policy, attempt), nextAttempt: attempt + 1 };
}

/**
 * RabbitMQ object names, all under the namespace so parallel deployments (and test suites) on one
 * broker never see each other's messages. One queue per consuming service (`group`), shared by its
 * replicas: each event is handled once per service.
 */
export interface Topology {
	exchange: string;
	queue: string;
	deadLetter: string;
	retry(delayMs: number): string;
}

export function exchangeName(namespace: string): string {
	return `${namespace}.domain-events`;
}

export function topology(namespace: string, group: string): Topology {
	const prefix = `${namespace}.${group}`;
	return {
		exchange: exchangeName(namespace),
		queue: `${prefix}.domain-events`,
		deadLetter: `${prefix}.dead-letter`,
		retry: (delayMs) => `${prefix}.retry.${delayMs}ms`,
	};
}

/** What a consumer runs for one delivery; throwing means "not done" (retry, then dead-letter). */
export interface Delivery {
	event: DomainEvent;
	/** 1 for the first delivery, counted across retries (not across replays from the dead-letter queue). */
	attempt: number;
}
export type DeliveryHandler = (delivery: Delivery) => Promise<void>;

/** A message parked after its last attempt, with why. */
export interface DeadLetter {
	event: DomainEvent;
	error: { name: string; message: string };
	attempts: number;
	failedAt: string;
}

export interface QueueDepth {
	name: string;
	/** Ready messages (not counting those being handled right now). */
	messages: number;
	consumers: number;
}

/**
 * How domain events travel: RabbitMQ (durable) when the transporter is AMQP, Moleculer's own
 * events otherwise (one process, or another transporter: not durable, see docs/events.md).
 */
export interface EventBus {
	readonly durable: boolean;
	/** Resolves once the broker has the message (publisher confirm); rejects otherwise. */
	publish(event: DomainEvent): Promise<void>;
	/** Consumes the events of `types` for the consuming service `group`. */
	subscribe(group: string, types: string[], handler: DeliveryHandler): Promise<void>;
	queues(group: string): Promise<QueueDepth[]>;
	deadLetters(group: string, limit: number): Promise<DeadLetter[]>;
	/** Puts dead letters (those with `ids`, or all) back on the service's queue as fresh deliveries. */
	replay(group: string, ids: string[] | undefined, limit: number): Promise<number>;
	discard(group: string, ids: string[], limit: number): Promise<number>;
	start(): Promise<void>;
	stop(): Promise<void>;
}

/** Hooks the transports call, for metrics and logs. */
export interface BusObserver {
	retried(event: DomainEvent | null, group: string, delayMs: number, err: unknown): void;
	deadLettered(event: DomainEvent | null, group: string, err: unknown): void;
}

export function errorSummary(err: unknown): { name: string; message: string } {
	if (err instanceof Error) return { name: err.name, message: err.message.slice(0, 1_000) };
	return { name: "Error", message: String(err).slice(0, 1_000) };
}
