// Petrel dashboard: a single page over the broker's EMQX-compatible /api/v5.
//
// Every view is a <section> of index.html, shown by the hash route (#/clients,
// #/clients/<url-encoded id>, ...). A view has enter(args)/leave(): enter starts its polling,
// leave stops it, so only the visible view talks to the broker. Data is always inserted as
// text, never as HTML. The web MQTT client keeps its connection across views; logging out
// ends it. This module holds the login, log out and routing; it is the page's entry point.

import { $, api, saveSession, session, setUnauthorizedHandler, show } from "./lib.js";
import {
  bannedView, clientView, clientsView, overviewView, retainedView, subscriptionsView, topicsView,
} from "./views.js";
import { linkView } from "./link.js";
import { mqttView } from "./webclient.js";

const views = {
  overview: overviewView(),
  clients: clientsView(),
  client: clientView(),
  subscriptions: subscriptionsView(),
  topics: topicsView(),
  retained: retainedView(),
  banned: bannedView(),
  link: linkView(),
  mqtt: mqttView(),
};

setUnauthorizedHandler(logout);

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const username = $("login-username").value;
  $("login-error").textContent = "";
  $("login-submit").disabled = true;
  try {
    const result = await api("POST", "login", { username, password: $("login-password").value });
    session.token = result.token;
    session.username = username;
    session.version = result.version || "";
    saveSession();
    $("login-password").value = "";
    if (!location.hash || location.hash.startsWith("#/login")) location.hash = "#/overview";
    else route();
  } catch (err) {
    $("login-error").textContent = err.message;
  } finally {
    $("login-submit").disabled = false;
  }
});

function logout(message) {
  const username = session.username;
  if (session.token) {
    // EMQX's logout invalidates the token on the server; best effort, we forget it anyway.
    api("POST", "logout", { username }).catch(() => {});
  }
  for (const key of Object.keys(session)) delete session[key];
  saveSession();
  views.mqtt.end();
  $("login-error").textContent = message || "";
  if (location.hash !== "#/login") location.hash = "#/login";
  else route();
}

$("logout").addEventListener("click", () => logout());
$("flash-close").addEventListener("click", () => show($("flash"), false));

let current = null;

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  let name = parts[0];
  let args = parts.slice(1).map((p) => {
    try {
      return decodeURIComponent(p);
    } catch (_) {
      return p;
    }
  });
  if (name === "clients" && args.length > 0 && args[0] !== "") name = "client";
  else args = [];

  if (current) current.view.leave();
  current = null;
  for (const page of document.querySelectorAll("section.page")) show(page, false);

  const loggedIn = Boolean(session.token);
  show($("topbar"), loggedIn);
  show($("nav"), loggedIn);
  if (!loggedIn) {
    show($("page-login"), true);
    $("login-username").focus();
    return;
  }
  if (!views[name]) {
    location.hash = "#/overview";
    return;
  }
  $("version").textContent = session.version ? `v${session.version}` : "";
  $("whoami").textContent = session.username || "";
  for (const a of $("nav").querySelectorAll("a")) {
    a.classList.toggle("active", a.id === `nav-${name === "client" ? "clients" : name}`);
  }
  show($(`page-${name}`), true);
  current = { name, view: views[name] };
  current.view.enter(args);
}

window.addEventListener("hashchange", route);
route();
