// A browser of /openapi.json: every operation with its parameters, body and answers, and
// every schema with its properties. Made from the document alone, with nothing loaded
// from elsewhere.
"use strict";

let doc = null;

function refName(ref) {
  return ref.split("/").pop();
}

// A schema in a few words: "string", "integer 1..1000", "array of RecordView"...
function typeOf(schema) {
  if (!schema || Object.keys(schema).length === 0) {
    return ["any"];
  }
  if (schema.$ref) {
    const name = refName(schema.$ref);
    return [el("a", {href: `#schema-${name}`}, name)];
  }
  for (const key of ["anyOf", "oneOf"]) {
    if (schema[key]) {
      const arms = schema[key].map(typeOf);
      return arms.flatMap((arm, i) => (i ? [" | ", ...arm] : arm));
    }
  }
  if (schema.enum) {
    return [schema.enum.map((v) => JSON.stringify(v)).join(" | ")];
  }
  let words = [schema.type || "any"];
  if (schema.type === "array") {
    words = ["array of ", ...typeOf(schema.items)];
  } else if (schema.type === "object" && schema.additionalProperties
             && typeof schema.additionalProperties === "object") {
    words = ["map of ", ...typeOf(schema.additionalProperties)];
  }
  const limits = [];
  if ("minimum" in schema || "maximum" in schema) {
    limits.push(`${schema.minimum ?? ""}..${schema.maximum ?? ""}`);
  }
  if ("exclusiveMinimum" in schema) {
    limits.push(`> ${schema.exclusiveMinimum}`);
  }
  for (const key of ["minLength", "maxLength", "minItems", "maxProperties", "pattern", "format"]) {
    if (key in schema) {
      limits.push(`${key} ${schema[key]}`);
    }
  }
  if (limits.length) {
    words.push(` (${limits.join(", ")})`);
  }
  return words;
}

function propertiesTable(schema) {
  const required = new Set(schema.required || []);
  const rows = Object.entries(schema.properties || {}).map(([name, prop]) => el("tr", {},
    el("td", {}, el("code", {}, name), required.has(name) ? " *" : ""),
    el("td", {}, typeOf(prop)),
    el("td", {}, "default" in prop ? JSON.stringify(prop.default) : ""),
    el("td", {}, prop.description || "")));
  return el("table", {class: "props"},
    el("thead", {}, el("tr", {}, el("th", {}, "field"), el("th", {}, "type"),
      el("th", {}, "default"), el("th", {}, "description"))),
    el("tbody", {}, rows));
}

function content(object) {
  return Object.entries(object.content || {}).map(([media, {schema}]) =>
    el("div", {}, el("code", {}, media), ": ", typeOf(schema)));
}

function operation(path, method, op) {
  const parameters = (op.parameters || []).map((p) => el("tr", {},
    el("td", {}, el("code", {}, p.name), p.required ? " *" : ""), el("td", {}, p.in),
    el("td", {}, typeOf(p.schema)), el("td", {}, p.description || "")));
  const answers = Object.entries(op.responses || {}).map(([status, answer]) => el("tr", {},
    el("td", {}, el("code", {}, status)), el("td", {}, answer.description || ""),
    el("td", {}, content(answer)),
    el("td", {}, Object.keys(answer.headers || {}).join(", "))));
  return el("details", {class: "operation", id: op.operationId},
    el("summary", {}, el("span", {class: `method ${method}`}, method.toUpperCase()), " ",
      el("code", {}, path), " ", op.summary || ""),
    op.description ? el("p", {}, op.description) : null,
    parameters.length ? el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "parameter"),
      el("th", {}, "in"), el("th", {}, "type"), el("th", {}, "description"))),
      el("tbody", {}, parameters)) : null,
    op.requestBody ? el("p", {}, "Body", op.requestBody.required ? " (required)" : "", ": ",
      content(op.requestBody)) : null,
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "status"),
      el("th", {}, "meaning"), el("th", {}, "body"), el("th", {}, "headers"))),
      el("tbody", {}, answers)));
}

function render() {
  document.getElementById("version").textContent = `${doc.info.title} ${doc.info.version}, OpenAPI ${doc.openapi}`;
  document.getElementById("description").textContent = doc.info.description || "";
  const operations = [];
  for (const [path, methods] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      operations.push(operation(path, method, op));
    }
  }
  replaceChildren("operations", operations);
  replaceChildren("schemas", Object.entries(doc.components.schemas || {}).map(([name, schema]) =>
    el("div", {class: "schema", id: `schema-${name}`}, el("h3", {}, name),
      schema.description ? el("p", {}, schema.description) : null,
      schema.properties ? propertiesTable(schema) : el("p", {}, typeOf(schema)))));
}

async function load() {
  try {
    doc = await api("/openapi.json");
    render();
    // The raw document as fetched, token and all: a plain link would lack the token.
    const blob = new Blob([JSON.stringify(doc, null, 2)], {type: "application/json"});
    document.getElementById("raw").href = URL.createObjectURL(blob);
  } catch (error) {
    if (error instanceof Unauthorized) {
      askToken(load);
    } else {
      const node = document.getElementById("problem");
      node.textContent = `cannot load the document: ${error.message}`;
      node.hidden = false;
    }
  }
}

load();
