#!/usr/bin/env bash
# The cost of security, one sitting, runs alternating:
#
# 1. Connect rate: a storm of CONNS clients (100 at a time, MQTT 3.1.1, one shared user) against
#    the broker with anonymous access, then with a password file whose hash is Mosquitto's
#    default ($7$ PBKDF2-SHA512, 101 iterations), a costly PBKDF2 (ITER iterations) and, if the
#    binary's `petrel passwd` supports it, argon2id; each password run with the verified-
#    password cache (auth.cache_ttl, default on) and without it (auth.cache_ttl = "0s").
# 2. Publish throughput with 1,000 ACL rules against none: 10 publisher/subscriber pairs,
#    QoS 1, 64-byte payloads, DURATION seconds; the matching rule is the last of the 1,000.
#
# Mosquitto (Debian's, if installed) runs the same loads beside: anonymous, its own password
# file made by `mosquitto_passwd` (the same $7$ hash as "default"), and the same ACL file.
#
#   benches/auth.sh [PETREL_BINARY]      (default target/release/petrel)
# Environment: RUNS [3], CONNS [2000], ITER [20000], DURATION [10].
set -euo pipefail
PETREL=${1:-target/release/petrel}
RUNS=${RUNS:-3}
CONNS=${CONNS:-2000}
ITER=${ITER:-20000}
DURATION=${DURATION:-10}
TMP=$(mktemp -d)
BROKER=
trap '[[ -n $BROKER ]] && kill "$BROKER" 2>/dev/null; rm -rf "$TMP"' EXIT
free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
ulimit -n 65536 2>/dev/null || true

# Password files: Mosquitto's default, a costly PBKDF2 (written with Python's hashlib, an
# implementation of our own), and argon2id when `petrel passwd --hash` knows it.
"$PETREL" passwd -c -b "$TMP/pw-default" fleet secret >/dev/null
python3 - "$TMP/pw-costly" "$ITER" <<'PY'
import base64, hashlib, os, sys
salt = os.urandom(12)
dk = hashlib.pbkdf2_hmac("sha512", b"secret", salt, int(sys.argv[2]))
with open(sys.argv[1], "w") as f:
    f.write("fleet:$7$%s$%s$%s\n" % (sys.argv[2], base64.b64encode(salt).decode(), base64.b64encode(dk).decode()))
PY
files=(default costly)
if "$PETREL" passwd --hash argon2id -c -b "$TMP/pw-argon2id" fleet secret >/dev/null 2>&1; then
    files+=(argon2id)
fi

# 1,000 ACL rules for anonymous clients; the bench's topics match only the last.
python3 - "$TMP/acl" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    for i in range(999):
        f.write("topic readwrite fleet/%d/+/telemetry\n" % i)
    f.write("topic readwrite petrel-bench/#\n")
PY

MOSQUITTO=$(command -v mosquitto || true)
[[ -z $MOSQUITTO && -x /usr/sbin/mosquitto ]] && MOSQUITTO=/usr/sbin/mosquitto
if [[ -n $MOSQUITTO ]] && command -v mosquitto_passwd >/dev/null; then
    mosquitto_passwd -c -b "$TMP/pw-mosquitto" fleet secret >/dev/null 2>&1
else
    MOSQUITTO=
fi

start_broker() { # extra --set arguments...; with MOSQ set, Mosquitto with those config lines
    if [[ -n ${MOSQ:-} ]]; then
        PORT=$(free_port)
        {
            echo "listener $PORT 127.0.0.1"
            echo "user root" # run as root, it would read no file in a 0700 temporary directory
            echo "set_tcp_nodelay true"
            echo "max_connections -1"
            printf '%s\n' "$@"
        } >"$TMP/mosquitto.conf"
        "$MOSQUITTO" -c "$TMP/mosquitto.conf" >/dev/null 2>&1 &
        BROKER=$!
        for ((i = 0; i < 100; i++)); do
            (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
            sleep 0.05
        done
        return
    fi
    PORT=$(free_port)
    rm -rf "$TMP/data"
    "$PETREL" --tcp "127.0.0.1:$PORT" --data-dir "$TMP/data" --set api.enable=false "$@" \
        >/dev/null 2>&1 &
    BROKER=$!
    for ((i = 0; i < 100; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
        sleep 0.05
    done
}
stop_broker() { kill "$BROKER" 2>/dev/null || true; wait "$BROKER" 2>/dev/null || true; BROKER=; }

storm() { # label, then broker --set arguments; the client's credentials come from CREDS
    local label=$1 out
    shift
    start_broker "$@"
    # shellcheck disable=SC2086
    out=$("$PETREL" bench --scenario conn -u "mqtt://127.0.0.1:$PORT" -V 311 --pubs "$CONNS" \
        --connect-concurrency 100 --duration 1 --json --quiet $CREDS 2>/dev/null || true)
    stop_broker
    OUT=$out LABEL=$label CONNS=$CONNS python3 -c '
import json, os
try:
    b = json.loads(os.environ["OUT"])
except ValueError:
    print("%-34s bench failed" % os.environ["LABEL"]); raise SystemExit
n = int(os.environ["CONNS"]) - b["connect_failures"]
ms = b["connect_all_ms"] or 0
print("%-34s %6d connected in %8.1f ms: %8.0f connects/s (p99 %.1f ms), %d failed" % (
    os.environ["LABEL"], n, ms, n / (ms / 1000) if ms else 0, b["connect_p99_ms"] or 0,
    b["connect_failures"]))'
}

throughput() { # label, then broker --set arguments
    local label=$1 out
    shift
    start_broker "$@"
    out=$("$PETREL" bench --scenario p2p -u "mqtt://127.0.0.1:$PORT" -V 311 --pubs 10 -q 1 \
        --size 64 --duration "$DURATION" --drain 3 --json --quiet 2>/dev/null || true)
    stop_broker
    OUT=$out LABEL=$label python3 -c '
import json, os
try:
    b = json.loads(os.environ["OUT"])
except ValueError:
    print("%-34s bench failed" % os.environ["LABEL"]); raise SystemExit
print("%-34s %9.0f msg/s delivered, lost %d" % (os.environ["LABEL"], b["delivered_per_sec"], b["lost"]))'
}

echo "== connect storm: $CONNS clients, 100 at a time, one user ($RUNS runs)"
for ((run = 1; run <= RUNS; run++)); do
    CREDS="" storm "anonymous" --set auth.allow_anonymous=true
    for f in "${files[@]}"; do
        CREDS="--username fleet --password secret" \
            storm "$f, cache on" --set "auth.password_file=$TMP/pw-$f"
        CREDS="--username fleet --password secret" \
            storm "$f, cache off" --set "auth.password_file=$TMP/pw-$f" --set auth.cache_ttl=0s
    done
    if [[ -n $MOSQUITTO ]]; then
        CREDS="" MOSQ=1 storm "mosquitto anonymous" "allow_anonymous true"
        CREDS="--username fleet --password secret" MOSQ=1 \
            storm "mosquitto password_file" "allow_anonymous false" "password_file $TMP/pw-mosquitto"
    fi
done

echo "== p2p 10 pairs QoS 1, 64 B, ${DURATION} s: no ACL against 1,000 rules ($RUNS runs)"
for ((run = 1; run <= RUNS; run++)); do
    throughput "no ACL"
    throughput "1,000 ACL rules" --set "auth.acl_file=$TMP/acl"
    if [[ -n $MOSQUITTO ]]; then
        MOSQ=1 throughput "mosquitto no ACL" "allow_anonymous true" "max_queued_messages 1000000"
        MOSQ=1 throughput "mosquitto 1,000 ACL rules" "allow_anonymous true" \
            "max_queued_messages 1000000" "acl_file $TMP/acl"
    fi
done
