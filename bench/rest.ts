/**
 * REST benchmark: the cost of the transporter hop, through the gateway, side by side.
 *
 * Topologies (all on the same MongoDB-wire server, each in its own databases):
 *   in-process   every service in one process, no transporter (the ceiling)
 *   amqp-default gateway and services as separate processes over AMQP with Moleculer's defaults
 *                (prefetch 1, no TCP_NODELAY: AMQP_PREFETCH=1 AMQP_NO_DELAY=false)
 *   amqp-tuned   the same with this project's options (moleculer.config.ts)
 *   tcp          the same over Moleculer's TCP transporter, the reference a user would pick instead
 *
 * Scenarios (autocannon as a library, keep-alive, no pipelining), at 1 and at 50 connections:
 *   get-product  GET /api/products/:id, random ids of a seeded catalogue
 *   list         GET /api/products?category=…&sort=price&page=…
 *   order        POST /api/orders by many authenticated users, on a product with ample stock
 *
 * Every topology runs at once; each round measures every scenario on every topology in turn after a
 * warm-up, and the tables show the median round. Node CPU and peak RSS come from /proc.
 *
 *   npm run bench            (builds, then runs; under 10 minutes; writes docs/benchmarks.md)
 *   npm run bench -- --smoke (seconds, from the TypeScript sources; the test suite runs it)
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import autocannon from "autocannon";
import { seed } from "../scripts/seed";
import { formatMarkdown as formatBrokerMarkdown, runBrokerBench } from "./broker";

const ROOT = path.resolve(__dirname, "..");
/** Node arguments to run services: compiled output for the real run, TypeScript (tsx) for the smoke run. */
function nodeArgs(services: readonly string[], built: boolean): string[] {
	if (built) return ["dist/runner.js", "--config", "dist/moleculer.config.js", ...services.map((s) => `dist/services/${s}.service.js`)];
	return ["--import", "tsx", "runner.ts", "--config", "moleculer.config.ts", ...services.map((s) => `services/${s}.service.ts`)];
}
const ADMIN = { email: "bench-admin@shop.test", password: "bench-admin-password" };

export type TopologyName = "in-process" | "amqp-default" | "amqp-tuned" | "tcp";
export type ScenarioName = "get-product" | "list" | "order";

export interface RestBenchOptions {
	amqpUrl: string;
	mongoUri: string;
	smoke?: boolean;
	rounds?: number;
	durationSec?: number;
	topologies?: TopologyName[];
	log?: (line: string) => void;
}

interface Node {
	name: string;
	child: ChildProcess;
	output: string;
}

interface Topology {
	name: TopologyName;
	port: number;
	mongoPort: string;
	nodes: Node[];
	productIds: string[];
	categories: string[];
	/** Products with stock that will not run out, spread so orders do not all queue on one product. */
	orderProductIds: string[];
	tokens: string[];
}

export interface Measurement {
	topology: TopologyName;
	scenario: ScenarioName;
	connections: number;
	requestsPerSec: number;
	p50Ms: number;
	p99Ms: number;
	errors: number;
	/** CPU per node, in % of one core, over the measurement. */
	cpu: Record<string, number>;
	/** Peak resident memory per node (MiB), since the node started. */
	peakRssMiB: Record<string, number>;
}

const SERVICES = ["api", "users", "products", "orders"] as const;

function nodeEnv(t: { name: TopologyName; port: number }, opts: RestBenchOptions, tcpUrls: string): NodeJS.ProcessEnv {
	const base: NodeJS.ProcessEnv = {
		PATH: process.env.PATH,
		HOME: process.env.HOME,
		NODE_ENV: "production",
		JWT_SECRET: "benchmark-secret-benchmark-secret-0123456789",
		LOGLEVEL: "warn",
		NAMESPACE: `bench-${t.name}-${process.pid}`,
		MONGO_URI: opts.mongoUri,
		MONGO_DB_PREFIX: `bench-${t.name}-${process.pid}-`,
		PORT: String(t.port),
		ADMIN_EMAIL: ADMIN.email,
		ADMIN_PASSWORD: ADMIN.password,
		LOGIN_RATE_LIMIT_PER_MINUTE: "100000",
		// The in-process ceiling has no transporter; the others differ only in it.
		CIRCUIT_BREAKER_ENABLED: "false",
	};
	if (t.name === "amqp-default") return { ...base, TRANSPORTER: opts.amqpUrl, AMQP_PREFETCH: "1", AMQP_NO_DELAY: "false" };
	if (t.name === "amqp-tuned") return { ...base, TRANSPORTER: opts.amqpUrl };
	if (t.name === "tcp") return { ...base, TRANSPORTER: tcpUrls };
	return base;
}

function startNode(name: string, args: string[], env: NodeJS.ProcessEnv): Node {
	const child = spawn(process.execPath, args, { cwd: ROOT, env, stdio: ["ignore", "pipe", "pipe"] });
	const node: Node = { name, child, output: "" };
	child.stdout?.on("data", (d: Buffer) => (node.output += d.toString()));
	child.stderr?.on("data", (d: Buffer) => (node.output += d.toString()));
	child.once("exit", (code, signal) => {
		if (!stopping) process.stderr.write(`node ${name} exited (${code ?? signal}) during the benchmark:\n${node.output}\n`);
	});
	return node;
}

/** Set once the benchmark stops its nodes, so their exits are expected. */
let stopping = false;

async function waitReady(port: number, nodes: Node[], timeoutMs = 60_000): Promise<void> {
	const deadline = Date.now() + timeoutMs;
	while (Date.now() < deadline) {
		try {
			if ((await fetch(`http://127.0.0.1:${port}/api/health/ready`)).status === 200) return;
		} catch {
			// not listening yet
		}
		await new Promise((resolve) => setTimeout(resolve, 200));
	}
	throw new Error(`topology on port ${port} not ready:\n${nodes.map((n) => `--- ${n.name}\n${n.output}`).join("\n")}`);
}

async function json<T>(port: number, method: string, urlPath: string, body?: unknown, token?: string): Promise<T> {
	const res = await fetch(`http://127.0.0.1:${port}/api${urlPath}`, {
		method,
		headers: { "content-type": "application/json", ...(token ? { authorization: `Bearer ${token}` } : {}) },
		body: body === undefined ? undefined : JSON.stringify(body),
	});
	if (res.status >= 300) throw new Error(`${method} ${urlPath}: ${res.status} ${await res.text()}`);
	return (await res.json()) as T;
}

async function startTopology(name: TopologyName, port: number, opts: RestBenchOptions, tcpBasePort: number): Promise<Topology> {
	const ids = SERVICES.map((s) => `bench-${name}-${process.pid}-${s}`);
	const tcpUrls = SERVICES.map((_, i) => `127.0.0.1:${tcpBasePort + i}/${ids[i]}`).join(",");
	const env = nodeEnv({ name, port }, opts, `tcp://${tcpUrls}`);
	const built = !opts.smoke;
	const nodes =
		name === "in-process"
			? [startNode("all", nodeArgs(SERVICES, built), env)]
			: SERVICES.map((s, i) => startNode(s, nodeArgs([s], built), { ...env, NODE_ID: ids[i] }));
	await waitReady(port, nodes);

	const count = opts.smoke ? 24 : 300;
	await seed({ baseUrl: `http://127.0.0.1:${port}/api`, email: ADMIN.email, password: ADMIN.password, count });
	const productIds: string[] = [];
	const categories = new Set<string>();
	for (let page = 1; productIds.length < count; page++) {
		const list = await json<{ rows: Array<{ id: string; category: string }> }>(port, "GET", `/products?pageSize=100&page=${page}`);
		if (list.rows.length === 0) break;
		for (const row of list.rows) {
			productIds.push(row.id);
			categories.add(row.category);
		}
	}
	const { token: adminToken } = await json<{ token: string }>(port, "POST", "/users/login", ADMIN);
	const orderProductIds: string[] = [];
	for (let i = 0; i < 20; i++) {
		const ample = await json<{ id: string }>(
			port,
			"POST",
			"/products",
			{ name: `Bench stock ${i}`, price: 1_000, stock: 1_000_000_000 },
			adminToken,
		);
		orderProductIds.push(ample.id);
	}
	const users = opts.smoke ? 5 : 50;
	const tokens: string[] = [];
	for (let i = 0; i < users; i++) {
		const reg = await json<{ token: string }>(port, "POST", "/users/register", {
			email: `bench-user-${i}@shop.test`,
			password: "bench-password",
			name: `Bench ${i}`,
		});
		tokens.push(reg.token);
	}
	return {
		name,
		port,
		mongoPort: new URL(opts.mongoUri).port || "27017",
		nodes,
		productIds,
		categories: [...categories],
		orderProductIds,
		tokens,
	};
}

const pick = <T>(items: T[]): T => items[Math.floor(Math.random() * items.length)];

function requestFor(t: Topology, scenario: ScenarioName): autocannon.Request {
	if (scenario === "get-product") {
		return { method: "GET", setupRequest: (req) => ({ ...req, path: `/api/products/${pick(t.productIds)}` }) };
	}
	if (scenario === "list") {
		return {
			method: "GET",
			setupRequest: (req) => ({
				...req,
				path: `/api/products?category=${pick(t.categories)}&sort=price&page=${1 + Math.floor(Math.random() * 3)}&pageSize=20`,
			}),
		};
	}
	return {
		method: "POST",
		setupRequest: (req) => ({
			...req,
			path: "/api/orders",
			headers: { "content-type": "application/json", authorization: `Bearer ${pick(t.tokens)}` },
			body: JSON.stringify({ items: [{ productId: pick(t.orderProductIds), quantity: 1 }] }),
		}),
	};
}

/** utime+stime ticks and peak RSS of a process, from /proc. */
function procStats(pid: number, name: string): { ticks: number; peakRssKiB: number } {
	if (!existsSync(`/proc/${pid}/stat`)) throw new Error(`${name} (pid ${pid}) is gone`);
	const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
	const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
	const status = readFileSync(`/proc/${pid}/status`, "utf8");
	return { ticks: Number(fields[11]) + Number(fields[12]), peakRssKiB: Number(/VmHWM:\s+(\d+)/.exec(status)?.[1] ?? 0) };
}

const CLOCK_TICKS = 100;

/** Resident memory (KiB) of a process, 0 if it is gone. */
function rssKiB(pid: string): number {
	try {
		return Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1] ?? 0);
	} catch {
		return 0;
	}
}

/**
 * The shared servers, whose CPU is part of each topology's cost: the RabbitMQ server (the largest
 * beam.smp: rabbitmqctl runs a short-lived one too) and the FerretDB on the benchmark's port.
 */
function serverPids(mongoPort: string): Record<string, number> {
	const found: Record<string, number> = {};
	let rabbitRss = 0;
	for (const entry of readdirSync("/proc")) {
		if (!/^\d+$/.test(entry)) continue;
		try {
			const comm = readFileSync(`/proc/${entry}/comm`, "utf8").trim();
			if (comm === "beam.smp" && rssKiB(entry) > rabbitRss) {
				rabbitRss = rssKiB(entry);
				found.rabbitmq = Number(entry);
			}
			const ferretdbOnOurPort = comm.startsWith("ferretdb") && readFileSync(`/proc/${entry}/cmdline`, "utf8").includes(`:${mongoPort}`);
			if (ferretdbOnOurPort) found.ferretdb = Number(entry);
		} catch {
			// the process ended meanwhile
		}
	}
	return found;
}

async function measure(t: Topology, scenario: ScenarioName, connections: number, durationSec: number): Promise<Measurement> {
	const watched = [
		...t.nodes.map((n) => ({ name: n.name, pid: n.child.pid! })),
		...Object.entries(serverPids(t.mongoPort)).map(([name, pid]) => ({ name, pid })),
	];
	const before = watched.map((w) => procStats(w.pid, w.name));
	const started = Date.now();
	const result = await autocannon({
		url: `http://127.0.0.1:${t.port}`,
		connections,
		pipelining: 1,
		duration: durationSec,
		requests: [requestFor(t, scenario)],
	});
	const elapsedSec = (Date.now() - started) / 1000;
	const after = watched.map((w) => procStats(w.pid, w.name));
	return {
		topology: t.name,
		scenario,
		connections,
		// Total over the measured time: the per-second average misses short runs.
		requestsPerSec: result.requests.total / result.duration,
		p50Ms: result.latency.p50,
		p99Ms: result.latency.p99,
		errors: result.errors + result.timeouts + result.non2xx,
		cpu: Object.fromEntries(
			watched.map((w, i) => [w.name, Math.round(((after[i].ticks - before[i].ticks) / CLOCK_TICKS / elapsedSec) * 100)]),
		),
		peakRssMiB: Object.fromEntries(t.nodes.map((n, i) => [n.name, Math.round(after[i].peakRssKiB / 1024)])),
	};
}

/**
 * Orders queue up behind the database: when autocannon stops, the services still work through what
 * was sent. Wait until an uncached read through the whole path is fast again, so the backlog does not
 * land in the next measurement.
 */
async function drain(t: Topology, deadlineMs = 60_000): Promise<void> {
	const deadline = Date.now() + deadlineMs;
	while (Date.now() < deadline) {
		const started = Date.now();
		await fetch(`http://127.0.0.1:${t.port}/api/products?pageSize=1&search=drain${started}`);
		if (Date.now() - started < 100) return;
		await new Promise((resolve) => setTimeout(resolve, 500));
	}
}

async function stopTopology(t: Topology): Promise<void> {
	await Promise.all(
		t.nodes.map(
			(n) =>
				new Promise<void>((resolve) => {
					if (n.child.exitCode !== null) return resolve();
					n.child.once("exit", () => resolve());
					n.child.kill("SIGTERM");
				}),
		),
	);
}

const median = (values: number[]): number => {
	const sorted = [...values].sort((a, b) => a - b);
	return sorted[Math.floor((sorted.length - 1) / 2)];
};

export interface RestBenchResult {
	machine: string;
	rounds: number;
	durationSec: number;
	rows: Measurement[];
}

export async function runRestBench(opts: RestBenchOptions): Promise<RestBenchResult> {
	const log = opts.log ?? ((line: string) => process.stderr.write(`${line}\n`));
	const names = opts.topologies ?? (opts.smoke ? ["in-process", "amqp-tuned"] : ["in-process", "amqp-default", "amqp-tuned", "tcp"]);
	const rounds = opts.rounds ?? (opts.smoke ? 1 : 3);
	// Long enough for 50 concurrent orders on a slow database to complete.
	const durationSec = opts.durationSec ?? 3;
	const scenarios: ScenarioName[] = ["get-product", "list", "order"];
	const connectionCounts = [1, 50];

	const basePort = 41_000 + (process.pid % 1_000) * 10;
	const topologies: Topology[] = [];
	try {
		// Started side by side (seeding amqp-default alone takes a minute); measured one at a time below.
		log(`starting ${names.join(", ")} …`);
		const started = await Promise.allSettled(
			names.map((name, i) => startTopology(name, basePort + i, opts, 45_000 + (process.pid % 1_000) * 10 + i * 4)),
		);
		for (const result of started) if (result.status === "fulfilled") topologies.push(result.value);
		const failed = started.find((result) => result.status === "rejected");
		if (failed) throw failed.reason;
		const samples: Measurement[] = [];
		for (const t of topologies) await measure(t, "get-product", 10, 1); // warm-up (JIT, caches, pools)
		for (let round = 1; round <= rounds; round++) {
			for (const scenario of scenarios) {
				for (const connections of connectionCounts) {
					for (const t of topologies) {
						const m = await measure(t, scenario, connections, durationSec);
						await drain(t);
						log(
							`round ${round} ${t.name} ${scenario} c=${connections}: ${Math.round(m.requestsPerSec)} req/s p99 ${m.p99Ms} ms errors ${m.errors}`,
						);
						samples.push(m);
					}
				}
			}
		}
		const rows: Measurement[] = [];
		for (const t of topologies) {
			for (const scenario of scenarios) {
				for (const connections of connectionCounts) {
					const mine = samples.filter((s) => s.topology === t.name && s.scenario === scenario && s.connections === connections);
					const byRate = [...mine].sort((a, b) => a.requestsPerSec - b.requestsPerSec);
					const mid = byRate[Math.floor((byRate.length - 1) / 2)];
					rows.push({
						...mid,
						requestsPerSec: median(mine.map((s) => s.requestsPerSec)),
						p50Ms: median(mine.map((s) => s.p50Ms)),
						p99Ms: median(mine.map((s) => s.p99Ms)),
						errors: mine.reduce((sum, s) => sum + s.errors, 0),
					});
				}
			}
		}
		return { machine: machineLine(), rounds, durationSec, rows };
	} finally {
		stopping = true;
		await Promise.all(topologies.map(stopTopology));
	}
}

function machineLine(): string {
	const cpus = os.cpus();
	return `${cpus.length} × ${cpus[0]?.model ?? "CPU"}, ${Math.round(os.totalmem() / 2 ** 30)} GiB, ${os.type()} ${os.release()}, Node ${process.version}`;
}

export function formatRestMarkdown(r: RestBenchResult): string {
	const inProcess = (m: Measurement) =>
		r.rows.find((x) => x.topology === "in-process" && x.scenario === m.scenario && x.connections === m.connections);
	const lines = [
		`Machine: ${r.machine}. Median of ${r.rounds} round(s) of ${r.durationSec} s per measurement, topologies alternated.`,
		"",
		"| scenario | conns | topology | req/s | × in-process | p50 ms | p99 ms | p99 × in-process | errors | CPU % per process (nodes, RabbitMQ, FerretDB) | peak RSS MiB per node |",
		"| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
	];
	for (const m of r.rows) {
		const base = inProcess(m);
		const ratio = base ? (m.requestsPerSec / base.requestsPerSec).toFixed(2) : "–";
		const p99Ratio = base && base.p99Ms > 0 ? (m.p99Ms / base.p99Ms).toFixed(2) : "–";
		const fmt = (rec: Record<string, number>) =>
			Object.entries(rec)
				.map(([k, v]) => `${k} ${v}`)
				.join(", ");
		lines.push(
			`| ${m.scenario} | ${m.connections} | ${m.topology} | ${Math.round(m.requestsPerSec)} | ${ratio} | ${m.p50Ms} | ${m.p99Ms} | ${p99Ratio} | ${m.errors} | ${fmt(m.cpu)} | ${fmt(m.peakRssMiB)} |`,
		);
	}
	return lines.join("\n");
}

async function main(): Promise<void> {
	const smoke = process.argv.includes("--smoke");
	const amqpUrl = process.env.TEST_AMQP_URL ?? process.env.AMQP_URL ?? "amqp://guest:guest@127.0.0.1:5672";
	const mongoUri = process.env.TEST_MONGO_URI ?? process.env.MONGO_URI ?? "mongodb://127.0.0.1:27017";
	const rest = await runRestBench({ amqpUrl, mongoUri, smoke });
	// 2 s per broker-level measurement keeps the whole run under ten minutes.
	const broker = await runBrokerBench({ url: amqpUrl, smoke, budgetMs: smoke ? undefined : 2_000 });
	const restTable = formatRestMarkdown(rest);
	const brokerTable = formatBrokerMarkdown(broker);
	console.log(`## REST through the gateway\n\n${restTable}\n\n${brokerTable}`);
	if (!smoke) {
		const file = path.join(ROOT, "docs/benchmarks.md");
		const previous = readFileSync(file, "utf8");
		const marker = "<!-- bench:results -->";
		const [head] = previous.split(marker);
		writeFileSync(
			file,
			`${head}${marker}\n\nRun of ${new Date().toISOString()}.\n\n## REST through the gateway\n\n${restTable}\n\n${brokerTable}\n`,
		);
		console.log(`\nWritten to ${path.relative(ROOT, file)}.`);
	}
}

if (require.main === module) {
	main().catch((err: Error) => {
		console.error(err);
		process.exit(1);
	});
}
