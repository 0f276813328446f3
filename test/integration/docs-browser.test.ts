import { existsSync, mkdirSync } from "node:fs";
import path from "node:path";
import { ServiceBroker } from "moleculer";
import { chromium, type Browser, type Page } from "playwright-core";
import type { OpenApiDocument } from "../../lib/openapi";
import ApiService from "../../services/api.service";
import OrdersService from "../../services/orders.service";
import ProductsService from "../../services/products.service";
import UsersService from "../../services/users.service";
import { http } from "../support/cluster";
import { eventually } from "../support/eventually";

/** Debian's chromium package; playwright-core drives it (it downloads no browser of its own). */
const CHROMIUM = "/usr/bin/chromium";
const ARTIFACTS = path.resolve(__dirname, "../../test-artifacts");

/** Runs where Chromium is installed, is skipped with a printed reason elsewhere, and fails under CI=true without it. */
function chromiumPath(): string | null {
	if (existsSync(CHROMIUM)) return CHROMIUM;
	const reason = `${CHROMIUM} is missing (apt-get install chromium)`;
	if (process.env.CI === "true") throw new Error(`CI=true but ${reason}: the docs page must be tested in a browser in CI.`);
	console.warn(`Skipping the docs browser test: ${reason}.`);
	return null;
}

const executablePath = chromiumPath();
const describeWithChromium: jest.Describe = executablePath ? describe : describe.skip;

/** The docs page of the whole system (in one process), in headless Chromium, as a person would use it. */
describeWithChromium("the API docs page in a browser", () => {
	const port = 30_000 + Math.floor(Math.random() * 10_000);
	const base = `http://127.0.0.1:${port}/api`;
	let broker: ServiceBroker;
	let browser: Browser;
	let page: Page;
	/** Requests the page tried to send anywhere but this gateway (a CDN, the internet): there must be none. */
	const external: string[] = [];
	const pageErrors: string[] = [];

	beforeAll(async () => {
		broker = new ServiceBroker({ logger: false });
		broker.createService({ ...ApiService, settings: { ...ApiService.settings, port } });
		for (const schema of [UsersService, ProductsService, OrdersService]) broker.createService(schema);
		await broker.start();
		await eventually(async () => ((await http(base, "GET", "/health/ready")).status === 200 ? true : undefined));
		browser = await chromium.launch({
			executablePath: executablePath!,
			args: [
				"--headless",
				"--no-sandbox",
				"--disable-gpu",
				"--disable-quic",
				"--no-first-run",
				"--disable-background-networking",
				"--disable-component-update",
				"--disable-sync",
			],
		});
		page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
		page.setDefaultTimeout(20_000);
		page.on("pageerror", (err) => pageErrors.push(err.message));
		await page.route("**/*", (route) => {
			const url = new URL(route.request().url());
			if (url.host === `127.0.0.1:${port}`) return route.continue();
			external.push(url.href);
			return route.abort();
		});
	});

	afterAll(async () => {
		await browser?.close();
		await broker?.stop();
	});

	/** Opens an operation, presses "Try it out", optionally types the body, executes, and answers the status shown. */
	async function tryItOut(method: string, apiPath: string, body?: unknown): Promise<{ status: string; body: string }> {
		const op = page.locator(`.opblock-${method}`).filter({ has: page.locator(`.opblock-summary-path[data-path="${apiPath}"]`) });
		await op.locator(".opblock-summary").first().click();
		await op.getByRole("button", { name: "Try it out" }).click();
		if (body !== undefined) await op.locator("textarea.body-param__text").fill(JSON.stringify(body));
		await op.getByRole("button", { name: "Execute" }).click();
		const response = op.locator(".live-responses-table .response").first();
		return {
			status: (await response.locator(".response-col_status").innerText()).trim(),
			body: await response.locator(".response-col_description pre").first().innerText(),
		};
	}

	it("lists every operation of the document, and a registered user can try the API with the token", async () => {
		const spec = (await http<OpenApiDocument>(base, "GET", "/openapi.json")).body;
		const documented = Object.entries(spec.paths).flatMap(([p, ops]) => Object.keys(ops).map((m) => `${m} ${p}`));

		await page.goto(`${base}/docs`);
		await eventually(async () => ((await page.locator(".opblock").count()) === documented.length ? true : undefined), 20_000, 200);
		const listed = await page.locator(".opblock").evaluateAll((blocks) =>
			blocks.map((b) => {
				const method = [...b.classList].find((c) => c.startsWith("opblock-") && c !== "opblock-deprecated")!.slice("opblock-".length);
				return `${method} ${b.querySelector(".opblock-summary-path")!.getAttribute("data-path")}`;
			}),
		);
		expect(listed.sort()).toEqual(documented.sort());
		mkdirSync(ARTIFACTS, { recursive: true });
		await page.screenshot({ path: path.join(ARTIFACTS, "docs-browser-list.png") });

		const registered = await tryItOut("post", "/users/register", {
			email: "browser@example.com",
			password: "password-123",
			name: "Browser",
		});
		expect(registered.status).toBe("201");
		// The page took the token from the registration: a route that needs a user now answers.
		const me = await tryItOut("get", "/users/me");
		expect(me.status).toBe("200");
		expect(JSON.parse(me.body)).toMatchObject({ email: "browser@example.com", role: "customer" });

		await page.screenshot({ path: path.join(ARTIFACTS, "docs-browser-try-it-out.png"), fullPage: true });
		expect(external).toEqual([]);
		expect(pageErrors).toEqual([]);
	});
});
