#!/usr/bin/env python3
"""Shared subscriptions $share/<group>/<filter>, v5 and v3.1.1 (EMQX and
Mosquitto both accept $share from v3.1.1 clients).

Two subscribers in one group share N QoS 1 messages: each message goes to
exactly one of them (no duplicates, none lost, total N) and both get some; a
plain subscriber on the same topic receives all N; a second group receives its
own full copy; the delivered topic is the real topic (no $share prefix).
"""
from interop_common import (PROTOS, Collector, check, close, connect, main, new_client,
                            publish, subscribe, uid, wait_until)

N = 20


def run_proto(tag, proto):
    base = f"petrel/it/share/{uid()}"
    topic = f"{base}/data"
    group = f"g{uid(4)}"

    def client(name, flt, qos=1):
        c = new_client(f"{name}-{tag}-{uid()}", proto)
        col = Collector().attach(c)
        connect(c, col, what=f"{tag} {name}")
        subscribe(c, col, flt, qos, what=f"{tag} {name}")
        return c, col

    s1, c1 = client("share1", f"$share/{group}/{topic}")
    s2, c2 = client("share2", f"$share/{group}/{topic}")
    s3, c3 = client("other-group", f"$share/other{group}/{topic}")
    plain, cp = client("plain", topic)

    pub = new_client(f"shpub-{tag}-{uid()}", proto)
    pcol = Collector().attach(pub)
    connect(pub, pcol, what=f"{tag} publisher")
    sent = [f"{tag}-{i}".encode() for i in range(N)]
    for p in sent:
        publish(pub, topic, p, qos=1)

    got_plain = cp.wait_messages(N)
    got_other = c3.wait_messages(N)
    wait_until(lambda: len(c1.msgs()) + len(c2.msgs()) >= N)
    got1, got2 = c1.quiet(0.8), c2.msgs()
    got_plain, got_other = cp.msgs(), c3.msgs()

    check(sorted(m.payload for m in got_plain) == sorted(sent),
          f"{tag}: plain subscriber got {len(got_plain)}/{N}")
    check(sorted(m.payload for m in got_other) == sorted(sent),
          f"{tag}: second share group got {len(got_other)}/{N}")
    p1 = [m.payload for m in got1]
    p2 = [m.payload for m in got2]
    dup = set(p1) & set(p2)
    check(not dup, f"{tag}: {len(dup)} messages delivered to both group members")
    check(len(p1) + len(p2) == N and sorted(p1 + p2) == sorted(sent),
          f"{tag}: group members got {len(p1)}+{len(p2)} messages, expected total {N} distinct")
    check(len(p1) > 0 and len(p2) > 0,
          f"{tag}: load not shared ({len(p1)} / {len(p2)})")
    check(all(m.topic == topic for m in got1 + got2 + got_other),
          f"{tag}: shared delivery topic not the real topic: "
          f"{set(m.topic for m in got1 + got2 + got_other)}")

    # Unsubscribing one member: the other now gets everything.
    rc, mid = s1.unsubscribe(f"$share/{group}/{topic}")
    check(rc == 0, f"{tag}: unsubscribe() returned {rc}")
    check(c1.wait(lambda: mid in c1.unsubacks), f"{tag}: no UNSUBACK")
    n1 = len(c1.msgs())
    n2 = len(c2.msgs())
    more = [f"{tag}-after-{i}".encode() for i in range(4)]
    for p in more:
        publish(pub, topic, p, qos=1)
    c2.wait_messages(n2 + len(more))
    c2.quiet(0.3)
    check(len(c1.msgs()) == n1, f"{tag}: unsubscribed group member still receives")
    check(sorted(m.payload for m in c2.msgs()[n2:]) == sorted(more),
          f"{tag}: remaining group member did not get all messages after the other left")

    for c in (pub, s1, s2, s3, plain):
        close(c)


def body():
    for tag, proto in PROTOS:
        run_proto(tag, proto)


if __name__ == "__main__":
    main("shared_subscription", body)
