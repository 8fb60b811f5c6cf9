// The dashboard's views over the broker's state: overview (stat cards, the cluster's nodes
// and live charts),
// clients (search, detail with subscriptions, kick), subscriptions, topics, retained messages
// (view, delete) and the banned list. Each factory returns {enter(args), leave()}.

import {
  $, DASH, PALETTE, aggregate, api, base64Bytes, confirmAction, el, flash, fmtBool, fmtNumber,
  fmtTime, pagedTable, payloadText, poller, protoLabel, refilter, report, show, clientLink,
} from "./lib.js";
import { drawChart } from "./charts.js";

const OVERVIEW_SAMPLES = 150; // 5 minutes of overview history at one poll per 2 s

// Overview: stat cards, the nodes (every node of a cluster), three live charts, and the whole
// metrics table.
export function overviewView() {
  const STATS = [
    ["connections.count", "Connections"],
    ["live_connections.count", "Live connections"],
    ["sessions.count", "Sessions"],
    ["subscriptions.count", "Subscriptions"],
    ["topics.count", "Topics"],
    ["retained.count", "Retained"],
    ["delayed.count", "Delayed"],
  ];
  const RATES = [
    ["in", "Messages in /s"],
    ["out", "Messages out /s"],
    ["dropped", "Dropped /s"],
  ];
  const history = { connections: [], live: [], sessions: [], in: [], out: [], drops: {} };
  let previous = null; // {t, metrics}
  let poll = null;

  const cards = {};
  for (const [key, label] of STATS.concat(RATES)) {
    const value = el("span", { class: "value", id: `stat-${key.replace(/[._]/g, "-")}` }, DASH);
    cards[key] = value;
    $("stats").append(el("div", { class: "card" }, el("span", { class: "label" }, label), value));
  }

  function push(list, value) {
    list.push(value);
    if (list.length > OVERVIEW_SAMPLES) list.shift();
  }

  function rate(metrics, key, dt) {
    if (!previous || !(dt > 0)) return null;
    const delta = (metrics[key] || 0) - (previous.metrics[key] || 0);
    return delta >= 0 ? delta / dt : null; // a negative delta: the broker restarted
  }

  async function load() {
    const [statsRaw, metricsRaw, nodes] = await Promise.all([
      api("GET", "stats?aggregate=true"),
      api("GET", "metrics?aggregate=true"),
      api("GET", "nodes"),
    ]);
    renderNodes(Array.isArray(nodes) ? nodes : []);
    const stats = aggregate(statsRaw), metrics = aggregate(metricsRaw);
    const t = performance.now();
    const dt = previous ? (t - previous.t) / 1000 : 0;

    for (const [key] of STATS) cards[key].textContent = fmtNumber(stats[key]);
    push(history.connections, stats["connections.count"] ?? null);
    push(history.live, stats["live_connections.count"] ?? null);
    push(history.sessions, stats["sessions.count"] ?? null);

    const rateIn = rate(metrics, "messages.received", dt);
    const rateOut = rate(metrics, "messages.sent", dt);
    const rateDropped = rate(metrics, "messages.dropped", dt);
    push(history.in, rateIn);
    push(history.out, rateOut);
    cards.in.textContent = fmtNumber(rateIn);
    cards.out.textContent = fmtNumber(rateOut);
    cards.dropped.textContent = fmtNumber(rateDropped);

    // One drop series per reason the broker reports (messages.dropped.<reason>).
    const reasons = Object.keys(metrics).filter((k) => k.startsWith("messages.dropped.")).sort();
    const length = history.in.length;
    for (const key of reasons) {
      if (!history.drops[key]) history.drops[key] = new Array(length - 1).fill(null);
      push(history.drops[key], rate(metrics, key, dt));
    }
    for (const key of Object.keys(history.drops)) {
      if (!reasons.includes(key)) push(history.drops[key], null);
    }

    previous = { t, metrics };
    draw();
    renderMetrics(metrics);
  }

  function draw() {
    drawChart($("chart-connections"), [
      { label: "connections", color: PALETTE[0], values: history.connections },
      { label: "live", color: PALETTE[1], values: history.live },
      { label: "sessions", color: PALETTE[4], values: history.sessions },
    ], OVERVIEW_SAMPLES);
    drawChart($("chart-rates"), [
      { label: "in", color: PALETTE[0], values: history.in },
      { label: "out", color: PALETTE[1], values: history.out },
    ], OVERVIEW_SAMPLES);
    drawChart($("chart-drops"), Object.keys(history.drops).map((key, i) => ({
      label: key.slice("messages.dropped.".length),
      color: PALETTE[(i + 2) % PALETTE.length],
      values: history.drops[key],
    })), OVERVIEW_SAMPLES);
  }

  function renderNodes(nodes) {
    const head = ["Node", "Status", "Version", "Uptime", "Connections", "Memory", "Load 1 min"];
    $("nodes-table").replaceChildren(
      el("thead", null, el("tr", null, head.map((h) => el("th", null, h)))),
      el("tbody", null, nodes.map((n) => el("tr", { "data-node": n.node },
        el("td", null, n.node),
        el("td", null, el("span", { class: `badge ${n.node_status === "running" ? "running" : "stopped"}` }, n.node_status || DASH)),
        el("td", null, n.version || DASH),
        el("td", null, fmtUptime(n.uptime)),
        el("td", { class: "num" }, fmtNumber(n.connections)),
        el("td", { class: "num" }, fmtBytes(n.memory_used)),
        el("td", { class: "num" }, fmtNumber(n.load1)),
      ))),
    );
  }

  function renderMetrics(metrics) {
    const keys = Object.keys(metrics).sort();
    $("metrics-table").replaceChildren(
      el("thead", null, el("tr", null, el("th", null, "Metric"), el("th", null, "Value"))),
      el("tbody", null, keys.map((k) => el("tr", { "data-metric": k }, el("td", null, k), el("td", { class: "num" }, String(metrics[k]))))),
    );
  }

  window.addEventListener("resize", () => {
    if (poll) draw();
  });

  return {
    enter() {
      poll = poller(load);
    },
    leave() {
      if (poll) poll.stop();
      poll = null;
    },
  };
}

// Milliseconds as "3d 4h", "5h 2m", "7m 12s".
function fmtUptime(ms) {
  if (typeof ms !== "number") return DASH;
  const s = Math.floor(ms / 1000), d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24;
  const m = Math.floor(s / 60) % 60;
  if (d > 0) return `${d}d ${h}h`;
  if (h > 0) return `${h}h ${m}m`;
  return `${m}m ${s % 60}s`;
}

function fmtBytes(n) {
  if (typeof n !== "number") return DASH;
  if (n >= 1 << 30) return (n / (1 << 30)).toFixed(1) + " GiB";
  if (n >= 1 << 20) return (n / (1 << 20)).toFixed(0) + " MiB";
  return (n / 1024).toFixed(0) + " KiB";
}

function stateBadge(client) {
  const state = client.conn_state || (client.connected ? "connected" : "disconnected");
  return el("span", { class: `badge ${state}` }, state);
}

async function kick(clientid) {
  if (!(await confirmAction(`Kick client “${clientid}”? Its connection is closed and its session discarded.`, "Kick"))) {
    return false;
  }
  try {
    await api("DELETE", `clients/${encodeURIComponent(clientid)}`);
    flash(`Kicked ${clientid}.`, "ok");
    return true;
  } catch (err) {
    report(err);
    return false;
  }
}

export function clientsView() {
  const table = pagedTable({
    table: $("clients-table"),
    pager: $("clients-pager"),
    path: "clients",
    params: () => ({ like_clientid: $("clients-search").value.trim(), conn_state: $("clients-state").value }),
    rowAttrs: (c) => ({ "data-clientid": c.clientid }),
    columns: [
      { title: "Client ID", cell: (c) => clientLink(c.clientid) },
      { title: "Username", cell: (c) => c.username ?? DASH },
      { title: "Peer", cell: (c) => (c.ip_address ? `${c.ip_address}:${c.port}` : DASH) },
      { title: "State", cell: stateBadge },
      { title: "Transport", cell: (c) => c.transport || c.listener || DASH },
      { title: "Protocol", cell: protoLabel },
      { title: "Subs", class: "num", cell: (c) => fmtNumber(c.subscriptions_cnt) },
      { title: "In flight", class: "num", cell: (c) => fmtNumber(c.inflight_cnt) },
      { title: "Queued / dropped", class: "num", cell: (c) => `${fmtNumber(c.mqueue_len)} / ${fmtNumber(c.mqueue_dropped)}` },
      { title: "Recv / sent", class: "num", cell: (c) => `${fmtNumber(c.recv_msg)} / ${fmtNumber(c.send_msg)}` },
      { title: "Connected at", cell: (c) => fmtTime(c.connected_at) },
      {
        title: "",
        cell: (c) => el("button", {
          type: "button",
          class: "kick danger",
          "data-clientid": c.clientid,
          onclick: async () => {
            if (await kick(c.clientid)) table.refresh();
          },
        }, "Kick"),
      },
    ],
  });

  refilter(table, [$("clients-search"), $("clients-state")]);

  return { enter: () => table.start(), leave: () => table.stop() };
}

export function clientView() {
  const FIELDS = [
    ["clientid", "Client ID"],
    ["username", "Username"],
    ["conn_state", "State"],
    ["ip_address", "IP address"],
    ["port", "Port"],
    ["listener", "Listener"],
    ["transport", "Transport"],
    ["proto", "Protocol", protoLabel],
    ["keepalive", "Keep alive (s)"],
    ["clean_start", "Clean start", (c) => fmtBool(c.clean_start)],
    ["expiry_interval", "Session expiry (s)"],
    ["connected_at", "Connected at", (c) => fmtTime(c.connected_at)],
    ["subscriptions_cnt", "Subscriptions"],
    ["inflight_cnt", "In flight"],
    ["mqueue_len", "Queued"],
    ["mqueue_dropped", "Queue drops"],
    ["recv_msg", "Messages received"],
    ["send_msg", "Messages sent"],
    ["node", "Node"],
    ["link", "Link", linkSummary],
  ];
  let clientid = null;
  let poll = null;
  let last = null;

  const subHead = el("thead", null, el("tr", null, ["Topic", "QoS", "No local", "Retain as published", "Retain handling", "Node"].map((t) => el("th", null, t))));
  const subBody = el("tbody");
  $("client-subscriptions").replaceChildren(subHead, subBody);

  $("client-kick").addEventListener("click", async () => {
    if (clientid !== null && (await kick(clientid))) location.hash = "#/clients";
  });

  async function load() {
    const id = encodeURIComponent(clientid);
    let client, subs;
    try {
      [client, subs] = await Promise.all([api("GET", `clients/${id}`), api("GET", `clients/${id}/subscriptions`)]);
    } catch (err) {
      if (err.status === 404) {
        $("client-missing").textContent = `No client “${clientid}”: ${err.message}`;
        show($("client-missing"), true);
        show($("client-body"), false);
        last = null;
        return;
      }
      throw err;
    }
    show($("client-missing"), false);
    show($("client-body"), true);
    const key = JSON.stringify([client, subs]);
    if (key === last) return;
    last = key;
    $("client-fields").replaceChildren(...FIELDS.flatMap(([k, label, format]) => [
      el("dt", null, label),
      el("dd", { "data-field": k }, format ? format(client) : client[k] ?? DASH),
    ]));
    const list = Array.isArray(subs) ? subs : (subs && subs.data) || [];
    subBody.replaceChildren(...list.map((s) => el("tr", { "data-topic": s.topic },
      el("td", null, s.topic), el("td", null, s.qos), el("td", null, fmtBool(s.nl)),
      el("td", null, fmtBool(s.rap)), el("td", null, s.rh ?? DASH), el("td", null, s.node ?? DASH))));
    if (list.length === 0) subBody.append(el("tr", { class: "empty" }, el("td", { colspan: 6 }, "No subscriptions.")));
  }

  return {
    enter(args) {
      clientid = args[0] || "";
      last = null;
      $("client-title").textContent = clientid;
      show($("client-missing"), false);
      $("client-fields").replaceChildren();
      subBody.replaceChildren();
      poll = poller(load);
    },
    leave() {
      if (poll) poll.stop();
      poll = null;
    },
  };
}

function linkSummary(client) {
  const link = client.link;
  if (!link) return DASH;
  const loss = link.sent_packets > 0 ? (100 * link.lost_packets) / link.sent_packets : 0;
  const rtt = `RTT ${fmtNumber(link.rtt_us / 1000)} ms`, cwnd = `cwnd ${fmtNumber(link.cwnd)}`;
  if (client.transport !== "quic") {
    // TCP_INFO: segments retransmitted out of data segments sent; no congestion event count.
    return `${rtt} · retransmitted ${loss.toFixed(2)} % (${link.lost_packets}/${link.sent_packets} segments) · ${cwnd}`;
  }
  return `${rtt} · loss ${loss.toFixed(2)} % (${link.lost_packets}/${link.sent_packets} packets) · ${cwnd} · congestion events ${link.congestion_events}`;
}

export function subscriptionsView() {
  const table = pagedTable({
    table: $("subscriptions-table"),
    pager: $("subscriptions-pager"),
    path: "subscriptions",
    params: () => ({ clientid: $("subscriptions-clientid").value.trim(), match_topic: $("subscriptions-match").value.trim() }),
    rowAttrs: (s) => ({ "data-clientid": s.clientid, "data-topic": s.topic }),
    columns: [
      { title: "Client ID", cell: (s) => clientLink(s.clientid) },
      { title: "Topic", cell: (s) => s.topic },
      { title: "QoS", cell: (s) => s.qos },
      { title: "No local", cell: (s) => fmtBool(s.nl) },
      { title: "Retain as published", cell: (s) => fmtBool(s.rap) },
      { title: "Retain handling", cell: (s) => s.rh ?? DASH },
      { title: "Node", cell: (s) => s.node ?? DASH },
    ],
  });
  refilter(table, [$("subscriptions-clientid"), $("subscriptions-match")]);
  return { enter: () => table.start(), leave: () => table.stop() };
}

export function topicsView() {
  const table = pagedTable({
    table: $("topics-table"),
    pager: $("topics-pager"),
    path: "topics",
    rowAttrs: (t) => ({ "data-topic": t.topic }),
    columns: [
      { title: "Topic", cell: (t) => t.topic },
      { title: "Node", cell: (t) => t.node ?? DASH },
    ],
  });
  return { enter: () => table.start(), leave: () => table.stop() };
}

export function retainedView() {
  let viewing = null;
  const path = (topic) => `mqtt/retainer/message/${encodeURIComponent(topic)}`;

  const table = pagedTable({
    table: $("retained-table"),
    pager: $("retained-pager"),
    path: "mqtt/retainer/messages",
    params: () => ({ topic: $("retained-search").value.trim() }),
    rowAttrs: (m) => ({ "data-topic": m.topic }),
    columns: [
      { title: "Topic", cell: (m) => m.topic },
      { title: "QoS", cell: (m) => m.qos },
      { title: "From client", cell: (m) => m.from_clientid ?? DASH },
      { title: "From user", cell: (m) => m.from_username ?? DASH },
      { title: "Published at", cell: (m) => fmtTime(m.publish_at) },
      {
        title: "",
        cell: (m) => [
          el("button", { type: "button", class: "view-retained", "data-topic": m.topic, onclick: () => view(m.topic) }, "View"),
          " ",
          el("button", { type: "button", class: "delete-retained danger", "data-topic": m.topic, onclick: () => remove(m.topic) }, "Delete"),
        ],
      },
    ],
  });

  async function view(topic) {
    try {
      const m = await api("GET", path(topic));
      viewing = topic;
      const bytes = base64Bytes(m.payload);
      const payload = payloadText(bytes);
      $("retained-view-topic").textContent = m.topic;
      $("retained-view-fields").replaceChildren(
        el("dt", null, "QoS"), el("dd", null, m.qos),
        el("dt", null, "From"), el("dd", null, `${m.from_clientid ?? DASH} (user ${m.from_username ?? DASH})`),
        el("dt", null, "Published at"), el("dd", null, fmtTime(m.publish_at)),
        el("dt", null, "Payload"), el("dd", null, `${bytes.length} bytes${payload.binary ? ", not UTF-8: hex" : ""}`),
      );
      $("retained-payload").textContent = payload.text;
      show($("retained-view"), true);
    } catch (err) {
      report(err);
    }
  }

  async function remove(topic) {
    if (!(await confirmAction(`Delete the retained message on “${topic}”?`, "Delete"))) return;
    try {
      await api("DELETE", path(topic));
      flash(`Deleted the retained message on ${topic}.`, "ok");
      if (viewing === topic) close();
      table.refresh();
    } catch (err) {
      report(err);
    }
  }

  function close() {
    viewing = null;
    show($("retained-view"), false);
  }
  refilter(table, [$("retained-search")]);
  $("retained-view-close").addEventListener("click", close);

  return { enter: () => table.start(), leave: () => table.stop() };
}

export function bannedView() {
  const table = pagedTable({
    table: $("banned-table"),
    pager: $("banned-pager"),
    path: "banned",
    rowAttrs: (b) => ({ "data-as": b.as, "data-who": b.who }),
    columns: [
      { title: "As", cell: (b) => b.as },
      { title: "Who", cell: (b) => b.who },
      { title: "Reason", cell: (b) => b.reason ?? DASH },
      { title: "By", cell: (b) => b.by ?? DASH },
      { title: "At", cell: (b) => fmtTime(b.at) },
      // EMQX writes "infinity" for a ban without an end.
      { title: "Until", cell: (b) => (b.until && b.until !== "infinity" ? fmtTime(b.until) : "forever") },
      {
        title: "",
        cell: (b) => el("button", { type: "button", class: "unban danger", "data-as": b.as, "data-who": b.who, onclick: () => unban(b) }, "Remove"),
      },
    ],
  });

  async function unban(b) {
    if (!(await confirmAction(`Lift the ban on ${b.as} “${b.who}”?`, "Remove"))) return;
    try {
      await api("DELETE", `banned/${encodeURIComponent(b.as)}/${encodeURIComponent(b.who)}`);
      flash(`Removed the ban on ${b.as} ${b.who}.`, "ok");
      table.refresh();
    } catch (err) {
      report(err);
    }
  }

  $("ban-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("ban-error").textContent = "";
    const body = { as: $("ban-as").value, who: $("ban-who").value.trim(), reason: $("ban-reason").value.trim() };
    const until = $("ban-until").value;
    if (until) body.until = new Date(until).toISOString();
    try {
      await api("POST", "banned", body);
      $("ban-who").value = "";
      $("ban-reason").value = "";
      $("ban-until").value = "";
      table.refresh();
    } catch (err) {
      if (!err.handled) $("ban-error").textContent = err.message;
    }
  });

  return { enter: () => table.start(), leave: () => table.stop() };
}

// Link quality: connected clients with their path statistics, and per client a history of
// its RTT and per-interval loss kept from this page's own polls.
