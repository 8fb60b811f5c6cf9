#!/usr/bin/env python3
"""MQTT v5 Subscription Identifiers.

* SUBSCRIBE with Properties(PacketTypes.SUBSCRIBE).SubscriptionIdentifier = N:
  matching messages carry N (paho exposes it as a list).
* Two overlapping subscriptions with ids 42 and 7: a message matching both
  carries both ids (in one PUBLISH or spread over one PUBLISH per
  subscription, both are allowed); a message matching only one carries only
  that id.
* A subscription without an id delivers messages without one.
* A retained message delivered on subscribe carries the id.
* Re-subscribing the same filter with a new id replaces the id.
* Large variable byte integer ids (268435455, the maximum) round-trip.
* The users' habit -- a *user property* named "Subscription Identifier" on
  SUBSCRIBE -- is accepted and does not turn into a subscription id.
"""
from interop_common import (MQTTv5, Collector, PacketTypes, Properties, check, clear_retained,
                            close, connect, main, new_client, publish, subscribe, uid)


def sub_props(sid=None, user=None):
    p = Properties(PacketTypes.SUBSCRIBE)
    if sid is not None:
        p.SubscriptionIdentifier = sid
    if user is not None:
        p.UserProperty = user
    return p


def ids_of(msgs):
    out = []
    for m in msgs:
        v = m.prop("SubscriptionIdentifier")
        if v is None:
            continue
        out.extend(v if isinstance(v, list) else [v])
    return sorted(out)


def body():
    base = f"petrel/it/subid/{uid()}"
    pub = new_client(f"sipub-{uid()}", MQTTv5)
    pcol = Collector().attach(pub)
    connect(pub, pcol, what="publisher")
    sub = new_client(f"sisub-{uid()}", MQTTv5)
    col = Collector().attach(sub)
    connect(sub, col, what="subscriber")
    try:
        subscribe(sub, col, f"{base}/a/#", 1, properties=sub_props(42), what="sub id 42")
        subscribe(sub, col, f"{base}/a/+/x", 1, properties=sub_props(7), what="sub id 7")
        subscribe(sub, col, f"{base}/noid", 1, what="sub without id")
        subscribe(sub, col, f"{base}/big", 1, properties=sub_props(268435455), what="sub id max")

        # Only the '#' subscription matches.
        t1 = f"{base}/a/b"
        publish(pub, t1, b"one", qos=1)
        got = col.wait_messages(1, topic=t1)
        got = col.quiet(0.3, topic=t1)
        check(len(got) == 1, f"single match: expected 1 message, got {got}")
        check(ids_of(got) == [42], f"single match: subscription ids {ids_of(got)}, expected [42]")

        # Both subscriptions match.
        t2 = f"{base}/a/b/x"
        publish(pub, t2, b"both", qos=1)
        col.wait(lambda: ids_of(col.msgs(t2)) == [7, 42])
        got = col.quiet(0.5, topic=t2)
        check(1 <= len(got) <= 2, f"overlap: expected 1 or 2 copies, got {len(got)}")
        check(ids_of(got) == [7, 42], f"overlap: subscription ids {ids_of(got)}, expected [7, 42]")
        if len(got) == 2:
            check(all(len(m.prop("SubscriptionIdentifier")) == 1 for m in got),
                  "overlap: per-subscription copies must carry one id each")

        # No id.
        t3 = f"{base}/noid"
        publish(pub, t3, b"noid", qos=1)
        got = col.wait_messages(1, topic=t3)
        check(len(got) == 1 and ids_of(got) == [], f"no-id subscription: got ids {ids_of(got)}")

        # Max value.
        t4 = f"{base}/big"
        publish(pub, t4, b"big", qos=0)
        got = col.wait_messages(1, topic=t4)
        check(ids_of(got) == [268435455], f"max id: got {ids_of(got)}")

        # Re-subscribe replaces the id.
        subscribe(sub, col, f"{base}/a/#", 1, properties=sub_props(99), what="re-sub id 99")
        t5 = f"{base}/a/c"
        publish(pub, t5, b"replaced", qos=1)
        got = col.wait_messages(1, topic=t5)
        check(ids_of(got) == [99], f"re-subscribe: ids {ids_of(got)}, expected [99]")

        # Retained message on subscribe carries the id.
        t6 = f"{base}/ret"
        publish(pub, t6, b"ret", qos=1, retain=True)
        late = new_client(f"silate-{uid()}", MQTTv5)
        lcol = Collector().attach(late)
        connect(late, lcol, what="late subscriber")
        subscribe(late, lcol, f"{base}/+", 1, properties=sub_props(5), what="late sub id 5")
        got = lcol.wait_messages(1, topic=t6)
        check(len(got) == 1 and got[0].retain == 1 and ids_of(got) == [5],
              f"retained on subscribe: {got} ids {ids_of(got)}")
        close(late)

        # The users' code: UserProperty ("Subscription Identifier", "1") on SUBSCRIBE.
        u = new_client(f"receive-{uid()}", MQTTv5)
        ucol = Collector().attach(u)
        connect(u, ucol, what="users' subscriber")
        t7 = f"{base}/users"
        subscribe(u, ucol, t7, 1, properties=sub_props(user=("Subscription Identifier", "1")),
                  what="users' subscribe with user property")
        publish(pub, t7, b"users", qos=1)
        got = ucol.wait_messages(1)
        check(len(got) == 1 and ids_of(got) == [],
              f"users' user-property subscribe: got {got} ids {ids_of(got)}")
        close(u)
    finally:
        clear_retained(f"{base}/ret")
        close(pub)
        close(sub)


if __name__ == "__main__":
    main("v5_subscription_identifier", body)
