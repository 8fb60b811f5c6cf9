#!/usr/bin/env python3
"""The authentication chain with real clients: paho-mqtt against a Petrel this script starts
itself, with tokens signed by PyJWT and an HTTP authentication service written here.

Unlike the other test_*.py scripts this one owns its broker (it needs a configuration of its
own): it starts PETREL_BIN (default target/debug/petrel from the repository root) on a free
port with a temporary config whose chain is

    password_file (Mosquitto's format, written by `petrel passwd -b`)
    -> jwt HS256 (secret, verify_claims clientid = ${clientid})
    -> jwt RS256 (public_key file)
    -> jwt ES256 (jwks_file, found by kid)
    -> jwt ES256 (use_jwks: a JWKS endpoint, fetched from the local service)
    -> http (POST to the local service, EMQX's placeholders in the body)

and checks, for MQTT 3.1.1 and 5.0, the CONNACK codes paho sees: accepted (0); a wrong
password, an expired token, a token of another key, an unknown user 0x86 (3.1.1: 4); the
HTTP service's "deny" and an anonymous client 0x87 (3.1.1: 5). Then a token's `acl` claim
(EMQX's object form) limits the connection: a SUBSCRIBE outside it gets 0x87 (3.1.1: 0x80),
a QoS 1 PUBLISH outside it gets PUBACK 0x87 (5.0; 3.1.1: acknowledged and dropped), and the
topics it grants work. The HTTP service saw clientid, username, password, peerhost and
listener.

Needs: pip install paho-mqtt pyjwt cryptography (.ci/run installs them), a built petrel.
Prints "PASS test_auth_backends ..." / "FAIL ..." / "SKIP ..." and exits 0 / 1 / 0.
"""

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import interop_common
from interop_common import (Collector, MQTTv311, MQTTv5, check, close, main, new_client,
                            mqtt_client, subscribe, uid, WAIT, QUIET)

NAME = "test_auth_backends"
HERE = os.path.dirname(os.path.abspath(__file__))
BINARY = os.environ.get("PETREL_BIN",
                        os.path.join(HERE, "..", "..", "target", "debug", "petrel"))

try:
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
except ImportError as e:  # pragma: no cover - reported as a skip
    print(f"SKIP {NAME}: {e.name} is not installed (pip install pyjwt cryptography)")
    sys.exit(0)

SECRET = "interop-" + uid(32)
PROTO_NAMES = {MQTTv311: "v311", MQTTv5: "v5"}
# CONNACK codes as paho reports them: (3.1.1 return code, 5.0 reason code).
ACCEPTED = (0, 0)
BAD_CREDENTIALS = (4, 0x86)
NOT_AUTHORIZED = (5, 0x87)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class AuthService(http.server.BaseHTTPRequestHandler):
    """EMQX's HTTP authentication contract: 200 + {"result": ...}, 204 for allow."""
    requests = []
    lock = threading.Lock()
    jwks = b"{}"

    def do_GET(self):
        if self.path == "/jwks":
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(AuthService.jwks)))
            self.end_headers()
            self.wfile.write(AuthService.jwks)
        else:
            self.answer(404, None)

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        with AuthService.lock:
            AuthService.requests.append(body)
        user, password = body.get("username"), body.get("password")
        if user == "http-user" and password == "http-pass":
            self.answer(200, {"result": "allow", "is_superuser": False})
        elif user == "http-quiet" and password == "http-pass":
            self.answer(204, None)
        elif user == "http-denied":
            self.answer(200, {"result": "deny"})
        elif user == "http-broken":
            self.answer(500, None)
        else:
            self.answer(200, {"result": "ignore"})

    def answer(self, status, body):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class Setup:
    """Keys, files, the HTTP service and the broker."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="petrel-auth-interop-")
        self.proc = None
        self.http = None

    def start(self):
        # Keys: RS256 (a PEM file), ES256 (a JWKS file with a kid).
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        rsa_pem = self.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        rsa_path = os.path.join(self.dir, "rsa.pem")
        with open(rsa_path, "wb") as f:
            f.write(rsa_pem)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key()))
        jwk["kid"] = "fleet-1"
        jwks_path = os.path.join(self.dir, "jwks.json")
        with open(jwks_path, "w") as f:
            json.dump({"keys": [jwk]}, f)
        # Another ES256 key, served by the HTTP service as a JWKS endpoint.
        self.remote = ec.generate_private_key(ec.SECP256R1())
        remote = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.remote.public_key()))
        remote["kid"] = "remote-1"
        AuthService.jwks = json.dumps({"keys": [remote]}).encode()
        # A password file written by petrel passwd (Mosquitto's format).
        passwd = os.path.join(self.dir, "passwd")
        subprocess.run([BINARY, "passwd", "-c", "-b", passwd, "alice", "alice-pw"],
                       check=True, timeout=30, capture_output=True)
        # The HTTP service.
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AuthService)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        http_port = self.http.server_address[1]

        self.port = free_port()
        config = os.path.join(self.dir, "petrel.toml")
        with open(config, "w") as f:
            f.write(f"""
[auth]
password_file = "{passwd}"

[[auth.authentication]]
mechanism = "jwt"
secret = "{SECRET}"
verify_claims = {{ clientid = "${{clientid}}" }}

[[auth.authentication]]
mechanism = "jwt"
algorithm = "public-key"
public_key = "{rsa_path}"

[[auth.authentication]]
mechanism = "jwt"
jwks_file = "{jwks_path}"

[[auth.authentication]]
mechanism = "jwt"
use_jwks = true
endpoint = "http://127.0.0.1:{http_port}/jwks"
refresh_interval = 300

[[auth.authentication]]
mechanism = "password_based"
backend = "http"
method = "post"
url = "http://127.0.0.1:{http_port}/auth"
body = {{ clientid = "${{clientid}}", username = "${{username}}", password = "${{password}}", peerhost = "${{peerhost}}", listener = "${{listener}}" }}
request_timeout = "5s"
pool_size = 4
cache_ttl = "0s"
""")
        self.log = open(os.path.join(self.dir, "broker.log"), "wb")
        self.proc = subprocess.Popen(
            [BINARY, "--config", config, "--tcp", f"127.0.0.1:{self.port}",
             "--data-dir", os.path.join(self.dir, "data"), "--set", "api.bind=127.0.0.1:0"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            check(self.proc.poll() is None, f"the broker exited: {self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            check(False, f"the broker did not listen within 20 s: {self.log_tail()}")
        interop_common.PORT = self.port

    def log_tail(self):
        try:
            with open(os.path.join(self.dir, "broker.log"), "rb") as f:
                return f.read()[-1500:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.http is not None:
            self.http.shutdown()
        shutil.rmtree(self.dir, ignore_errors=True)


def token(key, alg, claims, kid=None):
    claims = dict(claims)
    claims.setdefault("exp", int(time.time()) + 300)
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


def connack(proto, client_id, username=None, password=None):
    """CONNECT and return paho's CONNACK code (closing the connection after)."""
    c = new_client(client_id, proto)
    if username is not None or password is not None:
        c.username_pw_set(username, password)
    col = Collector().attach(c)
    c.connect(interop_common.HOST, interop_common.PORT, keepalive=30)
    c.loop_start()
    # A refusal is answered after the broker's one-second failure delay.
    ok = col.wait(lambda: len(col.connacks) >= 1, timeout=WAIT + 2)
    code = col.connacks[0][1] if ok else None
    close(c)
    check(ok, f"{PROTO_NAMES[proto]} {client_id}: no CONNACK")
    return code


def expect(proto, what, codes, **kw):
    want = codes[0] if proto == MQTTv311 else codes[1]
    got = connack(proto, f"auth-{uid()}", **kw) if "client_id" not in kw else connack(proto, **kw)
    check(got == want, f"{PROTO_NAMES[proto]} {what}: CONNACK {got}, expected {want}")


def connect_codes(setup, proto):
    now = int(time.time())
    hs = lambda claims, cid: token(SECRET, "HS256", dict(claims, clientid=cid))  # noqa: E731
    # The password file, first in the chain.
    expect(proto, "password file user", ACCEPTED, username="alice", password="alice-pw")
    expect(proto, "wrong password", BAD_CREDENTIALS, username="alice", password="nope")
    # JWT, each key in turn; the token in the password field, any username.
    cid = f"car-{uid()}"
    expect(proto, "HS256 token", ACCEPTED, client_id=cid, username="car", password=hs({}, cid))
    expect(proto, "RS256 token", ACCEPTED, username="car",
           password=token(setup.rsa, "RS256", {}))
    expect(proto, "ES256 token from the JWKS file", ACCEPTED, username="car",
           password=token(setup.ec, "ES256", {}, kid="fleet-1"))
    expect(proto, "ES256 token from the JWKS endpoint", ACCEPTED, username="car",
           password=token(setup.remote, "ES256", {}, kid="remote-1"))
    expect(proto, "expired token", BAD_CREDENTIALS, client_id=cid, username="car",
           password=hs({"exp": now - 10}, cid))
    expect(proto, "token not valid yet", BAD_CREDENTIALS, client_id=cid, username="car",
           password=hs({"nbf": now + 600}, cid))
    expect(proto, "token for another client id", BAD_CREDENTIALS, client_id=cid,
           username="car", password=hs({}, "someone-else"))
    expect(proto, "token of another key", BAD_CREDENTIALS, username="car",
           password=token("not-our-secret-" + uid(32), "HS256", {}))
    # The HTTP service, last.
    expect(proto, "HTTP allow", ACCEPTED, username="http-user", password="http-pass")
    expect(proto, "HTTP 204", ACCEPTED, username="http-quiet", password="http-pass")
    expect(proto, "HTTP deny", NOT_AUTHORIZED, username="http-denied", password="x")
    expect(proto, "HTTP 500 (ignored: no source left)", BAD_CREDENTIALS,
           username="http-broken", password="x")
    expect(proto, "unknown user", BAD_CREDENTIALS, username="nobody", password="x")
    # Sources are configured: anonymous clients are refused, even from loopback.
    expect(proto, "anonymous", NOT_AUTHORIZED)


def acl_claim(proto):
    """A token's acl claim limits the connection; v5 sees 0x87 on SUBACK and PUBACK."""
    tag = PROTO_NAMES[proto]
    base = f"petrel/it/auth/{uid()}"
    cid = f"acl-{tag}-{uid()}"
    claims = {"clientid": cid, "acl": {"pub": [f"{base}/up"], "sub": [f"{base}/down/#"],
                                      "all": [f"{base}/both"]}}
    password = token(SECRET, "HS256", claims)

    kwargs = dict(client_id=cid, protocol=proto, transport="tcp", reconnect_on_failure=False)
    if hasattr(mqtt_client, "CallbackAPIVersion"):
        kwargs["callback_api_version"] = mqtt_client.CallbackAPIVersion.VERSION2
    c = mqtt_client.Client(**kwargs)
    c.username_pw_set("car", password)
    state = {"connack": None, "pubacks": {}, "subacks": {}, "messages": []}
    cond = threading.Condition()

    def on_connect(client, userdata, flags, reason_code, properties=None):
        with cond:
            state["connack"] = reason_code.value if hasattr(reason_code, "value") else reason_code
            cond.notify_all()

    def on_publish(client, userdata, mid, reason_code=None, properties=None):
        with cond:
            code = reason_code.value if hasattr(reason_code, "value") else (reason_code or 0)
            state["pubacks"][mid] = code
            cond.notify_all()

    def on_subscribe(client, userdata, mid, reason_codes, properties=None):
        with cond:
            state["subacks"][mid] = [r.value if hasattr(r, "value") else r for r in reason_codes]
            cond.notify_all()

    def on_message(client, userdata, msg):
        with cond:
            state["messages"].append(msg.topic)
            cond.notify_all()

    c.on_connect, c.on_publish = on_connect, on_publish
    c.on_subscribe, c.on_message = on_subscribe, on_message

    def wait(pred, what):
        with cond:
            check(cond.wait_for(pred, timeout=WAIT), f"{tag} acl claim: {what}")

    c.connect(interop_common.HOST, interop_common.PORT, keepalive=30)
    c.loop_start()
    try:
        wait(lambda: state["connack"] is not None, "no CONNACK")
        check(state["connack"] == 0, f"{tag} acl claim: CONNACK {state['connack']}")
        denied = 0x87 if proto == MQTTv5 else 0x80
        for topic, want in ((f"{base}/down/#", 0), (f"{base}/both", 0),
                            (f"{base}/up", denied), ("#", denied)):
            _, mid = c.subscribe(topic, 0)
            wait(lambda: mid in state["subacks"], f"no SUBACK for {topic}")
            got = state["subacks"][mid][0]
            ok = got == want if want == denied else got < 0x80
            check(ok, f"{tag} acl claim: SUBSCRIBE {topic}: {got:#x}, expected {want:#x}")
        for topic, allowed in ((f"{base}/up", True), (f"{base}/down/x", False)):
            info = c.publish(topic, b"x", qos=1)
            wait(lambda: info.mid in state["pubacks"], f"no PUBACK for {topic}")
            got = state["pubacks"][info.mid]
            want = 0 if allowed or proto == MQTTv311 else 0x87
            check(got == want, f"{tag} acl claim: PUBLISH {topic}: PUBACK {got:#x}, expected {want:#x}")
        # Granted both ways: a message to `both` comes back; the denied publish never arrives.
        info = c.publish(f"{base}/both", b"y", qos=1)
        wait(lambda: f"{base}/both" in state["messages"], "the message on a granted topic")
        time.sleep(QUIET)
        with cond:
            check(f"{base}/down/x" not in state["messages"],
                  f"{tag} acl claim: the denied PUBLISH was routed")
    finally:
        close(c)


def body():
    if not os.path.exists(BINARY):
        print(f"SKIP {NAME}: {BINARY} not built (cargo build, or set PETREL_BIN)")
        sys.exit(0)
    setup = Setup()
    try:
        setup.start()
        for proto in (MQTTv311, MQTTv5):
            connect_codes(setup, proto)
            acl_claim(proto)
        with AuthService.lock:
            seen = [r for r in AuthService.requests if r.get("username") == "http-user"]
        check(seen, "the HTTP service saw no request for http-user")
        r = seen[0]
        check(r.get("password") == "http-pass" and r.get("peerhost") == "127.0.0.1"
              and r.get("listener") == "tcp:default" and r.get("clientid", "").startswith("auth-"),
              f"the HTTP service's request lacks EMQX's placeholders: {r}")
    except Exception:
        if os.environ.get("INTEROP_DEBUG"):
            print(setup.log_tail(), file=sys.stderr)
        raise
    finally:
        setup.stop()


if __name__ == "__main__":
    main(NAME, body)
