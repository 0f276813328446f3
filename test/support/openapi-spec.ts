import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import path from "node:path";

/** swagger-parser's verdict on an OpenAPI document: `null` if valid, else its message. */
export function openApiProblems(doc: unknown): Promise<string | null> {
	return new Promise((resolve, reject) => {
		const child = spawn(process.execPath, [path.join(__dirname, "validate-openapi.cjs")], { stdio: ["pipe", "ignore", "pipe"] });
		let stderr = "";
		child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
		child.on("error", reject);
		// "close", not "exit": by then stderr has been read to its end.
		child.on("close", (code) => resolve(code === 0 ? null : stderr || `exit code ${code}`));
		child.stdin.end(JSON.stringify(doc));
	});
}

export interface ContractRoute {
	/** e.g. `GET /users/{id}`, relative to /api, as the OpenAPI document writes it. */
	route: string;
	/** The success status of its route table row; the operations section gives none. */
	status?: string;
}

/** The REST routes of the contract, ../shared/API.md (beside the repository), from its route tables and text. */
export function contractRoutes(): ContractRoute[] {
	const apiMd = readFileSync(path.resolve(__dirname, "../../../shared/API.md"), "utf8");
	const route = (method: string, p: string) => `${method} ${p.replace(/:(\w+)/g, "{$1}")}`;
	// Table rows: | METHOD /api/path | who | request | answer, starting with its status |, where "\|" is a pipe inside a cell.
	const cell = String.raw`(?:[^|\\]|\\.)*`;
	const statuses = new Map(
		[...apiMd.matchAll(new RegExp(String.raw`^\| (GET|POST|PATCH|PUT|DELETE) /api(\S*) \|${cell}\|${cell}\| (\d{3})\b`, "gm"))].map(
			([, method, p, status]) => [route(method, p), status],
		),
	);
	const all = new Set([...apiMd.matchAll(/\b(GET|POST|PATCH|PUT|DELETE) \/api(\/[^\s|`]*)/g)].map(([, method, p]) => route(method, p)));
	return [...all].map((r) => ({ route: r, status: statuses.get(r) }));
}
