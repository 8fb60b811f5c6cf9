//! The durable store (issue 13): the broker as a child process on a data directory of its
//! own, killed with SIGKILL and started again; a torn tail, a damaged store, a full store.
//! (The long crash-under-load run with paho-mqtt is `tests/interop/crash_restart.py`.)

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use petrel::codec::{Ack, Connect, Packet, PacketId, ProtocolVersion, QoS, ReasonCode};

use crate::common::*;

/// A broker process on `dir`, listening on one loopback TCP port.
struct Process {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
    log: PathBuf,
    /// Arguments beyond `--tcp` and `--data-dir`, given again on every restart.
    extra: Vec<String>,
}

fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

impl Process {
    fn start(dir: &Path, extra: &[&str]) -> Self {
        let addr = free_addr();
        let log = dir.with_extension("log");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let child = Self::spawn(dir, addr, &log, &extra);
        let mut this = Self {
            child,
            addr,
            dir: dir.to_owned(),
            log,
            extra,
        };
        this.wait_listening();
        this
    }

    fn spawn(dir: &Path, addr: SocketAddr, log: &Path, extra: &[String]) -> Child {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        Command::new(env!("CARGO_BIN_EXE_petrel"))
            .arg("--tcp")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(dir)
            .args(["--set", "api.bind=127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn wait_listening(&mut self) {
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("broker exited at start ({status}): {}", self.log_text());
            }
            if std::net::TcpStream::connect(self.addr).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("broker did not listen: {}", self.log_text());
    }

    /// SIGKILL, then the same directory and port again.
    fn crash_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = Self::spawn(&self.dir, self.addr, &self.log, &self.extra);
        self.wait_listening();
    }

    /// SIGTERM (a graceful stop), then the same directory and port again.
    fn stop_and_restart(&mut self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        let exited = self.child.wait().unwrap();
        assert!(exited.success(), "a graceful stop exits 0: {exited}");
        self.child = Self::spawn(&self.dir, self.addr, &self.log, &self.extra);
        self.wait_listening();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The broker's log, without terminal colours.
    fn log_text(&self) -> String {
        let raw = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut text = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                text.push(c);
            }
        }
        text
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn persistent(version: ProtocolVersion, client_id: &str) -> Connect {
    let mut connect = connect_packet(version, client_id);
    connect.clean_start = false;
    if version == ProtocolVersion::V5 {
        connect.properties.session_expiry_interval = Some(600);
    }
    connect
}

#[tokio::test]
async fn durable_sigkill_keeps_sessions_queues_retained_and_inbound_qos2() {
    let dir = TempDir(temp_data_dir("durable-kill"));
    let mut broker = Process::start(&dir.0, &[]);

    // A persistent v5 subscriber, offline when the messages come.
    let (mut sub, _) =
        RawClient::connect_ok(broker.addr, persistent(ProtocolVersion::V5, "d-sub")).await;
    sub.subscribe(1, "d/#", QoS::ExactlyOnce).await;
    sub.disconnect().await;

    // rumqttc publishes QoS 1 and a retained message; each is acknowledged.
    let mut publisher = V4::connect(broker.addr, "d-pub").await;
    for i in 0..20u8 {
        publisher
            .publish("d/q1", rumqttc::QoS::AtLeastOnce, false, &[i])
            .await;
    }
    publisher
        .publish("d/retained", rumqttc::QoS::AtLeastOnce, true, b"kept")
        .await;
    publisher.disconnect().await;

    // A QoS 2 message acknowledged with PUBREC, its PUBREL not yet sent.
    let (mut half, _) =
        RawClient::connect_ok(broker.addr, persistent(ProtocolVersion::V5, "d-half")).await;
    half.send(&publish("d/q2", QoS::ExactlyOnce, Some(9), b"once"))
        .await;
    assert!(
        matches!(half.expect_packet().await, Packet::PubRec(a) if a.reason == ReasonCode::SUCCESS)
    );

    broker.crash_and_restart();

    // The PUBREL after the restart completes it: PUBCOMP 0x00, not 0x92.
    let (mut half, connack) =
        RawClient::connect_ok(broker.addr, persistent(ProtocolVersion::V5, "d-half")).await;
    assert!(connack.session_present, "the publisher's session survived");
    half.send(&Packet::PubRel(Ack::new(PacketId(9), ReasonCode::SUCCESS)))
        .await;
    match half.expect_packet().await {
        Packet::PubComp(ack) => assert_eq!(
            (ack.packet_id, ack.reason),
            (PacketId(9), ReasonCode::SUCCESS)
        ),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    // A resend of the same PUBLISH before the PUBREL would not have been routed twice; and
    // the subscriber gets everything, its subscription intact, the QoS 2 message once.
    let (mut sub, connack) =
        RawClient::connect_ok(broker.addr, persistent(ProtocolVersion::V5, "d-sub")).await;
    assert!(connack.session_present, "the subscriber's session survived");
    let mut q1 = Vec::new();
    let mut q2 = 0;
    let mut retained = 0;
    while q1.len() < 20 || q2 < 1 || retained < 1 {
        let publish = sub.expect_publish().await;
        match (publish.topic.as_str(), publish.qos) {
            ("d/q1" | "d/retained", QoS::AtLeastOnce) => {
                if publish.topic == "d/retained" {
                    retained += 1;
                } else {
                    q1.push(publish.payload[0]);
                }
                sub.puback(&publish).await;
            }
            ("d/q2", QoS::ExactlyOnce) => {
                q2 += 1;
                let id = publish.packet_id.unwrap();
                sub.send(&Packet::PubRec(Ack::new(id, ReasonCode::SUCCESS)))
                    .await;
                assert!(matches!(sub.expect_packet().await, Packet::PubRel(_)));
                sub.send(&Packet::PubComp(Ack::new(id, ReasonCode::SUCCESS)))
                    .await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(q1, (0..20).collect::<Vec<u8>>(), "in order, none lost");
    sub.expect_silence().await;
    drop(sub);

    // The retained message is there for a new subscriber.
    let (mut fresh, _) = RawClient::connect_v5(broker.addr, "d-fresh").await;
    fresh.subscribe(1, "d/retained", QoS::AtLeastOnce).await;
    let retained = fresh.expect_publish().await;
    assert_eq!(
        (&retained.payload[..], retained.retain),
        (&b"kept"[..], true)
    );
}

#[tokio::test]
async fn durable_a_graceful_restart_delivers_everything_once() {
    let dir = TempDir(temp_data_dir("durable-graceful"));
    let mut broker = Process::start(&dir.0, &[]);
    let (mut sub, _) =
        RawClient::connect_ok(broker.addr, persistent(ProtocolVersion::V311, "g-sub")).await;
    sub.subscribe(1, "g/#", QoS::AtLeastOnce).await;
    // Two of five received and left unacknowledged, three still queued, then a clean stop.
    let (mut publisher, _) = RawClient::connect_v311(broker.addr, "g-pub").await;
    for i in 1..=5u16 {
        publisher
            .publish_acked(publish_struct("g/t", QoS::AtLeastOnce, Some(i), &[i as u8]))
            .await;
    }
    let first = sub.expect_publish().await;
    let second = sub.expect_publish().await;
    assert_eq!((first.payload[0], second.payload[0]), (1, 2));
    drop(sub);
    broker.stop_and_restart();
    assert!(broker.log_text().contains("store closed"));
    let (mut sub, connack) =
        RawClient::connect_ok(broker.addr, persistent(ProtocolVersion::V311, "g-sub")).await;
    assert!(connack.session_present);
    let mut got = Vec::new();
    loop {
        match sub.read(QUIET).await {
            Read::Packet(packet) => {
                let Packet::Publish(p) = *packet else {
                    panic!("{packet:?}")
                };
                got.push((p.payload[0], p.dup, p.packet_id));
                sub.puback(&p).await;
            }
            Read::TimedOut => break,
            Read::Closed => panic!("closed"),
        }
    }
    let payloads: Vec<u8> = got.iter().map(|(p, ..)| *p).collect();
    assert_eq!(payloads, [1, 2, 3, 4, 5], "each once, in order: {got:?}");
    // The two in flight went again with DUP and the packet ids they had.
    assert_eq!(
        (got[0].1, got[0].2, got[1].1, got[1].2),
        (true, first.packet_id, true, second.packet_id),
        "{got:?}"
    );
}

#[tokio::test]
async fn durable_an_overflowing_offline_queue_keeps_its_oldest_across_a_crash() {
    // session.max_queued = 10 and queue_full = "drop_new": of 15 acknowledged QoS 1
    // messages the offline session keeps the first 10, on disk; the other 5 are dropped and
    // counted (not stored, so not resurrected by the restart).
    let got = overflow_offline_queue_across_a_crash("drop_new").await;
    assert_eq!(got, (1..=10).collect::<Vec<u8>>());
}

#[tokio::test]
async fn durable_an_overflowing_offline_queue_keeps_everything_by_default() {
    // The default queue_full = "keep": all 15 acknowledged messages survive the crash.
    let got = overflow_offline_queue_across_a_crash("keep").await;
    assert_eq!(got, (1..=15).collect::<Vec<u8>>());
}

async fn overflow_offline_queue_across_a_crash(policy: &str) -> Vec<u8> {
    let dir = TempDir(temp_data_dir(&format!("durable-overflow-{policy}")));
    let policy = format!("session.queue_full={policy}");
    let mut broker = Process::start(
        &dir.0,
        &["--set", "session.max_queued=10", "--set", &policy],
    );
    let (mut sub, _) =
        RawClient::connect_ok(broker.addr, persistent(ProtocolVersion::V311, "o-sub")).await;
    sub.subscribe(1, "o/#", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    let (mut publisher, _) = RawClient::connect_v311(broker.addr, "o-pub").await;
    for i in 1..=15u16 {
        publisher
            .publish_acked(publish_struct("o/t", QoS::AtLeastOnce, Some(i), &[i as u8]))
            .await;
    }
    broker.crash_and_restart();
    let (mut sub, connack) =
        RawClient::connect_ok(broker.addr, persistent(ProtocolVersion::V311, "o-sub")).await;
    assert!(connack.session_present);
    let mut got = Vec::new();
    while got.len() <= 15 {
        match sub.read(QUIET).await {
            Read::Packet(packet) => {
                let Packet::Publish(p) = *packet else {
                    panic!("{packet:?}")
                };
                got.push(p.payload[0]);
                sub.puback(&p).await;
            }
            Read::TimedOut => break,
            Read::Closed => panic!("closed"),
        }
    }
    got
}

#[tokio::test]
async fn durable_expiry_counts_across_the_downtime() {
    let dir = TempDir(temp_data_dir("durable-expiry"));
    let mut broker = Process::start(&dir.0, &[]);
    let mut short = persistent(ProtocolVersion::V5, "d-short");
    short.properties.session_expiry_interval = Some(1);
    let (client, _) = RawClient::connect_ok(broker.addr, short.clone()).await;
    client.disconnect().await;
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "d-expiring").await;
    let mut message = publish_struct("e/retained", QoS::AtLeastOnce, Some(1), b"soon gone");
    message.retain = true;
    message.properties.message_expiry_interval = Some(1);
    publisher.publish_acked(message).await;
    broker.kill();
    // Down for longer than both expiries.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    broker.crash_and_restart();
    let (_, connack) = RawClient::connect_ok(broker.addr, short).await;
    assert!(
        !connack.session_present,
        "a session whose expiry passed while the broker was down is gone"
    );
    let (mut fresh, _) = RawClient::connect_v5(broker.addr, "d-look").await;
    fresh.subscribe(1, "e/#", QoS::AtLeastOnce).await;
    fresh.expect_silence().await;
}

#[tokio::test]
async fn durable_delayed_publishes_survive_a_crash() {
    let dir = TempDir(temp_data_dir("durable-delayed"));
    let mut broker = Process::start(&dir.0, &[]);
    let (mut sub, _) =
        RawClient::connect_ok(broker.addr, persistent(ProtocolVersion::V5, "l-sub")).await;
    sub.subscribe(1, "later/#", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "l-pub").await;
    // One due while the broker is down, one after it is back.
    publisher
        .publish_acked(publish_struct(
            "$delayed/1/later/a",
            QoS::AtLeastOnce,
            Some(1),
            b"a",
        ))
        .await;
    publisher
        .publish_acked(publish_struct(
            "$delayed/4/later/b",
            QoS::AtLeastOnce,
            Some(2),
            b"b",
        ))
        .await;
    broker.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    broker.crash_and_restart();
    let (mut sub, _) =
        RawClient::connect_ok(broker.addr, persistent(ProtocolVersion::V5, "l-sub")).await;
    let first = sub.expect_publish().await;
    assert_eq!(
        first.topic, "later/a",
        "the one due during the downtime, at once"
    );
    sub.puback(&first).await;
    // The other when it is due (bounded wait: it was 4 s from the publish).
    let mut second = None;
    for _ in 0..4 {
        match sub.read(Duration::from_secs(2)).await {
            Read::Packet(packet) => {
                if let Packet::Publish(p) = *packet {
                    second = Some(p);
                    break;
                }
            }
            Read::Closed => panic!("closed"),
            Read::TimedOut => {}
        }
    }
    assert_eq!(second.expect("the later one is published").topic, "later/b");
}

#[tokio::test]
async fn durable_a_quic_multi_stream_session_survives_a_crash() {
    use petrel::client::{Client, ClientOptions, Event, QuicStreams, StreamPolicy};
    let dir = TempDir(temp_data_dir("durable-quic"));
    let quic = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut broker = Process::start(&dir.0, &["--quic", &quic.to_string()]);
    let options = || {
        ClientOptions::new(&format!("quic://{quic}"))
            .unwrap()
            .client_id("q-sub")
            .persistent(600)
            .insecure(true)
            .streams(QuicStreams {
                policy: StreamPolicy::PerTopic,
                ..QuicStreams::default()
            })
            .connect_timeout(Duration::from_secs(5))
    };
    // Subscribed on a data stream of its own, then gone with its session kept.
    let (client, mut events) = Client::connect(options()).await.unwrap();
    client
        .subscribe("qd/#", petrel::client::QoS::AtLeastOnce)
        .await
        .unwrap();
    client.disconnect().await.unwrap();
    drop(events);
    let mut publisher = V4::connect(broker.addr, "q-pub").await;
    for i in 0..10u8 {
        publisher
            .publish("qd/x", rumqttc::QoS::AtLeastOnce, false, &[i])
            .await;
    }
    publisher.disconnect().await;
    broker.crash_and_restart();
    // The session maps back onto the new connection's control stream: everything arrives.
    let (_client, new_events) = Client::connect(options()).await.unwrap();
    events = new_events;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < 10 {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Event::Connected {
                session_present, ..
            })) => assert!(session_present),
            Ok(Some(Event::Message(m))) => got.push(m.payload[0]),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("only {got:?} arrived"),
        }
    }
    assert_eq!(got, (0..10).collect::<Vec<u8>>());
}

#[tokio::test]
async fn durable_a_delayed_will_is_published_once_across_restarts() {
    let dir = TempDir(temp_data_dir("durable-will"));
    let mut broker = Process::start(&dir.0, &[]);
    let (mut watcher, _) =
        RawClient::connect_ok(broker.addr, persistent(ProtocolVersion::V5, "w-watch")).await;
    watcher.subscribe(1, "w/gone", QoS::AtLeastOnce).await;
    let mut connect = persistent(ProtocolVersion::V5, "w-device");
    let mut will = will("w/gone", b"offline", QoS::AtLeastOnce);
    will.properties.will_delay_interval = Some(1);
    connect.will = Some(will);
    let (device, _) = RawClient::connect_ok(broker.addr, connect).await;
    drop(device); // no DISCONNECT: the will is due a second later
    let got = watcher.expect_publish().await;
    assert_eq!(&got.payload[..], b"offline");
    watcher.puback(&got).await;
    // The acknowledgement's record is not waited for (QoS 1 allows a resend): let it commit,
    // so that what follows is about the will alone.
    watcher.expect_silence().await;
    drop(watcher);
    broker.crash_and_restart();
    let (mut watcher, _) =
        RawClient::connect_ok(broker.addr, persistent(ProtocolVersion::V5, "w-watch")).await;
    // Past the will's delay once more: it must not come again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    watcher.expect_silence().await;
}

/// The newest segment of a stopped broker's store.
fn newest_segment(dir: &Path) -> PathBuf {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir.join("store"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("seg-"))
        .collect();
    segments.sort();
    segments.pop().unwrap()
}

async fn retained_payload(addr: SocketAddr, topic: &str) -> Vec<u8> {
    let (mut client, _) = RawClient::connect_v5(addr, &unique("look")).await;
    client.subscribe(1, topic, QoS::AtLeastOnce).await;
    client.expect_publish().await.payload.to_vec()
}

#[tokio::test]
async fn durable_a_torn_tail_is_cut_off_with_a_log_line() {
    let dir = TempDir(temp_data_dir("durable-torn"));
    let mut broker = Process::start(&dir.0, &[]);
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "t-pub").await;
    let mut message = publish_struct("t/r", QoS::AtLeastOnce, Some(1), b"before");
    message.retain = true;
    publisher.publish_acked(message).await;
    broker.kill();
    // Power loss mid-write: a frame header promising more than was written.
    let segment = newest_segment(&dir.0);
    let mut bytes = std::fs::read(&segment).unwrap();
    let len_before = bytes.len();
    bytes.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3, 4, 9, 9, 9]);
    std::fs::write(&segment, &bytes).unwrap();
    broker.crash_and_restart();
    assert_eq!(retained_payload(broker.addr, "t/r").await, b"before");
    let log = broker.log_text();
    assert!(
        log.contains("cut off a torn write") && log.contains("discarded_bytes=11"),
        "{log}"
    );
    assert!(len_before > 0);
}

#[tokio::test]
async fn durable_a_damaged_store_stops_start_up_until_repaired() {
    let dir = TempDir(temp_data_dir("durable-damaged"));
    let mut broker = Process::start(&dir.0, &[]);
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "x-pub").await;
    for (i, topic) in ["x/1", "x/2", "x/3"].into_iter().enumerate() {
        let mut message = publish_struct(topic, QoS::AtLeastOnce, Some(i as u16 + 1), b"v");
        message.retain = true;
        publisher.publish_acked(message).await;
    }
    broker.kill();
    // A byte flipped in the middle of the log, with good frames after it.
    let segment = newest_segment(&dir.0);
    let mut bytes = std::fs::read(&segment).unwrap();
    let middle = 12 + (bytes.len() - 12) / 3;
    bytes[middle] ^= 0x55;
    std::fs::write(&segment, &bytes).unwrap();

    let addr = free_addr();
    let output = Command::new(env!("CARGO_BIN_EXE_petrel"))
        .arg("--tcp")
        .arg(addr.to_string())
        .arg("--data-dir")
        .arg(&dir.0)
        .output()
        .unwrap();
    assert!(!output.status.success(), "it must not start over damage");
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    let store = dir.0.join("store");
    assert!(
        text.contains(&store.display().to_string())
            && text.contains("petrel store check")
            && text.contains("petrel store repair")
            && text.contains("damaged frame"),
        "{text}"
    );
    let check = Command::new(env!("CARGO_BIN_EXE_petrel"))
        .args(["store", "check"])
        .arg(&dir.0)
        .output()
        .unwrap();
    assert!(!check.status.success());
    let repair = Command::new(env!("CARGO_BIN_EXE_petrel"))
        .args(["store", "repair"])
        .arg(&dir.0)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&repair.stdout);
    assert!(repair.status.success(), "{said}");
    assert!(said.contains("originals moved to"), "{said}");
    let check = Command::new(env!("CARGO_BIN_EXE_petrel"))
        .args(["store", "check"])
        .arg(&dir.0)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    // It starts again, keeping what could be read (the commits before the damage).
    let mut again = Process::start(&dir.0, &[]);
    let (mut look, _) = RawClient::connect_v5(again.addr, "x-look").await;
    look.subscribe(1, "x/#", QoS::AtLeastOnce).await;
    let mut kept = 0;
    while let Read::Packet(packet) = look.read(QUIET).await {
        assert!(matches!(*packet, Packet::Publish(_)), "{packet:?}");
        kept += 1;
    }
    assert!(kept < 3, "the damaged commit and what followed it are gone");
    again.kill();
}

#[tokio::test]
async fn durable_a_full_store_answers_quota_exceeded_and_loses_nothing_stored() {
    let broker = TestBroker::start_with(|config| {
        config.storage.max_bytes = 4000;
    })
    .await;
    let (sub, _) =
        RawClient::connect_ok(broker.addr, persistent(ProtocolVersion::V5, "f-sub")).await;
    let mut sub = sub;
    sub.subscribe(1, "f/#", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "f-pub").await;
    let payload = [7u8; 500];
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 1..=20u16 {
        let (code, _) = publisher
            .publish_ack(publish_struct("f/t", QoS::AtLeastOnce, Some(i), &payload))
            .await;
        match code {
            ReasonCode::SUCCESS => accepted.push(i),
            ReasonCode::QUOTA_EXCEEDED => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        !accepted.is_empty() && refused > 0,
        "{accepted:?} {refused}"
    );
    assert_eq!(accepted, (1..=accepted.len() as u16).collect::<Vec<_>>());
    // MQTT 3.1.1 has no negative acknowledgement: the connection closes instead.
    let (mut old, _) = RawClient::connect_v311(broker.addr, "f-old").await;
    old.send(&publish("f/t", QoS::AtLeastOnce, Some(1), &payload))
        .await;
    old.expect_closed().await;
    // Everything accepted is delivered.
    let (mut sub, _) =
        RawClient::connect_ok(broker.addr, persistent(ProtocolVersion::V5, "f-sub")).await;
    for _ in &accepted {
        let got = sub.expect_publish().await;
        assert_eq!(got.payload.len(), 500);
        sub.puback(&got).await;
    }
    sub.expect_silence().await;
    // Acknowledged deliveries free their room.
    let mut room = false;
    for i in 100..140u16 {
        let (code, _) = publisher
            .publish_ack(publish_struct("f/t", QoS::AtLeastOnce, Some(i), &payload))
            .await;
        if code == ReasonCode::SUCCESS {
            room = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(room, "room again once the subscriber acknowledged");
    broker.shutdown().await;
}
