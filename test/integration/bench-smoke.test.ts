import { formatRestMarkdown, runRestBench } from "../../bench/rest";
import { describeWithInfra, infra } from "../support/infra";

/** The benchmark's smoke mode, so `npm run bench` cannot rot; its numbers are not asserted. */
describeWithInfra("npm run bench -- --smoke", () => {
	it("measures every scenario on the in-process and the tuned AMQP topology without errors", async () => {
		const result = await runRestBench({ amqpUrl: infra!.amqpUrl, mongoUri: infra!.mongoUri, smoke: true, log: () => undefined });
		expect(result.rows).toHaveLength(2 * 3 * 2);
		for (const row of result.rows) {
			expect(row.requestsPerSec).toBeGreaterThan(0);
			expect(row.errors).toBe(0);
		}
		expect(formatRestMarkdown(result)).toMatch(/\| get-product \| 50 \| amqp-tuned \|/);
	}, 180_000);
});
