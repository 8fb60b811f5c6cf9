#!/usr/bin/env bash
# Run every interop script against MQTT_HOST:MQTT_PORT (default 127.0.0.1:1883).
#
#   tests/interop/run.sh                       # a broker already listens
#   MQTT_PORT=18830 BROKER_CMD='target/debug/petrel --tcp 127.0.0.1:18830 --data-dir /tmp/x' \
#       tests/interop/run.sh                   # start (and finally kill) the broker
#   tests/interop/run.sh test_will.py retained  # only some scripts (name or substring)
#
# Env: MQTT_HOST, MQTT_PORT, BROKER_CMD (run via `bash -c` in the background,
# output in $INTEROP_LOG_DIR/broker.log), BROKER_START_TIMEOUT (s, default 20),
# SCRIPT_TIMEOUT (s per script, default 90), PYTHON (default python3).
# Other transports: MQTT_TLS_PORT, MQTT_WS_PORT, MQTT_WSS_PORT and MQTT_CAFILE (the CA of
# the server certificate, e.g. <data_dir>/certs/ca.pem); the scripts for a transport whose
# variables are unset print "SKIP name: why" and count as skipped.
# test_scram.py starts a broker of its own (with a password file it writes): PETREL_BIN
# (default target/debug/petrel); it skips itself when that binary is missing.
# The dashboard (test_dashboard.py, headless Chromium): API_PORT (the broker's [api] bind
# port), DASHBOARD_USER (default admin) and DASHBOARD_PASSWORD (api.default_password).
# test_auth_backends.py starts a broker of its own (it needs an authentication chain in its
# config): PETREL_BIN (default target/debug/petrel) on a free port.
# Last line: "interop: N passed, M failed, K skipped"; exit status 1 if M > 0.
set -u

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export MQTT_HOST="${MQTT_HOST:-127.0.0.1}"
export MQTT_PORT="${MQTT_PORT:-1883}"
PYTHON="${PYTHON:-python3}"
SCRIPT_TIMEOUT="${SCRIPT_TIMEOUT:-90}"
BROKER_START_TIMEOUT="${BROKER_START_TIMEOUT:-20}"
LOG_DIR="${INTEROP_LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/petrel-interop.XXXXXX")}"
mkdir -p "$LOG_DIR"

BROKER_PID=""
cleanup() {
    if [ -n "$BROKER_PID" ] && kill -0 "$BROKER_PID" 2>/dev/null; then
        # BROKER_CMD runs in its own process group (setsid): stop the whole group.
        kill -TERM -- "-$BROKER_PID" 2>/dev/null || kill -TERM "$BROKER_PID" 2>/dev/null
        for _ in $(seq 1 30); do
            kill -0 "$BROKER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL -- "-$BROKER_PID" 2>/dev/null || kill -KILL "$BROKER_PID" 2>/dev/null
        wait "$BROKER_PID" 2>/dev/null
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_open() {  # [port], default MQTT_PORT
    "$PYTHON" - "$MQTT_HOST" "${1:-$MQTT_PORT}" <<'EOF' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.settimeout(0.5)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
except OSError:
    sys.exit(1)
s.close()
EOF
}

if [ -n "${BROKER_CMD:-}" ]; then
    if port_open; then
        echo "interop: $MQTT_HOST:$MQTT_PORT already accepts connections before BROKER_CMD started; refusing to test the wrong broker" >&2
        echo "interop: 0 passed, 1 failed"
        exit 1
    fi
    echo "starting broker: $BROKER_CMD (log: $LOG_DIR/broker.log)"
    if command -v setsid >/dev/null 2>&1; then
        setsid bash -c "exec $BROKER_CMD" >"$LOG_DIR/broker.log" 2>&1 &
    else
        bash -c "exec $BROKER_CMD" >"$LOG_DIR/broker.log" 2>&1 &
    fi
    BROKER_PID=$!
    up=0
    for _ in $(seq 1 $((BROKER_START_TIMEOUT * 10))); do
        if ! kill -0 "$BROKER_PID" 2>/dev/null; then
            break
        fi
        if port_open; then up=1; break; fi
        sleep 0.1
    done
    # The other listeners and the API bind right after the TCP one; wait for them too.
    for extra in ${MQTT_TLS_PORT:-} ${MQTT_WS_PORT:-} ${MQTT_WSS_PORT:-} ${API_PORT:-}; do
        [ "$up" = 1 ] || break
        up=0
        for _ in $(seq 1 $((BROKER_START_TIMEOUT * 10))); do
            if port_open "$extra"; then up=1; break; fi
            kill -0 "$BROKER_PID" 2>/dev/null || break
            sleep 0.1
        done
    done
    if [ "$up" != 1 ]; then
        echo "broker did not accept connections on $MQTT_HOST:$MQTT_PORT (and any MQTT_TLS/WS/WSS_PORT, API_PORT) within ${BROKER_START_TIMEOUT}s" >&2
        tail -n 30 "$LOG_DIR/broker.log" >&2
        echo "interop: 0 passed, 1 failed"
        exit 1
    fi
else
    if ! port_open; then
        echo "no broker listening on $MQTT_HOST:$MQTT_PORT (set BROKER_CMD to start one)" >&2
        echo "interop: 0 passed, 1 failed"
        exit 1
    fi
fi

if ! "$PYTHON" -c "import paho.mqtt" 2>/dev/null; then
    echo "python module paho-mqtt missing: pip install paho-mqtt" >&2
fi

SCRIPTS=()
for f in "$HERE"/test_*.py "$HERE"/mosquitto_*.sh; do
    [ -e "$f" ] || continue
    if [ $# -gt 0 ]; then
        keep=0
        for pat in "$@"; do
            case "$(basename "$f")" in *"$pat"*) keep=1 ;; esac
        done
        [ "$keep" = 1 ] || continue
    fi
    SCRIPTS+=("$f")
done

TIMEOUT_CMD=()
command -v timeout >/dev/null 2>&1 && TIMEOUT_CMD=(timeout -k 5 "$SCRIPT_TIMEOUT")

passed=0
failed=0
skipped=0
for f in "${SCRIPTS[@]}"; do
    name="$(basename "$f")"
    case "$f" in
        *.py) cmd=("$PYTHON" "$f") ;;
        *) cmd=(bash "$f") ;;
    esac
    out="$(cd "$HERE" && "${TIMEOUT_CMD[@]}" "${cmd[@]}" 2>"$LOG_DIR/$name.stderr")"
    rc=$?
    line="$(printf '%s\n' "$out" | grep -E '^(PASS|FAIL|SKIP) ' | tail -n 1)"
    if [ "$rc" = 0 ] && [ "${line#SKIP }" != "$line" ]; then
        skipped=$((skipped + 1))
        echo "$line"
    elif [ "$rc" = 0 ] && [ "${line#PASS }" != "$line" ]; then
        passed=$((passed + 1))
        echo "$line"
    else
        failed=$((failed + 1))
        if [ -n "$line" ] && [ "${line#FAIL }" != "$line" ]; then
            echo "$line"
        elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
            echo "FAIL $name: killed after ${SCRIPT_TIMEOUT}s"
        else
            echo "FAIL $name: exit $rc without a PASS line"
        fi
        if [ -s "$LOG_DIR/$name.stderr" ]; then
            sed 's/^/    stderr: /' "$LOG_DIR/$name.stderr" | tail -n 15
        fi
    fi
    if [ -n "$BROKER_PID" ] && ! kill -0 "$BROKER_PID" 2>/dev/null; then
        echo "    broker process exited during $name (see $LOG_DIR/broker.log)"
        BROKER_PID=""
    fi
done

echo "interop: $passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]
