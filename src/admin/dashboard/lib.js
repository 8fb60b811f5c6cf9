// Shared pieces of the dashboard: DOM helpers, formatting, the /api/v5 client with the login
// session, flash messages, the confirmation dialog, polling, and the paged table that every
// EMQX list endpoint ({"data": [...], "meta": {...}}) is shown with.
export const POLL_MS = 2000;
export const PALETTE = ["#2563eb", "#16a34a", "#dc2626", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];
export const DASH = "—";
const TOKEN_KEY = "petrel.dashboard";

// ---------------------------------------------------------------------------------------
// DOM helpers

export const $ = (id) => document.getElementById(id);

// el("a", {href: "#", class: "x", "data-id": 1, onclick: fn}, "text", otherNode, null)
export function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      node.addEventListener(key.slice(2), value);
    } else if (key === "class") {
      node.className = value;
    } else {
      node.setAttribute(key, value === true ? "" : String(value));
    }
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

export function show(node, visible) {
  node.hidden = !visible;
}

export function fmtNumber(n) {
  if (n === undefined || n === null || Number.isNaN(n)) return DASH;
  if (typeof n !== "number") return String(n);
  const abs = Math.abs(n);
  if (abs >= 1e9) return (n / 1e9).toFixed(abs >= 1e10 ? 0 : 1) + "G";
  if (abs >= 1e6) return (n / 1e6).toFixed(abs >= 1e7 ? 0 : 1) + "M";
  if (abs >= 1e4) return (n / 1e3).toFixed(abs >= 1e5 ? 0 : 1) + "k";
  if (Number.isInteger(n)) return String(n);
  if (abs >= 99.95) return n.toFixed(0);
  return n.toFixed(abs >= 9.995 ? 1 : 2).replace(/\.?0+$/, "");
}

export function fmtTime(value) {
  if (value === undefined || value === null || value === "") return DASH;
  const date = new Date(value);
  if (Number.isNaN(date.getTime())) return String(value);
  return date.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

export function fmtBool(value) {
  if (value === undefined || value === null) return DASH;
  return value ? "yes" : "no";
}

export function protoLabel(client) {
  const versions = { 3: "3.1", 4: "3.1.1", 5: "5.0" };
  return `${client.proto_name || "MQTT"} ${versions[client.proto_ver] || client.proto_ver || ""}`.trim();
}

// Bytes from base64, shown as UTF-8 text when they are valid UTF-8, as hex otherwise.
export function payloadText(bytes) {
  try {
    return { text: new TextDecoder("utf-8", { fatal: true }).decode(bytes), binary: false };
  } catch (_) {
    const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join(" ");
    return { text: hex, binary: true };
  }
}

export function base64Bytes(b64) {
  const raw = atob(b64 || "");
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

// A client id as a link to its detail view.
export function clientLink(id) {
  return el("a", { href: `#/clients/${encodeURIComponent(id)}`, class: "clientid" }, id);
}

// ---------------------------------------------------------------------------------------
// Session and API

export const session = loadSession();

function loadSession() {
  try {
    return JSON.parse(sessionStorage.getItem(TOKEN_KEY)) || {};
  } catch (_) {
    return {};
  }
}

export function saveSession() {
  if (session.token) sessionStorage.setItem(TOKEN_KEY, JSON.stringify(session));
  else sessionStorage.removeItem(TOKEN_KEY);
}

// Called when the broker answers 401 to an authenticated call (the token expired).
let onUnauthorized = () => {};
export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (session.token) headers.Authorization = `Bearer ${session.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(`api/v5/${path}`, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch (err) {
    throw new ApiError(0, "NETWORK", `The broker did not answer (${err.message}).`);
  }
  const text = response.status === 204 ? "" : await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch (_) {
      data = null;
    }
  }
  if (!response.ok) {
    const code = (data && data.code) || `HTTP_${response.status}`;
    const message = (data && data.message) || text || response.statusText || code;
    const err = new ApiError(response.status, code, message);
    if (response.status === 401 && path !== "login" && path !== "logout") {
      err.handled = true;
      logout(`Logged out: ${message}`);
    }
    throw err;
  }
  return data;
}

// EMQX answers an array (one entry per node) without aggregate=true; add them up.
export function aggregate(data) {
  if (!Array.isArray(data)) return data || {};
  const sum = {};
  for (const node of data) {
    for (const [key, value] of Object.entries(node)) {
      if (typeof value === "number") sum[key] = (sum[key] || 0) + value;
    }
  }
  return sum;
}

export function query(params) {
  const q = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") q.set(key, value);
  }
  return q.toString();
}

// ---------------------------------------------------------------------------------------
// Flash messages and the confirmation dialog

let flashTimer = null;

export function flash(message, kind) {
  $("flash-text").textContent = message;
  $("flash").className = kind || "error";
  show($("flash"), true);
  clearTimeout(flashTimer);
  flashTimer = setTimeout(() => show($("flash"), false), kind === "ok" ? 4000 : 10000);
}

export function report(err) {
  if (err && err.handled) return;
  const code = err && err.code && err.code !== "NETWORK" ? ` (${err.code})` : "";
  flash(`${(err && err.message) || err}${code}`, "error");
}

export function confirmAction(message, okLabel) {
  const dialog = $("confirm-dialog");
  $("confirm-message").textContent = message;
  $("confirm-ok").textContent = okLabel || "OK";
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
  });
}

// ---------------------------------------------------------------------------------------
// Polling: run fn now, then POLL_MS after each completion (never two at once).

export function poller(fn, ms) {
  let stopped = false, running = false, again = false, timer = null;
  async function tick() {
    timer = null;
    if (stopped) return;
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      await fn();
    } catch (err) {
      if (!stopped) report(err);
    }
    running = false;
    if (stopped) return;
    if (again) {
      again = false;
      tick();
    } else {
      timer = setTimeout(tick, ms || POLL_MS);
    }
  }
  tick();
  return {
    stop() {
      stopped = true;
      clearTimeout(timer);
    },
    refresh() {
      clearTimeout(timer);
      tick();
    },
  };
}

// ---------------------------------------------------------------------------------------
// A paged table over an EMQX list endpoint: {"data": [...], "meta": {page, limit, count, hasnext}}.
// columns: [{title, cell(row) -> string | Node}]; rowAttrs(row) -> attributes of the <tr>.

export function pagedTable({ table, pager, path, columns, rowAttrs, params, limit }) {
  let page = 1;
  let last = null;
  let poll = null;
  const head = el("thead", null, el("tr", null, columns.map((c) => el("th", null, c.title))));
  const body = el("tbody");
  table.replaceChildren(head, body);

  async function load() {
    const q = query(Object.assign({ page, limit: limit || 50 }, params ? params() : {}));
    const result = await api("GET", `${path}?${q}`);
    const rows = (result && result.data) || [];
    const meta = (result && result.meta) || {};
    if (rows.length === 0 && page > 1) {
      page -= 1; // the last page emptied (after a delete): show the one before
      return load();
    }
    const key = JSON.stringify(result);
    if (key === last) return; // unchanged: keep the DOM (and the operator's focus) as is
    last = key;
    body.replaceChildren(
      ...rows.map((row) => el("tr", rowAttrs ? rowAttrs(row) : null, columns.map((c) => el("td", { class: c.class }, c.cell(row))))),
    );
    if (rows.length === 0) {
      body.append(el("tr", { class: "empty" }, el("td", { colspan: columns.length }, "Nothing here.")));
    }
    const count = typeof meta.count === "number" ? ` · ${meta.count} in all` : "";
    pager.replaceChildren(
      el("button", { type: "button", class: "prev", disabled: page <= 1, onclick: () => go(page - 1) }, "‹ Previous"),
      el("span", { class: "muted" }, ` Page ${page}${count} `),
      el("button", { type: "button", class: "next", disabled: !meta.hasnext, onclick: () => go(page + 1) }, "Next ›"),
    );
  }

  function go(n) {
    page = Math.max(1, n);
    last = null;
    if (poll) poll.refresh();
  }

  return {
    start() {
      last = null;
      poll = poller(load);
    },
    stop() {
      if (poll) poll.stop();
      poll = null;
    },
    refresh() {
      last = null;
      if (poll) poll.refresh();
    },
    firstPage() {
      go(1);
    },
  };
}

// Back to the first page when a filter changes (text inputs after a pause in typing).
export function refilter(table, inputs) {
  let pause = null;
  for (const input of inputs) {
    input.addEventListener(input.tagName === "SELECT" ? "change" : "input", () => {
      clearTimeout(pause);
      pause = setTimeout(() => table.firstPage(), input.tagName === "SELECT" ? 0 : 250);
    });
  }
}
