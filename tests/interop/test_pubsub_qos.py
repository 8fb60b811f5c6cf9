#!/usr/bin/env python3
"""Basic pub/sub round trip at QoS 0/1/2, v3.1.1 and v5.

Subscriber: connect_async + loop_forever() in a thread (the users' pattern),
subscribes from on_connect.  Publisher: connect_async + loop_start().
Checks: every message arrives exactly once, payload intact (incl. UTF-8 and
binary), delivered QoS = min(publish QoS, subscription QoS), wildcards + and #
match, and a QoS 1 subscription downgrades a QoS 2 publish.
"""
import threading

from interop_common import (PROTOS, WAIT, Collector, check, close, connect, main, new_client,
                            publish, uid)


def run_proto(tag, proto):
    base = f"petrel/it/pubsub/{uid()}"
    sub = new_client(f"sub-{tag}-{uid()}", proto)
    col = Collector().attach(sub)
    subscribed = threading.Event()
    sub_errors = []

    # Subscribe from on_connect, like the users do with connect_async + loop_forever.
    def on_connect(client, userdata, flags, rc, properties=None):
        col.on_connect(client, userdata, flags, rc, properties)
        if col.connacks[-1][1] != 0:
            return
        res, mid1 = client.subscribe(f"{base}/exact", 2)
        res2, mid2 = client.subscribe([(f"{base}/plus/+/x", 2), (f"{base}/hash/#", 2),
                                       (f"{base}/q1", 1)])
        if res or res2:
            sub_errors.append((res, res2))
        userdata_mids.update({mid1, mid2})

    userdata_mids = set()

    def on_subscribe(client, userdata, mid, granted, properties=None):
        col.on_subscribe(client, userdata, mid, granted, properties)
        if userdata_mids and all(any(m == x for m, _ in col.subacks) for x in userdata_mids):
            subscribed.set()

    sub.on_connect = on_connect
    sub.on_subscribe = on_subscribe
    connect(sub, col, what=f"{tag} subscriber", use_async=True, loop="forever")
    check(subscribed.wait(WAIT), f"{tag}: subscriber did not get all SUBACKs")
    check(not sub_errors, f"{tag}: subscribe() errors {sub_errors}")
    for mid, granted in col.subacks:
        check(all(g in (0, 1, 2) for g in granted), f"{tag}: bad SUBACK granted {granted}")
    check(sorted(g for _, gs in col.subacks for g in gs) == [1, 2, 2, 2],
          f"{tag}: granted QoS {[g for _, g in col.subacks]} != 2,2,2,1")

    pub = new_client(f"pub-{tag}-{uid()}", proto)
    pcol = Collector().attach(pub)
    connect(pub, pcol, what=f"{tag} publisher", use_async=True, loop="start")

    sent = []  # (topic, payload, expected qos)
    for q in (0, 1, 2):
        for i in range(3):
            payload = f"{tag} q{q} #{i} 保存会话 ✓".encode()
            publish(pub, f"{base}/exact", payload, qos=q)
            sent.append((f"{base}/exact", payload, q))
    binary = bytes(range(256))
    publish(pub, f"{base}/exact", binary, qos=1)
    sent.append((f"{base}/exact", binary, 1))
    publish(pub, f"{base}/exact", b"", qos=1)  # empty (non-retained) payload is a normal message
    sent.append((f"{base}/exact", b"", 1))
    publish(pub, f"{base}/plus/abc/x", b"plus", qos=2)
    sent.append((f"{base}/plus/abc/x", b"plus", 2))
    publish(pub, f"{base}/plus/abc/y", b"no-match", qos=2)  # must not match
    publish(pub, f"{base}/hash", b"hash-parent", qos=1)  # '#' matches the parent level too
    sent.append((f"{base}/hash", b"hash-parent", 1))
    publish(pub, f"{base}/hash/a/b/c", b"hash-deep", qos=1)
    sent.append((f"{base}/hash/a/b/c", b"hash-deep", 1))
    publish(pub, f"{base}/q1", b"downgraded", qos=2)  # QoS 1 subscription
    sent.append((f"{base}/q1", b"downgraded", 1))

    col.wait_messages(len(sent))
    got = col.quiet(0.5)
    check(len(got) == len(sent),
          f"{tag}: received {len(got)} messages, expected {len(sent)}: {got[:20]}")
    got_set = sorted((m.topic, m.payload, m.qos) for m in got)
    check(got_set == sorted(sent),
          f"{tag}: mismatch; missing={sorted(set(sent) - set(got_set))[:5]} "
          f"extra={sorted(set(got_set) - set(sent))[:5]}")
    check(all(m.retain == 0 for m in got), f"{tag}: non-retained publish delivered with retain=1")
    # Per-topic order within each QoS level.  (Across QoS levels the order of
    # on_message calls is not the wire order: paho fires on_message for QoS 2
    # only on PUBREL, for QoS 0/1 on PUBLISH.)
    for q in (0, 1, 2):
        got_q = [m.payload for m in got if m.topic == f"{base}/exact" and m.qos == q]
        want_q = [p for t, p, qq in sent if t == f"{base}/exact" and qq == q]
        check(got_q == want_q, f"{tag}: QoS {q} messages out of order: {got_q}")

    close(pub)
    close(sub)
    check(not sub._interop_thread.is_alive(), f"{tag}: loop_forever did not return after disconnect()")


def body():
    for tag, proto in PROTOS:
        run_proto(tag, proto)


if __name__ == "__main__":
    main("pubsub_qos", body)
