import { ServiceBroker, type BrokerOptions } from "moleculer";
import { SettleTimedOutCalls } from "../../moleculer.config";

const SHUTDOWN_TIMEOUT_MS = 3_000;

/**
 * A caller, with request tracking as in production, and a callee that never answers, like a crashed
 * node (without Moleculer's middlewares it does not even time the request out), over the in-memory
 * transporter.
 */
async function timedOutCall(middlewares: BrokerOptions["middlewares"]): Promise<{ caller: ServiceBroker; callee: ServiceBroker }> {
	const namespace = `stop-${process.pid}-${Math.random().toString(36).slice(2)}`;
	const options: BrokerOptions = {
		namespace,
		transporter: "Fake",
		logger: false,
		tracking: { enabled: true, shutdownTimeout: SHUTDOWN_TIMEOUT_MS },
		middlewares,
	};
	const caller = new ServiceBroker({ ...options, nodeID: "caller" });
	const callee = new ServiceBroker({ ...options, nodeID: "callee", internalMiddlewares: false, middlewares: [] });
	const silent = new Promise<never>(() => undefined);
	callee.createService({ name: "slow", actions: { wait: () => silent } });
	await Promise.all([caller.start(), callee.start()]);
	await caller.waitForServices("slow");
	await expect(caller.call("slow.wait", {}, { timeout: 50 })).rejects.toMatchObject({ name: "RequestTimeoutError" });
	return { caller, callee };
}

async function stopDuration(broker: ServiceBroker): Promise<number> {
	const started = Date.now();
	await broker.stop();
	return Date.now() - started;
}

describe("graceful stop after a call to a node that never answered", () => {
	it("waits out the whole shutdownTimeout with Moleculer's own middlewares (the bug SettleTimedOutCalls works around)", async () => {
		const { caller, callee } = await timedOutCall([]);
		try {
			expect(await stopDuration(caller)).toBeGreaterThanOrEqual(SHUTDOWN_TIMEOUT_MS - 100);
		} finally {
			await callee.stop();
		}
	}, 20_000);

	it("stops without waiting for it with SettleTimedOutCalls", async () => {
		const { caller, callee } = await timedOutCall([SettleTimedOutCalls]);
		try {
			// The timed-out call is settled 1 s after its own timeout, well before the shutdown timeout.
			expect(await stopDuration(caller)).toBeLessThan(SHUTDOWN_TIMEOUT_MS / 2);
		} finally {
			await callee.stop();
		}
	}, 20_000);
});
