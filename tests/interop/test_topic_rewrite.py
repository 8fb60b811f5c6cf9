#!/usr/bin/env python3
"""EMQX's topic rewrite from paho (rules in tests/interop/emqx.toml): a PUBLISH and a
SUBSCRIBE to petrel/it/rw/old/... both land on petrel/it/rw/new/...; a publish-only rule with
${clientid} puts the publisher's id into the topic. Over MQTT 3.1.1 and 5.0.
"""
from interop_common import PROTOS, Collector, check, close, connect, main, new_client, publish, subscribe, uid


def run_proto(tag, proto):
    leaf = uid()
    sub = new_client(f"rws-{tag}-{uid()}", proto)
    scol = Collector().attach(sub)
    connect(sub, scol, what=f"{tag} subscriber")
    # Subscribing to the old name subscribes to the new one.
    subscribe(sub, scol, f"petrel/it/rw/old/{leaf}", 1, what=f"{tag} subscriber")
    pub_id = f"rwp-{tag}-{uid()}"
    pub = new_client(pub_id, proto)
    pcol = Collector().attach(pub)
    connect(pub, pcol, what=f"{tag} publisher")
    publish(pub, f"petrel/it/rw/new/{leaf}", b"direct", qos=1)
    publish(pub, f"petrel/it/rw/old/{leaf}", b"rewritten", qos=1)
    got = scol.wait_messages(2)
    check(sorted(m.payload for m in got) == [b"direct", b"rewritten"], f"{tag}: got {[m.payload for m in got]}")
    check(all(m.topic == f"petrel/it/rw/new/{leaf}" for m in got), f"{tag}: topics {[m.topic for m in got]}")
    # The publish-only rule with ${clientid}.
    subscribe(sub, scol, f"petrel/it/rw/by/{pub_id}/#", 1, what=f"{tag} subscriber")
    publish(pub, f"petrel/it/rw/mine/{leaf}", b"mine", qos=1)
    mine = scol.wait_messages(1, topic=f"petrel/it/rw/by/{pub_id}/{leaf}")
    check([m.payload for m in mine] == [b"mine"], f"{tag}: ${{clientid}} rewrite gave {[m.topic for m in scol.msgs()]}")
    for c in (sub, pub):
        close(c)


def body():
    for tag, proto in PROTOS:
        run_proto(tag, proto)


if __name__ == "__main__":
    main("topic_rewrite", body)
