/**
 * moleculer-runner without its environment overrides.
 *
 * moleculer-runner copies any environment variable named like a broker option over the config file
 * (TRANSPORTER, CACHER, SERIALIZER …). For TRANSPORTER that silently replaced the tuned AMQP
 * transporter of moleculer.config.ts with the bare URL, i.e. Moleculer's defaults (prefetch 1, no
 * TCP_NODELAY: ~43 ms per call). The environment is read and validated in lib/config.ts only.
 *
 * Flags and SERVICES/SERVICEDIR work as with moleculer-runner.
 */
import { Runner } from "moleculer";

class ShopRunner extends Runner {
	overwriteFromEnv<T>(config: T): T {
		return config;
	}
}

// The REPL reads stdin; without a terminal it would see end-of-input at once and stop the node.
const args = process.stdin.isTTY ? process.argv : process.argv.filter((arg) => arg !== "--repl" && arg !== "-r");

new ShopRunner().start(args);
