// Swagger UI (npm's swagger-ui-dist, served by mintq from node_modules) renders /openapi.json.
// Its settings live here rather than inline in docs.html: the page's CSP allows no inline script.
const problem = document.getElementById("docs-error");

if (typeof window.SwaggerUIBundle !== "function") {
  problem.textContent =
    "Swagger UI is not installed on this server (scripts/bootstrap.sh installs it). " +
    "The OpenAPI document is at /openapi.json.";
  problem.hidden = false;
} else {
  window.ui = window.SwaggerUIBundle({
    url: "/openapi.json",
    domNode: document.getElementById("swagger-ui"),
    deepLinking: true,
    presets: [window.SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    // The default sends the document to validator.swagger.io: this page reaches nothing else.
    validatorUrl: null,
  });
}
