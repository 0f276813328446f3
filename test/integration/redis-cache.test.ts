import Redis from "ioredis";
import { Cluster, http } from "../support/cluster";
import { infra, uniqueName } from "../support/infra";

const redisUrl = process.env.TEST_REDIS_URL;
if (!redisUrl && process.env.CI === "true") throw new Error("CI=true but TEST_REDIS_URL is not set: the Redis cacher test must run in CI.");
if (!redisUrl) console.warn("Skipping the Redis cacher test: TEST_REDIS_URL not set.");
const describeRedis: jest.Describe = infra && redisUrl ? describe : describe.skip;

/** CACHER=redis://…: two products nodes share one cache, and a write through one is seen through the other. */
describeRedis("the Redis cacher shared by two products nodes", () => {
	const admin = { email: "admin@redis.test", password: "admin-password-1" };
	const namespace = uniqueName("redis");
	let cluster: Cluster;

	beforeAll(async () => {
		cluster = new Cluster({
			infra: infra!,
			namespace,
			env: {
				CACHER: redisUrl!,
				JWT_SECRET: "redis-test-secret-that-is-long-enough-1",
				ADMIN_EMAIL: admin.email,
				ADMIN_PASSWORD: admin.password,
			},
		});
		for (const service of ["api", "users", "products", "products", "orders"]) cluster.start(service);
		await cluster.waitReady();
	}, 90_000);

	afterAll(() => cluster?.stopAll());

	it("never serves a stale product after an update", async () => {
		const { body: login } = await http<{ token: string }>(cluster.baseUrl, "POST", "/users/login", { body: admin });
		const { body: product } = await http<{ id: string }>(cluster.baseUrl, "POST", "/products", {
			token: login.token,
			body: { name: "Cached in Redis", price: 100, stock: 1 },
		});
		for (let i = 0; i < 4; i++) expect((await http(cluster.baseUrl, "GET", `/products/${product.id}`)).body).toMatchObject({ price: 100 });
		const redis = new Redis(redisUrl!);
		try {
			// The entry lives in Redis, where both nodes read it, not in a node's memory.
			expect(await redis.keys(`MOL-${namespace}-products.get:*`)).toHaveLength(1);
		} finally {
			redis.disconnect();
		}
		const patched = await http(cluster.baseUrl, "PATCH", `/products/${product.id}`, { token: login.token, body: { price: 250 } });
		expect(patched.status).toBe(200);
		for (let i = 0; i < 6; i++) expect((await http(cluster.baseUrl, "GET", `/products/${product.id}`)).body).toMatchObject({ price: 250 });
	});
});
