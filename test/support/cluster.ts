import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import path from "node:path";
import { eventually } from "./eventually";
import type { Infra } from "./infra";

const ROOT = path.resolve(__dirname, "../..");
const RUNNER = path.join(ROOT, "runner.ts");

export interface NodeProcess {
	name: string;
	child: ChildProcess;
	output: () => string;
	/** Sends SIGTERM and resolves with the exit code once the process is gone. */
	stop(signal?: NodeJS.Signals): Promise<number | null>;
}

export interface ClusterOptions {
	infra: Infra;
	namespace: string;
	/** Extra environment for every node (admin seed, timeouts …). */
	env?: Record<string, string>;
}

/**
 * Starts Moleculer nodes as separate OS processes (TypeScript through tsx), connected only through
 * RabbitMQ and each reading and writing its own MongoDB database, like `SERVICES=… npm start` does.
 */
export class Cluster {
	readonly nodes: NodeProcess[] = [];
	readonly port = 20_000 + Math.floor(Math.random() * 20_000);
	readonly baseUrl = `http://127.0.0.1:${this.port}/api`;

	constructor(private readonly opts: ClusterOptions) {}

	env(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
		return {
			PATH: process.env.PATH,
			HOME: process.env.HOME,
			NODE_ENV: "test",
			LOGLEVEL: process.env.TEST_LOGLEVEL ?? "warn",
			TRANSPORTER: this.opts.infra.amqpUrl,
			MONGO_URI: this.opts.infra.mongoUri,
			MONGO_DB_PREFIX: `${this.opts.namespace}-`,
			// The durable event queues of a test namespace go away once its nodes are gone.
			EVENTS_QUEUE_EXPIRES_MS: "600000",
			NAMESPACE: this.opts.namespace,
			PORT: String(this.port),
			...this.opts.env,
			...extra,
		};
	}

	start(service: string, extraEnv: Record<string, string> = {}): NodeProcess {
		const name = `${service}-${this.nodes.filter((n) => n.name.startsWith(service)).length + 1}`;
		const child = spawn(
			process.execPath,
			["--import", "tsx", RUNNER, "--config", "moleculer.config.ts", `services/${service}.service.ts`],
			{ cwd: ROOT, env: this.env({ NODE_ID: `${this.opts.namespace}-${name}`, ...extraEnv }), stdio: ["ignore", "pipe", "pipe"] },
		);
		let output = "";
		child.stdout?.on("data", (d: Buffer) => (output += d.toString()));
		child.stderr?.on("data", (d: Buffer) => (output += d.toString()));
		const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
		const node: NodeProcess = {
			name,
			child,
			output: () => output,
			async stop(signal: NodeJS.Signals = "SIGTERM") {
				if (child.exitCode === null && child.signalCode === null) child.kill(signal);
				return exited;
			},
		};
		this.nodes.push(node);
		return node;
	}

	/** Gateway, users, products and orders, each in its own process; resolves when the gateway is ready. */
	async startAll(): Promise<void> {
		for (const service of ["api", "users", "products", "orders"]) this.start(service);
		await this.waitReady();
	}

	async waitReady(timeoutMs = 45_000): Promise<void> {
		await eventually(
			async () => {
				const res = await fetch(`${this.baseUrl}/health/ready`);
				return res.status === 200 ? true : undefined;
			},
			timeoutMs,
			250,
		).catch((err: Error) => {
			throw new Error(`${err.message}\n${this.nodes.map((n) => `--- ${n.name}\n${n.output()}`).join("\n")}`);
		});
	}

	async stopAll(): Promise<void> {
		await Promise.all(this.nodes.map((n) => n.stop()));
	}
}

export interface HttpResult<T = unknown> {
	status: number;
	body: T;
	headers: Headers;
}

/** A tiny JSON client for the gateway. */
export async function http<T = Record<string, unknown>>(
	baseUrl: string,
	method: string,
	urlPath: string,
	opts: { token?: string; body?: unknown; headers?: Record<string, string>; raw?: string } = {},
): Promise<HttpResult<T>> {
	const headers: Record<string, string> = { ...opts.headers };
	if (opts.token) headers.authorization = `Bearer ${opts.token}`;
	let body: string | undefined = opts.raw;
	if (opts.body !== undefined) {
		headers["content-type"] ??= "application/json";
		body = JSON.stringify(opts.body);
	}
	const res = await fetch(`${baseUrl}${urlPath}`, { method, headers, body });
	const text = await res.text();
	return { status: res.status, body: (text ? JSON.parse(text) : null) as T, headers: res.headers };
}

const TSC = path.join(ROOT, "node_modules/typescript/bin/tsc");
let built = false;

/** Compiles the services to dist/ once per test process, as `npm run build` does. */
export function buildDist(): void {
	if (built) return;
	const out = spawnSync(process.execPath, [TSC, "-p", "tsconfig.build.json"], { cwd: ROOT, encoding: "utf8", timeout: 120_000 });
	if (out.status !== 0) throw new Error(`npm run build failed:\n${out.stdout}${out.stderr}`);
	built = true;
}

export interface ScriptClusterOptions {
	infra: Infra;
	namespace: string;
	/** Replicas per service; the gateway is one node. */
	replicas: { users: number; products: number; orders: number };
	env?: Record<string, string>;
}

/**
 * `scripts/cluster.ts` (`npm run cluster`) on the built output, with a Prometheus port per node,
 * driven through its standard input (`stop products-1`, `restart products-1` …). Call `buildDist` first.
 */
export class ScriptCluster {
	readonly port = 40_000 + Math.floor(Math.random() * 10_000);
	readonly baseUrl = `http://127.0.0.1:${this.port}/api`;
	readonly child: ChildProcess;
	private out = "";
	private readonly exited: Promise<number | null>;

	constructor(private readonly opts: ScriptClusterOptions) {
		const { users, products, orders } = opts.replicas;
		const args = ["--users", users, "--products", products, "--orders", orders, "--port", this.port, "--metrics-port", this.port + 1];
		this.child = spawn(process.execPath, ["--import", "tsx", "scripts/cluster.ts", ...args.map(String)], {
			cwd: ROOT,
			env: {
				PATH: process.env.PATH,
				HOME: process.env.HOME,
				NODE_ENV: "test",
				// Info level: the tests follow nodes starting and stopping, and catch any ERROR line among them.
				LOGLEVEL: "info",
				TRANSPORTER: opts.infra.amqpUrl,
				MONGO_URI: opts.infra.mongoUri,
				MONGO_DB_PREFIX: `${opts.namespace}-`,
				EVENTS_QUEUE_EXPIRES_MS: "600000",
				NAMESPACE: opts.namespace,
				NODE_ID_PREFIX: opts.namespace,
				...opts.env,
			},
			stdio: ["pipe", "pipe", "pipe"],
		});
		this.child.stdout?.on("data", (d: Buffer) => (this.out += d.toString()));
		this.child.stderr?.on("data", (d: Buffer) => (this.out += d.toString()));
		this.exited = new Promise((resolve) => this.child.once("exit", (code) => resolve(code)));
	}

	/** Everything the script printed so far (from `offset` on: pass an earlier `output().length`). */
	output(offset = 0): string {
		return this.out.slice(offset);
	}

	/** The lines one node printed (from `offset` on), without their `[name] ` prefix. */
	nodeLines(name: string, offset = 0): string[] {
		const prefix = `[${name}] `;
		return this.output(offset)
			.split("\n")
			.filter((line) => line.startsWith(prefix))
			.map((line) => line.slice(prefix.length));
	}

	nodeID(name: string): string {
		return `${this.opts.namespace}-${name}`;
	}

	/** The node's Prometheus port, from the script's start line of the node. */
	metricsPort(name: string): number {
		const starts = [...this.out.matchAll(new RegExp(`^\\[cluster\\] ${name} started: .* METRICS_PORT=(\\d+)$`, "gm"))];
		if (starts.length === 0) throw new Error(`${name} was never started`);
		return Number(starts[starts.length - 1][1]);
	}

	/** One control line: `stop|kill|start|restart <node>`, `status`. */
	send(command: string): void {
		this.child.stdin?.write(`${command}\n`);
	}

	/** Waits until the output from `offset` on matches. */
	async waitFor(pattern: RegExp, offset = 0, timeoutMs = 45_000): Promise<RegExpMatchArray> {
		return eventually(async () => this.output(offset).match(pattern) ?? undefined, timeoutMs, 100).catch((err: Error) => {
			throw new Error(`${err.message}: waiting for ${pattern} in\n${this.output(offset).slice(-20_000)}`);
		});
	}

	/** `start <node>`, resolved once the node's broker has started (and so announced its services). */
	async startNode(name: string): Promise<void> {
		const offset = this.out.length;
		this.send(`start ${name}`);
		await this.waitFor(new RegExp(`^\\[${name}\\] .*ServiceBroker with \\d+ service\\(s\\) started successfully`, "m"), offset);
	}

	/** `stop <node>` (SIGTERM) or `kill <node>` (SIGKILL); resolves with how it ended, as the script reports it. */
	async stopNode(name: string, command: "stop" | "kill" = "stop"): Promise<string> {
		const offset = this.out.length;
		this.send(`${command} ${name}`);
		return (await this.waitFor(new RegExp(`^\\[cluster\\] ${name} \\(pid \\d+\\) (.*)$`, "m"), offset))[1];
	}

	async waitReady(timeoutMs = 60_000): Promise<void> {
		await this.waitFor(/^\[cluster\] ready: /m, 0, timeoutMs);
	}

	/** SIGTERM to the script, which stops every node; resolves with the script's exit code. */
	async stop(): Promise<number | null> {
		if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill("SIGTERM");
		return this.exited;
	}
}
