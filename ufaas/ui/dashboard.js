// The dashboard: pools, running and finished functions from the REST API, kept live by the
// status events of every function over /fn/ws; a function clicked is watched on the same
// socket, its output streamed into the page.
"use strict";

const FINISHED_SHOWN = 25;
const CHART_POINTS = 50;
const POLL_MS = 2000; // pools change without a status event (a container warming)
const REFRESH_MS = 250; // status events come in bursts: one refresh per burst
const RECONNECT_MS = 1000;

let running = false; // false while the page waits for a token
let socket = null;
let selected = null; // the id whose output is shown
let refreshTimer = null;

function short(id) {
  return id.slice(0, 8);
}

function command(spec) {
  const c = spec.command;
  return Array.isArray(c) ? c.join(" ") : String(c);
}

function image(spec) {
  return spec.image || "";
}

function statusBadge(status) {
  return el("span", {class: `status ${status}`}, status);
}

function ago(iso) {
  if (!iso) {
    return "";
  }
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  return seconds < 60 ? `${seconds.toFixed(1)} s` : `${Math.floor(seconds / 60)} min`;
}

function duration(record) {
  return record.duration_ms === null ? "" : `${record.duration_ms.toFixed(1)} ms`;
}

function row(record, cells) {
  const attributes = {"data-id": record.id, onclick: () => watch(record.id), title: record.id};
  if (record.id === selected) {
    attributes.class = "selected";
  }
  return el("tr", attributes, cells.map((cell) => el("td", {}, cell)));
}

function renderPools(pools) {
  replaceChildren("pools", pools.map((p) => el("tr", {"data-image": p.image},
    el("td", {}, p.image), el("td", {}, p.mode || "…"), el("td", {}, p.warm),
    el("td", {}, p.busy), el("td", {}, p.starting), el("td", {}, p.queued),
    el("td", {}, p.max), el("td", {class: "error"}, p.last_error || ""))));
}

function renderActive(records) {
  document.getElementById("active-count").textContent = records.length ? `(${records.length})` : "";
  replaceChildren("active", records.map((r) => row(r, [
    el("code", {}, short(r.id)), image(r.spec), el("code", {}, command(r.spec)),
    statusBadge(r.status), ago(r.started_at || r.created_at)])));
}

function renderFinished(records) {
  replaceChildren("finished", records.slice(0, FINISHED_SHOWN).map((r) => row(r, [
    el("code", {}, short(r.id)), image(r.spec), el("code", {}, command(r.spec)),
    statusBadge(r.status), duration(r), r.locality || "", ago(r.finished_at)])));
  renderChart(records.filter((r) => r.duration_ms !== null).slice(0, CHART_POINTS).reverse());
}

// Bars of the latest durations, oldest on the left, on a log scale so that a 3 ms function
// and a 3 s one are both visible.
function renderChart(records) {
  const svgNS = "http://www.w3.org/2000/svg";
  const width = 600;
  const height = 90;
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height + 14}`);
  svg.setAttribute("class", "latency");
  const values = records.map((r) => Math.max(r.duration_ms, 0.1));
  const top = Math.log10(Math.max(...values, 10)) + 0.2;
  const bottom = -1;
  const step = width / CHART_POINTS;
  values.forEach((ms, i) => {
    const h = ((Math.log10(ms) - bottom) / (top - bottom)) * height;
    const bar = document.createElementNS(svgNS, "rect");
    bar.setAttribute("x", String(i * step + 1));
    bar.setAttribute("y", String(height - h));
    bar.setAttribute("width", String(step - 2));
    bar.setAttribute("height", String(h));
    bar.setAttribute("class", `bar ${records[i].status}`);
    const tip = document.createElementNS(svgNS, "title");
    tip.textContent = `${short(records[i].id)}: ${ms.toFixed(1)} ms`;
    bar.append(tip);
    svg.append(bar);
  });
  const sorted = [...values].sort((a, b) => a - b);
  const p50 = sorted.length ? sorted[Math.floor((sorted.length - 1) / 2)] : null;
  const label = document.createElementNS(svgNS, "text");
  label.setAttribute("x", "0");
  label.setAttribute("y", String(height + 12));
  label.textContent = p50 === null ? "no finished function yet"
    : `duration of the last ${values.length}: p50 ${p50.toFixed(1)} ms, max ${sorted[sorted.length - 1].toFixed(1)} ms (log scale)`;
  svg.append(label);
  replaceChildren("chart", svg);
}

function problem(text) {
  const node = document.getElementById("problem");
  node.textContent = text || "";
  node.hidden = !text;
}

async function refresh() {
  refreshTimer = null;
  try {
    const [pools, active, recent] = await Promise.all([
      api("/pools"), api("/fn?limit=100"), api(`/fn?status=all&limit=${FINISHED_SHOWN + CHART_POINTS}`)]);
    renderPools(pools);
    renderActive(active);
    renderFinished(recent.filter((r) => r.status !== "pending" && r.status !== "running"));
    problem("");
  } catch (error) {
    if (error instanceof Unauthorized) {
      stop();
      askToken(start);
    } else {
      problem(`cannot reach the server: ${error.message}`);
    }
  }
}

function scheduleRefresh() {
  if (refreshTimer === null) {
    refreshTimer = setTimeout(refresh, REFRESH_MS);
  }
}

function send(message) {
  if (socket !== null && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify(message));
  }
}

function watch(id) {
  selected = id;
  document.getElementById("output-section").hidden = false;
  document.getElementById("output-id").textContent = id;
  document.getElementById("output").textContent = "";
  setOutputStatus("");
  for (const tr of document.querySelectorAll("tr[data-id]")) {
    tr.classList.toggle("selected", tr.dataset.id === id);
  }
  send({op: "watch", id}); // the replay (status, output so far) comes first, then live events
}

function setOutputStatus(status) {
  const node = document.getElementById("output-status");
  node.textContent = status;
  node.className = `status ${status}`;
}

function onEvent(event) {
  if (event.event === "status") {
    scheduleRefresh();
    if (event.id === selected) {
      setOutputStatus(event.status);
    }
  } else if (event.id === selected && (event.event === "stdout" || event.event === "stderr")) {
    const part = el("span", {class: event.event}, event.data);
    document.getElementById("output").append(part);
  } else if (event.id === selected && event.event === "exit") {
    const code = event.exit_code === null ? "" : ` (exit ${event.exit_code})`;
    setOutputStatus(`${event.status}${code}`);
  } else if (event.event === "error" && event.missed && event.id === selected) {
    watch(selected); // read too slowly: the replay starts over
  }
}

function connect() {
  const url = new URL("/fn/ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (token()) {
    url.searchParams.set("token", token());
  }
  const ws = new WebSocket(url);
  socket = ws;
  const live = document.getElementById("live");
  ws.onopen = () => {
    live.textContent = "live";
    live.className = "live on";
    send({op: "watch", id: "*"});
    if (selected !== null) {
      watch(selected);
    }
    refresh();
  };
  ws.onmessage = (message) => onEvent(JSON.parse(message.data));
  ws.onclose = () => {
    if (socket !== ws) {
      return; // an old socket, replaced already
    }
    socket = null;
    live.textContent = "reconnecting";
    live.className = "live off";
    if (running) {
      setTimeout(() => running && socket === null && connect(), RECONNECT_MS);
    }
  };
}

let poller = null;

function start() {
  running = true;
  refresh();
  connect();
  poller = setInterval(refresh, POLL_MS);
}

function stop() {
  running = false;
  clearInterval(poller);
  if (socket !== null) {
    const closing = socket;
    socket = null;
    closing.close();
  }
}

start();
