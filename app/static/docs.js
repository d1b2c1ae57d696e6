// Renders /openapi.json for people: every path and method, its parameters, request body and
// responses, and the schemas they refer to.
import { el, getJSON, richText } from "/static/dom.js";

const METHODS = ["get", "put", "post", "patch", "delete", "options", "head", "trace"];
let doc = {};

const $ = (id) => document.getElementById(id);
const refName = (ref) => ref.split("/").pop();
const schemaAnchor = (name) => `schema-${name}`;
const slug = (text) => text.replace(/[^A-Za-z0-9]+/g, "-").replace(/^-|-$/g, "") || "root";
const operationAnchor = (method, path) => `op-${method}-${slug(path)}`;

/** Follow a local `$ref` ("#/components/responses/Error") through the document. */
function resolve(node) {
  let seen = 0;
  while (node && node.$ref && node.$ref.startsWith("#/") && seen++ < 10) {
    node = node.$ref
      .slice(2)
      .split("/")
      .map((part) => part.replace(/~1/g, "/").replace(/~0/g, "~"))
      .reduce((obj, key) => (obj ? obj[key] : undefined), doc);
  }
  return node || {};
}

/** A schema's type in one line: `string (uuid)`, `QueueItem[]`, `integer | string`. */
function typeView(schema) {
  if (!schema || Object.keys(schema).length === 0) return el("span", { class: "type" }, "any");
  if (schema.$ref) {
    const name = refName(schema.$ref);
    return el("a", { class: "type", href: `#${schemaAnchor(name)}` }, name);
  }
  const alternatives = schema.oneOf || schema.anyOf || schema.allOf;
  if (alternatives) {
    const join = schema.allOf ? " & " : " | ";
    return el(
      "span",
      { class: "type" },
      alternatives.flatMap((alt, i) => (i ? [join, typeView(alt)] : [typeView(alt)])),
    );
  }
  const types = Array.isArray(schema.type) ? schema.type : schema.type ? [schema.type] : ["any"];
  const parts = types.map((type) => {
    if (type === "array") return el("span", {}, typeView(schema.items), "[]");
    return schema.format && type !== "null" ? `${type} (${schema.format})` : type;
  });
  return el("span", { class: "type" }, parts.flatMap((p, i) => (i ? [" | ", p] : [p])));
}

/** Enum, pattern, bounds, default and example, as short notes under a description. */
function constraints(schema) {
  const notes = [];
  const show = (value) => JSON.stringify(value);
  if (schema.enum) notes.push(["One of: ", ...schema.enum.map((v, i) => (i ? `, ${show(v)}` : show(v)))].join(""));
  if (schema.pattern) notes.push(`Pattern: ${schema.pattern}`);
  if (schema.minimum !== undefined) notes.push(`Minimum: ${schema.minimum}`);
  if (schema.maximum !== undefined) notes.push(`Maximum: ${schema.maximum}`);
  if (schema.minLength !== undefined) notes.push(`Min length: ${schema.minLength}`);
  if (schema.maxLength !== undefined) notes.push(`Max length: ${schema.maxLength}`);
  if (schema.default !== undefined) notes.push(`Default: ${show(schema.default)}`);
  if (schema.example !== undefined) notes.push(`Example: ${show(schema.example)}`);
  if (schema.readOnly) notes.push("Read only");
  if (schema.writeOnly) notes.push("Write only");
  for (const alt of schema.oneOf || []) if (!alt.$ref) notes.push(...constraints(alt));
  return notes;
}

function describe(schema) {
  return [
    ...richText(schema.description || ""),
    ...constraints(schema).map((note) => el("span", { class: "constraint" }, note)),
  ];
}

function table(caption, headings, rows) {
  return el(
    "table",
    {},
    el("caption", { class: "visually-hidden" }, caption),
    el("thead", {}, el("tr", {}, headings.map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, rows),
  );
}

function propertiesTable(schema, caption) {
  const required = new Set(schema.required || []);
  const rows = Object.entries(schema.properties || {}).map(([name, prop]) =>
    el(
      "tr",
      {},
      el(
        "td",
        {},
        el("code", {}, name),
        required.has(name) && el("span", { class: "required" }, "required"),
      ),
      el("td", {}, typeView(prop)),
      el("td", {}, describe(prop)),
    ),
  );
  return table(caption, ["Field", "Type", "Description"], rows);
}

/** A body's schema: a link to a named schema, or an inline one spelled out. */
function schemaView(schema, caption) {
  if (schema && schema.properties) return propertiesTable(schema, caption);
  const nodes = [el("p", {}, "Schema: ", typeView(schema))];
  if (schema && schema.discriminator) {
    const d = schema.discriminator;
    nodes.push(
      el(
        "p",
        { class: "muted" },
        "Chosen by ",
        el("code", {}, d.propertyName),
        ": ",
        Object.entries(d.mapping || {}).flatMap(([value, ref], i) => [
          i ? ", " : "",
          el("code", {}, JSON.stringify(value)),
          " → ",
          typeView({ $ref: ref }),
        ]),
      ),
    );
  }
  return nodes;
}

function contentView(content, caption) {
  return Object.entries(content || {}).map(([mediaType, media]) => [
    el("p", { class: "meta" }, el("code", {}, mediaType)),
    schemaView(media.schema, caption),
  ]);
}

function parametersView(parameters) {
  if (!parameters.length) return null;
  const rows = parameters.map((raw) => {
    const p = resolve(raw);
    return el(
      "tr",
      {},
      el("td", {}, el("code", {}, p.name), p.required && el("span", { class: "required" }, "required")),
      el("td", {}, p.in),
      el("td", {}, typeView(p.schema)),
      el("td", {}, describe({ ...(p.schema || {}), description: p.description })),
    );
  });
  return [el("h4", {}, "Parameters"), table("Parameters", ["Name", "In", "Type", "Description"], rows)];
}

function responsesView(responses) {
  const rows = Object.entries(responses || {}).map(([status, raw]) => {
    const response = resolve(raw);
    const headers = Object.entries(response.headers || {}).map(([name, header]) =>
      el("span", { class: "constraint" }, "Header ", el("code", {}, name), ": ", ...richText(resolve(header).description)),
    );
    const bodies = Object.entries(response.content || {}).map(([mediaType, media]) =>
      el("div", {}, typeView(media.schema), el("span", { class: "constraint" }, mediaType)),
    );
    return el(
      "tr",
      { dataset: { status } },
      el("td", {}, el("strong", {}, status)),
      el("td", {}, richText(response.description), headers),
      el("td", {}, bodies.length ? bodies : el("span", { class: "muted" }, "—")),
    );
  });
  return [el("h4", {}, "Responses"), table("Responses", ["Status", "Description", "Body"], rows)];
}

function operationView(path, method, operation, pathItem) {
  const parameters = [...(pathItem.parameters || []), ...(operation.parameters || [])];
  const body = operation.requestBody && resolve(operation.requestBody);
  return el(
    "section",
    { class: "operation", id: operationAnchor(method, path), dataset: { method, path } },
    el(
      "h3",
      {},
      el("span", { class: `method method-${method}` }, method),
      el("span", { class: "path" }, path),
      operation.summary && el("span", { class: "muted" }, operation.summary),
    ),
    operation.description && el("p", {}, richText(operation.description)),
    parametersView(parameters),
    body && [
      el("h4", {}, `Request body (${body.required ? "required" : "optional"})`),
      body.description && el("p", {}, richText(body.description)),
      contentView(body.content, "Request body fields"),
    ],
    responsesView(operation.responses),
  );
}

function render() {
  const info = doc.info || {};
  $("title").textContent = `${info.title || "API"} ${info.version || ""}`.trim();
  $("description").replaceChildren(...richText(info.description));
  $("spec-version").textContent = `(OpenAPI ${doc.openapi || "?"})`;
  document.title = `${info.title || "API"} · API docs`;

  const tocOperations = [];
  const sections = [];
  for (const [path, pathItem] of Object.entries(doc.paths || {})) {
    for (const method of METHODS) {
      const operation = pathItem[method];
      if (!operation) continue;
      sections.push(operationView(path, method, operation, pathItem));
      tocOperations.push(
        el(
          "li",
          {},
          el(
            "a",
            { href: `#${operationAnchor(method, path)}` },
            el("span", { class: `method method-${method}` }, method),
            " ",
            el("span", { class: "path" }, path),
          ),
        ),
      );
    }
  }
  $("operations").replaceChildren(...sections);

  const schemas = Object.entries((doc.components || {}).schemas || {});
  $("schemas").replaceChildren(
    ...schemas.map(([name, schema]) =>
      el(
        "section",
        { class: "schema", id: schemaAnchor(name) },
        el("h3", {}, name),
        schema.description && el("p", {}, richText(schema.description)),
        schemaView(schema, `${name} fields`),
      ),
    ),
  );
  $("toc").replaceChildren(
    el("h2", { class: "visually-hidden" }, "Contents"),
    el("ul", {}, tocOperations),
    el(
      "ul",
      {},
      schemas.map(([name]) => el("li", {}, el("a", { href: `#${schemaAnchor(name)}` }, name))),
    ),
  );
  if (location.hash) document.getElementById(location.hash.slice(1))?.scrollIntoView();
}

getJSON("/openapi.json")
  .then((document_) => {
    doc = document_;
    render();
  })
  .catch((error) => {
    const problem = $("docs-error");
    problem.textContent = `Could not load /openapi.json: ${error.message}`;
    problem.hidden = false;
  });
