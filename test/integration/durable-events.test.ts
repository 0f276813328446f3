import { execFile, spawnSync } from "node:child_process";
import { promisify } from "node:util";
import amqp, { type ChannelModel } from "amqplib";
import mongoose from "mongoose";
import { MongoStore, memoryCollection, type Collection } from "../../lib/db-adapters";
import { LockSchema, type LockDoc } from "../../lib/lock";
import { AmqpEventBus } from "../../lib/messaging/amqp-bus";
import { domainEvent, topology, type DomainEvent } from "../../lib/messaging/events";
import { Inbox, InboxSchema, type InboxDoc } from "../../lib/messaging/inbox";
import { Outbox, withOutbox, type OutboxFields } from "../../lib/messaging/outbox";
import { Cluster, http, type HttpResult, type NodeProcess } from "../support/cluster";
import { freePort } from "../support/ferretdb";
import { describeWithInfra, eventually, infra, uniqueName } from "../support/infra";

/**
 * Domain events that are never lost, on the real RabbitMQ and MongoDB-wire server, each service in
 * its own OS process: a consumer that was down, a producer killed between its write and its
 * publish, a RabbitMQ restart while events flow, handlers that fail, and two consumer replicas.
 */
describeWithInfra("durable domain events over RabbitMQ", () => {
	const namespace = uniqueName("events");
	const ADMIN = { email: "admin@events.test", password: "admin-password-1" };
	const ordersQueue = topology(namespace, "orders");
	/** Short retry delays, so a failing handler reaches the dead-letter queue in about a second. */
	const EVENTS_ENV = {
		EVENTS_MAX_ATTEMPTS: "3",
		EVENTS_RETRY_DELAY_MS: "200",
		EVENTS_RETRY_MAX_DELAY_MS: "400",
		OUTBOX_RELAY_INTERVAL_MS: "200",
		OUTBOX_RETRY_MAX_DELAY_MS: "1000",
		// Should this suite die before its cleanup, RabbitMQ drops its queues after a while.
		EVENTS_QUEUE_EXPIRES_MS: "600000",
	};
	const quiet = { debug: () => undefined, info: () => undefined, warn: () => undefined, error: () => undefined };

	let cluster: Cluster;
	let rabbit: ChannelModel;
	let adminToken: string;
	/** A test-owned consumer of order events with its own queue and inbox: what it handled, per event id. */
	let ledger: AmqpEventBus;
	const ledgerHandled = new Map<string, number>();
	const ledgerDeliveries = new Map<string, number>();
	/** Holds the ledger's handlers while a test wants deliveries in flight (`openLedger` lets them go). */
	let ledgerGate: Promise<void> = Promise.resolve();
	let openLedger: () => void = () => undefined;
	let ledgerWaiting = 0;
	const redeliveries = () => [...ledgerDeliveries.values()].reduce((sum, n) => sum + n - 1, 0);

	const call = <T = Record<string, unknown>>(method: string, path: string, opts?: Parameters<typeof http>[3]): Promise<HttpResult<T>> =>
		http<T>(cluster.baseUrl, method, path, opts);

	async function register(email: string) {
		const res = await call<{ user: { id: string }; token: string }>("POST", "/users/register", {
			body: { email, password: "password-123", name: "Buyer" },
		});
		expect(res.status).toBe(201);
		return res.body;
	}

	async function createProduct(stock: number) {
		const res = await call<{ id: string }>("POST", "/products", { token: adminToken, body: { name: "Widget", price: 500, stock } });
		expect(res.status).toBe(201);
		return res.body.id;
	}

	async function order(token: string, productId: string, quantity: number) {
		const res = await call<{ id: string }>("POST", "/orders", { token, body: { items: [{ productId, quantity }] } });
		expect(res.status).toBe(201);
		return res.body.id;
	}

	const stockOf = async (productId: string) => (await call<{ stock: number }>("GET", `/products/${productId}`)).body.stock;
	const orderOf = async (id: string) =>
		(await call<{ status: string; history: Array<{ status: string }> }>("GET", `/orders/${id}`, { token: adminToken })).body;
	const waitForStock = (productId: string, stock: number, timeoutMs = 30_000) =>
		eventually(async () => ((await stockOf(productId)) === stock ? true : undefined), timeoutMs);

	/** Runs while the test's own requests and consumers go on (unlike spawnSync, which would block them). */
	const rabbitmqctl = (command: string) => promisify(execFile)("rabbitmqctl", [command], { timeout: 120_000 });

	/** Ready messages and consumers of a queue, asked on a channel of the test's own. */
	async function queue(name: string): Promise<{ messages: number; consumers: number }> {
		const ch = await rabbit.createChannel();
		try {
			const q = await ch.checkQueue(name);
			return { messages: q.messageCount, consumers: q.consumerCount };
		} finally {
			await ch.close().catch(() => undefined);
		}
	}

	/** The running orders nodes; restarting one stops it (SIGTERM) and starts a fresh process with `env`. */
	const running = (service: string) =>
		cluster.nodes.filter((n) => n.name.startsWith(service) && n.child.exitCode === null && n.child.signalCode === null);
	async function restart(service: string, env: Record<string, string> = {}): Promise<NodeProcess> {
		await Promise.all(running(service).map((n) => n.stop()));
		const node = cluster.start(service, env);
		await serving(service);
		return node;
	}

	/**
	 * Ready, and the gateway has generated the service's routes again. (Readiness alone is not enough
	 * for users: its explicit login/register aliases count as "routes" before the others are back.)
	 * After a node was killed, calls are still balanced to it until its heartbeat times out: be patient.
	 */
	async function serving(service: string): Promise<void> {
		await cluster.waitReady();
		await eventually(
			async () => ((await call("GET", `/${service}/events/queues`, { token: adminToken })).status === 200 ? true : undefined),
			60_000,
			250,
		);
	}

	/** Sums a counter of the node's Prometheus output over the lines with `event="<event>"`. */
	async function metric(port: number, name: string, event: string): Promise<number> {
		const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
		return text
			.split("\n")
			.filter((line) => line.startsWith(`${name}{`) && line.includes(`event="${event}"`))
			.reduce((sum, line) => sum + Number(line.split(" ").pop()), 0);
	}

	beforeAll(async () => {
		cluster = new Cluster({
			infra: infra!,
			namespace,
			env: {
				JWT_SECRET: "events-test-secret-that-is-long-enough-1",
				ADMIN_EMAIL: ADMIN.email,
				ADMIN_PASSWORD: ADMIN.password,
				LOGIN_RATE_LIMIT_PER_MINUTE: "1000",
				REQUEST_TIMEOUT_MS: "10000",
				...EVENTS_ENV,
			},
		});
		for (const service of ["api", "users", "products", "orders"]) cluster.start(service);
		rabbit = await amqp.connect(infra!.amqpUrl);
		rabbit.on("error", () => undefined);

		const inbox = new Inbox(await memoryCollection<InboxDoc>(InboxSchema), { retentionMs: 3_600_000, leaseMs: 60_000 });
		ledger = new AmqpEventBus({
			urls: [infra!.amqpUrl],
			namespace,
			connectionName: `${namespace}.ledger.domain-events@test`,
			prefetch: 10,
			publishTimeoutMs: 5_000,
			policy: { maxAttempts: 3, retryDelayMs: 200, retryMaxDelayMs: 400 },
			queueExpiresMs: Number(EVENTS_ENV.EVENTS_QUEUE_EXPIRES_MS),
			log: quiet,
		});
		await ledger.subscribe("ledger", ["order.created", "order.cancelled"], async ({ event }: { event: DomainEvent }) => {
			ledgerDeliveries.set(event.id, (ledgerDeliveries.get(event.id) ?? 0) + 1);
			ledgerWaiting++;
			await ledgerGate;
			ledgerWaiting--;
			await inbox.once(event, async () => void ledgerHandled.set(event.id, (ledgerHandled.get(event.id) ?? 0) + 1));
		});
		await ledger.start();

		await cluster.waitReady();
		const login = await call<{ token: string }>("POST", "/users/login", { body: ADMIN });
		adminToken = login.body.token;
	}, 90_000);

	afterAll(async () => {
		openLedger();
		await ledger?.stop();
		await cluster?.stopAll();
		await rabbit?.close().catch(() => undefined);
		// This suite's queues and exchange only (all named under its namespace), on a fresh connection.
		const cleanup = await amqp.connect(infra!.amqpUrl);
		const listed = spawnSync("rabbitmqctl", ["list_queues", "--quiet", "--no-table-headers", "name"], { encoding: "utf8" });
		const ch = await cleanup.createChannel();
		for (const name of listed.stdout.split("\n").filter((q) => q.startsWith(`${namespace}.`))) await ch.deleteQueue(name);
		await ch.deleteExchange(ordersQueue.exchange);
		await cleanup.close();
		const conn = await mongoose.createConnection(infra!.mongoUri).asPromise();
		for (const db of ["users", "products", "orders"]) await conn.useDb(`${namespace}-${db}`).dropDatabase();
		await conn.close();
	}, 60_000);

	it("declares durable queues per consuming service: main, retries, dead letters", async () => {
		expect(await queue(ordersQueue.queue)).toMatchObject({ consumers: 1 });
		expect(await queue(ordersQueue.retry(200))).toMatchObject({ messages: 0 });
		expect(await queue(ordersQueue.retry(400))).toMatchObject({ messages: 0 });
		expect(await queue(ordersQueue.deadLetter)).toMatchObject({ messages: 0 });
		const status = await call<{ durable: boolean; queues: Array<{ name: string; consumers: number }> }>("GET", "/orders/events/queues", {
			token: adminToken,
		});
		expect(status.body.durable).toBe(true);
		expect(status.body.queues.map((q) => q.name)).toEqual([
			ordersQueue.queue,
			ordersQueue.retry(200),
			ordersQueue.retry(400),
			ordersQueue.deadLetter,
		]);
		const customer = await register("nosy@events.test");
		expect((await call("GET", "/orders/events/queues", { token: customer.token })).status).toBe(403);
		expect((await call("GET", "/orders/events/dead-letters")).status).toBe(401);
	});

	it("(1) a user deleted while orders is down: the event waits in RabbitMQ; orders cancels and releases on return", async () => {
		const product = await createProduct(5);
		const buyer = await register("down@events.test");
		const orderId = await order(buyer.token, product, 2);
		expect(await stockOf(product)).toBe(3);

		await Promise.all(running("orders").map((n) => n.stop()));
		expect((await call("DELETE", `/users/${buyer.user.id}`, { token: buyer.token })).status).toBe(204);
		await eventually(async () => ((await queue(ordersQueue.queue)).messages === 1 ? true : undefined));
		expect(await stockOf(product)).toBe(3);

		cluster.start("orders");
		await serving("orders");
		await waitForStock(product, 5);
		expect((await orderOf(orderId)).status).toBe("cancelled");
		expect(await queue(ordersQueue.queue)).toMatchObject({ messages: 0, consumers: 1 });
	}, 90_000);

	it("(4) the users process killed after its write, before publishing: the relay publishes after the restart", async () => {
		const product = await createProduct(5);
		const buyer = await register("crash@events.test");
		const orderId = await order(buyer.token, product, 1);

		const doomed = await restart("users", { TEST_CRASH_BEFORE_PUBLISH: "true" });
		const res = await call("DELETE", `/users/${buyer.user.id}`, { token: buyer.token });
		expect(res.status).toBeGreaterThanOrEqual(500);
		expect(await doomed.stop()).toBeNull(); // killed by the hook, not a normal exit

		// The deletion and its event were written together; nothing was published, so orders changed nothing.
		// (Read from the databases: without users the gateway authenticates nobody.)
		const conn = await mongoose.createConnection(infra!.mongoUri).asPromise();
		try {
			const tombstone = await conn
				.useDb(`${namespace}-users`)
				.collection("users")
				.findOne({ _id: new mongoose.Types.ObjectId(buyer.user.id) });
			expect(tombstone).toMatchObject({
				deletedAt: expect.any(Date),
				outbox: [expect.objectContaining({ id: `user.deleted:${buyer.user.id}` })],
			});
			const stored = await conn
				.useDb(`${namespace}-orders`)
				.collection("orders")
				.findOne({ _id: new mongoose.Types.ObjectId(orderId) });
			expect(stored).toMatchObject({ status: "confirmed" });
		} finally {
			await conn.close();
		}

		cluster.start("users");
		// Until its heartbeat times out, the gateway still sends some calls to the killed node.
		const gateway = cluster.nodes.find((n) => n.name.startsWith("api"))!;
		await eventually(
			async () => (gateway.output().includes(`Node '${namespace}-${doomed.name}' disconnected unexpectedly`) ? true : undefined),
			60_000,
		);
		await serving("users");
		await waitForStock(product, 5);
		expect((await orderOf(orderId)).status).toBe("cancelled");
		expect((await call("GET", `/users/${buyer.user.id}`, { token: adminToken })).status).toBe(404);
	}, 120_000);

	it("(3) a handler that fails twice, then succeeds, is applied once", async () => {
		const metricsPort = await freePort();
		await restart("orders", { TEST_EVENT_FAILURES: "user.deleted:2", METRICS_PORT: String(metricsPort) });
		const product = await createProduct(5);
		const buyer = await register("flaky@events.test");
		const orderId = await order(buyer.token, product, 2);

		expect((await call("DELETE", `/users/${buyer.user.id}`, { token: buyer.token })).status).toBe(204);
		await waitForStock(product, 5);
		const cancelled = await orderOf(orderId);
		expect(cancelled.history.map((h) => h.status)).toEqual(["pending", "confirmed", "cancelled"]);
		expect(await metric(metricsPort, "shop_events_retried_total", "user.deleted")).toBe(2);
		expect(await metric(metricsPort, "shop_events_consumed_total", "user.deleted")).toBe(1);
		expect(await metric(metricsPort, "shop_events_dead_lettered_total", "user.deleted")).toBe(0);
		expect(await metric(metricsPort, "shop_events_published_total", "order.cancelled")).toBe(1);
		expect(await stockOf(product)).toBe(5);
	}, 90_000);

	it("(3) a handler that always fails: dead letter with its error; replay works after the fix; discard drops one", async () => {
		await restart("orders", { TEST_EVENT_FAILURES: "user.deleted:always" });
		const product = await createProduct(10);
		const [a, b] = [await register("broken-a@events.test"), await register("broken-b@events.test")];
		const orderA = await order(a.token, product, 2);
		const orderB = await order(b.token, product, 3);
		for (const u of [a, b]) expect((await call("DELETE", `/users/${u.user.id}`, { token: u.token })).status).toBe(204);

		type Letters = { rows: Array<{ id: string; type: string; payload: { id: string }; error: { message: string }; attempts: number }> };
		const letters = await eventually(async () => {
			const res = await call<Letters>("GET", "/orders/events/dead-letters", { token: adminToken });
			return res.body.rows.length === 2 ? res.body.rows : undefined;
		});
		expect(letters.map((l) => l.id).sort()).toEqual([`user.deleted:${a.user.id}`, `user.deleted:${b.user.id}`].sort());
		expect(letters[0]).toMatchObject({
			type: "user.deleted",
			attempts: 3,
			error: { message: "Injected failure 3 of user.deleted (TEST_EVENT_FAILURES)" },
		});
		// Listing leaves them where they are.
		expect((await queue(ordersQueue.deadLetter)).messages).toBe(2);
		expect(await stockOf(product)).toBe(5);

		// The fix is deployed: orders without the failing handler.
		await restart("orders");
		const replayed = await call("POST", "/orders/events/dead-letters/replay", {
			token: adminToken,
			body: { ids: [`user.deleted:${a.user.id}`] },
		});
		expect(replayed.body).toEqual({ replayed: 1 });
		await waitForStock(product, 7);
		expect((await orderOf(orderA)).status).toBe("cancelled");

		const discarded = await call("POST", "/orders/events/dead-letters/discard", {
			token: adminToken,
			body: { ids: [`user.deleted:${b.user.id}`] },
		});
		expect(discarded.body).toEqual({ discarded: 1 });
		expect((await call<Letters>("GET", "/orders/events/dead-letters", { token: adminToken })).body.rows).toEqual([]);
		expect((await orderOf(orderB)).status).toBe("confirmed");
	}, 120_000);

	it("(5) two orders replicas share the service's queue: each event is handled once", async () => {
		const ports = [await freePort(), await freePort()];
		await restart("orders", { METRICS_PORT: String(ports[0]) });
		cluster.start("orders", { METRICS_PORT: String(ports[1]) });
		await eventually(async () => ((await queue(ordersQueue.queue)).consumers === 2 ? true : undefined));

		const product = await createProduct(100);
		const buyers = await Promise.all(Array.from({ length: 12 }, (_, i) => register(`replica${i}@events.test`)));
		const orders: string[] = [];
		for (const b of buyers) orders.push(await order(b.token, product, 2));
		expect(await stockOf(product)).toBe(76);
		for (const b of buyers) expect((await call("DELETE", `/users/${b.user.id}`, { token: b.token })).status).toBe(204);

		await waitForStock(product, 100);
		for (const id of orders) expect((await orderOf(id)).history.filter((h) => h.status === "cancelled")).toHaveLength(1);
		const perReplica = await Promise.all(ports.map((p) => metric(p, "shop_events_consumed_total", "user.deleted")));
		expect(perReplica[0] + perReplica[1]).toBe(12);
		expect(perReplica.every((n) => n > 0)).toBe(true);
		// The order events each reached the ledger's own queue and were handled there once.
		await eventually(async () => (orders.every((id) => ledgerHandled.get(`order.cancelled:${id}`) === 1) ? true : undefined));
	}, 120_000);

	it("(2) RabbitMQ restarts while events flow: none lost, none applied twice", async () => {
		const product = await createProduct(1_000);
		const buyers = await Promise.all(Array.from({ length: 5 }, (_, i) => register(`flow${i}@events.test`)));
		const parked = await register("parked@events.test");
		const parkedOrder = await order(parked.token, product, 5);

		// A burst of orders whose order.created events the ledger takes in but cannot finish yet.
		ledgerGate = new Promise<void>((resolve) => (openLedger = resolve));
		const redeliveredBefore = redeliveries();
		const burst: string[] = await Promise.all(Array.from({ length: 20 }, (_, i) => order(buyers[i % buyers.length].token, product, 1)));
		await eventually(async () => (ledgerWaiting === 10 ? true : undefined)); // its prefetch: 10 unacked deliveries in its hands

		// And one that waits in a durable queue: orders is down when its user is deleted.
		await Promise.all(running("orders").map((n) => n.stop()));
		expect((await call("DELETE", `/users/${parked.user.id}`, { token: parked.token })).status).toBe(204);
		await eventually(async () => ((await queue(ordersQueue.queue)).messages === 1 ? true : undefined));

		// A real restart, not just closed connections: the durable queues and persistent messages must survive
		// it. (A Moleculer call in flight across a restart is test/integration/amqp-transporter.test.ts's case.)
		await rabbitmqctl("stop_app");
		// The ledger now finishes what it had: its effects are recorded, but the acks are lost with the connection.
		openLedger();
		await rabbitmqctl("start_app");
		rabbit = await amqp.connect(infra!.amqpUrl);
		rabbit.on("error", () => undefined);
		cluster.start("orders");
		await serving("orders");

		// The parked message survived the restart and was applied.
		await waitForStock(product, 1_000 - burst.length, 60_000);
		expect((await orderOf(parkedOrder)).status).toBe("cancelled");
		// Events keep flowing after it.
		const after: string[] = [];
		for (const buyer of buyers) after.push(await order(buyer.token, product, 1));

		const placed = [...burst, ...after];
		await eventually(async () => (placed.every((id) => ledgerHandled.has(`order.created:${id}`)) ? true : undefined), 60_000);
		// The ten unacked deliveries came again after the restart, and were recognised as handled.
		expect(redeliveries() - redeliveredBefore).toBeGreaterThanOrEqual(10);
		expect(placed.map((id) => ledgerHandled.get(`order.created:${id}`))).toEqual(placed.map(() => 1));
		expect([...ledgerHandled.values()].every((n) => n === 1)).toBe(true);
		expect(await stockOf(product)).toBe(1_000 - placed.length);
		const logs = running("orders")
			.concat(cluster.nodes.filter((n) => n.name.startsWith("users")))
			.map((n) => n.output())
			.join("\n");
		expect(logs).toMatch(/RabbitMQ \(domain events\) connection lost; reconnecting/);
	}, 240_000);
});

/**
 * FerretDB loses one of two concurrent updates of a document (read-modify-write without isolation).
 * The outbox's writes and its relay's removals of published entries must not: they share a lock.
 */
describeWithInfra("the outbox on the MongoDB-wire server", () => {
	const dbName = uniqueName("outbox");
	const store = new MongoStore(infra!.mongoUri, { dbName, serverSelectionTimeoutMs: 5_000, maxPoolSize: 20 });
	type Thing = { _id: string; n: number } & OutboxFields & Record<string, unknown>;
	let things: Collection<Thing>;
	let locks: Collection<LockDoc>;

	beforeAll(async () => {
		const quiet = { debug: () => undefined, info: () => undefined, warn: () => undefined, error: () => undefined };
		const schema = withOutbox(new mongoose.Schema({ _id: String, n: Number }, { versionKey: false }));
		Object.assign(store, { service: { schema: { schema, modelName: "things" }, logger: quiet } });
		await store.connect();
		things = await store.collection<Thing>("things", schema);
		locks = await store.collection<LockDoc>("outbox_locks", LockSchema);
	});
	afterAll(async () => {
		await store.db?.dropDatabase();
		await store.disconnect();
	});

	it("keeps every concurrent change and publishes every event once while the relay removes published entries", async () => {
		const published: string[] = [];
		const outbox = new Outbox(things, locks, {
			name: "things",
			publish: async (event) => void published.push(event.id),
			relayIntervalMs: 20,
			relayMaxDelayMs: 100,
			publishTimeoutMs: 1_000,
			log: { debug: () => undefined, info: () => undefined, warn: () => undefined, error: () => undefined },
		});
		await things.insert({ _id: "x", n: 0 });
		outbox.start();
		try {
			await Promise.all(
				Array.from({ length: 30 }, async (_, i) => {
					await outbox.update({ _id: "x" }, { $inc: { n: 1 } }, [domainEvent("thing.changed", { i }, "test", `thing.changed:${i}`)]);
					outbox.kick("x");
				}),
			);
			await eventually(async () => (published.length >= 30 ? true : undefined));
			expect((await things.findById("x"))!.n).toBe(30);
			expect(new Set(published).size).toBe(30);
			await eventually(async () => ((await things.findById("x"))!.outbox!.length === 0 ? true : undefined));
			expect(published).toHaveLength(30);
		} finally {
			await outbox.stop();
		}
	});
});
