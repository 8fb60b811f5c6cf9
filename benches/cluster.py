#!/usr/bin/env python3
"""Cluster figures for docs/cluster.md: Petrel on one node with its embedded store, one node
on NATS JetStream (R1), and three nodes on a three-server NATS cluster (R3), driven by
`petrel bench`, with Mosquitto beside them; and how many messages cross from NATS to the
Petrel nodes per publish for a topic subscribed on 1, 2 and 3 nodes.

    python3 benches/cluster.py [PETREL_BINARY]      # default target/release/petrel

Environment: DURATION [8] seconds per throughput run, RATE [2000] total msg/s of the latency
runs, PAIRS [10] publisher/subscriber pairs, FANOUT [30] subscribers, CROSS_N [2000]
messages per crossing count, OUT [target/bench-cluster] raw JSON and logs. Everything runs on
loopback with free ports and temporary directories; every process is stopped at the end.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

BIN = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/release/petrel")
DURATION = int(os.environ.get("DURATION", "8"))
RATE = int(os.environ.get("RATE", "2000"))
PAIRS = int(os.environ.get("PAIRS", "10"))
FANOUT = int(os.environ.get("FANOUT", "30"))
CROSS_N = int(os.environ.get("CROSS_N", "2000"))
OUT = os.environ.get("OUT", "target/bench-cluster")
NATS = shutil.which("nats-server") or "/usr/sbin/nats-server"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

procs = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args, log):
    p = subprocess.Popen(args, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL)
    procs.append(p)
    return p


def stop_all():
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + 10
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
    procs.clear()


def wait_port(port, what, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"{what} did not listen on {port} within {timeout} s")


def start_nats(n, root):
    os.makedirs(root, exist_ok=True)
    client = [free_port() for _ in range(n)]
    route = [free_port() for _ in range(n)]
    monitor = [free_port() for _ in range(n)]
    for i in range(n):
        args = [NATS, "-js", "-a", "127.0.0.1", "-p", str(client[i]), "-m", str(monitor[i]),
                "-sd", f"{root}/js{i}", "--server_name", f"s{i}"]
        if n > 1:
            others = ",".join(f"nats://127.0.0.1:{route[j]}" for j in range(n) if j != i)
            args += ["--cluster_name", "bench", "--cluster", f"nats://127.0.0.1:{route[i]}",
                     "--routes", others]
        spawn(args, f"{root}/nats{i}.log")
    for i in range(n):
        wait_port(client[i], f"nats-server {i}")
    # JetStream needs a meta leader before streams can be made.
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{monitor[0]}/jsz", timeout=2) as r:
                if json.load(r).get("meta_cluster", {}).get("leader") or n == 1:
                    break
        except OSError:
            pass
        time.sleep(0.2)
    return client, monitor


def start_petrel(name, root, nats_ports=None, replicas=1):
    port = free_port()
    args = [BIN, "--tcp", f"127.0.0.1:{port}", "--data-dir", f"{root}/{name}",
            "--set", "api.enable=false", "--set", "log.level=warn",
            "--set", "session.max_queued=100000"]
    if nats_ports:
        urls = ",".join(f"nats://127.0.0.1:{p}" for p in nats_ports)
        args += ["--set", f"cluster.nats={urls}", "--set", f"cluster.node_name={name}",
                 "--set", f"cluster.replicas={replicas}"]
    spawn(args, f"{root}/{name}.log")
    wait_port(port, f"petrel {name}")
    return port


def start_mosquitto(root):
    port = free_port()
    conf = f"{root}/mosquitto.conf"
    with open(conf, "w") as f:
        f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\n")
    spawn([MOSQUITTO, "-c", conf], f"{root}/mosquitto.log")
    wait_port(port, "mosquitto")
    return port


def bench(label, pub_port, sub_ports, extra):
    args = [BIN, "bench", "--json", "--quiet", "-V", "311", "--url", f"mqtt://127.0.0.1:{pub_port}",
            "--duration", str(DURATION), "--drain", "5"]
    if sub_ports and sub_ports != [pub_port]:
        for p in sub_ports:
            args += ["--sub-url", f"mqtt://127.0.0.1:{p}"]
        args += ["--settle-ms", "1500"]
    args += extra
    out = subprocess.run(args, capture_output=True, text=True, timeout=DURATION + 120)
    if out.returncode != 0:
        print(f"  {label}: bench failed: {out.stderr.strip()[-400:]}", flush=True)
        return None
    report = json.loads(out.stdout)
    report["label"] = label
    with open(f"{OUT}/results.jsonl", "a") as f:
        f.write(json.dumps(report) + "\n")
    lat = report.get("latency") or {}
    print(f"  {label}: {report.get('delivered_per_sec', 0):.0f} deliveries/s, lost "
          f"{report.get('lost')}, dup {report.get('duplicates')}, p50/p99 "
          f"{lat.get('p50_us', 0) / 1000:.2f}/{lat.get('p99_us', 0) / 1000:.2f} ms", flush=True)
    return report


def cells(setup, pub_port, sub_ports, fan_ports):
    """The same cells on every setup: throughput (closed loop) and latency (fixed rate)."""
    rows = {}
    rows["p2p"] = bench(f"{setup} p2p q1", pub_port, sub_ports,
                        ["--scenario", "p2p", "--pubs", str(PAIRS), "-q", "1"])
    rows["lat"] = bench(f"{setup} p2p q1 at {RATE}/s", pub_port, sub_ports,
                        ["--scenario", "p2p", "--pubs", str(PAIRS), "-q", "1",
                         "--rate", str(RATE / PAIRS)])
    rows["persistent"] = bench(f"{setup} p2p q1 persistent", pub_port, sub_ports,
                               ["--scenario", "p2p", "--pubs", str(PAIRS), "-q", "1",
                                "--persistent"])
    rows["fanout"] = bench(f"{setup} fan-out 1 to {FANOUT} q1", pub_port, fan_ports,
                           ["--scenario", "fan-out", "--pubs", "1", "--subs", str(FANOUT),
                            "-q", "1"])
    return rows


def nats_out_to_petrel(monitors):
    """Messages NATS delivered to Petrel nodes' connections so far, by node name."""
    total = {}
    for m in monitors:
        with urllib.request.urlopen(f"http://127.0.0.1:{m}/connz?limit=1024", timeout=5) as r:
            for c in json.load(r).get("connections", []):
                name = c.get("name", "")
                if name.startswith("petrel "):
                    total[name] = total.get(name, 0) + c.get("out_msgs", 0)
    return total


def crossings(ports, monitors):
    """Messages from NATS to Petrel nodes per publish on n1, for a topic subscribed on 1 node
    (n2), 2 nodes (n2, n3) and 3 nodes (n1, n2, n3: the publisher's own copy comes back to
    it and is dropped there). Run on a fresh cluster: NATS counts every message it sends a
    node, so nothing else may be flowing."""
    result = {}
    for k, nodes in ((1, [1]), (2, [1, 2]), (3, [0, 1, 2])):
        topic = f"cross/{k}/{time.time_ns()}"
        subs = []
        for i in nodes:
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"x{k}-{i}")
            c.connect("127.0.0.1", ports[i])
            c.subscribe(topic, 0)
            c.loop_start()
            subs.append(c)
        time.sleep(1.5)
        before = nats_out_to_petrel(monitors)
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"xp{k}")
        pub.connect("127.0.0.1", ports[0])
        pub.loop_start()
        for i in range(CROSS_N):
            pub.publish(topic, b"x", qos=0)
            if i % 200 == 0:
                time.sleep(0.01)
        time.sleep(2)
        after = nats_out_to_petrel(monitors)
        moved = sum(after.get(n, 0) - before.get(n, 0) for n in after)
        result[k] = moved / CROSS_N
        print(f"  topic on {k} node(s): {result[k]:.2f} messages from NATS to Petrel nodes per "
              f"publish", flush=True)
        for c in subs + [pub]:
            c.loop_stop()
            c.disconnect()
    return result


def main():
    if not os.access(BIN, os.X_OK):
        raise SystemExit(f"{BIN}: build it first (cargo build --release)")
    os.makedirs(OUT, exist_ok=True)
    open(f"{OUT}/results.jsonl", "w").close()
    root = tempfile.mkdtemp(prefix="petrel-bench-cluster-")
    figures = {"duration": DURATION, "rate": RATE, "pairs": PAIRS, "fanout": FANOUT}
    try:
        print("Mosquitto", flush=True)
        port = start_mosquitto(root)
        figures["mosquitto"] = cells("mosquitto", port, [port], [port])
        stop_all()

        print("Petrel, one node, embedded store", flush=True)
        port = start_petrel("single", root)
        figures["embedded"] = cells("embedded", port, [port], [port])
        stop_all()

        print("Petrel, one node on one NATS server (R1)", flush=True)
        client, _ = start_nats(1, root + "/r1")
        port = start_petrel("solo", root, client, 1)
        figures["one_node"] = cells("one node", port, [port], [port])
        stop_all()

        print("Petrel, three nodes on three NATS servers (R3)", flush=True)
        client, monitors = start_nats(3, root + "/r3")
        ports = [start_petrel(f"n{i + 1}", root, client, 3) for i in range(3)]
        figures["crossings"] = crossings(ports, monitors)
        figures["same_node"] = cells("3 nodes, same node", ports[0], [ports[0]], [ports[0]])
        figures["cross_node"] = cells("3 nodes, cross node", ports[0], [ports[1]], ports)
        stop_all()
    finally:
        stop_all()
        shutil.rmtree(root, ignore_errors=True)
    with open(f"{OUT}/figures.json", "w") as f:
        json.dump(figures, f, indent=1)
    print(f"figures in {OUT}/figures.json", flush=True)


if __name__ == "__main__":
    main()
