#!/usr/bin/env python3
"""Shared-subscription strategies from paho, one group per strategy (configured per group in
tests/interop/emqx.toml), three members each, counting deliveries per member:

  round_robin, round_robin_per_group: 30 messages, 10 to each member;
  random, local: 30 messages, each delivered once, every member gets some;
  sticky: every message to the same member until it leaves, then to one other;
  hash_clientid: each publisher's messages all to one member;
  hash_topic: each topic's messages all to one member.

MQTT 3.1.1 (the user's habit), and round_robin over MQTT 5.0 too.
"""
from interop_common import MQTTv311, MQTTv5, Collector, check, close, connect, main, new_client, publish, subscribe, uid

N = 30


def members(tag, proto, group, base, n=3):
    out = []
    for i in range(n):
        c = new_client(f"sh-{group}-{i}-{tag}-{uid()}", proto)
        col = Collector().attach(c)
        connect(c, col, what=f"{group} member {i}")
        subscribe(c, col, f"$share/{group}/{base}/#", 1, what=f"{group} member {i}")
        out.append((c, col))
    return out


def publisher(tag, proto, name="pub"):
    c = new_client(f"sh-{name}-{tag}-{uid()}", proto)
    col = Collector().attach(c)
    connect(c, col, what=name)
    return c


def counts(group_members, total):
    """Waits until `total` deliveries arrived among the members; returns payloads per member."""
    def seen():
        return sum(len(col.msgs()) for _, col in group_members)
    group_members[0][1].wait(lambda: seen() >= total)
    # A quiet moment more, to see a duplicate that would come late.
    group_members[0][1].quiet()
    got = [[m.payload for m in col.msgs()] for _, col in group_members]
    every = [p for member in got for p in member]
    check(len(every) == total and len(set(every)) == total,
          f"{total} messages expected once each, got {len(every)} ({len(set(every))} distinct)")
    return got


def distribution(tag, proto, group, evenly):
    """30 messages from one publisher: split evenly (round robin), or reaching every member."""
    base = f"petrel/it/sh/{uid()}"
    ms = members(tag, proto, group, base)
    pub = publisher(tag, proto)
    for i in range(N):
        publish(pub, f"{base}/t", f"{i}".encode(), qos=1)
    got = counts(ms, N)
    sizes = [len(g) for g in got]
    if evenly:
        check(sizes == [N // 3] * 3, f"{group} ({tag}): {sizes} per member")
    else:
        # Each member missing all 30 has probability (2/3)^30 < 1e-5.
        check(all(n > 0 for n in sizes), f"{group} ({tag}): {sizes} per member")
    for c, _ in ms + [(pub, None)]:
        close(c)


def sticky(tag, proto):
    group = "it_sticky"
    base = f"petrel/it/sh/{uid()}"
    ms = members(tag, proto, group, base)
    pub = publisher(tag, proto)
    for i in range(N):
        publish(pub, f"{base}/t", f"a{i}".encode(), qos=1)
    got = counts(ms, N)
    holders = [i for i, g in enumerate(got) if g]
    check(len(holders) == 1, f"sticky: {[len(g) for g in got]} per member")
    holder = holders[0]
    close(ms[holder][0])
    rest = [m for i, m in enumerate(ms) if i != holder]
    for i in range(N):
        publish(pub, f"{base}/t", f"b{i}".encode(), qos=1)
    got = counts(rest, N)
    check(sorted(len(g) for g in got) == [0, N], f"sticky after the holder left: {[len(g) for g in got]}")
    for c, _ in rest + [(pub, None)]:
        close(c)


def hashed(tag, proto, group, by_topic):
    base = f"petrel/it/sh/{uid()}"
    ms = members(tag, proto, group, base)
    sources = 3
    pubs = [publisher(tag, proto, f"pub{i}") for i in range(1 if by_topic else sources)]
    for s in range(sources):
        pub = pubs[0] if by_topic else pubs[s]
        topic = f"{base}/t{s}" if by_topic else f"{base}/t"
        for i in range(N // sources):
            publish(pub, topic, f"{s}-{i}".encode(), qos=1)
    got = counts(ms, N)
    for s in range(sources):
        owners = {i for i, g in enumerate(got) for p in g if p.startswith(f"{s}-".encode())}
        check(len(owners) == 1, f"{group}: source {s} went to members {sorted(owners)}")
    for c, _ in ms + [(p, None) for p in pubs]:
        close(c)


def body():
    tag, proto = "v311", MQTTv311
    distribution(tag, proto, "it_rr", evenly=True)
    distribution("v5", MQTTv5, "it_rr", evenly=True)
    distribution(tag, proto, "it_rr_per_group", evenly=True)
    distribution(tag, proto, "it_random", evenly=False)
    distribution(tag, proto, "it_local", evenly=False)
    sticky(tag, proto)
    hashed(tag, proto, "it_hash_clientid", by_topic=False)
    hashed(tag, proto, "it_hash_topic", by_topic=True)


if __name__ == "__main__":
    main("shared_strategies", body)
