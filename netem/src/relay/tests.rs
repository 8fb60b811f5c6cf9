//! The relay on loopback: a UDP echo server behind it, a client in front, outcomes asserted.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::{timeout, Instant};

use super::*;
use crate::spec::{Events, Periodic, Stages};
use crate::units::Time;

const SEED: u64 = 11;

/// Echoes each datagram prefixed with the source address it saw, as `addr|payload`.
async fn echo_server() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let mut reply = format!("{peer}|").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&reply, peer).await;
        }
    });
    addr
}

fn profile(stages: Stages, events: Events) -> Profile {
    Profile {
        up: stages.clone(),
        down: stages,
        events,
        ..Profile::clean()
    }
}

async fn client(relay: &RelayHandle) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(relay.local_addr()).await.unwrap();
    socket
}

/// The server-seen source and the payload of one reply, or None after `wait`.
async fn reply(socket: &UdpSocket, wait: Duration) -> Option<(String, Vec<u8>)> {
    let mut buf = vec![0u8; 2048];
    let n = timeout(wait, socket.recv(&mut buf)).await.ok()?.ok()?;
    let text = &buf[..n];
    let bar = text.iter().position(|&b| b == b'|')?;
    Some((
        String::from_utf8_lossy(&text[..bar]).into_owned(),
        text[bar + 1..].to_vec(),
    ))
}

#[tokio::test]
async fn clean_relay_echoes_everything() {
    let server = echo_server().await;
    let relay = Relay::start_profile(
        "127.0.0.1:0".parse().unwrap(),
        server,
        &Profile::clean(),
        SEED,
    )
    .await
    .unwrap();
    let socket = client(&relay).await;
    let mut got = 0;
    for i in 0u32..200 {
        socket.send(&i.to_be_bytes()).await.unwrap();
        let (_, payload) = reply(&socket, Duration::from_secs(2)).await.expect("echo");
        assert_eq!(payload, i.to_be_bytes());
        got += 1;
    }
    assert_eq!(got, 200);
    let stats = relay.stats();
    assert_eq!(
        (stats.up.delivered, stats.down.delivered, stats.flows),
        (200, 200, 1)
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn delay_applies_in_both_directions() {
    let server = echo_server().await;
    let stages = Stages {
        delay: Time(Duration::from_millis(40)),
        ..Stages::default()
    };
    let p = profile(stages, Events::default());
    let relay = Relay::start_profile("127.0.0.1:0".parse().unwrap(), server, &p, SEED)
        .await
        .unwrap();
    let socket = client(&relay).await;
    for _ in 0..3 {
        let sent = Instant::now();
        socket.send(b"x").await.unwrap();
        reply(&socket, Duration::from_secs(2)).await.expect("echo");
        let rtt = sent.elapsed();
        assert!(rtt >= Duration::from_millis(80), "rtt {rtt:?}");
    }
}

#[tokio::test]
async fn blackout_drops_what_is_sent_inside_it() {
    let server = echo_server().await;
    let events = Events {
        blackouts: Some(Periodic {
            gap: "300ms".parse().unwrap(),
            duration: Some("400ms".parse().unwrap()),
            count: Some(1),
        }),
        address_changes: None,
    };
    let relay = Relay::start_profile(
        "127.0.0.1:0".parse().unwrap(),
        server,
        &profile(Stages::default(), events),
        SEED,
    )
    .await
    .unwrap();
    let socket = client(&relay).await;
    let start = Instant::now();
    let mut sent_at = Vec::new();
    let mut echoed = Vec::new();
    for i in 0u32..150 {
        sent_at.push(start.elapsed());
        socket.send(&i.to_be_bytes()).await.unwrap();
        // Collect whatever came back meanwhile; the pace is about one datagram per 10 ms.
        while let Some((_, payload)) = reply(&socket, Duration::from_millis(10)).await {
            echoed.push(u32::from_be_bytes(payload[..4].try_into().unwrap()));
        }
    }
    while let Some((_, payload)) = reply(&socket, Duration::from_millis(200)).await {
        echoed.push(u32::from_be_bytes(payload[..4].try_into().unwrap()));
    }
    let ms = |i: usize| sent_at[i].as_millis();
    for (i, _) in sent_at.iter().enumerate() {
        let delivered = echoed.contains(&(i as u32));
        // Wide margins absorb scheduling noise between the client's clock and the relay's on
        // a loaded machine: only datagrams well outside or well inside the window are judged.
        if ms(i) < 150 || ms(i) > 900 {
            assert!(
                delivered,
                "#{i} sent at {} ms outside the blackout was lost",
                ms(i)
            );
        } else if (420..=580).contains(&ms(i)) {
            assert!(
                !delivered,
                "#{i} sent at {} ms inside the blackout got through",
                ms(i)
            );
        }
    }
    // The relay counted a drop for at least every datagram sent well inside the window (how
    // many that is depends on how fast this loaded machine paced them, not on a constant).
    let inside = (0..sent_at.len())
        .filter(|&i| (420..=580).contains(&ms(i)))
        .count();
    let stats = relay.stats();
    assert!(
        inside > 0,
        "no datagram was sent inside the blackout: {sent_at:?}"
    );
    assert!(
        stats.up.blackout_dropped as usize >= inside,
        "{inside} sent inside: {stats:?}"
    );
}

#[tokio::test]
async fn address_change_shows_the_server_a_new_source_port() {
    let server = echo_server().await;
    let relay = Relay::start_profile(
        "127.0.0.1:0".parse().unwrap(),
        server,
        &Profile::clean(),
        SEED,
    )
    .await
    .unwrap();
    let socket = client(&relay).await;
    socket.send(b"before").await.unwrap();
    let (first, _) = reply(&socket, Duration::from_secs(2)).await.expect("echo");
    assert_eq!(relay.change_address().await, 1);
    socket.send(b"after").await.unwrap();
    let (second, payload) = reply(&socket, Duration::from_secs(2)).await.expect("echo");
    assert_eq!(payload, b"after");
    assert_ne!(
        first, second,
        "the server saw the same source after the change"
    );
    // The client's own flow is unchanged: same socket, answers keep coming.
    for _ in 0..5 {
        socket.send(b"more").await.unwrap();
        let (seen, _) = reply(&socket, Duration::from_secs(2)).await.expect("echo");
        assert_eq!(seen, second);
    }
    assert_eq!(relay.stats().address_changes, 1);
}

#[tokio::test]
async fn scheduled_address_change_moves_the_flow() {
    let server = echo_server().await;
    let events = Events {
        blackouts: None,
        address_changes: Some(Periodic {
            gap: "200ms".parse().unwrap(),
            duration: None,
            count: Some(1),
        }),
    };
    let relay = Relay::start_profile(
        "127.0.0.1:0".parse().unwrap(),
        server,
        &profile(Stages::default(), events),
        SEED,
    )
    .await
    .unwrap();
    let socket = client(&relay).await;
    let mut sources = Vec::new();
    for _ in 0..25 {
        socket.send(b"x").await.unwrap();
        if let Some((seen, _)) = reply(&socket, Duration::from_millis(100)).await {
            if sources.last() != Some(&seen) {
                sources.push(seen);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sources.len(), 2, "sources seen: {sources:?}");
    assert_eq!(relay.stats().address_changes, 1);
}
