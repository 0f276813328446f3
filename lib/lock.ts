import { randomUUID } from "node:crypto";
import { Schema } from "mongoose";
import type { Collection, MongoDocument } from "./db-adapters";
import { UnavailableError, isDuplicateKeyError } from "./errors";

/**
 * A short mutual-exclusion lock per key, shared by every replica through the database.
 *
 * Why: FerretDB 1.x (our CI's MongoDB-wire server) applies `findAndModify`/`update` as read, modify,
 * write without isolation, so two concurrent conditional updates of one document can both succeed
 * (measured: 50 concurrent `stock >= 1` decrements of a stock of 10 all "succeeded"). Inserting a
 * document whose `_id` exists is refused atomically by every backend, so the lock is an insert.
 * On MongoDB the conditional updates under the lock are atomic anyway; the lock costs two round trips.
 */

export interface LockDoc extends MongoDocument {
	_id: string;
	owner: string;
	expiresAt: Date;
}

/** The collection of a service's locks (one document per held key). */
export const LockSchema = new Schema({ _id: { type: String, required: true }, owner: String, expiresAt: Date }, { versionKey: false });

export interface LockOptions {
	/** A lock older than this is from a crashed holder and may be taken over. */
	ttlMs: number;
	/** Give up (503) after waiting this long. */
	waitMs: number;
}

const DEFAULTS: LockOptions = { ttlMs: 10_000, waitMs: 5_000 };

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** In-process queue per key, so one node's concurrent requests do not all poll the database. */
const localQueues = new Map<string, Promise<unknown>>();

async function acquire(locks: Collection<LockDoc>, key: string, opts: LockOptions): Promise<string> {
	const owner = randomUUID();
	const deadline = Date.now() + opts.waitMs;
	let backoff = 2;
	for (;;) {
		try {
			await locks.insert({ _id: key, owner, expiresAt: new Date(Date.now() + opts.ttlMs) });
			return owner;
		} catch (err) {
			if (!isDuplicateKeyError(err)) throw err;
		}
		const held = await locks.findById(key);
		if (held && held.expiresAt.getTime() < Date.now()) {
			await locks.deleteOne({ _id: key, owner: held.owner });
			continue;
		}
		if (Date.now() > deadline) throw new UnavailableError("Too busy, try again", "LOCK_TIMEOUT", { key });
		await sleep(backoff + Math.random() * backoff);
		backoff = Math.min(backoff * 2, 20);
	}
}

/** Runs `fn` while holding the lock on `key` (across replicas); always unlocks. */
export async function withLock<T>(locks: Collection<LockDoc>, key: string, fn: () => Promise<T>, opts: LockOptions = DEFAULTS): Promise<T> {
	const previous = localQueues.get(key) ?? Promise.resolve();
	const run = previous
		.catch(() => undefined)
		.then(async () => {
			const owner = await acquire(locks, key, opts);
			try {
				return await fn();
			} finally {
				await locks.deleteOne({ _id: key, owner });
			}
		});
	localQueues.set(key, run);
	try {
		return await run;
	} finally {
		if (localQueues.get(key) === run) localQueues.delete(key);
	}
}
