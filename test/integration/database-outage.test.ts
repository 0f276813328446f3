import { Cluster, http } from "../support/cluster";
import { eventually } from "../support/eventually";
import { FerretServer, freePort } from "../support/ferretdb";
import { infra, uniqueName } from "../support/infra";

const ferretBin = process.env.TEST_FERRETDB_BIN;
if (!ferretBin && process.env.CI === "true")
	throw new Error("CI=true but TEST_FERRETDB_BIN is not set: the database outage test must run in CI.");
if (!ferretBin) console.warn("Skipping the database outage test: TEST_FERRETDB_BIN (a FerretDB binary) not set.");
const describeOutage: jest.Describe = infra && ferretBin ? describe : describe.skip;

/** The products service against a database of its own that the test takes away and brings back. */
describeOutage("a database that is down at start or goes away later", () => {
	let ferret: FerretServer;
	let cluster: Cluster;
	const get = (path: string) => http(cluster.baseUrl, "GET", path);
	// Distinct searches, so the cache never answers for the database.
	const uncachedList = () => get(`/products?search=${uniqueName("q")}`);

	beforeAll(async () => {
		ferret = new FerretServer(ferretBin!, await freePort());
		cluster = new Cluster({
			infra: { amqpUrl: infra!.amqpUrl, mongoUri: ferret.uri },
			namespace: uniqueName("outage"),
			env: { MONGO_SERVER_SELECTION_TIMEOUT_MS: "1000" },
		});
	});

	afterAll(async () => {
		await cluster?.stopAll();
		await ferret?.destroy();
	});

	it("waits for the database at start with a clear log line, then serves", async () => {
		cluster.start("api");
		const products = cluster.start("products");
		await eventually(async () => (/MongoDB is not reachable/.test(products.output()) ? true : undefined));
		const notReady = await get("/health/ready");
		expect(notReady.status).toBe(503);
		expect(notReady.body).toMatchObject({ code: 503, data: { services: { products: "unavailable" } } });

		await ferret.start();
		await eventually(async () => ((await uncachedList()).status === 200 ? true : undefined), 30_000);
	});

	it("answers 503 while the database is away, and recovers by itself", async () => {
		await ferret.stop();
		const during = await uncachedList();
		expect(during.status).toBe(503);
		expect(during.body).toMatchObject({ code: 503, type: "DATABASE_UNAVAILABLE" });
		expect(JSON.stringify(during.body)).not.toMatch(/127\.0\.0\.1|Mongo|ferret/i);

		await ferret.start();
		await eventually(async () => ((await uncachedList()).status === 200 ? true : undefined), 30_000);
		const logs = cluster.nodes.find((n) => n.name.startsWith("products"))!.output();
		expect(logs).toMatch(/MongoDB disconnected/);
	});
});
