#!/usr/bin/env python3
"""paho-mqtt over WebSocket over TLS (websockets + tls_set): QoS 0/1/2 round trip and a retained message, v3.1.1 and v5."""
import os

from interop_transports import main, round_trip, skip_unless

NAME = "wss_paho"

if __name__ == "__main__":
    skip_unless(NAME, "MQTT_WSS_PORT", "MQTT_CAFILE")
    main(NAME, lambda: round_trip("ws", True, int(os.environ["MQTT_WSS_PORT"])))
