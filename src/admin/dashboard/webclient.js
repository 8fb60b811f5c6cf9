// The web MQTT client ("online MQTT client"): MQTT.js (static/mqtt.min.js, loaded before
// the modules as a classic script: the global `mqtt`) over the broker's WebSocket listener,
// found with GET /api/v5/listeners. The connection outlives view changes; end() closes it.

import { $, api, el, flash, payloadText, report } from "./lib.js";

const MQTT_MAX_MESSAGES = 500;

export function mqttView() {
  let client = null;
  let received = 0;
  let lastError = null;
  $("mqtt-clientid").value = `petrel-web-${Math.random().toString(16).slice(2, 10)}`;

  function setStatus(state, text) {
    const status = $("mqtt-status");
    status.dataset.state = state;
    status.textContent = text || state;
    const connected = state === "connected";
    $("mqtt-connect").disabled = state === "connecting" || connected;
    $("mqtt-disconnect").disabled = !(state === "connecting" || connected);
    $("mqtt-subscribe").disabled = !connected;
    $("mqtt-publish").disabled = !connected;
  }

  // The WebSocket listener's port from GET /api/v5/listeners, with this page's host name.
  async function suggestUrl() {
    if ($("mqtt-url").value) return;
    const secure = location.protocol === "https:";
    const host = location.hostname.includes(":") ? `[${location.hostname}]` : location.hostname;
    let port = secure ? 8084 : 8083;
    try {
      const listeners = await api("GET", "listeners");
      const list = Array.isArray(listeners) ? listeners : [];
      const wanted = secure ? ["wss", "ws"] : ["ws", "wss"];
      const pick = wanted.map((type) => list.find((l) => l.type === type && l.running !== false)).find(Boolean);
      if (pick) {
        port = Number(String(pick.bind).split(":").pop());
        const scheme = pick.type === "wss" ? "wss" : "ws";
        if (!$("mqtt-url").value) $("mqtt-url").value = `${scheme}://${host}:${port}/mqtt`;
        return;
      }
    } catch (err) {
      report(err);
    }
    if (!$("mqtt-url").value) $("mqtt-url").value = `${secure ? "wss" : "ws"}://${host}:${port}/mqtt`;
  }

  function connect() {
    if (client) client.end(true);
    lastError = null;
    const options = {
      clientId: $("mqtt-clientid").value.trim(),
      protocolVersion: Number($("mqtt-version").value),
      clean: $("mqtt-clean").checked,
      keepalive: Number($("mqtt-keepalive").value) || 0,
      reconnectPeriod: 0, // an operator's tool: show a dropped connection, do not hide it
      connectTimeout: 10000,
    };
    if ($("mqtt-username").value) options.username = $("mqtt-username").value;
    if ($("mqtt-password").value) options.password = $("mqtt-password").value;
    setStatus("connecting", `connecting to ${$("mqtt-url").value}…`);
    let c;
    try {
      c = mqtt.connect($("mqtt-url").value.trim(), options);
    } catch (err) {
      setStatus("disconnected", `error: ${err.message}`);
      return;
    }
    client = c;
    c.on("connect", () => {
      if (client !== c) return;
      setStatus("connected");
      $("mqtt-subscriptions").replaceChildren();
    });
    c.on("error", (err) => {
      if (client !== c) return;
      lastError = err.message;
      setStatus("disconnected", `error: ${err.message}`);
    });
    c.on("close", () => {
      if (client !== c) return;
      setStatus("disconnected", lastError ? `disconnected: ${lastError}` : "disconnected");
      c.end(true); // no reconnect
    });
    c.on("disconnect", (packet) => {
      if (client !== c) return;
      const reason = packet && packet.reasonCode !== undefined ? ` 0x${packet.reasonCode.toString(16).padStart(2, "0")}` : "";
      lastError = `the broker disconnected us (reason${reason})`;
    });
    c.on("message", (topic, payload, packet) => addMessage(topic, payload, packet));
  }

  function addMessage(topic, payload, packet) {
    received += 1;
    $("mqtt-count").textContent = String(received);
    const shown = payloadText(payload);
    const li = el("li", { class: "mqtt-message", "data-topic": topic },
      el("div", { class: "meta" },
        el("code", { class: "topic" }, topic),
        ` QoS ${packet.qos}`, packet.retain ? " · retained" : "", ` · ${new Date().toLocaleTimeString()}`,
        shown.binary ? " · binary (hex)" : ""),
      el("pre", { class: "payload" }, shown.text));
    const list = $("mqtt-messages");
    list.prepend(li);
    while (list.children.length > MQTT_MAX_MESSAGES) list.lastElementChild.remove();
  }

  $("mqtt-connect-form").addEventListener("submit", (event) => {
    event.preventDefault();
    connect();
  });
  $("mqtt-disconnect").addEventListener("click", () => {
    if (client) client.end();
  });

  $("mqtt-subscribe-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const topic = $("mqtt-sub-topic").value.trim();
    const qos = Number($("mqtt-sub-qos").value);
    if (!client || !topic) return;
    const c = client;
    c.subscribe(topic, { qos }, (err, granted) => {
      if (err) {
        flash(`Subscribe to ${topic} failed: ${err.message}`);
        return;
      }
      const g = granted && granted[0] ? granted[0].qos : qos;
      if (g >= 0x80) {
        flash(`The broker refused the subscription to ${topic} (0x${g.toString(16)}).`);
        return;
      }
      const list = $("mqtt-subscriptions");
      for (const li of list.querySelectorAll("li")) if (li.dataset.topic === topic) li.remove();
      const li = el("li", { "data-topic": topic }, el("code", null, topic), ` QoS ${g} `,
        el("button", {
          type: "button",
          class: "mqtt-unsubscribe",
          onclick: () => c.unsubscribe(topic, () => li.remove()),
        }, "Unsubscribe"));
      list.append(li);
    });
  });

  $("mqtt-publish-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const topic = $("mqtt-topic").value.trim();
    if (!client || !topic) return;
    const qos = Number($("mqtt-qos").value);
    const status = $("mqtt-publish-status");
    status.textContent = "publishing…";
    client.publish(topic, $("mqtt-payload").value, { qos, retain: $("mqtt-retain").checked }, (err) => {
      status.textContent = err ? `publish failed: ${err.message}` : `published to ${topic} at ${new Date().toLocaleTimeString()}`;
    });
  });

  $("mqtt-clear").addEventListener("click", () => {
    received = 0;
    $("mqtt-count").textContent = "0";
    $("mqtt-messages").replaceChildren();
  });

  setStatus("disconnected");

  return {
    enter() {
      suggestUrl();
    },
    leave() {},
    end() {
      if (client) client.end(true);
      client = null;
      setStatus("disconnected");
    },
  };
}
