/* global process, fetch, AbortSignal, console */
// The container healthcheck (Dockerfile HEALTHCHECK, docker-compose.yml): plain JavaScript because the
// image holds compiled output only, and it must not load the application to judge it.
//
// A node running the gateway answers the contract's GET /api/health (with --ready: /api/health/ready,
// every service and its database ready). Other nodes have no HTTP API; with METRICS_PORT set, their
// Prometheus endpoint shows whether the broker has started and is connected to the transporter.
"use strict";

const TIMEOUT_MS = 3_000;

async function get(url) {
	const res = await fetch(url, { signal: AbortSignal.timeout(TIMEOUT_MS) });
	return { status: res.status, body: await res.text() };
}

/** Resolves with null when healthy, or the reason it is not. */
async function check() {
	const services = process.env.SERVICES ?? "";
	// No SERVICES means every service of SERVICEDIR, the gateway included.
	if (services.trim() === "" || /\bapi\b/.test(services)) {
		const path = process.argv.includes("--ready") ? "/api/health/ready" : "/api/health";
		const { status, body } = await get(`http://127.0.0.1:${process.env.PORT || 3000}${path}`);
		return status === 200 ? null : `${path} answered ${status}: ${body}`;
	}
	if (!process.env.METRICS_PORT) {
		console.log("no METRICS_PORT: this node has no HTTP endpoint to probe");
		return null;
	}
	const { status, body } = await get(`http://127.0.0.1:${process.env.METRICS_PORT}/metrics`);
	if (status !== 200) return `metrics answered ${status}`;
	for (const metric of ["moleculer_broker_started", "moleculer_transit_connected"]) {
		if (!new RegExp(`^${metric}(\\{[^}]*\\})? 1$`, "m").test(body)) return `${metric} is not 1`;
	}
	return null;
}

check().then(
	(problem) => {
		if (problem) console.log(problem);
		process.exit(problem ? 1 : 0);
	},
	(err) => {
		console.log(`unreachable: ${err.cause?.code ?? err.name}`);
		process.exit(1);
	},
);
