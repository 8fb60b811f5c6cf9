#!/usr/bin/env python3
"""EMQX's delayed publish from paho, as the user's notes write it: a message published to
$delayed/{seconds}/{topic} reaches {topic} after the interval, not before; two delayed
messages arrive in due order, on the real topic, for v3.1.1 and v5.
"""
import time

from interop_common import (PROTOS, Collector, check, close, connect, main, new_client,
                            publish, subscribe, uid)


def run_proto(tag, proto):
    base = f"petrel/it/delayed/{uid()}"
    sub = new_client(f"dsub-{tag}-{uid()}", proto)
    scol = Collector().attach(sub)
    connect(sub, scol, what=f"{tag} subscriber")
    subscribe(sub, scol, f"{base}/#", 1, what=f"{tag} subscriber")

    pub = new_client(f"dpub-{tag}-{uid()}", proto)
    pcol = Collector().attach(pub)
    connect(pub, pcol, what=f"{tag} publisher")
    sent_at = time.monotonic()
    publish(pub, f"$delayed/2/{base}/x/y", b"later", qos=1)
    publish(pub, f"$delayed/1/{base}/a/b", b"sooner", qos=1)

    early = scol.quiet(0.5)
    check(not early, f"{tag}: delayed messages arrived before their time: {early}")
    got = scol.wait_messages(2, timeout=6)
    waited = time.monotonic() - sent_at
    check([m.payload for m in got] == [b"sooner", b"later"],
          f"{tag}: expected sooner then later, got {got}")
    check([m.topic for m in got] == [f"{base}/a/b", f"{base}/x/y"],
          f"{tag}: delivered on {[m.topic for m in got]}, not the target topics")
    check(waited >= 1.9, f"{tag}: the 2 s message came after {waited:.2f} s")
    close(pub)
    close(sub)


def body():
    for tag, proto in PROTOS:
        run_proto(tag, proto)


if __name__ == "__main__":
    main("delayed_publish", body)
