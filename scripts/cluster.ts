/**
 * The docker-compose topology without Docker: one OS process per Moleculer node, all from the built
 * output (`dist/`), connected through RabbitMQ and MongoDB.
 *
 *   npm run cluster -- --products 3 --port 3000 --metrics-port 3030
 *
 * Every node's output is prefixed with its name. Ctrl-C (SIGINT) or SIGTERM stops every node
 * gracefully and exits when they have all exited. Lines on standard input control single nodes while
 * the cluster runs: `stop products-1`, `kill products-1` (SIGKILL, a crash), `start products-1`,
 * `restart products-1` (SIGTERM, wait for the exit, start again: a rolling restart step), `status`.
 */
import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";
import { parseArgs } from "node:util";

const ROOT = path.resolve(__dirname, "..");
/** moleculer-runner without its environment overrides of the config (runner.ts), as `npm start` runs it. */
const RUNNER = path.join(ROOT, "dist/runner.js");
/** Stops a node when this script dies without the chance to stop it (SIGKILL, crash). */
const EXIT_WITH_PARENT = path.join(ROOT, "scripts/exit-with-parent.cjs");
const SERVICES = ["api", "users", "products", "orders"] as const;
/** A node still running this long after SIGTERM is killed: longer than a node's own shutdown timeout. */
const FORCE_KILL_AFTER_MS = 30_000;
const READY_TIMEOUT_MS = 60_000;

const USAGE = `Usage: tsx scripts/cluster.ts [--api N] [--users N] [--products N] [--orders N] [--port PORT] [--metrics-port PORT]
  --api, --users, --products, --orders   replicas of each service (default 1 each)
  --port           the gateway's HTTP port (default: $PORT or 3000); with --api N > 1 the gateways use PORT, PORT+1, …
  --metrics-port   Prometheus metrics: node i (in start order, from 0) listens on this port + i (default: off)
TRANSPORTER and MONGO_URI default to the local RabbitMQ and MongoDB; every other variable is passed to the nodes.`;

interface NodeSpec {
	name: string;
	service: (typeof SERVICES)[number];
	env: Record<string, string>;
}

interface RunningNode {
	child: ChildProcess;
	exited: Promise<void>;
	/** Set when this script asked the node to stop, so its exit is expected. */
	stopping: boolean;
}

function log(message: string): void {
	process.stdout.write(`[cluster] ${message}\n`);
}

function count(value: string | undefined, flag: string): number {
	const n = Number(value ?? "1");
	if (!Number.isInteger(n) || n < 0 || n > 20) throw new Error(`--${flag} must be an integer from 0 to 20, got "${value}"`);
	return n;
}

function port(value: string | undefined, flag: string): number | null {
	if (value === undefined) return null;
	const n = Number(value);
	if (!Number.isInteger(n) || n < 1 || n > 65535) throw new Error(`--${flag} must be a port number, got "${value}"`);
	return n;
}

function plan(argv: string[]): { specs: NodeSpec[]; gatewayUrl: string | null } {
	const { values } = parseArgs({
		args: argv,
		options: {
			api: { type: "string" },
			users: { type: "string" },
			products: { type: "string" },
			orders: { type: "string" },
			port: { type: "string" },
			"metrics-port": { type: "string" },
			help: { type: "boolean", short: "h" },
		},
		strict: true,
	});
	if (values.help) {
		process.stdout.write(`${USAGE}\n`);
		process.exit(0);
	}
	const httpPort = port(values.port, "port") ?? Number(process.env.PORT ?? 3000);
	const metricsPort = port(values["metrics-port"], "metrics-port");
	const prefix = process.env.NODE_ID_PREFIX ?? os.hostname();
	const specs: NodeSpec[] = [];
	for (const service of SERVICES) {
		const replicas = count(values[service], service);
		for (let i = 1; i <= replicas; i++) {
			const env: Record<string, string> = { SERVICES: service, NODE_ID: `${prefix}-${service}-${i}` };
			if (service === "api") env.PORT = String(httpPort + i - 1);
			if (metricsPort !== null) env.METRICS_PORT = String(metricsPort + specs.length);
			specs.push({ name: `${service}-${i}`, service, env });
		}
	}
	return { specs, gatewayUrl: specs.some((s) => s.service === "api") ? `http://127.0.0.1:${httpPort}/api` : null };
}

class Cluster {
	private readonly nodes = new Map<string, RunningNode>();
	private shuttingDown = false;

	constructor(
		private readonly specs: NodeSpec[],
		private readonly baseEnv: NodeJS.ProcessEnv,
	) {}

	start(name: string): void {
		if (this.shuttingDown) return;
		const spec = this.specs.find((s) => s.name === name);
		if (!spec) return log(`no node named ${name}; nodes: ${this.specs.map((s) => s.name).join(", ")}`);
		if (this.nodes.has(name)) return log(`${name} is already running`);
		const child = spawn(process.execPath, ["--require", EXIT_WITH_PARENT, RUNNER, "--config", "dist/moleculer.config.js"], {
			cwd: ROOT,
			env: { ...this.baseEnv, SERVICEDIR: "dist/services", ...spec.env },
			// Own process group: a terminal's Ctrl-C reaches only this script, which stops each node once.
			detached: true,
			stdio: ["ignore", "pipe", "pipe", "ipc"],
		});
		for (const stream of [child.stdout, child.stderr]) {
			readline.createInterface({ input: stream! }).on("line", (line) => process.stdout.write(`[${name}] ${line}\n`));
		}
		const node: RunningNode = {
			child,
			stopping: false,
			exited: new Promise((resolve) => {
				child.once("exit", (code, signal) => {
					this.nodes.delete(name);
					const how = signal ? `killed by ${signal}` : `exited with code ${code}`;
					log(`${name} (pid ${child.pid}) ${how}${node.stopping ? "" : ", unexpectedly"}`);
					resolve();
					if (!this.shuttingDown && this.nodes.size === 0) {
						log("every node has exited");
						process.exit(node.stopping ? 0 : 1);
					}
				});
			}),
		};
		this.nodes.set(name, node);
		const extras = Object.entries(spec.env)
			.filter(([key]) => key === "PORT" || key === "METRICS_PORT")
			.map(([key, value]) => ` ${key}=${value}`)
			.join("");
		log(`${name} started: pid ${child.pid}, nodeID ${spec.env.NODE_ID}${extras}`);
	}

	/** Resolves when the node has exited; SIGKILL after FORCE_KILL_AFTER_MS. */
	async stop(name: string, signal: NodeJS.Signals = "SIGTERM"): Promise<void> {
		const node = this.nodes.get(name);
		if (!node) return log(`${name} is not running`);
		node.stopping = true;
		node.child.kill(signal);
		const force = setTimeout(() => {
			log(`${name} still running ${FORCE_KILL_AFTER_MS} ms after ${signal}: SIGKILL`);
			node.child.kill("SIGKILL");
		}, FORCE_KILL_AFTER_MS);
		await node.exited;
		clearTimeout(force);
	}

	async restart(name: string): Promise<void> {
		await this.stop(name);
		this.start(name);
	}

	status(): void {
		for (const spec of this.specs) {
			const node = this.nodes.get(spec.name);
			log(`${spec.name}: ${node ? `running, pid ${node.child.pid}` : "stopped"}`);
		}
	}

	async shutdown(signal: NodeJS.Signals): Promise<void> {
		if (this.shuttingDown) return;
		this.shuttingDown = true;
		log(`${signal}: stopping ${this.nodes.size} node(s)`);
		const unclean: string[] = [];
		await Promise.all(
			[...this.nodes.keys()].map(async (name) => {
				const child = this.nodes.get(name)!.child;
				await this.stop(name);
				if (child.exitCode !== 0) unclean.push(name);
			}),
		);
		log(unclean.length === 0 ? "every node stopped cleanly" : `not stopped cleanly: ${unclean.join(", ")}`);
		process.exit(unclean.length === 0 ? 0 : 1);
	}

	async command(line: string): Promise<void> {
		const [verb, name] = line.trim().split(/\s+/);
		if (!verb || this.shuttingDown) return;
		if (verb === "status") return this.status();
		if (!name) return log(`usage: ${verb} <node>`);
		if (verb === "start") return this.start(name);
		if (verb === "stop") return this.stop(name);
		if (verb === "kill") return this.stop(name, "SIGKILL");
		if (verb === "restart") return this.restart(name);
		log(`unknown command "${verb}": start | stop | kill | restart <node>, status`);
	}
}

/** Logs once when the gateway reports every service ready, or that it did not within the deadline. */
async function announceReady(gatewayUrl: string): Promise<void> {
	const deadline = Date.now() + READY_TIMEOUT_MS;
	while (Date.now() < deadline) {
		const status = await fetch(`${gatewayUrl}/health/ready`, { signal: AbortSignal.timeout(3_000) }).then(
			(res) => res.status,
			() => 0,
		);
		if (status === 200) return log(`ready: ${gatewayUrl}`);
		await new Promise((resolve) => setTimeout(resolve, 500));
	}
	log(`not ready after ${READY_TIMEOUT_MS} ms: see the nodes' logs above`);
}

function main(): void {
	let specs: NodeSpec[];
	let gatewayUrl: string | null;
	try {
		({ specs, gatewayUrl } = plan(process.argv.slice(2)));
	} catch (err) {
		process.stderr.write(`${(err as Error).message}\n${USAGE}\n`);
		process.exit(2);
	}
	if (!fs.existsSync(RUNNER)) {
		process.stderr.write(`${path.relative(process.cwd(), RUNNER)} is missing: run npm run build first (npm run cluster does).\n`);
		process.exit(2);
	}
	const env: NodeJS.ProcessEnv = {
		...process.env,
		TRANSPORTER: process.env.TRANSPORTER || "amqp://guest:guest@127.0.0.1:5672",
		MONGO_URI: process.env.MONGO_URI || "mongodb://127.0.0.1:27017",
	};
	log(`TRANSPORTER=${env.TRANSPORTER?.replace(/\/\/[^@/]*@/, "//***@")} MONGO_URI=${env.MONGO_URI?.replace(/\/\/[^@/]*@/, "//***@")}`);
	const cluster = new Cluster(specs, env);
	for (const signal of ["SIGINT", "SIGTERM"] as const) {
		// A terminal may deliver Ctrl-C both directly and through npm/tsx: the first one counts.
		process.on(signal, () => void cluster.shutdown(signal));
	}
	readline.createInterface({ input: process.stdin }).on("line", (line) => void cluster.command(line));
	for (const spec of specs) cluster.start(spec.name);
	if (gatewayUrl) void announceReady(gatewayUrl);
}

main();
