#!/usr/bin/env python3
"""Retained messages, v3.1.1 and v5.

* a retained message is delivered to a later subscriber with retain=1 and the
  QoS min(publish, subscription);
* a newer retained message replaces the old one (only the last is kept);
* a live subscriber gets the retained publish with retain=0 (v3.1.1 rule; v5
  with the default Retain As Published = 0);
* wildcard subscriptions receive matching retained messages;
* an empty retained payload clears it: a subscriber after the clear gets nothing.
"""
from interop_common import (PROTOS, Collector, check, clear_retained, close, connect, main,
                            new_client, publish, subscribe, uid)


def fresh_sub(tag, proto, topic, qos=1):
    c = new_client(f"rsub-{tag}-{uid()}", proto)
    col = Collector().attach(c)
    connect(c, col, what=f"{tag} subscriber")
    subscribe(c, col, topic, qos, what=f"{tag} subscriber")
    return c, col


def run_proto(tag, proto):
    base = f"petrel/it/retain/{uid()}"
    topic = f"{base}/state"
    pub = new_client(f"rpub-{tag}-{uid()}", proto)
    pcol = Collector().attach(pub)
    connect(pub, pcol, use_async=True, what=f"{tag} publisher")
    try:
        # Live subscriber, present before the retained publish.
        live, lcol = fresh_sub(tag, proto, topic, qos=1)

        publish(pub, topic, "保留消息 old", qos=1, retain=True)
        publish(pub, topic, "保留消息 new", qos=1, retain=True)

        got = lcol.wait_messages(2)
        check(len(got) == 2, f"{tag}: live subscriber got {len(got)} of 2 retained publishes")
        check(all(m.retain == 0 for m in got),
              f"{tag}: live subscriber got retain=1 (must be 0 for an established subscription)")

        # Later subscriber: only the newest retained message, retain flag set.
        s1, c1 = fresh_sub(tag, proto, topic, qos=1)
        got = c1.wait_messages(1)
        got = c1.quiet(0.5)
        check(len(got) == 1, f"{tag}: later subscriber expected 1 retained message, got {got}")
        m = got[0]
        check(m.payload == "保留消息 new".encode(), f"{tag}: retained payload {m.payload!r}")
        check(m.retain == 1, f"{tag}: retained message delivered with retain=0")
        check(m.qos == 1, f"{tag}: retained message delivered at QoS {m.qos}, expected 1")
        close(s1)

        # QoS downgrade of the retained message + wildcard match.
        s2, c2 = fresh_sub(tag, proto, f"{base}/#", qos=0)
        got = c2.wait_messages(1)
        check(len(got) == 1 and got[0].qos == 0 and got[0].retain == 1,
              f"{tag}: wildcard QoS0 subscriber got {got}")
        close(s2)

        # Clear with an empty retained payload.
        publish(pub, topic, b"", qos=1, retain=True)
        got = lcol.wait_messages(3)
        check(len(got) == 3 and got[2].payload == b"",
              f"{tag}: live subscriber did not get the empty retained publish: {got}")
        s3, c3 = fresh_sub(tag, proto, topic, qos=1)
        got = c3.quiet()
        check(got == [], f"{tag}: subscriber after the clear still got {got}")
        close(s3)
        s4, c4 = fresh_sub(tag, proto, f"{base}/+", qos=1)
        got = c4.quiet()
        check(got == [], f"{tag}: wildcard subscriber after the clear still got {got}")
        close(s4)
        close(live)
    finally:
        close(pub)
        clear_retained(topic)


def body():
    for tag, proto in PROTOS:
        run_proto(tag, proto)


if __name__ == "__main__":
    main("retained", body)
