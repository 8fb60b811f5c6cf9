#!/usr/bin/env bash
# End-to-end broker comparison: Mosquitto, rumqttd and Petrel on this machine, driven by
# `petrel bench`, summarised into docs/benchmarks.md.
#
#   benches/compare.sh                      # full run: 3 runs of 5 s per cell (~25 min)
#   RUNS=1 DURATION=2 benches/compare.sh    # smoke run (numbers marked provisional)
#
# Environment (defaults in brackets):
#   RUNS [3]            runs per cell; the report shows the median of each figure
#   DURATION [5]        seconds of publishing per throughput/latency run
#   DRAIN [3]           seconds the bench waits for stragglers after publishing
#   SIZE [64]           payload bytes
#   CONNS [10000]       connections in the connection storm
#   CONN_HOLD [5]       seconds the storm's connections stay idle (RSS is read 1 s in)
#   LAT_RATE [20000]    total msg/s of the latency cells (split over the publishers)
#   PROTO [311]         MQTT version the bench speaks: 311 or 5 (rumqttd's v5 is partial)
#   BROKERS [mosquitto rumqttd petrel petrel-tls petrel-quic]
#                       petrel-tls / petrel-quic: Petrel measured over TLS (mqtts://) and
#                       MQTT over QUIC (quic://) with its development certificate
#   CELLS [all]         space-separated subset of the cell names below, e.g. "fanin-q0 conn"
#   SKIP_BUILD [0]      1: use the existing target/release/petrel
#   PETREL_BENCH_CACHE [~/.cache/petrel-bench]  where rumqttd is installed
#   RUMQTTD_VERSION [0.20.0]
#   OUT [target/bench-compare]  raw results (results.jsonl), configs and broker logs
#   DOC [docs/benchmarks.md]
#   PROVISIONAL [auto]  1/0; auto = provisional when RUNS < 3 or DURATION < 5
#   REPORT_ONLY [0]     1: only rewrite DOC from the existing OUT/results.jsonl (same RUNS etc.)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=${RUNS:-3}
DURATION=${DURATION:-5}
DRAIN=${DRAIN:-3}
SIZE=${SIZE:-64}
CONNS=${CONNS:-10000}
CONN_HOLD=${CONN_HOLD:-5}
LAT_RATE=${LAT_RATE:-20000}
PROTO=${PROTO:-311}
BROKERS=${BROKERS:-"mosquitto rumqttd petrel petrel-tls petrel-quic"}
CELLS=${CELLS:-all}
SKIP_BUILD=${SKIP_BUILD:-0}
CACHE=${PETREL_BENCH_CACHE:-$HOME/.cache/petrel-bench}
RUMQTTD_VERSION=${RUMQTTD_VERSION:-0.20.0}
OUT=${OUT:-$ROOT/target/bench-compare}
DOC=${DOC:-$ROOT/docs/benchmarks.md}
PROVISIONAL=${PROVISIONAL:-auto}
if [[ $PROVISIONAL == auto ]]; then
    PROVISIONAL=0
    if ((RUNS < 3 || DURATION < 5)); then PROVISIONAL=1; fi
fi

# Cells: name | petrel bench arguments. Scenario sizes follow issue #6.
LAT_P2P_RATE=$(python3 -c "print($LAT_RATE / 100)")
LAT_FANIN_RATE=$(python3 -c "print($LAT_RATE / 50)")
ALL_CELLS=(
    "fanin-q0|--scenario fan-in --pubs 50 --subs 1 -q 0"
    "fanin-q1|--scenario fan-in --pubs 50 --subs 1 -q 1"
    "fanout-q0|--scenario fan-out --pubs 1 --subs 50 -q 0"
    "fanout-q1|--scenario fan-out --pubs 1 --subs 50 -q 1"
    "p2p-q1|--scenario p2p --pubs 100 -q 1"
    "lat-p2p-q1|--scenario p2p --pubs 100 -q 1 --rate $LAT_P2P_RATE"
    "lat-fanin-q0|--scenario fan-in --pubs 50 --subs 1 -q 0 --rate $LAT_FANIN_RATE"
    "conn|--scenario conn --pubs $CONNS"
)
selected() { [[ $CELLS == all ]] || [[ " $CELLS " == *" $1 "* ]]; }

log() { printf '[compare %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# ---------------------------------------------------------------- cleanup (by PID only)
# Only processes this script started and that are still running: the brokers, and the bench
# and RSS sampler of the run in progress. Each is forgotten once it has been waited for, so a
# recycled PID is never signalled.
declare -A BPID BPORT BURL BARGS
BENCH_PID=""
SAMPLER=""
cleanup() {
    local pid
    for pid in "$BENCH_PID" "$SAMPLER" "${BPID[@]}"; do
        [[ -n $pid ]] && kill "$pid" 2>/dev/null || true
    done
    for pid in "$BENCH_PID" "$SAMPLER" "${BPID[@]}"; do
        [[ -n $pid ]] && wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 10 k connections need 10 k descriptors in the bench and in each broker (they inherit it).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if (($(ulimit -n) < CONNS + 1000)); then
    log "warning: ulimit -n is $(ulimit -n), below CONNS=$CONNS + 1000; the storm may fail"
fi

REPORT_ONLY=${REPORT_ONLY:-0}
RESULTS=$OUT/results.jsonl
if [[ $REPORT_ONLY != 1 ]]; then
    rm -rf "$OUT"
    mkdir -p "$OUT" "$CACHE"
    : >"$RESULTS"
fi

# ---------------------------------------------------------------- binaries
PETREL=${CARGO_TARGET_DIR:-$ROOT/target}/release/petrel
if [[ $SKIP_BUILD != 1 && $REPORT_ONLY != 1 ]]; then
    log "building petrel (release)"
    (cd "$ROOT" && cargo build --release --bin petrel)
fi
[[ -x $PETREL ]] || { log "no $PETREL"; exit 1; }

want() { [[ " $BROKERS " == *" $1 "* ]]; }
RUMQTTD_ERROR=""
MOSQUITTO_ERROR=""
if want mosquitto && [[ $REPORT_ONLY != 1 ]] && ! command -v mosquitto >/dev/null; then
    log "installing mosquitto (Debian)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto; } \
        >"$OUT/mosquitto-install.log" 2>&1 ||
        MOSQUITTO_ERROR="apt-get install mosquitto failed (see mosquitto-install.log)"
fi
MOSQUITTO=$(command -v mosquitto || true)
[[ -z $MOSQUITTO && -z $MOSQUITTO_ERROR ]] && want mosquitto && MOSQUITTO_ERROR="mosquitto not found"

RUMQTTD=$CACHE/bin/rumqttd
if want rumqttd && [[ $REPORT_ONLY != 1 ]]; then
    if ! [[ -x $RUMQTTD ]] || [[ $("$RUMQTTD" --version 2>/dev/null) != "rumqttd $RUMQTTD_VERSION" ]]; then
        # Not --locked: its lock file pins crates that no longer build on current rustc.
        log "installing rumqttd $RUMQTTD_VERSION into $CACHE (a few minutes)"
        cargo install rumqttd --version "=$RUMQTTD_VERSION" --root "$CACHE" --force \
            >"$OUT/rumqttd-install.log" 2>&1 ||
            RUMQTTD_ERROR="cargo install rumqttd --version =$RUMQTTD_VERSION failed: $(grep -m1 '^error' "$OUT/rumqttd-install.log" || tail -1 "$OUT/rumqttd-install.log")"
    fi
fi

# Versions of what is measured, recorded now (a REPORT_ONLY rerun reads them back).
if [[ $REPORT_ONLY != 1 ]]; then
    PETREL_REV=$(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo "-dirty")
    MOSQUITTO_VERSION="not available"
    [[ -n $MOSQUITTO ]] && MOSQUITTO_VERSION=$({ "$MOSQUITTO" -h 2>&1 || true; } | head -1)
    RUMQTTD_VERSION_LINE="not available"
    [[ -x $RUMQTTD && -z $RUMQTTD_ERROR ]] && RUMQTTD_VERSION_LINE=$({ "$RUMQTTD" --version 2>&1 || true; } | head -1)
    PETREL_VERSION=$("$PETREL" --version 2>&1 | head -1)
    declare -p PETREL_REV MOSQUITTO_VERSION RUMQTTD_VERSION_LINE PETREL_VERSION RUMQTTD_ERROR \
        MOSQUITTO_ERROR >"$OUT/versions.env"
fi

ACTIVE=()
for b in $BROKERS; do
    case $b in
    mosquitto) [[ -z $MOSQUITTO_ERROR ]] && ACTIVE+=(mosquitto) || log "skipping mosquitto: $MOSQUITTO_ERROR" ;;
    rumqttd) [[ -z $RUMQTTD_ERROR ]] && ACTIVE+=(rumqttd) || log "skipping rumqttd: $RUMQTTD_ERROR" ;;
    petrel | petrel-tls | petrel-quic) ACTIVE+=("$b") ;;
    *) log "unknown broker $b"; exit 1 ;;
    esac
done

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# ---------------------------------------------------------------- configs
write_config() { # broker port -> prints config path (none for petrel)
    local b=$1 port=$2 dir=$OUT/$1
    mkdir -p "$dir"
    case $b in
    mosquitto)
        cat >"$dir/mosquitto.conf" <<EOF
# Mosquitto 2.x: defaults except the two settings of issue #6's reference run.
# Defaults worth knowing: max_queued_messages 1000, max_inflight_messages 20,
# set_tcp_nodelay false, max_connections -1 (unlimited), persistence false.
listener $port 127.0.0.1
allow_anonymous true
set_tcp_nodelay true
max_queued_messages 1000000
log_dest stderr
EOF
        echo "$dir/mosquitto.conf"
        ;;
    rumqttd)
        local v5port=$3
        cat >"$dir/rumqttd.toml" <<EOF
# rumqttd $RUMQTTD_VERSION: its example rumqttd.toml with the limits raised so it is not
# throttled: 20 k connections, no delay between accepts (the example has 1 ms, which alone
# would take 10 s for 10 k connections), 1 MB payloads, 10 k packets per read batch and
# 10 k outgoing QoS 0 packets per router read. Its outgoing QoS 1/2 window is a constant
# (100) in the source, not configurable. No console, no Prometheus, no WebSocket.
id = 0

[router]
id = 0
max_connections = 20000
max_outgoing_packet_count = 10000
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "127.0.0.1:$port"
next_connection_delay_ms = 0
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 1048576
    max_inflight_count = 10000
    dynamic_filters = true

[v5.1]
name = "v5-1"
listen = "127.0.0.1:$v5port"
next_connection_delay_ms = 0
    [v5.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 1048576
    max_inflight_count = 10000
    dynamic_filters = true
EOF
        echo "$dir/rumqttd.toml"
        ;;
    petrel) echo "" ;;
    esac
}

# ---------------------------------------------------------------- broker lifecycle
start_broker() { # broker
    local b=$1 dir=$OUT/$1 port v5port conf url_port
    port=$(free_port)
    mkdir -p "$dir"
    case $b in
    mosquitto)
        conf=$(write_config mosquitto "$port")
        "$MOSQUITTO" -c "$conf" >>"$dir/broker.log" 2>&1 &
        url_port=$port
        ;;
    rumqttd)
        v5port=$(free_port)
        while [[ $v5port == "$port" ]]; do v5port=$(free_port); done
        conf=$(write_config rumqttd "$port" "$v5port")
        "$RUMQTTD" -q -c "$conf" >>"$dir/broker.log" 2>&1 &
        url_port=$port
        [[ $PROTO == 5 ]] && url_port=$v5port
        ;;
    petrel)
        rm -rf "$dir/data"
        "$PETREL" --tcp "127.0.0.1:$port" --data-dir "$dir/data" --set api.bind=127.0.0.1:0 >>"$dir/broker.log" 2>&1 &
        url_port=$port
        ;;
    petrel-tls)
        # The development certificate (written to the data directory at start) names
        # localhost; the bench trusts its CA.
        rm -rf "$dir/data"
        "$PETREL" --tls "127.0.0.1:$port" --data-dir "$dir/data" --set api.bind=127.0.0.1:0 >>"$dir/broker.log" 2>&1 &
        url_port=$port
        BURL[$b]="mqtts://localhost:$port"
        BARGS[$b]="--cafile $dir/data/certs/ca.pem"
        ;;
    petrel-quic)
        # QUIC on a UDP port; the TCP listener is there to tell when the broker is up.
        local quic_port
        quic_port=$(free_port)
        rm -rf "$dir/data"
        "$PETREL" --tcp "127.0.0.1:$port" --quic "127.0.0.1:$quic_port" --data-dir "$dir/data" --set api.bind=127.0.0.1:0 \
            >>"$dir/broker.log" 2>&1 &
        url_port=$port
        BURL[$b]="quic://localhost:$quic_port"
        BARGS[$b]="--cafile $dir/data/certs/ca.pem"
        ;;
    esac
    BPID[$b]=$!
    BPORT[$b]=$url_port
    [[ $b == petrel-tls || $b == petrel-quic ]] || { BURL[$b]="mqtt://127.0.0.1:$url_port"; BARGS[$b]=""; }
    local i
    for ((i = 0; i < 100; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$url_port") 2>/dev/null; then
            sleep 0.5
            return 0
        fi
        kill -0 "${BPID[$b]}" 2>/dev/null || break
        sleep 0.1
    done
    stop_broker "$b"
    log "$b did not start; see $dir/broker.log"
    tail -5 "$dir/broker.log" >&2
    return 1
}

stop_broker() { # broker
    local pid=${BPID[$1]:-}
    [[ -n $pid ]] || return 0
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    BPID[$1]=""
}

rss_kb() { # pid -> VmRSS in kB (0 when gone)
    local k v _
    while read -r k v _; do
        [[ $k == VmRSS: ]] && { echo "$v"; return; }
    done <"/proc/$1/status" 2>/dev/null
    echo 0
}

cpu_ticks() { # pid -> utime + stime in clock ticks
    local stat rest
    stat=$(<"/proc/$1/stat") 2>/dev/null || { echo 0; return; }
    rest=${stat##*) }
    read -r -a f <<<"$rest"
    echo $((f[11] + f[12]))
}
CLK_TCK=$(getconf CLK_TCK)

# Samples the broker's VmRSS every 100 ms into a file until killed.
start_sampler() { # pid file
    (
        while kill -0 "$1" 2>/dev/null; do
            rss_kb "$1" >>"$2"
            sleep 0.1
        done
    ) &
    SAMPLER=$!
}

# ---------------------------------------------------------------- one run
run_cell() { # broker cell-name run-number bench-args...
    local b=$1 cell=$2 run=$3
    shift 3
    local pid=${BPID[$b]} url=${BURL[$b]}
    local base=$OUT/$b/$cell-$run
    local limit=$((DURATION + DRAIN + 90))
    local duration=$DURATION
    [[ $cell == conn ]] && limit=$((CONN_HOLD + 180)) && duration=$CONN_HOLD
    local rss_before ticks_before t0 t1 ticks_after rss_conn=0 rc=0
    rss_before=$(rss_kb "$pid")
    ticks_before=$(cpu_ticks "$pid")
    : >"$base.rss"
    start_sampler "$pid" "$base.rss"
    t0=$(date +%s.%N)
    # CPU per core during a storm: /proc/stat at its start and once all are connected.
    [[ $cell == conn ]] && { cat /proc/stat >"$base.stat0"; cpu_ticks "$pid" >"$base.ticks0"; }
    # shellcheck disable=SC2086
    timeout --kill-after=5 "$limit" "$PETREL" bench -u "$url" ${BARGS[$b]} -V "$PROTO" \
        --size "$SIZE" --duration "$duration" --drain "$DRAIN" --json "$@" \
        >"$base.json" 2>"$base.err" &
    BENCH_PID=$!
    local bench=$BENCH_PID
    if [[ $cell == conn ]]; then
        # Idle RSS: 1 s after the bench says every client is connected and holding.
        while kill -0 "$bench" 2>/dev/null && ! grep -q 'holding them' "$base.err"; do sleep 0.1; done
        cat /proc/stat >"$base.stat1"
        cpu_ticks "$pid" >"$base.ticks1"
        date +%s.%N >"$base.t1"
        sleep 1
        rss_conn=$(rss_kb "$pid")
    fi
    wait "$bench" || rc=$?
    BENCH_PID=""
    t1=$(date +%s.%N)
    ticks_after=$(cpu_ticks "$pid")
    kill "$SAMPLER" 2>/dev/null || true
    wait "$SAMPLER" 2>/dev/null || true
    SAMPLER=""
    local alive=1
    kill -0 "$pid" 2>/dev/null || alive=0
    BROKER=$b CELL=$cell RUN=$run RC=$rc ALIVE=$alive RSS_BEFORE=$rss_before RSS_CONN=$rss_conn \
        TICKS=$((ticks_after - ticks_before)) CLK_TCK=$CLK_TCK T0=$t0 T1=$t1 \
        ARGS="$*" BASE=$base python3 - >>"$RESULTS" <<'EOF'
import json, os
base = os.environ["BASE"]
rec = {"broker": os.environ["BROKER"], "cell": os.environ["CELL"], "run": int(os.environ["RUN"]),
       "args": os.environ["ARGS"], "exit": int(os.environ["RC"]),
       "broker_alive": os.environ["ALIVE"] == "1"}
wall = float(os.environ["T1"]) - float(os.environ["T0"])
rec["broker_cpu_percent"] = round(int(os.environ["TICKS"]) / int(os.environ["CLK_TCK"]) / wall * 100, 1)
rss = [int(x) for x in open(base + ".rss").read().split() if x.strip()]
rec["rss_before_kb"] = int(os.environ["RSS_BEFORE"])
rec["rss_max_kb"] = max(rss + [rec["rss_before_kb"]])
if os.environ["CELL"] == "conn":
    rec["rss_conn_kb"] = int(os.environ["RSS_CONN"])
    # The storm (start to all connected): each core's busy share (the whole machine: the
    # bench shares the cores) and the broker's CPU (% of one core).
    def cores(path):
        out = []
        for line in open(path):
            f = line.split()
            if f[0].startswith("cpu") and f[0] != "cpu":
                v = [int(x) for x in f[1:]]
                out.append((sum(v) - v[3] - v[4], sum(v)))
        return out
    try:
        c0, c1 = cores(base + ".stat0"), cores(base + ".stat1")
        rec["storm_core_busy_pct"] = [round(100.0 * (b1 - b0) / max(1, a1 - a0), 1)
                                      for (b0, a0), (b1, a1) in zip(c0, c1)]
        storm = float(open(base + ".t1").read()) - float(os.environ["T0"])
        ticks = int(open(base + ".ticks1").read()) - int(open(base + ".ticks0").read())
        rec["storm_broker_cpu_percent"] = round(ticks / int(os.environ["CLK_TCK"]) / storm * 100, 1)
    except (OSError, ValueError):
        pass
# Per-second progress lines ("  2.0 s  sent N (+x/s)  delivered M (+y/s)"): the median
# delivery rate over the 1 s intervals inside the publishing period is the steady rate.
# The bench's own delivered_per_sec divides everything delivered, drain included, by the
# publishing time only, which flatters a broker that queues.
ticks = []
for line in open(base + ".err", errors="replace"):
    f = line.split()
    if len(f) >= 8 and f[1] == "s" and f[2] == "sent" and f[5] == "delivered":
        try:
            ticks.append((float(f[0]), int(f[3]), int(f[6])))
        except ValueError:
            pass
rec["ticks"] = ticks
try:
    rec["bench"] = json.loads(open(base + ".json").read())
    publishing = rec["bench"]["seconds"]
    inside = [t for t in ticks if t[0] <= publishing + 0.1]
    steps = [b[2] - a[2] for a, b in zip([(0.0, 0, 0)] + inside, inside)]
    # Leave out a stalled tail (nothing delivered while a publisher waits on its last write).
    while len(steps) > 1 and steps[-1] == 0:
        steps.pop()
    if steps and rec["cell"] != "conn":
        steps.sort()
        n = len(steps)
        rec["steady_per_sec"] = steps[n // 2] if n % 2 else (steps[n // 2 - 1] + steps[n // 2]) / 2
except Exception:
    err = open(base + ".err", errors="replace").read().strip().splitlines()
    rec["error"] = (err[-1] if err else "no output") + (" (timed out)" if rec["exit"] == 124 else "")
print(json.dumps(rec))
EOF
    local summary
    summary=$(tail -1 "$RESULTS" | python3 -c '
import json, sys
r = json.load(sys.stdin)
b = r.get("bench")
if not b:
    print("FAILED:", r.get("error"))
elif r["cell"] == "conn":
    print("99%% connected in %.0f ms, failures %d, rss %d -> %d kB" % (
        b["connect_p99_ms"] or 0, b["connect_failures"], r["rss_before_kb"], r["rss_conn_kb"]))
else:
    l = b.get("latency") or {}
    print("%.0f deliveries/s (steady %s/s), lost %d, dup %d, p99 %s us, bench cpu %s%%, broker cpu %s%%, rss max %d kB" % (
        b["delivered_per_sec"], r.get("steady_per_sec"), b["lost"], b["duplicates"], l.get("p99_us"),
        b["bench_cpu_percent"], r["broker_cpu_percent"], r["rss_max_kb"]))
')
    log "$b $cell run $run: $summary"
    if [[ $alive == 0 ]]; then
        log "$b died during $cell; restarting it"
        start_broker "$b" || true
    fi
}

# ---------------------------------------------------------------- the runs
# Throughput and latency: all brokers up at once, runs interleaved broker by broker so a
# burst of other load on the machine spreads over all of them rather than one.
log "brokers: ${ACTIVE[*]}; runs $RUNS x ${DURATION}s, payload ${SIZE} B, MQTT $PROTO"
TP_CELLS=()
for c in "${ALL_CELLS[@]}"; do
    name=${c%%|*}
    [[ $name == conn ]] && continue
    selected "$name" && TP_CELLS+=("$c")
done
if [[ $REPORT_ONLY != 1 ]] && ((${#TP_CELLS[@]})); then
    for b in "${ACTIVE[@]}"; do start_broker "$b"; done
    for ((run = 1; run <= RUNS; run++)); do
        for c in "${TP_CELLS[@]}"; do
            for b in "${ACTIVE[@]}"; do
                # shellcheck disable=SC2086
                run_cell "$b" "${c%%|*}" "$run" ${c#*|}
            done
        done
    done
    for b in "${ACTIVE[@]}"; do stop_broker "$b"; done
fi

# Connection storm: a freshly started broker per run, so "RSS before" is an idle broker's.
if [[ $REPORT_ONLY != 1 ]] && selected conn; then
    CONN_ARGS=""
    for c in "${ALL_CELLS[@]}"; do [[ ${c%%|*} == conn ]] && CONN_ARGS=${c#*|}; done
    for ((run = 1; run <= RUNS; run++)); do
        for b in "${ACTIVE[@]}"; do
            start_broker "$b"
            sleep 1
            # shellcheck disable=SC2086
            run_cell "$b" conn "$run" $CONN_ARGS
            stop_broker "$b"
        done
    done
fi

# ---------------------------------------------------------------- report
export RUNS DURATION DRAIN SIZE CONNS CONN_HOLD LAT_RATE PROTO PROVISIONAL RUMQTTD_VERSION
export RUMQTTD_ERROR MOSQUITTO_ERROR OUT
export PETREL_REV MOSQUITTO_VERSION RUMQTTD_VERSION_LINE PETREL_VERSION
# shellcheck source=/dev/null
[[ -f $OUT/versions.env ]] && source "$OUT/versions.env"
export COMMAND_LINE="RUNS=$RUNS DURATION=$DURATION benches/compare.sh"
python3 "$ROOT/benches/compare_report.py" "$RESULTS" "$DOC"
log "wrote $DOC (raw results: $RESULTS)"
