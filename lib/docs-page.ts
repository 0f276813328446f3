import type { IncomingMessage, ServerResponse } from "node:http";
import type { Service } from "moleculer";
import ApiGateway, { type ApiSettingsSchema } from "moleculer-web";
// The package's main module runs the whole 1.4 MB browser bundle in Node; its path helper does not.
import swaggerUiPath from "swagger-ui-dist/absolute-path";
import { basePathOf } from "./openapi";

/**
 * The API docs page: Swagger UI from the swagger-ui-dist package, served by the gateway itself (no
 * CDN), reading the generated `/openapi.json`.
 */

/** The files of swagger-ui-dist the page loads; the package's demo index.html (which loads a petstore from the internet) is not served. */
export const DOCS_ASSETS = ["swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png", "favicon-16x16.png"];

const serveSwaggerUi = ApiGateway.serveStatic(swaggerUiPath(), { index: false, redirect: false, fallthrough: true });

/** Route middleware: serves the allowed Swagger UI files; anything else falls through to the route (and its 404). */
export function docsAssets(req: IncomingMessage, res: ServerResponse, next: (err?: unknown) => void): void {
	const file = (req.url ?? "").split("?")[0].slice(1);
	if (!DOCS_ASSETS.includes(file)) return next();
	serveSwaggerUi(req, res, next);
}

/** The page, at the docs route's own path; `this` is the gateway (moleculer-web calls function aliases so). */
export function docsPage(this: Service<ApiSettingsSchema>, req: IncomingMessage & { baseUrl?: string }, res: ServerResponse): void {
	const assets = req.baseUrl ?? "";
	const specUrl = `${basePathOf(this)}/openapi.json`;
	res.setHeader("Content-Type", "text/html; charset=utf-8");
	res.end(`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>moleculer-shop API</title>
<link rel="icon" type="image/png" sizes="32x32" href="${assets}/favicon-32x32.png">
<link rel="icon" type="image/png" sizes="16x16" href="${assets}/favicon-16x16.png">
<link rel="stylesheet" href="${assets}/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="${assets}/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({
	url: ${JSON.stringify(specUrl)},
	dom_id: "#swagger-ui",
	deepLinking: true,
	// Logging in (or registering) with "Try it out" authorizes the page with the token it answers.
	responseInterceptor(res) {
		const path = new URL(res.url, location.href).pathname;
		if (res.ok && /\\/users\\/(login|register)$/.test(path) && res.body && typeof res.body.token === "string") {
			window.ui.preauthorizeApiKey("bearerAuth", res.body.token);
		}
		return res;
	},
});
</script>
</body>
</html>
`);
}
