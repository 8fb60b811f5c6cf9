//! Client certificates (mTLS) with the files `petrel certs` writes: `verify = "required"`
//! accepts a certificate from the configured CA and refuses none or a foreign one;
//! `"optional"` accepts both. (That the certificate's CN becomes the username is tested
//! where it is observable: `transport::tls` and the channel tests.)

use std::process::Command;

use petrel::config::{ClientVerify, PeerCertAsUsername};

use super::*;
use crate::common::connect_packet;

/// Runs `petrel certs --out <dir>/<name>`; returns the directory.
fn petrel_certs(dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    let status = Command::new(env!("CARGO_BIN_EXE_petrel"))
        .args(["certs", "--out"])
        .arg(&out)
        .args(["--client-cn", "petrel-client"])
        .output()
        .expect("petrel runs");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    out
}

struct Mtls {
    broker: TransportBroker,
    bundle: PathBuf,
    foreign: PathBuf,
}

impl Mtls {
    async fn start(verify: ClientVerify) -> Self {
        Self::start_with(verify, |_| {}).await
    }

    async fn start_with(
        verify: ClientVerify,
        tweak: impl FnOnce(&mut petrel::config::Config),
    ) -> Self {
        let scratch = std::env::temp_dir().join(format!(
            "petrel-mtls-{}-{}",
            std::process::id(),
            unique("certs")
        ));
        let bundle = petrel_certs(&scratch, "ours");
        let foreign = petrel_certs(&scratch, "foreign");
        let broker = TransportBroker::start_with(|c| {
            for listener in c.listeners.iter_mut().filter(|l| l.kind.uses_tls()) {
                listener.tls.cert = Some(bundle.join("server.pem"));
                listener.tls.key = Some(bundle.join("server.key"));
                listener.tls.verify = verify;
                listener.tls.client_ca = Some(bundle.join("ca.pem"));
                listener.tls.peer_cert_as_username = PeerCertAsUsername::Cn;
            }
            tweak(c);
        })
        .await;
        Self {
            broker,
            bundle,
            foreign,
        }
    }

    /// A raw MQTT client over TLS with `client` (a bundle directory) as its certificate;
    /// `None` when the handshake itself fails.
    async fn raw(&self, client: Option<&Path>) -> Option<Raw> {
        let cert = client.map(|dir| (dir.join("client.pem"), dir.join("client.key")));
        let config = tls_client(
            &self.bundle.join("ca.pem"),
            cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        );
        let stream = tls(self.broker.addr(ListenerKind::Tls), config)
            .await
            .ok()?;
        Some(Raw::new(stream, ProtocolVersion::V311))
    }

    /// CONNECT over TLS: whether a CONNACK comes back.
    async fn connects(&self, client: Option<&Path>) -> bool {
        let Some(mut raw) = self.raw(client).await else {
            return false;
        };
        raw.send(&Packet::Connect(Box::new(connect_packet(
            ProtocolVersion::V311,
            &unique("mtls"),
        ))))
        .await;
        matches!(raw.next().await, Some(Packet::ConnAck(_)))
    }

    async fn shutdown(self) {
        let scratch = self.bundle.parent().map(Path::to_owned);
        self.broker.shutdown().await;
        if let Some(dir) = scratch {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[tokio::test]
async fn tls_mtls_required_accepts_a_client_certificate_from_petrel_certs() {
    let mtls = Mtls::start(ClientVerify::Required).await;
    assert!(mtls.connects(Some(&mtls.bundle)).await);
    // A real client too, over TLS and WSS.
    let read = |f: &str| std::fs::read(mtls.bundle.join(f)).unwrap();
    for kind in [ListenerKind::Tls, ListenerKind::Wss] {
        let tls = || {
            rumqttc_tls(
                read("ca.pem"),
                Some((read("client.pem"), read("client.key"))),
            )
        };
        let options = v4_options_with(&mtls.broker, kind, &unique("mtls-rumqttc"), tls);
        let (client, _) = V4::connect_with(options).await;
        client.disconnect().await;
    }
    mtls.shutdown().await;
}

#[tokio::test]
async fn tls_mtls_required_refuses_a_client_without_a_certificate() {
    let mtls = Mtls::start(ClientVerify::Required).await;
    assert!(!mtls.connects(None).await);
    mtls.shutdown().await;
}

#[tokio::test]
async fn tls_mtls_required_refuses_a_certificate_from_another_ca() {
    let mtls = Mtls::start(ClientVerify::Required).await;
    assert!(!mtls.connects(Some(&mtls.foreign)).await);
    // The refusals left the listener serving.
    assert!(mtls.connects(Some(&mtls.bundle)).await);
    mtls.shutdown().await;
}

#[tokio::test]
async fn tls_mtls_optional_accepts_clients_with_and_without_a_certificate() {
    let mtls = Mtls::start(ClientVerify::Optional).await;
    assert!(mtls.connects(None).await);
    assert!(mtls.connects(Some(&mtls.bundle)).await);
    assert!(!mtls.connects(Some(&mtls.foreign)).await);
    mtls.shutdown().await;
}

/// QUIC takes client certificates like TLS: with anonymous clients refused and an ACL that
/// names only the certificate's CN, a client presenting the certificate connects and uses its
/// topics (so the CN became its username), and a client without one is refused.
#[tokio::test]
async fn quic_mtls_required_makes_the_certificate_cn_the_username() {
    let scratch = std::env::temp_dir().join(format!("petrel-quic-acl-{}", unique("acl")));
    std::fs::create_dir_all(&scratch).unwrap();
    let acl = scratch.join("acl");
    std::fs::write(&acl, "user petrel-client\ntopic readwrite mtls/#\n").unwrap();
    let mtls = Mtls::start_with(ClientVerify::Required, |c| {
        c.auth.allow_anonymous = Some(false);
        c.auth.acl_file = Some(acl.clone());
    })
    .await;
    let url = format!(
        "quic://127.0.0.1:{}",
        mtls.broker.addr(ListenerKind::Quic).port()
    );
    let options = |with_cert: bool| {
        let options = petrel::client::ClientOptions::new(&url)
            .unwrap()
            .client_id(unique("quic-mtls"))
            .ca_file(mtls.bundle.join("ca.pem"))
            .connect_timeout(std::time::Duration::from_secs(5))
            .reconnect(None);
        if with_cert {
            options.client_cert(
                mtls.bundle.join("client.pem"),
                mtls.bundle.join("client.key"),
            )
        } else {
            options
        }
    };
    let (client, mut events) = crate::client::connect(options(true)).await;
    client
        .subscribe("mtls/#", petrel::client::QoS::AtLeastOnce)
        .await
        .expect("the ACL grants the CN's topics");
    client
        .publish(petrel::client::Message::new("mtls/1", "hi").qos(petrel::client::QoS::AtLeastOnce))
        .await
        .expect("published");
    let message = crate::client::next_message(&mut events).await;
    assert_eq!(message.topic, "mtls/1");
    client.disconnect().await.unwrap();

    let refused = tokio::time::timeout(
        crate::client::LONG,
        petrel::client::Client::connect(options(false)),
    )
    .await
    .expect("refused in time");
    assert!(refused.is_err(), "a client without a certificate connected");
    mtls.shutdown().await;
    let _ = std::fs::remove_dir_all(scratch);
}
