#!/usr/bin/env python3
"""The dashboard in a real browser: headless Chromium driven by selenium (chromedriver).

The page is opened at http://MQTT_HOST:API_PORT/ and every step goes through its elements:

* a wrong password shows the message of the API's 401 body; the right one logs in;
* the overview shows the stats, one row per node of GET /api/v5/nodes, and draws its charts
  from at least two polls;
* a paho client (MQTT v5, TCP) appears in the clients table (search by client id), its
  detail shows its subscription, the subscriptions, topics and link-quality pages list it
  (link figures "—" for TCP);
* its Kick button (after the confirmation) disconnects it: paho's on_disconnect gets the
  broker's DISCONNECT with reason 0x98 (Administrative action), and its row goes away;
* a retained message published by paho is found with the topic filter, viewed (payload shown)
  and deleted: a new subscriber then gets nothing;
* a client id banned through the form is refused at CONNECT (0x8A Banned); after the ban is
  removed it connects;
* the page's web MQTT client connects over WebSocket to the port GET /api/v5/listeners names,
  publishes a message that a paho subscriber receives (payload compared), and shows a message
  paho publishes;
* log out forgets the token.

No JavaScript error may reach the browser console. Screenshots of each step go to
target/test-artifacts/dashboard/ (DASHBOARD_ARTIFACTS overrides), plus failure.png/.html and
the browser log when a step fails.

Env: API_PORT (the API and dashboard port), DASHBOARD_USER (default admin),
DASHBOARD_PASSWORD, MQTT_WS_PORT; the script skips when one of the last three is unset.
Needs chromium, chromedriver (Debian: chromium chromium-driver) and `pip install selenium`.
"""
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

# A browser run takes ~16 s on an idle 2-core machine and ~30 s beside a build: more room than
# the other scripts' 60 s watchdog gives (run.sh still kills at SCRIPT_TIMEOUT, 90 s).
os.environ.setdefault("INTEROP_WATCHDOG", "80")

from interop_common import (  # noqa: E402
    HOST, PORT, QUIET, WATCHDOG, Collector, MQTTv5, check, close, connect, main, new_client,
    publish, subscribe, uid)

NAME = "dashboard"
API_PORT = os.environ.get("API_PORT")
USER = os.environ.get("DASHBOARD_USER", "admin")
PASSWORD = os.environ.get("DASHBOARD_PASSWORD")
WS_PORT = os.environ.get("MQTT_WS_PORT")
# Bound for every wait on the page: it polls every 2 s, so a change shows within ~2-4 s.
UI_WAIT = float(os.environ.get("DASHBOARD_UI_WAIT", "15"))
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("DASHBOARD_ARTIFACTS") or ROOT / "target" / "test-artifacts" / "dashboard")
URL_HOST = f"[{HOST}]" if ":" in HOST else HOST
BASE = f"http://{URL_HOST}:{API_PORT}/"


def skip(why):
    print(f"SKIP {NAME}: {why}", flush=True)
    os._exit(0)


def browser():
    """Headless Chromium from the system (no driver download: selenium-manager stays offline)."""
    os.environ.setdefault("SE_OFFLINE", "true")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        check(False, "python module selenium missing: pip install selenium")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    check(chromium and driver_path, "chromium and chromedriver needed: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(UI_WAIT)
    driver.set_script_timeout(UI_WAIT)
    return driver


def api_login_failure(password):
    """The API's own 401 body for a bad password (what the page must show)."""
    req = urllib.request.Request(BASE + "api/v5/login", method="POST",
                                 data=json.dumps({"username": USER, "password": password}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=5)
    except urllib.error.HTTPError as e:
        check(e.code == 401, f"POST /api/v5/login with a bad password: HTTP {e.code}, expected 401")
        return json.loads(e.read())
    check(False, "POST /api/v5/login with a bad password succeeded")


def api_get(path):
    """GET /api/v5/<path> with a login of our own: the JSON answer."""
    login = urllib.request.Request(BASE + "api/v5/login", method="POST",
                                   data=json.dumps({"username": USER, "password": PASSWORD}).encode(),
                                   headers={"Content-Type": "application/json"})
    token = json.loads(urllib.request.urlopen(login, timeout=5).read())["token"]
    req = urllib.request.Request(BASE + "api/v5/" + path, headers={"Authorization": f"Bearer {token}"})
    return json.loads(urllib.request.urlopen(req, timeout=5).read())


class Page:
    """The dashboard in one browser, with bounded waits and numbered screenshots."""

    def __init__(self, driver):
        from selenium.common.exceptions import (ElementClickInterceptedException,
                                                StaleElementReferenceException)
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait
        self.d = driver
        self.By = By
        self.shots = 0
        self.wait_ = lambda: WebDriverWait(driver, UI_WAIT, poll_frequency=0.1,
                                           ignored_exceptions=[StaleElementReferenceException,
                                                               ElementClickInterceptedException])

    def until(self, what, cond):
        """Wait (bounded) until cond() is truthy; the failure names the step."""
        from selenium.common.exceptions import TimeoutException
        try:
            return self.wait_().until(lambda _d: cond())
        except TimeoutException:
            check(False, f"{what}: not within {UI_WAIT:.0f}s")

    def id(self, element_id):
        return self.d.find_element(self.By.ID, element_id)

    def visible(self, element_id):
        return self.until(f"#{element_id} visible", lambda: self.id(element_id).is_displayed() and self.id(element_id))

    def text(self, element_id):
        return self.id(element_id).text

    def type(self, element_id, value):
        e = self.visible(element_id)
        e.clear()
        e.send_keys(value)

    def click(self, what, find):
        """Click the element find() returns, retrying while it is missing, stale or covered."""
        def attempt():
            e = find()
            if e is None or not e.is_displayed() or not e.is_enabled():
                return False
            e.click()
            return True
        self.until(f"click {what}", attempt)

    def nav(self, page):
        self.click(f"nav {page}", lambda: self.id(f"nav-{page}"))
        self.visible(f"page-{page}")

    def row(self, table_id, **data):
        """The <tr> of #table_id whose data-* attributes equal data (None when absent)."""
        return self.d.execute_script(
            """const [table, want] = arguments;
               return [...document.querySelectorAll(`#${table} tbody tr`)].find(
                   (tr) => Object.entries(want).every(([k, v]) => tr.dataset[k] === v)) || null;""",
            table_id, data)

    def in_row(self, table_id, selector, **data):
        r = self.row(table_id, **data)
        return r.find_element(self.By.CSS_SELECTOR, selector) if r is not None else None

    def confirm(self):
        self.click("confirm OK", lambda: self.id("confirm-ok"))
        self.until("confirmation dialog closed", lambda: not self.id("confirm-dialog").is_displayed())

    def shot(self, name):
        self.shots += 1
        self.d.save_screenshot(str(ARTIFACTS / f"{self.shots:02d}-{name}.png"))

    def console_errors(self):
        """Browser console errors other than failed requests (statuses are checked by behaviour)."""
        return [e["message"] for e in self.d.get_log("browser")
                if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]


def mqtt_client(client_id, protocol=MQTTv5):
    c = new_client(client_id, protocol)
    col = Collector().attach(c)
    return c, col


def connack_code(client_id):
    """Connect once (v5) and return the CONNACK reason code (0 = accepted)."""
    c, col = mqtt_client(client_id)
    try:
        c.connect(HOST, PORT, keepalive=30)
        c.loop_start()
        check(col.wait(lambda: col.connacks or col.disconnects), f"{client_id}: no CONNACK")
        return col.connacks[0][1] if col.connacks else -1
    finally:
        close(c)


def steps(p, run):
    base_topic = f"petrel/it/dash/{run}"
    paho_id = f"dash-paho-{run}"

    # Login: a wrong password shows the API's message, the right one opens the overview.
    p.d.get(BASE)
    bad = api_login_failure("wrong-" + run)
    p.type("login-username", USER)
    p.type("login-password", "wrong-" + run)
    p.click("login", lambda: p.id("login-submit"))
    p.until("login error shown", lambda: p.text("login-error"))
    check(p.text("login-error") == bad.get("message"),
          f"login error shows {p.text('login-error')!r}, the API said {bad}")
    check(p.id("page-login").is_displayed() and not p.id("nav").is_displayed(), "a bad password logged in")
    p.shot("login-error")
    p.type("login-password", PASSWORD)
    p.click("login", lambda: p.id("login-submit"))
    p.visible("page-overview")
    check(p.d.execute_script("return sessionStorage.getItem('petrel.dashboard')"), "no token kept after login")

    # The paho client the next pages must show, with one subscription.
    paho, col = mqtt_client(paho_id)
    connect(paho, col, what="paho")
    sub_topic = f"{base_topic}/cmd"
    subscribe(paho, col, sub_topic, qos=1, what="paho")

    p.until("overview charts from two polls",
            lambda: int(p.id("chart-rates").get_attribute("data-samples") or 0) >= 2)
    connections = p.text("stat-connections-count")
    check(connections.isdigit() and int(connections) >= 1, f"overview connections shows {connections!r}")
    # The nodes table: every node GET /api/v5/nodes lists, each with its status.
    node_names = [n["node"] for n in api_get("nodes")]
    rows = p.d.find_elements(p.By.CSS_SELECTOR, "#nodes-table tbody tr")
    check([r.get_attribute("data-node") for r in rows] == node_names,
          f"nodes table lists {[r.get_attribute('data-node') for r in rows]}, the API {node_names}")
    check(all("running" in r.text or "stopped" in r.text for r in rows), "a node row has no status")
    p.shot("overview")

    # Clients: search by client id, the row appears; the detail lists the subscription.
    p.nav("clients")
    p.type("clients-search", paho_id)
    p.until("paho's row in the clients table", lambda: p.row("clients-table", clientid=paho_id))
    p.until("only matching rows", lambda: all(
        paho_id in (tr.get_attribute("data-clientid") or "")
        for tr in p.d.find_elements(p.By.CSS_SELECTOR, "#clients-table tbody tr[data-clientid]")))
    row_text = p.row("clients-table", clientid=paho_id).text
    check("connected" in row_text and "tcp" in row_text and "MQTT 5.0" in row_text,
          f"paho's row reads {row_text!r}")
    p.shot("clients")
    p.click("client link", lambda: p.in_row("clients-table", "a.clientid", clientid=paho_id))
    p.visible("page-client")
    p.until("client detail", lambda: p.d.find_element(
        p.By.CSS_SELECTOR, '#client-fields dd[data-field="clientid"]').text == paho_id)
    p.until("client's subscription", lambda: p.row("client-subscriptions", topic=sub_topic))
    p.shot("client-detail")

    p.nav("subscriptions")
    p.type("subscriptions-clientid", paho_id)
    p.until("subscriptions row", lambda: p.row("subscriptions-table", clientid=paho_id, topic=sub_topic))
    p.shot("subscriptions")
    p.nav("topics")
    p.until("topics row", lambda: p.row("topics-table", topic=sub_topic))
    p.shot("topics")

    p.nav("link")
    p.until("link-quality row", lambda: p.row("link-table", clientid=paho_id))
    cells = [td.text for td in p.row("link-table", clientid=paho_id).find_elements(p.By.TAG_NAME, "td")]
    # TCP's figures come from the kernel's TCP_INFO: an RTT in ms and a retransmission rate.
    def number(text):
        try:
            float(text.replace(",", ""))
            return True
        except ValueError:
            return False
    p.until("link-quality figures", lambda: number(
        p.row("link-table", clientid=paho_id).find_elements(p.By.TAG_NAME, "td")[3].text))
    cells = [td.text for td in p.row("link-table", clientid=paho_id).find_elements(p.By.TAG_NAME, "td")]
    check(cells[1] == "tcp" and number(cells[3]) and number(cells[4]),
          f"link-quality row for a TCP client reads {cells}")
    p.shot("link-quality")

    # Kick from the clients table: paho gets DISCONNECT 0x98 and the row goes away.
    p.nav("clients")
    p.until("paho's row again", lambda: p.row("clients-table", clientid=paho_id))
    p.click("Kick", lambda: p.in_row("clients-table", "button.kick", clientid=paho_id))
    p.visible("confirm-dialog")
    check(paho_id in p.text("confirm-message"), f"confirmation reads {p.text('confirm-message')!r}")
    p.shot("kick-confirm")
    p.confirm()
    check(col.wait(lambda: col.disconnects, timeout=UI_WAIT), "paho saw no disconnect after the kick")
    check(col.disconnects[0] == 0x98,
          f"paho's disconnect reason is {col.disconnects[0]:#x}, expected 0x98 (Administrative action)")
    p.until("kicked row gone", lambda: p.row("clients-table", clientid=paho_id) is None)
    p.shot("kicked")
    close(paho)

    # Retained: listed, viewed, deleted (and gone for a new subscriber).
    helper, hcol = mqtt_client(f"dash-helper-{run}")
    connect(helper, hcol, what="helper")
    rtopic = f"{base_topic}/retained"
    rpayload = f"retained ✓ {run}"
    publish(helper, rtopic, rpayload.encode(), qos=1, retain=True, what="helper")
    p.nav("retained")
    # The broker's own $SYS topics are retained too (and sort first): filter by the topic.
    p.type("retained-search", rtopic)
    p.until("retained row", lambda: p.row("retained-table", topic=rtopic))
    p.click("View", lambda: p.in_row("retained-table", "button.view-retained", topic=rtopic))
    p.until("retained payload shown", lambda: p.text("retained-payload") == rpayload)
    p.shot("retained-view")
    p.click("Delete", lambda: p.in_row("retained-table", "button.delete-retained", topic=rtopic))
    p.confirm()
    p.until("retained row gone", lambda: p.row("retained-table", topic=rtopic) is None)
    late, lcol = mqtt_client(f"dash-late-{run}")
    connect(late, lcol, what="late subscriber")
    subscribe(late, lcol, rtopic, qos=1, what="late subscriber")
    got = lcol.quiet(QUIET, topic=rtopic)
    check(not got, f"the deleted retained message still arrives: {got}")
    close(late)

    # Banned: a client id banned in the form is refused; after removing the ban it connects.
    banned_id = f"dash-banned-{run}"
    p.nav("banned")
    p.d.execute_script("document.getElementById('ban-as').value = 'clientid'")
    p.type("ban-who", banned_id)
    p.type("ban-reason", "dashboard test")
    p.click("Ban", lambda: p.id("ban-submit"))
    p.until("banned row", lambda: p.row("banned-table", **{"as": "clientid", "who": banned_id}))
    check(not p.text("ban-error"), f"ban form error: {p.text('ban-error')!r}")
    p.shot("banned")
    code = connack_code(banned_id)
    check(code == 0x8A, f"a banned client id got CONNACK {code:#x}, expected 0x8a (Banned)")
    p.click("Remove", lambda: p.in_row("banned-table", "button.unban", **{"as": "clientid", "who": banned_id}))
    p.confirm()
    p.until("banned row gone", lambda: p.row("banned-table", **{"as": "clientid", "who": banned_id}) is None)
    code = connack_code(banned_id)
    check(code == 0, f"after removing the ban the client id got CONNACK {code:#x}")

    # The web MQTT client over WebSocket: publish to paho, receive from paho.
    p.nav("mqtt")
    want_url = f"ws://{URL_HOST}:{WS_PORT}/mqtt"
    p.until(f"web client URL {want_url} (from /api/v5/listeners)",
            lambda: p.id("mqtt-url").get_attribute("value") == want_url)
    web_id = f"dash-web-{run}"
    p.type("mqtt-clientid", web_id)
    p.click("Connect", lambda: p.id("mqtt-connect"))
    p.until("web client connected", lambda: p.id("mqtt-status").get_attribute("data-state") == "connected")
    wtopic = f"{base_topic}/web"
    subscribe(helper, hcol, wtopic, qos=1, what="helper")
    p.type("mqtt-sub-topic", wtopic)
    p.click("Subscribe", lambda: p.id("mqtt-subscribe"))
    p.until("web subscription listed", lambda: p.d.execute_script(
        "return [...document.querySelectorAll('#mqtt-subscriptions li')].some((li) => li.dataset.topic === arguments[0])",
        wtopic))
    wpayload = f"hello from the dashboard ✓ {run}"
    p.type("mqtt-topic", wtopic)
    p.type("mqtt-payload", wpayload)
    p.d.execute_script("document.getElementById('mqtt-qos').value = '1'")
    p.click("Publish", lambda: p.id("mqtt-publish"))
    msgs = hcol.wait_messages(1, timeout=UI_WAIT, topic=wtopic)
    check(msgs and msgs[0].payload == wpayload.encode(),
          f"paho got {msgs} from the web client, expected {wpayload!r}")
    from_paho = f"from paho ✓ {run}"
    publish(helper, wtopic, from_paho.encode(), qos=1, what="helper")

    def page_messages():
        return p.d.execute_script(
            "return [...document.querySelectorAll('#mqtt-messages li.mqtt-message')]"
            ".filter((li) => li.dataset.topic === arguments[0]).map((li) => li.querySelector('pre').textContent)",
            wtopic)
    p.until("both messages in the web client's list",
            lambda: wpayload in page_messages() and from_paho in page_messages())
    p.shot("mqtt-client")
    p.click("Disconnect", lambda: p.id("mqtt-disconnect"))
    p.until("web client disconnected", lambda: p.id("mqtt-status").get_attribute("data-state") == "disconnected")
    close(helper)

    # Log out: the login form again, no token kept.
    p.click("Log out", lambda: p.id("logout"))
    p.visible("page-login")
    check(p.d.execute_script("return sessionStorage.getItem('petrel.dashboard')") is None,
          "the token is still stored after log out")
    p.shot("logged-out")

    errors = p.console_errors()
    check(not errors, f"browser console errors: {errors}")


def body():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*"):
        if old.suffix in (".png", ".html", ".log"):
            old.unlink()
    started = time.monotonic()
    driver = browser()
    # Quit the browser before interop_common's watchdog ends the process (os._exit would leave
    # chromium running): the pending selenium call then fails and the script reports it.
    guard = threading.Timer(max(5.0, WATCHDOG - 8), driver.quit)
    guard.daemon = True
    guard.start()
    page = Page(driver)
    try:
        steps(page, uid())
    except BaseException:
        try:
            driver.save_screenshot(str(ARTIFACTS / "failure.png"))
            (ARTIFACTS / "failure.html").write_text(driver.page_source)
            (ARTIFACTS / "browser.log").write_text(
                "\n".join(f"{e['level']} {e['message']}" for e in driver.get_log("browser")))
        except Exception:  # noqa: BLE001 (the browser may be gone)
            pass
        raise
    finally:
        guard.cancel()
        driver.quit()
    print(f"{NAME}: {page.shots} screenshots in {ARTIFACTS} ({time.monotonic() - started:.1f}s)", flush=True)


if __name__ == "__main__":
    if not API_PORT:
        skip("API_PORT not set")
    if not PASSWORD:
        skip("DASHBOARD_PASSWORD not set")
    if not WS_PORT:
        skip("MQTT_WS_PORT not set (the web MQTT client needs the WebSocket listener)")
    main(NAME, body)
