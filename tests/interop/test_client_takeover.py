#!/usr/bin/env python3
"""Client id takeover, v3.1.1 and v5 (from the users' notes: "a client
connecting with an already-used Client ID kicks the connected one off").

A connects with id X; B connects with the same id X: A's connection is closed
by the broker (v5: a DISCONNECT with reason 0x8E Session taken over, or a
plain close), B stays connected and works.  A's will is published when it is
taken over (v3.1.1 and v5 both require the will of the old connection to be
published on takeover unless it was removed).
"""
from interop_common import (PROTOS, Collector, MQTTv5, check, close, connect, main, new_client,
                            publish, subscribe, uid)


def run_proto(tag, proto):
    cid = f"dup-{tag}-{uid()}"
    base = f"petrel/it/takeover/{uid()}"
    w = new_client(f"watch-{tag}-{uid()}", proto)
    wcol = Collector().attach(w)
    connect(w, wcol, what=f"{tag} watcher")
    subscribe(w, wcol, f"{base}/#", 1, what=f"{tag} watcher")

    a = new_client(cid, proto)
    a.will_set(f"{base}/will", b"A-gone", qos=1)
    acol = Collector().attach(a)
    connect(a, acol, what=f"{tag} A")

    b = new_client(cid, proto)
    bcol = Collector().attach(b)
    connect(b, bcol, what=f"{tag} B")

    check(acol.wait(lambda: len(acol.disconnects) >= 1),
          f"{tag}: first connection was not closed when the same client id connected again")
    if proto == MQTTv5:
        rc = acol.disconnects[0]
        # 0x8E from a DISCONNECT packet, or a paho connection-lost code if the broker just closed.
        check(rc in (0x8E, 7, 1), f"{tag}: unexpected disconnect reason {rc} for taken-over session")

    # B is the live connection.
    subscribe(b, bcol, f"{base}/b", 1, what=f"{tag} B")
    publish(w, f"{base}/b", b"to-B", qos=1, what=f"{tag} watcher")
    got = bcol.wait_messages(1, topic=f"{base}/b")
    check(len(got) == 1, f"{tag}: new connection with the reused client id does not work")
    got = wcol.wait_messages(1, topic=f"{base}/will")
    check(len(got) == 1 and got[0].payload == b"A-gone",
          f"{tag}: will of the taken-over connection not published: {got}")
    try:
        a.loop_stop()
    except Exception:
        pass
    close(b)
    close(w)


def body():
    for tag, proto in PROTOS:
        run_proto(tag, proto)


if __name__ == "__main__":
    main("client_takeover", body)
