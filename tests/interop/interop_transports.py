"""Helpers for the TLS / WebSocket / WSS interop scripts (not a test itself).

Env (set by .ci/run, or by hand against a running broker):
  MQTT_TLS_PORT, MQTT_WS_PORT, MQTT_WSS_PORT  the listeners' ports on MQTT_HOST
  MQTT_CAFILE                                 the CA that signs the server certificate
                                              (the broker's <data_dir>/certs/ca.pem)
  MQTT_WS_PATH                                WebSocket path (default /mqtt)
A script whose variables are not set prints ``SKIP name: why`` and exits 0.

Clients are built as users write them with paho-mqtt:
``Client(..., transport="websockets")`` + ``ws_set_options(path=...)`` and
``tls_set(ca_certs=...)``.
"""

import os
import sys

from interop_common import (HOST, PROTOS, WAIT, Collector, check, close, main, mqtt_client,
                            publish, subscribe, uid)

WS_PATH = os.environ.get("MQTT_WS_PATH", "/mqtt")


def skip_unless(name, *variables):
    missing = [v for v in variables if not os.environ.get(v)]
    if missing:
        print(f"SKIP {name}: set {' and '.join(missing)} to run it", flush=True)
        sys.exit(0)


def transport_client(client_id, protocol, transport, tls):
    kwargs = dict(client_id=client_id, protocol=protocol, reconnect_on_failure=False,
                  transport="websockets" if transport == "ws" else "tcp")
    if hasattr(mqtt_client, "CallbackAPIVersion"):  # paho-mqtt >= 2.0
        kwargs["callback_api_version"] = mqtt_client.CallbackAPIVersion.VERSION1
    client = mqtt_client.Client(**kwargs)
    if transport == "ws":
        client.ws_set_options(path=WS_PATH)
    if tls:
        client.tls_set(ca_certs=os.environ["MQTT_CAFILE"])
    return client


def open_client(tag, protocol, transport, tls, port):
    client = transport_client(f"{tag}-{uid()}", protocol, transport, tls)
    col = Collector().attach(client)
    client.connect(HOST, port, keepalive=30)
    client.loop_start()
    col.wait_connack(what=tag)
    return client, col


def round_trip(transport, tls, port):
    """QoS 0/1/2 round trip and a retained message, for v3.1.1 and v5."""
    for tag, proto in PROTOS:
        topic = f"petrel/it/{transport}{'s' if tls else ''}/{uid()}"
        sub, sub_col = open_client(f"sub-{tag}", proto, transport, tls, port)
        pub, _ = open_client(f"pub-{tag}", proto, transport, tls, port)
        try:
            subscribe(sub, sub_col, topic, qos=2, what=f"{tag} subscriber")
            for qos in (0, 1, 2):
                publish(pub, topic, f"qos{qos}".encode(), qos=qos, what=f"{tag} publisher")
            got = sub_col.wait_messages(3, topic=topic)
            # Order across QoS levels is not visible through paho (QoS 2 fires on PUBREL).
            check(sorted((m.payload, m.qos) for m in got) == [(b"qos0", 0), (b"qos1", 1), (b"qos2", 2)],
                  f"{tag}: got {got}")
            retained = topic + "/retained"
            publish(pub, retained, b"kept", qos=1, retain=True, what=f"{tag} publisher")
            late, late_col = open_client(f"late-{tag}", proto, transport, tls, port)
            try:
                subscribe(late, late_col, retained, qos=1, what=f"{tag} late subscriber")
                got = late_col.wait_messages(1, topic=retained)
                check(len(got) == 1 and got[0].retain == 1 and got[0].payload == b"kept",
                      f"{tag}: retained message to a later subscriber: {got}")
            finally:
                publish(pub, retained, b"", qos=1, retain=True)
                close(late)
        finally:
            close(sub)
            close(pub)


__all__ = ["main", "round_trip", "skip_unless", "WAIT"]
