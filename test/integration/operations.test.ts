import { execFile } from "node:child_process";
import net from "node:net";
import path from "node:path";
import { promisify } from "node:util";
import { ServiceBroker, type Context } from "moleculer";
import { config } from "../../lib/config";
import { transporterFrom } from "../../moleculer.config";
import { buildDist, http, ScriptCluster, type HttpResult } from "../support/cluster";
import { describeWithInfra, eventually, infra, uniqueName } from "../support/infra";

const HEALTHCHECK = path.resolve(__dirname, "../../scripts/healthcheck.cjs");
const ERROR_LINE = /\b(ERROR|FATAL)\b/;

/** A TCP pass-through to MongoDB that the test can take away (refuse and cut every connection) and bring back. */
class TcpProxy {
	readonly port = 30_000 + Math.floor(Math.random() * 10_000);
	private server: net.Server | null = null;
	private readonly sockets = new Set<net.Socket>();

	constructor(private readonly target: { host: string; port: number }) {}

	async up(): Promise<void> {
		this.server = net.createServer((client) => {
			const upstream = net.connect(this.target);
			for (const [a, b] of [
				[client, upstream],
				[upstream, client],
			]) {
				this.sockets.add(a);
				a.pipe(b);
				a.on("error", () => b.destroy());
				a.on("close", () => {
					this.sockets.delete(a);
					b.destroy();
				});
			}
		});
		await new Promise<void>((resolve) => this.server!.listen(this.port, "127.0.0.1", resolve));
	}

	async down(): Promise<void> {
		const closed = new Promise((resolve) => this.server?.close(resolve));
		for (const socket of this.sockets) socket.destroy();
		await closed;
		this.server = null;
	}
}

interface Failure {
	startedAt: number;
	status: number;
	ms: number;
	body: unknown;
}

interface LoadResult {
	ok: number;
	failures: Failure[];
}

/** Requests in a bounded loop (`workers` at a time) until `stop()`, or until `maxMs` has passed. */
function steadyLoad(workers: Array<() => Promise<HttpResult<unknown>>>, maxMs = 120_000) {
	const result: LoadResult = { ok: 0, failures: [] };
	const deadline = Date.now() + maxMs;
	let stopped = false;
	const running = workers.map(async (request) => {
		while (!stopped && Date.now() < deadline) {
			const started = Date.now();
			const res = await request().catch((err: Error) => ({ status: 0, body: err.message }));
			if (res.status >= 200 && res.status < 300) result.ok++;
			else result.failures.push({ startedAt: started, status: res.status, ms: Date.now() - started, body: res.body });
		}
	});
	return {
		result,
		async stop(): Promise<LoadResult> {
			stopped = true;
			await Promise.all(running);
			return result;
		},
	};
}

function run(file: string, args: string[], env: Record<string, string>): Promise<{ code: number; output: string }> {
	return promisify(execFile)(process.execPath, [file, ...args], { env: { PATH: process.env.PATH, ...env }, timeout: 10_000 }).then(
		({ stdout, stderr }) => ({ code: 0, output: stdout + stderr }),
		(err: { code: number; stdout: string; stderr: string }) => ({ code: err.code, output: err.stdout + err.stderr }),
	);
}

/**
 * The `npm run cluster` topology (scripts/cluster.ts on the built output): the gateway plus two
 * replicas of each service as OS processes over RabbitMQ and the MongoDB-wire server, with a
 * Prometheus port per node. Balancing, metrics, health, and stopping, restarting and crashing nodes
 * under load.
 */
describeWithInfra("operations: the process cluster over RabbitMQ and MongoDB", () => {
	const namespace = uniqueName("ops");
	const ADMIN = { email: "admin@ops.test", password: "admin-password-1" };
	let cluster: ScriptCluster;
	let mongo: TcpProxy;
	let client: ServiceBroker;
	let adminToken: string;
	let buyerToken: string;
	let productId: string;

	const call = <T = Record<string, unknown>>(method: string, urlPath: string, opts?: Parameters<typeof http>[3]) =>
		http<T>(cluster.baseUrl, method, urlPath, opts);

	async function metrics(node: string): Promise<string> {
		return (await fetch(`http://127.0.0.1:${cluster.metricsPort(node)}/metrics`)).text();
	}

	/** How many calls of `action` from the gateway this node has handled, by its own counter. */
	async function handled(node: string, action: string): Promise<number> {
		const line = new RegExp(`^moleculer_request_total\\{[^}]*action="${action}",type="local",caller="api"\\} (\\d+)$`, "m");
		return Number((await metrics(node)).match(line)?.[1] ?? 0);
	}

	const getProduct = () => call("GET", `/products/${productId}`);
	const placeOrder = () => call("POST", "/orders", { token: buyerToken, body: { items: [{ productId, quantity: 1 }] } });

	beforeAll(async () => {
		buildDist();
		const target = new URL(infra!.mongoUri);
		mongo = new TcpProxy({ host: target.hostname, port: Number(target.port || 27017) });
		await mongo.up();
		cluster = new ScriptCluster({
			infra: { ...infra!, mongoUri: `mongodb://127.0.0.1:${mongo.port}` },
			namespace,
			replicas: { users: 2, products: 2, orders: 2 },
			env: {
				JWT_SECRET: "ops-test-secret-that-is-long-enough-1234",
				ADMIN_EMAIL: ADMIN.email,
				ADMIN_PASSWORD: ADMIN.password,
				LOGIN_RATE_LIMIT_PER_MINUTE: "1000",
			},
		});
		await cluster.waitReady(90_000);
		client = new ServiceBroker({
			namespace,
			nodeID: `${namespace}-test-client`,
			transporter: transporterFrom({ transporter: infra!.amqpUrl, amqp: config.amqp }),
			logger: false,
		});
		await client.start();
		await client.waitForServices(["users", "products", "orders"], 30_000);

		adminToken = (await call<{ token: string }>("POST", "/users/login", { body: ADMIN })).body.token;
		const product = await call<{ id: string }>("POST", "/products", {
			token: adminToken,
			body: { name: "Steady seller", price: 500, stock: 1_000_000 },
		});
		expect(product.status).toBe(201);
		productId = product.body.id;
		const buyer = await call<{ token: string }>("POST", "/users/register", {
			body: { email: "buyer@ops.test", password: "password-123", name: "Buyer" },
		});
		expect(buyer.status).toBe(201);
		buyerToken = buyer.body.token;
	}, 150_000);

	afterAll(async () => {
		await client?.stop();
		await cluster?.stop();
		await mongo?.down();
	});

	it("balances the gateway's requests over both products replicas, and calls over both replicas of every service", async () => {
		const replicas = ["products-1", "products-2"];
		const before = await Promise.all(replicas.map((n) => handled(n, "products.get")));
		for (let i = 0; i < 20; i++) expect((await getProduct()).status).toBe(200);
		const after = await Promise.all(replicas.map((n) => handled(n, "products.get")));
		const perReplica = after.map((n, i) => n - before[i]);
		expect(perReplica[0] + perReplica[1]).toBe(20);
		// Round-robin: about half each.
		expect(Math.min(...perReplica)).toBeGreaterThanOrEqual(5);

		for (const [service, action, params] of [
			["products", "products.get", { id: productId }],
			["users", "users.health", {}],
			["orders", "orders.health", {}],
		] as const) {
			const answeredBy = new Set<string>();
			for (let i = 0; i < 6; i++) {
				const pending = client.call(action, params) as Promise<unknown> & { ctx: Context };
				await pending;
				answeredBy.add(pending.ctx.nodeID!);
			}
			expect([...answeredBy].sort()).toEqual([cluster.nodeID(`${service}-1`), cluster.nodeID(`${service}-2`)]);
		}
	});

	it("exposes request rate, latency and error metrics on each node's METRICS_PORT", async () => {
		expect((await call("GET", "/products/not-an-id")).status).toBe(422);
		const gateway = await metrics("api-1");
		const rest = `action="api.rest"`;
		expect(gateway).toMatch(/^# TYPE moleculer_request_total counter$/m);
		expect(gateway).toMatch(new RegExp(`^moleculer_request_total\\{[^}]*${rest}[^}]*\\} [1-9]\\d*$`, "m"));
		expect(gateway).toMatch(/^# TYPE moleculer_request_time histogram$/m);
		expect(gateway).toMatch(new RegExp(`^moleculer_request_time_bucket\\{[^}]*${rest}[^}]*le="100"\\} [1-9]\\d*$`, "m"));
		expect(gateway).toMatch(new RegExp(`^moleculer_request_time_count\\{[^}]*${rest}[^}]*\\} [1-9]\\d*$`, "m"));
		expect(gateway).toMatch(new RegExp(`^moleculer_request_error_total\\{[^}]*${rest}[^}]*errorCode="422"[^}]*\\} [1-9]\\d*$`, "m"));
		for (const node of ["users-1", "products-2", "orders-1"]) {
			expect(await metrics(node)).toContain(`nodeID="${cluster.nodeID(node)}"`);
		}
	});

	it("passes the image's healthcheck: the gateway on /api/health and /api/health/ready, other nodes on their metrics", async () => {
		const port = String(cluster.port);
		expect(await run(HEALTHCHECK, [], { SERVICES: "api", PORT: port })).toEqual({ code: 0, output: "" });
		expect(await run(HEALTHCHECK, ["--ready"], { SERVICES: "api", PORT: port })).toEqual({ code: 0, output: "" });
		expect(await run(HEALTHCHECK, [], { SERVICES: "products", METRICS_PORT: String(cluster.metricsPort("products-1")) })).toEqual({
			code: 0,
			output: "",
		});
		const nobody = await run(HEALTHCHECK, [], { SERVICES: "api", PORT: String(cluster.port + 1_000) });
		expect(nobody).toEqual({ code: 1, output: "unreachable: ECONNREFUSED\n" });
	});

	it("turns readiness 503 naming users while every users node is gone, and 200 once one is back", async () => {
		const offset = cluster.output().length;
		expect(await Promise.all([cluster.stopNode("users-1"), cluster.stopNode("users-2")])).toEqual([
			"exited with code 0",
			"exited with code 0",
		]);
		for (const node of ["users-1", "users-2"]) expect(cluster.nodeLines(node, offset).filter((line) => ERROR_LINE.test(line))).toEqual([]);
		const notReady = await eventually(async () => {
			const res = await call("GET", "/health/ready");
			return res.status === 503 ? res : undefined;
		});
		expect(notReady.body).toMatchObject({
			code: 503,
			type: "NOT_READY",
			data: { services: { users: "unavailable", products: "ok", orders: "ok" } },
		});
		const probe = await run(HEALTHCHECK, ["--ready"], { SERVICES: "api", PORT: String(cluster.port) });
		expect(probe.code).toBe(1);
		expect(probe.output).toContain('"users":"unavailable"');

		await Promise.all([cluster.startNode("users-1"), cluster.startNode("users-2")]);
		await eventually(async () => ((await call("GET", "/health/ready")).status === 200 ? true : undefined), 45_000);
	});

	it("turns readiness 503 while the database is unreachable, and 200 after it is back", async () => {
		await mongo.down();
		// Each service notices on its own next ping: wait until all three have.
		const notReady = await eventually(async () => {
			const res = await call<{ data: { services: Record<string, string> } }>("GET", "/health/ready");
			return res.status === 503 && Object.values(res.body.data.services).every((s) => s === "unavailable") ? res : undefined;
		}, 30_000);
		expect(notReady.body).toMatchObject({
			code: 503,
			type: "NOT_READY",
			data: { services: { users: "unavailable", products: "unavailable", orders: "unavailable" } },
		});
		await mongo.up();
		await eventually(async () => ((await call("GET", "/health/ready")).status === 200 ? true : undefined), 60_000, 500);
		expect((await getProduct()).status).toBe(200);
	}, 120_000);

	it("loses no request under steady load while the products replicas restart one after the other (SIGTERM, exit 0, no error)", async () => {
		const load = steadyLoad([getProduct, getProduct, getProduct, placeOrder]);
		await eventually(async () => (load.result.ok >= 40 ? true : undefined));
		for (const node of ["products-1", "products-2"]) {
			const offset = cluster.output().length;
			cluster.send(`restart ${node}`);
			await cluster.waitFor(new RegExp(`^\\[cluster\\] ${node} \\(pid \\d+\\) exited with code 0$`, "m"), offset);
			await cluster.waitFor(new RegExp(`^\\[cluster\\] ${node} started: `, "m"), offset);
			// Back in rotation: the new process handles the gateway's requests (its counters start at zero).
			await eventually(async () => ((await handled(node, "products.get")) > 0 ? true : undefined), 45_000);
			expect(cluster.nodeLines(node, offset).filter((line) => ERROR_LINE.test(line))).toEqual([]);
		}
		const { ok, failures } = await load.stop();
		expect(failures).toEqual([]);
		expect(ok).toBeGreaterThan(100);
	}, 150_000);

	it("loses no request under steady load when a products replica is stopped for good", async () => {
		const load = steadyLoad([getProduct, getProduct, getProduct, placeOrder]);
		await eventually(async () => (load.result.ok >= 40 ? true : undefined));
		expect(await cluster.stopNode("products-2")).toBe("exited with code 0");
		const servedBefore = await handled("products-1", "products.get");
		const okBefore = load.result.ok;
		await eventually(async () => (load.result.ok >= okBefore + 60 ? true : undefined));
		const { failures } = await load.stop();
		expect(failures).toEqual([]);
		// products-1 alone answered what came after.
		expect((await handled("products-1", "products.get")) - servedBefore).toBeGreaterThanOrEqual(40);

		await cluster.startNode("products-2");
	}, 120_000);

	it("loses no request under steady load when a products replica crashes (SIGKILL): the gateway notices at once", async () => {
		const load = steadyLoad([getProduct, getProduct, getProduct, placeOrder]);
		// products-2 was started again by the previous test: it must be back in every caller's registry, or
		// killing products-1 leaves a caller without products.
		const products2 = cluster.nodeID("products-2");
		await eventually(async () => {
			const views = await Promise.all(
				["api-1", "orders-1", "orders-2"].map((caller) =>
					client.call<Array<{ id: string; available: boolean }>, object>("$node.list", {}, { nodeID: cluster.nodeID(caller) }),
				),
			);
			return views.every((nodes) => nodes.some((n) => n.id === products2 && n.available)) && load.result.ok >= 40 ? true : undefined;
		}, 45_000);
		const offset = cluster.output().length;
		const killedAt = Date.now();
		expect(await cluster.stopNode("products-1", "kill")).toBe("killed by SIGKILL");
		// No goodbye from a crashed node, but RabbitMQ drops its queues with its connection: the gateway's next
		// request for it comes back unroutable, and the calls it had fail over (lib/amqp-transporter.ts).
		await cluster.waitFor(
			new RegExp(`^\\[api-1\\] .*Node '${cluster.nodeID("products-1")}' disconnected unexpectedly`, "m"),
			offset,
			90_000,
		);
		const noticedAfterMs = Date.now() - killedAt;
		const okBefore = load.result.ok;
		await eventually(async () => (load.result.ok >= okBefore + 60 ? true : undefined));
		const { failures } = await load.stop();
		expect(failures).toEqual([]);
		// Well before the heartbeat timeout, which was the only signal before.
		expect(noticedAfterMs).toBeLessThan(config.heartbeat.timeoutSeconds * 1_000);
		console.log(`SIGKILL of one of two products replicas: the gateway noticed after ${noticedAfterMs} ms; 0 requests failed`);

		await cluster.startNode("products-1");
	}, 150_000);

	it("stops every node gracefully on SIGTERM: each exits 0 without an error line, and so does the script", async () => {
		const offset = cluster.output().length;
		await client.stop();
		const code = await cluster.stop();
		const shutdown = cluster.output(offset);
		// The output in the comparison, so that a failure shows what each node said.
		expect({ code, shutdown }).toEqual({ code: 0, shutdown: expect.stringMatching(/^\[cluster\] every node stopped cleanly$/m) });
		expect(shutdown.match(/exited with code 0$/gm)).toHaveLength(7);
		expect(shutdown.split("\n").filter((line) => ERROR_LINE.test(line))).toEqual([]);
		for (const node of ["api-1", "users-1", "products-1", "orders-2"]) {
			expect(cluster.nodeLines(node, offset).join("\n")).toMatch(/AMQP connection is closed gracefully[\s\S]*ServiceBroker is stopped/);
		}
	}, 60_000);
});
