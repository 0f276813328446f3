/**
 * `npm run seed`: loads a demo catalogue through the REST API as the admin (ADMIN_EMAIL /
 * ADMIN_PASSWORD), so it works against any topology: `npm run dev`, the process cluster, compose.
 * Idempotent: every product has a fixed `sku`, and a second run skips the ones that exist (409).
 *
 *   npm run seed -- [--url http://localhost:3000/api] [--count 300]
 */
import { config } from "../lib/config";

const CATEGORIES = {
	books: ["Novel", "Cookbook", "Atlas", "Field guide", "Anthology", "Biography"],
	kitchen: ["Kettle", "Chef's knife", "Cast-iron pan", "Teapot", "Cutting board", "Spice rack"],
	garden: ["Trowel", "Watering can", "Pruning shears", "Seed tray", "Hose reel", "Planter"],
	office: ["Notebook", "Fountain pen", "Desk lamp", "Stapler", "Monitor stand", "Paper tray"],
	outdoor: ["Tent", "Sleeping bag", "Headlamp", "Water bottle", "Trekking poles", "Camp stove"],
	toys: ["Puzzle", "Kite", "Building blocks", "Yo-yo", "Board game", "Spinning top"],
} as const;
const ADJECTIVES = ["Classic", "Compact", "Deluxe", "Everyday", "Heritage", "Modern", "Rugged", "Travel"];

export interface SeedProduct {
	sku: string;
	name: string;
	description: string;
	category: string;
	price: number;
	currency: string;
	stock: number;
}

/** The same catalogue every time: product n is derived from n alone. */
export function catalogue(count: number): SeedProduct[] {
	const categories = Object.entries(CATEGORIES);
	return Array.from({ length: count }, (_, n) => {
		const [category, nouns] = categories[n % categories.length];
		const noun = nouns[Math.floor(n / categories.length) % nouns.length];
		const adjective = ADJECTIVES[Math.floor(n / (categories.length * nouns.length)) % ADJECTIVES.length];
		return {
			sku: `SEED-${String(n + 1).padStart(4, "0")}`,
			name: `${adjective} ${noun.toLowerCase()} #${n + 1}`,
			description: `A ${adjective.toLowerCase()} ${noun.toLowerCase()} from the ${category} range.`,
			category,
			price: 499 + ((n * 7919) % 20_000), // integer cents, spread over 4.99 … 204.98
			currency: "USD",
			stock: 50 + ((n * 31) % 500),
		};
	});
}

export interface SeedOptions {
	baseUrl: string;
	email: string;
	password: string;
	count: number;
	concurrency?: number;
}

/** Creates the missing products; returns how many were created and how many already existed. */
export async function seed(opts: SeedOptions): Promise<{ created: number; existing: number }> {
	const login = await fetch(`${opts.baseUrl}/users/login`, {
		method: "POST",
		headers: { "content-type": "application/json" },
		body: JSON.stringify({ email: opts.email, password: opts.password }),
	});
	if (login.status !== 200) throw new Error(`admin login failed with ${login.status}: ${await login.text()}`);
	const { token } = (await login.json()) as { token: string };

	const pending = catalogue(opts.count);
	let created = 0;
	let existing = 0;
	const worker = async () => {
		for (let product = pending.shift(); product; product = pending.shift()) {
			const res = await fetch(`${opts.baseUrl}/products`, {
				method: "POST",
				headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
				body: JSON.stringify(product),
			});
			if (res.status === 201) created++;
			else if (res.status === 409) existing++;
			else throw new Error(`creating ${product.sku} failed with ${res.status}: ${await res.text()}`);
		}
	};
	await Promise.all(Array.from({ length: opts.concurrency ?? 8 }, worker));
	return { created, existing };
}

function arg(name: string): string | undefined {
	const i = process.argv.indexOf(`--${name}`);
	return i >= 0 ? process.argv[i + 1] : undefined;
}

if (require.main === module) {
	const { adminEmail, adminPassword } = config.auth;
	if (!adminEmail || !adminPassword) {
		console.error("Set ADMIN_EMAIL and ADMIN_PASSWORD (the admin the users service seeds) to run the seed.");
		process.exit(2);
	}
	seed({
		baseUrl: arg("url") ?? `http://localhost:${config.port}/api`,
		email: adminEmail,
		password: adminPassword,
		count: Number(arg("count") ?? 300),
	})
		.then(({ created, existing }) => console.log(`Seeded the catalogue: ${created} created, ${existing} already there.`))
		.catch((err: Error) => {
			console.error(`Seed failed: ${err.message}`);
			process.exit(1);
		});
}
