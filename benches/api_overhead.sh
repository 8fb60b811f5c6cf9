#!/usr/bin/env bash
# The cost of observing the broker: 10 publishers to 10 subscribers (fan-in, QoS 1, 64-byte
# payloads, default durable store) with nobody watching, against the same load while a
# monitor polls the HTTP API every second (clients, stats, metrics) and scrapes Prometheus,
# with 100 more idle clients connected so that the listings have rows to build. Runs
# alternate (unwatched, watched) to share the machine's drift; one sitting.
#
# Two figures per run: throughput flat out (RATE unset), or, at a fixed RATE per publisher,
# the broker's CPU time (utime + stime clock ticks from /proc), which is the steadier measure
# of a small cost on a shared 2-core machine.
#
#   benches/api_overhead.sh [PETREL_BINARY]      (default target/release/petrel)
# Environment: RUNS [3], DURATION [10], RATE [unset: flat out].
set -euo pipefail
PETREL=${1:-target/release/petrel}
RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
RATE=${RATE:-}
TMP=$(mktemp -d)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; rm -rf "$TMP"' EXIT
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }

run() { # label watched(0|1)
    local label=$1 watched=$2 port api i out broker idle monitor
    port=$(free_port)
    api=$(free_port)
    rm -rf "$TMP/data"
    "$PETREL" --tcp "127.0.0.1:$port" --data-dir "$TMP/data" --set "api.bind=127.0.0.1:$api" \
        --set api.default_password=bench >/dev/null 2>&1 &
    broker=$!
    PIDS=("$broker")
    for ((i = 0; i < 100; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.05
    done
    # 100 idle clients, in both runs: only the monitor differs.
    python3 - "$port" >/dev/null 2>&1 <<'PY' &
import socket, sys, time
port = int(sys.argv[1])
socks = []
for i in range(100):
    s = socket.create_connection(("127.0.0.1", port))
    cid = b"idle-%03d" % i
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    s.sendall(b"\x10" + bytes([len(body)]) + body)
    socks.append(s)
time.sleep(3600)
PY
    idle=$!
    PIDS+=("$idle")
    sleep 1
    if [[ $watched == 1 ]]; then
        (
            for ((i = 0; i < DURATION + 10; i++)); do
                for path in clients?limit=100 stats metrics; do
                    curl -s -u admin:bench "http://127.0.0.1:$api/api/v5/$path" >/dev/null
                done
                curl -s "http://127.0.0.1:$api/api/v5/prometheus/stats" >/dev/null
                sleep 1
            done
        ) &
        monitor=$!
        PIDS+=("$monitor")
    fi
    local rate=() before after
    [[ -n $RATE ]] && rate=(--rate "$RATE")
    before=$(ticks "$broker")
    out=$("$PETREL" bench -u "mqtt://127.0.0.1:$port" -V 311 --size 64 --duration "$DURATION" \
        --drain 3 --json --quiet --pubs 10 --subs 10 -q 1 "${rate[@]}" 2>/dev/null || true)
    after=$(ticks "$broker")
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    PIDS=()
    OUT=$out LABEL=$label CPU=$((after - before)) python3 -c '
import json, os
try:
    b = json.loads(os.environ["OUT"])
except ValueError:
    print(os.environ["LABEL"], "bench failed"); raise SystemExit
l = b.get("latency") or {}
print("%-10s delivered/s %9.0f  lost %d  p50 %6s us  p99 %7s us  broker CPU %s ticks" % (
    os.environ["LABEL"], b["delivered_per_sec"], b["lost"], l.get("p50_us"), l.get("p99_us"),
    os.environ["CPU"]))'
}

for ((r = 1; r <= RUNS; r++)); do
    run "unwatched" 0
    run "watched" 1
done
