#!/usr/bin/env python3
"""Persistent sessions and offline message queueing.

v3.1.1: Client(client_id=X, clean_session=False) subscribes at QoS 1,
disconnects; QoS 1/2 messages are published while it is offline; it
reconnects with the same id and clean_session=False: CONNACK session present=1
and it receives every offline message (without subscribing again).  Then a
clean_session=True connect gets session present=0 and the session is gone.

v5: connect(clean_start=True, SessionExpiryInterval=300), subscribe, disconnect,
publish offline, reconnect clean_start=False (+SessionExpiryInterval):
session present=1 and all offline messages.  A v5 session with no Session
Expiry Interval (0) is not kept: reconnect with clean_start=False gets
session present=0 and nothing.
"""
import time

from interop_common import (MQTTv311, MQTTv5, Collector, PacketTypes, Properties, check,
                            clear_session, close, connect, drop, main, new_client, publish,
                            subscribe, uid)

N = 5


def session_props(expiry):
    p = Properties(PacketTypes.CONNECT)
    p.SessionExpiryInterval = expiry
    return p


def offline_publish(tag, proto, topic):
    pub = new_client(f"spub-{tag}-{uid()}", proto)
    pcol = Collector().attach(pub)
    connect(pub, pcol, what=f"{tag} publisher")
    sent = []
    for i in range(N):
        q = 1 if i % 2 == 0 else 2
        payload = f"保存会话 {tag} {i}".encode()
        publish(pub, topic, payload, qos=q)
        sent.append((payload, q))
    close(pub)
    return sent


def check_redelivery(tag, col, topic, sent):
    """sent: list of (payload, publish qos).  The subscription is QoS 1, so every
    message arrives once at QoS 1 (QoS 2 publishes downgraded), in publish order."""
    col.wait_messages(len(sent), topic=topic)
    got = col.quiet(0.5, topic=topic)
    payloads = [m.payload for m in got]
    check(payloads == [p for p, _ in sent],
          f"{tag}: after reconnect received {len(payloads)}/{len(sent)} offline messages "
          f"(in publish order expected): {payloads}")
    check(all(m.qos == 1 for m in got),
          f"{tag}: offline messages delivered at QoS {[m.qos for m in got]}, expected 1 (subscription QoS)")


def v311():
    tag = "v311"
    cid = f"sess-{tag}-{uid()}"
    topic = f"petrel/it/session/{uid()}/clean_session_false"
    try:
        # First connection: clean_session=False on a fresh id -> session present 0.
        c = new_client(cid, MQTTv311, clean_session=False)
        col = Collector().attach(c)
        sp, _ = connect(c, col, what=f"{tag} first connect")
        check(sp == 0, f"{tag}: first connect of a new client id got session present=1")
        subscribe(c, col, topic, 1, what=tag)
        close(c)

        sent = offline_publish(tag, MQTTv311, topic)

        c = new_client(cid, MQTTv311, clean_session=False)
        col = Collector().attach(c)
        sp, _ = connect(c, col, what=f"{tag} reconnect")
        check(sp == 1, f"{tag}: reconnect with clean_session=False got session present=0")
        check_redelivery(tag, col, topic, sent)

        # The subscription is part of the session: a live publish still arrives.
        p = new_client(f"spub2-{tag}-{uid()}", MQTTv311)
        pc = Collector().attach(p)
        connect(p, pc)
        publish(p, topic, b"live", qos=1)
        got = col.wait_messages(len(sent) + 1, topic=topic)
        check(len(got) == len(sent) + 1 and got[-1].payload == b"live",
              f"{tag}: session subscription not restored for live messages")

        # Abrupt drop also keeps the session.  Barrier first: make sure the PUBACK
        # for "live" reached the broker (else it is legitimately redelivered):
        # paho sends it right after on_message; a SUBSCRIBE/SUBACK round trip after
        # it proves the broker has processed everything before.
        time.sleep(0.2)
        subscribe(c, col, topic + "/barrier", 0, what=f"{tag} barrier")
        drop(c)
        publish(p, topic, b"after-drop", qos=1)
        close(p)
        c = new_client(cid, MQTTv311, clean_session=False)
        col = Collector().attach(c)
        sp, _ = connect(c, col, what=f"{tag} reconnect after drop")
        check(sp == 1, f"{tag}: session lost after an abrupt disconnect")
        got = col.wait_messages(1, topic=topic)
        check([m.payload for m in got] == [b"after-drop"],
              f"{tag}: after abrupt drop expected [b'after-drop'], got {got}")
        close(c)

        # clean_session=True discards the session.
        c = new_client(cid, MQTTv311, clean_session=True)
        col = Collector().attach(c)
        sp, _ = connect(c, col, what=f"{tag} clean connect")
        check(sp == 0, f"{tag}: clean_session=True connect got session present=1")
        close(c)
        c = new_client(cid, MQTTv311, clean_session=False)
        col = Collector().attach(c)
        sp, _ = connect(c, col, what=f"{tag} connect after clean")
        check(sp == 0, f"{tag}: session survived a clean_session=True connect")
        close(c)
    finally:
        clear_session(cid, MQTTv311)


def v5():
    tag = "v5"
    cid = f"sess-{tag}-{uid()}"
    topic = f"petrel/it/session/{uid()}/v5"
    try:
        c = new_client(cid, MQTTv5)
        col = Collector().attach(c)
        sp, _ = connect(c, col, clean_start=True, properties=session_props(300), what=f"{tag} first connect")
        check(sp == 0, f"{tag}: clean_start=True got session present=1")
        subscribe(c, col, topic, 1, what=tag)
        close(c)

        sent = offline_publish(tag, MQTTv5, topic)

        c = new_client(cid, MQTTv5)
        col = Collector().attach(c)
        sp, _ = connect(c, col, clean_start=False, properties=session_props(300), what=f"{tag} reconnect")
        check(sp == 1, f"{tag}: reconnect with clean_start=False + SessionExpiryInterval got session present=0")
        check_redelivery(tag, col, topic, sent)
        close(c)

        # clean_start=True discards it.
        c = new_client(cid, MQTTv5)
        col = Collector().attach(c)
        sp, _ = connect(c, col, clean_start=True, properties=session_props(0), what=f"{tag} clean connect")
        check(sp == 0, f"{tag}: clean_start=True got session present=1")
        close(c)

        # Session Expiry Interval absent (= 0): session ends at disconnect.
        cid2 = f"sess0-{tag}-{uid()}"
        topic2 = topic + "/expiry0"
        c = new_client(cid2, MQTTv5)
        col = Collector().attach(c)
        connect(c, col, clean_start=True, what=f"{tag} expiry-0 connect")
        subscribe(c, col, topic2, 1, what=tag)
        close(c)
        offline_publish(tag, MQTTv5, topic2)
        c = new_client(cid2, MQTTv5)
        col = Collector().attach(c)
        sp, _ = connect(c, col, clean_start=False, what=f"{tag} expiry-0 reconnect")
        check(sp == 0, f"{tag}: session with Session Expiry Interval 0 was kept (session present=1)")
        got = col.quiet(topic=topic2)
        check(got == [], f"{tag}: expired session still delivered {got}")
        close(c)
    finally:
        clear_session(cid, MQTTv5)


def body():
    v311()
    v5()


if __name__ == "__main__":
    main("persistent_session", body)
