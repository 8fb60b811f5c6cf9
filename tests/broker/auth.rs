//! Authentication and authorization with Mosquitto's own tools and files: a password file made
//! by `mosquitto_passwd`, `mosquitto_pub`/`mosquitto_sub` with `-u`/`-P`, paho-mqtt seeing
//! the v5 reason codes of ACL denials, retained messages checked again on delivery, and a
//! SIGHUP reload of a running `petrel` process that keeps its connections. The Mosquitto
//! tools and paho are installed by `.ci/run`; without them a test says so and is skipped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use petrel::codec::{ProtocolVersion, QoS, ReasonCode};
use tokio::process::Command;

use crate::common::{connect_packet, publish_struct, unique, RawClient, TestBroker};

const TOOL_TIMEOUT: Duration = Duration::from_secs(20);

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "petrel-auth-{}-{}",
        std::process::id(),
        unique(name)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn have(tool: &str) -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("skipped: {tool} is not installed (.ci/run installs it)");
    }
    found
}

/// Runs a command to completion within [`TOOL_TIMEOUT`]: (success, stdout, stderr).
async fn run(command: &mut Command) -> (bool, String, String) {
    command.kill_on_drop(true).stdin(Stdio::null());
    let output = tokio::time::timeout(TOOL_TIMEOUT, command.output())
        .await
        .expect("the tool finishes in time")
        .expect("the tool runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A password file written by `mosquitto_passwd` itself.
async fn mosquitto_passwd(dir: &Path, users: &[(&str, &str)]) -> PathBuf {
    let path = dir.join("passwd");
    for (i, (user, password)) in users.iter().enumerate() {
        let mut command = Command::new("mosquitto_passwd");
        if i == 0 {
            command.arg("-c");
        }
        let (ok, _, err) = run(command.arg("-b").arg(&path).args([user, password])).await;
        assert!(ok, "mosquitto_passwd failed: {err}");
    }
    path
}

fn mosquitto_pub(port: u16, topic: &str, credentials: Option<(&str, &str)>) -> Command {
    let mut command = Command::new("mosquitto_pub");
    command.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-t",
        topic,
        "-m",
        "hi",
        "-q",
        "1",
    ]);
    if let Some((user, password)) = credentials {
        command.args(["-u", user, "-P", password]);
    }
    command
}

#[tokio::test]
async fn auth_mosquitto_passwd_file_loads_unchanged() {
    if !have("mosquitto_passwd") || !have("mosquitto_pub") || !have("mosquitto_sub") {
        return;
    }
    let dir = temp_dir("passwd");
    let file = mosquitto_passwd(&dir, &[("alice", "s3cret"), ("bob", "hunter2")]).await;
    let broker = TestBroker::start_with(|c| c.auth.password_file = Some(file.clone())).await;
    let port = broker.addr.port();
    let topic = unique("auth/passwd");

    let mut sub = Command::new("mosquitto_sub");
    sub.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-t",
        &topic,
        "-q",
        "1",
        "-C",
        "1",
    ])
    .args(["-W", "15", "-u", "bob", "-P", "hunter2"])
    .stdout(Stdio::piped())
    .kill_on_drop(true);
    let sub = sub.spawn().unwrap();
    let received = tokio::spawn(sub.wait_with_output());

    // mosquitto_sub gives no sign of having subscribed: publish until it has the message.
    let mut published = 0;
    while !received.is_finished() && published < 40 {
        let (ok, _, err) = run(&mut mosquitto_pub(port, &topic, Some(("alice", "s3cret")))).await;
        assert!(ok, "alice's publish refused: {err}");
        published += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let output = received.await.unwrap().unwrap();
    assert!(output.status.success(), "bob's subscriber got nothing");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "hi");

    for (credentials, expected) in [
        (Some(("alice", "wrong")), "bad user name or password"),
        (Some(("mallory", "s3cret")), "bad user name or password"),
        (None, "not authorised"),
    ] {
        let (ok, _, err) = run(&mut mosquitto_pub(port, &topic, credentials)).await;
        assert!(!ok, "{credentials:?} was accepted");
        assert!(
            err.to_lowercase().contains(expected),
            "{credentials:?}: {err}"
        );
    }
    let failures = broker
        .running
        .broker
        .metrics
        .auth_failures
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(failures, 3);
    broker.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn auth_allow_anonymous_false_refuses_loopback_with_the_v311_and_v5_codes() {
    let broker = TestBroker::start_with(|c| c.auth.allow_anonymous = Some(false)).await;
    for (version, code) in [
        (ProtocolVersion::V311, ReasonCode::NOT_AUTHORIZED),
        (ProtocolVersion::V5, ReasonCode::NOT_AUTHORIZED),
    ] {
        let (mut client, connack) =
            RawClient::connect_with(broker.addr, connect_packet(version, &unique("anon"))).await;
        assert_eq!(connack.code, code, "{version:?}");
        client.expect_eof().await;
    }
    broker.shutdown().await;
}

const ACL: &str = "\
user admin
topic readwrite #

user reader
topic read acl/#
topic deny acl/secret
pattern write acl/devices/%c
";

#[tokio::test]
async fn auth_acl_checks_subscribe_publish_and_retained_delivery() {
    let dir = temp_dir("acl");
    let mut passwords = petrel::auth::password::PasswordFile::default();
    for user in ["admin", "reader"] {
        passwords.set(
            user,
            petrel::auth::password::PasswordHash::new_pbkdf2(b"pw"),
        );
    }
    let password_file = dir.join("passwd");
    std::fs::write(&password_file, passwords.to_text()).unwrap();
    let acl_file = dir.join("acl");
    std::fs::write(&acl_file, ACL).unwrap();
    let broker = TestBroker::start_with(|c| {
        c.auth.password_file = Some(password_file.clone());
        c.auth.acl_file = Some(acl_file.clone());
    })
    .await;

    let login = |user: &str, version| {
        let mut connect = connect_packet(version, &unique(user));
        connect.username = Some(user.to_owned());
        connect.password = Some(bytes::Bytes::from_static(b"pw"));
        connect
    };
    // The admin stores a retained message the reader may read, and one it may not.
    let (mut admin, _) =
        RawClient::connect_ok(broker.addr, login("admin", ProtocolVersion::V5)).await;
    for topic in ["acl/public", "acl/secret"] {
        let mut publish = publish_struct(topic, QoS::AtLeastOnce, Some(1), topic.as_bytes());
        publish.retain = true;
        admin.publish_acked(publish).await;
    }

    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let connect = login("reader", version);
        let client_id = connect.client_id.clone();
        let (mut reader, _) = RawClient::connect_ok(broker.addr, connect).await;
        let denied = if version.is_v5() {
            ReasonCode::NOT_AUTHORIZED
        } else {
            ReasonCode::UNSPECIFIED_ERROR // 3.1.1's 0x80
        };
        // Not covered by `acl/#`: refused per filter.
        let reasons = reader
            .subscribe_codes(1, &["#", "other/+"], QoS::AtLeastOnce)
            .await;
        assert_eq!(reasons, [denied, denied], "{version:?}");
        // Covered: granted, and the retained message on the denied topic is not delivered.
        let reasons = reader
            .subscribe_codes(2, &["acl/#"], QoS::AtLeastOnce)
            .await;
        assert_eq!(reasons, [ReasonCode::GRANTED_QOS_1], "{version:?}");
        let first = reader.expect_publish().await;
        assert_eq!(first.topic, "acl/public");
        reader.expect_silence().await;

        // Publishing: its own device topic is allowed; `acl/public` is read-only.
        let own = format!("acl/devices/{client_id}");
        let (ack, mut seen) = reader
            .publish_ack(publish_struct(&own, QoS::AtLeastOnce, Some(7), b"ok"))
            .await;
        assert_eq!(ack, ReasonCode::SUCCESS, "{version:?}");
        if seen.is_empty() {
            seen.push(reader.expect_publish().await);
        }
        assert_eq!(seen[0].topic, own);
        let (ack, seen) = reader
            .publish_ack(publish_struct(
                "acl/public",
                QoS::AtLeastOnce,
                Some(8),
                b"no",
            ))
            .await;
        // MQTT 5 hears 0x87; 3.1.1 has no negative ack: acknowledged and dropped.
        let expected = if version.is_v5() {
            ReasonCode::NOT_AUTHORIZED
        } else {
            ReasonCode::SUCCESS
        };
        assert_eq!(ack, expected, "{version:?}");
        assert!(seen.is_empty(), "a denied publish was delivered: {seen:?}");
        reader.expect_silence().await;
        reader.disconnect().await;
    }
    let denied = broker
        .running
        .broker
        .metrics
        .acl_denied
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(denied >= 8, "denials counted: {denied}");
    broker.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// paho-mqtt, as our users write it: v5 reason codes of a denied SUBSCRIBE and PUBLISH.
#[tokio::test]
async fn auth_acl_denials_seen_by_paho_v5() {
    if !have("python3") {
        return;
    }
    let probe = run(Command::new("python3").args(["-c", "import paho.mqtt"])).await;
    if !probe.0 {
        eprintln!("skipped: paho-mqtt is not installed (.ci/run installs it)");
        return;
    }
    let dir = temp_dir("paho");
    let mut passwords = petrel::auth::password::PasswordFile::default();
    passwords.set(
        "reader",
        petrel::auth::password::PasswordHash::new_pbkdf2(b"pw"),
    );
    let password_file = dir.join("passwd");
    std::fs::write(&password_file, passwords.to_text()).unwrap();
    let acl_file = dir.join("acl");
    std::fs::write(&acl_file, ACL).unwrap();
    let broker = TestBroker::start_with(|c| {
        c.auth.password_file = Some(password_file.clone());
        c.auth.acl_file = Some(acl_file.clone());
    })
    .await;
    let script = r#"
import sys, threading
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
port = int(sys.argv[1])
done = threading.Event()
results = {}
def on_connect(c, userdata, flags, rc, props):
    results["connect"] = rc.value
    c.subscribe([("secret/#", 1), ("acl/#", 1)])
def on_subscribe(c, userdata, mid, rcs, props):
    results["suback"] = [rc.value for rc in rcs]
    c.publish("acl/public", b"x", qos=1)
def on_publish(c, userdata, mid, rc, props):
    results["puback"] = rc.value
    done.set()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-reader", protocol=mqtt.MQTTv5)
c.username_pw_set("reader", "pw")
c.on_connect, c.on_subscribe, c.on_publish = on_connect, on_subscribe, on_publish
c.connect("127.0.0.1", port)
c.loop_start()
ok = done.wait(10)
c.disconnect(); c.loop_stop()
print(results)
sys.exit(0 if ok else 1)
"#;
    let (ok, out, err) =
        run(Command::new("python3").args(["-c", script, &broker.addr.port().to_string()])).await;
    assert!(ok, "paho script failed: {out} {err}");
    assert!(out.contains("'connect': 0"), "{out}");
    assert!(out.contains("'suback': [135, 1]"), "{out}");
    assert!(out.contains("'puback': 135"), "{out}");
    broker.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A running `petrel` process reloads its password file on SIGHUP: the new password works,
/// the old one no longer does, a bad file keeps the rules, and a connected subscriber stays.
#[tokio::test]
async fn auth_sighup_reloads_the_password_file_without_dropping_connections() {
    if !have("mosquitto_pub") || !have("mosquitto_sub") || !have("kill") {
        return;
    }
    let dir = temp_dir("hup");
    let write = |password: &[u8]| {
        let mut file = petrel::auth::password::PasswordFile::default();
        file.set(
            "alice",
            petrel::auth::password::PasswordHash::new_pbkdf2(password),
        );
        std::fs::write(dir.join("passwd"), file.to_text()).unwrap();
    };
    write(b"old");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut broker = Command::new(env!("CARGO_BIN_EXE_petrel"))
        .args(["--tcp", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.join("data"))
        .args(["--set", "api.bind=127.0.0.1:0"])
        .arg("--set")
        .arg(format!(
            "auth.password_file={}",
            dir.join("passwd").display()
        ))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("broker.log")).unwrap())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = broker.id().unwrap().to_string();
    let topic = unique("auth/hup");
    let publish = |password: &str| mosquitto_pub(port, &topic, Some(("alice", password)));

    // Wait for the broker to listen (bounded).
    let mut ready = false;
    for _ in 0..100 {
        if run(&mut publish("old")).await.0 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "the broker did not start");

    let mut sub = Command::new("mosquitto_sub");
    sub.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-t",
        &topic,
        "-q",
        "1",
        "-C",
        "1",
    ])
    .args(["-W", "30", "-u", "alice", "-P", "old", "-i", "hup-sub"])
    .stdout(Stdio::piped())
    .kill_on_drop(true);
    let sub = sub.spawn().unwrap();
    let received = tokio::spawn(sub.wait_with_output());
    tokio::time::sleep(Duration::from_millis(500)).await;

    let reload = || async {
        let (ok, _, err) = run(Command::new("kill").args(["-HUP", &pid])).await;
        assert!(ok, "kill -HUP: {err}");
    };
    // A broken file keeps the old rules.
    std::fs::write(dir.join("passwd"), "alice\n").unwrap();
    reload().await;
    // The reload runs on the broker's own time: wait until it has refused the broken file
    // (its log names the line) before the file changes again (bounded).
    let mut refused = false;
    for _ in 0..100 {
        let log = std::fs::read_to_string(dir.join("broker.log")).unwrap_or_default();
        if log.contains("line 1") {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "the broken file's reload was not logged");
    write(b"new");
    // Not reloaded yet: "new" is refused until SIGHUP.
    assert!(
        !run(&mut publish("new")).await.0,
        "accepted before the reload"
    );
    reload().await;
    let mut switched = false;
    for _ in 0..50 {
        if run(&mut publish("new")).await.0 {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(switched, "the new password never worked");
    assert!(
        !run(&mut publish("old")).await.0,
        "the old password still works"
    );

    // The subscriber connected before both reloads is still there and got the message.
    let output = received.await.unwrap().unwrap();
    assert!(output.status.success(), "the subscriber was dropped");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "hi");
    let _ = broker.kill().await;
    let _ = std::fs::remove_dir_all(dir);
}
