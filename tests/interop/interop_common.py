"""Shared helpers for the Petrel interop scripts (not a test itself).

Every test script:
  * reads MQTT_HOST (default 127.0.0.1) / MQTT_PORT (default 1883),
  * uses unique client ids and topics (random suffix) so runs never interfere,
  * bounds every wait with a timeout, plus a global watchdog,
  * prints exactly one line ``PASS name`` or ``FAIL name: why`` and exits 0 / 1.

Clients are built the way the users write them (paho-mqtt 1.x style):
``mqtt_client.Client(client_id=..., protocol=MQTTv311, transport="tcp")`` with
1.x callback signatures.  On paho-mqtt 2.x this is ``CallbackAPIVersion.VERSION1``,
passed explicitly so the scripts also work on 2.0.x (where it is mandatory) and
its DeprecationWarning is silenced.
"""

import logging
import os
import random
import socket
import string
import sys
import threading
import time
import traceback
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)

from paho.mqtt import client as mqtt_client  # noqa: E402
from paho.mqtt.client import MQTTv311, MQTTv5  # noqa: E402,F401
from paho.mqtt.packettypes import PacketTypes  # noqa: E402,F401
from paho.mqtt.properties import Properties  # noqa: E402,F401

# The paho helpers (publish.single, subscribe.simple, ...) call enable_logger();
# without a handler their benign "Client is not connected" errors after a clean
# disconnect would go to stderr.  Keep them unless INTEROP_DEBUG is set.
if not os.environ.get("INTEROP_DEBUG"):
    logging.getLogger("paho").addHandler(logging.NullHandler())
    logging.getLogger("paho").propagate = False

HOST = os.environ.get("MQTT_HOST", "127.0.0.1")
PORT = int(os.environ.get("MQTT_PORT", "1883"))

# Default bound for "should arrive" waits and for "must NOT arrive" quiet periods.
WAIT = float(os.environ.get("INTEROP_WAIT", "5"))
QUIET = float(os.environ.get("INTEROP_QUIET", "1.0"))
# Hard limit for a whole script; run.sh also applies an external timeout.
WATCHDOG = float(os.environ.get("INTEROP_WATCHDOG", "60"))

PROTOS = [("v311", MQTTv311), ("v5", MQTTv5)]


class CheckFailed(Exception):
    pass


def check(cond, why):
    if not cond:
        raise CheckFailed(why)


def uid(n=8):
    return "".join(random.choice(string.ascii_lowercase + string.digits) for _ in range(n))


def rc_value(rc):
    """int value of an int / ReasonCode connect or subscribe result."""
    if hasattr(rc, "value"):
        return rc.value
    return int(rc)


def session_present(flags):
    if isinstance(flags, dict):
        return int(flags.get("session present", 0))
    return int(getattr(flags, "session_present", 0))


def wait_until(pred, timeout=WAIT, step=0.02):
    """Poll pred() (for conditions spanning several clients) until true or timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


def new_client(client_id, protocol=MQTTv311, clean_session=None, reconnect=False, userdata=None):
    """Client built like the users do, with 1.x-style callbacks."""
    kwargs = dict(client_id=client_id, protocol=protocol, transport="tcp", userdata=userdata)
    if protocol != MQTTv5 and clean_session is not None:
        kwargs["clean_session"] = clean_session
    # No automatic reconnect: a test must see a dropped connection, not hide it.
    kwargs["reconnect_on_failure"] = reconnect
    if hasattr(mqtt_client, "CallbackAPIVersion"):  # paho-mqtt >= 2.0
        kwargs["callback_api_version"] = mqtt_client.CallbackAPIVersion.VERSION1
    return mqtt_client.Client(**kwargs)


class Collector:
    """Thread-safe record of callbacks of one client."""

    def __init__(self):
        self.cond = threading.Condition()
        self.messages = []
        self.connacks = []  # (session_present, rc_value, properties)
        self.subacks = []  # (mid, granted list)
        self.unsubacks = []  # mids
        self.disconnects = []

    # --- callbacks (1.x signatures; work for v3.1.1 and v5) ---
    def on_connect(self, client, userdata, flags, rc, properties=None):
        with self.cond:
            self.connacks.append((session_present(flags), rc_value(rc), properties))
            self.cond.notify_all()

    def on_message(self, client, userdata, msg):
        rec = Msg(msg)
        with self.cond:
            self.messages.append(rec)
            self.cond.notify_all()

    def on_subscribe(self, client, userdata, mid, granted, properties=None):
        with self.cond:
            self.subacks.append((mid, [rc_value(g) for g in granted]))
            self.cond.notify_all()

    def on_unsubscribe(self, client, userdata, mid, *rest):
        with self.cond:
            self.unsubacks.append(mid)
            self.cond.notify_all()

    def on_disconnect(self, client, userdata, rc, properties=None):
        with self.cond:
            self.disconnects.append(rc_value(rc))
            self.cond.notify_all()

    def attach(self, client):
        client.on_connect = self.on_connect
        client.on_message = self.on_message
        client.on_subscribe = self.on_subscribe
        client.on_unsubscribe = self.on_unsubscribe
        client.on_disconnect = self.on_disconnect
        return self

    # --- waits ---
    def wait(self, pred, timeout=WAIT):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True

    def wait_connack(self, n=1, timeout=WAIT, what="client"):
        ok = self.wait(lambda: len(self.connacks) >= n, timeout)
        check(ok, f"{what}: no CONNACK within {timeout}s")
        sp, rc, props = self.connacks[n - 1]
        check(rc == 0, f"{what}: CONNACK refused rc={rc}")
        return sp, props

    def wait_suback(self, mid, timeout=WAIT, what="client"):
        ok = self.wait(lambda: any(m == mid for m, _ in self.subacks), timeout)
        check(ok, f"{what}: no SUBACK for mid {mid} within {timeout}s")
        granted = [g for m, g in self.subacks if m == mid][0]
        check(all(g < 0x80 for g in granted), f"{what}: SUBACK refused {granted}")
        return granted

    def wait_messages(self, n, timeout=WAIT, topic=None):
        def count():
            return len(self.msgs(topic))
        self.wait(lambda: count() >= n, timeout)
        return self.msgs(topic)

    def msgs(self, topic=None):
        with self.cond:
            return [m for m in self.messages if topic is None or m.topic == topic]

    def quiet(self, seconds=QUIET, topic=None):
        """Sleep a quiet period, then return the messages seen (on topic)."""
        time.sleep(seconds)
        return self.msgs(topic)


class Msg:
    """Snapshot of a received paho MQTTMessage."""

    def __init__(self, m):
        self.topic = m.topic
        self.payload = bytes(m.payload)
        self.qos = m.qos
        self.retain = int(m.retain)
        self.props = getattr(m, "properties", None)

    def prop(self, name, default=None):
        if self.props is None:
            return default
        return getattr(self.props, name, default)

    def __repr__(self):
        return f"Msg({self.topic!r}, {self.payload!r}, qos={self.qos}, retain={self.retain})"


def connect(client, col, what="client", clean_start=None, properties=None, keepalive=30,
            use_async=False, loop="start"):
    """Connect and start the network loop; wait for a successful CONNACK.

    loop="start": loop_start(); loop="forever": loop_forever() in a daemon thread.
    Returns (session_present, connack properties).
    """
    n = len(col.connacks) + 1
    kw = {"keepalive": keepalive}
    if client._protocol == MQTTv5:
        if clean_start is not None:
            kw["clean_start"] = clean_start
        if properties is not None:
            kw["properties"] = properties
    if use_async:
        client.connect_async(HOST, PORT, **kw)
    else:
        client.connect(HOST, PORT, **kw)
    if loop == "forever":
        t = threading.Thread(target=client.loop_forever, daemon=True)
        t.start()
        client._interop_thread = t
    else:
        client.loop_start()
    return col.wait_connack(n, what=what)


def subscribe(client, col, topic, qos=0, options=None, properties=None, what="client"):
    if options is not None:
        rc, mid = client.subscribe(topic, options=options, properties=properties)
    elif properties is not None:
        rc, mid = client.subscribe(topic, qos, properties=properties)
    else:
        rc, mid = client.subscribe(topic, qos)
    check(rc == mqtt_client.MQTT_ERR_SUCCESS, f"{what}: subscribe() returned {rc}")
    return col.wait_suback(mid, what=what)


def publish(client, topic, payload, qos=0, retain=False, properties=None, what="publisher"):
    info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
    check(info.rc == mqtt_client.MQTT_ERR_SUCCESS, f"{what}: publish() returned {info.rc}")
    if qos > 0:
        info.wait_for_publish(timeout=WAIT)
        check(info.is_published(), f"{what}: QoS {qos} publish to {topic} not acknowledged within {WAIT}s")
    return info


def close(client):
    """Normal DISCONNECT and stop the loop (best effort)."""
    try:
        client.disconnect()
    except Exception:
        pass
    t = getattr(client, "_interop_thread", None)
    if t is not None:
        t.join(timeout=WAIT)
    else:
        try:
            client.loop_stop()
        except Exception:
            pass


def drop(client):
    """Kill the TCP connection without sending DISCONNECT (simulated crash).

    shutdown(SHUT_RDWR) first: from then on nothing (in particular no
    DISCONNECT) can be written on the connection; the broker sees a FIN.  The
    paho network thread wakes up on the dead socket and exits
    (reconnect_on_failure=False), then we join it.
    """
    sock = client.socket()
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    try:
        client.loop_stop()
    except Exception:
        pass
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


def clear_session(client_id, protocol):
    """Remove a persistent session left on the broker (best effort)."""
    try:
        c = new_client(client_id, protocol, clean_session=True if protocol != MQTTv5 else None)
        col = Collector().attach(c)
        connect(c, col, clean_start=True)
        close(c)
    except Exception:
        pass


def clear_retained(topic):
    try:
        c = new_client("clr-" + uid())
        col = Collector().attach(c)
        connect(c, col)
        publish(c, topic, b"", qos=1, retain=True)
        close(c)
    except Exception:
        pass


def main(name, body):
    """Run body(); print PASS/FAIL line; exit 0/1. A watchdog bounds the run."""

    def watchdog():
        print(f"FAIL {name}: watchdog timeout after {WATCHDOG:.0f}s", flush=True)
        os._exit(1)

    wd = threading.Timer(WATCHDOG, watchdog)
    wd.daemon = True
    wd.start()
    try:
        body()
    except CheckFailed as e:
        print(f"FAIL {name}: {e}", flush=True)
        os._exit(1)
    except Exception as e:  # connection refused, etc.
        if os.environ.get("INTEROP_DEBUG"):
            traceback.print_exc()
        print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
        os._exit(1)
    print(f"PASS {name}", flush=True)
    sys.stdout.flush()
    os._exit(0)
