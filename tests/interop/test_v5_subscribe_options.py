#!/usr/bin/env python3
"""MQTT v5 subscription options (SubscribeOptions), as the users write them.

* No Local: a client subscribed with noLocal=True does not receive its own
  publishes (another subscriber does); with noLocal=False it does.
* Retain As Published: a retained publish forwarded to a live subscription
  keeps retain=1 with retainAsPublished=True, and has retain=0 with False.
  Messages sent because of a new subscription always have retain=1.
* Retain Handling: 0 = retained messages sent on every subscribe (also a
  re-subscribe); 1 = only when the subscription is new, not on a
  re-subscribe; 2 = never sent at subscribe time.
* The users' exact call: subscribe(topic, options=SubscribeOptions(qos=1,
  noLocal=1, retainAsPublished=1, retainHandling=1)) with client id "receive"
  (suffixed) on a retained topic.
* Granted QoS in the SUBACK is the requested one and caps delivery QoS.
"""
from paho.mqtt.subscribeoptions import SubscribeOptions

from interop_common import (MQTTv5, Collector, check, clear_retained, close, connect, main,
                            new_client, publish, subscribe, uid)


def v5client(name):
    c = new_client(f"{name}-{uid()}", MQTTv5)
    col = Collector().attach(c)
    connect(c, col, what=name)
    return c, col


def no_local(base):
    topic = f"{base}/nolocal"
    a, ca = v5client("nolocal-self")
    b, cb = v5client("nolocal-observer")
    subscribe(a, ca, topic, options=SubscribeOptions(qos=1, noLocal=True), what="self")
    subscribe(b, cb, topic, 1, what="observer")
    publish(a, topic, b"mine", qos=1, what="self")
    got_b = cb.wait_messages(1)
    check(len(got_b) == 1, "no-local: observer did not receive the publish")
    check(ca.quiet() == [], f"no-local: publisher received its own message {ca.msgs()}")
    # noLocal=False on another topic: own message comes back.
    t2 = f"{base}/local"
    subscribe(a, ca, t2, options=SubscribeOptions(qos=1, noLocal=False), what="self")
    publish(a, t2, b"echo", qos=1, what="self")
    got = ca.wait_messages(1, topic=t2)
    check(len(got) == 1 and got[0].payload == b"echo", "noLocal=False: own message not received")
    # No Local also applies to wildcard subscriptions.
    t3 = f"{base}/wild/x"
    subscribe(a, ca, f"{base}/wild/#", options=SubscribeOptions(qos=0, noLocal=True), what="self")
    subscribe(b, cb, f"{base}/wild/#", 0, what="observer")
    publish(a, t3, b"wild", qos=1, what="self")
    check(len(cb.wait_messages(1, topic=t3)) == 1, "no-local wildcard: observer got nothing")
    check(ca.quiet(topic=t3) == [], "no-local wildcard: publisher received its own message")
    close(a)
    close(b)


def retain_as_published(base):
    topic = f"{base}/rap"
    pub, cpub = v5client("rap-pub")
    rap1, c1 = v5client("rap1")
    rap0, c0 = v5client("rap0")
    try:
        subscribe(rap1, c1, topic, options=SubscribeOptions(qos=1, retainAsPublished=True), what="rap1")
        subscribe(rap0, c0, topic, options=SubscribeOptions(qos=1, retainAsPublished=False), what="rap0")
        publish(pub, topic, b"retained-live", qos=1, retain=True)
        publish(pub, topic, b"normal-live", qos=1, retain=False)
        g1 = c1.wait_messages(2)
        g0 = c0.wait_messages(2)
        check([(m.payload, m.retain) for m in g1] == [(b"retained-live", 1), (b"normal-live", 0)],
              f"retainAsPublished=True: got {g1}")
        check([(m.payload, m.retain) for m in g0] == [(b"retained-live", 0), (b"normal-live", 0)],
              f"retainAsPublished=False: got {g0}")
        # Delivery caused by a new subscription: retain=1 regardless of the option.
        late, cl = v5client("rap-late")
        subscribe(late, cl, topic, options=SubscribeOptions(qos=1, retainAsPublished=False), what="late")
        g = cl.wait_messages(1)
        check(len(g) == 1 and g[0].retain == 1, f"retained on subscribe with RAP=0 must have retain=1: {g}")
        close(late)
    finally:
        clear_retained(topic)
        for c in (pub, rap1, rap0):
            close(c)


def retain_handling(base):
    topic = f"{base}/rh"
    pub, cpub = v5client("rh-pub")
    try:
        publish(pub, topic, b"retained", qos=1, retain=True)

        def count_after_subscribe(client, col, rh, what):
            before = len(col.msgs(topic))
            subscribe(client, col, topic, options=SubscribeOptions(qos=1, retainHandling=rh), what=what)
            col.wait_messages(before + 1, timeout=1.0, topic=topic)
            got = col.quiet(0.3, topic=topic)
            for m in got[before:]:
                check(m.retain == 1 and m.payload == b"retained", f"{what}: unexpected message {m}")
            return len(got) - before

        c, col = v5client("rh0")
        check(count_after_subscribe(c, col, 0, "rh0 new") == 1, "retainHandling=0: new subscription got no retained message")
        check(count_after_subscribe(c, col, 0, "rh0 re") == 1, "retainHandling=0: re-subscribe got no retained message")
        close(c)

        c, col = v5client("rh1")
        check(count_after_subscribe(c, col, 1, "rh1 new") == 1, "retainHandling=1: new subscription got no retained message")
        check(count_after_subscribe(c, col, 1, "rh1 re") == 0, "retainHandling=1: re-subscribe (existing subscription) got the retained message")
        close(c)

        c, col = v5client("rh2")
        check(count_after_subscribe(c, col, 2, "rh2 new") == 0, "retainHandling=2: retained message sent at subscribe")
        # The subscription itself works: a live publish arrives.
        publish(pub, topic, b"live", qos=1)
        got = col.wait_messages(1, topic=topic)
        check(len(got) == 1 and got[0].payload == b"live", "retainHandling=2: live publish not delivered")
        close(c)
    finally:
        clear_retained(topic)
        close(pub)


def users_exact_call(base):
    topic = f"{base}/retain"
    pub, cpub = v5client("user-pub")
    try:
        publish(pub, topic, "保留消息", qos=1, retain=True)
        c, col = v5client("receive")
        granted = subscribe(c, col, topic, options=SubscribeOptions(
            qos=1, noLocal=1, retainAsPublished=1, retainHandling=1), what="users' call")
        check(granted == [1], f"users' call: granted {granted}, expected [1]")
        got = col.wait_messages(1)
        check(len(got) == 1 and got[0].retain == 1 and got[0].qos == 1,
              f"users' call: retained message on subscribe: {got}")
        publish(pub, topic, "保留消息2", qos=2, retain=True)
        got = col.wait_messages(2)
        check(len(got) == 2 and got[1].retain == 1 and got[1].qos == 1,
              f"users' call: live retained publish (RAP=1, granted QoS 1): {got}")
        publish(c, topic, b"self", qos=1, what="receive")  # noLocal
        check(len(col.quiet()) == 2, "users' call: noLocal=1 but own message received")
        close(c)
    finally:
        clear_retained(topic)
        close(pub)


def body():
    base = f"petrel/it/subopts/{uid()}"
    no_local(base)
    retain_as_published(base)
    retain_handling(base)
    users_exact_call(base)


if __name__ == "__main__":
    main("v5_subscribe_options", body)
