#!/usr/bin/env python3
"""paho helper functions the users rely on: publish.single, publish.multiple,
subscribe.simple, subscribe.callback -- v3.1.1 and v5.

* publish.single(retain=True) then subscribe.simple(retained=True) returns it.
* subscribe.simple(msg_count=3, retained=False) in a thread collects 3
  messages sent by publish.single / publish.multiple (QoS 0/1/2), ignoring a
  stale retained message.
* subscribe.callback() with a callback that disconnects after 2 messages.
* v5: publish.multiple with user properties; subscribe.simple sees them.
  (subscribe.simple/callback need clean_session=None for MQTTv5.)

The helpers block (loop_forever inside), so each runs in a daemon thread
joined with a timeout; publishers repeat until the subscriber returns, so
there is no race with the helper's SUBSCRIBE.
"""
import threading
import time

import paho.mqtt.publish as publish_mod
import paho.mqtt.subscribe as subscribe_mod

from interop_common import (HOST, PORT, PROTOS, WAIT, MQTTv5, PacketTypes, Properties, check,
                            clear_retained, main, uid)


def in_thread(fn, *a, **kw):
    box = {}

    def run():
        try:
            box["result"] = fn(*a, **kw)
        except Exception as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def finished(t, box, what, timeout=WAIT):
    t.join(timeout)
    check(not t.is_alive(), f"{what}: did not return within {timeout}s")
    check("error" not in box, f"{what}: raised {box.get('error')!r}")
    return box.get("result")


def keep_publishing(t, fn, period=0.25, timeout=WAIT):
    """Call fn() repeatedly until thread t ends (bounded)."""
    deadline = time.monotonic() + timeout
    while t.is_alive() and time.monotonic() < deadline:
        fn()
        t.join(period)


def run_proto(tag, proto):
    base = f"petrel/it/helpers/{uid()}"
    common = dict(hostname=HOST, port=PORT, protocol=proto)
    sub_extra = {"clean_session": None} if proto == MQTTv5 else {}

    # 1. retained via publish.single, read by subscribe.simple (default retained=True).
    rtopic = f"{base}/retain"
    try:
        publish_mod.single(rtopic, "保留消息", qos=1, retain=True, client_id=f"ps-{tag}-{uid()}", **common)
        t, box = in_thread(subscribe_mod.simple, rtopic, qos=1, msg_count=1,
                           client_id=f"ss-{tag}-{uid()}", **common, **sub_extra)
        m = finished(t, box, f"{tag} subscribe.simple(retained)")
        check(m is not None and m.payload == "保留消息".encode() and m.retain,
              f"{tag}: subscribe.simple got {m and (m.payload, m.retain)}")

        # 2. subscribe.simple(retained=False, msg_count=3) on the same topic: the stale
        #    retained message is skipped; live messages from publish.single are collected.
        t, box = in_thread(subscribe_mod.simple, [rtopic, f"{base}/live"], qos=2, msg_count=3,
                           retained=False, client_id=f"ss2-{tag}-{uid()}", **common, **sub_extra)
        counter = iter(range(1000))

        def pub_one():
            i = next(counter)
            publish_mod.single(f"{base}/live", f"live-{i}", qos=i % 3,
                               client_id=f"ps2-{tag}-{uid()}", **common)

        keep_publishing(t, pub_one)
        msgs = finished(t, box, f"{tag} subscribe.simple(msg_count=3)")
        check(isinstance(msgs, list) and len(msgs) == 3, f"{tag}: subscribe.simple returned {msgs}")
        check(all(m.topic == f"{base}/live" and m.payload.startswith(b"live-") for m in msgs),
              f"{tag}: subscribe.simple got {[(m.topic, m.payload) for m in msgs]}")
    finally:
        clear_retained(rtopic)

    # 3. publish.multiple (+ v5 user properties) and subscribe.callback.
    #    Readiness: a retained probe is stored first; the callback seeing it means
    #    the helper's SUBSCRIBE is active, then publish.multiple runs once.
    ctopic = f"{base}/multi"
    probe = f"{ctopic}/probe"
    received = []
    ready = threading.Event()

    def on_msg(client, userdata, message):
        if message.topic == probe:
            ready.set()
            return
        received.append((message.topic, bytes(message.payload), message.qos,
                         getattr(message, "properties", None)))
        if len(received) >= 3:
            client.disconnect()

    try:
        publish_mod.single(probe, "probe", qos=1, retain=True, client_id=f"pp-{tag}-{uid()}", **common)
        t, box = in_thread(subscribe_mod.callback, on_msg, f"{ctopic}/#", qos=2,
                           client_id=f"sc-{tag}-{uid()}", **common, **sub_extra)
        check(ready.wait(WAIT), f"{tag}: subscribe.callback never received the retained probe")
    finally:
        clear_retained(probe)

    msgs = [
        {"topic": f"{ctopic}/a", "payload": "m0", "qos": 0},
        (f"{ctopic}/b", "m1", 1, False),
        {"topic": f"{ctopic}/c", "payload": "m2", "qos": 2},
    ]
    if proto == MQTTv5:
        for i, m in enumerate(msgs):
            if isinstance(m, dict):
                p = Properties(PacketTypes.PUBLISH)
                p.UserProperty = [("helper", "multiple"), ("序号", str(i))]
                m["properties"] = p
    t2, box2 = in_thread(publish_mod.multiple, msgs, client_id=f"pm-{tag}-{uid()}", **common)
    finished(t2, box2, f"{tag} publish.multiple")
    finished(t, box, f"{tag} subscribe.callback")
    check(len(received) >= 3, f"{tag}: subscribe.callback got {len(received)} messages")
    first = received[:3]
    check(sorted((tp, pl, q) for tp, pl, q, _ in first) ==
          [(f"{ctopic}/a", b"m0", 0), (f"{ctopic}/b", b"m1", 1), (f"{ctopic}/c", b"m2", 2)],
          f"{tag}: publish.multiple -> subscribe.callback got {[(a, b, c) for a, b, c, _ in first]}")
    if proto == MQTTv5:
        for tp, pl, q, props in first:
            if tp.endswith("/b"):
                continue
            up = getattr(props, "UserProperty", None)
            i = int(pl[1:])
            check(up == [("helper", "multiple"), ("序号", str(i))],
                  f"{tag}: user properties through publish.multiple: {up}")


def body():
    for tag, proto in PROTOS:
        run_proto(tag, proto)


if __name__ == "__main__":
    main("helpers_single_simple", body)
