import { ServiceBroker } from "moleculer";
import { Schema } from "mongoose";
import { loadConfig } from "../../lib/config";
import { memoryCollection, type Collection } from "../../lib/db-adapters";
import { LockSchema, type LockDoc } from "../../lib/lock";
import {
	EventBusyError,
	PermanentEventError,
	afterFailure,
	domainEvent,
	parseEvent,
	retryDelay,
	retryDelays,
	topology,
	type DomainEvent,
	type RetryPolicy,
} from "../../lib/messaging/events";
import { Inbox, InboxSchema, type InboxDoc } from "../../lib/messaging/inbox";
import { LocalEventBus } from "../../lib/messaging/local-bus";
import { Outbox, withOutbox, type OutboxFields } from "../../lib/messaging/outbox";
import { METRICS } from "../../mixins/domain-events.mixin";
import OrdersService from "../../services/orders.service";
import ProductsService from "../../services/products.service";
import UsersService from "../../services/users.service";
import { eventually } from "../support/eventually";

const quiet = { debug: () => undefined, info: () => undefined, warn: () => undefined, error: () => undefined };
const policy: RetryPolicy = { maxAttempts: 3, retryDelayMs: 10, retryMaxDelayMs: 15 };

describe("domain event configuration", () => {
	it("has production defaults, and test hooks only under NODE_ENV=test", () => {
		expect(loadConfig({}).events).toEqual({
			prefetch: 10,
			maxAttempts: 5,
			retryDelayMs: 1_000,
			retryMaxDelayMs: 60_000,
			publishTimeoutMs: 5_000,
			relayIntervalMs: 1_000,
			relayMaxDelayMs: 30_000,
			inboxRetentionMs: 7 * 24 * 3_600_000,
			queueExpiresMs: null,
			failHandler: null,
			crashBeforePublish: false,
		});
		const hooks = { TEST_EVENT_FAILURES: "user.deleted:2", TEST_CRASH_BEFORE_PUBLISH: "true" };
		expect(loadConfig({ ...hooks, NODE_ENV: "test" }).events).toMatchObject({
			failHandler: { event: "user.deleted", times: 2 },
			crashBeforePublish: true,
		});
		expect(loadConfig({ TEST_EVENT_FAILURES: "order.created:always", NODE_ENV: "test" }).events.failHandler).toEqual({
			event: "order.created",
			times: "always",
		});
		expect(loadConfig({ ...hooks, NODE_ENV: "production", JWT_SECRET: "x".repeat(32) }).events).toMatchObject({
			failHandler: null,
			crashBeforePublish: false,
		});
	});

	it("refuses malformed values", () => {
		expect(() => loadConfig({ EVENTS_MAX_ATTEMPTS: "0" })).toThrow("EVENTS_MAX_ATTEMPTS must be between 1 and 20");
		expect(() => loadConfig({ EVENTS_RETRY_DELAY_MS: "5000", EVENTS_RETRY_MAX_DELAY_MS: "1000" })).toThrow(/must not be below/);
		expect(() => loadConfig({ TEST_EVENT_FAILURES: "user.deleted", NODE_ENV: "test" })).toThrow(/<event>:<count\|always>/);
		expect(() => loadConfig({ EVENTS_QUEUE_EXPIRES_MS: "10" })).toThrow(/EVENTS_QUEUE_EXPIRES_MS/);
	});
});

describe("domain event policy", () => {
	it("doubles the retry delay up to the cap, one retry queue per distinct delay", () => {
		const p = { maxAttempts: 6, retryDelayMs: 1_000, retryMaxDelayMs: 5_000 };
		expect([1, 2, 3, 4, 5].map((attempt) => retryDelay(p, attempt))).toEqual([1_000, 2_000, 4_000, 5_000, 5_000]);
		expect(retryDelays(p)).toEqual([1_000, 2_000, 4_000, 5_000]);
		expect(retryDelays({ ...p, maxAttempts: 1 })).toEqual([]);
	});

	it("retries a failure until the last attempt, then dead-letters; a permanent error at once; a busy event without using an attempt", () => {
		const failure = new Error("db down");
		expect(afterFailure(policy, 1, failure)).toEqual({ retryInMs: 10, nextAttempt: 2 });
		expect(afterFailure(policy, 2, failure)).toEqual({ retryInMs: 15, nextAttempt: 3 });
		expect(afterFailure(policy, 3, failure)).toEqual({ deadLetter: true });
		expect(afterFailure(policy, 1, new PermanentEventError("bad payload"))).toEqual({ deadLetter: true });
		expect(afterFailure(policy, 3, new EventBusyError("e1"))).toEqual({ retryInMs: 10, nextAttempt: 3 });
	});

	it("names every RabbitMQ object under the namespace, one queue set per consuming service", () => {
		expect(topology("shop", "orders")).toMatchObject({
			exchange: "shop.domain-events",
			queue: "shop.orders.domain-events",
			deadLetter: "shop.orders.dead-letter",
		});
		expect(topology("shop", "orders").retry(2_000)).toBe("shop.orders.retry.2000ms");
	});

	it("accepts only well-formed envelopes", () => {
		const event = domainEvent("user.deleted", { id: "u1" }, "users", "user.deleted:u1");
		expect(parseEvent(Buffer.from(JSON.stringify(event)))).toEqual(event);
		expect(() => parseEvent(Buffer.from("{not json"))).toThrow(PermanentEventError);
		expect(() => parseEvent({ ...event, payload: "x" })).toThrow(PermanentEventError);
		expect(() => parseEvent({ ...event, id: "" })).toThrow(PermanentEventError);
	});
});

type Doc = { _id: string; status: string; deletedAt?: Date } & OutboxFields & Record<string, unknown>;

async function outboxFixture(publish: (event: DomainEvent) => Promise<void>, purgeDrained?: Record<string, unknown>) {
	const docs = await memoryCollection<Doc>(withOutbox(new Schema({ _id: String, status: String, deletedAt: Date }, { versionKey: false })));
	const locks = await memoryCollection<LockDoc>(LockSchema);
	const outbox = new Outbox(docs, locks, {
		name: "things",
		publish,
		relayIntervalMs: 20,
		relayMaxDelayMs: 40,
		publishTimeoutMs: 100,
		purgeDrained,
		log: quiet,
	});
	return { docs, locks, outbox };
}

const event = (type: string, id: string) => domainEvent(type, { id }, "things", `${type}:${id}`);

describe("outbox", () => {
	let outbox: Outbox | undefined;
	afterEach(() => outbox?.stop());

	it("records the events in the same write as the change, and none when the change is refused", async () => {
		const f = await outboxFixture(async () => undefined);
		await f.docs.insert({ _id: "a", status: "pending" });
		const changed = await f.outbox.update({ _id: "a", status: "pending" }, { $set: { status: "confirmed" } }, [
			event("thing.confirmed", "a"),
		]);
		expect(changed).toMatchObject({
			status: "confirmed",
			outbox: [{ id: "thing.confirmed:a", type: "thing.confirmed", payload: { id: "a" } }],
		});
		expect(changed!.outboxDueAt).toBeInstanceOf(Date);
		const refused = await f.outbox.update({ _id: "a", status: "pending" }, { $set: { status: "cancelled" } }, [
			event("thing.cancelled", "a"),
		]);
		expect(refused).toBeNull();
		expect((await f.docs.findById("a"))!.outbox!.map((e) => e.type)).toEqual(["thing.confirmed"]);
	});

	it("publishes pending entries, in order, and clears them; retries with backoff while publishing fails", async () => {
		const published: string[] = [];
		let brokerUp = false;
		const f = await outboxFixture(async (e) => {
			if (!brokerUp) throw new Error("RabbitMQ is not connected");
			published.push(e.id);
		});
		outbox = f.outbox;
		await f.docs.insert({ _id: "a", status: "new" });
		await f.outbox.update({ _id: "a" }, { $set: { status: "confirmed" } }, [event("thing.confirmed", "a")]);
		await f.outbox.update({ _id: "a" }, { $set: { status: "cancelled" } }, [event("thing.cancelled", "a")]);
		f.outbox.start();
		const pendingWhileFailing = await eventually(async () => {
			const doc = await f.docs.findById("a");
			return doc?.outboxError ? doc : undefined;
		});
		expect(pendingWhileFailing.outboxError).toBe("RabbitMQ is not connected");
		expect(pendingWhileFailing.outbox).toHaveLength(2);
		// Backing off: the attempts of the failing rounds are counted.
		await eventually(async () => (((await f.docs.findById("a"))?.outboxAttempts ?? 0) >= 2 ? true : undefined));
		brokerUp = true;

		const drained = await eventually(async () => {
			const doc = await f.docs.findById("a");
			return doc && doc.outbox!.length === 0 ? doc : undefined;
		});
		expect(published).toEqual(["thing.confirmed:a", "thing.cancelled:a"]);
		expect(drained).toMatchObject({ status: "cancelled", outbox: [] });
		expect(drained.outboxDueAt).toBeUndefined();
		expect(drained.outboxError).toBeUndefined();
	});

	it("deletes a tombstone once its events are out, and keeps other documents", async () => {
		const published: string[] = [];
		const f = await outboxFixture(async (e) => void published.push(e.id), { deletedAt: { $exists: true } });
		await f.docs.insert({ _id: "gone", status: "active" });
		await f.docs.insert({ _id: "kept", status: "active" });
		await f.outbox.update({ _id: "gone" }, { $set: { deletedAt: new Date() } }, [event("thing.deleted", "gone")]);
		await f.outbox.update({ _id: "kept" }, { $set: { status: "renamed" } }, [event("thing.renamed", "kept")]);
		expect(await f.outbox.backlog()).toBe(2);
		outbox = f.outbox;
		f.outbox.start();
		await eventually(async () => (published.length === 2 ? true : undefined));
		await eventually(async () => ((await f.docs.findById("gone")) === null ? true : undefined));
		expect(await f.docs.findById("kept")).toMatchObject({ status: "renamed", outbox: [] });
		expect(await f.outbox.backlog()).toBe(0);
	});

	it("skips a document whose lock another replica holds", async () => {
		const published: string[] = [];
		const f = await outboxFixture(async (e) => void published.push(e.id));
		await f.docs.insert({ _id: "a", status: "new" });
		await f.outbox.update({ _id: "a" }, { $set: { status: "confirmed" } }, [event("thing.confirmed", "a")]);
		// Another replica's relay (another process: so not this process's lock queue) holds the document.
		await f.locks.insert({ _id: "things:a", owner: "other-replica", expiresAt: new Date(Date.now() + 60_000) });
		outbox = f.outbox;
		f.outbox.start();
		f.outbox.kick("a");
		// That nothing happens can only be seen by waiting: ten relay rounds.
		await new Promise((resolve) => setTimeout(resolve, 200));
		expect(published).toEqual([]);
		await f.locks.deleteOne({ _id: "things:a" });
		await eventually(async () => (published.length === 1 ? true : undefined));
		expect(published).toEqual(["thing.confirmed:a"]);
	});
});

describe("inbox", () => {
	let entries: Collection<InboxDoc>;
	let inbox: Inbox;
	beforeEach(async () => {
		entries = await memoryCollection<InboxDoc>(InboxSchema);
		inbox = new Inbox(entries, { retentionMs: 60_000, leaseMs: 1_000 });
	});

	it("runs the effect of an event once; a redelivery is a duplicate", async () => {
		const e = event("user.deleted", "u1");
		let runs = 0;
		expect(await inbox.once(e, async () => void runs++)).toBe("handled");
		expect(await inbox.once(e, async () => void runs++)).toBe("duplicate");
		expect(runs).toBe(1);
		expect(await entries.findById(e.id)).toMatchObject({ status: "done", type: "user.deleted" });
	});

	it("lets a failed attempt be retried", async () => {
		const e = event("user.deleted", "u2");
		await expect(inbox.once(e, async () => Promise.reject(new Error("products down")))).rejects.toThrow("products down");
		let runs = 0;
		expect(await inbox.once(e, async () => void runs++)).toBe("handled");
		expect(runs).toBe(1);
	});

	it("refuses a concurrent delivery of the same event while the first is being handled", async () => {
		const e = event("user.deleted", "u3");
		let finish: (() => void) | undefined;
		const first = inbox.once(e, () => new Promise<void>((resolve) => (finish = resolve)));
		await eventually(async () => (finish ? true : undefined));
		await expect(inbox.once(e, async () => undefined)).rejects.toBeInstanceOf(EventBusyError);
		finish!();
		expect(await first).toBe("handled");
	});

	it("takes over the claim of a handler that died, and purges expired entries", async () => {
		const e = event("user.deleted", "u4");
		const past = new Date(Date.now() - 1_000);
		await entries.insert({
			_id: e.id,
			type: e.type,
			status: "processing",
			owner: "dead-node",
			leaseUntil: past,
			expiresAt: new Date(Date.now() + 60_000),
		});
		let runs = 0;
		expect(await inbox.once(e, async () => void runs++)).toBe("handled");
		expect(runs).toBe(1);

		await entries.insert({ _id: "old", type: "x", status: "done", owner: "o", leaseUntil: past, expiresAt: past });
		expect(await inbox.purgeExpired()).toBe(1);
		expect(await entries.findById("old")).toBeNull();
		expect(await entries.findById(e.id)).not.toBeNull();
	});
});

describe("in-process delivery (no RabbitMQ): retries and the dead-letter list", () => {
	let bus: LocalEventBus;
	let inbox: Inbox;
	const deadLettered: string[] = [];
	const retried: string[] = [];
	beforeEach(async () => {
		bus = new LocalEventBus({
			emit: async (_type, e) => void bus.receive("orders", e),
			policy,
			observer: { retried: (e) => retried.push(e!.id), deadLettered: (e) => deadLettered.push(e!.id) },
		});
		inbox = new Inbox(await memoryCollection<InboxDoc>(InboxSchema), { retentionMs: 60_000, leaseMs: 1_000 });
		deadLettered.length = 0;
		retried.length = 0;
	});
	afterEach(() => bus.stop());

	it("applies an event whose handler fails twice, then succeeds, once", async () => {
		let calls = 0;
		let applied = 0;
		const outcomes: string[] = [];
		await bus.subscribe("orders", ["user.deleted"], async ({ event: e }) => {
			const outcome = await inbox.once(e, async () => {
				if (++calls <= 2) throw new Error(`flaky ${calls}`);
				applied++;
			});
			outcomes.push(outcome);
		});
		await bus.publish(event("user.deleted", "u1"));
		await eventually(async () => (applied === 1 ? true : undefined));
		expect(calls).toBe(3);
		expect(retried).toEqual(["user.deleted:u1", "user.deleted:u1"]);
		// The same event delivered again (as after a lost connection) has no second effect.
		await bus.publish(event("user.deleted", "u1"));
		await eventually(async () => (outcomes.length === 2 ? true : undefined));
		expect(outcomes).toEqual(["handled", "duplicate"]);
		expect(applied).toBe(1);
		expect(deadLettered).toEqual([]);
	});

	it("parks an event that always fails with its error; replay applies it after the fix; discard drops it", async () => {
		let broken = true;
		const applied: string[] = [];
		await bus.subscribe("orders", ["user.deleted"], async ({ event: e }) => {
			await inbox.once(e, async () => {
				if (broken) throw new Error("handler bug");
				applied.push(e.id);
			});
		});
		await bus.publish(event("user.deleted", "u1"));
		await bus.publish(event("user.deleted", "u2"));
		const letters = await eventually(async () => {
			const list = await bus.deadLetters("orders", 10);
			return list.length === 2 ? list : undefined;
		});
		expect(letters[0]).toMatchObject({ event: { id: "user.deleted:u1" }, error: { name: "Error", message: "handler bug" }, attempts: 3 });
		expect(await bus.queues("orders")).toContainEqual(expect.objectContaining({ messages: 2 }));

		broken = false;
		expect(await bus.replay("orders", ["user.deleted:u1"], 100)).toBe(1);
		await eventually(async () => (applied.length === 1 ? true : undefined));
		expect(applied).toEqual(["user.deleted:u1"]);
		expect(await bus.discard("orders", ["user.deleted:u2"], 100)).toBe(1);
		expect(await bus.deadLetters("orders", 10)).toEqual([]);
	});
});

/** The whole system in one process on the memory store, as `npm run dev` runs it: events travel as Moleculer events. */
describe("domain events between the services in one broker", () => {
	let broker: ServiceBroker;
	const admin = { user: { id: "0123456789abcdef01234567", email: "admin@x.test", role: "admin" as const } };

	beforeAll(async () => {
		broker = new ServiceBroker({ logger: false, metrics: { enabled: true, reporter: [] } });
		for (const schema of [UsersService, ProductsService, OrdersService]) broker.createService(schema);
		await broker.start();
	});
	afterAll(() => broker.stop());

	const counter = (name: string, labels: Record<string, string>) =>
		(broker.metrics.getMetric(name) as unknown as { get(l: object): { value: number } | null }).get(labels)?.value ?? 0;

	it("cancels a deleted user's open orders and gives the stock back; the user is gone at once", async () => {
		const { user, token } = await broker.call<{ user: { id: string }; token: string }, object>("users.register", {
			email: "leaver@x.test",
			password: "password-1",
			name: "L",
		});
		const me = { meta: { user: { id: user.id, email: "leaver@x.test", role: "customer" } } };
		const product = await broker.call<{ id: string }, object>("products.create", { name: "P", price: 100, stock: 5 }, { meta: admin });
		const order = await broker.call<{ id: string }, object>("orders.create", { items: [{ productId: product.id, quantity: 2 }] }, me);

		await broker.call("users.remove", { id: user.id }, me);
		await expect(broker.call("users.resolveToken", { token })).rejects.toMatchObject({ code: 401 });
		await expect(broker.call("users.get", { id: user.id }, { meta: admin })).rejects.toMatchObject({ code: 404 });

		await eventually(async () => {
			const p = await broker.call<{ stock: number }, object>("products.get", { id: product.id });
			return p.stock === 5 ? true : undefined;
		});
		expect(await broker.call("orders.get", { id: order.id }, { meta: admin })).toMatchObject({ status: "cancelled" });
		// The tombstone is removed once user.deleted is out, and the address is free again.
		await eventually(async () => {
			const status = await broker.call<{ outboxPending: number }, object>("users.eventQueues", {});
			return status.outboxPending === 0 ? true : undefined;
		});
		await broker.call("users.register", { email: "leaver@x.test", password: "password-1", name: "L again" });

		expect(counter(METRICS.published, { service: "users", event: "user.deleted" })).toBe(1);
		expect(counter(METRICS.consumed, { service: "orders", event: "user.deleted" })).toBe(1);
		await eventually(async () => (counter(METRICS.published, { service: "orders", event: "order.cancelled" }) === 1 ? true : undefined));
		expect(counter(METRICS.published, { service: "orders", event: "order.created" })).toBe(1);
	});

	it("reports queues and dead letters to an admin, in memory", async () => {
		const status = await broker.call<{ durable: boolean; queues: Array<{ name: string }> }, object>("orders.eventQueues", {});
		expect(status.durable).toBe(false);
		expect(status.queues.map((q) => q.name)).toEqual(["orders.retry (in process)", "orders.dead-letter (in process)"]);
		expect(await broker.call("orders.deadLetters", {})).toEqual({ rows: [] });
		// A producer without handlers has no dead letters to manage.
		expect(broker.registry.getActionEndpoints("users.deadLetters")).toBeFalsy();
	});
});
