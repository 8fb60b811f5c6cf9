#!/usr/bin/env python3
"""A slow subscriber costs only itself (as in Mosquitto and EMQX).

A paho subscriber stops reading (its network loop stopped, the socket left open) while
three paho publishers with a 1 s keep-alive send QoS 1 messages and a healthy subscriber
takes them. Checks: every publish is acknowledged, the healthy subscriber gets every message
in order per publisher, no publisher is disconnected (idle past its keep-alive afterwards,
its pings answered), and the slow subscriber, once it reads again, gets what its queue kept
without being disconnected, in order per publisher and without duplicates: all of it under
Petrel's default `session.queue_full = "keep"`, the first ones under `drop_new` or Mosquitto.
"""
import time

from interop_common import (MQTTv5, WAIT, Collector, check, close, connect, main, new_client,
                            subscribe, uid)

PUBLISHERS = 3
N = 400  # 1200 in all: more than the default queue and window (1000 + 128; Mosquitto 1000 + 20)


def body():
    base = f"petrel/it/slow/{uid()}"
    slow = new_client(f"slow-{uid()}", MQTTv5)
    slow_col = Collector().attach(slow)
    connect(slow, slow_col, what="slow subscriber")
    subscribe(slow, slow_col, f"{base}/#", qos=1, what="slow subscriber")
    slow.loop_stop()  # stops reading; the connection stays open

    fast = new_client(f"fast-{uid()}", MQTTv5)
    fast_col = Collector().attach(fast)
    connect(fast, fast_col, what="fast subscriber")
    subscribe(fast, fast_col, f"{base}/#", qos=1, what="fast subscriber")

    pubs = []
    for p in range(PUBLISHERS):
        c = new_client(f"pub-{p}-{uid()}", MQTTv5)
        col = Collector().attach(c)
        connect(c, col, what=f"publisher {p}", keepalive=1)
        pubs.append((c, col))
    # One message per publisher at a time (acknowledged before the next), so that the healthy
    # subscriber keeps up; the slow one falls behind all the same.
    for i in range(N):
        infos = [c.publish(f"{base}/{p}", f"{i}".encode(), qos=1) for p, (c, _) in enumerate(pubs)]
        for info in infos:
            info.wait_for_publish(timeout=WAIT)
            check(info.is_published(), f"publish {i} not acknowledged within {WAIT}s")

    total = PUBLISHERS * N
    got = fast_col.wait_messages(total, timeout=4 * WAIT)
    check(len(got) == total, f"fast subscriber got {len(got)} of {total}")
    for p in range(PUBLISHERS):
        seq = [int(m.payload) for m in got if m.topic == f"{base}/{p}"]
        check(seq == list(range(N)), f"publisher {p}'s messages out of order or missing")

    # Idle for three keep-alive periods: their PINGREQs must be answered.
    time.sleep(3)
    for p, (_, col) in enumerate(pubs):
        check(not col.disconnects, f"publisher {p} disconnected: {col.disconnects}")

    slow.loop_start()
    # Until nothing more comes for a second (bounded).
    seen = -1
    for _ in range(int(4 * WAIT)):
        kept = slow_col.quiet(1.0)
        if len(kept) == seen:
            break
        seen = len(kept)
    check(not slow_col.disconnects, f"slow subscriber disconnected: {slow_col.disconnects}")
    check(0 < len(kept) <= total, f"slow subscriber got {len(kept)} of {total}")
    for p in range(PUBLISHERS):
        seq = [int(m.payload) for m in kept if m.topic == f"{base}/{p}"]
        check(seq == sorted(set(seq)), f"publisher {p}'s kept messages out of order or repeated")

    for c, _ in pubs:
        close(c)
    close(fast)
    close(slow)


if __name__ == "__main__":
    main("slow_subscriber", body)
