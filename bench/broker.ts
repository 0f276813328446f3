/**
 * Broker-level benchmark (no HTTP, no database).
 *
 * Measures request/response between two Moleculer nodes running in two separate OS
 * processes (a "responder" with `bench.echo` and a "caller"), over:
 *   - amqp-default : Moleculer AMQP transporter with its defaults (prefetch 1, Nagle on)
 *   - amqp-tuned   : this project's transporter (lib/amqp-transporter.ts) with prefetch 100 and
 *                    socketOptions.noDelay
 *   - tcp          : Moleculer TCP transporter (reference, static URLs, no UDP discovery)
 *   - raw-amqplib  : the same request/reply pattern written directly on amqplib (the ceiling)
 * plus a serializer comparison (JSON / CBOR / Notepack) on the tuned AMQP transporter.
 *
 * Every variant is measured in the same run, round-robin over several rounds after a
 * warm-up; the tables report the median round.
 *
 * Usage:
 *   cd /work/main && PATH=$PWD/node_modules/.bin:$PATH tsx bench/broker.ts [--smoke]
 *     [--url=amqp://guest:guest@127.0.0.1:5672] [--rounds=3] [--budget-ms=2500]
 *     [--concurrency=100] [--ablation] [--json]
 *
 * --smoke     every measurement tiny (200 ms, 1 round): a few seconds, for tests
 * --ablation  also amqp-nodelay-only and amqp-prefetch-only (which knob matters),
 *             amqp-tuned-moleculer (Moleculer's own class, same options: what the subclass costs) and
 *             raw-amqplib-noack (the raw loop without acks: what RabbitMQ gains without them)
 * --json      also print the results as JSON after the tables
 *
 * The same file is the worker: the orchestrator forks it (with the tsx loader flags it was
 * started with) and passes the worker's role through an environment variable.
 */
import { fork, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import { performance } from "node:perf_hooks";
import amqp from "amqplib";
import { MOLECULER_VERSION, ServiceBroker, Transporters, type Context } from "moleculer";
import { ShopAmqpTransporter } from "../lib/amqp-transporter";

// ---------------------------------------------------------------------------------------------
// Shared types
// ---------------------------------------------------------------------------------------------

type Role = "responder" | "caller";
type SerializerName = "JSON" | "CBOR" | "Notepack";
type PayloadName = "small" | "product" | "product-list";

/** Options the AMQP transporter actually reads; `socketOptions` is missing from Moleculer's .d.ts. */
interface AmqpOptions {
	url: string;
	prefetch?: number;
	autoDeleteQueues?: number | boolean;
	socketOptions?: { noDelay?: boolean };
}

/** `moleculer`: Moleculer's AMQP transporter; `shop`: this project's subclass (lib/amqp-transporter.ts). */
type AmqpImpl = "moleculer" | "shop";

type TransportSpec =
	{ type: "AMQP"; impl: AmqpImpl; options: AmqpOptions } | { type: "TCP"; options: { udpDiscovery: false; urls: string } };

interface MoleculerNodeSpec {
	kind: "moleculer";
	nodeID: string;
	namespace: string;
	transporter: TransportSpec;
	serializer: SerializerName;
}

interface RawNodeSpec {
	kind: "raw";
	/** Acknowledge each request (as Moleculer does) or consume without acks. */
	ack: boolean;
	url: string;
	requestQueue: string;
	prefetch: number;
	noDelay: boolean;
}

type NodeSpec = MoleculerNodeSpec | RawNodeSpec;

interface WorkerConfig {
	role: Role;
	spec: NodeSpec;
}

interface LoadSpec {
	concurrency: number;
	budgetMs: number;
	maxCount: number;
	payload: PayloadName;
}

/** One measurement, as produced by a caller worker. */
export interface Sample {
	completed: number;
	errors: number;
	elapsedMs: number;
	callsPerSec: number;
	p50Ms: number;
	p99Ms: number;
	firstError?: string;
	/** TCP_NODELAY state of the caller's socket (null when it could not be inspected). */
	noDelay: boolean | null;
}

/** AMQP queues/exchanges a node declared, so the orchestrator can delete them at the end. */
interface DeclaredNames {
	queues: string[];
	exchanges: string[];
}

type ParentMsg = { type: "run"; id: number; load: LoadSpec } | { type: "stop" };

type WorkerMsg =
	| { type: "ready" }
	| { type: "result"; id: number; sample: Sample }
	| { type: "stopped"; names: DeclaredNames }
	| { type: "error"; message: string };

const WORKER_ENV = "BROKER_BENCH_WORKER";
const DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672";

// ---------------------------------------------------------------------------------------------
// Payloads
// ---------------------------------------------------------------------------------------------

interface Product {
	id: string;
	sku: string;
	name: string;
	description: string;
	price: number; // minor units (cents), like the shop stores it
	currency: string;
	stock: number;
	category: string;
	createdAt: string;
	updatedAt: string;
}

const DESCRIPTION =
	"Solid oak dining chair with a hand-rubbed oil finish, curved backrest and woven " +
	"paper-cord seat. Assembled in Portugal from FSC-certified timber; each piece shows " +
	"unique grain. Wipe clean with a dry cloth only."; // ~200 chars

function makeProduct(i: number): Product {
	return {
		id: `6650f1c2a9e4b3d2c1${String(100000 + i)}`,
		sku: `CHR-OAK-${String(i).padStart(4, "0")}`,
		name: `Oak dining chair #${i}`,
		description: DESCRIPTION,
		price: 12990 + i,
		currency: "EUR",
		stock: 40 + (i % 7),
		category: "furniture/chairs",
		createdAt: "2025-01-14T09:21:33.000Z",
		updatedAt: "2025-03-02T17:45:10.000Z",
	};
}

function makePayload(name: PayloadName): unknown {
	switch (name) {
		case "small":
			return { id: 42, msg: "ping" };
		case "product":
			return makeProduct(1);
		case "product-list":
			return { items: Array.from({ length: 20 }, (_, i) => makeProduct(i)), total: 20 };
	}
}

// ---------------------------------------------------------------------------------------------
// Load generator (runs inside the caller worker)
// ---------------------------------------------------------------------------------------------

type CallFn = (params: unknown) => Promise<unknown>;

/** Nearest-rank percentile over an ascending array. */
function percentile(sorted: Float64Array, q: number): number {
	if (sorted.length === 0) return NaN;
	return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))];
}

function errorMessage(err: unknown): string {
	return err instanceof Error ? `${err.name}: ${err.message}` : String(err);
}

/**
 * Closed loop: `concurrency` virtual clients each issue one call at a time until the time
 * budget or the max count is reached. In-flight calls are awaited, and the elapsed time
 * includes them, so calls/s is completed calls over the real wall time.
 */
async function runLoad(call: CallFn, load: LoadSpec): Promise<Omit<Sample, "noDelay">> {
	const payload = makePayload(load.payload);
	const latencies = new Float64Array(load.maxCount);
	let started = 0;
	let completed = 0;
	let errors = 0;
	let firstError: string | undefined;
	const t0 = performance.now();
	const deadline = t0 + load.budgetMs;

	const client = async (): Promise<void> => {
		while (started < load.maxCount && performance.now() < deadline) {
			started++;
			const s = performance.now();
			try {
				await call(payload);
				latencies[completed++] = performance.now() - s;
			} catch (err) {
				errors++;
				firstError ??= errorMessage(err);
			}
		}
	};
	await Promise.all(Array.from({ length: load.concurrency }, client));

	const elapsedMs = performance.now() - t0;
	const sorted = latencies.subarray(0, completed).sort();
	return {
		completed,
		errors,
		elapsedMs,
		callsPerSec: (completed / elapsedMs) * 1000,
		p50Ms: percentile(sorted, 0.5),
		p99Ms: percentile(sorted, 0.99),
		firstError,
	};
}

// ---------------------------------------------------------------------------------------------
// Socket / channel introspection helpers (worker side)
// ---------------------------------------------------------------------------------------------

/**
 * Node keeps the TCP_NODELAY state in an internal `kSetNoDelay` symbol. Reading it is the
 * only way to check whether an option really reached the socket that a library created.
 */
function socketNoDelay(sock: unknown): boolean | null {
	if (!(sock instanceof net.Socket)) return null;
	const sym = Object.getOwnPropertySymbols(sock).find((s) => s.description === "kSetNoDelay");
	if (!sym) return null;
	return Boolean((sock as unknown as Record<symbol, unknown>)[sym]);
}

/** amqplib ChannelModel -> Connection -> net.Socket (`stream`), untyped in @types/amqplib. */
function amqplibSocket(model: unknown): unknown {
	const m = model as { connection?: { stream?: unknown } } | null | undefined;
	return m?.connection?.stream;
}

/** Socket of the broker's transporter: AMQP connection, or the first TCP writer socket. */
function brokerSocket(broker: ServiceBroker): unknown {
	const tx = broker.transit?.tx as unknown as {
		connection?: unknown;
		writer?: { sockets?: Map<string, unknown> };
	};
	if (tx.writer?.sockets) return tx.writer.sockets.values().next().value;
	return amqplibSocket(tx.connection);
}

interface AssertingChannel {
	assertQueue(name: string, ...rest: unknown[]): Promise<unknown>;
	assertExchange(name: string, ...rest: unknown[]): Promise<unknown>;
}

function isAssertingChannel(ch: unknown): ch is AssertingChannel {
	const c = ch as Partial<AssertingChannel> | null;
	return typeof c?.assertQueue === "function" && typeof c.assertExchange === "function";
}

/**
 * Moleculer never deletes its AMQP queues/exchanges (durable fanout exchanges stay forever),
 * and AMQP cannot list them. So we intercept the transporter's `channel` assignment and
 * record every name it declares, to delete them once all nodes are stopped.
 */
function recordDeclaredNames(transporter: object, names: Set<string>[]): void {
	const [queues, exchanges] = names;
	let current: unknown = null;
	Object.defineProperty(transporter, "channel", {
		configurable: true,
		enumerable: true,
		get: () => current,
		set: (ch: unknown) => {
			current = ch;
			if (!isAssertingChannel(ch)) return;
			const assertQueue = ch.assertQueue.bind(ch);
			const assertExchange = ch.assertExchange.bind(ch);
			ch.assertQueue = (name, ...rest) => {
				queues.add(name);
				return assertQueue(name, ...rest);
			};
			ch.assertExchange = (name, ...rest) => {
				exchanges.add(name);
				return assertExchange(name, ...rest);
			};
		},
	});
}

// ---------------------------------------------------------------------------------------------
// Nodes (worker side)
// ---------------------------------------------------------------------------------------------

interface BenchNode {
	call: CallFn;
	noDelay(): boolean | null;
	/** Everything declared on the broker so far (known even if stop() fails). */
	declared(): DeclaredNames;
	stop(): Promise<void>;
}

function notACaller(): Promise<unknown> {
	return Promise.reject(new Error("this node is a responder"));
}

async function startMoleculerNode(role: Role, spec: MoleculerNodeSpec): Promise<BenchNode> {
	const queues = new Set<string>();
	const exchanges = new Set<string>();
	let transporter: Transporters.Base | TransportSpec = spec.transporter;
	if (spec.transporter.type === "AMQP") {
		// An instance instead of a config object, so we can record what it declares.
		const Impl = spec.transporter.impl === "shop" ? ShopAmqpTransporter : Transporters.AMQP;
		const amqpTx = new Impl(spec.transporter.options);
		recordDeclaredNames(amqpTx, [queues, exchanges]);
		transporter = amqpTx;
	}

	const broker = new ServiceBroker({
		nodeID: spec.nodeID,
		namespace: spec.namespace,
		transporter,
		serializer: spec.serializer,
		logger: false,
		// No SIGINT/exit hooks: the orchestrator stops the node (see workerMain).
		skipProcessEventRegistration: true,
		// Long enough that a slow variant shows up as low calls/s, not as timeouts.
		requestTimeout: 60_000,
	});
	if (role === "responder") {
		broker.createService({
			name: "bench",
			actions: { echo: (ctx: Context<unknown>) => ctx.params },
		});
	}
	await broker.start();
	// Poll every 50 ms (default 1 s) so startup does not dominate a --smoke run.
	if (role === "caller") await broker.waitForServices("bench", 30_000, 50);

	return {
		call: role === "caller" ? (params) => broker.call("bench.echo", params) : notACaller,
		noDelay: () => socketNoDelay(brokerSocket(broker)),
		declared: () => ({ queues: [...queues], exchanges: [...exchanges] }),
		stop: () => broker.stop(),
	};
}

async function startRawNode(role: Role, spec: RawNodeSpec): Promise<BenchNode> {
	const model = await amqp.connect(spec.url, { noDelay: spec.noDelay });
	const ch = await model.createChannel();
	await ch.prefetch(spec.prefetch);
	// Both sides declare it (same arguments), so start order does not matter.
	await ch.assertQueue(spec.requestQueue, { durable: false, expires: 60_000 });
	const call = role === "responder" ? await serveRaw(ch, spec) : await rawCaller(ch, spec);

	return {
		call,
		noDelay: () => socketNoDelay(amqplibSocket(model)),
		declared: () => ({ queues: [spec.requestQueue], exchanges: [] }),
		stop: () => model.close(),
	};
}

/** Consume requests, echo the decoded params back to `replyTo`; ack each one (like Moleculer) or not at all. */
async function serveRaw(ch: amqp.Channel, spec: RawNodeSpec): Promise<CallFn> {
	await ch.consume(
		spec.requestQueue,
		(msg) => {
			if (!msg) return;
			const params: unknown = JSON.parse(msg.content.toString());
			ch.sendToQueue(msg.properties.replyTo as string, Buffer.from(JSON.stringify(params)), {
				correlationId: msg.properties.correlationId as string,
			});
			if (spec.ack) ch.ack(msg);
		},
		{ noAck: !spec.ack },
	);
	return notACaller;
}

/** Publish requests with replyTo + correlationId; replies arrive on an exclusive queue. */
async function rawCaller(ch: amqp.Channel, spec: RawNodeSpec): Promise<CallFn> {
	const { queue: replyQueue } = await ch.assertQueue("", { exclusive: true, durable: false });
	const pending = new Map<string, (body: unknown) => void>();
	let seq = 0;
	await ch.consume(
		replyQueue,
		(msg) => {
			const id = msg?.properties.correlationId as string | undefined;
			const resolve = id === undefined ? undefined : pending.get(id);
			if (!msg || !id || !resolve) return;
			pending.delete(id);
			resolve(JSON.parse(msg.content.toString()));
		},
		{ noAck: true },
	);
	return (params) =>
		new Promise((resolve) => {
			const id = String(++seq);
			pending.set(id, resolve);
			ch.sendToQueue(spec.requestQueue, Buffer.from(JSON.stringify(params)), {
				replyTo: replyQueue,
				correlationId: id,
			});
		});
}

function startNode(cfg: WorkerConfig): Promise<BenchNode> {
	return cfg.spec.kind === "raw" ? startRawNode(cfg.role, cfg.spec) : startMoleculerNode(cfg.role, cfg.spec);
}

// ---------------------------------------------------------------------------------------------
// Worker process
// ---------------------------------------------------------------------------------------------

function send(msg: WorkerMsg): void {
	// The orchestrator may be gone (killed); then there is nobody to tell.
	if (process.connected) process.send?.(msg);
}

/** Exit soon even if some library left a handle open; unref'd so a clean exit is not delayed. */
function exitSoon(code: number): void {
	process.exitCode = code;
	setTimeout(() => process.exit(code), 2_000).unref();
	if (process.connected) process.disconnect();
}

async function workerMain(cfg: WorkerConfig): Promise<void> {
	// Ctrl-C reaches the whole process group; the orchestrator decides when we stop, so
	// it can still collect our declared names and delete them.
	process.on("SIGINT", () => undefined);
	const node = await startNode(cfg);
	let stopping: Promise<void> | undefined;
	const stop = (): Promise<void> => (stopping ??= node.stop().catch(() => undefined));

	// Orchestrator gone without stopping us (killed): at least close the connection, so our
	// queues start their x-expires countdown instead of living on with a consumer.
	process.on("disconnect", () => {
		void stop().finally(() => exitSoon(0));
	});
	process.on("message", (msg: ParentMsg) => {
		if (msg.type === "run") {
			void runLoad(node.call, msg.load).then((s) => send({ type: "result", id: msg.id, sample: { ...s, noDelay: node.noDelay() } }));
		} else if (msg.type === "stop") {
			void stop().then(() => {
				send({ type: "stopped", names: node.declared() });
				exitSoon(0);
			});
		}
	});
	send({ type: "ready" });
}

function runWorker(raw: string): void {
	const cfg = JSON.parse(raw) as WorkerConfig;
	workerMain(cfg).catch((err: unknown) => {
		send({ type: "error", message: errorMessage(err) });
		exitSoon(1);
	});
}

// ---------------------------------------------------------------------------------------------
// Orchestrator: worker handles
// ---------------------------------------------------------------------------------------------

class Worker {
	private readonly child: ChildProcess;
	private runSeq = 0;
	private stopping: Promise<DeclaredNames> | undefined;

	constructor(
		readonly name: string,
		cfg: WorkerConfig,
	) {
		// Same binary and loader flags (tsx) as this process, so the .ts file runs as is.
		this.child = fork(__filename, [], {
			execPath: process.execPath,
			execArgv: process.execArgv,
			env: { ...process.env, [WORKER_ENV]: JSON.stringify(cfg) },
			stdio: ["ignore", "inherit", "inherit", "ipc"],
		});
		// send() to a dead child emits "error"; the exit/timeout paths below report it.
		this.child.on("error", () => undefined);
	}

	get alive(): boolean {
		return this.child.exitCode === null && this.child.signalCode === null;
	}

	/** Resolve with the next message of `type`; reject on worker error/exit or timeout. */
	private next<T extends WorkerMsg["type"]>(
		type: T,
		timeoutMs: number,
		accept: (m: Extract<WorkerMsg, { type: T }>) => boolean = () => true,
	): Promise<Extract<WorkerMsg, { type: T }>> {
		return new Promise((resolve, reject) => {
			if (!this.alive) return reject(new Error(`${this.name}: not running`));
			const cleanup = (): void => {
				clearTimeout(timer);
				this.child.off("message", onMessage);
				this.child.off("exit", onExit);
			};
			const fail = (reason: string): void => {
				cleanup();
				reject(new Error(`${this.name}: ${reason}`));
			};
			const onMessage = (m: WorkerMsg): void => {
				if (m.type === "error") return fail(m.message);
				if (m.type !== type) return;
				const typed = m as Extract<WorkerMsg, { type: T }>;
				if (!accept(typed)) return;
				cleanup();
				resolve(typed);
			};
			const onExit = (code: number | null): void => fail(`exited (code ${code})`);
			const timer = setTimeout(() => fail(`no "${type}" within ${timeoutMs} ms`), timeoutMs);
			this.child.on("message", onMessage);
			this.child.once("exit", onExit);
		});
	}

	ready(timeoutMs = 60_000): Promise<unknown> {
		return this.next("ready", timeoutMs);
	}

	async run(load: LoadSpec): Promise<Sample> {
		const id = ++this.runSeq;
		const reply = this.next("result", load.budgetMs + 90_000, (m) => m.id === id);
		this.child.send({ type: "run", id, load } satisfies ParentMsg);
		return (await reply).sample;
	}

	/** Graceful stop (idempotent); returns what the node declared. Kills it if it hangs. */
	stop(timeoutMs = 15_000): Promise<DeclaredNames> {
		this.stopping ??= this.stopOnce(timeoutMs);
		return this.stopping;
	}

	private async stopOnce(timeoutMs: number): Promise<DeclaredNames> {
		if (!this.alive) return { queues: [], exchanges: [] };
		const reply = this.next("stopped", timeoutMs);
		const exited = new Promise<void>((resolve) => this.child.once("exit", () => resolve()));
		this.child.send({ type: "stop" } satisfies ParentMsg);
		try {
			const { names } = await reply;
			await Promise.race([exited, sleep(5_000)]);
			return names;
		} finally {
			this.kill();
		}
	}

	kill(): void {
		if (this.alive) this.child.kill("SIGKILL");
	}
}

/** Unref'd: a pending grace period must not keep the orchestrator alive. */
function sleep(ms: number): Promise<void> {
	return new Promise((resolve) => setTimeout(resolve, ms).unref());
}

interface Pair {
	key: string;
	responder: Worker;
	caller: Worker;
}

/** Fork both nodes of a pair; the Moleculer caller waits for `bench` itself. */
function spawnPair(plan: PairPlan): Pair {
	return {
		key: plan.key,
		responder: new Worker(`${plan.key}/responder`, { role: "responder", spec: plan.responder }),
		caller: new Worker(`${plan.key}/caller`, { role: "caller", spec: plan.caller }),
	};
}

async function waitReady(pairs: Pair[]): Promise<void> {
	await Promise.all(pairs.flatMap((p) => [p.responder.ready(), p.caller.ready()]));
}

// ---------------------------------------------------------------------------------------------
// Orchestrator: variants and cases
// ---------------------------------------------------------------------------------------------

type TransportVariant =
	| "amqp-default"
	| "amqp-tuned"
	| "tcp"
	| "raw-amqplib"
	| "amqp-nodelay-only"
	| "amqp-prefetch-only"
	| "amqp-tuned-moleculer"
	| "raw-amqplib-noack";

interface PairPlan {
	key: string;
	responder: NodeSpec;
	caller: NodeSpec;
}

/** A transport variant measured sequentially and with N in flight. */
interface VariantDef {
	variant: TransportVariant;
	pair: PairPlan;
	/** Nagle on: ~40 ms per call when 1 in flight, so a short budget is plenty. */
	slowSequential: boolean;
	/** Prefetch 1 + Nagle: calls are serialised at ~40 ms each, 100 in flight take ~4 s to
	 * drain, so the warm-up of that case is skipped (the sequential one warms the pair). */
	slowConcurrent: boolean;
}

interface Case {
	group: "transport" | "serializer";
	pair: string;
	variant: TransportVariant;
	serializer: SerializerName;
	load: LoadSpec;
	warmup: boolean;
}

function getFreePort(): Promise<number> {
	return new Promise((resolve, reject) => {
		const srv = net.createServer();
		srv.once("error", reject);
		srv.listen(0, "127.0.0.1", () => {
			const { port } = srv.address() as net.AddressInfo;
			srv.close(() => resolve(port));
		});
	});
}

function tunedAmqp(url: string): AmqpOptions {
	return { url, prefetch: 100, socketOptions: { noDelay: true }, autoDeleteQueues: 60_000 };
}

function moleculerPair(key: string, runId: string, transporter: TransportSpec, serializer: SerializerName = "JSON"): PairPlan {
	// A unique namespace per variant and run: no cross-talk, no clash with queues of an
	// earlier run declared with other x-expires arguments (PRECONDITION_FAILED).
	const namespace = `${runId}-${key}`;
	const spec = (nodeID: string): MoleculerNodeSpec => ({
		kind: "moleculer",
		nodeID,
		namespace,
		transporter,
		serializer,
	});
	return { key, responder: spec(`${key}-responder`), caller: spec(`${key}-caller`) };
}

function amqpVariant(variant: TransportVariant, runId: string, options: AmqpOptions, impl: AmqpImpl = "moleculer"): VariantDef {
	const nagle = options.socketOptions?.noDelay !== true;
	return {
		variant,
		pair: moleculerPair(variant, runId, { type: "AMQP", impl, options }),
		slowSequential: nagle,
		slowConcurrent: nagle && (options.prefetch ?? 1) === 1,
	};
}

async function planVariants(url: string, runId: string, ablation: boolean): Promise<VariantDef[]> {
	const [rPort, cPort] = [await getFreePort(), await getFreePort()];
	// Static peer list: UDP multicast discovery is unreliable on loopback/containers.
	const tcpUrls = `127.0.0.1:${rPort}/tcp-responder,127.0.0.1:${cPort}/tcp-caller`;
	const raw: RawNodeSpec = {
		kind: "raw",
		url,
		requestQueue: `${runId}-raw.requests`,
		prefetch: 100,
		noDelay: true,
		ack: true,
	};
	const rawNoAck: RawNodeSpec = { ...raw, requestQueue: `${runId}-raw-noack.requests`, ack: false };
	const fast = { slowSequential: false, slowConcurrent: false };
	const variants: VariantDef[] = [
		amqpVariant("amqp-default", runId, { url }),
		amqpVariant("amqp-tuned", runId, tunedAmqp(url), "shop"),
		{
			variant: "tcp",
			pair: moleculerPair("tcp", runId, {
				type: "TCP",
				options: { udpDiscovery: false, urls: tcpUrls },
			}),
			...fast,
		},
		{ variant: "raw-amqplib", pair: { key: "raw-amqplib", responder: raw, caller: raw }, ...fast },
	];
	if (ablation) {
		// Which of the two knobs matters? One at a time.
		variants.push(
			amqpVariant("amqp-nodelay-only", runId, { url, socketOptions: { noDelay: true } }),
			amqpVariant("amqp-prefetch-only", runId, { url, prefetch: 100 }),
			// What the subclass (lib/amqp-transporter.ts) costs: Moleculer's own class with the same options.
			amqpVariant("amqp-tuned-moleculer", runId, tunedAmqp(url)),
			// What RabbitMQ gains when requests are not acknowledged (measured, not adopted: see docs/benchmarks.md).
			{
				variant: "raw-amqplib-noack",
				pair: { key: "raw-amqplib-noack", responder: rawNoAck, caller: rawNoAck },
				...fast,
			},
		);
	}
	return variants;
}

const SERIALIZER_PAIRS: [SerializerName, string][] = [
	["JSON", "amqp-tuned"], // same pair as the transport measurement
	["CBOR", "amqp-tuned-cbor"],
	["Notepack", "amqp-tuned-notepack"],
];

function serializerPairs(url: string, runId: string): PairPlan[] {
	return SERIALIZER_PAIRS.filter(([name]) => name !== "JSON").map(([name, key]) =>
		moleculerPair(key, runId, { type: "AMQP", impl: "shop", options: tunedAmqp(url) }, name),
	);
}

interface Budgets {
	budgetMs: number;
	/** For Nagle-bound sequential runs (a few dozen calls/s). */
	slowBudgetMs: number;
	warmupMs: number;
	rounds: number;
	concurrency: number;
	maxSequential: number;
	maxConcurrent: number;
	maxSlowInFlight: number;
}

function loadFor(b: Budgets, concurrency: number, payload: PayloadName, budgetMs = b.budgetMs): LoadSpec {
	return {
		concurrency,
		budgetMs,
		maxCount: concurrency === 1 ? b.maxSequential : b.maxConcurrent,
		payload,
	};
}

function transportCases(b: Budgets, v: VariantDef): Case[] {
	const base = {
		group: "transport",
		pair: v.pair.key,
		variant: v.variant,
		serializer: "JSON",
	} as const;
	// A serialised variant needs ~40 ms x in-flight just to drain; --smoke caps its in-flight.
	const inFlight = v.slowConcurrent ? Math.min(b.concurrency, b.maxSlowInFlight) : b.concurrency;
	return [
		{
			...base,
			load: loadFor(b, 1, "small", v.slowSequential ? b.slowBudgetMs : b.budgetMs),
			warmup: true,
		},
		{ ...base, load: loadFor(b, inFlight, "small"), warmup: !v.slowConcurrent },
	];
}

function serializerCases(b: Budgets, payload: PayloadName): Case[] {
	return SERIALIZER_PAIRS.map(([serializer, pair]) => ({
		group: "serializer",
		pair,
		variant: "amqp-tuned",
		serializer,
		load: loadFor(b, b.concurrency, payload),
		warmup: true,
	}));
}

function buildCases(b: Budgets, variants: VariantDef[]): Case[] {
	return [...variants.flatMap((v) => transportCases(b, v)), ...serializerCases(b, "product"), ...serializerCases(b, "product-list")];
}

function budgetsFor(opts: BrokerBenchOptions): Budgets {
	const smoke = opts.smoke === true;
	const budgetMs = opts.budgetMs ?? (smoke ? 200 : 2_500);
	return {
		budgetMs,
		slowBudgetMs: Math.min(budgetMs, smoke ? 200 : 1_500),
		warmupMs: smoke ? 100 : 500,
		rounds: opts.rounds ?? (smoke ? 1 : 3),
		concurrency: opts.concurrency ?? 100,
		maxSequential: smoke ? 500 : 50_000,
		maxConcurrent: smoke ? 5_000 : 500_000,
		maxSlowInFlight: smoke ? 10 : Number.POSITIVE_INFINITY,
	};
}

// ---------------------------------------------------------------------------------------------
// Orchestrator: measuring, aggregating
// ---------------------------------------------------------------------------------------------

function median(values: number[]): number {
	const v = values.filter((x) => !Number.isNaN(x)).sort((a, b) => a - b);
	if (v.length === 0) return NaN;
	const mid = Math.floor(v.length / 2);
	return v.length % 2 ? v[mid] : (v[mid - 1] + v[mid]) / 2;
}

/** Rotate the case order each round so no variant always runs first/last. */
function rotate<T>(items: T[], by: number): T[] {
	const k = by % items.length;
	return [...items.slice(k), ...items.slice(0, k)];
}

/** The caller of a pair; a dead node invalidates the comparison, so stop right there. */
function callerOf(pairs: Map<string, Pair>, key: string): Worker {
	const pair = pairs.get(key);
	if (!pair) throw new Error(`no node pair "${key}"`);
	const dead = [pair.responder, pair.caller].find((w) => !w.alive);
	if (dead) throw new Error(`${dead.name} is not running any more`);
	return pair.caller;
}

async function measure(cases: Case[], pairs: Map<string, Pair>, b: Budgets, log: (line: string) => void): Promise<Sample[][]> {
	const samples: Sample[][] = cases.map(() => []);
	log(`warm-up (${b.warmupMs} ms per case)`);
	for (const c of cases.filter((x) => x.warmup)) {
		const warmup = { ...c.load, budgetMs: Math.min(b.warmupMs, c.load.budgetMs) };
		await callerOf(pairs, c.pair).run(warmup);
	}
	for (let round = 0; round < b.rounds; round++) {
		log(`round ${round + 1}/${b.rounds}`);
		for (const c of rotate(cases, round * 3)) {
			const s = await callerOf(pairs, c.pair).run(c.load);
			samples[cases.indexOf(c)].push(s);
			log(`  ${caseLabel(c)}: ${s.callsPerSec.toFixed(0)} calls/s, ${s.errors} errors`);
		}
	}
	return samples;
}

function caseLabel(c: Case): string {
	const mode = c.load.concurrency === 1 ? "seq" : `${c.load.concurrency} in flight`;
	return c.group === "transport" ? `${c.variant} ${mode}` : `${c.variant} ${c.serializer} ${c.load.payload} ${mode}`;
}

/** Median over the measured rounds, plus the per-round rates to judge the noise. */
export interface Aggregate {
	callsPerSec: number;
	/** calls/s of each round, in round order. */
	roundCallsPerSec: number[];
	p50Ms: number;
	p99Ms: number;
	/** Summed over the measured rounds. */
	errors: number;
	calls: number;
	/** TCP_NODELAY on the caller's socket (null: not inspectable). */
	noDelay: boolean | null;
	firstError?: string;
}

export interface TransportRow extends Aggregate {
	variant: TransportVariant;
	inFlight: number;
}

export interface SerializerRow extends Aggregate {
	serializer: SerializerName;
	payload: PayloadName;
	payloadJsonBytes: number;
	inFlight: number;
	/** Median of the per-round ratios (each against JSON in the same round: less drift). */
	ratioToJson: number;
}

export interface BrokerBenchResult {
	meta: {
		date: string;
		node: string;
		moleculer: string;
		amqplib: string;
		rabbitmq: string;
		cpus: number;
		rounds: number;
		budgetMs: number;
		slowBudgetMs: number;
		warmupMs: number;
		smoke: boolean;
		runId: string;
	};
	transport: TransportRow[];
	serializers: SerializerRow[];
}

export interface BrokerBenchOptions {
	/** AMQP URL (default: $AMQP_URL or amqp://guest:guest@127.0.0.1:5672). */
	url?: string;
	/** Tiny measurements, one round: the whole run takes a few seconds. */
	smoke?: boolean;
	rounds?: number;
	/** Time budget per measurement (ms). */
	budgetMs?: number;
	/** In-flight calls for the concurrent measurements (default 100). */
	concurrency?: number;
	/** Also measure AMQP with only noDelay and with only prefetch 100. */
	ablation?: boolean;
	/** Progress lines (default: stderr). */
	log?: (line: string) => void;
}

function aggregate(samples: Sample[]): Aggregate {
	return {
		callsPerSec: median(samples.map((s) => s.callsPerSec)),
		roundCallsPerSec: samples.map((s) => s.callsPerSec),
		p50Ms: median(samples.map((s) => s.p50Ms)),
		p99Ms: median(samples.map((s) => s.p99Ms)),
		errors: samples.reduce((n, s) => n + s.errors, 0),
		calls: samples.reduce((n, s) => n + s.completed, 0),
		noDelay: samples.at(-1)?.noDelay ?? null,
		firstError: samples.find((s) => s.firstError)?.firstError,
	};
}

function toTransportRows(cases: Case[], samples: Sample[][]): TransportRow[] {
	return cases.flatMap((c, i) =>
		c.group === "transport" ? [{ variant: c.variant, inFlight: c.load.concurrency, ...aggregate(samples[i]) }] : [],
	);
}

function pairedRatio(rounds: number[], baseline: number[]): number {
	return median(rounds.map((v, r) => v / baseline[r]));
}

function toSerializerRows(cases: Case[], samples: Sample[][]): SerializerRow[] {
	const rows = cases.flatMap((c, i): SerializerRow[] =>
		c.group === "serializer"
			? [
					{
						serializer: c.serializer,
						payload: c.load.payload,
						payloadJsonBytes: Buffer.byteLength(JSON.stringify(makePayload(c.load.payload))),
						inFlight: c.load.concurrency,
						ratioToJson: NaN,
						...aggregate(samples[i]),
					},
				]
			: [],
	);
	for (const row of rows) {
		const json = rows.find((r) => r.payload === row.payload && r.serializer === "JSON");
		if (json) row.ratioToJson = pairedRatio(row.roundCallsPerSec, json.roundCallsPerSec);
	}
	return rows;
}

// ---------------------------------------------------------------------------------------------
// Orchestrator: broker checks and cleanup
// ---------------------------------------------------------------------------------------------

/** Fail fast if RabbitMQ is not there, and read its version for the report. */
async function rabbitVersion(url: string): Promise<string> {
	const model = await amqp.connect(url);
	try {
		const props = (model.connection as unknown as { serverProperties?: { version?: unknown } }).serverProperties;
		return String(props?.version ?? "unknown");
	} finally {
		await model.close();
	}
}

/**
 * Delete every queue/exchange the nodes declared. A failing delete closes the channel in
 * AMQP, so each name gets its own channel.
 */
async function deleteDeclared(url: string, names: DeclaredNames): Promise<number> {
	const model = await amqp.connect(url);
	model.on("error", () => undefined); // a channel error must not crash the orchestrator
	let deleted = 0;
	const del = async (fn: (ch: amqp.Channel) => Promise<unknown>): Promise<void> => {
		const ch = await model.createChannel();
		ch.on("error", () => undefined);
		try {
			await fn(ch);
			deleted++;
			await ch.close();
		} catch {
			// already gone (auto-delete/exclusive) or channel closed by the broker
		}
	};
	try {
		for (const q of new Set(names.queues)) await del((ch) => ch.deleteQueue(q));
		for (const e of new Set(names.exchanges)) await del((ch) => ch.deleteExchange(e));
	} finally {
		await model.close();
	}
	return deleted;
}

async function stopAll(pairs: Pair[]): Promise<DeclaredNames> {
	// Callers first, then responders: no node publishes to a node that is already gone.
	const stopSide = (side: "caller" | "responder"): Promise<DeclaredNames[]> =>
		Promise.all(pairs.map((p) => p[side].stop().catch((): DeclaredNames => ({ queues: [], exchanges: [] }))));
	const all = [...(await stopSide("caller")), ...(await stopSide("responder"))];
	return {
		queues: all.flatMap((n) => n.queues),
		exchanges: all.flatMap((n) => n.exchanges),
	};
}

function packageVersion(name: string): string {
	const file = require.resolve(`${name}/package.json`);
	return (JSON.parse(readFileSync(file, "utf8")) as { version: string }).version;
}

// ---------------------------------------------------------------------------------------------
// Public entry point
// ---------------------------------------------------------------------------------------------

export async function runBrokerBench(opts: BrokerBenchOptions = {}): Promise<BrokerBenchResult> {
	const url = opts.url ?? process.env.AMQP_URL ?? DEFAULT_URL;
	const t0 = performance.now();
	const sink = opts.log ?? ((line: string) => process.stderr.write(`${line}\n`));
	const log = (line: string): void => sink(`[broker-bench +${((performance.now() - t0) / 1000).toFixed(1)}s] ${line}`);
	const b = budgetsFor(opts);
	const runId = `bench-${Date.now().toString(36)}-${randomBytes(3).toString("hex")}`;
	const rabbitmq = await rabbitVersion(url);

	const variants = await planVariants(url, runId, opts.ablation === true);
	const plans = [...variants.map((v) => v.pair), ...serializerPairs(url, runId)];
	// Every worker is tracked from the moment it is forked, so `finally` stops them all.
	const started: Pair[] = plans.map(spawnPair);
	// One shutdown path for normal end, errors and Ctrl-C: stop every node gracefully, then
	// delete what they declared (a killed node would leave durable queues/exchanges behind).
	let shutdownPromise: Promise<void> | undefined;
	const shutdown = (): Promise<void> =>
		(shutdownPromise ??= (async () => {
			const names = await stopAll(started);
			const deleted = await deleteDeclared(url, names).catch(() => 0);
			log(`stopped ${started.length * 2} workers, deleted ${deleted} queues/exchanges`);
		})());
	let interrupted = false;
	const onSignal = (): void => {
		if (interrupted) return;
		interrupted = true;
		log("interrupted: stopping workers and cleaning up");
		void shutdown().finally(() => process.exit(130));
	};
	// `on`, not `once`: tsx relays the signal a second time, and with no listener left its
	// preflight hook would exit the process in the middle of the cleanup.
	process.on("SIGINT", onSignal);
	process.on("SIGTERM", onSignal);
	try {
		log(`started ${plans.length} node pairs (run ${runId}), waiting for them`);
		await waitReady(started);

		const pairs = new Map(started.map((p) => [p.key, p]));
		const cases = buildCases(b, variants);
		const samples = await measure(cases, pairs, b, log);
		return {
			meta: {
				date: new Date().toISOString(),
				node: process.version,
				moleculer: MOLECULER_VERSION,
				amqplib: packageVersion("amqplib"),
				rabbitmq,
				cpus: os.cpus().length,
				rounds: b.rounds,
				budgetMs: b.budgetMs,
				slowBudgetMs: b.slowBudgetMs,
				warmupMs: b.warmupMs,
				smoke: opts.smoke === true,
				runId,
			},
			transport: toTransportRows(cases, samples),
			serializers: toSerializerRows(cases, samples),
		};
	} finally {
		await shutdown();
		process.off("SIGINT", onSignal);
		process.off("SIGTERM", onSignal);
	}
}

// ---------------------------------------------------------------------------------------------
// Markdown output
// ---------------------------------------------------------------------------------------------

function fmt(n: number, digits = 0): string {
	return Number.isFinite(n) ? n.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits }) : "n/a";
}

function table(header: string[], rows: string[][]): string {
	const line = (cells: string[]): string => `| ${cells.join(" | ")} |`;
	const sep = header.map((_, i) => (i === 0 ? "---" : "---:"));
	return [line(header), line(sep), ...rows.map(line)].join("\n");
}

export function formatMarkdown(r: BrokerBenchResult): string {
	const m = r.meta;
	const head =
		`Node ${m.node}, moleculer ${m.moleculer}, amqplib ${m.amqplib}, RabbitMQ ${m.rabbitmq}, ` +
		`${m.cpus} CPUs; median of ${m.rounds} round(s), ${m.budgetMs} ms per measurement ` +
		`(Nagle-bound sequential: ${m.slowBudgetMs} ms), warm-up ${m.warmupMs} ms${m.smoke ? ", SMOKE" : ""}.`;

	const transport = table(
		["variant", "in flight", "calls/s", "rounds (calls/s)", "p50 ms", "p99 ms", "errors", "calls", "socket noDelay"],
		r.transport.map((t) => [
			t.variant,
			String(t.inFlight),
			fmt(t.callsPerSec),
			t.roundCallsPerSec.map((v) => fmt(v)).join(" / "),
			fmt(t.p50Ms, 2),
			fmt(t.p99Ms, 2),
			String(t.errors),
			String(t.calls),
			t.noDelay === null ? "n/a" : String(t.noDelay),
		]),
	);
	const serializers = table(
		["serializer", "payload", "JSON bytes", "in flight", "calls/s", "rounds (calls/s)", "vs JSON (paired)", "p50 ms", "p99 ms", "errors"],
		r.serializers.map((s) => [
			s.serializer,
			s.payload,
			String(s.payloadJsonBytes),
			String(s.inFlight),
			fmt(s.callsPerSec),
			s.roundCallsPerSec.map((v) => fmt(v)).join(" / "),
			`${fmt(s.ratioToJson, 2)}x`,
			fmt(s.p50Ms, 2),
			fmt(s.p99Ms, 2),
			String(s.errors),
		]),
	);
	const errors = [...r.transport, ...r.serializers]
		.filter((x) => x.firstError)
		.map((x) => `- ${"variant" in x ? x.variant : x.serializer}: ${x.firstError}`);
	return [
		"## Moleculer request/response (echo, small params)",
		"",
		head,
		"",
		transport,
		"",
		"## Serializers on amqp-tuned (echo of a realistic payload)",
		"",
		serializers,
		...(errors.length ? ["", "First errors:", ...errors] : []),
	].join("\n");
}

// ---------------------------------------------------------------------------------------------
// CLI
// ---------------------------------------------------------------------------------------------

function parseArgs(argv: string[]): BrokerBenchOptions & { json: boolean } {
	const value = (name: string): string | undefined => argv.find((a) => a.startsWith(`--${name}=`))?.slice(name.length + 3);
	const num = (name: string): number | undefined => {
		const v = value(name);
		return v === undefined ? undefined : Number(v);
	};
	return {
		smoke: argv.includes("--smoke"),
		json: argv.includes("--json"),
		ablation: argv.includes("--ablation"),
		url: value("url"),
		rounds: num("rounds"),
		budgetMs: num("budget-ms"),
		concurrency: num("concurrency"),
	};
}

async function cli(): Promise<void> {
	const { json, ...opts } = parseArgs(process.argv.slice(2));
	const result = await runBrokerBench(opts);
	process.stdout.write(`${formatMarkdown(result)}\n`);
	if (json) process.stdout.write(`\n${JSON.stringify(result, null, 2)}\n`);
}

const workerConfig = process.env[WORKER_ENV];
if (workerConfig) {
	runWorker(workerConfig);
} else if (require.main === module) {
	cli().catch((err: unknown) => {
		process.stderr.write(`broker bench failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
		process.exitCode = 1;
	});
}
