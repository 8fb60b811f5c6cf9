#!/usr/bin/env python3
"""MQTT 5 enhanced authentication: SCRAM-SHA-256 (RFC 5802 / RFC 7677, MQTT 5 §4.12).

The client side of SCRAM is written here from the RFCs with hashlib/hmac, over a raw socket
speaking MQTT 5 (CONNECT with Authentication Method/Data, AUTH, CONNACK), so Petrel is
checked against an implementation nobody on the project wrote. The script starts its own
broker (PETREL_BIN, default target/debug/petrel) on a free port, with a password file made
by `mosquitto_passwd` (when installed) to which `petrel passwd --hash argon2id` and
`--hash scram-sha-256` add users:

* SCRAM login succeeds and the server proves its signature in CONNACK;
* re-authentication (AUTH 0x19 ... AUTH 0x00) succeeds, and the connection still works;
* a wrong password and an unknown user get the same CONNACK code (0x86 or 0x87), and an
  unknown user gets the same salt and iteration count on every try (no user oracle);
* a failed re-authentication gets DISCONNECT 0x87;
* paho-mqtt with a plain password connects as the SCRAM user, the argon2id user and the
  mosquitto_passwd user (so the file with those lines loads).
"""
import base64
import hashlib
import hmac
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time

from interop_common import MQTTv5, check, main, mqtt_client, uid

METHOD = b"SCRAM-SHA-256"
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PETREL = os.environ.get("PETREL_BIN", os.path.join(ROOT, "target", "debug", "petrel"))


def varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s16(b):
    return struct.pack(">H", len(b)) + b


def packet(first, body):
    return bytes([first]) + varint(len(body)) + body


def auth_props(data):
    props = b"\x15" + s16(METHOD) + b"\x16" + s16(data)
    return varint(len(props)) + props


def connect_packet(client_id, first):
    body = s16(b"MQTT") + b"\x05\x02" + struct.pack(">H", 30) + auth_props(first) + s16(client_id.encode())
    return packet(0x10, body)


def auth_packet(reason, data):
    return packet(0xF0, bytes([reason]) + auth_props(data))


SIZES = {1: 1, 0x17: 1, 0x19: 1, 0x24: 1, 0x25: 1, 0x28: 1, 0x29: 1, 0x2A: 1,
         0x13: 2, 0x21: 2, 0x22: 2, 0x23: 2, 0x02: 4, 0x11: 4, 0x18: 4, 0x27: 4}


def parse_props(buf):
    """Property id -> value (bytes for strings/binary) for the ids we read."""
    n, shift, i = 0, 0, 0
    while True:
        b = buf[i]; i += 1
        n |= (b & 0x7F) << shift; shift += 7
        if not b & 0x80:
            break
    end, props = i + n, {}
    while i < end:
        pid = buf[i]; i += 1
        if pid in SIZES:
            i += SIZES[pid]
        elif pid == 0x0B:
            while buf[i] & 0x80:
                i += 1
            i += 1
        elif pid == 0x26:
            for _ in range(2):
                i += 2 + struct.unpack(">H", buf[i:i + 2])[0]
        else:
            ln = struct.unpack(">H", buf[i:i + 2])[0]
            props[pid] = bytes(buf[i + 2:i + 2 + ln]); i += 2 + ln
    return props


class Conn:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def read(self):
        """(packet type, flags byte 0, body) of the next packet; None when closed."""
        head = self.sock.recv(1)
        if not head:
            return None
        n, shift = 0, 0
        while True:
            b = self.sock.recv(1)[0]
            n |= (b & 0x7F) << shift; shift += 7
            if not b & 0x80:
                break
        body = b""
        while len(body) < n:
            chunk = self.sock.recv(n - len(body))
            check(chunk, "connection closed mid-packet")
            body += chunk
        return head[0] >> 4, body


class Scram:
    """The client side of RFC 5802 with SHA-256, from the RFC."""

    def __init__(self, user, password):
        self.password = password.encode()
        self.nonce = base64.b64encode(os.urandom(18)).decode()
        self.bare = f"n={user},r={self.nonce}"

    def first(self):
        return ("n,," + self.bare).encode()

    def final(self, server_first):
        attrs = dict(kv.split("=", 1) for kv in server_first.decode().split(","))
        check(attrs["r"].startswith(self.nonce), "server nonce does not extend ours")
        self.salt, self.iterations = attrs["s"], int(attrs["i"])
        salted = hashlib.pbkdf2_hmac("sha256", self.password, base64.b64decode(attrs["s"]), self.iterations)
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = "c=biws,r=" + attrs["r"]
        auth_message = f"{self.bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
        self.expected = b"v=" + base64.b64encode(hmac.new(server_key, auth_message, hashlib.sha256).digest())
        return (without_proof + ",p=" + base64.b64encode(proof).decode()).encode()


def exchange(conn, scram, start, what):
    """Sends `start`; answers AUTH 0x18; returns (packet type, reason code, properties)."""
    conn.sock.sendall(start)
    kind, body = conn.read()
    check(kind == 15 and body[0] == 0x18, f"{what}: expected AUTH 0x18, got type {kind} {body[:1].hex()}")
    props = parse_props(body[1:])
    check(props.get(0x15) == METHOD, f"{what}: AUTH without the method")
    conn.sock.sendall(auth_packet(0x18, scram.final(props[0x16])))
    got = conn.read()
    check(got is not None, f"{what}: closed without an answer")
    kind, body = got
    if kind == 2:  # CONNACK: flags, reason, properties
        return kind, body[1], parse_props(body[2:]) if len(body) > 2 else {}
    return kind, body[0], parse_props(body[1:]) if len(body) > 1 else {}


def login(port, user, password):
    conn, scram = Conn(port), Scram(user, password)
    result = exchange(conn, scram, connect_packet(f"scram-{uid()}", scram.first()), f"login {user}")
    return conn, scram, result


def paho_connects(port, user, password):
    done = threading.Event()
    codes = []
    c = mqtt_client.Client(mqtt_client.CallbackAPIVersion.VERSION1, client_id=f"paho-{uid()}", protocol=MQTTv5) \
        if hasattr(mqtt_client, "CallbackAPIVersion") else mqtt_client.Client(client_id=f"paho-{uid()}", protocol=MQTTv5)
    c.username_pw_set(user, password)
    c.on_connect = lambda cl, ud, flags, rc, props=None: (codes.append(int(getattr(rc, "value", rc))), done.set())
    c.connect("127.0.0.1", port, 30)
    c.loop_start()
    done.wait(10)
    c.disconnect()
    c.loop_stop()
    return codes[:1] == [0], codes


def body(port):
    conn, scram, (kind, code, props) = login(port, "alice", "secret")
    check(kind == 2 and code == 0, f"SCRAM login refused: type {kind} code {code:#x}")
    check(props.get(0x15) == METHOD, "CONNACK without the method [MQTT-4.12.0-5]")
    check(props.get(0x16) == scram.expected, "the server's signature in CONNACK does not verify")

    again = Scram("alice", "secret")
    kind, code, props = exchange(conn, again, auth_packet(0x19, again.first()), "re-authentication")
    check(kind == 15 and code == 0, f"re-authentication: type {kind} code {code:#x}")
    check(props.get(0x16) == again.expected, "the server's signature in AUTH 0x00 does not verify")
    conn.sock.sendall(b"\xc0\x00")  # PINGREQ
    check(conn.read() == (13, b""), "no PINGRESP after re-authentication")

    bad = Scram("alice", "wrong")
    kind, code, _ = exchange(conn, bad, auth_packet(0x19, bad.first()), "bad re-authentication")
    check(kind == 14 and code == 0x87, f"a failed re-authentication: type {kind} code {code:#x}, not DISCONNECT 0x87")

    _, _, (kind, wrong, _) = login(port, "alice", "wrong")
    check(kind == 2 and wrong in (0x86, 0x87), f"wrong password: type {kind} code {wrong:#x}")
    _, s1, (kind, unknown, _) = login(port, "nobody", "secret")
    check((kind, unknown) == (2, wrong), f"unknown user answered {unknown:#x}, wrong password {wrong:#x}")
    _, s2, _ = login(port, "nobody", "other")
    _, s3, _ = login(port, "mosq", "x")
    check((s1.salt, s1.iterations) == (s2.salt, s2.iterations), "an unknown user's salt changes between tries")
    check(s3.iterations == s1.iterations, "a non-SCRAM user's iteration count differs from a mock's")

    for user, password in [("alice", "secret"), ("argon", "argon-pw"), ("mosq", "mosq-pw")]:
        ok, codes = paho_connects(port, user, password)
        check(ok, f"paho with a plain password as {user}: {codes}")
    ok, codes = paho_connects(port, "alice", "wrong")
    check(not ok, "paho with a wrong password connected")


def run():
    if not os.access(PETREL, os.X_OK):
        print(f"SKIP test_scram.py: no broker binary at {PETREL} (set PETREL_BIN)")
        os._exit(0)
    tmp = tempfile.mkdtemp(prefix="petrel-scram-")
    passwd = os.path.join(tmp, "passwd")
    if shutil.which("mosquitto_passwd"):
        subprocess.run(["mosquitto_passwd", "-c", "-b", passwd, "mosq", "mosq-pw"], check=True)
    else:
        subprocess.run([PETREL, "passwd", "-c", "-b", passwd, "mosq", "mosq-pw"], check=True)
    subprocess.run([PETREL, "passwd", "--hash", "argon2id", "-b", passwd, "argon", "argon-pw"], check=True)
    subprocess.run([PETREL, "passwd", "--hash", "scram-sha-256", "-b", passwd, "alice", "secret"], check=True)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    broker = subprocess.Popen(
        [PETREL, "--tcp", f"127.0.0.1:{port}", "--data-dir", os.path.join(tmp, "data"),
         "--set", f"auth.password_file={passwd}", "--set", "api.enable=false"],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "broker.log"), "w"))
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                check(broker.poll() is None, "the broker exited: " + open(os.path.join(tmp, "broker.log")).read()[-500:])
                time.sleep(0.1)
        body(port)
    finally:
        broker.terminate()
        try:
            broker.wait(5)
        except subprocess.TimeoutExpired:
            broker.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main("test_scram.py", run)
