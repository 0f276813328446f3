/**
 * Where the real RabbitMQ and MongoDB-wire server are. Infrastructure tests run when both are
 * configured, are skipped with a printed reason on a laptop without them, and fail under CI=true.
 */
export interface Infra {
	amqpUrl: string;
	mongoUri: string;
}

function resolveInfra(): Infra | null {
	const amqpUrl = process.env.TEST_AMQP_URL;
	const mongoUri = process.env.TEST_MONGO_URI;
	if (amqpUrl && mongoUri) return { amqpUrl, mongoUri };
	const missing = [!amqpUrl && "TEST_AMQP_URL", !mongoUri && "TEST_MONGO_URI"].filter(Boolean).join(" and ");
	if (process.env.CI === "true") {
		throw new Error(`CI=true but ${missing} is not set: infrastructure tests must run in CI.`);
	}
	console.warn(`Skipping infrastructure tests: ${missing} not set (see README, "Tests").`);
	return null;
}

export const infra = resolveInfra();

/** `describe` when RabbitMQ and MongoDB are configured, a reported skip otherwise. */
export const describeWithInfra: jest.Describe = infra ? describe : describe.skip;

/** A namespace / database prefix of its own per test file, so suites never see each other's nodes or data. */
export function uniqueName(prefix: string): string {
	return `${prefix}-${process.pid}-${Date.now().toString(36)}`;
}

export { eventually } from "./eventually";
