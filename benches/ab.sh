#!/usr/bin/env bash
# A/B of two Petrel builds on this machine: the same `petrel bench` scenario against broker A,
# then broker B, alternating, each run on a freshly started broker on a free loopback port.
# Prints each run's delivered/s, latency and the broker's CPU time (clock ticks, utime +
# stime from /proc), which is the figure to compare when the load generator, not the broker,
# limits throughput on a 2-core machine.
#
#   benches/ab.sh OLD_BINARY NEW_BINARY [petrel bench arguments...]
#   e.g. git stash; cargo build --release; cp target/release/petrel /tmp/petrel-old
#        git stash pop; cargo build --release
#        benches/ab.sh /tmp/petrel-old target/release/petrel --scenario fan-out --pubs 1 --subs 50 -q 1
#
# Environment: RUNS [3] alternations; DURATION [5] seconds; BENCH [the NEW binary] the
# load generator (one binary for both sides, so only the broker differs); TRANSPORT [tcp]
# or quic (the broker listens on QUIC, the bench connects with quic:// and --insecure).
set -euo pipefail
(($# >= 2)) || { sed -n '2,13p' "$0"; exit 2; }
A=$1 B=$2
shift 2
RUNS=${RUNS:-3}
DURATION=${DURATION:-5}
BENCH=${BENCH:-$B}
DATA=$(mktemp -d)
PID=""
trap '[[ -n $PID ]] && kill "$PID" 2>/dev/null; rm -rf "$DATA"' EXIT

TRANSPORT=${TRANSPORT:-tcp}
case $TRANSPORT in
tcp) LISTEN=--tcp SCHEME=mqtt EXTRA=() SOCK=SOCK_STREAM ;;
quic) LISTEN=--quic SCHEME=quic EXTRA=(--insecure) SOCK=SOCK_DGRAM ;;
*) echo "TRANSPORT is tcp or quic" >&2; exit 2 ;;
esac

# Extra broker arguments for both builds; empty for a build older than the HTTP API (which
# knows no `api` key), leaving the newer one its default API port.
BROKER_ARGS=${BROKER_ARGS---set api.bind=127.0.0.1:0}

free_port() {
    python3 -c "import socket; s=socket.socket(socket.AF_INET, socket.$SOCK); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"
}
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

run() { # label binary
    local label=$1 bin=$2 port t0 t1 out i
    shift 2
    port=$(free_port)
    rm -rf "$DATA/data"
    # shellcheck disable=SC2086 # BROKER_ARGS is a list of words
    "$bin" "$LISTEN" "127.0.0.1:$port" --data-dir "$DATA/data" $BROKER_ARGS >/dev/null 2>&1 &
    PID=$!
    for ((i = 0; i < 50; i++)); do
        if [[ $TRANSPORT == quic ]]; then
            sleep 1 # nothing to probe without a QUIC handshake
            break
        fi
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    t0=$(ticks "$PID")
    out=$(timeout $((DURATION + 60)) "$BENCH" bench -u "$SCHEME://127.0.0.1:$port" "${EXTRA[@]}" -V 311 --size 64 \
        --duration "$DURATION" --drain 3 --json --quiet "$@" 2>/dev/null || true)
    t1=$(ticks "$PID")
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    PID=""
    OUT=$out LABEL=$label TICKS=$((t1 - t0)) python3 -c '
import json, os
label, ticks = os.environ["LABEL"], os.environ["TICKS"]
try:
    b = json.loads(os.environ["OUT"])
except ValueError:
    print(label, "bench failed")
    raise SystemExit
l = b.get("latency") or {}
print("%s  delivered/s %10.0f  lost %d  dup %d  p50 %s us  p99 %s us  broker CPU %s ticks" % (
    label, b["delivered_per_sec"], b["lost"], b["duplicates"], l.get("p50_us"), l.get("p99_us"), ticks))'
}

for ((r = 1; r <= RUNS; r++)); do
    run A "$A" "$@"
    run B "$B" "$@"
done
