import { Schema } from "mongoose";
import type { Collection, MongoDocument } from "../db-adapters";
import { withLock, type LockDoc } from "../lock";
import { errorSummary, type DomainEvent } from "./events";
import type { Log } from "./amqp-bus";

/**
 * Transactional outbox without transactions: a service's events are stored in the very document
 * whose change they announce, by the same single-document update (`outbox: [event, …]`). So the
 * change and its events are written together or not at all, even if the process dies right after.
 * A relay then publishes the pending entries (with publisher confirms, in order per document) and
 * removes them, retrying with backoff while RabbitMQ is away.
 *
 * FerretDB 1.x applies updates as read-modify-write without isolation: two concurrent updates of
 * one document can lose one of them (measured: of 50 concurrent `$push`es to one document, 30
 * were kept). The relay's removal of published entries must never undo a concurrent change (or a
 * newly added event), so every write to a document that carries an outbox, the service's and the
 * relay's, holds a short per-document lock taken by a unique insert (lib/lock.ts), which every
 * backend does apply atomically. The same lock is how replicas claim a document's entries: a relay
 * that finds it taken skips the document. Should a relay still publish an entry twice (its lock
 * expired mid-publish), consumers drop the repeat by event id (lib/messaging/inbox.ts).
 */

export interface OutboxFields {
	outbox?: DomainEvent[];
	/** Set while entries are pending: when the relay should (re)try them. */
	outboxDueAt?: Date;
	/** Failed publish rounds in a row, for the backoff; and the last error, for operators. */
	outboxAttempts?: number;
	outboxError?: string;
}

/** Adds the outbox fields to an entity's schema (the fields are never in a service's client-visible `fields`). */
export function withOutbox(schema: Schema): Schema {
	schema.add({
		outbox: [
			{
				_id: false,
				id: { type: String, required: true },
				type: { type: String, required: true },
				source: { type: String, required: true },
				occurredAt: { type: String, required: true },
				payload: { type: Schema.Types.Mixed, required: true },
			},
		],
		outboxDueAt: { type: Date },
		outboxAttempts: { type: Number },
		outboxError: { type: String },
	});
	schema.index({ outboxDueAt: 1 }, { sparse: true });
	return schema;
}

export interface OutboxOptions {
	/** The collection's name: part of the lock keys. */
	name: string;
	/** Publishes one event; resolves once the broker confirmed it. */
	publish(event: DomainEvent): Promise<void>;
	relayIntervalMs: number;
	relayMaxDelayMs: number;
	publishTimeoutMs: number;
	/**
	 * A document matching this filter is deleted once its entries are published: the tombstone of a
	 * deleted entity, kept only as long as its events had to be.
	 */
	purgeDrained?: MongoDocument;
	log: Log;
	onPublished?(event: DomainEvent): void;
	/** Pending entries after each relay round (at most the scan size). */
	onBacklog?(entries: number): void;
}

type OutboxDoc = MongoDocument & OutboxFields;

/** Documents with pending entries looked at per relay round. */
const SCAN_LIMIT = 500;

export class Outbox<T extends OutboxDoc = OutboxDoc> {
	private timer?: NodeJS.Timeout;
	private readonly running = new Set<Promise<void>>();
	private stopped = true;
	/** Rounds fail while the database is away: said once when it starts and once when it ends, not every round. */
	private failing = false;

	constructor(
		private readonly docs: Collection<T>,
		private readonly locks: Collection<LockDoc>,
		private readonly opts: OutboxOptions,
	) {}

	/**
	 * One conditional update of one document (`query` includes its `_id`), with `events` appended to
	 * its outbox in the same write. Returns the updated document, or null if `query` matched none
	 * (then no event was recorded either). All writes to documents of this collection go through
	 * here: see the FerretDB note above.
	 */
	update(query: MongoDocument & { _id: string }, update: MongoDocument, events: DomainEvent[] = []): Promise<T | null> {
		const write = events.length > 0 ? withEvents(update, events) : update;
		return withLock(this.locks, this.lockKey(query._id), () => this.docs.findOneAndUpdate(query, write));
	}

	/** Publishes the document's pending entries now (after a write), instead of at the next round. */
	kick(id: string): void {
		if (!this.stopped) this.track(this.relay(id));
	}

	start(): void {
		this.stopped = false;
		this.timer = setInterval(() => this.track(this.round(false)), this.opts.relayIntervalMs);
		this.timer.unref();
		this.track(this.round(true));
	}

	/** Every pending entry, whatever its backoff (RabbitMQ is back). */
	flush(): void {
		if (!this.stopped) this.track(this.round(true));
	}

	async stop(): Promise<void> {
		this.stopped = true;
		clearInterval(this.timer);
		await Promise.allSettled([...this.running]);
	}

	/** Pending entries, counted over at most SCAN_LIMIT documents. */
	async backlog(): Promise<number> {
		const pending = await this.docs.findMany({ outboxDueAt: { $exists: true } }, SCAN_LIMIT);
		return pending.reduce((sum, doc) => sum + (doc.outbox?.length ?? 0), 0);
	}

	private track(work: Promise<void>): void {
		this.running.add(work);
		void work.finally(() => this.running.delete(work));
	}

	private async round(ignoreBackoff: boolean): Promise<void> {
		try {
			const pending = await this.docs.findMany({ outboxDueAt: { $exists: true } }, SCAN_LIMIT);
			this.opts.onBacklog?.(pending.reduce((sum, doc) => sum + (doc.outbox?.length ?? 0), 0));
			const now = Date.now();
			if (this.failing) this.opts.log.info(`Outbox relay of ${this.opts.name} works again.`);
			this.failing = false;
			for (const doc of pending) {
				if (this.stopped) return;
				if (ignoreBackoff || !doc.outboxDueAt || new Date(doc.outboxDueAt).getTime() <= now) await this.relay(String(doc._id));
			}
		} catch (err) {
			const line = `Outbox relay of ${this.opts.name} failed: ${errorSummary(err).message}`;
			if (this.failing) this.opts.log.debug(line);
			else this.opts.log.warn(`${line}; retrying every ${this.opts.relayIntervalMs} ms.`);
			this.failing = true;
		}
	}

	/** Publishes one document's entries unless another relay (or a write) holds the document. */
	private async relay(id: string): Promise<void> {
		try {
			// Held during the publishes, which each wait at most publishTimeoutMs.
			const ttlMs = 2 * this.opts.publishTimeoutMs + 10_000;
			await withLock(this.locks, this.lockKey(id), () => this.publishPending(id), { ttlMs, waitMs: 0 });
		} catch (err) {
			// Taken: the holder publishes, or the write that holds it kicks the relay again when done.
			if ((err as { type?: string }).type === "LOCK_TIMEOUT") return;
			this.opts.log.warn(`Outbox relay of ${this.opts.name} ${id} failed: ${errorSummary(err).message}`);
		}
	}

	private async publishPending(id: string): Promise<void> {
		const doc = await this.docs.findById(id);
		const entries = doc?.outbox ?? [];
		if (!doc || entries.length === 0) return;
		const published = new Set<string>();
		let failure: unknown = null;
		for (const entry of entries) {
			try {
				// In order, stopping at the first failure: a document's later event never overtakes an earlier one.
				await this.opts.publish({ ...entry, payload: entry.payload ?? {} });
				published.add(entry.id);
				this.opts.onPublished?.(entry);
			} catch (err) {
				failure = err;
				break;
			}
		}
		const remaining = entries.filter((entry) => !published.has(entry.id));
		if (remaining.length === 0) {
			if (this.opts.purgeDrained && (await this.docs.deleteOne({ _id: id, ...this.opts.purgeDrained }))) return;
			await this.docs.findOneAndUpdate(
				{ _id: id },
				{ $set: { outbox: [] }, $unset: { outboxDueAt: "", outboxAttempts: "", outboxError: "" } },
			);
			return;
		}
		const attempts = (doc.outboxAttempts ?? 0) + 1;
		const delay = Math.min(this.opts.relayIntervalMs * 2 ** (attempts - 1), this.opts.relayMaxDelayMs);
		await this.docs.findOneAndUpdate(
			{ _id: id },
			{
				$set: {
					outbox: remaining,
					outboxDueAt: new Date(Date.now() + delay),
					outboxAttempts: attempts,
					outboxError: errorSummary(failure).message,
				},
			},
		);
		if (attempts === 1)
			this.opts.log.warn(`Could not publish the events of ${this.opts.name} ${id} yet (${errorSummary(failure).message}); retrying.`);
	}

	private lockKey(id: string): string {
		return `${this.opts.name}:${id}`;
	}
}

/** The update plus "append these events to the outbox and make them due now". */
export function withEvents(update: MongoDocument, events: DomainEvent[]): MongoDocument {
	const set = (update.$set ?? {}) as MongoDocument;
	const push = (update.$push ?? {}) as MongoDocument;
	return { ...update, $set: { ...set, outboxDueAt: new Date() }, $push: { ...push, outbox: { $each: events } } };
}
