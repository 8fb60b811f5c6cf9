//! The client against Mosquitto over TCP: v5 and v3.1.1 round trips with QoS 1 and 2.
//! Skipped, with a printed reason, when the `mosquitto` binary is not installed (CI installs
//! it).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use petrel::client::{ClientOptions, Message, QoS, Version};

use super::{connect, next_message, LONG};
use crate::common::unique;

/// A Mosquitto process on a free loopback port, killed on drop.
struct Mosquitto {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Mosquitto {
    fn binary() -> Option<PathBuf> {
        let candidates = [
            "/usr/sbin/mosquitto",
            "/usr/bin/mosquitto",
            "/usr/local/sbin/mosquitto",
        ];
        candidates
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .or_else(|| {
                let out = Command::new("which").arg("mosquitto").output().ok()?;
                let path = String::from_utf8(out.stdout).ok()?;
                Some(PathBuf::from(path.trim())).filter(|p| p.exists())
            })
    }

    async fn start() -> Option<Self> {
        let Some(binary) = Self::binary() else {
            eprintln!("skipped: the mosquitto binary is not installed (apt-get install mosquitto)");
            return None;
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!(
            "petrel-mosquitto-{}-{}",
            std::process::id(),
            unique("conf")
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("mosquitto.conf");
        std::fs::write(
            &config,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .unwrap();
        let child = Command::new(binary)
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        let broker = Self { child, port, dir };
        // Ready when it accepts connections.
        let deadline = tokio::time::Instant::now() + LONG;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "mosquitto did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Some(broker)
    }

    fn options(&self, version: Version) -> ClientOptions {
        ClientOptions::new(&format!("mqtt://127.0.0.1:{}", self.port))
            .unwrap()
            .client_id(unique("petrel-mosq"))
            .version(version)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn round_trip(version: Version) {
    let Some(mosquitto) = Mosquitto::start().await else {
        return;
    };
    let topic = unique("mosq");
    let (sub, mut events) = connect(mosquitto.options(version)).await;
    assert_eq!(
        sub.subscribe(&format!("{topic}/#"), QoS::ExactlyOnce)
            .await
            .unwrap(),
        QoS::ExactlyOnce
    );
    let (publisher, _e) = connect(mosquitto.options(version)).await;
    for qos in [QoS::AtLeastOnce, QoS::ExactlyOnce] {
        for n in 0..20 {
            let payload = format!("{}-{n}", qos as u8);
            let outcome = publisher
                .publish(Message::new(format!("{topic}/x"), payload.clone()).qos(qos))
                .await
                .unwrap();
            assert!(outcome.packet_id.is_some());
            let got = next_message(&mut events).await;
            assert_eq!((got.payload, got.qos), (payload.into(), qos));
        }
    }
    publisher.disconnect().await.unwrap();
    sub.disconnect().await.unwrap();
}

#[tokio::test]
async fn mosquitto_v5_round_trip_qos_1_and_2() {
    round_trip(Version::V5).await;
}

#[tokio::test]
async fn mosquitto_v311_round_trip_qos_1_and_2() {
    round_trip(Version::V311).await;
}
