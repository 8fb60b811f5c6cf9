"""A Petrel cluster on NATS JetStream with real components: 3 nats-server, 3 Petrel nodes.

The script owns every process. It starts a 3-server NATS cluster (JetStream on, loopback
ports, temporary store directories) and waits until JetStream has a meta leader, then starts
3 Petrel nodes from the given binary (each with its own data directory and TCP port, the API
on a port of its own, `cluster.nats` naming the three servers, `cluster.node_name` n1..n3,
`cluster.replicas` 3). Then it runs these scenarios with paho-mqtt clients (MQTT 5 and 3.1.1):

  cross_node_qos     subscriber on n2, publisher on n1: QoS 0/1/2 all arrive, QoS 2 exactly
                     once, in order per QoS, delivered QoS = min(publish, subscription)
  retained           set on n1, seen by new subscribers on n2 and n3; cleared on n1, gone there
  session_resume     a persistent session made on n1, offline messages published on n3,
                     resumed on n2: session present, every queued message, in order
  takeover           the same client id on n1 then n3: the first connection gets DISCONNECT
                     0x8E (MQTT 5) or is closed (3.1.1); the session follows (session present)
  shared             `$share/g/t`, one member per node: every message exactly once in total,
                     every member gets some (round robin)
  nodes              `GET /api/v5/nodes` on every node names n1, n2 and n3
  kill_petrel        kill -9 of n1 under QoS 1 load: its publishers move to n2/n3 and republish
                     what was not acknowledged; persistent subscribers on n2 and n3 (and one
                     that was on n1 and moves to n3) get every acknowledged message
  kill_petrel_qos2   kill -9 of n3 under QoS 2 load from persistent publishers: the same paho
                     clients reconnect to n1/n2 and resend what is in flight; persistent QoS 2
                     subscribers on n1 and n2 get every PUBCOMPed message exactly once
  kill_nats          kill -9 of one NATS server of three: publishes and deliveries go on
  restart_all        stop every Petrel node and NATS server, start them again (Petrel on empty
                     data directories: JetStream is the source of truth): the retained message
                     and a persistent session with its queued messages survive

After a subscribe, interest crosses the cluster asynchronously: the scenarios publish probes
until one arrives (bounded) instead of sleeping. Every loop is bounded in count and time, the
whole run by a watchdog; every process is killed at the end, also on failure. The seed is
printed (CLUSTER_SEED replays the random choices: topics, kill moments, the NATS server killed).

    python3 tests/interop/cluster.py [target/debug/petrel]

Env: CLUSTER_SEED, CLUSTER_WATCHDOG (s, default 170), CLUSTER_ONLY (comma-separated scenario
names), CLUSTER_KEEP (keep the temporary directory and its logs), CLUSTER_LOG_LEVEL (the nodes'
log.level, default info), NATS_SERVER (default nats-server on the PATH, else /usr/sbin/nats-server), CLUSTER_RESTART_KEEP_DATA (restart
Petrel nodes on their old data directories in restart_all), CLUSTER_NATS_TRACE (nats-server -DV),
CLUSTER_STAGGER (seconds between Petrel node starts, default 0).
Prints one "PASS name" / "FAIL name: why" line per scenario (a failure also prints the new
lines of every node's log), then "cluster: N passed, M failed"; exits 0 only if none failed.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)

from paho.mqtt import client as mqtt  # noqa: E402
from paho.mqtt.client import MQTTv5, MQTTv311  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

def _keep_released_state():
    """The workaround crash_restart.py documents: on every reconnect attempt paho 2.x turns a
    QoS 2 message waiting to resend its PUBREL back into a new PUBLISH with the same id, which
    any broker then delivers twice. Keep "resend PUBREL" across attempts."""
    original = mqtt.Client._messages_reconnect_reset_out

    def reset(self):
        with self._out_message_mutex:
            released = [m for m in self._out_messages.values()
                        if m.qos == 2 and m.state == mqtt.mqtt_ms_resend_pubrel]
        original(self)
        with self._out_message_mutex:
            for m in released:
                m.state = mqtt.mqtt_ms_resend_pubrel

    mqtt.Client._messages_reconnect_reset_out = reset


_keep_released_state()

SEED = int(os.environ.get("CLUSTER_SEED", str(int(time.time() * 1000) % 1_000_000)))
RNG = random.Random(SEED)
RUN = f"{RNG.getrandbits(32):08x}"
WATCHDOG = float(os.environ.get("CLUSTER_WATCHDOG", "170"))
START = time.monotonic()
DEADLINE = START + WATCHDOG
# Debian puts it in /usr/sbin, which a user's PATH may lack.
NATS_BIN = os.environ.get("NATS_SERVER") or shutil.which("nats-server") or "/usr/sbin/nats-server"
LOG_LEVEL = os.environ.get("CLUSTER_LOG_LEVEL", "info")
# Seconds between Petrel node starts (0: as soon as each listens, as an orchestrator would).
STAGGER = float(os.environ.get("CLUSTER_STAGGER", "0"))

# Bounds (seconds or counts).
NATS_READY_WAIT = 30.0
NODE_START_WAIT = 30.0
CONNECT_WAIT = 15.0
# A CONNACK slower than this fails the scenario (it names the time taken).
SLOW_CONNACK = 5.0
ACK_WAIT = 10.0
ARRIVE_WAIT = 10.0
QUIET = 0.7
PROBE_TRIES = 50
PROBE_EACH = 0.2
# How long the cluster may fail publishes after a NATS server dies (JetStream elections).
OUTAGE_LIMIT = 30.0

HOST = "127.0.0.1"

# Every child process, for the cleanup that runs whatever happens.
PROCS = []
PROCS_LOCK = threading.Lock()
# Every paho client, closed at the end of each scenario.
CONNS = []


class Failure(Exception):
    """A scenario's check failed; the message says what and why."""


def log(msg):
    print(f"  [{time.monotonic() - START:6.1f}s] {msg}", flush=True)


def kill_all():
    with PROCS_LOCK:
        procs = list(PROCS)
    for p in procs:
        if p.poll() is None:
            try:
                p.kill()
            except OSError:
                pass
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def watchdog():
    remaining = DEADLINE - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)
    print(f"FAIL cluster: watchdog: the run took more than {WATCHDOG:.0f} s (seed {SEED})",
          flush=True)
    kill_all()
    os._exit(1)


def on_signal(signum, frame):
    print(f"cluster: signal {signum}, stopping (seed {SEED})", flush=True)
    kill_all()
    os._exit(1)


def spawn(cmd, out):
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    with PROCS_LOCK:
        PROCS.append(p)
    return p


def wait_until(pred, timeout, step=0.02):
    end = min(time.monotonic() + timeout, DEADLINE)
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


def free_ports(n):
    """n distinct free loopback ports (bound at once so they differ)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((HOST, 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def listening(port):
    try:
        socket.create_connection((HOST, port), timeout=0.2).close()
        return True
    except OSError:
        return False


def size_of(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def tail(path, start, limit=60):
    try:
        with open(path, "rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError as e:
        return [f"(cannot read {path}: {e})"]
    if len(lines) > limit:
        return [f"... {len(lines) - limit} lines before"] + lines[-limit:]
    return lines


# --- NATS --------------------------------------------------------------------------------

class NatsServer:
    def __init__(self, index, port, cluster_port, monitor_port, store_dir, log_path):
        self.name = f"nats-{index}"
        self.port, self.cluster_port, self.monitor_port = port, cluster_port, monitor_port
        self.store_dir, self.log_path = store_dir, log_path
        self.routes = []
        self.proc = None

    @property
    def url(self):
        return f"nats://{HOST}:{self.port}"

    def start(self):
        cmd = [NATS_BIN, "-js", "-a", HOST, "-p", str(self.port),
               "--server_name", self.name, "--cluster_name", f"petrel-test-{RUN}",
               "--cluster", f"nats://{HOST}:{self.cluster_port}",
               "--routes", ",".join(self.routes),
               "-sd", self.store_dir, "-m", str(self.monitor_port)]
        if os.environ.get("CLUSTER_NATS_TRACE"):
            cmd.append("-DV")
        with open(self.log_path, "ab") as out:
            out.write(f"=== start {' '.join(cmd)}\n".encode())
            out.flush()
            self.proc = spawn(cmd, out)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        if self.alive():
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self):
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def connz(self):
        """The client connections (`/connz`), or None."""
        return self.monitor("connz")

    def jsz(self):
        return self.monitor("jsz")

    def healthy(self):
        """`/healthz`: 200 once the server's JetStream (meta group, its streams and consumers)
        is current; 503 with the reason before."""
        url = f"http://{HOST}:{self.monitor_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                return r.status == 200, r.read()[:200].decode(errors="replace")
        except urllib.error.HTTPError as e:
            return False, e.read()[:200].decode(errors="replace")
        except OSError as e:
            return False, str(e)

    def monitor(self, what):
        url = f"http://{HOST}:{self.monitor_port}/{what}"
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                return json.load(r)
        except (OSError, ValueError):
            return None


class NatsCluster:
    def __init__(self, root):
        ports = free_ports(9)
        self.servers = []
        for i in range(3):
            store = os.path.join(root, f"nats-{i + 1}")
            os.makedirs(store, exist_ok=True)
            self.servers.append(NatsServer(i + 1, ports[3 * i], ports[3 * i + 1], ports[3 * i + 2],
                                           store, os.path.join(root, f"nats-{i + 1}.log")))
        for s in self.servers:
            s.routes = [f"nats://{HOST}:{o.cluster_port}" for o in self.servers if o is not s]

    @property
    def urls(self):
        return ",".join(s.url for s in self.servers)

    def start(self):
        for s in self.servers:
            if not s.alive():
                s.start()
        self.wait_ready()

    def wait_ready(self):
        """Until every running server names the same JetStream meta leader, that leader sees
        every running server as a current peer, and every running server's /healthz is ok."""
        state = {}

        def ready():
            alive = [s for s in self.servers if s.alive()]
            if len(alive) < len([s for s in self.servers if s.proc is not None]):
                dead = [s.name for s in self.servers if s.proc is not None and not s.alive()]
                raise Failure(f"NATS server(s) {dead} exited; see their logs")
            views = {s.name: s.jsz() for s in alive}
            state["views"] = {k: (v or {}).get("meta_cluster") for k, v in views.items()}
            leaders = {(v or {}).get("meta_cluster", {}).get("leader") for v in views.values()}
            if len(leaders) != 1 or None in leaders or "" in leaders:
                return False
            leader = leaders.pop()
            meta = views.get(leader, {}) or {}
            replicas = meta.get("meta_cluster", {}).get("replicas") or []
            current = {r.get("name") for r in replicas if r.get("current")} | {leader}
            if not all(s.name in current for s in alive):
                return False
            health = {s.name: s.healthy() for s in alive}
            state["health"] = health
            return all(ok for ok, _ in health.values())

        t0 = time.monotonic()
        if not wait_until(ready, NATS_READY_WAIT, step=0.1):
            raise Failure(f"JetStream not ready within {NATS_READY_WAIT:.0f} s: meta "
                          f"{state.get('views')}, /healthz {state.get('health')}")
        log(f"NATS: meta leader, /healthz ok after {time.monotonic() - t0:.1f} s "
            f"({', '.join(s.name for s in self.servers if s.alive())} running)")

    def stop(self):
        for s in self.servers:
            s.stop()


# --- Petrel --------------------------------------------------------------------------------

class PetrelNode:
    def __init__(self, index, binary, port, api_port, data_dir, log_path, nats_urls,
                 single=False):
        self.name = f"n{index}"
        self.binary, self.port, self.data_dir, self.log_path = binary, port, data_dir, log_path
        self.api_port = api_port
        # (Letters first: `--set` reads a value as TOML when it can.)
        self.api_password = f"pw-{RNG.getrandbits(64):016x}"
        self.nats_urls = nats_urls
        self.single = single
        self.proc = None
        self.lives = 0
        # Set while the script means the node to be down (killed or stopped).
        self.expected_down = False

    def start(self):
        os.makedirs(self.data_dir, exist_ok=True)
        cmd = [self.binary, "--tcp", f"{HOST}:{self.port}", "--data-dir", self.data_dir,
               "--set", f"api.bind={HOST}:{self.api_port}",
               "--set", f"api.default_password={self.api_password}",
               "--set", f"log.level={LOG_LEVEL}"]
        if not self.single:
            cmd += ["--set", f"cluster.nats={self.nats_urls}",
                    "--set", f"cluster.node_name={self.name}",
                    "--set", "cluster.replicas=3"]
        self.lives += 1
        self.expected_down = False
        with open(self.log_path, "ab") as out:
            out.write(f"=== {self.name} life {self.lives}: {' '.join(cmd)}\n".encode())
            out.flush()
            self.proc = spawn(cmd, out)
        t0 = time.monotonic()
        end = min(t0 + NODE_START_WAIT, DEADLINE)
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise Failure(f"{self.name} exited at start with status {self.proc.returncode}: "
                              + " | ".join(tail(self.log_path, 0, 15)))
            # Ready when MQTT and the API both listen (the API comes up after the node has
            # joined the cluster's presence).
            if listening(self.port) and listening(self.api_port):
                log(f"{self.name} listens on {self.port} after {time.monotonic() - t0:.1f} s")
                return
            time.sleep(0.05)
        raise Failure(f"{self.name} did not listen on {self.port} within {NODE_START_WAIT:.0f} s")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def exited_by_itself(self):
        """The exit status if the node exited without the script stopping it, else None."""
        if self.proc is None or self.expected_down or self.proc.poll() is None:
            return None
        return self.proc.returncode

    def kill(self):
        self.expected_down = True
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self):
        self.expected_down = True
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log(f"{self.name} ignored SIGTERM for 10 s; killing it")
                self.proc.kill()
                self.proc.wait(timeout=5)

    def log_size(self):
        return size_of(self.log_path)


# --- paho-mqtt clients ---------------------------------------------------------------------

def is_probe(payload):
    return payload.startswith("probe-")


class Conn:
    """A paho-mqtt client on one node, with synchronous connect/subscribe/publish and a record
    of everything it received."""

    def __init__(self, node, cid=None, v5=True, clean=True, expiry=None, keepalive=30):
        self.node, self.v5, self.clean, self.expiry = node, v5, clean, expiry
        self.cid = cid or f"c-{RUN}-{RNG.getrandbits(32):08x}"
        self.keepalive = keepalive
        self.lock = threading.Lock()
        self.messages = []  # (topic, payload, qos, retain)
        self.acks = {}  # mid -> reason code value
        self.subacks = {}  # mid -> [reason code values]
        self.connack = None  # (reason code value, session present)
        self.disconnects = []  # reason code values
        self.client = self._new_client()
        CONNS.append(self)

    def _new_client(self):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.cid,
                        protocol=MQTTv5 if self.v5 else MQTTv311,
                        clean_session=None if self.v5 else self.clean,
                        reconnect_on_failure=False)
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        return c

    def __repr__(self):
        return f"{self.cid}@{self.node.name}({'v5' if self.v5 else 'v3.1.1'})"

    def _on_connect(self, c, u, flags, rc, props):
        with self.lock:
            self.connack = (rc.value, bool(flags.session_present))

    def _on_disconnect(self, c, u, flags, rc, props):
        with self.lock:
            self.disconnects.append(rc.value if hasattr(rc, "value") else int(rc))

    def _on_message(self, c, u, m):
        with self.lock:
            self.messages.append((m.topic, m.payload.decode(errors="replace"), m.qos, m.retain))

    def _on_publish(self, c, u, mid, rc, props):
        with self.lock:
            self.acks[mid] = rc.value if hasattr(rc, "value") else int(rc)

    def _on_subscribe(self, c, u, mid, rcs, props):
        with self.lock:
            self.subacks[mid] = [r.value if hasattr(r, "value") else int(r) for r in rcs]

    def connect(self, node=None):
        """Connects (to `node` if given) and waits for the CONNACK; returns session present."""
        if node is not None:
            self.node = node
        kwargs = {}
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            if self.expiry is not None:
                props.SessionExpiryInterval = self.expiry
            kwargs = {"clean_start": self.clean, "properties": props}
        with self.lock:
            self.connack = None
        try:
            self.client.connect(HOST, self.node.port, self.keepalive, **kwargs)
        except OSError as e:
            raise Failure(f"{self}: cannot connect: {e}") from e
        self.client.loop_start()
        t0 = time.monotonic()
        if not wait_until(lambda: self.connack is not None, CONNECT_WAIT):
            raise Failure(f"{self}: no CONNACK within {CONNECT_WAIT:.0f} s")
        took = time.monotonic() - t0
        if took > SLOW_CONNACK:
            raise Failure(f"{self}: the CONNACK took {took:.1f} s (more than {SLOW_CONNACK:.0f} s)")
        rc, present = self.connack
        if rc != 0:
            raise Failure(f"{self}: CONNACK reason {rc:#x}")
        return present

    def subscribe(self, topic, qos):
        rc, mid = self.client.subscribe(topic, qos)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise Failure(f"{self}: subscribe {topic}: {mqtt.error_string(rc)}")
        if not wait_until(lambda: mid in self.subacks, ACK_WAIT):
            raise Failure(f"{self}: no SUBACK for {topic} within {ACK_WAIT:.0f} s")
        codes = self.subacks[mid]
        if any(c >= 0x80 for c in codes):
            raise Failure(f"{self}: SUBACK {topic}: {[hex(c) for c in codes]}")
        return codes

    def publish(self, topic, payload, qos, retain=False, wait=True, ack_wait=ACK_WAIT):
        """Publishes; with `wait` (QoS 1/2), waits for the PUBACK/PUBCOMP and raises on none
        (naming a closed connection) or on a failure reason code."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise Failure(f"{self}: publish {topic}: {mqtt.error_string(info.rc)}")
        if wait and qos > 0:
            mid = info.mid
            if not wait_until(lambda: mid in self.acks or self.disconnects, ack_wait):
                raise Failure(f"{self}: no acknowledgement of a QoS {qos} publish on {topic} "
                              f"within {ack_wait:.0f} s")
            if mid not in self.acks:
                raise Failure(f"{self}: the broker closed the connection (reason "
                              f"{self.disconnects[0]:#x}) instead of acknowledging a QoS {qos} "
                              f"publish on {topic}")
            with self.lock:
                code = self.acks.pop(mid)
            if code >= 0x80:
                raise Failure(f"{self}: QoS {qos} publish on {topic} refused: reason {code:#x}")
        return info.mid

    def wait_acked(self, mids, what):
        """Waits for the acknowledgement of every packet id in `mids` (publishes made with
        `wait=False`); raises on none or on a failure reason code."""
        if not wait_until(lambda: all(m in self.acks for m in mids), ACK_WAIT):
            left = [m for m in mids if m not in self.acks]
            raise Failure(f"{what}: {len(left)} of {len(mids)} publishes from {self} not "
                          f"acknowledged within {ACK_WAIT:.0f} s")
        with self.lock:
            bad = [self.acks.pop(m) for m in mids]
        bad = [c for c in bad if c >= 0x80]
        if bad:
            raise Failure(f"{what}: {len(bad)} publishes from {self} refused, reasons "
                          f"{sorted({hex(c) for c in bad})}")

    def move(self, node):
        """The same paho client (its session state: unacknowledged PUBLISH, PUBREL to resend)
        connects to `node` after its connection was lost; returns session present."""
        if not wait_until(lambda: self.disconnects, CONNECT_WAIT):
            raise Failure(f"{self}: paho did not see its connection close")
        self.client.loop_stop()
        with self.lock:
            self.disconnects.clear()
        # (paho's `port` setter refuses a lost connection's client: set what it sets.)
        self.client._port = node.port
        return self.connect(node)

    def got(self, probes=False):
        with self.lock:
            return [m for m in self.messages if probes or not is_probe(m[1])]

    def payloads(self, topic_prefix=None):
        return [p for (t, p, q, r) in self.got()
                if topic_prefix is None or t.startswith(topic_prefix)]

    def has_probe(self, tag):
        with self.lock:
            return any(p.startswith(f"probe-{tag}-") for (_, p, _, _) in self.messages)

    def clear(self):
        with self.lock:
            self.messages.clear()

    def disconnect(self):
        try:
            self.client.disconnect()
        except Exception:  # noqa: BLE001 (closing whatever state paho is in)
            pass
        self.client.loop_stop()

    def drop(self):
        """Closes the TCP connection without DISCONNECT."""
        sock = self.client.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.client.loop_stop()


def close_all_conns():
    while CONNS:
        CONNS.pop().disconnect()


def probe(pub, subs, topic, what, tries=PROBE_TRIES, each=PROBE_EACH):
    """Publishes QoS 1 probes on `topic` from `pub` until every client in `subs` has received
    one (cross-node interest is propagated asynchronously). Returns the tries used."""
    tag = f"{RNG.getrandbits(24):06x}"
    t0 = time.monotonic()
    for i in range(1, tries + 1):
        pub.publish(topic, f"probe-{tag}-{i}", qos=1)
        if wait_until(lambda: all(s.has_probe(tag) for s in subs), each):
            if i > 1:
                log(f"{what}: interest reached after {i} probes ({time.monotonic() - t0:.2f} s)")
            return i
    missing = [repr(s) for s in subs if not s.has_probe(tag)]
    raise Failure(f"{what}: no probe on {topic} from {pub} reached {missing} after {tries} "
                  f"tries ({time.monotonic() - t0:.1f} s): the subscription never became "
                  f"visible across the cluster")


def wait_arrived(conn, expected, what, timeout=ARRIVE_WAIT):
    """Waits until every payload in `expected` arrived at `conn`; raises naming the missing."""
    expected = set(expected)
    ok = wait_until(lambda: expected <= set(conn.payloads()), timeout)
    if not ok:
        got = set(conn.payloads())
        missing = sorted(expected - got)
        raise Failure(f"{what}: {len(missing)} of {len(expected)} messages did not reach {conn} "
                      f"within {timeout:.0f} s, e.g. {missing[:5]}")


def check_in_order(payloads, expected, what):
    seen = [p for p in payloads if p in set(expected)]
    firsts = list(dict.fromkeys(seen))
    if firsts != list(expected):
        raise Failure(f"{what}: out of order: got {firsts[:10]}..., sent {list(expected)[:10]}...")


def topic(name):
    return f"petrel/cluster/{RUN}/{name}"


# --- Scenarios -----------------------------------------------------------------------------

class Cluster:
    def __init__(self, binary, root, single):
        self.root, self.binary, self.single = root, binary, single
        self.nats = None if single else NatsCluster(root)
        ports = free_ports(6)
        urls = "" if single else self.nats.urls
        self.nodes = []
        for i in range(3):
            node = PetrelNode(i + 1, binary, ports[i], ports[3 + i],
                              os.path.join(root, f"petrel-n{i + 1}"),
                              os.path.join(root, f"n{i + 1}.log"), urls, single)
            self.nodes.append(node)
        if single:
            # CLUSTER_SINGLE: one node plays n1, n2 and n3 (checks the script's own logic).
            self.nodes = [self.nodes[0]] * 3

    def start(self):
        if self.nats:
            self.nats.start()
        for n in self.unique_nodes():
            if not n.alive():
                n.start()
                if STAGGER:
                    time.sleep(STAGGER)

    def unique_nodes(self):
        return list(dict.fromkeys(self.nodes))

    def stop(self):
        for n in self.unique_nodes():
            n.stop()
        if self.nats:
            self.nats.stop()


def cross_node_qos(cl):
    n1, n2 = cl.nodes[0], cl.nodes[1]
    for v5 in (True, False):
        ver = "v5" if v5 else "v3.1.1"
        base = topic(f"qos-{ver}")
        sub = Conn(n2, v5=v5)
        sub.connect()
        sub.subscribe(f"{base}/#", 2)
        sub1 = Conn(n2, v5=v5)  # a QoS 1 subscription: QoS 2 messages arrive at QoS 1
        sub1.connect()
        sub1.subscribe(f"{base}/#", 1)
        pub = Conn(n1, v5=v5)
        pub.connect()
        probe(pub, [sub, sub1], f"{base}/probe", f"{ver} subscribers on n2")
        count = 30
        sent = {q: [f"{ver}-q{q}-{i}" for i in range(count)] for q in (0, 1, 2)}
        mids = []
        for i in range(count):
            for q in (0, 1, 2):
                mid = pub.publish(f"{base}/q{q}", sent[q][i], qos=q, wait=False)
                if q:
                    mids.append(mid)
        pub.wait_acked(mids, f"{ver} QoS 1/2 publishes on n1")
        for q in (0, 1, 2):
            wait_arrived(sub, sent[q], f"{ver} QoS {q} n1 -> n2")
            wait_arrived(sub1, sent[q], f"{ver} QoS {q} n1 -> n2 (QoS 1 subscription)")
        time.sleep(QUIET)  # duplicates that would still come
        for s, cap in ((sub, 2), (sub1, 1)):
            got = s.got()
            for q in (0, 1, 2):
                mine = [p for (t, p, _, _) in got if t == f"{base}/q{q}"]
                check_in_order(mine, sent[q], f"{ver} QoS {q} to a QoS {cap} subscription")
                if q == 2 and cap == 2 and len(mine) != count:
                    dups = {p: mine.count(p) for p in set(mine) if mine.count(p) > 1}
                    raise Failure(f"{ver} QoS 2 not exactly once: {len(mine)} deliveries of "
                                  f"{count}, duplicates {list(dups.items())[:5]}")
            wrong = [(t, q) for (t, p, q, _) in got
                     if q != min(int(t.rsplit("q", 1)[1]), cap)]
            if wrong:
                raise Failure(f"{ver}: delivered QoS != min(publish, subscription {cap}): "
                              f"{wrong[:5]}")
        dup1 = len([p for (t, p, _, _) in sub.got() if t.endswith("/q1")]) - count
        log(f"{ver}: {count} each of QoS 0/1/2 arrived on n2, in order, QoS 2 exactly once "
            f"({dup1} QoS 1 duplicates)")
        close_all_conns()
    if not cl.single:
        # The cluster's counters (GET /api/v5/metrics, one entry per node): n1 forwarded what
        # its clients published, n2 received it from NATS.
        def cluster_counter(node, key):
            entries = api_get(node, "/api/v5/metrics")
            entries = entries if isinstance(entries, list) else [entries]
            mine = [e for e in entries if e.get("node") == node.name] or entries
            return mine[0].get(key, 0)
        forwarded = cluster_counter(cl.nodes[0], "cluster.messages.forwarded")
        received = cluster_counter(cl.nodes[1], "cluster.messages.received")
        if forwarded < 3 * count or received < 3 * count:
            raise Failure(f"cluster counters: n1 forwarded {forwarded}, n2 received {received}; "
                          f"expected at least {3 * count} each")
        log(f"/api/v5/metrics: n1 forwarded {forwarded}, n2 received {received}")


def retained(cl):
    n1, n2, n3 = cl.nodes
    t = topic("retained/a")
    value = f"retained-{RUN}"
    setter = Conn(n1)
    setter.connect()
    setter.publish(t, value, qos=1, retain=True)

    def read(node, v5, filt=t):
        c = Conn(node, v5=v5)
        c.connect()
        c.subscribe(filt, 1)
        wait_until(lambda: c.got(), QUIET)
        got = [(p, q, r) for (_, p, q, r) in c.got()]
        c.disconnect()
        return got

    # Right after the PUBACK: acknowledge-after-commit says the retained message is stored
    # cluster-wide; a cache that lags is reported with the number of reads it took.
    for node in (n2, n3):
        for v5 in (True, False):
            reads, got = 0, []
            while reads < 10 and not got:
                reads += 1
                got = read(node, v5)
            if got != [(value, 1, True)]:
                raise Failure(f"retained set on n1, a new subscriber on {node.name} "
                              f"({'v5' if v5 else 'v3.1.1'}) got {got} after {reads} reads, "
                              f"expected [({value!r}, qos 1, retain)]")
            if reads > 1:
                log(f"retained on {node.name}: seen only at read {reads} (lagging cache)")
    got = read(n3, True, topic("retained/+"))
    if got != [(value, 1, True)]:
        raise Failure(f"retained set on n1, a new subscriber to {topic('retained/+')} on n3 got "
                      f"{got}")
    setter.publish(t, "", qos=1, retain=True)
    for node in (n2, n3):
        reads, got = 0, [1]
        while reads < 10 and got:
            reads += 1
            got = read(node, True)
        if got:
            raise Failure(f"retained cleared on n1, a new subscriber on {node.name} still gets "
                          f"{got} after {reads} reads")
        if reads > 1:
            log(f"cleared retained on {node.name}: gone only at read {reads} (lagging cache)")
    log("retained set on n1 seen on n2 and n3 (v5 and v3.1.1), cleared likewise")
    close_all_conns()


def session_resume(cl):
    n1, n2, n3 = cl.nodes
    for v5 in (True, False):
        ver = "v5" if v5 else "v3.1.1"
        base = topic(f"session-{ver}")
        cid = f"sess-{ver.replace('.', '')}-{RUN}"
        s = Conn(n1, cid=cid, v5=v5, clean=False, expiry=600 if v5 else None)
        s.connect()
        s.subscribe(f"{base}/#", 1)
        pub = Conn(n3, v5=True)
        pub.connect()
        probe(pub, [s], f"{base}/probe", f"{ver} session on n1")
        s.disconnect()
        offline = [f"{ver}-offline-{i}" for i in range(10)]
        for p in offline:
            pub.publish(f"{base}/x", p, qos=1)
        s2 = Conn(n2, cid=cid, v5=v5, clean=False, expiry=600 if v5 else None)
        present = s2.connect()
        if not present:
            raise Failure(f"{ver}: session made on n1, resumed on n2: CONNACK session present 0")
        wait_arrived(s2, offline, f"{ver} messages queued while offline, resumed on n2")
        check_in_order(s2.payloads(), offline, f"{ver} queued messages")
        live = f"{ver}-live"
        pub.publish(f"{base}/x", live, qos=1)
        wait_arrived(s2, [live], f"{ver} the session's subscription after the move to n2")
        s2.disconnect()
        # Delete the session: clean start with no expiry.
        end = Conn(n1, cid=cid, v5=v5, clean=True, expiry=0 if v5 else None)
        end.connect()
        end.disconnect()
        log(f"{ver}: session from n1 resumed on n2 with its {len(offline)} queued messages "
            f"in order and its subscription")
        close_all_conns()


def takeover(cl):
    n1, n2, n3 = cl.nodes
    for v5 in (True, False):
        ver = "v5" if v5 else "v3.1.1"
        cid = f"take-{ver.replace('.', '')}-{RUN}"
        base = topic(f"takeover-{ver}")
        first = Conn(n1, cid=cid, v5=v5, clean=False, expiry=600 if v5 else None)
        first.connect()
        first.subscribe(f"{base}/#", 1)
        second = Conn(n3, cid=cid, v5=v5, clean=False, expiry=600 if v5 else None)
        present = second.connect()
        if not wait_until(lambda: first.disconnects, CONNECT_WAIT):
            raise Failure(f"{ver}: {cid} connected on n3, the connection on n1 is still open "
                          f"after {CONNECT_WAIT:.0f} s")
        reason = first.disconnects[0]
        if v5 and reason != 0x8E:
            raise Failure(f"{ver}: the connection on n1 was closed with reason {reason:#x}, "
                          f"expected DISCONNECT 0x8E (session taken over)")
        if not present:
            raise Failure(f"{ver}: the takeover on n3 got session present 0 (the session "
                          f"made on n1 did not follow)")
        # The session's subscription works through the new connection.
        pub = Conn(n2)
        pub.connect()
        probe(pub, [second], f"{base}/probe", f"{ver} taken-over session on n3")
        if not second.client.is_connected():
            raise Failure(f"{ver}: the new connection on n3 was closed: {second.disconnects}")
        second.disconnect()
        end = Conn(n1, cid=cid, v5=v5, clean=True, expiry=0 if v5 else None)
        end.connect()
        end.disconnect()
        what = "DISCONNECT 0x8E" if v5 else f"closed ({reason:#x})"
        log(f"{ver}: n1 -> n3 takeover: old connection {what}, session present, "
            f"subscription delivers on n3")
        close_all_conns()


def shared(cl):
    t = topic("shared")
    members = []
    for node in cl.nodes:
        m = Conn(node)
        m.connect()
        m.subscribe(f"$share/g/{t}", 1)
        members.append(m)
    pubs = [Conn(node) for node in cl.nodes]
    for p in pubs:
        p.connect()
    # From each node, probe until every member got one of that node's probes: then that node
    # knows every member (round robin reaches each in turn).
    for j, pub in enumerate(pubs):
        tag = f"{RNG.getrandbits(24):06x}"
        tries = 0
        while tries < PROBE_TRIES and not all(m.has_probe(tag) for m in members):
            tries += 1
            pub.publish(t, f"probe-{tag}-{tries}", qos=1)
            wait_until(lambda: all(m.has_probe(tag) for m in members), 0.1)
        per = [sum(1 for (_, p, _, _) in m.got(probes=True) if p.startswith(f"probe-{tag}-"))
               for m in members]
        if min(per) == 0:
            raise Failure(f"after {tries} probes from n{j + 1}, probes per member on n1..n3: "
                          f"{per}: the group's members on other nodes get nothing")
        if sum(per) > tries:
            raise Failure(f"{tries} probes from n{j + 1} were delivered {sum(per)} times to "
                          f"the group (per member on n1..n3: {per})")
    count = 30
    sent = [[f"shared-n{j + 1}-{i}" for i in range(count)] for j in range(3)]
    mids = [[], [], []]
    for i in range(count):
        for j, pub in enumerate(pubs):
            mids[j].append(pub.publish(t, sent[j][i], qos=1, wait=False))
    for pub, m in zip(pubs, mids):
        pub.wait_acked(m, "shared publishes")
    every = {x for row in sent for x in row}
    wait_until(lambda: every <= {x for m in members for x in m.payloads()}, ARRIVE_WAIT)
    time.sleep(QUIET)
    per = [m.payloads() for m in members]
    # matrix[j][k]: messages published on n(j+1) that the member on n(k+1) got.
    matrix = [[sum(1 for x in per[k] if x.startswith(f"shared-n{j + 1}-")) for k in range(3)]
              for j in range(3)]
    allgot = [x for p in per for x in p]
    missing = sorted(every - set(allgot))
    dups = {x: allgot.count(x) for x in set(allgot) if allgot.count(x) > 1}
    shape = f"(rows: published on n1..n3, columns: member on n1..n3: {matrix})"
    if missing:
        raise Failure(f"{len(missing)} of {len(every)} shared messages reached no member, "
                      f"e.g. {missing[:5]} {shape}")
    if dups:
        raise Failure(f"{len(dups)} shared messages reached several members, "
                      f"e.g. {list(dups.items())[:5]} {shape}")
    if any(c == 0 for row in matrix for c in row):
        raise Failure(f"round robin: some member got none of some node's messages {shape}")
    log(f"$share/g: {count} messages from each node, each exactly once in total {shape}")
    close_all_conns()


def api_get(node, path):
    """GET on the node's API, logged in as the administrator; returns the decoded JSON."""
    login = urllib.request.Request(
        f"http://{HOST}:{node.api_port}/api/v5/login", method="POST",
        data=json.dumps({"username": "admin", "password": node.api_password}).encode(),
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(login, timeout=5) as r:
            token = json.load(r)["token"]
        req = urllib.request.Request(f"http://{HOST}:{node.api_port}{path}",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        raise Failure(f"{node.name}: GET {path}: HTTP {e.code} "
                      f"{e.read()[:200].decode(errors='replace')}") from e
    except (OSError, ValueError, KeyError) as e:
        raise Failure(f"{node.name}: GET {path}: {type(e).__name__}: {e}") from e


def names_in(value):
    """Every string in a JSON value."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(set(), *(names_in(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(set(), *(names_in(v) for v in value))
    return set()


def nodes(cl):
    """The API of every node lists the three nodes (`GET /api/v5/nodes`)."""
    want = {"n1", "n2", "n3"}
    for node in cl.unique_nodes():
        state = {}

        def listed():
            state["body"] = api_get(node, "/api/v5/nodes")
            return want <= names_in(state["body"])

        if not wait_until(listed, 10, step=0.5):
            raise Failure(f"GET /api/v5/nodes on {node.name} does not name n1, n2 and n3: "
                          f"{json.dumps(state.get('body'))[:300]}")
    log("GET /api/v5/nodes on every node names n1, n2 and n3")


class LoadPublisher:
    """Publishes numbered QoS 1 (or 2) messages as fast as its in-flight window allows; knows
    which were acknowledged (PUBACK or PUBCOMP with a success code)."""

    def __init__(self, name, node, v5, qos=1, persistent=False):
        self.name, self.v5, self.qos = name, v5, qos
        self.conn = Conn(node, cid=f"{name}-{RUN}", v5=v5, clean=not persistent,
                         expiry=600 if (persistent and v5) else None)
        self.lock = threading.Lock()
        self.sent = {}  # mid -> payload, for this connection
        self.all = []
        self.acked = set()
        self.refused = {}  # payload -> the failure reason code of its PUBACK/PUBCOMP
        self.not_found = set()  # QoS 2 payloads completed with PUBCOMP 0x92
        self.seq = 0
        self.stop = threading.Event()
        self.thread = None

    def reconcile(self):
        c = self.conn
        with c.lock:
            acks = dict(c.acks)
        with self.lock:
            for mid, code in acks.items():
                payload = self.sent.pop(mid, None)
                if payload is not None:
                    with c.lock:
                        c.acks.pop(mid, None)
                    if code < 0x80 or (self.qos == 2 and code == 0x92):
                        # PUBCOMP 0x92 (packet id not found) to a resent PUBREL is what a broker
                        # answers when it had released the message but its PUBCOMP was lost
                        # (MQTT 5 4.3.3): the message is the broker's; count it as completed.
                        self.acked.add(payload)
                        if code == 0x92:
                            self.not_found.add(payload)
                    else:
                        self.refused[payload] = code

    def publish(self, payload, t):
        info = self.conn.client.publish(t, payload, qos=self.qos)
        # (Published while the connection is down, paho keeps the message and sends it after
        # a reconnect of the same client: count it as sent.)
        if info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            with self.lock:
                self.sent[info.mid] = payload
        return info.rc

    def run(self, t):
        while not self.stop.is_set() and time.monotonic() < DEADLINE:
            if not self.conn.client.is_connected():
                return
            self.reconcile()
            with self.lock:
                window_full = len(self.sent) >= 50
            if window_full:
                time.sleep(0.005)
                continue
            self.seq += 1
            payload = f"{self.name}-{self.seq}"
            self.all.append(payload)
            self.publish(payload, t)
            self.reconcile()

    def start(self, t):
        self.thread = threading.Thread(target=self.run, args=(t,), daemon=True)
        self.thread.start()

    def join(self):
        self.stop.set()
        if self.thread:
            self.thread.join(timeout=10)
        self.reconcile()

    def move(self, node, t):
        """A new connection on `node`; republishes every message not acknowledged."""
        self.reconcile()
        self.conn.drop()
        self.conn = Conn(node, cid=f"{self.name}-{RUN}", v5=self.v5)
        self.conn.connect()
        with self.lock:
            self.sent.clear()
        todo = [p for p in self.all if p not in self.acked]
        for p in todo:
            self.publish(p, t)
        return todo


def publish_more(pubs, base, n):
    """Each publisher sends `n` more numbered messages on its own topic under `base`."""
    for p in pubs:
        for _ in range(n):
            p.seq += 1
            payload = f"{p.name}-{p.seq}"
            p.all.append(payload)
            p.publish(payload, f"{base}/{p.name}")


def kill_petrel(cl):
    if cl.single:
        raise Failure("needs three nodes (not CLUSTER_SINGLE)")
    n1, n2, n3 = cl.nodes
    base = topic("kill-petrel")
    subs = [
        Conn(n2, cid=f"ks2-{RUN}", v5=False, clean=False),
        Conn(n3, cid=f"ks3-{RUN}", v5=True, clean=False, expiry=600),
        Conn(n1, cid=f"ks1-{RUN}", v5=True, clean=False, expiry=600),  # moves to n3
    ]
    for s in subs:
        s.connect()
        s.subscribe(f"{base}/#", 1)
    prober = Conn(n1)
    prober.connect()
    probe(prober, subs, f"{base}/probe", "subscribers on n1, n2, n3")
    prober.disconnect()
    pubs = [LoadPublisher("kp-a", n1, v5=False), LoadPublisher("kp-b", n1, v5=True)]
    for p in pubs:
        p.conn.connect()
        p.start(f"{base}/{p.name}")
    delay = RNG.uniform(0.5, 1.5)
    time.sleep(delay)
    n1.kill()
    log(f"n1 killed (-9) after {delay:.2f} s of load")
    for p in pubs:
        p.join()
    # What n1 acknowledged before it died.
    by_n1 = set().union(*(p.acked for p in pubs))
    sent_at_kill = {p.name: p.seq for p in pubs}
    # Publishers move to n2 and n3; the subscriber that was on n1 resumes on n3.
    moved = {}
    for p, node in zip(pubs, (n2, n3)):
        moved[p.name] = len(p.move(node, f"{base}/{p.name}"))
    s1 = Conn(n3, cid=f"ks1-{RUN}", v5=True, clean=False, expiry=600)
    present = s1.connect()
    for p in pubs:
        p.reconcile()
    # What n2/n3 acknowledged while ks1's session had no live node (before it resumed on n3).
    before_resume = set().union(*(p.acked for p in pubs)) - by_n1
    publish_more(pubs, base, 20)
    for p in pubs:
        if not wait_until(lambda: (p.reconcile() or True) and
                          all(x in p.acked for x in p.all), ACK_WAIT * 2):
            left = [x for x in p.all if x not in p.acked]
            raise Failure(f"{p.name} on its new node: {len(left)} messages never acknowledged, "
                          f"e.g. {left[:5]}")
    acked = set().union(*(p.acked for p in pubs))
    log(f"{len(by_n1)} PUBACKs from n1 before the kill; publishers republished {moved} "
        f"unacknowledged on n2/n3; {len(acked)} acknowledged in all")

    def describe(missing):
        parts = []
        for label, group in (("acknowledged by n1", by_n1),
                             ("acknowledged by n2/n3 before ks1 resumed on n3", before_resume),
                             ("acknowledged by n2/n3 after ks1 resumed",
                              acked - by_n1 - before_resume)):
            for p in pubs:
                seqs = sorted(int(x.rsplit("-", 1)[1]) for x in missing & group
                              if x.startswith(p.name + "-"))
                if seqs:
                    parts.append(f"{len(seqs)} {label} from {p.name} (#{seqs[0]}..#{seqs[-1]}; "
                                 f"it had sent up to #{sent_at_kill[p.name]} at the kill)")
        return "; ".join(parts)

    problems = []
    for s in (subs[0], subs[1], s1):
        got_before = set(subs[2].payloads()) if s is s1 else set()
        ok = wait_until(lambda: acked <= set(s.payloads()) | got_before, ARRIVE_WAIT)
        if not ok:
            missing = acked - set(s.payloads()) - got_before
            problems.append(f"{s}: {len(missing)} of {len(acked)} acknowledged messages "
                            f"missing: {describe(missing)}")
    if not present:
        problems.append(f"{s1}: session made on n1 (killed) resumed on n3 with session present 0")
    if problems:
        raise Failure("; ".join(problems))
    dups = sum(len(s.payloads()) for s in subs[:2]) - 2 * len(acked)
    log(f"every acknowledged message ({len(acked)}) reached the subscribers on n2 and n3 and "
        f"the one moved from n1 to n3 ({dups} duplicates on n2/n3, allowed for QoS 1)")
    close_all_conns()


def kill_petrel_qos2(cl):
    """kill -9 of n3 while two persistent QoS 2 publishers on it send: the same paho clients
    reconnect to n1 and n2 and resend what is in flight (PUBLISH with DUP, PUBREL): the session
    and its QoS 2 state must follow, so that persistent QoS 2 subscribers on n1 and n2 get every
    PUBCOMPed message exactly once; a message in flight at the kill at least once (at most
    twice)."""
    if cl.single:
        raise Failure("needs three nodes (not CLUSTER_SINGLE)")
    n1, n2, n3 = cl.nodes
    base = topic("kill-qos2")
    subs = [Conn(n1, cid=f"kq1-{RUN}", v5=True, clean=False, expiry=600),
            Conn(n2, cid=f"kq2-{RUN}", v5=False, clean=False)]
    for s in subs:
        s.connect()
        s.subscribe(f"{base}/#", 2)
    prober = Conn(n3)
    prober.connect()
    probe(prober, subs, f"{base}/probe", "QoS 2 subscribers on n1, n2")
    prober.disconnect()
    pubs = [LoadPublisher("kq-a", n3, v5=False, qos=2, persistent=True),
            LoadPublisher("kq-b", n3, v5=True, qos=2, persistent=True)]
    for p in pubs:
        p.conn.connect()
        p.start(f"{base}/{p.name}")
    delay = RNG.uniform(0.5, 1.5)
    time.sleep(delay)
    n3.kill()
    for p in pubs:
        p.join()
    by_n3 = set().union(*(p.acked for p in pubs))
    in_flight = {p.name: len(p.sent) for p in pubs}
    log(f"n3 killed (-9) after {delay:.2f} s of QoS 2 load; {len(by_n3)} PUBCOMPs from n3, "
        f"in flight {in_flight}")
    present = {}
    for p, node in zip(pubs, (n1, n2)):
        present[p.name] = p.conn.move(node)
    publish_more(pubs, base, 20)
    for p in pubs:
        if not wait_until(lambda: (p.reconcile() or True) and
                          all(x in p.acked for x in p.all), ACK_WAIT * 2):
            left = [x for x in p.all if x not in p.acked]
            refused = {x: hex(p.refused[x]) for x in left if x in p.refused}
            where = {x: [s.node.name for s in subs if x in s.payloads()] for x in left[:5]}
            raise Failure(f"{p.name} moved to another node: {len(left)} QoS 2 messages not "
                          f"completed, e.g. {left[:5]}; PUBCOMP with a failure code: "
                          f"{refused or 'none'}; delivered to subscribers on: {where}")
    acked = set().union(*(p.acked for p in pubs))
    problems = []
    if not all(present.values()):
        problems.append(f"persistent publishers resumed with session present {present}")
    for s in subs:
        if not wait_until(lambda: acked <= set(s.payloads()), ARRIVE_WAIT):
            missing = sorted(acked - set(s.payloads()))
            problems.append(f"{s}: {len(missing)} of {len(acked)} completed QoS 2 messages "
                            f"missing, e.g. {missing[:5]}")
    time.sleep(QUIET)
    # What the cluster guarantees (docs/cluster.md): a QoS 2 message the dead node had
    # completed arrives exactly once. One whose PUBLISH was inside the commit the kill cut
    # (its PUBREC never sent, so the publisher resends it to another node) can arrive twice:
    # NATS 2.9 cannot commit the routed message and the record that it was received
    # atomically. Those are counted and shown, not failed; any other duplicate fails.
    in_flight_twice = set()
    for s in subs:
        got = s.payloads()
        dups = {x: got.count(x) for x in set(got) if got.count(x) > 1}
        before = {x: n for x, n in dups.items() if x in by_n3}
        in_flight_twice |= set(dups) - set(before)
        if before:
            problems.append(f"{s}: {len(before)} QoS 2 messages completed by n3 before the "
                            f"kill were delivered more than once, e.g. "
                            f"{sorted(before.items())[:5]}")
        if any(n > 2 for n in dups.values()):
            problems.append(f"{s}: QoS 2 messages delivered more than twice: "
                            f"{sorted((x, n) for x, n in dups.items() if n > 2)[:5]}")
    if problems:
        raise Failure("; ".join(problems))
    if in_flight_twice:
        log(f"{len(in_flight_twice)} QoS 2 messages in flight at the kill (not completed by "
            f"n3) delivered twice, e.g. {sorted(in_flight_twice)[:3]} (at least once: "
            f"docs/cluster.md)")
    not_found = set().union(*(p.not_found for p in pubs))
    log(f"{len(acked)} QoS 2 messages completed ({len(by_n3)} by n3 before the kill, "
        f"{len(not_found)} with PUBCOMP 0x92 to a resent PUBREL): each arrived exactly once at "
        f"the subscribers on n1 and n2")
    close_all_conns()


def kill_nats(cl):
    if cl.single:
        raise Failure("needs NATS (not CLUSTER_SINGLE)")
    n1, n2, n3 = cl.nodes
    base = topic("kill-nats")
    sub = Conn(n2, v5=True)
    sub.connect()
    sub.subscribe(f"{base}/#", 1)
    sub3 = Conn(n3, v5=False)
    sub3.connect()
    sub3.subscribe(f"{base}/#", 1)
    pub = Conn(n1)
    pub.connect()
    probe(pub, [sub, sub3], f"{base}/probe", "n1 -> n2, n3 before the fault")
    pub.disconnect()
    # The server most Petrel nodes are connected to (ties broken by the seed), so that the
    # fault hits nodes' NATS connections as well as JetStream's replicas and leaders.
    conns = {}
    for srv in cl.nats.servers:
        z = srv.connz() or {}
        conns[srv.name] = [c.get("name") or c.get("ip", "?") for c in z.get("connections") or []]
    order = list(cl.nats.servers)
    RNG.shuffle(order)
    victim = max(order, key=lambda srv: len(conns[srv.name]))
    victim.kill()
    t_kill = time.monotonic()
    log(f"{victim.name} killed (-9); client connections per server were {conns}")
    # JetStream needs a few seconds to elect new leaders for what the victim led: publishes
    # may fail meanwhile (the broker refuses or closes without acknowledging). Like a real
    # client, reconnect and retry, bounded; then the cluster must serve normally.
    pubs = {}
    failures = []

    def through(node, subs, what):
        tag = f"{RNG.getrandbits(24):06x}"
        i = 0
        while time.monotonic() - t_kill < OUTAGE_LIMIT:
            i += 1
            try:
                p = pubs.get(node.name)
                if p is None or not p.client.is_connected():
                    p = pubs[node.name] = Conn(node)
                    p.connect()
                p.publish(f"{base}/probe", f"probe-{tag}-{i}", qos=1, ack_wait=3)
            except Failure as e:
                failures.append(str(e))
                pubs.pop(node.name, None)
                time.sleep(0.2)
                continue
            if wait_until(lambda: all(s.has_probe(tag) for s in subs), 0.25):
                return time.monotonic() - t_kill
        raise Failure(f"{what}: with {victim.name} down, no probe got through within "
                      f"{OUTAGE_LIMIT:.0f} s ({len(failures)} failed attempts, last: "
                      f"{failures[-1] if failures else 'none'})")

    t1 = through(n1, [sub, sub3], "n1 -> n2, n3")
    t3 = through(n3, [sub], "n3 -> n2")
    log(f"with {victim.name} down: probes through after {t1:.1f} s (n1) and {t3:.1f} s (n3); "
        f"{len(failures)} failed attempts before"
        + (f", e.g. {failures[0]}" if failures else ""))
    sent = []
    for i in range(40):
        for node, name in ((n1, "a"), (n3, "b")):
            payload = f"kn-{name}-{i}"
            pubs[node.name].publish(f"{base}/{name}", payload, qos=1)
            sent.append(payload)
    wait_arrived(sub, sent, f"QoS 1 with {victim.name} down, to n2")
    wait_arrived(sub3, sent, f"QoS 1 with {victim.name} down, to n3")
    rt = topic("kill-nats-retained")
    pubs[n3.name].publish(rt, "kept", qos=1, retain=True)
    # A new subscriber on n1 each time (the retained message comes on SUBSCRIBE), bounded.
    t0 = time.monotonic()
    reads, got = 0, []
    while not got and reads < 12 and time.monotonic() - t0 < 12:
        reads += 1
        r = Conn(n1)
        r.connect()
        r.subscribe(rt, 1)
        wait_until(lambda: r.got(), 1.0)
        got = [p for (_, p, _, _) in r.got()]
        r.disconnect()
    if got != ["kept"]:
        raise Failure(f"retained set on n3 (PUBACKed) with {victim.name} down: a new subscriber "
                      f"on n1 got {got} in {reads} tries over {time.monotonic() - t0:.1f} s")
    if reads > 1:
        log(f"retained set on n3 seen on n1 only at read {reads}, "
            f"{time.monotonic() - t0:.1f} s after its PUBACK")
    pubs[n3.name].publish(rt, "", qos=1, retain=True)
    log(f"with {victim.name} down: {len(sent)} QoS 1 messages from n1 and n3 reached n2 and "
        f"n3; retained set on n3 seen on n1")
    close_all_conns()
    victim.start()
    cl.nats.wait_ready()


def restart_all(cl):
    n1, n2, n3 = cl.nodes
    rt = topic("restart/retained")
    value = f"survives-{RUN}"
    setter = Conn(n1)
    setter.connect()
    setter.publish(rt, value, qos=1, retain=True)
    sessions = []
    for v5 in (True, False):
        ver = "v5" if v5 else "v3.1.1"
        base = topic(f"restart-{ver}")
        cid = f"rs-{ver.replace('.', '')}-{RUN}"
        s = Conn(n2, cid=cid, v5=v5, clean=False, expiry=3600 if v5 else None)
        s.connect()
        s.subscribe(f"{base}/#", 1)
        pub = Conn(n3)
        pub.connect()
        probe(pub, [s], f"{base}/probe", f"{ver} session on n2")
        s.disconnect()
        queued = [f"{ver}-before-restart-{i}" for i in range(5)]
        for p in queued:
            pub.publish(f"{base}/x", p, qos=1)
        sessions.append((v5, ver, base, cid, queued))
    close_all_conns()
    cl.stop()
    log("every Petrel node and NATS server stopped")
    if not cl.single and not os.environ.get("CLUSTER_RESTART_KEEP_DATA"):
        for n in cl.unique_nodes():
            n.data_dir = n.data_dir + "-empty"
        log("Petrel nodes restart on empty data directories")
    cl.start()
    # The retained message, from every node.
    for node in cl.unique_nodes():
        r = Conn(node)
        r.connect()
        r.subscribe(rt, 1)
        if not wait_until(lambda: r.got(), ARRIVE_WAIT):
            raise Failure(f"retained {value!r} set before the restart: not seen on {node.name}")
        got = [p for (_, p, _, _) in r.got()]
        if got != [value]:
            raise Failure(f"retained after the restart on {node.name}: {got}, expected {[value]}")
    for v5, ver, base, cid, queued in sessions:
        s = Conn(n1, cid=cid, v5=v5, clean=False, expiry=3600 if v5 else None)
        present = s.connect()
        if not present:
            raise Failure(f"{ver}: persistent session made on n2 before the restart, resumed "
                          f"on n1 after it: session present 0")
        wait_arrived(s, queued, f"{ver} messages queued before the restart")
        check_in_order(s.payloads(), queued, f"{ver} queued before the restart")
        pub = Conn(n3)
        pub.connect()
        pub.publish(f"{base}/x", f"{ver}-after", qos=1)
        wait_arrived(s, [f"{ver}-after"], f"{ver} the session's subscription after the restart")
    log("after restarting everything: retained seen on n1, n2, n3; both sessions resumed on n1 "
        "with their queued messages and subscriptions")
    close_all_conns()


SCENARIOS = [
    ("cross_node_qos", cross_node_qos),
    ("retained", retained),
    ("session_resume", session_resume),
    ("takeover", takeover),
    ("shared", shared),
    ("nodes", nodes),
    ("kill_petrel", kill_petrel),
    ("kill_petrel_qos2", kill_petrel_qos2),
    ("kill_nats", kill_nats),
    ("restart_all", restart_all),
]


def main():
    if len(sys.argv) > 2 or (len(sys.argv) == 2 and sys.argv[1] in ("-h", "--help")):
        print(__doc__)
        sys.exit(2)
    binary = sys.argv[1] if len(sys.argv) == 2 else "target/debug/petrel"
    single = bool(os.environ.get("CLUSTER_SINGLE"))
    if not os.access(binary, os.X_OK):
        print(f"FAIL cluster: {binary} is not an executable (build it: cargo build)")
        sys.exit(1)
    if not single and not os.access(NATS_BIN, os.X_OK) and shutil.which(NATS_BIN) is None:
        print(f"FAIL cluster: {NATS_BIN} not found (apt-get install nats-server)")
        sys.exit(1)
    only = [s for s in os.environ.get("CLUSTER_ONLY", "").split(",") if s]
    unknown = [s for s in only if s not in dict(SCENARIOS)]
    if unknown:
        print(f"FAIL cluster: unknown scenario(s) {unknown}; known: {[n for n, _ in SCENARIOS]}")
        sys.exit(2)
    threading.Thread(target=watchdog, daemon=True).start()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    root = tempfile.mkdtemp(prefix="petrel-cluster-")
    print(f"cluster: seed {SEED}, run {RUN}, binary {binary}, directory {root}"
          f"{' (CLUSTER_SINGLE: one node, no NATS)' if single else ''}", flush=True)
    passed, failed = [], []
    cl = None
    try:
        cl = Cluster(binary, root, single)
        try:
            cl.start()
        except Failure as e:
            print(f"FAIL cluster: start: {e} (seed {SEED})", flush=True)
            for n in (cl.unique_nodes() if cl else []):
                for line in tail(n.log_path, 0, 40):
                    print(f"    {n.name}| {line}")
            failed.append("start")
        for name, fn in SCENARIOS:
            if "start" in failed or (only and name not in only):
                continue
            marks = {n.name: n.log_size() for n in cl.unique_nodes()}
            nats_marks = {s.name: size_of(s.log_path) for s in (cl.nats.servers if cl.nats else [])}
            t0 = time.monotonic()
            why = None
            try:
                cl.start()  # whatever a failed fault scenario (or a crash) left down
                fn(cl)
            except Exception as e:  # noqa: BLE001 (a scenario's failure is reported, not fatal)
                why = str(e) if isinstance(e, Failure) else f"{type(e).__name__}: {e}"
                if not isinstance(e, Failure) or os.environ.get("CLUSTER_DEBUG"):
                    traceback.print_exc()
            # A node that exited without the script killing it fails the scenario it died in.
            exits = []
            for n in cl.unique_nodes():
                code = n.exited_by_itself()
                if code is not None:
                    exits.append(f"{n.name} exited by itself with status {code}")
                    n.expected_down = True  # reported once; the next scenario restarts it
            if exits:
                why = "; ".join(exits) + (f"; and: {why}" if why else "")
            close_all_conns()
            if why is None:
                passed.append(name)
                print(f"PASS {name} ({time.monotonic() - t0:.1f} s)", flush=True)
                continue
            failed.append(name)
            print(f"FAIL {name}: {why} (seed {SEED}, {time.monotonic() - t0:.1f} s)", flush=True)
            for n in cl.unique_nodes():
                lines = tail(n.log_path, marks.get(n.name, 0), 40)
                print(f"    --- {n.name} log during {name} ({len(lines)} lines shown)")
                for line in lines:
                    print(f"    {n.name}| {line}")
            for srv in (cl.nats.servers if cl.nats else []):
                lines = [x for x in tail(srv.log_path, nats_marks.get(srv.name, 0), 100000)
                         if "[WRN]" in x or "[ERR]" in x or "[FTL]" in x]
                if lines:
                    print(f"    --- {srv.name} warnings and errors during {name}")
                for line in lines[-10:]:
                    print(f"    {srv.name}| {line}")
    finally:
        if cl is not None:
            for n in cl.unique_nodes():
                if n.proc is not None and n.proc.poll() is not None and n.proc.returncode not in (
                        0, -signal.SIGKILL, -signal.SIGTERM):
                    print(f"  {n.name} exited with {n.proc.returncode}")
        kill_all()
        print(f"cluster: {len(passed)} passed, {len(failed)} failed"
              f"{' (' + ', '.join(failed) + ')' if failed else ''} in "
              f"{time.monotonic() - START:.0f} s (seed {SEED})", flush=True)
        if os.environ.get("CLUSTER_KEEP") is None:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"  logs and data kept in {root}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
