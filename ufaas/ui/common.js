// What the dashboard and the API browser share: the token, kept in this tab's session
// storage once asked for, the calls that send it, and safe DOM building (text is always
// set as text, never parsed as HTML).
"use strict";

const TOKEN_KEY = "ufaas.token";

class Unauthorized extends Error {}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

async function api(path) {
  const headers = token() ? {Authorization: `Bearer ${token()}`} : {};
  const response = await fetch(path, {headers, cache: "no-store"});
  if (response.status === 401) {
    throw new Unauthorized(path);
  }
  if (!response.ok) {
    throw new Error(`${path}: HTTP ${response.status}`);
  }
  return response.json();
}

// Show the token form; `done` runs once a token is saved.
function askToken(done) {
  const form = document.getElementById("token-form");
  const input = form.querySelector("input");
  form.hidden = false;
  input.focus();
  form.onsubmit = (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value);
    input.value = "";
    form.hidden = true;
    done();
  };
}

// An element with attributes and children (strings become text nodes).
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "onclick") {
      node.onclick = value;
    } else if (value !== null && value !== undefined && value !== false) {
      node.setAttribute(name, value === true ? "" : String(value));
    }
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

function replaceChildren(id, ...children) {
  document.getElementById(id).replaceChildren(...children.flat());
}
