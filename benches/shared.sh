#!/usr/bin/env bash
# Shared-subscription throughput per strategy against a plain subscription, one sitting:
# 10 publishers on one topic at QoS 1; either one plain subscriber, or 10 members of a shared
# group (each message to one member) under each strategy (the groups of
# tests/interop/emqx.toml). The store is off (`storage.durability = "none"`) so that only the
# routing differs.
#
#   benches/shared.sh [PETREL_BINARY]      (default target/release/petrel)
# Environment: RUNS [3], DURATION [5].
set -euo pipefail
PETREL=${1:-target/release/petrel}
RUNS=${RUNS:-3}
DURATION=${DURATION:-5}
CONFIG=$(cd "$(dirname "$0")/.." && pwd)/tests/interop/emqx.toml
TMP=$(mktemp -d)
PID=""
trap '[[ -n $PID ]] && kill "$PID" 2>/dev/null; rm -rf "$TMP"' EXIT
free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }

run() { # label bench-args...
    local label=$1 port i out
    shift
    port=$(free_port)
    "$PETREL" --config "$CONFIG" --tcp "127.0.0.1:$port" --data-dir "$TMP/data" --set api.bind=127.0.0.1:0 \
        --set 'storage.durability="none"' >/dev/null 2>&1 &
    PID=$!
    for ((i = 0; i < 100; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.05
    done
    out=$("$PETREL" bench -u "mqtt://127.0.0.1:$port" -V 311 --size 64 --duration "$DURATION" \
        --drain 3 --json --quiet --scenario fan-out --pubs 10 -q 1 "$@" 2>/dev/null || true)
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    PID=""
    OUT=$out LABEL=$label python3 -c '
import json, os
try:
    b = json.loads(os.environ["OUT"])
except ValueError:
    print(os.environ["LABEL"], "bench failed"); raise SystemExit
l = b.get("latency") or {}
print("%-24s delivered/s %9.0f  lost %d  p50 %6s us  p99 %7s us" % (
    os.environ["LABEL"], b["delivered_per_sec"], b["lost"], l.get("p50_us"), l.get("p99_us")))'
}

for ((r = 1; r <= RUNS; r++)); do
    run "plain, 1 subscriber" --subs 1
    for group in it_rr it_random it_sticky it_hash_clientid it_hash_topic it_local it_rr_per_group; do
        run "shared $group" --subs 10 --share "$group"
    done
done
