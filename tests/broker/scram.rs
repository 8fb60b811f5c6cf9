//! MQTT 5 enhanced authentication with SCRAM-SHA-256 against a password file written with
//! `$scram-sha-256$` lines: Petrel's client end to end (connect, re-authenticate, refusals
//! alike for a wrong password and an unknown user), the same user with a plain CONNECT
//! password, and the protocol rules seen from a raw client. The Python interop script
//! (`tests/interop/test_scram.py`) checks the same against a SCRAM client nobody here wrote.

use std::time::Duration;

use bytes::Bytes;
use petrel::auth::password::{PasswordFile, PasswordHash};
use petrel::auth::scram::{ClientExchange, ClientFirst};
use petrel::client::{AuthMethod, Client, ClientError, ClientOptions, Message};
use petrel::codec::{Auth, Packet, Properties, ProtocolVersion, QoS, ReasonCode};

use crate::common::{connect_packet, unique, RawClient, TempDir, TestBroker};

const LONG: Duration = Duration::from_secs(10);

async fn broker() -> (TestBroker, TempDir) {
    let dir = TempDir(std::env::temp_dir().join(unique("petrel-scram")));
    std::fs::create_dir_all(&dir.0).unwrap();
    let mut file = PasswordFile::default();
    file.set("alice", PasswordHash::new_scram(b"secret"));
    file.set("bob", PasswordHash::new_pbkdf2(b"builder"));
    let path = dir.0.join("passwd");
    std::fs::write(&path, file.to_text()).unwrap();
    let broker = TestBroker::start_with(|c| c.auth.password_file = Some(path)).await;
    (broker, dir)
}

fn options(broker: &TestBroker, user: &str, password: &str) -> ClientOptions {
    ClientOptions::new(&format!("mqtt://{}", broker.addr))
        .unwrap()
        .client_id(unique("scram"))
        .credentials(user.to_owned(), password.to_owned())
        .reconnect(None)
}

#[tokio::test]
async fn scram_connects_reauthenticates_and_refuses_alike() {
    let (broker, _dir) = broker().await;
    let scram = |user: &str, password: &str| {
        options(&broker, user, password).auth_method(AuthMethod::ScramSha256)
    };
    let (client, _events) = tokio::time::timeout(LONG, Client::connect(scram("alice", "secret")))
        .await
        .unwrap()
        .expect("SCRAM-SHA-256 login");
    client.reauthenticate().await.expect("re-authentication");
    client
        .publish(Message::new("scram/t", "x").qos(QoS::AtLeastOnce))
        .await
        .expect("still connected after re-authentication");
    client.reauthenticate().await.expect("a second one");

    // A wrong password, an unknown user, and a user without a SCRAM line: the same answer.
    for (user, password) in [("alice", "wrong"), ("nobody", "secret"), ("bob", "builder")] {
        let refused = tokio::time::timeout(LONG, Client::connect(scram(user, password)))
            .await
            .unwrap()
            .err();
        assert_eq!(
            refused,
            Some(ClientError::Refused(ReasonCode::BAD_USER_NAME_OR_PASSWORD)),
            "{user}"
        );
    }

    // The SCRAM line verifies a plain CONNECT password too.
    let (plain, _events) = Client::connect(options(&broker, "alice", "secret"))
        .await
        .expect("plain password against a SCRAM line");
    plain.disconnect().await.unwrap();
    assert!(Client::connect(options(&broker, "alice", "wrong"))
        .await
        .is_err());
    client.disconnect().await.unwrap();
    broker.shutdown().await;
}

fn auth(reason: ReasonCode, method: &str, data: impl Into<Bytes>) -> Packet {
    let mut properties = Properties::default();
    properties.authentication_method = Some(method.into());
    properties.authentication_data = Some(data.into());
    Packet::Auth(Auth { reason, properties })
}

fn data(packet: &Packet) -> Bytes {
    match packet {
        Packet::Auth(a) => a.properties.authentication_data.clone().unwrap_or_default(),
        Packet::ConnAck(c) => c.properties.authentication_data.clone().unwrap_or_default(),
        other => panic!("expected AUTH or CONNACK, got {other:?}"),
    }
}

/// Runs CONNECT … CONNACK by hand; returns the client, the CONNACK and the server-first.
async fn raw_login(broker: &TestBroker, user: &str, password: &str) -> (RawClient, Packet, Bytes) {
    let (mut exchange, first) = ClientExchange::new(user, password.as_bytes(), "r4wn0nce");
    let mut connect = connect_packet(ProtocolVersion::V5, &unique("raw"));
    connect.properties.authentication_method = Some("SCRAM-SHA-256".into());
    connect.properties.authentication_data = Some(first.into());
    let mut client = RawClient::tcp(broker.addr, ProtocolVersion::V5).await;
    client.send(&Packet::Connect(Box::new(connect))).await;
    let challenge = client.expect_packet().await;
    assert!(
        matches!(&challenge, Packet::Auth(a) if a.reason == ReasonCode::CONTINUE_AUTHENTICATION),
        "{challenge:?}"
    );
    let server_first = data(&challenge);
    let last = exchange.handle_server_first(&server_first).unwrap();
    client
        .send(&auth(
            ReasonCode::CONTINUE_AUTHENTICATION,
            "SCRAM-SHA-256",
            last,
        ))
        .await;
    let connack = client.expect_packet().await;
    if matches!(&connack, Packet::ConnAck(c) if c.code == ReasonCode::SUCCESS) {
        exchange.verify_server_final(&data(&connack)).unwrap();
    }
    (client, connack, server_first)
}

#[tokio::test]
async fn scram_raw_exchange_and_protocol_errors() {
    let (broker, _dir) = broker().await;
    let (mut client, connack, _) = raw_login(&broker, "alice", "secret").await;
    let Packet::ConnAck(connack) = connack else {
        panic!()
    };
    assert_eq!(
        connack.properties.authentication_method.as_deref(),
        Some("SCRAM-SHA-256")
    );
    // [MQTT-4.12.1-1]: re-authentication must use the same method: 0x82.
    client
        .send(&auth(ReasonCode::RE_AUTHENTICATE, "PLAIN", "x"))
        .await;
    client.expect_disconnect(ReasonCode::PROTOCOL_ERROR).await;

    // An unknown user gets the same salt every time, as a real user does (no oracle).
    let (_c, refused, salt_a) = raw_login(&broker, "nobody", "x").await;
    assert!(
        matches!(refused, Packet::ConnAck(c) if c.code == ReasonCode::BAD_USER_NAME_OR_PASSWORD)
    );
    let (_c, _, salt_b) = raw_login(&broker, "nobody", "y").await;
    let salt = |first: &Bytes| {
        let text = String::from_utf8(first.to_vec()).unwrap();
        text.split(',').skip(1).collect::<Vec<_>>().join(",")
    };
    assert_eq!(salt(&salt_a), salt(&salt_b));

    // A client-first that is not SCRAM: refused (0x87), the connection closed.
    let mut connect = connect_packet(ProtocolVersion::V5, &unique("raw"));
    connect.properties.authentication_method = Some("SCRAM-SHA-256".into());
    connect.properties.authentication_data = Some(Bytes::from_static(b"garbage"));
    let (mut bad, connack) = RawClient::connect_with(broker.addr, connect).await;
    assert_eq!(connack.code, ReasonCode::NOT_AUTHORIZED);
    bad.expect_eof().await;
    assert!(ClientFirst::parse(b"garbage").is_err());
    broker.shutdown().await;
}
