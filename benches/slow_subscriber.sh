#!/usr/bin/env bash
# Fan-in (4 publishers -> 1 subscriber, QoS 1, 64 B, 5 s) beside a subscriber on `#` that never
# reads (benches/slow_subscriber.py), under each session.queue_full policy, at 1,000/s and
# 2,000/s per publisher and flat out. What the healthy subscriber gets, and its latency.
#
#   benches/slow_subscriber.sh [PETREL_BINARY]      (default target/release/petrel)
# Environment: POLICIES ["keep drop_new"], DURATION [5].
set -euo pipefail
PETREL=${1:-target/release/petrel}
POLICIES=${POLICIES:-"keep drop_new"}
DURATION=${DURATION:-5}
HERE=$(dirname "$0")
TMP=$(mktemp -d)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; rm -rf "$TMP"' EXIT
free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }

for policy in $POLICIES; do
    for rate in 1000 2000 ""; do
        port=$(free_port)
        rm -rf "$TMP/data"
        "$PETREL" --tcp "127.0.0.1:$port" --data-dir "$TMP/data" --set api.enable=false \
            --set "session.queue_full=$policy" >/dev/null 2>&1 &
        broker=$!
        PIDS=("$broker")
        for ((i = 0; i < 100; i++)); do
            (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
            sleep 0.05
        done
        python3 "$HERE/slow_subscriber.py" "$port" $((DURATION + 20)) &
        PIDS+=($!)
        sleep 0.5
        args=()
        [[ -n $rate ]] && args=(--rate "$rate")
        out=$("$PETREL" bench --scenario fan-in -u "mqtt://127.0.0.1:$port" --pubs 4 --subs 1 \
            -q 1 --size 64 --duration "$DURATION" --drain 5 --json --quiet "${args[@]}" \
            2>/dev/null || true)
        for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
        PIDS=()
        OUT=$out POLICY=$policy RATE=${rate:-max} python3 -c '
import json, os
try:
    b = json.loads(os.environ["OUT"])
except ValueError:
    print(os.environ["POLICY"], os.environ["RATE"], "bench failed"); raise SystemExit
l = b.get("latency") or {}
print("%-9s %5s/s per publisher: %7d of %7d delivered, %6d lost, %8.0f sent/s; latency p50 %.1f p99 %.1f p99.9 %.1f ms" % (
    os.environ["POLICY"], os.environ["RATE"], b["delivered"], b["expected"], b["lost"], b["sent_per_sec"],
    l.get("p50_us", 0) / 1000, l.get("p99_us", 0) / 1000, l.get("p999_us", 0) / 1000))'
    done
done
