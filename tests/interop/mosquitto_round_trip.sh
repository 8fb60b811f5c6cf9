#!/usr/bin/env bash
# mosquitto_pub / mosquitto_sub round trip against MQTT_HOST:MQTT_PORT.
#
# For -V mqttv311 and -V mqttv5:
#   * mosquitto_sub -C 7 -W 10 -q 2 -v in the background (readiness signalled
#     by a retained probe message = message 1); mosquitto_pub sends two messages
#     each at QoS 0/1/2 (one of them UTF-8); the subscriber must exit by itself
#     with exactly the probe + those 6 lines, in order;
#   * retained: mosquitto_pub -r, a later mosquitto_sub -C 1 gets it (and
#     -F %r shows retain=1), mosquitto_pub -r -n clears it, a later
#     mosquitto_sub -W 2 gets nothing;
#   * persistent session: mosquitto_sub -c -E (v5: -x 300) creates it, QoS 1/2
#     messages are published offline, mosquitto_sub -c -C 2 gets both;
#   * v5 only: a user property set with mosquitto_pub -D publish user-property
#     comes out in mosquitto_sub -F %P.
# Prints "PASS mosquitto_round_trip" or "FAIL mosquitto_round_trip: why"; exit 0/1.
set -u

NAME=mosquitto_round_trip
HOST="${MQTT_HOST:-127.0.0.1}"
PORT="${MQTT_PORT:-1883}"
TMPD="$(mktemp -d)"
SUB_PIDS=()
cleanup() {
    local p
    for p in "${SUB_PIDS[@]}"; do kill "$p" 2>/dev/null; done
    rm -rf "$TMPD"
}
trap cleanup EXIT

fail() { echo "FAIL $NAME: $*"; exit 1; }

for tool in mosquitto_pub mosquitto_sub; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool not installed (apt-get install mosquitto-clients)"
done

RUN="$$-$RANDOM$RANDOM"
COMMON=(-h "$HOST" -p "$PORT")

# Start a subscriber in the background and wait until it is subscribed.
# mosquitto_sub has no "subscribed" signal, so a *retained* probe is stored on
# "$topic/probe" first: the subscriber receives it exactly once, right after
# its SUBSCRIBE has been processed (so -C counts it as exactly one message).
start_sub() {  # out_file version topic count timeout
    local out=$1 ver=$2 topic=$3 count=$4 wait=$5
    mosquitto_pub "${COMMON[@]}" -V "$ver" -t "$topic/probe" -m probe -q 1 -r \
        || fail "$ver: could not store the retained probe"
    mosquitto_sub "${COMMON[@]}" -V "$ver" -i "sub-$RUN-$RANDOM" -t "$topic" -t "$topic/probe" \
        -q 2 -C "$count" -W "$wait" -v >"$out" 2>"$out.err" &
    SUB_PIDS+=($!)
    LAST_SUB=$!
    local i
    for i in $(seq 1 50); do
        grep -q "^$topic/probe probe" "$out" 2>/dev/null && return 0
        kill -0 "$LAST_SUB" 2>/dev/null || break
        sleep 0.1
    done
    mosquitto_pub "${COMMON[@]}" -V "$ver" -t "$topic/probe" -q 1 -r -n
    fail "$ver: mosquitto_sub did not come up: $(cat "$out.err" 2>/dev/null)"
}

wait_pid() {  # pid timeout_s -> 0 if exited in time
    local pid=$1 t=$2 i
    for i in $(seq 1 $((t * 10))); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
        sleep 0.1
    done
    return 1
}

for VER in mqttv311 mqttv5; do
    TOPIC="petrel/it/cli/$RUN/$VER"
    OUT="$TMPD/sub-$VER.txt"

    # ---- QoS 0/1/2 round trip: sub -C 7 (probe + 6) -W 10 -------------
    start_sub "$OUT" "$VER" "$TOPIC" 7 10
    EXPECTED="$TOPIC/probe probe"$'\n'
    for q in 0 1 2; do
        for i in 1 2; do
            msg="qos$q-msg$i-$VER"
            [ "$i" = 2 ] && msg="$msg-保存会话✓"
            mosquitto_pub "${COMMON[@]}" -V "$VER" -i "pub-$RUN-$RANDOM" -t "$TOPIC" -q "$q" -m "$msg" \
                || fail "$VER: mosquitto_pub -q $q exited non-zero"
            EXPECTED+="$TOPIC $msg"$'\n'
        done
    done
    wait_pid "$LAST_SUB" 11
    SUB_DONE=$?
    # clear the retained probe only now (clearing is itself delivered to subscribers)
    mosquitto_pub "${COMMON[@]}" -V "$VER" -t "$TOPIC/probe" -q 1 -r -n
    [ "$SUB_DONE" = 0 ] || fail "$VER: mosquitto_sub -C 7 did not exit (got $(grep -c . "$OUT") lines)"
    GOT="$(cat "$OUT")"
    [ "$GOT" = "${EXPECTED%$'\n'}" ] || fail "$VER: subscriber output mismatch; expected: $(echo "$EXPECTED" | tr '\n' '|') got: $(echo "$GOT" | tr '\n' '|')"

    # ---- persistent session via the CLI: -c (clean session off) -E ------
    CID="sess-$RUN-$VER"
    ST="$TOPIC/session"
    SX=(); [ "$VER" = mqttv5 ] && SX=(-x 300)   # v5: Session Expiry Interval
    mosquitto_sub "${COMMON[@]}" -V "$VER" -i "$CID" -c "${SX[@]}" -t "$ST" -q 1 -E -W 5 \
        || fail "$VER: mosquitto_sub -c -E (create session) failed"
    mosquitto_pub "${COMMON[@]}" -V "$VER" -t "$ST" -q 1 -m off1 || fail "$VER: offline pub 1"
    mosquitto_pub "${COMMON[@]}" -V "$VER" -t "$ST" -q 2 -m off2 || fail "$VER: offline pub 2"
    R="$(mosquitto_sub "${COMMON[@]}" -V "$VER" -i "$CID" -c "${SX[@]}" -t "$ST" -q 1 -C 2 -W 5 2>&1 | tr '\n' ' ')"
    [ "$R" = "off1 off2 " ] || fail "$VER: persistent session (mosquitto_sub -c) offline messages: got '$R'"
    # drop the session
    mosquitto_sub "${COMMON[@]}" -V "$VER" -i "$CID" -t "$ST" -E -W 5 >/dev/null 2>&1

    # ---- retained --------------------------------------------------------
    RT="$TOPIC/retained"
    mosquitto_pub "${COMMON[@]}" -V "$VER" -t "$RT" -q 1 -r -m "保留消息-$VER" || fail "$VER: retained pub"
    R="$(mosquitto_sub "${COMMON[@]}" -V "$VER" -t "$RT" -q 1 -C 1 -W 5 -F '%r %t %p' 2>&1)"
    [ "$R" = "1 $RT 保留消息-$VER" ] || fail "$VER: retained message to a later subscriber: got '$R'"
    mosquitto_pub "${COMMON[@]}" -V "$VER" -t "$RT" -q 1 -r -n || fail "$VER: clearing retained pub"
    R="$(mosquitto_sub "${COMMON[@]}" -V "$VER" -t "$RT" -q 1 -C 1 -W 2 -F '%r %t %p' 2>/dev/null)"
    [ -z "$R" ] || fail "$VER: retained message not cleared by an empty retained payload: got '$R'"

    # ---- v5 user property ------------------------------------------------
    if [ "$VER" = mqttv5 ]; then
        PT="$TOPIC/props"
        mosquitto_pub "${COMMON[@]}" -V mqttv5 -t "$PT" -q 1 -r -m props \
            -D publish user-property region 华东 -D publish content-type text/plain \
            || fail "v5: pub with properties"
        R="$(mosquitto_sub "${COMMON[@]}" -V mqttv5 -t "$PT" -q 1 -C 1 -W 5 -F '%P|%C|%p' 2>&1)"
        mosquitto_pub "${COMMON[@]}" -V mqttv5 -t "$PT" -q 1 -r -n
        [ "$R" = "region:华东|text/plain|props" ] || fail "v5: properties via mosquitto_sub -F: got '$R'"
    fi
done

echo "PASS $NAME"
exit 0
