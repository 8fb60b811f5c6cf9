#!/usr/bin/env python3
"""Resource limits at their defaults, as paho-mqtt (MQTT 5) meets them.

* mqtt.max_user_properties (128): a PUBLISH with 128 User Properties is delivered with all
  of them; one with 129 gets DISCONNECT 0x97 Quota exceeded.
* mqtt.max_topic_alias_bytes (64 KiB): a client defining a new Topic Alias for a 1 KiB topic
  with every PUBLISH is disconnected with 0x97 after ~62 of them (each alias costs its topic
  plus 32 bytes), far below its Topic Alias Maximum of 65535.
* Overlapping subscriptions with the same Subscription Identifier: one delivery, carrying
  the identifier once.
"""
from interop_common import (MQTTv5, Collector, PacketTypes, Properties, check, close, connect,
                            main, new_client, publish, subscribe, uid)

QUOTA_EXCEEDED = 0x97


def user_props(n):
    p = Properties(PacketTypes.PUBLISH)
    p.UserProperty = [(f"k{i}", "v") for i in range(n)]
    return p


def user_properties(base):
    sub = new_client(f"lsub-{uid()}", MQTTv5)
    col = Collector().attach(sub)
    connect(sub, col, what="subscriber")
    subscribe(sub, col, f"{base}/#", 1, what="subscriber")
    pub = new_client(f"lpub-{uid()}", MQTTv5)
    pcol = Collector().attach(pub)
    connect(pub, pcol, what="publisher")
    try:
        publish(pub, f"{base}/ok", b"x", qos=1, properties=user_props(128))
        got = col.wait_messages(1)
        check(len(got) == 1, "the message with 128 user properties did not arrive")
        check(len(got[0].prop("UserProperty") or []) == 128,
              f"user properties: {len(got[0].prop('UserProperty') or [])} of 128 arrived")
        pub.publish(f"{base}/too-many", b"x", qos=0, properties=user_props(129))
        check(pcol.wait(lambda: pcol.disconnects), "129 user properties: not disconnected")
        check(pcol.disconnects[0] == QUOTA_EXCEEDED,
              f"129 user properties: DISCONNECT {pcol.disconnects[0]:#x}, want 0x97")
        check(not col.quiet(topic=f"{base}/too-many"), "the message with 129 user properties was routed")
    finally:
        close(pub)
        close(sub)


def alias_flood(base):
    c = new_client(f"lalias-{uid()}", MQTTv5)
    col = Collector().attach(c)
    _, props = connect(c, col, what="alias client")
    maximum = getattr(props, "TopicAliasMaximum", 0) if props is not None else 0
    check(maximum == 65535, f"Topic Alias Maximum {maximum}, want 65535")
    try:
        sent = 0
        for alias in range(1, 1001):
            p = Properties(PacketTypes.PUBLISH)
            p.TopicAlias = alias
            topic = f"{base}/{alias:05d}/" + "a" * 1000
            info = c.publish(topic, b"x", qos=0, properties=p)
            if info.rc != 0 or col.disconnects:
                break
            sent += 1
            if alias % 16 == 0 and col.wait(lambda: col.disconnects, timeout=0.05):
                break
        check(col.wait(lambda: col.disconnects), f"not disconnected after {sent} aliases")
        check(col.disconnects[0] == QUOTA_EXCEEDED,
              f"alias flood: DISCONNECT {col.disconnects[0]:#x}, want 0x97")
        check(sent < 200, f"{sent} aliases of 1 KiB were accepted")
    finally:
        close(c)


def subscription_identifiers(base):
    sub = new_client(f"lsid-{uid()}", MQTTv5)
    col = Collector().attach(sub)
    connect(sub, col, what="subscriber")
    pub = new_client(f"lsidp-{uid()}", MQTTv5)
    pcol = Collector().attach(pub)
    connect(pub, pcol, what="publisher")
    try:
        for flt in (f"{base}/#", f"{base}/+"):
            p = Properties(PacketTypes.SUBSCRIBE)
            p.SubscriptionIdentifier = 7
            subscribe(sub, col, flt, 0, properties=p, what="subscriber")
        publish(pub, f"{base}/x", b"once", qos=1)
        got = col.wait_messages(1)
        check(len(got) == 1, "the message did not arrive")
        check(len(col.quiet()) == 1, f"more than one delivery: {col.msgs()}")
        ids = got[0].prop("SubscriptionIdentifier")
        check(ids == [7], f"subscription identifiers {ids}, want [7]")
    finally:
        close(pub)
        close(sub)


def body():
    base = f"petrel/it/limits/{uid()}"
    user_properties(f"{base}/up")
    alias_flood(f"{base}/alias")
    subscription_identifiers(f"{base}/sid")


if __name__ == "__main__":
    main("test_limits", body)
