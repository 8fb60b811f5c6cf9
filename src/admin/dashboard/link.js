// Link quality: the connected clients with their transport and path statistics (RTT, loss,
// congestion window, congestion events), and per client a history of its RTT and its loss per
// poll interval, kept from this page's own polls, so an operator sees which vehicles sit on
// bad links. QUIC's figures are quinn's path statistics; TCP's (tcp, tls, ws, wss) are the
// kernel's TCP_INFO, where "lost" is "retransmitted" and no congestion events are counted
// (shown as "—"). `link` is null where the broker could not read them: shown as "—".

import { $, DASH, PALETTE, api, clientLink, el, fmtNumber, poller, query, show } from "./lib.js";
import { drawSparkline, niceMax } from "./charts.js";

const LINK_SAMPLES = 60; // per-client sparkline history
const LINK_PAGE_LIMIT = 100;
const LINK_MAX_PAGES = 10;
// A row turns amber above the first thresholds, red above the second (also in index.html).
const RTT_WARN_MS = 100, RTT_BAD_MS = 300, LOSS_WARN_PCT = 1, LOSS_BAD_PCT = 5;

export function linkView() {
  const histories = new Map(); // clientid -> {rtt: [], loss: [], sent, lost}
  const rows = new Map(); // clientid -> {tr, cells, rttSpark, lossSpark}
  let poll = null;
  const body = el("tbody");
  const columns = ["Client ID", "Transport", "Peer", "RTT (ms)", "Loss / retrans. %", "Lost or resent / sent", "cwnd", "Congestion events", "RTT history", "Loss history"];
  $("link-table").replaceChildren(el("thead", null, el("tr", null, columns.map((c) => el("th", null, c)))), body);

  function sample(client) {
    const link = client.link;
    let h = histories.get(client.clientid);
    if (!h) {
      h = { rtt: [], loss: [], sent: null, lost: null };
      histories.set(client.clientid, h);
    }
    let rtt = null, lossInterval = null;
    if (link) {
      rtt = link.rtt_us / 1000;
      if (h.sent !== null && link.sent_packets > h.sent) {
        lossInterval = (100 * Math.max(0, link.lost_packets - h.lost)) / (link.sent_packets - h.sent);
      } else if (h.sent !== null) {
        lossInterval = 0;
      }
      h.sent = link.sent_packets;
      h.lost = link.lost_packets;
    }
    h.rtt.push(rtt);
    h.loss.push(lossInterval);
    if (h.rtt.length > LINK_SAMPLES) h.rtt.shift();
    if (h.loss.length > LINK_SAMPLES) h.loss.shift();
    return h;
  }

  // A sparkline cell: the canvas, or "—" when the transport reports no path statistics.
  function sparkCell() {
    const canvas = el("canvas", { class: "spark", width: 120, height: 24 });
    const none = el("span", { class: "muted" }, DASH);
    return { canvas, none, td: el("td", null, canvas, none) };
  }

  function row(clientid) {
    let r = rows.get(clientid);
    if (r) return r;
    const cells = {};
    for (const k of ["transport", "peer", "rtt", "loss", "packets", "cwnd", "cong"]) {
      cells[k] = el("td", { class: k === "transport" || k === "peer" ? null : "num" });
    }
    const rttSpark = sparkCell(), lossSpark = sparkCell();
    const tr = el("tr", { "data-clientid": clientid },
      el("td", null, clientLink(clientid)), cells.transport, cells.peer, cells.rtt, cells.loss,
      cells.packets, cells.cwnd, cells.cong, rttSpark.td, lossSpark.td);
    r = { tr, cells, rttSpark, lossSpark };
    rows.set(clientid, r);
    return r;
  }

  async function fetchConnected() {
    const all = [];
    for (let page = 1; page <= LINK_MAX_PAGES; page++) {
      const res = await api("GET", `clients?${query({ page, limit: LINK_PAGE_LIMIT, conn_state: "connected" })}`);
      const data = (res && res.data) || [];
      all.push(...data.filter((c) => c.connected !== false));
      if (!res || !res.meta || !res.meta.hasnext) return { clients: all, truncated: false };
    }
    return { clients: all, truncated: true };
  }

  async function load() {
    const { clients, truncated } = await fetchConnected();
    const seen = new Set();
    const entries = [];
    for (const c of clients) {
      seen.add(c.clientid);
      const h = sample(c);
      const link = c.link;
      const lossTotal = link && link.sent_packets > 0 ? (100 * link.lost_packets) / link.sent_packets : link ? 0 : null;
      entries.push({ c, h, rtt: link ? link.rtt_us / 1000 : null, lossTotal });
    }
    for (const id of [...histories.keys()]) {
      if (!seen.has(id)) {
        histories.delete(id);
        const r = rows.get(id);
        if (r) r.tr.remove();
        rows.delete(id);
      }
    }
    const sortBy = $("link-sort").value;
    const worst = (key) => (a, b) => (b[key] ?? -1) - (a[key] ?? -1) || a.c.clientid.localeCompare(b.c.clientid);
    entries.sort(sortBy === "clientid" ? (a, b) => a.c.clientid.localeCompare(b.c.clientid) : worst(sortBy === "loss" ? "lossTotal" : "rtt"));

    body.querySelectorAll("tr.empty").forEach((tr) => tr.remove());
    for (const { c, h, rtt, lossTotal } of entries) {
      const r = row(c.clientid);
      const link = c.link;
      r.cells.transport.textContent = c.transport || c.listener || DASH;
      r.cells.peer.textContent = c.ip_address ? `${c.ip_address}:${c.port}` : DASH;
      r.cells.rtt.textContent = link ? fmtNumber(rtt) : DASH;
      r.cells.loss.textContent = link ? lossTotal.toFixed(2) : DASH;
      r.cells.packets.textContent = link ? `${link.lost_packets} / ${link.sent_packets}` : DASH;
      r.cells.cwnd.textContent = link ? fmtNumber(link.cwnd) : DASH;
      r.cells.cong.textContent = link && c.transport === "quic" ? fmtNumber(link.congestion_events) : DASH;
      const bad = link && (rtt > RTT_BAD_MS || lossTotal > LOSS_BAD_PCT);
      const warn = link && !bad && (rtt > RTT_WARN_MS || lossTotal > LOSS_WARN_PCT);
      r.tr.className = bad ? "bad" : warn ? "warn" : "";
      body.append(r.tr); // appending moves the row: the table follows the sort order
      for (const spark of [r.rttSpark, r.lossSpark]) {
        show(spark.canvas, Boolean(link));
        show(spark.none, !link);
      }
      if (link) {
        drawSparkline(r.rttSpark.canvas, h.rtt, LINK_SAMPLES, PALETTE[0]);
        const lossPeak = Math.max(0, ...h.loss.filter((v) => v !== null));
        drawSparkline(r.lossSpark.canvas, h.loss, LINK_SAMPLES, PALETTE[2], Math.max(LOSS_BAD_PCT, niceMax(lossPeak)));
        const rttPeak = Math.max(0, ...h.rtt.filter((v) => v !== null));
        r.rttSpark.canvas.title = `RTT over the last ${h.rtt.length} polls, up to ${fmtNumber(rttPeak)} ms`;
        r.lossSpark.canvas.title = `Loss per poll interval over the last ${h.loss.length} polls, up to ${fmtNumber(lossPeak)} %`;
      }
    }
    if (entries.length === 0) body.append(el("tr", { class: "empty" }, el("td", { colspan: columns.length }, "No connected clients.")));
    $("link-truncated").textContent = `Showing the first ${LINK_PAGE_LIMIT * LINK_MAX_PAGES} connected clients.`;
    show($("link-truncated"), truncated);
  }

  $("link-sort").addEventListener("change", () => poll && poll.refresh());

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
