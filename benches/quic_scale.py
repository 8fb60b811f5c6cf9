#!/usr/bin/env python3
"""QUIC at fleet scale (issue 15): one connection storm against a freshly started broker.

    benches/quic_scale.py BROKER_BINARY [--scheme quic|tls|tcp] [-n 10000] [-c 200]
                          [--runs 3] [--hold 5] [--broker-env KEY=VALUE]
                          [-- BROKER_ARGS...]

Per run: start the broker (its listener of SCHEME on a free loopback port, a data dir in a
temp dir, BROKER_ARGS appended, e.g. `--set quic.endpoints=1`), wait until it is idle, read
its VmRSS, then `petrel bench --scenario conn --pubs N --connect-concurrency C` (MQTT 3.1.1,
the development CA). Measured:

- time until 99 % and all of the clients had their CONNACK (the bench's own figures);
- memory per idle connection: (broker VmRSS 1 s after the bench says all are connected and
  holding - VmRSS before) / N, as benches/compare.sh does;
- CPU per core during the storm (from the bench's start until all are connected): each
  core's busy share from /proc/stat (the whole machine: the bench runs on the same two
  cores), the broker's own CPU (% of one core) and how it spread over its threads (the
  busiest thread's share of the broker's CPU: 100 % means one thread did everything);
- the load generator's CPU per connection (its whole CPU time until all are connected,
  start-up included, divided by N).

Prints one line per run and the medians; `--json` prints the records instead. The load
generator is BENCH (default: the broker binary).
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port(kind):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cores():
    """Per core: (busy, total) jiffies."""
    out = []
    with open("/proc/stat") as f:
        for line in f:
            parts = line.split()
            if parts[0].startswith("cpu") and parts[0] != "cpu":
                v = [int(x) for x in parts[1:]]
                idle = v[3] + v[4]
                out.append((sum(v) - idle, sum(v)))
    return out


def threads(pid):
    """Per thread of `pid`: utime + stime in ticks."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[tid] = int(fields[11]) + int(fields[12])
    return out


def run_once(args, broker_args):
    kind = socket.SOCK_DGRAM if args.scheme == "quic" else socket.SOCK_STREAM
    port = free_port(kind)
    with tempfile.TemporaryDirectory() as tmp:
        flag = {"quic": "--quic", "tls": "--tls", "tcp": "--tcp"}[args.scheme]
        cmd = [args.broker, flag, f"127.0.0.1:{port}", "--data-dir", f"{tmp}/data",
               "--set", "api.bind=127.0.0.1:0"] + broker_args
        env = dict(os.environ, **dict(kv.split("=", 1) for kv in args.broker_env))
        broker = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env=env)
        try:
            ca = f"{tmp}/data/certs/ca.pem"
            for _ in range(100):
                if args.scheme == "tcp" or os.path.exists(ca):
                    break
                time.sleep(0.05)
            time.sleep(1.0)
            rss_before = rss_kb(broker.pid)
            scheme = {"quic": "quic", "tls": "mqtts", "tcp": "mqtt"}[args.scheme]
            host = "127.0.0.1" if args.scheme == "tcp" else "localhost"
            bench = [args.bench, "bench", "-u", f"{scheme}://{host}:{port}", "-V", "311",
                     "--scenario", "conn", "--pubs", str(args.n), "--connect-concurrency",
                     str(args.c), "--duration", str(args.hold), "--json"]
            if args.scheme != "tcp":
                bench += ["--cafile", ca]
            cores0, threads0, t0 = cores(), threads(broker.pid), time.monotonic()
            err = open(f"{tmp}/bench.err", "w+")
            proc = subprocess.Popen(bench, stdout=subprocess.PIPE, stderr=err, text=True)
            while proc.poll() is None:
                err.seek(0)
                if "holding them" in err.read():
                    break
                time.sleep(0.02)
            cores1, threads1, t1 = cores(), threads(broker.pid), time.monotonic()
            try:
                bench_ticks = sum(threads(proc.pid).values())
            except OSError:
                bench_ticks = 0
            time.sleep(1.0)
            rss_conn = rss_kb(broker.pid)
            out, _ = proc.communicate(timeout=args.hold + 120)
            report = json.loads(out)
        finally:
            broker.send_signal(signal.SIGTERM)
            try:
                broker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                broker.kill()
                broker.wait()
    per_core = [100.0 * (b1 - b0) / max(1, (a1 - a0))
                for (b0, a0), (b1, a1) in zip(cores0, cores1)]
    spent = {tid: threads1.get(tid, 0) - threads0.get(tid, 0) for tid in threads1}
    broker_ticks = sum(spent.values())
    seconds = t1 - t0
    return {
        "scheme": args.scheme,
        "n": args.n,
        "broker_args": broker_args,
        "connect_p99_ms": report.get("connect_p99_ms"),
        "connect_all_ms": report.get("connect_all_ms"),
        "failures": report.get("connect_failures"),
        "rss_before_kb": rss_before,
        "rss_conn_kb": rss_conn,
        "kib_per_conn": (rss_conn - rss_before) / args.n,
        "storm_s": seconds,
        "core_busy_pct": per_core,
        "broker_cpu_pct": 100.0 * broker_ticks / CLK_TCK / max(seconds, 1e-9),
        "broker_cpu_ms_per_conn": 1000.0 * broker_ticks / CLK_TCK / args.n,
        "busiest_thread_share_pct": 100.0 * max(spent.values(), default=0) / max(1, broker_ticks),
        "bench_cpu_ms_per_conn": 1000.0 * bench_ticks / CLK_TCK / args.n,
    }


def main():
    argv = sys.argv[1:]
    broker_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, broker_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("broker")
    p.add_argument("--scheme", default="quic", choices=["quic", "tls", "tcp"])
    p.add_argument("-n", type=int, default=10000)
    p.add_argument("-c", type=int, default=200)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--hold", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.add_argument("--broker-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the broker only (e.g. LD_PRELOAD=...), repeatable")
    args = p.parse_args(argv)
    args.bench = os.environ.get("BENCH", args.broker)
    records = []
    for _ in range(args.runs):
        r = run_once(args, broker_args)
        records.append(r)
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            cores_txt = " / ".join(f"{c:.0f}" for c in r["core_busy_pct"])
            print(f"{r['scheme']} {' '.join(broker_args)}: 99 % in {r['connect_p99_ms']:.0f} ms, "
                  f"all in {r['connect_all_ms']:.0f} ms, {r['failures']} failed; "
                  f"{r['kib_per_conn']:.1f} KiB per idle connection "
                  f"(RSS {r['rss_before_kb']} -> {r['rss_conn_kb']} kB); "
                  f"cores busy {cores_txt} %, broker {r['broker_cpu_pct']:.0f} % "
                  f"(busiest thread {r['busiest_thread_share_pct']:.0f} % of it, "
                  f"{r['broker_cpu_ms_per_conn']:.3f} ms CPU per connection; load generator "
                  f"{r['bench_cpu_ms_per_conn']:.3f} ms per connection)", flush=True)
    if not args.json and len(records) > 1:
        med = lambda k: statistics.median(r[k] for r in records)
        cores_med = [statistics.median(r["core_busy_pct"][i] for r in records)
                     for i in range(len(records[0]["core_busy_pct"]))]
        print(f"median of {len(records)}: 99 % in {med('connect_p99_ms'):.0f} ms, all in "
              f"{med('connect_all_ms'):.0f} ms; {med('kib_per_conn'):.1f} KiB per idle "
              f"connection; cores busy {' / '.join(f'{c:.0f}' for c in cores_med)} %, broker "
              f"{med('broker_cpu_pct'):.0f} % (busiest thread "
              f"{med('busiest_thread_share_pct'):.0f} %, "
              f"{med('broker_cpu_ms_per_conn'):.3f} ms CPU per connection; load generator "
              f"{med('bench_cpu_ms_per_conn'):.3f} ms)")


if __name__ == "__main__":
    main()
