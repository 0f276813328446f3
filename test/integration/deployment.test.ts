import { spawnSync } from "node:child_process";
import fs from "node:fs";
import { builtinModules } from "node:module";
import path from "node:path";
import { loadConfig } from "../../lib/config";

const ROOT = path.resolve(__dirname, "../..");
const read = (file: string) => fs.readFileSync(path.join(ROOT, file), "utf8");

/**
 * docker-compose.yml is validated by a real compose parser: Debian's docker-compose (v1.29) runs
 * `config` without a Docker engine. Skipped with a printed reason where it is not installed; under
 * CI=true its absence fails the run, like the infrastructure tests.
 */
function resolveCompose(): boolean {
	if (spawnSync("docker-compose", ["version"], { encoding: "utf8" }).status === 0) return true;
	const install = "apt-get install --no-install-recommends docker-compose";
	if (process.env.CI === "true")
		throw new Error(`CI=true but docker-compose is not installed (${install}): the compose file must be validated in CI.`);
	console.warn(`Skipping the docker-compose.yml validation: docker-compose is not installed (${install}).`);
	return false;
}
const describeWithCompose: jest.Describe = resolveCompose() ? describe : describe.skip;

interface Instruction {
	stage: string;
	keyword: string;
	args: string;
}

/** The Dockerfile's instructions, line continuations joined and comments dropped, each with its stage's name. */
function dockerfile(): Instruction[] {
	const lines = read("Dockerfile")
		.replace(/\\\n/g, " ")
		.split("\n")
		.filter((line) => line.trim() && !line.trim().startsWith("#"));
	let stage = "";
	return lines.map((line) => {
		const [, keyword, args] = /^\s*(\w+)\s+(.*)$/.exec(line)!;
		if (keyword.toUpperCase() === "FROM") stage = /\bAS\s+(\S+)/i.exec(args)?.[1] ?? args;
		return { stage, keyword: keyword.toUpperCase(), args: args.trim() };
	});
}

/** Docker's .dockerignore semantics for the patterns used here: the last matching line wins, `!` re-includes. */
function inBuildContext(file: string): boolean {
	const rules = read(".dockerignore")
		.split("\n")
		.map((line) => line.trim())
		.filter((line) => line && !line.startsWith("#"));
	let included = true;
	for (const rule of rules) {
		const negated = rule.startsWith("!");
		const pattern = rule.replace(/^!/, "").replace(/\/$/, "");
		const regex = new RegExp(`^${pattern.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, "[^/]*")}(/.*)?$`);
		if (regex.test(file)) included = negated;
	}
	return included;
}

/** Packages a runtime source file loads (type-only imports are erased by the compiler). */
function runtimePackages(file: string): string[] {
	const source = read(file);
	const specifiers = [
		...source.matchAll(/^import\s+(?!type\s)[^;]*?\s+from\s+"([^"]+)"/gm),
		...source.matchAll(/^import\s+"([^"]+)"/gm),
		...source.matchAll(/\brequire\("([^"]+)"\)/g),
	].map((m) => m[1]);
	return specifiers
		.filter((s) => !s.startsWith(".") && !s.startsWith("node:") && !builtinModules.includes(s))
		.map((s) =>
			s
				.split("/")
				.slice(0, s.startsWith("@") ? 2 : 1)
				.join("/"),
		);
}

function filesUnder(dir: string): string[] {
	return fs
		.readdirSync(path.join(ROOT, dir), { recursive: true, encoding: "utf8" })
		.filter((f) => f.endsWith(".ts"))
		.map((f) => path.join(dir, f));
}

describe("Dockerfile", () => {
	const instructions = dockerfile();
	const stages = instructions.filter((i) => i.keyword === "FROM");
	const runtime = instructions.filter((i) => i.stage === "runtime");
	const build = instructions.filter((i) => i.stage === "build");

	it("builds in a stage of its own with the same npm ci and npm run build as CI, on Node 24", () => {
		expect(stages.map((s) => s.args)).toEqual([
			expect.stringMatching(/^node:24-\S+ AS build$/),
			expect.stringMatching(/^node:24-\S+ AS runtime$/),
		]);
		expect(build.filter((i) => i.keyword === "RUN").map((i) => i.args)).toEqual(["npm ci --no-audit --no-fund", "npm run build"]);
		expect(read(".ci/run")).toMatch(/^npm ci --no-audit --no-fund$/m);
		expect(JSON.parse(read("package.json")).scripts.build).toBe("tsc -p tsconfig.build.json");
	});

	it("runs production dependencies and compiled JavaScript only, as a non-root user", () => {
		expect(stages[1].args).toMatch(/^node:24-(alpine|slim|bookworm-slim) /);
		expect(runtime.filter((i) => i.keyword === "RUN").map((i) => i.args)).toEqual([
			"npm ci --omit=dev --no-audit --no-fund && npm cache clean --force",
		]);
		const copies = runtime.filter((i) => i.keyword === "COPY").map((i) => i.args);
		expect(copies).toEqual([
			"package.json package-lock.json ./",
			"--from=build /app/dist ./dist",
			"scripts/healthcheck.cjs ./scripts/healthcheck.cjs",
		]);
		const user = runtime.findIndex((i) => i.keyword === "USER");
		expect(runtime[user].args).toBe("node");
		expect(user).toBeLessThan(runtime.findIndex((i) => i.keyword === "CMD"));
		expect(runtime.find((i) => i.keyword === "ENV" && i.args.includes("NODE_ENV"))?.args).toBe("NODE_ENV=production");
	});

	it("starts moleculer-runner on the compiled config, services chosen by SERVICES, with a HEALTHCHECK", () => {
		const cmd = JSON.parse(runtime.find((i) => i.keyword === "CMD")!.args) as string[];
		expect(cmd).toEqual(["node", "dist/runner.js", "--config", "dist/moleculer.config.js"]);
		// The same runner and config as `npm start`.
		expect(JSON.parse(read("package.json")).scripts.start).toContain("node dist/runner.js --config dist/moleculer.config.js");
		expect(runtime.find((i) => i.keyword === "ENV" && i.args.includes("SERVICEDIR"))?.args).toMatch(/\bSERVICEDIR=dist\/services\b/);
		expect(runtime.find((i) => i.keyword === "HEALTHCHECK")?.args).toMatch(/ CMD \["node", "scripts\/healthcheck\.cjs"\]$/);
		// tsconfig.build.json compiles runner.ts, moleculer.config.ts and services/*.ts to exactly these paths.
		const tsBuild = JSON.parse(read("tsconfig.build.json")) as { include: string[] };
		expect(tsBuild.include).toEqual(expect.arrayContaining(["runner.ts", "moleculer.config.ts", "services/**/*.ts"]));
	});

	it("gets every file it copies from the build context, and never .env, .git, node_modules or dist", () => {
		const sources = instructions
			.filter((i) => i.keyword === "COPY" && !i.args.startsWith("--from"))
			.flatMap((i) => i.args.split(/\s+/).slice(0, -1));
		expect(sources.length).toBeGreaterThan(5);
		for (const source of sources) {
			expect(fs.existsSync(path.join(ROOT, source))).toBe(true);
			expect([source, inBuildContext(source)]).toEqual([source, true]);
		}
		for (const excluded of [
			".env",
			".git/config",
			"node_modules/moleculer/package.json",
			"dist/moleculer.config.js",
			"test/unit/money.test.ts",
		]) {
			expect([excluded, inBuildContext(excluded)]).toEqual([excluded, false]);
		}
	});

	it("installs with --omit=dev every package the compiled services load", () => {
		// What `npm ci --omit=dev` installs: the lockfile's packages not marked dev-only.
		const lock = JSON.parse(read("package-lock.json")) as { packages: Record<string, { dev?: boolean }> };
		const installed = (pkg: string) => lock.packages[`node_modules/${pkg}`] !== undefined && !lock.packages[`node_modules/${pkg}`].dev;
		const sources = ["runner.ts", "moleculer.config.ts", ...filesUnder("services"), ...filesUnder("mixins"), ...filesUnder("lib")];
		const loaded = new Set(sources.flatMap(runtimePackages));
		// Moleculer requires these by configuration: the AMQP transporter, a Redis cacher, the serializers.
		for (const byConfig of ["amqplib", "ioredis", "cbor-x", "notepack.io"]) loaded.add(byConfig);
		expect(loaded.size).toBeGreaterThan(8);
		expect([...loaded].filter((pkg) => !installed(pkg))).toEqual([]);
	});
});

describeWithCompose("docker-compose.yml (validated by docker-compose config)", () => {
	const NODES = ["api", "users", "products", "orders"];
	const SCALABLE = ["users", "products", "orders"];

	interface ComposeService {
		image?: string;
		build?: { context: string };
		environment?: Record<string, string>;
		depends_on?: Record<string, { condition: string }>;
		healthcheck?: { test: string[] };
		ports?: Array<{ published: number; target: number }>;
		container_name?: string;
		volumes?: string[];
		profiles?: string[];
	}
	interface Compose {
		services: Record<string, ComposeService>;
		volumes: Record<string, unknown>;
	}

	function compose(args: string[], env: Record<string, string> = {}): string {
		const out = spawnSync("docker-compose", args, {
			cwd: ROOT,
			encoding: "utf8",
			env: { PATH: process.env.PATH, HOME: process.env.HOME, ...env },
		});
		if (out.status !== 0) throw new Error(`docker-compose ${args.join(" ")} failed:\n${out.stderr}`);
		return out.stdout;
	}

	/** The resolved model (`.env`, docker-compose.env and anchors applied), as JSON through Python's YAML, a docker-compose dependency. */
	function resolved(env: Record<string, string> = {}): Compose {
		const yaml = compose(["config"], env);
		const json = spawnSync("python3", ["-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"], {
			input: yaml,
			encoding: "utf8",
		});
		return JSON.parse(json.stdout) as Compose;
	}

	let model: Compose;
	beforeAll(() => {
		model = resolved({ PORT: "4123" });
	});

	it("is valid, with RabbitMQ, MongoDB, the gateway and one service per node, Redis behind a profile", () => {
		expect(compose(["config", "--quiet"])).toBe("");
		expect(Object.keys(model.services).sort()).toEqual(["api", "mongo", "orders", "products", "rabbitmq", "redis", "users"]);
		expect(compose(["config", "--profiles"]).trim()).toBe("cache");
		expect(model.services.redis.profiles).toEqual(["cache"]);
	});

	it("runs RabbitMQ with the management plugin and MongoDB, each with a healthcheck and a named volume", () => {
		const { rabbitmq, mongo } = model.services;
		expect(rabbitmq.image).toMatch(/^rabbitmq:\S*management/);
		expect(rabbitmq.healthcheck?.test).toEqual(["CMD", "rabbitmq-diagnostics", "-q", "check_port_connectivity"]);
		expect(rabbitmq.volumes).toEqual(["rabbitmq-data:/var/lib/rabbitmq:rw"]);
		expect(mongo.healthcheck?.test.slice(0, 2)).toEqual(["CMD", "mongosh"]);
		expect(mongo.volumes).toEqual(["mongo-data:/data/db:rw"]);
		expect(Object.keys(model.volumes).sort()).toEqual(["mongo-data", "rabbitmq-data", "redis-data"]);
	});

	it("runs every node from the one image, SERVICES choosing its service, addressed by compose hostnames", () => {
		const rabbit = model.services.rabbitmq.environment!;
		for (const name of NODES) {
			const service = model.services[name];
			const env = service.environment!;
			expect([name, service.image, service.build?.context, env.SERVICES]).toEqual([name, "moleculer-shop:latest", ROOT, name]);
			const amqp = new URL(env.TRANSPORTER);
			expect([amqp.hostname, amqp.username, amqp.password]).toEqual([
				"rabbitmq",
				rabbit.RABBITMQ_DEFAULT_USER,
				rabbit.RABBITMQ_DEFAULT_PASS,
			]);
			// RabbitMQ refuses its guest user from other hosts.
			expect(amqp.username).not.toBe("guest");
			expect(new URL(env.MONGO_URI).hostname).toBe("mongo");
			expect([env.PORT, env.METRICS_PORT]).toEqual(["3000", "3030"]);
			// What the container's process will read passes the application's own validation.
			expect(loadConfig(env)).toMatchObject({ nodeEnv: "production", metricsPort: 3030, transporter: env.TRANSPORTER });
		}
	});

	it("starts each node after its dependencies are healthy", () => {
		const healthy = { condition: "service_healthy" };
		expect(model.services.api.depends_on).toEqual({ rabbitmq: healthy });
		for (const name of SCALABLE) expect(model.services[name].depends_on).toEqual({ rabbitmq: healthy, mongo: healthy });
		for (const dependency of ["rabbitmq", "mongo"]) expect(model.services[dependency].healthcheck).toBeDefined();
	});

	it("publishes only the gateway, on PORT, and its healthcheck is the contract's readiness", () => {
		expect(model.services.api.ports).toEqual([{ published: 4123, target: 3000 }]);
		expect(resolved({}).services.api.ports).toEqual([{ published: 3000, target: 3000 }]);
		expect(model.services.api.healthcheck?.test).toEqual(["CMD", "node", "scripts/healthcheck.cjs", "--ready"]);
	});

	it("can scale users, products and orders: no fixed container names, no host ports", () => {
		for (const [name, service] of Object.entries(model.services)) expect([name, service.container_name]).toEqual([name, undefined]);
		for (const name of SCALABLE) expect([name, model.services[name].ports]).toEqual([name, undefined]);
	});
});
