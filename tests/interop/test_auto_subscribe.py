#!/usr/bin/env python3
"""EMQX's automatic subscriptions from paho (rule in tests/interop/emqx.toml:
petrel/it/auto/${clientid}/# at QoS 1): a client that subscribes to nothing receives what is
published there as soon as it is connected. Over MQTT 3.1.1 and 5.0.
"""
from interop_common import PROTOS, Collector, check, close, connect, main, new_client, publish, uid


def run_proto(tag, proto):
    cid = f"auto-{tag}-{uid()}"
    device = new_client(cid, proto)
    dcol = Collector().attach(device)
    connect(device, dcol, what=f"{tag} device")
    ops = new_client(f"ops-{tag}-{uid()}", proto)
    ocol = Collector().attach(ops)
    connect(ops, ocol, what=f"{tag} operator")
    publish(ops, f"petrel/it/auto/{cid}/cmd", b"reboot", qos=1)
    got = dcol.wait_messages(1)
    check([(m.topic, m.payload, m.qos) for m in got] == [(f"petrel/it/auto/{cid}/cmd", b"reboot", 1)],
          f"{tag}: the device got {[(m.topic, m.payload, m.qos) for m in got]}")
    # Another client's topic is not its own.
    publish(ops, f"petrel/it/auto/someone-else-{uid()}/cmd", b"not yours", qos=1)
    check(len(dcol.quiet()) == 1, f"{tag}: got another client's message")
    for c in (device, ops):
        close(c)


def body():
    for tag, proto in PROTOS:
        run_proto(tag, proto)


if __name__ == "__main__":
    main("auto_subscribe", body)
