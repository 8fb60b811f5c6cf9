"""Crash and restart under load, with paho-mqtt: nothing acknowledged is lost.

Unlike the test_*.py scripts this one owns the broker: it starts the petrel binary as a
child process on a data directory of its own, SIGKILLs it at random moments while several
publishers send QoS 1 and QoS 2 messages to persistent subscribers (one of them offline part
of the time), and starts it again on the same directory, ROUNDS times. Then it checks:

  * every QoS 1 message a publisher saw acknowledged (PUBACK) arrived at least once,
  * every QoS 2 message a publisher saw acknowledged (PUBCOMP) arrived exactly once, and no
    QoS 2 message arrived twice at all,
  * the retained message set before each kill is there after the restart,
  * the subscribers' subscriptions survived (they subscribe only on their first connect).

Every loop is bounded in count and time; the seed is printed (CRASH_SEED replays a run).

    python3 tests/interop/crash_restart.py target/debug/petrel
Env: CRASH_SEED, CRASH_ROUNDS (default 4), CRASH_PUBLISHERS (default 3).
Prints "PASS crash_restart ..." or "FAIL crash_restart: why" and exits 0 / 1.
"""

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
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)

from paho.mqtt import client as mqtt_client  # noqa: E402
from paho.mqtt.client import MQTTv311  # noqa: E402

def _keep_released_state():
    """Works around a paho-mqtt 2.x bug that breaks QoS 2 exactly-once on its own.

    On every reconnect attempt paho resets its outgoing messages: one waiting for PUBCOMP
    becomes "resend PUBREL", but one already in "resend PUBREL" (after an earlier failed
    attempt, e.g. while the broker restarts) becomes "publish" again, so paho sends the
    released message as a new PUBLISH with the same id, and any broker delivers it twice.
    The patch keeps "resend PUBREL" across attempts; everything else is paho's own code.
    """
    original = mqtt_client.Client._messages_reconnect_reset_out

    def reset(self):
        with self._out_message_mutex:
            released = [m for m in self._out_messages.values()
                        if m.qos == 2 and m.state == mqtt_client.mqtt_ms_resend_pubrel]
        original(self)
        with self._out_message_mutex:
            for m in released:
                m.state = mqtt_client.mqtt_ms_resend_pubrel

    mqtt_client.Client._messages_reconnect_reset_out = reset


_keep_released_state()

SEED = int(os.environ.get("CRASH_SEED", str(int(time.time() * 1000) % 1_000_000)))
ROUNDS = int(os.environ.get("CRASH_ROUNDS", "4"))
PUBLISHERS = int(os.environ.get("CRASH_PUBLISHERS", "3"))
# Bound on the whole run, whatever happens.
DEADLINE = time.monotonic() + float(os.environ.get("CRASH_WATCHDOG", "240"))


# The broker's current life (0 before the first kill), for the failure report.
EPOCH = [0]


def fail(why):
    print(f"FAIL crash_restart: {why} (seed {SEED})", flush=True)
    sys.exit(1)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Broker:
    def __init__(self, binary, data_dir, port, log):
        self.binary, self.data_dir, self.port, self.log = binary, data_dir, port, log
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [self.binary, "--tcp", f"127.0.0.1:{self.port}", "--data-dir", self.data_dir,
             "--set", "api.bind=127.0.0.1:0"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        for _ in range(200):
            if self.proc.poll() is not None:
                fail(f"broker exited at start with {self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        fail("broker did not listen within 10 s")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def client(client_id, port):
    c = mqtt_client.Client(
        mqtt_client.CallbackAPIVersion.VERSION1,
        client_id=client_id,
        clean_session=False,
        protocol=MQTTv311,
    )
    c.reconnect_delay_set(min_delay=0.05, max_delay=0.5)
    c.max_inflight_messages_set(20)
    c.max_queued_messages_set(0)
    c.connect_async("127.0.0.1", port, keepalive=30)
    return c


class Subscriber:
    """A persistent subscriber: subscribes on its first connect only, counts what arrives."""

    def __init__(self, name, topic, qos, port):
        self.lock = threading.Lock()
        self.counts = {}
        self.log = []
        self.subscribed = False
        self.topic, self.qos = topic, qos
        self.client = client(name, port)
        self.client.on_connect = self.on_connect
        self.client.on_message = self.on_message

    def on_connect(self, c, userdata, flags, rc):
        if rc == 0 and not self.subscribed:
            self.subscribed = True
            c.subscribe(self.topic, self.qos)

    def on_message(self, c, userdata, msg):
        with self.lock:
            key = msg.payload.decode()
            self.counts[key] = self.counts.get(key, 0) + 1
            self.log.append((key, msg.mid, EPOCH[0]))

    def snapshot(self):
        with self.lock:
            return dict(self.counts)


class Publisher:
    """Publishes numbered QoS 1 and QoS 2 messages; records those acknowledged."""

    def __init__(self, name, port, rng):
        self.name, self.rng = name, rng
        self.lock = threading.Lock()
        self.acked = {1: set(), 2: set()}
        self.pending = {}
        self.early = set()
        self.seq = 0
        self.client = client(name, port)
        self.client.on_publish = self.on_publish

    def on_publish(self, c, userdata, mid):
        # Never hold our lock while calling into paho (its thread calls us holding its own).
        with self.lock:
            entry = self.pending.pop(mid, None)
            if entry:
                qos, payload = entry
                self.acked[qos].add(payload)
            else:
                self.early.add(mid)

    def publish_some(self, n):
        for _ in range(n):
            self.seq += 1
            qos = 1 if self.rng.random() < 0.5 else 2
            payload = f"{self.name}-{self.seq}"
            info = self.client.publish(f"crash/q{qos}/{self.name}", payload, qos=qos)
            if info.rc not in (mqtt_client.MQTT_ERR_SUCCESS, mqtt_client.MQTT_ERR_NO_CONN):
                continue
            with self.lock:
                if info.mid in self.early:
                    # Acknowledged before we got here.
                    self.early.discard(info.mid)
                    self.acked[qos].add(payload)
                else:
                    self.pending[info.mid] = (qos, payload)


def wait_until(pred, timeout):
    end = min(time.monotonic() + timeout, DEADLINE)
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def retained_value(port, topic):
    got = []
    c = mqtt_client.Client(mqtt_client.CallbackAPIVersion.VERSION1, client_id=f"ret-{time.time_ns()}",
                           clean_session=True, protocol=MQTTv311)
    c.on_connect = lambda c, u, f, rc: c.subscribe(topic, 1)
    c.on_message = lambda c, u, m: got.append(m.payload.decode())
    c.connect("127.0.0.1", port, 30)
    c.loop_start()
    wait_until(lambda: got, 5)
    c.loop_stop()
    c.disconnect()
    return got[0] if got else None


def set_retained(port, topic, value):
    c = mqtt_client.Client(mqtt_client.CallbackAPIVersion.VERSION1, client_id=f"setret-{time.time_ns()}",
                           clean_session=True, protocol=MQTTv311)
    c.connect("127.0.0.1", port, 30)
    c.loop_start()
    info = c.publish(topic, value, qos=1, retain=True)
    info.wait_for_publish(timeout=5)
    ok = info.is_published()
    c.disconnect()
    c.loop_stop()
    return ok


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(2)
    binary = sys.argv[1]
    rng = random.Random(SEED)
    print(f"crash_restart: seed {SEED}, {ROUNDS} rounds, {PUBLISHERS} publishers", flush=True)
    data_dir = tempfile.mkdtemp(prefix="petrel-crash-")
    log = open(os.path.join(data_dir, "broker.log"), "ab")
    port = free_port()
    broker = Broker(binary, data_dir, port, log)
    broker.start()
    subs = [Subscriber("crash-sub-q1", "crash/q1/#", 1, port), Subscriber("crash-sub-q2", "crash/q2/#", 2, port)]
    pubs = [Publisher(f"crash-pub-{i}", port, random.Random(rng.random())) for i in range(PUBLISHERS)]
    for c in [s.client for s in subs] + [p.client for p in pubs]:
        c.loop_start()
    if not wait_until(lambda: all(s.subscribed for s in subs), 10):
        fail("subscribers did not subscribe")
    time.sleep(0.3)
    retained = None
    try:
        for round_no in range(ROUNDS):
            value = f"round-{round_no}"
            if set_retained(port, "crash/retained", value):
                retained = value
            # The QoS 1 subscriber is offline for part of some rounds.
            offline = rng.random() < 0.5
            if offline:
                subs[0].client.disconnect()
                subs[0].client.loop_stop()
            stop_at = time.monotonic() + rng.uniform(0.3, 1.5)
            while time.monotonic() < stop_at:
                for p in pubs:
                    p.publish_some(rng.randint(1, 10))
                time.sleep(0.01)
            broker.kill()
            EPOCH[0] += 1
            time.sleep(rng.uniform(0.0, 0.3))
            broker.start()
            got = retained_value(port, "crash/retained")
            if retained is not None and got != retained:
                fail(f"round {round_no}: retained {got!r} after restart, expected {retained!r}")
            if offline:
                subs[0].client.reconnect()
                subs[0].client.loop_start()
            acked = sum(len(p.acked[1]) + len(p.acked[2]) for p in pubs)
            print(f"  round {round_no}: killed and restarted; {acked} acknowledged so far", flush=True)
        # Let every client drain: publishers resend what is unacknowledged.
        wait_until(lambda: all(not p.pending for p in pubs), 30)

        def arrived():
            q1, q2 = subs[0].snapshot(), subs[1].snapshot()
            return all(m in q1 for p in pubs for m in p.acked[1]) and all(
                m in q2 for p in pubs for m in p.acked[2]
            )

        wait_until(arrived, 30)
        time.sleep(0.5)
        q1, q2 = subs[0].snapshot(), subs[1].snapshot()
        lost1 = [m for p in pubs for m in p.acked[1] if m not in q1]
        lost2 = [m for p in pubs for m in p.acked[2] if m not in q2]
        dup2 = {m: n for m, n in q2.items() if n > 1}
        n1 = sum(len(p.acked[1]) for p in pubs)
        n2 = sum(len(p.acked[2]) for p in pubs)
        if n1 == 0 or n2 == 0:
            fail(f"nothing acknowledged (QoS 1: {n1}, QoS 2: {n2})")
        if lost1:
            fail(f"{len(lost1)} of {n1} acknowledged QoS 1 messages lost, e.g. {lost1[:5]}")
        if lost2:
            fail(f"{len(lost2)} of {n2} acknowledged QoS 2 messages lost, e.g. {lost2[:5]}")
        if dup2:
            for key, mid, epoch in subs[1].log:
                if key in dup2:
                    print(f"  {key}: packet id {mid}, broker life {epoch}")
            fail(f"{len(dup2)} QoS 2 messages delivered more than once, e.g. {list(dup2.items())[:5]}")
        dup1 = sum(n - 1 for n in q1.values() if n > 1)
        print(
            f"PASS crash_restart: {ROUNDS} kills; QoS 1: {n1} acknowledged, all arrived "
            f"({dup1} duplicates, allowed); QoS 2: {n2} acknowledged, each exactly once; "
            f"retained kept (seed {SEED})",
            flush=True,
        )
    finally:
        for c in [s.client for s in subs] + [p.client for p in pubs]:
            c.loop_stop()
        broker.stop()
        log.close()
        if os.environ.get("CRASH_KEEP") is None:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            print(f"  data kept in {data_dir}")


if __name__ == "__main__":
    main()
