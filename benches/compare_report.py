#!/usr/bin/env python3
"""Writes docs/benchmarks.md from the results.jsonl of benches/compare.sh.

Usage: compare_report.py RESULTS.jsonl DOC.md  (the rest comes from the environment that
compare.sh exports). Everything in DOC.md below MARKER is kept; an older file without the
marker is kept whole below it.
"""
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

MARKER = "<!-- end of generated section: benches/compare.sh keeps everything below this line -->"
BROKERS = [("mosquitto", "Mosquitto"), ("rumqttd", "rumqttd"), ("petrel", "Petrel")]
# Petrel over each transport (same scenarios, no peer to compare with).
TRANSPORTS = [("petrel", "TCP"), ("petrel-tls", "TLS"), ("petrel-quic", "QUIC")]
NAMES = dict(BROKERS + [("petrel-tls", "Petrel TLS"), ("petrel-quic", "Petrel QUIC")])

# cell, row label, metric, unit, higher is better
ROWS = [
    ("fanin-q0", "fan-in 50 → 1, QoS 0", "rate", "deliveries/s", True),
    ("fanin-q1", "fan-in 50 → 1, QoS 1", "rate", "deliveries/s", True),
    ("fanout-q0", "fan-out 1 → 50, QoS 0", "rate", "deliveries/s", True),
    ("fanout-q1", "fan-out 1 → 50, QoS 1", "rate", "deliveries/s", True),
    ("p2p-q1", "p2p 100 pairs, QoS 1", "rate", "deliveries/s", True),
    ("lat-p2p-q1", "p99 latency, p2p QoS 1 at {lat} msg/s", "p99", "µs", False),
    ("lat-fanin-q0", "p99 latency, fan-in QoS 0 at {lat} msg/s", "p99", "µs", False),
    ("conn", "{conns} connections: time to 99 % connected", "conn_p99", "ms", False),
    ("conn", "memory per idle connection", "per_conn", "KiB", False),
]
THROUGHPUT_CELLS = ["fanin-q0", "fanin-q1", "fanout-q0", "fanout-q1", "p2p-q1", "lat-p2p-q1", "lat-fanin-q0"]


def env(name, default=""):
    return os.environ.get(name, default)


def metric(rec, name):
    b = rec.get("bench")
    if not b:
        return None
    lat = b.get("latency") or {}
    if name == "rate":
        return rec.get("steady_per_sec", b["delivered_per_sec"])
    if name == "bench_rate":
        return b["delivered_per_sec"]
    if name == "p99":
        return lat.get("p99_us")
    if name == "p50":
        return lat.get("p50_us")
    if name == "conn_p99":
        return b.get("connect_p99_ms")
    if name == "per_conn":
        connected = b["pubs"] - b.get("connect_failures", 0)
        if connected <= 0 or not rec.get("rss_conn_kb"):
            return None
        return (rec["rss_conn_kb"] - rec["rss_before_kb"]) / connected
    if name == "lost_pct":
        return 100.0 * b["lost"] / b["expected"] if b.get("expected") else 0.0
    if name == "dup":
        return b["duplicates"]
    if name == "bench_cpu":
        return b["bench_cpu_percent"]
    if name == "sent_rate":
        return b["sent_per_sec"]
    if name == "connect_failures":
        return b.get("connect_failures", 0)
    raise KeyError(name)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, unit=""):
    if v is None:
        return "–"
    if unit == "KiB" or (isinstance(v, float) and abs(v) < 100):
        return f"{v:,.1f}"
    return f"{v:,.0f}"


def cmd(args):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def machine():
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return {
        "cores": os.cpu_count(),
        "model": model,
        "ram": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "load": cmd(["cat", "/proc/loadavg"]),
    }


def main():
    results_path, doc_path = Path(sys.argv[1]), Path(sys.argv[2])
    recs = [json.loads(l) for l in results_path.read_text().splitlines() if l.strip()]
    out_dir = Path(env("OUT", str(results_path.parent)))
    present = [(k, name) for k, name in BROKERS if any(r["broker"] == k for r in recs)]
    transports = [(k, name) for k, name in TRANSPORTS if any(r["broker"] == k for r in recs)]
    everyone = [(k, NAMES[k]) for k in NAMES if any(r["broker"] == k for r in recs)]

    def runs(broker, cell):
        return [r for r in recs if r["broker"] == broker and r["cell"] == cell]

    def med(broker, cell, name):
        return median(metric(r, name) for r in runs(broker, cell) if r.get("bench"))

    def rss_max(brokers):
        """Largest RSS (MiB) of each broker over the throughput and latency cells."""
        out = {}
        for k, _ in brokers:
            vals = [r["rss_max_kb"] for r in recs if r["broker"] == k and r["cell"] in THROUGHPUT_CELLS]
            out[k] = max(vals) / 1024 if vals else None
        return out

    provisional = env("PROVISIONAL") == "1"
    lat = f"{int(float(env('LAT_RATE', '20000'))):,}"
    conns = f"{int(env('CONNS', '10000')):,}"
    m = machine()
    lines = []
    w = lines.append
    w("# Benchmarks: Petrel, Mosquitto and rumqttd")
    w("")
    w("Generated by `benches/compare.sh` (do not edit above the marker; rerun the script).")
    w("")
    if provisional:
        w(f"> **Provisional figures.** This is a quick run ({env('RUNS')} run(s) of {env('DURATION')} s per cell) "
          "on a shared 2-core machine while other builds and tests were running. They show the "
          "tooling works and the rough shape of the results, not numbers to quote. Rerun with the "
          "defaults (`benches/compare.sh`, 3 runs of 5 s, medians) on a quiet machine for the real comparison.")
        w("")
    w("## Machine")
    w("")
    w(f"- {m['cores']} cores, {m['model']}, {m['ram']} RAM, Linux {m['kernel']}")
    w(f"- load average when the report was written: {m['load']}")
    w("- Everything on one machine over loopback (127.0.0.1): the load generator and the broker "
      "share the cores, so the bench's own CPU is shown next to each figure.")
    w("")
    w("## Versions")
    w("")
    w(f"- Petrel: git `{env('PETREL_REV')}` ({env('PETREL_VERSION')}), release build")
    w(f"- Mosquitto: {env('MOSQUITTO_VERSION')} (Debian package){' — ' + env('MOSQUITTO_ERROR') if env('MOSQUITTO_ERROR') else ''}")
    if env("RUMQTTD_ERROR"):
        w(f"- rumqttd: **not measured**: {env('RUMQTTD_ERROR')}")
    else:
        w(f"- rumqttd: {env('RUMQTTD_VERSION_LINE')} (crates.io, `cargo install rumqttd --version ={env('RUMQTTD_VERSION')}`, "
          "not `--locked`: its lock file no longer builds on current rustc)")
    w(f"- Load generator: `petrel bench` from the same Petrel build, MQTT {'3.1.1' if env('PROTO') == '311' else '5.0'}, "
      f"{env('SIZE')} B payloads, clean sessions")
    w("")
    w("## Method")
    w("")
    w(f"- Each cell: {env('RUNS')} run(s) of {env('DURATION')} s publishing plus up to {env('DRAIN')} s drain; "
      "the table shows the median of each figure over the runs.")
    w("- Throughput cells are closed-loop (each publisher keeps up to 64 messages awaiting "
      "acknowledgement; QoS 0 publishes as fast as the client can write). "
      "Deliveries/s in the table is the steady rate: the median over the 1 s intervals of the "
      "publishing period of the distinct messages received by all subscribers (from the bench's "
      "progress lines). The bench's own `delivered_per_sec` (everything delivered, drain "
      "included, ÷ publishing time) is in the details; it flatters a broker that queues "
      "messages and delivers them after the publishers stop.")
    w(f"- Latency cells publish at a fixed {lat} msg/s in total (p2p: 100 publishers at "
      f"{float(env('LAT_RATE', '20000')) / 100:g}/s; fan-in: 50 at {float(env('LAT_RATE', '20000')) / 50:g}/s); "
      "latency is publish → delivery, measured from a timestamp in the payload.")
    w(f"- Connection storm: {conns} clients connect, 200 at a time, and stay idle for {env('CONN_HOLD')} s "
      "on a freshly started broker. Memory per idle connection = (broker VmRSS 1 s after all "
      "connected − VmRSS of the idle broker just before) ÷ connections.")
    w("- Broker RSS max: the largest VmRSS sampled every 100 ms from /proc/PID/status during the "
      "throughput and latency runs (all brokers stay up through them, runs interleaved).")
    w("- Broker and bench CPU: % of one core, averaged over the run (so up to 200 % on 2 cores).")
    w("")
    w("## Results")
    w("")
    hdr = "| scenario | unit | better | " + " | ".join(n for _, n in present)
    others = [(k, n) for k, n in present if k != "petrel"]
    has_petrel = any(k == "petrel" for k, _ in present)
    if has_petrel:
        hdr += " | " + " | ".join(f"Petrel ÷ {n}" for _, n in others)
    hdr += " | bench CPU % (" + " / ".join(n[0] for _, n in present) + ") |"
    w(hdr)
    w("|" + "---|" * (hdr.count("|") - 1))
    lagged = False
    stalled = []

    def cell_text(k, cell, name, unit, value):
        nonlocal lagged
        text = fmt(value, unit)
        if name == "rate":
            bench_rate = med(k, cell, "bench_rate")
            if value and bench_rate and value < 0.5 * bench_rate:
                text += " †"
                lagged = True
            slow = [r for r in runs(k, cell) if r.get("bench")
                    and r["bench"]["seconds"] > float(env("DURATION", "5")) + 5]
            if slow:
                text += " ‡"
                stalled.append(f"{NAMES[k]} {cell}: publishing lasted "
                               + ", ".join(f"{r['bench']['seconds']:.0f} s" for r in slow))
            lost = med(k, cell, "lost_pct")
            dup = med(k, cell, "dup")
            notes = []
            if lost:
                notes.append(f"lost {lost:.2g} %")
            if dup:
                notes.append(f"{dup:,.0f} dup")
            if notes:
                text += " (" + ", ".join(notes) + ")"
        if name == "conn_p99":
            fails = med(k, cell, "connect_failures")
            if fails:
                text += f" ({fails:,.0f} failed)"
        if not any(r.get("bench") for r in runs(k, cell)):
            errs = [r.get("error", "") for r in runs(k, cell)]
            text = "failed" + (f": {errs[0][:60]}" if errs and errs[0] else "")
        return text

    for cell, label, name, unit, higher in ROWS:
        if not any(r["cell"] == cell for r in recs):
            continue
        label = label.format(lat=lat, conns=conns)
        vals = {k: med(k, cell, name) for k, _ in present}
        cells = [cell_text(k, cell, name, unit, vals[k]) for k, _ in present]
        row = f"| {label} | {unit} | {'higher' if higher else 'lower'} | " + " | ".join(cells)
        if has_petrel:
            ratios = []
            for k, _ in others:
                p, o = vals.get("petrel"), vals.get(k)
                ratios.append(f"{p / o:.2f}×" if p is not None and o else "–")
            row += " | " + " | ".join(ratios)
        row += " | " + " / ".join(fmt(med(k, cell, "bench_cpu")) for k, _ in present) + " |"
        w(row)
    rss = rss_max(present)
    row = "| broker RSS max during throughput runs | MiB | lower | " + " | ".join(fmt(rss[k]) for k, _ in present)
    if has_petrel:
        row += " | " + " | ".join(
            f"{rss['petrel'] / rss[k]:.2f}×" if rss.get("petrel") and rss.get(k) else "–" for k, _ in others)
    row += " | |"
    w(row)
    w("")
    w("Ratios are Petrel's figure divided by the peer's: above 1 is better for Petrel where "
      "higher is better, below 1 where lower is better. \"lost\" is the share of expected "
      f"deliveries not received by the end of the drain ({env('DRAIN')} s after the publishers "
      "stopped): messages a broker dropped (QoS 0 may, by design) or was still delivering then.")
    if len(transports) > 1:
        w("")
        w("### Petrel over TLS and MQTT over QUIC")
        w("")
        w("The same scenarios against Petrel's TLS listener (`mqtts://`, TLS 1.3) and its MQTT "
          "over QUIC listener (`quic://`, EMQX's single-stream mapping), each with the development "
          "certificate, beside plain TCP. There is no peer figure to compare with (Mosquitto has no "
          "QUIC; rumqttd neither); the ratios are to Petrel over TCP, and the load generator pays "
          "for its half of every TLS and QUIC connection on the same two cores.")
        w("")
        hdr = "| scenario | unit | better | " + " | ".join(n for _, n in transports)
        hdr += " | " + " | ".join(f"{n} ÷ TCP" for k, n in transports if k != "petrel")
        hdr += " | bench CPU % (" + " / ".join(n for _, n in transports) + ") |"
        w(hdr)
        w("|" + "---|" * (hdr.count("|") - 1))
        for cell, label, name, unit, higher in ROWS:
            if not any(r["cell"] == cell for r in recs):
                continue
            label = label.format(lat=lat, conns=conns)
            vals = {k: med(k, cell, name) for k, _ in transports}
            row = f"| {label} | {unit} | {'higher' if higher else 'lower'} | " + " | ".join(
                cell_text(k, cell, name, unit, vals[k]) for k, _ in transports)
            ratios = []
            for k, _ in transports:
                if k == "petrel":
                    continue
                p, o = vals.get(k), vals.get("petrel")
                ratios.append(f"{p / o:.2f}×" if p is not None and o else "–")
            row += " | " + " | ".join(ratios)
            row += " | " + " / ".join(fmt(med(k, cell, "bench_cpu")) for k, _ in transports) + " |"
            w(row)
        storm = {}
        for k, _ in transports:
            ok = [r for r in runs(k, "conn") if r.get("storm_core_busy_pct")]
            if ok:
                per_core = [median(r["storm_core_busy_pct"][i] for r in ok)
                            for i in range(len(ok[0]["storm_core_busy_pct"]))]
                storm[k] = (" / ".join(fmt(c) for c in per_core) + " (broker "
                            + fmt(median(r.get("storm_broker_cpu_percent") for r in ok)) + ")")
        if storm:
            w(f"| CPU per core during the {conns}-connection storm (broker's own in brackets) "
              "| % | | " + " | ".join(storm.get(k, "–") for k, _ in transports)
              + " |" + " |" * (len(transports) - 1) + " |")
        rss_t = rss_max(transports)
        row = "| broker RSS max during throughput runs | MiB | lower | " + " | ".join(
            fmt(rss_t[k]) for k, _ in transports)
        row += " | " + " | ".join(
            f"{rss_t[k] / rss_t['petrel']:.2f}×" if rss_t.get(k) and rss_t.get("petrel") else "–"
            for k, _ in transports if k != "petrel")
        row += " | |"
        w(row)
    if lagged:
        w("")
        w("† Deliveries lagged far behind publishing: the steady rate while publishing is under half "
          "of everything delivered ÷ publishing time (see \"bench delivered/s\" in the details), so "
          "most messages were queued (in the broker or in socket buffers) and delivered after the "
          "publishers stopped. For QoS 1 the broker acknowledged publishes much faster than it "
          "delivered them. For fan-in QoS 0 without a rate limit every broker shows it: 50 "
          "publishers flood the broker and the one subscriber, in the same bench process on a "
          "2-core machine, gets little CPU until they stop; read that row as a load-generator "
          "limit rather than a broker figure.")
    if stalled:
        w("")
        w(f"‡ Publishing ran far past its {env('DURATION')} s ({'; '.join(stalled)}): a QoS 0 "
          "publisher's last write sat in the bench client until its keep-alive PINGREQ (60 s) "
          "woke it. The steady rate above ignores that stalled tail; the bench's own "
          "delivered/s in the details is wrong for these runs.")
    w("")
    w("### Details (medians)")
    w("")
    w("| cell | broker | sent/s | steady delivered/s | bench delivered/s | lost % | dup | p50 µs | p99 µs | broker CPU % | bench CPU % | broker RSS max MiB |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cell in THROUGHPUT_CELLS:
        for k, n in everyone:
            rs = runs(k, cell)
            if not rs:
                continue
            ok = [r for r in rs if r.get("bench")]
            if not ok:
                w(f"| {cell} | {n} | failed: {rs[0].get('error', '')[:80]} ||||||||||")
                continue
            w(f"| {cell} | {n} | {fmt(med(k, cell, 'sent_rate'))} | {fmt(med(k, cell, 'rate'))} | {fmt(med(k, cell, 'bench_rate'))} | "
              f"{med(k, cell, 'lost_pct'):.2f} | {fmt(med(k, cell, 'dup'))} | {fmt(med(k, cell, 'p50'))} | "
              f"{fmt(med(k, cell, 'p99'))} | {fmt(median(r['broker_cpu_percent'] for r in ok))} | "
              f"{fmt(med(k, cell, 'bench_cpu'))} | {fmt(median(r['rss_max_kb'] / 1024 for r in ok))} |")
    for k, n in everyone:
        ok = [r for r in runs(k, "conn") if r.get("bench")]
        if ok:
            w(f"| conn | {n} | 99 % in {fmt(med(k, 'conn', 'conn_p99'))} ms, all in "
              f"{fmt(median(r['bench'].get('connect_all_ms') for r in ok))} ms, "
              f"{fmt(med(k, 'conn', 'connect_failures'))} failed | RSS idle "
              f"{fmt(median(r['rss_before_kb'] / 1024 for r in ok))} MiB → "
              f"{fmt(median(r['rss_conn_kb'] / 1024 for r in ok))} MiB |||||| "
              f"{fmt(median(r['broker_cpu_percent'] for r in ok))} | {fmt(med(k, 'conn', 'bench_cpu'))} | |")
    failures = [r for r in recs if not r.get("bench") or not r.get("broker_alive", True)]
    if failures:
        w("")
        w("### Failed runs")
        w("")
        for r in failures:
            w(f"- {r['broker']} {r['cell']} run {r['run']}: exit {r['exit']}"
              f"{', broker died' if not r.get('broker_alive', True) else ''}: {r.get('error', '')}")
    w("")
    w("## Configurations")
    w("")
    defaults = []
    example = Path(__file__).resolve().parent.parent / "petrel.example.toml"
    if example.exists():
        section = ""
        for line in example.read_text().splitlines():
            line = line.strip()
            if line.startswith("[") and not line.startswith("[["):
                section = line.strip("[]")
            for key in ("max_queued", "max_inflight"):
                if line.startswith(key + " ") or line.startswith(key + "="):
                    defaults.append(f"`{section}.{line}`")
    w("Petrel: defaults (`petrel.example.toml` at report time: " + ", ".join(defaults) + "), "
      "one listener per measured transport (the QUIC run also has a TCP listener, only to see "
      "that the broker is up):")
    w("")
    w("```")
    w("target/release/petrel --tcp 127.0.0.1:PORT --data-dir TMP/data                        # Petrel")
    w("target/release/petrel --tls 127.0.0.1:PORT --data-dir TMP/data                        # Petrel TLS")
    w("target/release/petrel --tcp 127.0.0.1:PORT2 --quic 127.0.0.1:PORT --data-dir TMP/data # Petrel QUIC")
    w("```")
    for k, fname in (("mosquitto", "mosquitto.conf"), ("rumqttd", "rumqttd.toml")):
        p = out_dir / k / fname
        if p.exists():
            w("")
            w(f"{NAMES[k]} (`{'mosquitto -c' if k == 'mosquitto' else 'rumqttd -q -c'} {fname}`; PORT is a free port chosen per start):")
            w("")
            w("```")
            text = p.read_text()
            text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text)
            text = re.sub(r"listener \d+", "listener PORT", text)
            w(text.rstrip())
            w("```")
    w("")
    w("## Commands")
    w("")
    w("The whole comparison:")
    w("")
    w("```")
    w("benches/compare.sh                     # RUNS=3 DURATION=5: the figures to quote")
    w("RUNS=1 DURATION=2 benches/compare.sh   # smoke run")
    w("```")
    w("")
    w(f"This report: `{env('COMMAND_LINE')}`. Each run is one `petrel bench` against "
      "`mqtt://127.0.0.1:PORT` (Petrel TLS: `-u mqtts://localhost:PORT --cafile TMP/data/certs/ca.pem`; "
      "Petrel QUIC: `-u quic://localhost:PORT --cafile TMP/data/certs/ca.pem`):")
    w("")
    w("```")
    seen = set()
    for r in recs:
        if r["cell"] in seen:
            continue
        seen.add(r["cell"])
        dur = f" --duration {env('CONN_HOLD') if r['cell'] == 'conn' else env('DURATION')}"
        w(f"petrel bench -u mqtt://127.0.0.1:PORT -V {env('PROTO')} --size {env('SIZE')}{dur} "
          f"--drain {env('DRAIN')} --json {r['args']}   # {r['cell']}")
    w("```")
    w("")
    w(f"Raw per-run JSON (bench report plus broker CPU and RSS): `{results_path}` (not committed).")
    w("")

    kept = ""
    if doc_path.exists():
        old = doc_path.read_text()
        if MARKER in old:
            kept = old.split(MARKER, 1)[1].lstrip("\n")
        elif old.strip():
            kept = old
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text("\n".join(lines) + "\n" + MARKER + "\n\n" + kept)


if __name__ == "__main__":
    main()
