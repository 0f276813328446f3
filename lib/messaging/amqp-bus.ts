import amqp, { type Channel, type ChannelModel, type ConfirmChannel, type ConsumeMessage, type GetMessage, type Options } from "amqplib";
import {
	afterFailure,
	errorSummary,
	exchangeName,
	parseEvent,
	retryDelays,
	topology,
	type BusObserver,
	type DeadLetter,
	type DeliveryHandler,
	type DomainEvent,
	type EventBus,
	type QueueDepth,
	type RetryPolicy,
} from "./events";

/**
 * Domain events over RabbitMQ with amqplib, beside (not through) Moleculer's transporter:
 *
 * - one durable topic exchange `<ns>.domain-events`; the routing key is the event type;
 * - per consuming service one durable queue `<ns>.<service>.domain-events` shared by its replicas
 *   (each event is handled once per service), bound to the types it handles;
 * - persistent messages, published on a confirm channel: `publish` resolves only once RabbitMQ has
 *   taken responsibility for the message;
 * - a delivery is acked only after its handler finished; a failed one is re-published (with confirm)
 *   into a retry queue whose TTL dead-letters it back into the service's queue after a growing delay,
 *   and after the last attempt into `<ns>.<service>.dead-letter` with the error in its headers;
 * - the connection is re-established after it drops (RabbitMQ restart, network), with the topology
 *   declared again and the consumers resubscribed. Unacked deliveries are redelivered by RabbitMQ.
 */

export interface Log {
	debug(...args: unknown[]): void;
	info(...args: unknown[]): void;
	warn(...args: unknown[]): void;
	error(...args: unknown[]): void;
}

export interface AmqpBusOptions {
	/** One URL, or the nodes of a RabbitMQ cluster (tried in turn). */
	urls: string[];
	namespace: string;
	/** Shown by `rabbitmqctl list_connections user_provided_name`, so operators (and tests) can find it. */
	connectionName: string;
	prefetch: number;
	publishTimeoutMs: number;
	policy: RetryPolicy;
	socketOptions?: { noDelay?: boolean };
	/** `x-expires` of the queues (test deployments; see DomainEventsConfig.queueExpiresMs). */
	queueExpiresMs?: number | null;
	log: Log;
	observer?: BusObserver;
	/** Called after every (re)connection, once the topology is declared and consumers are subscribed. */
	onConnected?: () => void;
}

interface Connection {
	model: ChannelModel;
	publisher: ConfirmChannel;
	consumer: Channel;
	consumerTags: string[];
}

interface Subscription {
	types: string[];
	handler: DeliveryHandler;
}

const RECONNECT_MIN_MS = 250;
const RECONNECT_MAX_MS = 5_000;
/** When a failed delivery cannot be re-published, wait before handing it back, so a broken broker is not hammered. */
const REQUEUE_DELAY_MS = 1_000;

export class AmqpEventBus implements EventBus {
	readonly durable = true;
	private conn: Connection | null = null;
	private readonly subscriptions = new Map<string, Subscription>();
	private readonly inFlight = new Set<Promise<void>>();
	private stopping = false;
	private connecting: Promise<void> | null = null;
	/** Ends the wait between two connection attempts early (on stop). */
	private wake: (() => void) | null = null;
	private urlIndex = 0;

	constructor(private readonly opts: AmqpBusOptions) {}

	get connected(): boolean {
		return this.conn !== null;
	}

	/** Resolves once connected (retrying as long as it takes, until `stop`). */
	async start(): Promise<void> {
		this.stopping = false;
		await this.reconnect();
	}

	async stop(): Promise<void> {
		this.stopping = true;
		this.wake?.();
		await this.connecting;
		const conn = this.conn;
		if (conn) {
			// Take no new deliveries, let the running handlers finish and ack, then close.
			for (const tag of conn.consumerTags) await conn.consumer.cancel(tag).catch(() => undefined);
		}
		await Promise.allSettled([...this.inFlight]);
		this.conn = null;
		if (conn) await conn.model.close().catch(() => undefined);
	}

	async subscribe(group: string, types: string[], handler: DeliveryHandler): Promise<void> {
		const sub = { types, handler };
		this.subscriptions.set(group, sub);
		if (this.conn) await this.consume(this.conn, group, sub);
	}

	async publish(event: DomainEvent): Promise<void> {
		await this.confirmedPublish(exchangeName(this.opts.namespace), event.type, Buffer.from(JSON.stringify(event)), {
			messageId: event.id,
			type: event.type,
			appId: event.source,
			timestamp: Math.floor(Date.parse(event.occurredAt) / 1_000),
		});
	}

	async queues(group: string): Promise<QueueDepth[]> {
		const t = topology(this.opts.namespace, group);
		const names = [t.queue, ...retryDelays(this.opts.policy).map((delay) => t.retry(delay)), t.deadLetter];
		const depths: QueueDepth[] = [];
		for (const name of names) {
			// A missing queue closes the channel it was asked on, hence one channel per question.
			const depth = await this.withChannel((ch) => ch.checkQueue(name)).catch(() => null);
			depths.push({ name, messages: depth?.messageCount ?? 0, consumers: depth?.consumerCount ?? 0 });
		}
		return depths;
	}

	/**
	 * Reads dead letters without removing them: they are fetched unacked and handed back when the
	 * channel closes (RabbitMQ puts them back in their places).
	 */
	deadLetters(group: string, limit: number): Promise<DeadLetter[]> {
		const { deadLetter } = topology(this.opts.namespace, group);
		return this.withChannel(async (ch) => {
			const letters: DeadLetter[] = [];
			while (letters.length < limit) {
				const msg = await ch.get(deadLetter);
				if (!msg) break;
				letters.push(toDeadLetter(msg));
			}
			return letters;
		});
	}

	replay(group: string, ids: string[] | undefined, limit: number): Promise<number> {
		const t = topology(this.opts.namespace, group);
		return this.takeDeadLetters(group, ids, limit, async (msg) => {
			// Straight into the service's own queue (not the exchange: other services had theirs), as a first attempt.
			await this.confirmedPublish("", t.queue, msg.content, {
				messageId: msg.properties.messageId as string | undefined,
				type: msg.properties.type as string | undefined,
				appId: msg.properties.appId as string | undefined,
				headers: { "x-attempt": 1, "x-replayed-at": new Date().toISOString() },
			});
		});
	}

	discard(group: string, ids: string[], limit: number): Promise<number> {
		return this.takeDeadLetters(group, ids, limit, async () => undefined);
	}

	/** Scans up to `limit` dead letters; acks (removes) those with one of `ids` (all if none) after `use` succeeded. */
	private takeDeadLetters(
		group: string,
		ids: string[] | undefined,
		limit: number,
		use: (msg: GetMessage) => Promise<void>,
	): Promise<number> {
		const { deadLetter } = topology(this.opts.namespace, group);
		const wanted = ids ? new Set(ids) : null;
		return this.withChannel(async (ch) => {
			let taken = 0;
			for (let scanned = 0; scanned < limit && (!wanted || taken < wanted.size); scanned++) {
				const msg = await ch.get(deadLetter);
				if (!msg) break;
				if (wanted && !wanted.has(String(msg.properties.messageId))) continue;
				await use(msg);
				ch.ack(msg);
				taken++;
			}
			// Letters not taken stay unacked until the channel closes, which puts them back.
			return taken;
		});
	}

	private async withChannel<T>(fn: (ch: Channel) => Promise<T>): Promise<T> {
		const conn = this.requireConnection();
		const ch = await conn.model.createChannel();
		ch.on("error", () => undefined);
		try {
			return await fn(ch);
		} finally {
			await ch.close().catch(() => undefined);
		}
	}

	private requireConnection(): Connection {
		if (!this.conn) throw new Error("RabbitMQ is not connected");
		return this.conn;
	}

	private confirmedPublish(exchange: string, routingKey: string, content: Buffer, options: Options.Publish): Promise<void> {
		const { publisher } = this.requireConnection();
		return new Promise<void>((resolve, reject) => {
			const timer = setTimeout(() => reject(new Error("RabbitMQ did not confirm the message in time")), this.opts.publishTimeoutMs);
			const done = (err: unknown) => {
				clearTimeout(timer);
				if (err) reject(err instanceof Error ? err : new Error(String(err)));
				else resolve();
			};
			try {
				publisher.publish(exchange, routingKey, content, { ...options, persistent: true, contentType: "application/json" }, done);
			} catch (err) {
				done(err);
			}
		});
	}

	/** Connects, retrying with backoff until it succeeds or `stop` is called; one attempt loop at a time. */
	private reconnect(): Promise<void> {
		this.connecting ??= (async () => {
			let delay = RECONNECT_MIN_MS;
			for (let failures = 0; !this.stopping && !this.conn; failures++) {
				try {
					const conn = await this.connect();
					if (this.stopping) await conn.model.close().catch(() => undefined);
					else this.conn = conn;
				} catch (err) {
					// The first failure is worth a warning; the rest of an outage only at debug level.
					const line = `RabbitMQ (domain events) not reachable: ${errorSummary(err).message}; retrying`;
					if (failures === 0) this.opts.log.warn(line);
					else this.opts.log.debug(line);
					await new Promise<void>((resolve) => {
						const timer = setTimeout(resolve, delay);
						this.wake = () => {
							clearTimeout(timer);
							resolve();
						};
					});
					this.wake = null;
					delay = Math.min(delay * 2, RECONNECT_MAX_MS);
				}
			}
		})().finally(() => {
			this.connecting = null;
		});
		return this.connecting;
	}

	private async connect(): Promise<Connection> {
		const url = this.opts.urls[this.urlIndex++ % this.opts.urls.length];
		const model = await amqp.connect(url, {
			...this.opts.socketOptions,
			clientProperties: { connection_name: this.opts.connectionName },
		});
		try {
			// 'error' is always followed by 'close', which is where recovery starts.
			model.on("error", (err: Error) => this.opts.log.debug(`RabbitMQ (domain events) connection error: ${err.message}`));
			const publisher = await model.createConfirmChannel();
			const consumer = await model.createChannel();
			const conn: Connection = { model, publisher, consumer, consumerTags: [] };
			model.on("close", () => this.onClosed(conn));
			for (const ch of [publisher, consumer]) {
				ch.on("error", (err: Error) => this.opts.log.warn(`RabbitMQ (domain events) channel error: ${err.message}`));
				// A channel the broker closed (an error on it) is recovered like a lost connection.
				ch.on("close", () => {
					if (this.conn === conn && !this.stopping) model.close().catch(() => undefined);
				});
			}
			await consumer.prefetch(this.opts.prefetch);
			await publisher.assertExchange(exchangeName(this.opts.namespace), "topic", { durable: true });
			for (const [group, sub] of this.subscriptions) await this.consume(conn, group, sub);
			this.opts.log.info(`RabbitMQ (domain events) connected as "${this.opts.connectionName}".`);
			setImmediate(() => this.opts.onConnected?.());
			return conn;
		} catch (err) {
			await model.close().catch(() => undefined);
			throw err;
		}
	}

	private onClosed(conn: Connection): void {
		if (this.conn !== conn) return;
		this.conn = null;
		if (this.stopping) return;
		const redelivery = this.subscriptions.size > 0 ? " Deliveries not yet acked will come again." : "";
		this.opts.log.warn(`RabbitMQ (domain events) connection lost; reconnecting.${redelivery}`);
		void this.reconnect();
	}

	/** Declares the service's queues (idempotent) and starts consuming. */
	private async consume(conn: Connection, group: string, sub: Subscription): Promise<void> {
		const t = topology(this.opts.namespace, group);
		const ch = conn.consumer;
		const expires = this.opts.queueExpiresMs ? { "x-expires": this.opts.queueExpiresMs } : {};
		await ch.assertExchange(t.exchange, "topic", { durable: true });
		await ch.assertQueue(t.queue, { durable: true, arguments: expires });
		for (const type of sub.types) await ch.bindQueue(t.queue, t.exchange, type);
		for (const delay of retryDelays(this.opts.policy)) {
			// Expired messages go back into the service's queue through the default exchange.
			await ch.assertQueue(t.retry(delay), {
				durable: true,
				arguments: { ...expires, "x-message-ttl": delay, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": t.queue },
			});
		}
		await ch.assertQueue(t.deadLetter, { durable: true, arguments: expires });
		const { consumerTag } = await ch.consume(t.queue, (msg) => this.onMessage(conn, group, sub, msg), { noAck: false });
		conn.consumerTags.push(consumerTag);
	}

	private onMessage(conn: Connection, group: string, sub: Subscription, msg: ConsumeMessage | null): void {
		if (!msg) {
			// The broker cancelled the consumer (its queue was deleted): start over, which declares it again.
			this.opts.log.warn(`RabbitMQ cancelled the domain event consumer of "${group}"; reconnecting.`);
			conn.model.close().catch(() => undefined);
			return;
		}
		const work = this.deliver(conn, group, sub, msg);
		this.inFlight.add(work);
		void work.finally(() => this.inFlight.delete(work));
	}

	private async deliver(conn: Connection, group: string, sub: Subscription, msg: ConsumeMessage): Promise<void> {
		const attempt = Math.max(Number(msg.properties.headers?.["x-attempt"] ?? 1) || 1, 1);
		let event: DomainEvent | null = null;
		try {
			event = parseEvent(msg.content);
			await sub.handler({ event, attempt });
			ack(conn.consumer, msg);
			return;
		} catch (err) {
			await this.handleFailure(conn, group, msg, event, attempt, err);
		}
	}

	private async handleFailure(
		conn: Connection,
		group: string,
		msg: ConsumeMessage,
		event: DomainEvent | null,
		attempt: number,
		err: unknown,
	) {
		const t = topology(this.opts.namespace, group);
		const step = afterFailure(this.opts.policy, attempt, err);
		const error = errorSummary(err);
		const properties = { messageId: msg.properties.messageId as string | undefined, type: msg.properties.type as string | undefined };
		try {
			if ("deadLetter" in step) {
				await this.confirmedPublish("", t.deadLetter, msg.content, {
					...properties,
					headers: {
						"x-attempts": attempt,
						"x-error-name": error.name,
						"x-error-message": error.message,
						"x-failed-at": new Date().toISOString(),
					},
				});
				this.opts.observer?.deadLettered(event, group, err);
			} else {
				await this.confirmedPublish("", t.retry(step.retryInMs), msg.content, {
					...properties,
					headers: { "x-attempt": step.nextAttempt, "x-last-error": `${error.name}: ${error.message}` },
				});
				this.opts.observer?.retried(event, group, step.retryInMs, err);
			}
			// Only now: had we died before, the message would still be in the queue (handled twice at worst).
			ack(conn.consumer, msg);
		} catch (publishErr) {
			this.opts.log.warn(`Could not schedule a retry of a domain event (${errorSummary(publishErr).message}); it stays in the queue.`);
			setTimeout(() => nack(conn.consumer, msg), REQUEUE_DELAY_MS).unref();
		}
	}
}

/** After the connection dropped the channel is gone and so is the delivery: RabbitMQ redelivers it. */
function ack(ch: Channel, msg: ConsumeMessage): void {
	try {
		ch.ack(msg);
	} catch {
		// Channel closed: the message is redelivered, and the inbox makes the repeat harmless.
	}
}

function nack(ch: Channel, msg: ConsumeMessage): void {
	try {
		ch.nack(msg, false, true);
	} catch {
		// Channel closed: the message is redelivered anyway.
	}
}

function header(msg: GetMessage, name: string): string | undefined {
	const value: unknown = msg.properties.headers?.[name];
	if (value === undefined || value === null) return undefined;
	return Buffer.isBuffer(value) ? value.toString() : String(value);
}

function toDeadLetter(msg: GetMessage): DeadLetter {
	let event: DomainEvent;
	try {
		event = parseEvent(msg.content);
	} catch {
		// Kept as found, so an operator can see what arrived.
		event = {
			id: String(msg.properties.messageId ?? "unknown"),
			type: String(msg.properties.type ?? "unknown"),
			source: "unknown",
			occurredAt: "",
			payload: { raw: msg.content.toString("utf8", 0, Math.min(msg.content.length, 1_000)) },
		};
	}
	return {
		event,
		error: { name: header(msg, "x-error-name") ?? "Error", message: header(msg, "x-error-message") ?? "" },
		attempts: Number(header(msg, "x-attempts") ?? 0),
		failedAt: header(msg, "x-failed-at") ?? "",
	};
}
