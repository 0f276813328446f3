import { randomUUID } from "node:crypto";
import { Schema } from "mongoose";
import type { Collection, MongoDocument } from "../db-adapters";
import { isDuplicateKeyError } from "../errors";
import { EventBusyError, type DomainEvent } from "./events";

/**
 * The consumer's memory of the events it handled (a collection in the consuming service's own
 * database), so an event delivered again (at-least-once delivery: a redelivery after a lost
 * connection, a duplicate publish by the outbox relay) has its effect once.
 *
 * An event is claimed with an insert keyed by its id: the one backend operation FerretDB 1.x does
 * apply atomically (its conditional updates are not isolated, see lib/lock.ts). The claim is
 * released when the handler fails, marked done when it succeeded, and taken over when its holder
 * died (its lease ran out). A crash between a handler's effect and the "done" mark runs the handler
 * again, so handlers are idempotent too (they check state, e.g. "cancel the orders still open").
 *
 * Entries expire after the retention period. FerretDB 1.x has no TTL indexes, so expired entries
 * are deleted by `purgeExpired`, which the consumer runs periodically.
 */

export interface InboxDoc extends MongoDocument {
	_id: string;
	type: string;
	status: "processing" | "done";
	owner: string;
	leaseUntil: Date;
	expiresAt: Date;
}

export const InboxSchema = new Schema(
	{
		_id: { type: String, required: true },
		type: { type: String, required: true },
		status: { type: String, enum: ["processing", "done"], required: true },
		owner: { type: String, required: true },
		leaseUntil: { type: Date, required: true },
		expiresAt: { type: Date, required: true },
	},
	{ versionKey: false },
);
InboxSchema.index({ expiresAt: 1 });

export interface InboxOptions {
	/** How long a handled event id is remembered. */
	retentionMs: number;
	/** A claim older than this belongs to a handler that died; longer than any handler runs. */
	leaseMs: number;
}

export type InboxOutcome = "handled" | "duplicate";

/** A claim that keeps changing hands means heavy contention; give the delivery back for later. */
const MAX_CLAIM_TRIES = 3;

const PURGE_BATCH = 500;

export class Inbox {
	constructor(
		private readonly entries: Collection<InboxDoc>,
		private readonly opts: InboxOptions,
	) {}

	/** Runs `effect` unless this event was handled already; throws EventBusyError while another node handles it. */
	async once(event: DomainEvent, effect: () => Promise<void>): Promise<InboxOutcome> {
		const owner = randomUUID();
		if ((await this.claim(event, owner)) === "done") return "duplicate";
		try {
			await effect();
		} catch (err) {
			// Free it for the retry; if even that fails, the lease runs out and the retry takes it over.
			await this.entries.deleteOne({ _id: event.id, owner }).catch(() => undefined);
			throw err;
		}
		await this.entries.findOneAndUpdate(
			{ _id: event.id, owner },
			{ $set: { status: "done", expiresAt: new Date(Date.now() + this.opts.retentionMs) } },
		);
		return "handled";
	}

	/** Deletes entries past their retention; returns how many. */
	async purgeExpired(now = new Date()): Promise<number> {
		let purged = 0;
		for (;;) {
			const expired = await this.entries.findMany({ expiresAt: { $lt: now } }, PURGE_BATCH);
			for (const entry of expired) if (await this.entries.deleteOne({ _id: entry._id, expiresAt: entry.expiresAt })) purged++;
			if (expired.length < PURGE_BATCH) return purged;
		}
	}

	private async claim(event: DomainEvent, owner: string): Promise<"claimed" | "done"> {
		for (let tries = 0; tries < MAX_CLAIM_TRIES; tries++) {
			const now = Date.now();
			try {
				await this.entries.insert({
					_id: event.id,
					type: event.type,
					status: "processing",
					owner,
					leaseUntil: new Date(now + this.opts.leaseMs),
					expiresAt: new Date(now + this.opts.retentionMs),
				});
				return "claimed";
			} catch (err) {
				if (!isDuplicateKeyError(err)) throw err;
			}
			const held = await this.entries.findById(event.id);
			if (!held) continue; // released meanwhile
			if (held.status === "done") return "done";
			if (new Date(held.leaseUntil).getTime() > now) throw new EventBusyError(event.id);
			// Its holder died mid-way: take it over (only the first to delete it gets to insert again).
			await this.entries.deleteOne({ _id: event.id, owner: held.owner });
		}
		throw new EventBusyError(event.id);
	}
}
