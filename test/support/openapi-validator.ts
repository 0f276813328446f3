import Ajv2020, { type ValidateFunction } from "ajv/dist/2020";
import addFormats from "ajv-formats";
import type { OpenApiDocument } from "../../lib/openapi";

interface Operation {
	method: string;
	template: string;
	segments: string[];
	responses: Record<string, { content?: Record<string, unknown> }>;
}

const SPEC_ID = "openapi.json";

/**
 * Checks REST responses against the OpenAPI document the gateway serves: the status must be one the
 * operation documents, and the body must match that status's schema (response schemas allow no
 * undeclared field). A request that matches no operation must be answered 404 in the error shape.
 */
export class OpenApiContract {
	private readonly ajv = new Ajv2020({ allErrors: true, strict: true });
	private readonly operations: Operation[] = [];
	private readonly validators = new Map<string, ValidateFunction>();
	/** `METHOD template` of every operation that answered a success status through `problems`. */
	private readonly succeeded = new Set<string>();

	constructor(readonly spec: OpenApiDocument) {
		addFormats(this.ajv);
		// The document's own keywords are no schema keywords; its schemas are reached through $ref pointers.
		this.ajv.addVocabulary(["openapi", "info", "servers", "tags", "paths", "components"]);
		this.ajv.addSchema(spec, SPEC_ID);
		for (const [template, ops] of Object.entries(spec.paths)) {
			for (const [method, op] of Object.entries(ops)) {
				this.operations.push({ method: method.toUpperCase(), template, segments: template.split("/"), responses: op.responses });
			}
		}
	}

	/** The document the gateway at `baseUrl` (…/api) serves now. */
	static async fetch(baseUrl: string): Promise<OpenApiContract> {
		const res = await fetch(`${baseUrl}/openapi.json`);
		if (res.status !== 200) throw new Error(`GET ${baseUrl}/openapi.json answered ${res.status}`);
		return new OpenApiContract((await res.json()) as OpenApiDocument);
	}

	/**
	 * What is wrong with one response ([] if nothing): `path` is relative to the API's server URL (as
	 * given to `http()`), with or without a query string; `body` is the parsed JSON, `null` for none.
	 */
	problems(method: string, path: string, status: number, body: unknown): string[] {
		const request = `${method.toUpperCase()} ${path}`;
		const op = this.match(method.toUpperCase(), path.split("?")[0]);
		if (!op) {
			if (status !== 404) return [`${request} is in no operation of the spec, yet answered ${status}`];
			return this.validate("#/components/schemas/Error", body, `${request} → 404`);
		}
		const response = op.responses[String(status)];
		const where = `${request} (${op.method} ${op.template}) → ${status}`;
		if (!response) return [`${where}: status not documented (documented: ${Object.keys(op.responses).join(", ")})`];
		if (status < 300) this.succeeded.add(`${op.method} ${op.template}`);
		if (!response.content) return body === null ? [] : [`${where}: documented without a body, answered ${JSON.stringify(body)}`];
		const pointer = ["paths", op.template, op.method.toLowerCase(), "responses", String(status), "content", "application/json", "schema"];
		return this.validate(`#/${pointer.map((p) => encodeURIComponent(p.replace(/~/g, "~0").replace(/\//g, "~1"))).join("/")}`, body, where);
	}

	/** Throws with every problem of the response. */
	assertResponse(method: string, path: string, status: number, body: unknown): void {
		const problems = this.problems(method, path, status, body);
		if (problems.length > 0) throw new Error(`Response does not match the OpenAPI document:\n${problems.join("\n")}`);
	}

	/** Operations of the document that have not yet answered a success status in a checked response. */
	unexercised(): string[] {
		return this.operations.map((op) => `${op.method} ${op.template}`).filter((key) => !this.succeeded.has(key));
	}

	/** The operation the gateway routes the request to: of those with the method, the one with the most literal segments. */
	private match(method: string, path: string): Operation | undefined {
		const segments = path.replace(/\/$/, "").split("/");
		const literals = (op: Operation) => op.segments.filter((s) => !s.startsWith("{")).length;
		return this.operations
			.filter((op) => op.method === method && op.segments.length === segments.length)
			.filter((op) => op.segments.every((s, i) => (s.startsWith("{") ? segments[i].length > 0 : s === segments[i])))
			.sort((a, b) => literals(b) - literals(a))[0];
	}

	private validate(pointer: string, body: unknown, where: string): string[] {
		let validate = this.validators.get(pointer);
		if (!validate) {
			validate = this.ajv.compile({ $ref: `${SPEC_ID}${pointer}` });
			this.validators.set(pointer, validate);
		}
		if (validate(body)) return [];
		return (validate.errors ?? []).map((e) => `${where}: body${e.instancePath} ${e.message ?? ""} ${JSON.stringify(e.params)}`);
	}
}
