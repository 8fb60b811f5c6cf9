#!/usr/bin/env bash
# The cost of durability, measured end to end in one sitting: Petrel with
# storage.durability = none / group / sync, and Mosquitto with persistence on, each serving
# the same `petrel bench` scenario with persistent sessions (so every QoS 1 delivery is kept
# for its session: Petrel writes it and commits before acknowledging; Mosquitto keeps it in
# memory and writes its whole state at autosave_interval, by default every 1800 s).
#
#   benches/durability.sh [PETREL_BINARY]        (default target/release/petrel)
#
# Per run: delivered/s, latency p50/p99, and from the broker's /proc/PID/io the bytes it
# wrote per delivered message; for Petrel the store's commits per second (its log line at
# shutdown; Mosquitto makes no fsync between autosaves). Environment: RUNS [3], DURATION [5],
# MOSQUITTO [mosquitto on PATH or /usr/sbin/mosquitto].
set -euo pipefail
PETREL=${1:-target/release/petrel}
RUNS=${RUNS:-3}
DURATION=${DURATION:-5}
MOSQUITTO=${MOSQUITTO:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}
TMP=$(mktemp -d)
PID=""
trap '[[ -n $PID ]] && kill -9 "$PID" 2>/dev/null; rm -rf "$TMP"' EXIT

free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
io_write() { awk '/^write_bytes/ {print $2}' "/proc/$1/io"; }

start() { # broker port -> PID
    local broker=$1 port=$2 i
    rm -rf "$TMP/data" && mkdir -p "$TMP/data"
    case $broker in
    mosquitto)
        printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location %s/data/\nmax_queued_messages 100000\nmax_inflight_messages 0\n' \
            "$port" "$TMP" >"$TMP/mosquitto.conf"
        "$MOSQUITTO" -c "$TMP/mosquitto.conf" >"$TMP/broker.log" 2>&1 &
        ;;
    *)
        RUST_LOG=info "$PETREL" --tcp "127.0.0.1:$port" --data-dir "$TMP/data" --set api.bind=127.0.0.1:0 \
            --set "storage.durability=\"$broker\"" --set session.max_queued=100000 >"$TMP/broker.log" 2>&1 &
        ;;
    esac
    PID=$!
    for ((i = 0; i < 100; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return
        sleep 0.05
    done
    echo "broker $broker did not start" >&2
    cat "$TMP/broker.log" >&2
    exit 1
}

run() { # broker label bench-args...
    local broker=$1 label=$2 port w0 w1 out
    shift 2
    port=$(free_port)
    start "$broker" "$port"
    w0=$(io_write "$PID")
    out=$(timeout $((DURATION + 60)) "$PETREL" bench -u "mqtt://127.0.0.1:$port" -V 311 --size 64 \
        --duration "$DURATION" --drain 3 --json --quiet --persistent "$@" 2>/dev/null || true)
    w1=$(io_write "$PID")
    kill -TERM "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    PID=""
    OUT=$out LABEL="$label $broker" WRITTEN=$((w1 - w0)) LOG="$TMP/broker.log" SECS=$DURATION python3 -c '
import json, os, re
label, written = os.environ["LABEL"], int(os.environ["WRITTEN"])
try:
    b = json.loads(os.environ["OUT"])
except ValueError:
    print(label, "bench failed"); raise SystemExit
log = re.sub(r"\x1b\[[0-9;]*m", "", open(os.environ["LOG"]).read())
m = re.search(r"store closed commits=(\d+)", log)
commits = "%.0f" % (int(m.group(1)) / b["delivery_seconds"]) if m else "-"
l = b.get("latency") or {}
per = written / b["delivered"] if b["delivered"] else 0
print("%-22s delivered/s %9.0f  lost %d dup %d  p50 %6s us  p99 %7s us  bytes written/msg %6.0f  commits/s %s" % (
    label, b["delivered_per_sec"], b["lost"], b["duplicates"], l.get("p50_us"), l.get("p99_us"), per, commits))'
}

for ((r = 1; r <= RUNS; r++)); do
    for broker in none group sync mosquitto; do
        run "$broker" "fan-in 50->1" --scenario fan-in --pubs 50 --subs 1 -q 1
    done
    for broker in none group sync mosquitto; do
        run "$broker" "p2p 100 pairs" --scenario p2p --pubs 100 -q 1
    done
done
