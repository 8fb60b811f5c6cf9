#!/usr/bin/env python3
"""Will (last will and testament) messages, v3.1.1 and v5.

* A sets will_set(topic, "遗嘱消息", qos=1); its TCP connection is then killed
  without DISCONNECT (network loop stopped, socket shutdown()+close()):
  subscriber B receives the will (payload, QoS).
* A retained will is stored as a retained message.
* A client whose connection goes silent (no PINGREQ) is dropped after 1.5x
  keepalive and its will is published.
* A normal disconnect() does NOT publish the will.
* v5: will properties (user property, content type) pass through.
"""
import os
import time

from interop_common import (PROTOS, WAIT, Collector, MQTTv5, PacketTypes, Properties, check,
                            clear_retained, close, connect, drop, main, new_client, subscribe,
                            uid)

KEEPALIVE_WAIT = float(os.environ.get("INTEROP_KEEPALIVE_WAIT", "12"))


def will_client(tag, proto, topic, payload, qos=1, retain=False, properties=None, keepalive=30):
    a = new_client(f"will-{tag}-{uid()}", proto)
    a.will_set(topic, payload, qos=qos, retain=retain, properties=properties)
    acol = Collector().attach(a)
    connect(a, acol, keepalive=keepalive, what=f"{tag} will client")
    return a


def run_proto(tag, proto):
    base = f"petrel/it/will/{uid()}"
    b = new_client(f"wsub-{tag}-{uid()}", proto)
    bcol = Collector().attach(b)
    connect(b, bcol, what=f"{tag} subscriber B")
    subscribe(b, bcol, f"{base}/#", 2, what=f"{tag} subscriber B")

    # 1. Abrupt close -> will published.
    t1 = f"{base}/abrupt"
    props = None
    if proto == MQTTv5:
        props = Properties(PacketTypes.WILLMESSAGE)
        props.UserProperty = [("device", "A"), ("原因", "掉电")]
        props.ContentType = "text/plain"
    a = will_client(tag, proto, t1, "遗嘱消息", qos=1, properties=props)
    drop(a)
    got = bcol.wait_messages(1, topic=t1)
    check(len(got) == 1, f"{tag}: no will received within {WAIT}s after abrupt close")
    m = got[0]
    check(m.payload == "遗嘱消息".encode(), f"{tag}: will payload {m.payload!r}")
    check(m.qos == 1, f"{tag}: will delivered at QoS {m.qos}, expected 1")
    check(m.retain == 0, f"{tag}: non-retained will delivered with retain=1")
    if proto == MQTTv5:
        up = m.prop("UserProperty")
        check(up == [("device", "A"), ("原因", "掉电")], f"{tag}: will user properties {up}")
        check(m.prop("ContentType") == "text/plain", f"{tag}: will content type {m.prop('ContentType')}")

    # 2. Retained will -> stored as retained message.
    t2 = f"{base}/retained"
    try:
        a2 = will_client(tag, proto, t2, b"offline", qos=1, retain=True)
        drop(a2)
        got = bcol.wait_messages(1, topic=t2)
        check(len(got) == 1 and got[0].payload == b"offline",
              f"{tag}: retained will not delivered: {got}")
        c = new_client(f"wlate-{tag}-{uid()}", proto)
        ccol = Collector().attach(c)
        connect(c, ccol, what=f"{tag} late subscriber")
        subscribe(c, ccol, t2, 1, what=f"{tag} late subscriber")
        got = ccol.wait_messages(1)
        check(len(got) == 1 and got[0].payload == b"offline" and got[0].retain == 1,
              f"{tag}: retained will not kept as retained message: {got}")
        close(c)
    finally:
        clear_retained(t2)

    # 3. Keepalive expiry -> will published (client stops its loop but keeps the socket open).
    t3 = f"{base}/keepalive"
    a3 = will_client(tag, proto, t3, b"silent", qos=0, keepalive=1)
    a3.loop_stop()  # no more PINGREQs; socket stays open
    start = time.monotonic()
    # Spec: 1.5 x keepalive = 1.5 s.  Mosquitto checks keepalives on a coarse
    # tick and takes up to ~7 s, hence the generous bound.
    got = bcol.wait_messages(1, timeout=KEEPALIVE_WAIT, topic=t3)
    check(len(got) == 1 and got[0].payload == b"silent",
          f"{tag}: no will after keepalive=1 expiry within {KEEPALIVE_WAIT}s")
    elapsed = time.monotonic() - start
    check(elapsed >= 0.5, f"{tag}: keepalive will published too early ({elapsed:.2f}s)")
    try:
        a3.socket().close()
    except Exception:
        pass

    # 4. Normal disconnect -> no will.
    t4 = f"{base}/normal"
    a4 = will_client(tag, proto, t4, b"must-not-arrive", qos=1)
    close(a4)
    got = bcol.quiet(1.5, topic=t4)
    check(got == [], f"{tag}: will published after a normal DISCONNECT: {got}")

    close(b)


def body():
    for tag, proto in PROTOS:
        run_proto(tag, proto)


if __name__ == "__main__":
    main("will", body)
