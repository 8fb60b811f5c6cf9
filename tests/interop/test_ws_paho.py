#!/usr/bin/env python3
"""paho-mqtt over WebSocket (transport="websockets", ws_set_options(path="/mqtt")): QoS 0/1/2 round trip and a retained message, v3.1.1 and v5."""
import os

from interop_transports import main, round_trip, skip_unless

NAME = "ws_paho"

if __name__ == "__main__":
    skip_unless(NAME, "MQTT_WS_PORT")
    main(NAME, lambda: round_trip("ws", False, int(os.environ["MQTT_WS_PORT"])))
