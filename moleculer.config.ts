import type { BrokerOptions, TransporterConfig } from "moleculer";
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

/** Moleculer's AMQP transporter with the options that make it usable (measured in bench/broker.ts). */
export function amqpTransporter(urls: string[], amqp: Config["amqp"]): TransporterConfig {
	const withHb = urls.map((url) => withHeartbeat(url, amqp.heartbeatSeconds));
	return {
		type: "AMQP",
		options: {
			url: withHb.length === 1 ? withHb[0] : withHb,
			prefetch: amqp.prefetch,
			// Reaches amqplib's connect; missing from Moleculer's option type, hence the cast below.
			socketOptions: { noDelay: amqp.noDelay },
			autoDeleteQueues: amqp.autoDeleteQueuesMs,
			eventTimeToLive: amqp.eventTimeToLiveMs,
			heartbeatTimeToLive: amqp.heartbeatTimeToLiveMs,
		},
	} as TransporterConfig;
}

/**
 * `amqp://a,amqp://b` (or `;`-separated) lists the nodes of a RabbitMQ cluster; the transporter
 * tries them in turn. Any other scheme is left to Moleculer's own parser (nats://, tcp://, TCP …).
 */
export function transporterFrom(cfg: Pick<Config, "transporter" | "amqp">): BrokerOptions["transporter"] {
	if (!cfg.transporter) return null;
	const urls = cfg.transporter.split(/[,;\s]+/).filter(Boolean);
	if (urls.every((url) => /^amqps?:\/\//i.test(url))) return amqpTransporter(urls, cfg.amqp);
	return cfg.transporter as BrokerOptions["transporter"];
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

		validator: true,

		metrics: {
			enabled: cfg.metricsPort !== null,
			reporter: [{ type: "Prometheus", options: { port: cfg.metricsPort ?? 3030, path: "/metrics" } }],
		},
		tracing: { enabled: false },
	};
}

export default brokerOptions(config);
