import type { Channel, ChannelModel, ConsumeMessage, Message } from "amqplib";
import { Transporters } from "moleculer";

/** Packet types as they appear in topic names (`<prefix>.<type>.<nodeID>`); see moleculer/src/packets.js. */
const REQUEST = "REQ";
const RESPONSE = "RES";

type Settle = "ack" | "nack";

export interface ShopAmqpOptions extends NonNullable<Exclude<ConstructorParameters<typeof Transporters.AMQP>[0], string>> {
	/** amqplib's socket options; `noDelay` sets TCP_NODELAY. Missing from Moleculer's option type. */
	socketOptions?: { noDelay?: boolean; clientProperties?: Record<string, string> };
}

/** How often a node checks that the nodes its waiting calls went to are still connected. */
const WAITING_CALLS_CHECK_MS = 1_000;

/**
 * Moleculer's AMQP transporter with four fixes that make a node survive what happens to it in production:
 *
 * 1. **A node that crashed is noticed within about a second, not at the heartbeat timeout.** Each
 *    node's request and response queues are exclusive to its connection, so RabbitMQ deletes them the
 *    moment the connection drops (a SIGKILL included). Packets addressed to one node are published
 *    `mandatory`: RabbitMQ returns one it cannot route, and the sender then takes that node as gone,
 *    which rejects the calls still waiting on it with a retryable error (Moleculer's
 *    RequestRejectedError). A call still waiting after a second gets its node pinged, so a crash is
 *    noticed even when nothing else is being sent there. Upstream keeps those queues for
 *    `autoDeleteQueues` (2 minutes by default), and the calls wait for the heartbeat timeout or their own.
 * 2. **Acknowledge a request on the channel that delivered it.** Upstream acks on `this.channel`, which
 *    after a reconnect is a new channel: a request that was in flight across a RabbitMQ restart is then
 *    acked with another channel's delivery tag, RabbitMQ closes the channel (PRECONDITION_FAILED) and
 *    the node stops answering for good. A delivery whose channel has closed is already requeued or gone.
 * 3. **A channel closed under a live connection reconnects.** Upstream only reconnects when the whole
 *    connection closes; a channel error left the node connected to RabbitMQ with no channel.
 * 4. **A failed connection attempt is closed** instead of left open at every retry.
 */
export class ShopAmqpTransporter extends Transporters.AMQP {
	declare connection: ChannelModel | null;
	declare channel: Channel | null;

	private waitingCallsCheck?: NodeJS.Timeout;
	/** Ids of the calls that were waiting at the previous check. */
	private waitingAtLastCheck = new Set<string>();

	/** `errorCallback` is how the base class asks Transit to reconnect; its AMQP .d.ts leaves it out. */
	override connect(errorCallback?: Parameters<Transporters.Base["connect"]>[0]): Promise<void> {
		const connect = super.connect as unknown as (cb: typeof errorCallback) => Promise<void>;
		const previous = this.connection;
		// RabbitMQ lists the connection under the node's ID (the management UI's connection name, `client_properties`).
		const options = this.opts as ShopAmqpOptions;
		options.socketOptions = { ...options.socketOptions, clientProperties: { connection_name: this.nodeID } };
		return connect.call(this, errorCallback).then(
			() => this.watchNewChannel(),
			(err: unknown) => {
				this.closeFailedAttempt(previous);
				throw err;
			},
		);
	}

	override disconnect(): Promise<void> {
		clearInterval(this.waitingCallsCheck);
		this.waitingCallsCheck = undefined;
		return super.disconnect();
	}

	override _getQueueOptions(packetType: string, balancedQueue?: boolean): Record<string, unknown> {
		if ((packetType === REQUEST && !balancedQueue) || packetType === RESPONSE) {
			return { exclusive: true, durable: false, ...this.opts.queueOptions };
		}
		return super._getQueueOptions(packetType, balancedQueue);
	}

	override _consumeCB(cmd: string, needAck = false): (msg: ConsumeMessage | null) => void | Promise<void> {
		if (!needAck) return super._consumeCB(cmd, false);
		// The channel this consumer is being registered on: the one whose delivery tags these messages carry.
		const channel = this.channel;
		const settle = (msg: ConsumeMessage, how: Settle) => {
			try {
				if (how === "ack") channel?.ack(msg);
				else channel?.nack(msg);
			} catch {
				// The channel has closed since the delivery: RabbitMQ has already requeued or dropped the message.
			}
		};
		return (msg) => {
			if (!msg) return; // the consumer was cancelled by RabbitMQ
			const result = this.receive(cmd, msg.content);
			if (!result || typeof result.then !== "function") {
				settle(msg, "ack");
				return result;
			}
			return result.then(
				() => settle(msg, "ack"),
				(err: unknown) => {
					this.logger.error("Message handling error.", err);
					settle(msg, "nack");
				},
			);
		};
	}

	override send(topic: string, data: Buffer, meta: { balanced?: boolean; packet: { target?: string | null } }): Promise<void> {
		if (this.channel && meta.packet.target != null && !meta.balanced) {
			this.channel.sendToQueue(topic, data, { ...this.opts.messageOptions, mandatory: true });
			return Promise.resolve();
		}
		return super.send(topic, data, meta);
	}

	/** Listens to the channel just created: returned packets, and a close that leaves the connection up. */
	private watchNewChannel(): void {
		this.waitingCallsCheck ??= setInterval(() => this.pingNodesOfWaitingCalls(), WAITING_CALLS_CHECK_MS).unref();
		const { connection, channel } = this;
		if (!connection || !channel) return;
		// Replaces the base class's listener, which logs every returned message with its content.
		channel.removeAllListeners("return");
		channel.on("return", (msg: Message) => this.onReturned(msg.fields.routingKey));
		let connectionClosed = false;
		connection.once("close", () => (connectionClosed = true));
		channel.on("close", () => {
			// When the whole connection goes, its channels close first, in the same tick.
			setImmediate(() => {
				if (connectionClosed || this.channelDisconnecting || this.connection !== connection) return;
				this.logger.warn("AMQP channel closed under a live connection; reconnecting.");
				// The connection's close event makes Transit reconnect (and log it).
				connection.close().catch(() => undefined);
			});
		});
	}

	/**
	 * The base class leaves the connection of a failed attempt open, one more per retry (every 5 s). An
	 * attempt fails when, say, RabbitMQ still gives this node's exclusive queues to the connection it lost
	 * and has not reaped yet (RESOURCE_LOCKED).
	 */
	private closeFailedAttempt(previous: ChannelModel | null): void {
		const attempt = this.connection;
		if (!attempt || attempt === previous) return;
		this.connectionDisconnecting = true;
		void attempt
			.close()
			.catch(() => undefined)
			.finally(() => (this.connectionDisconnecting = false));
	}

	/** Pings the nodes of the calls waiting since the previous check: a ping to a node that is gone comes back. */
	private pingNodesOfWaitingCalls(): void {
		const waiting = this.transit.pendingRequests;
		const nodes = new Set<string>();
		for (const [id, request] of waiting) if (this.waitingAtLastCheck.has(id) && request.nodeID) nodes.add(request.nodeID);
		this.waitingAtLastCheck = new Set(waiting.keys());
		for (const nodeID of nodes) void this.transit.sendPing(nodeID);
	}

	/** RabbitMQ had no queue for a packet addressed to one node: that node's connection is gone. */
	private onReturned(topic: string): void {
		const nodeID = this.targetOf(topic);
		if (!nodeID || nodeID === this.nodeID) return;
		const node = this.broker.registry.nodes.get(nodeID);
		if (!node?.available) return;
		this.logger.debug(`RabbitMQ has no queue for node '${nodeID}' (${topic}).`);
		// Unregisters its services and rejects the calls waiting on it (retryable, so they go elsewhere).
		this.broker.registry.nodes.disconnected(nodeID, true);
	}

	/** `<prefix>.<type>.<nodeID>` → nodeID. The prefix is known and the type has no dot; node IDs may have some (hostnames). */
	private targetOf(topic: string): string | null {
		const head = `${this.prefix}.`;
		if (!topic.startsWith(head)) return null;
		const rest = topic.slice(head.length);
		const dot = rest.indexOf(".");
		return dot > 0 ? rest.slice(dot + 1) : null;
	}
}
