#!/usr/bin/env python3
"""EMQX's exclusive subscriptions from paho, as the user's notes write it:
client.subscribe("$exclusive/t/1") succeeds for the first client; another client's
subscription fails (v5: 0x97, v3.1.1: 0x80) while the plain filter t/1 still works; once
the holder unsubscribes, the other client can take it.
"""
from interop_common import (PROTOS, Collector, check, close, connect, main, new_client,
                            publish, subscribe, uid)


def suback(client, col, topic, qos):
    """Subscribes and returns the SUBACK's codes, refusals included."""
    rc, mid = client.subscribe(topic, qos)
    check(rc == 0, f"subscribe() returned {rc}")
    check(col.wait(lambda: any(m == mid for m, _ in col.subacks)), f"no SUBACK for {topic}")
    return [g for m, g in col.subacks if m == mid][0]


def run_proto(tag, proto):
    topic = f"petrel/it/exclusive/{uid()}"
    exclusive = f"$exclusive/{topic}"
    refused = 0x97 if tag == "v5" else 0x80

    a = new_client(f"exa-{tag}-{uid()}", proto)
    acol = Collector().attach(a)
    connect(a, acol, what=f"{tag} holder")
    granted = subscribe(a, acol, exclusive, 1, what=f"{tag} holder")
    check(granted == [1], f"{tag}: holder granted {granted}")

    b = new_client(f"exb-{tag}-{uid()}", proto)
    bcol = Collector().attach(b)
    connect(b, bcol, what=f"{tag} second")
    got = suback(b, bcol, exclusive, 1)
    check(got == [refused], f"{tag}: a second exclusive subscriber got {got}, not {refused:#x}")
    got = subscribe(b, bcol, topic, 1, what=f"{tag} second plain")
    check(got == [1], f"{tag}: the plain filter was refused: {got}")

    pub = new_client(f"expub-{tag}-{uid()}", proto)
    pcol = Collector().attach(pub)
    connect(pub, pcol, what=f"{tag} publisher")
    publish(pub, topic, b"m", qos=1)
    check([m.payload for m in acol.wait_messages(1)] == [b"m"], f"{tag}: holder got nothing")

    rc, mid = a.unsubscribe(exclusive)
    check(rc == 0 and acol.wait(lambda: mid in acol.unsubacks), f"{tag}: no UNSUBACK")
    got = suback(b, bcol, exclusive, 1)
    check(got == [1], f"{tag}: after the holder left, got {got}")
    for c in (a, b, pub):
        close(c)


def body():
    for tag, proto in PROTOS:
        run_proto(tag, proto)


if __name__ == "__main__":
    main("exclusive_subscription", body)
