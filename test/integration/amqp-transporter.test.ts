import { spawn, execFile, type ChildProcess } from "node:child_process";
import { promisify } from "node:util";
import amqp from "amqplib";
import { ServiceBroker } from "moleculer";
import { config } from "../../lib/config";
import { transporterFrom } from "../../moleculer.config";
import { describeWithInfra, eventually, infra, uniqueName } from "../support/infra";

/** What a call came to: "answered", or the name of the error it failed with. */
const outcome = (call: Promise<unknown>): Promise<string> =>
	call.then(
		() => "answered",
		(err: Error) => err.name,
	);

/**
 * lib/amqp-transporter.ts against the real RabbitMQ, with the called node in a process of its own
 * (test/support/amqp-probe-node.ts) and heartbeat timeouts far longer than any wait here: only the
 * transporter's own handling can explain what these tests see.
 */
describeWithInfra("the shop's AMQP transporter on the real RabbitMQ", () => {
	const namespace = uniqueName("amqp");
	const probes = new Map<string, ChildProcess>();
	let caller: ServiceBroker;

	/** A probe node's process, with what it has logged so far. */
	function spawnProbe(nodeID: string): { child: ChildProcess; log: () => string } {
		const child = spawn(process.execPath, ["--import", "tsx", "test/support/amqp-probe-node.ts"], {
			env: { PATH: process.env.PATH, TEST_AMQP_URL: infra!.amqpUrl, NAMESPACE: namespace, NODE_ID: nodeID },
			stdio: ["ignore", "pipe", "pipe"],
		});
		probes.set(nodeID, child);
		let output = "";
		child.stdout?.on("data", (chunk: Buffer) => (output += chunk.toString()));
		child.stderr?.on("data", (chunk: Buffer) => (output += chunk.toString()));
		return { child, log: () => output };
	}

	const known = (nodeID: string) => async () =>
		caller.registry.getServiceList({ onlyAvailable: true }).some((s) => s.name === "probe" && s.nodeID === nodeID) ? true : undefined;

	/** Starts a probe node and waits until the caller knows its service. */
	async function startProbe(nodeID: string): Promise<ChildProcess> {
		const { child } = spawnProbe(nodeID);
		await eventually(known(nodeID));
		return child;
	}

	/** The connections RabbitMQ has open for a node (the transporter names them after its node ID). */
	async function connectionsOf(nodeID: string): Promise<number> {
		const args = ["list_connections", "--quiet", "--no-table-headers", "client_properties"];
		const { stdout } = await promisify(execFile)("rabbitmqctl", args);
		return stdout.split("\n").filter((line) => line.includes(`{"connection_name","${nodeID}"}`)).length;
	}

	const ping = (nodeID: string, timeout = 2_000) => caller.call("probe.ping", {}, { nodeID, timeout, retries: 0 });
	const rabbitmqctl = (command: string) => promisify(execFile)("rabbitmqctl", [command], { timeout: 120_000 });

	beforeAll(async () => {
		caller = new ServiceBroker({
			namespace,
			nodeID: `caller-${process.pid}`,
			transporter: transporterFrom({ transporter: infra!.amqpUrl, amqp: config.amqp }),
			logger: false,
			heartbeatTimeout: 120,
			requestTimeout: 90_000,
			retryPolicy: { enabled: false },
		});
		await caller.start();
	});

	afterAll(async () => {
		for (const child of probes.values()) child.kill("SIGKILL");
		await caller?.stop();
	});

	it("fails a call waiting on a crashed node within seconds, without waiting for heartbeats or its timeout", async () => {
		const nodeID = "probe-crash";
		const probe = await startProbe(nodeID);
		const held = outcome(caller.call("probe.holdUntilReconnect", {}, { nodeID }));
		// Answered after the held call on the same queue: the held call has reached the probe.
		await ping(nodeID);

		const killedAt = Date.now();
		const exited = new Promise((resolve) => probe.once("exit", resolve));
		probe.kill("SIGKILL");
		await exited;
		// RabbitMQ deletes the dead connection's queues. Nothing else is sent to that node: the caller's own
		// check of its waiting calls pings it, and the ping comes back unroutable.
		let settled = false;
		void held.then(() => (settled = true));
		await eventually(async () => (settled ? true : undefined), 10_000);

		expect(await held).toBe("RequestRejectedError");
		expect(Date.now() - killedAt).toBeLessThan(10_000);
		expect(caller.registry.nodes.get(nodeID)?.available).toBe(false);
	});

	it("keeps answering after RabbitMQ restarts while a call is in flight", async () => {
		const nodeID = "probe-restart";
		await startProbe(nodeID);
		const held = outcome(caller.call("probe.holdUntilReconnect", {}, { nodeID }));
		await ping(nodeID);

		// The probe finishes the held call only after it has reconnected, i.e. on a new channel: upstream
		// acked it there with the old channel's delivery tag, and RabbitMQ closed the probe's channel.
		await rabbitmqctl("stop_app");
		await rabbitmqctl("start_app");
		await eventually(async () => ((await ping(nodeID, 1_000).catch(() => undefined)) ? true : undefined), 60_000, 250);
		expect(await held).toBe("answered");

		// And it goes on answering, call after call.
		const answers: string[] = [];
		for (let i = 0; i < 20; i++) answers.push(await outcome(ping(nodeID)));
		expect(answers).toEqual(Array(20).fill("answered"));
	}, 150_000);

	it("waits for its queue while RabbitMQ still gives it to a lost connection, without leaking a connection per attempt", async () => {
		const nodeID = "probe-locked";
		// The node's exclusive request queue, still held by a connection RabbitMQ has not reaped yet.
		const stale = await amqp.connect(infra!.amqpUrl);
		await (await stale.createChannel()).assertQueue(`MOL-${namespace}.REQ.${nodeID}`, { exclusive: true, durable: false });

		const probe = spawnProbe(nodeID);
		// Refused (RESOURCE_LOCKED), it tries again every 5 s: wait for its second failed attempt.
		await eventually(async () => ((probe.log().match(/Connection is failed/g)?.length ?? 0) >= 2 ? true : undefined), 30_000, 250);
		expect(await connectionsOf(nodeID)).toBeLessThanOrEqual(1);

		await stale.close();
		await eventually(known(nodeID), 30_000);
		expect(await outcome(ping(nodeID))).toBe("answered");
		expect(await connectionsOf(nodeID)).toBe(1);
	}, 90_000);
});
