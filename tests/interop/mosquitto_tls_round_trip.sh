#!/usr/bin/env bash
# mosquitto_pub / mosquitto_sub over TLS against MQTT_HOST:MQTT_TLS_PORT, trusting MQTT_CAFILE.
#
# For -V mqttv311 and -V mqttv5: mosquitto_sub --cafile -C 4 in the background (ready when it
# receives a retained probe), mosquitto_pub --cafile at QoS 0/1/2; the subscriber must exit by
# itself with the probe and the three messages in order.
# Prints "PASS mosquitto_tls_round_trip", "FAIL ...: why", or "SKIP ...: why" (env not set).
set -u

NAME=mosquitto_tls_round_trip
HOST="${MQTT_HOST:-127.0.0.1}"
if [ -z "${MQTT_TLS_PORT:-}" ] || [ -z "${MQTT_CAFILE:-}" ]; then
    echo "SKIP $NAME: set MQTT_TLS_PORT and MQTT_CAFILE to run it"
    exit 0
fi
TMPD="$(mktemp -d)"
SUB_PID=""
cleanup() {
    [ -n "$SUB_PID" ] && kill "$SUB_PID" 2>/dev/null
    rm -rf "$TMPD"
}
trap cleanup EXIT

fail() { echo "FAIL $NAME: $*"; exit 1; }

for tool in mosquitto_pub mosquitto_sub; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool not installed (apt-get install mosquitto-clients)"
done

RUN="$$-$RANDOM$RANDOM"
COMMON=(-h "$HOST" -p "$MQTT_TLS_PORT" --cafile "$MQTT_CAFILE")

for VER in mqttv311 mqttv5; do
    TOPIC="petrel/it/tls-cli/$RUN/$VER"
    OUT="$TMPD/sub-$VER.txt"
    mosquitto_pub "${COMMON[@]}" -V "$VER" -t "$TOPIC/probe" -m probe -q 1 -r \
        || fail "$VER: mosquitto_pub --cafile could not store the retained probe"
    mosquitto_sub "${COMMON[@]}" -V "$VER" -t "$TOPIC" -t "$TOPIC/probe" -q 2 -C 4 -W 10 -v \
        >"$OUT" 2>"$OUT.err" &
    SUB_PID=$!
    for _ in $(seq 1 50); do
        grep -q "^$TOPIC/probe probe" "$OUT" 2>/dev/null && break
        kill -0 "$SUB_PID" 2>/dev/null || break
        sleep 0.1
    done
    grep -q "^$TOPIC/probe probe" "$OUT" || fail "$VER: mosquitto_sub --cafile did not come up: $(cat "$OUT.err")"
    EXPECTED="$TOPIC/probe probe"
    for q in 0 1 2; do
        mosquitto_pub "${COMMON[@]}" -V "$VER" -t "$TOPIC" -q "$q" -m "tls-qos$q" \
            || fail "$VER: mosquitto_pub --cafile -q $q exited non-zero"
        EXPECTED+=$'\n'"$TOPIC tls-qos$q"
    done
    done_in_time=1
    for _ in $(seq 1 110); do
        kill -0 "$SUB_PID" 2>/dev/null || { done_in_time=0; break; }
        sleep 0.1
    done
    wait "$SUB_PID" 2>/dev/null
    SUB_PID=""
    mosquitto_pub "${COMMON[@]}" -V "$VER" -t "$TOPIC/probe" -q 1 -r -n
    [ "$done_in_time" = 0 ] || fail "$VER: mosquitto_sub -C 4 did not exit (got $(grep -c . "$OUT") lines)"
    GOT="$(cat "$OUT")"
    [ "$GOT" = "$EXPECTED" ] || fail "$VER: expected $(echo "$EXPECTED" | tr '\n' '|') got $(echo "$GOT" | tr '\n' '|')"
done

echo "PASS $NAME"
exit 0
