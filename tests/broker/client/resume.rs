//! Staying connected: reconnect and session resume under a forced disconnect while QoS 1 and
//! QoS 2 streams are in flight, QUIC migration (`rebind`), the offline buffer, 0-RTT, and
//! many clients on one `SharedTransport`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use petrel::client::{
    Backoff, Client, ClientError, ClientOptions, DisconnectReason, Event, Events, Message, QoS,
    QuicStreams, ReasonCode, SharedTransport,
};
use petrel::codec::{Disconnect, Packet, ProtocolVersion};
use petrel::config::ListenerKind;

use super::{connect, next_event, next_message, options, LONG};
use crate::common::{connect_packet, unique, RawClient, QUIET};
use crate::transports::TransportBroker;

const MESSAGES: u32 = 150;

fn quick_reconnect(options: ClientOptions) -> ClientOptions {
    options.reconnect(Some(Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(200),
        jitter: 0.5,
    }))
}

/// Takes the session of `client_id` over from a raw TCP client (the broker disconnects the
/// holder with 0x8E), then leaves with the session kept.
async fn take_over(broker: &TransportBroker, client_id: &str, leave: bool) -> RawClient {
    let mut connect = connect_packet(ProtocolVersion::V5, client_id);
    connect.clean_start = false;
    connect.properties.session_expiry_interval = Some(60);
    let (mut raw, connack) = RawClient::connect_ok(broker.addr(ListenerKind::Tcp), connect).await;
    assert!(connack.session_present);
    if leave {
        raw.send(&Packet::Disconnect(Disconnect::new(ReasonCode::SUCCESS)))
            .await;
    }
    raw
}

/// Counts messages per (topic, sequence number) until every number of every topic arrived,
/// then a quiet period more (to see duplicates that would come late).
async fn collect(events: &mut Events, topics: &[&str]) -> BTreeMap<(String, u32), u32> {
    let mut counts = BTreeMap::new();
    let complete = |counts: &BTreeMap<(String, u32), u32>| {
        topics
            .iter()
            .all(|t| (0..MESSAGES).all(|n| counts.contains_key(&((*t).to_owned(), n))))
    };
    while !complete(&counts) {
        let m = next_message(events).await;
        let n: u32 = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
        *counts.entry((m.topic, n)).or_insert(0) += 1;
    }
    let _ = tokio::time::timeout(QUIET, async {
        loop {
            if let Some(Event::Message(m)) = events.recv().await {
                let n: u32 = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
                *counts.entry((m.topic, n)).or_insert(0) += 1;
            }
        }
    })
    .await;
    counts
}

async fn session_resumes_after_takeover_midflight(kind: ListenerKind, streams: QuicStreams) {
    let broker = TransportBroker::start().await;
    let (q1, q2) = (unique("resume-q1"), unique("resume-q2"));
    let (sub, mut sub_events) = connect(options(&broker, ListenerKind::Tcp, "resume-sub")).await;
    sub.subscribe(&q1, QoS::AtLeastOnce).await.unwrap();
    sub.subscribe(&q2, QoS::ExactlyOnce).await.unwrap();

    let id = unique("resume-pub");
    let publisher = quick_reconnect(options(&broker, kind, "unused"))
        .client_id(&id)
        .persistent(60)
        .streams(streams);
    let (publisher, mut pub_events) = connect(publisher).await;
    let mut handles = Vec::new();
    for n in 0..MESSAGES {
        for (topic, qos) in [(&q1, QoS::AtLeastOnce), (&q2, QoS::ExactlyOnce)] {
            let message = Message::new(topic.as_str(), n.to_string()).qos(qos);
            handles.push(publisher.publish_nowait(message).await.unwrap());
        }
        if n == MESSAGES / 3 {
            take_over(&broker, &id, true).await;
        }
    }
    for handle in handles {
        tokio::time::timeout(LONG, handle)
            .await
            .expect("every publish completes")
            .expect("and succeeds");
    }
    let counts = collect(&mut sub_events, &[&q1, &q2]).await;
    for n in 0..MESSAGES {
        assert!(counts[&(q1.clone(), n)] >= 1, "QoS 1 #{n} at least once");
        assert_eq!(counts[&(q2.clone(), n)], 1, "QoS 2 #{n} exactly once");
    }
    // The connection really was lost and resumed.
    let mut seen = Vec::new();
    while !seen.iter().any(|e| matches!(e, Event::Connected { .. })) {
        seen.push(next_event(&mut pub_events).await);
    }
    assert!(
        seen.iter().any(|e| matches!(
            e,
            Event::Disconnected {
                reason: DisconnectReason::Server(ReasonCode::SESSION_TAKEN_OVER),
                ..
            }
        )),
        "{seen:?}"
    );
    assert!(
        matches!(
            seen.last(),
            Some(Event::Connected {
                session_present: true,
                ..
            })
        ),
        "{seen:?}"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn session_tcp_resumes_after_takeover_midflight() {
    session_resumes_after_takeover_midflight(ListenerKind::Tcp, QuicStreams::single()).await;
}

#[tokio::test]
async fn session_quic_per_topic_resumes_after_takeover_midflight() {
    session_resumes_after_takeover_midflight(ListenerKind::Quic, QuicStreams::per_topic()).await;
}

#[tokio::test]
async fn session_subscriptions_come_back_on_their_streams_after_reconnect() {
    let broker = TransportBroker::start().await;
    let topic = unique("restream");
    let id = unique("restream-sub");
    let sub = quick_reconnect(options(&broker, ListenerKind::Quic, "unused"))
        .client_id(&id)
        .persistent(60)
        .streams(QuicStreams::per_topic());
    let (sub, mut events) = connect(sub).await;
    sub.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();
    take_over(&broker, &id, true).await;
    loop {
        if let Event::Connected {
            session_present, ..
        } = next_event(&mut events).await
        {
            assert!(session_present);
            break;
        }
    }
    let (publisher, _e) = connect(options(&broker, ListenerKind::Tcp, "restream-pub")).await;
    // The move (SUBSCRIBE on the data stream, then UNSUBSCRIBE on control) takes a round
    // trip; poll until deliveries arrive on a data stream, then check there is one copy each.
    let deadline = tokio::time::Instant::now() + LONG;
    let mut n = 0;
    loop {
        publisher
            .publish(Message::new(&topic, n.to_string()).qos(QoS::AtLeastOnce))
            .await
            .unwrap();
        let m = next_message(&mut events).await;
        if matches!(m.route, petrel::client::Route::Data(_)) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never moved back");
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the parked copy's UNSUBSCRIBE land, then exactly one delivery per message.
    tokio::time::sleep(QUIET).await;
    publisher
        .publish(Message::new(&topic, "last").qos(QoS::AtLeastOnce))
        .await
        .unwrap();
    loop {
        let m = next_message(&mut events).await;
        if &m.payload[..] == b"last" {
            assert!(matches!(m.route, petrel::client::Route::Data(_)));
            break;
        }
    }
    super::no_message(&mut events).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn quic_rebind_migrates_without_a_reconnect() {
    let broker = TransportBroker::start().await;
    let topic = unique("migrate");
    let (sub, mut sub_events) = connect(options(&broker, ListenerKind::Tcp, "migrate-sub")).await;
    sub.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();
    let (publisher, mut pub_events) =
        connect(options(&broker, ListenerKind::Quic, "migrate-pub")).await;
    let mut handles = Vec::new();
    let mut locals = Vec::new();
    for n in 0..MESSAGES {
        let message = Message::new(&topic, n.to_string()).qos(QoS::AtLeastOnce);
        handles.push(publisher.publish_nowait(message).await.unwrap());
        if n % 50 == 25 {
            locals.push(publisher.rebind().await.unwrap());
        }
    }
    for handle in handles {
        tokio::time::timeout(LONG, handle).await.unwrap().unwrap();
    }
    locals.dedup();
    assert_eq!(
        locals.len(),
        3,
        "each rebind moved to a new port: {locals:?}"
    );
    let counts = collect(&mut sub_events, &[&topic]).await;
    assert_eq!(counts.len(), MESSAGES as usize, "nothing lost");
    assert!(
        tokio::time::timeout(QUIET, pub_events.recv())
            .await
            .is_err(),
        "no reconnect, no event at all"
    );
    assert_eq!(publisher.stats().connects, 1);
    // Byte-stream transports cannot migrate.
    let (tcp, _e) = connect(options(&broker, ListenerKind::Tcp, "migrate-tcp")).await;
    assert_eq!(tcp.rebind().await, Err(ClientError::NotQuic));
    broker.shutdown().await;
}

#[tokio::test]
async fn offline_buffer_is_bounded_and_sent_after_reconnect() {
    let broker = TransportBroker::start().await;
    let topic = unique("offline");
    let (sub, mut sub_events) = connect(options(&broker, ListenerKind::Tcp, "offline-sub")).await;
    sub.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();
    let id = unique("offline-pub");
    let publisher = options(&broker, ListenerKind::Quic, "unused")
        .client_id(&id)
        .persistent(60)
        .offline_buffer(5)
        .reconnect(Some(Backoff {
            initial: Duration::from_millis(800),
            max: Duration::from_millis(800),
            jitter: 0.0,
        }));
    let (publisher, mut events) = connect(publisher).await;
    let raw = take_over(&broker, &id, false).await;
    loop {
        if let Event::Disconnected { .. } = next_event(&mut events).await {
            break;
        }
    }
    let mut handles = Vec::new();
    for n in 0..5 {
        let m = Message::new(&topic, n.to_string()).qos(QoS::AtLeastOnce);
        handles.push(publisher.publish_nowait(m).await.unwrap());
    }
    let sixth = publisher
        .publish(Message::new(&topic, "6").qos(QoS::AtLeastOnce))
        .await;
    assert_eq!(sixth, Err(ClientError::OfflineBufferFull));
    drop(raw); // the reconnect takes the session back anyway
    for handle in handles {
        tokio::time::timeout(LONG, handle).await.unwrap().unwrap();
    }
    for n in 0..5 {
        let m = next_message(&mut sub_events).await;
        assert_eq!(m.payload, n.to_string());
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn quic_reconnect_resumes_tls_and_sends_connect_in_0rtt() {
    let broker = TransportBroker::start().await;
    let id = unique("zero-rtt");
    let client = quick_reconnect(options(&broker, ListenerKind::Quic, "unused"))
        .client_id(&id)
        .persistent(60);
    let (client, mut events) = connect(client).await;
    take_over(&broker, &id, true).await;
    let zero_rtt = loop {
        if let Event::Connected { zero_rtt, .. } = next_event(&mut events).await {
            break zero_rtt;
        }
    };
    assert!(zero_rtt, "the ticket of the first connection was used");
    assert_eq!(client.stats().zero_rtt_connects, 1);
    client.subscribe("zero/#", QoS::AtLeastOnce).await.unwrap();
    broker.shutdown().await;
}

/// The next `Connected` event's `zero_rtt`, skipping other events.
async fn connected_zero_rtt(events: &mut Events) -> bool {
    loop {
        if let Event::Connected { zero_rtt, .. } = next_event(events).await {
            return zero_rtt;
        }
    }
}

/// Each of `clients` (the client of `ids[k]` at `k`) publishes QoS 1 to the next one's topic
/// (`ID/in`), awaits the PUBACK, and receives the previous one's message.
async fn pass_along(clients: &mut [(Client, Events)], ids: &[String], tag: &str) {
    let n = clients.len();
    let publishes = clients.iter().enumerate().map(|(k, (client, _))| {
        let m = Message::new(
            format!("{}/in", ids[(k + 1) % n]),
            format!("{tag} from {k}"),
        )
        .qos(QoS::AtLeastOnce);
        client.publish(m)
    });
    for outcome in futures_util::future::join_all(publishes).await {
        outcome.expect("PUBACK");
    }
    for (k, (_, events)) in clients.iter_mut().enumerate() {
        let m = next_message(events).await;
        assert_eq!(m.payload, format!("{tag} from {}", (k + n - 1) % n));
    }
}

#[tokio::test]
async fn quic_clients_on_a_shared_transport_work_as_their_own() {
    const CLIENTS: usize = 6;
    let broker = TransportBroker::start().await;
    // The CA is in the shared transport's options only: the clients' own TLS options are
    // not used.
    let shared = SharedTransport::new(&options(&broker, ListenerKind::Quic, "unused"), 2).unwrap();
    let shared = Arc::new(shared);
    let ids: Vec<String> = (0..CLIENTS)
        .map(|i| unique(&format!("shared-{i}")))
        .collect();
    let mut clients = Vec::new();
    for id in &ids {
        let url = super::url(&broker, ListenerKind::Quic);
        let own = quick_reconnect(ClientOptions::new(&url).unwrap())
            .client_id(id)
            .persistent(60)
            .connect_timeout(Duration::from_secs(5))
            .shared_transport(Arc::clone(&shared));
        let (client, mut events) = tokio::time::timeout(LONG, Client::connect(own))
            .await
            .expect("connects in time")
            .expect("connects");
        assert!(
            !connected_zero_rtt(&mut events).await,
            "a first connect is a full handshake: no client resumes with another's ticket"
        );
        client
            .subscribe(&format!("{id}/in"), QoS::AtLeastOnce)
            .await
            .unwrap();
        clients.push((client, events));
    }
    assert_eq!(
        shared.endpoints_bound(),
        2,
        "six clients on two UDP sockets"
    );
    pass_along(&mut clients, &ids, "first").await;
    // One leaves (DISCONNECT, its connection closed on a shared endpoint): the others carry
    // on undisturbed, on both endpoints.
    let (gone, _gone_events) = clients.remove(0);
    gone.disconnect().await.unwrap();
    pass_along(&mut clients, &ids[1..], "second").await;
    for (_, events) in &mut clients {
        super::no_message(events).await;
    }
    // A taken-over client reconnects on its shared endpoint, in 0-RTT with its own ticket.
    take_over(&broker, &ids[1], true).await;
    assert!(
        connected_zero_rtt(&mut clients[0].1).await,
        "the reconnect resumed with the client's own ticket"
    );
    assert_eq!(clients[0].0.stats().connects, 2);
    // Rebinding would move every client on the endpoint: refused, nothing moves.
    assert!(matches!(
        clients[0].0.rebind().await,
        Err(ClientError::Config(_))
    ));
    pass_along(&mut clients, &ids[1..], "third").await;
    assert_eq!(shared.endpoints_bound(), 2);
    broker.shutdown().await;
}
