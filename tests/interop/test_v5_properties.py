#!/usr/bin/env python3
"""MQTT v5 PUBLISH properties pass through the broker unchanged.

Publisher sets, via Properties(PacketTypes.PUBLISH): several User Property
pairs (repeated keys, unicode keys/values, empty value) in a given order,
Content Type, Response Topic, Correlation Data (binary), Payload Format
Indicator and Message Expiry Interval.  The subscriber must see the user
properties in the same order with the same values, the other properties
unchanged, and the Message Expiry Interval present and not larger than sent.
Checked for QoS 0/1/2 and for a retained message delivered on subscribe.
A message without properties arrives without user properties.
"""
from interop_common import (MQTTv5, Collector, PacketTypes, Properties, check, clear_retained,
                            close, connect, main, new_client, publish, subscribe, uid)

USER_PROPS = [
    ("source", "sensor-1"),
    ("k", "v1"),
    ("k", "v2"),          # repeated key, order must be kept
    ("名字", "温度 ✓ 🌡"),  # unicode key and value
    ("empty", ""),
    ("k", "v3"),
]
CORR = b"\x00\x01\xfe\xff corr-\xe4\xb8\xad"


def make_props(i):
    p = Properties(PacketTypes.PUBLISH)
    p.UserProperty = list(USER_PROPS) + [("seq", str(i))]
    p.ContentType = "application/json; charset=utf-8"
    p.ResponseTopic = "petrel/it/reply/回复"
    p.CorrelationData = CORR + bytes([i])
    p.PayloadFormatIndicator = 1
    p.MessageExpiryInterval = 3600
    return p


def verify(m, i, what):
    check(m.props is not None, f"{what}: no properties on the received message")
    up = m.prop("UserProperty")
    want = list(USER_PROPS) + [("seq", str(i))]
    check(up == want, f"{what}: user properties changed: got {up}, want {want}")
    check(m.prop("ContentType") == "application/json; charset=utf-8",
          f"{what}: ContentType {m.prop('ContentType')!r}")
    check(m.prop("ResponseTopic") == "petrel/it/reply/回复",
          f"{what}: ResponseTopic {m.prop('ResponseTopic')!r}")
    check(m.prop("CorrelationData") == CORR + bytes([i]),
          f"{what}: CorrelationData {m.prop('CorrelationData')!r}")
    check(m.prop("PayloadFormatIndicator") == 1,
          f"{what}: PayloadFormatIndicator {m.prop('PayloadFormatIndicator')!r}")
    exp = m.prop("MessageExpiryInterval")
    check(exp is not None and 0 < exp <= 3600, f"{what}: MessageExpiryInterval {exp!r}")


def body():
    base = f"petrel/it/props/{uid()}"
    topic = f"{base}/data"
    sub = new_client(f"psub-{uid()}", MQTTv5)
    col = Collector().attach(sub)
    connect(sub, col, what="subscriber")
    subscribe(sub, col, f"{base}/#", 2, what="subscriber")

    pub = new_client(f"ppub-{uid()}", MQTTv5)
    pcol = Collector().attach(pub)
    connect(pub, pcol, what="publisher")
    try:
        for q in (0, 1, 2):
            publish(pub, topic, '{"temp": 21.5, "单位": "℃"}', qos=q, properties=make_props(q))
        publish(pub, f"{base}/plain", b"no-props", qos=1)
        got = col.wait_messages(4)
        check(len(got) == 4, f"received {len(got)} of 4 messages")
        by_seq = {}
        for m in got:
            if m.topic == topic:
                seq = int(dict(m.prop("UserProperty") or []).get("seq", -1))
                by_seq[seq] = m
        for q in (0, 1, 2):
            check(q in by_seq, f"QoS {q} message missing or lost its 'seq' user property")
            verify(by_seq[q], q, f"QoS {q}")
            check(by_seq[q].payload.decode() == '{"temp": 21.5, "单位": "℃"}', f"QoS {q}: payload changed")
        plain = [m for m in got if m.topic == f"{base}/plain"][0]
        check(not plain.prop("UserProperty"), f"plain message got user properties {plain.prop('UserProperty')}")
        check(plain.prop("ContentType") is None, "plain message got a ContentType")

        # Retained message keeps its properties when delivered to a new subscriber.
        rtopic = f"{base}/retained"
        publish(pub, rtopic, "retained-with-props", qos=1, retain=True, properties=make_props(9))
        late = new_client(f"plate-{uid()}", MQTTv5)
        lcol = Collector().attach(late)
        connect(late, lcol, what="late subscriber")
        subscribe(late, lcol, rtopic, 1, what="late subscriber")
        got = lcol.wait_messages(1)
        check(len(got) == 1 and got[0].retain == 1, f"late subscriber: retained message not delivered: {got}")
        verify(got[0], 9, "retained")
        close(late)
    finally:
        clear_retained(f"{base}/retained")
        close(pub)
        close(sub)


if __name__ == "__main__":
    main("v5_properties", body)
