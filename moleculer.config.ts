import { Errors, type ServiceBroker, type BrokerOptions, type Context, type Middleware, type Service } from "moleculer";
import { ShopAmqpTransporter, type ShopAmqpOptions } from "./lib/amqp-transporter";
import { config, type Config } from "./lib/config";

/**
 * Broker options for every node of the shop. Values come from `lib/config.ts`, the one place that
 * reads the environment; this file only maps them onto Moleculer.
 *
 * Docs: https://moleculer.services/docs/0.15/configuration.html
 */

/** amqplib takes the heartbeat only from the URL (`?heartbeat=`), not from the socket options. */
export function withHeartbeat(url: string, seconds: number): string {
	if (/[?&]heartbeat=/.test(url)) return url;
	return `${url}${url.includes("?") ? "&" : "?"}heartbeat=${seconds}`;
}

/**
 * The RabbitMQ URLs (with heartbeat) when the transporter is AMQP, else null. `amqp://a,amqp://b` (or
 * `;`-separated) lists the nodes of a RabbitMQ cluster; they are tried in turn.
 */
export function amqpUrls(cfg: Pick<Config, "transporter" | "amqp">): string[] | null {
	const urls = (cfg.transporter ?? "").split(/[,;\s]+/).filter(Boolean);
	if (urls.length === 0 || !urls.every((url) => /^amqps?:\/\//i.test(url))) return null;
	return urls.map((url) => withHeartbeat(url, cfg.amqp.heartbeatSeconds));
}

/** The AMQP transporter with the options that make it usable (measured in bench/broker.ts) and its fixes. */
export function amqpTransporter(urls: string[], amqp: Config["amqp"]): ShopAmqpTransporter {
	const options: ShopAmqpOptions = {
		url: urls,
		prefetch: amqp.prefetch,
		socketOptions: { noDelay: amqp.noDelay },
		autoDeleteQueues: amqp.autoDeleteQueuesMs,
		eventTimeToLive: amqp.eventTimeToLiveMs ?? undefined,
		heartbeatTimeToLive: amqp.heartbeatTimeToLiveMs ?? undefined,
	};
	return new ShopAmqpTransporter(options);
}

/** RabbitMQ through {@link amqpTransporter}; any other scheme is left to Moleculer's own parser (nats://, tcp://, TCP …). */
export function transporterFrom(cfg: Pick<Config, "transporter" | "amqp">): BrokerOptions["transporter"] {
	if (!cfg.transporter) return null;
	const urls = amqpUrls(cfg);
	if (urls) return amqpTransporter(urls, cfg.amqp);
	return cfg.transporter as BrokerOptions["transporter"];
}

/**
 * Moleculer 0.15.2 drops the pending request of a remote call that timed out (its ErrorHandler
 * middleware) without settling the promise that request tracking waits for. A node that ever called
 * a node that never answered (a crashed one) then spent the whole `tracking.shutdownTimeout` on stop
 * and logged GracefulStopTimeoutError. Registered before Moleculer's own middlewares, this sits inside
 * the tracker and settles that promise shortly after the caller's own timeout has answered.
 */
export const SettleTimedOutCalls: Middleware = {
	name: "SettleTimedOutCalls",
	remoteAction(next) {
		return function (this: Service, ctx: Context) {
			const pending = next.call(this, ctx);
			const timeout = ctx.options.timeout ?? 0;
			if (timeout <= 0) return pending;
			let timer: NodeJS.Timeout | undefined;
			const settled = new Promise<never>((_, reject) => {
				// Later than the Timeout middleware's own deadline, which keeps answering the caller.
				timer = setTimeout(() => reject(new Errors.RequestTimeoutError({ action: ctx.action?.name, nodeID: ctx.nodeID })), timeout + 1_000);
			});
			return Promise.race([pending, settled]).finally(() => clearTimeout(timer));
		};
	},
};

/**
 * Moleculer's heartbeat timer can fire while a stopping node's AMQP channel is closing; amqplib then
 * rejects the publish ("Channel closing") and the unhandled rejection killed the node with exit 1
 * in the middle of a graceful stop. A publish that fails while the broker stops is dropped.
 */
export function DropPublishWhileStopping(): Middleware {
	let broker: ServiceBroker | undefined;
	return {
		name: "DropPublishWhileStopping",
		created(b: ServiceBroker) {
			broker = b;
		},
		transporterSend(next: (...args: unknown[]) => Promise<void>) {
			return (...args: unknown[]) =>
				Promise.resolve()
					.then(() => next(...args))
					.catch((err: Error) => {
						if (broker && !broker.started) return;
						throw err;
					});
		},
	} as unknown as Middleware;
}

export function brokerOptions(cfg: Config): BrokerOptions {
	return {
		namespace: cfg.namespace,
		nodeID: cfg.nodeID ?? null,

		logger: {
			type: "Console",
			options: { colors: process.stdout.isTTY, moduleColors: false, formatter: "short", autoPadding: false },
		},
		logLevel: cfg.logLevel,

		transporter: transporterFrom(cfg),
		serializer: cfg.serializer,
		cacher: cfg.cacher as BrokerOptions["cacher"],

		requestTimeout: cfg.requestTimeoutMs,
		// Moleculer's defaults (10 s / 30 s) leave a crashed node in the registry for up to a minute;
		// every request routed to it meanwhile times out.
		heartbeatInterval: cfg.heartbeat.intervalSeconds,
		heartbeatTimeout: cfg.heartbeat.timeoutSeconds,
		// Retries only happen for errors Moleculer marks retryable (timeouts, a node that left). Calls
		// to actions that are not idempotent pass `retries: 0` explicitly.
		retryPolicy: {
			enabled: cfg.retry.enabled,
			retries: cfg.retry.retries,
			delay: cfg.retry.delayMs,
			maxDelay: cfg.retry.maxDelayMs,
			factor: 2,
		},
		circuitBreaker: {
			enabled: cfg.circuitBreaker.enabled,
			threshold: cfg.circuitBreaker.threshold,
			minRequestCount: cfg.circuitBreaker.minRequestCount,
			windowTime: 60,
			halfOpenTime: cfg.circuitBreaker.halfOpenTimeMs,
		},
		bulkhead: {
			enabled: cfg.bulkhead.enabled,
			concurrency: cfg.bulkhead.concurrency,
			maxQueueSize: cfg.bulkhead.maxQueueSize,
		},

		registry: {
			strategy: "RoundRobin",
			preferLocal: true,
			// Time for other nodes to learn that this one is leaving before it stops its services.
			stopDelay: cfg.shutdownDelayMs,
		},
		// Track in-flight requests so a stopping node finishes them before it disconnects.
		tracking: { enabled: true, shutdownTimeout: Math.max(cfg.requestTimeoutMs, 1_000) },
		middlewares: [SettleTimedOutCalls, DropPublishWhileStopping()],

		validator: true,

		metrics: {
			enabled: cfg.metricsPort !== null,
			reporter: [{ type: "Prometheus", options: { port: cfg.metricsPort ?? 3030, path: "/metrics" } }],
		},
		tracing: { enabled: false },
	};
}

export default brokerOptions(config);
