/**
 * A Moleculer node on the shop's AMQP transporter, as its own process, for
 * test/integration/amqp-transporter.test.ts. Its `probe` service answers `ping` at once and
 * `holdUntilReconnect` only after its transporter has reconnected to RabbitMQ, so that a call is
 * in flight across a RabbitMQ restart (or forever, until the process is killed).
 *
 *   TEST_AMQP_URL=amqp://… NAMESPACE=… NODE_ID=… node --import tsx test/support/amqp-probe-node.ts
 */
import { ServiceBroker, type Context } from "moleculer";
import { config } from "../../lib/config";
import { transporterFrom } from "../../moleculer.config";

let reconnected: () => void = () => undefined;
const nextReconnect = () => new Promise<void>((resolve) => (reconnected = resolve));

const broker = new ServiceBroker({
	namespace: process.env.NAMESPACE,
	nodeID: process.env.NODE_ID,
	transporter: transporterFrom({ transporter: process.env.TEST_AMQP_URL ?? null, amqp: config.amqp }),
	logLevel: "warn",
	// Long enough that only the transporter's own signals can explain a quick failover in the test.
	heartbeatTimeout: 120,
});

broker.createService({
	name: "probe",
	actions: {
		ping: (ctx: Context) => ({ nodeID: ctx.broker.nodeID }),
		holdUntilReconnect: async (ctx: Context) => {
			await nextReconnect();
			return { nodeID: ctx.broker.nodeID };
		},
	},
	events: {
		"$transporter.connected"(ctx: Context<{ wasReconnect: boolean }>) {
			if (ctx.params.wasReconnect) reconnected();
		},
	},
});

void broker.start().then(() => process.stdout.write("probe node started\n"));
