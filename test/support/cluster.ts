import { spawn, type ChildProcess } from "node:child_process";
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
