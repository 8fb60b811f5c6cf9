//! Lossy links, the CI form of `benches/lossy.rs` (issue #5): the same client half and path,
//! short runs, and assertions on outcomes only, never on timings: QoS 1 and 2 complete, QoS 2
//! without duplicates, persistent sessions resumed after a blackout, QUIC migrating without a
//! reconnect. Seeded: the seed is printed (and named in every failure); `NETEM_SEED=N` replays.
//!
//! Packet-mode tests need root (they print why they skip otherwise). Their client half runs in
//! the link's namespace as this test binary again, running only [`client_role`].

use std::time::Duration;

use netem::spec::Periodic;
use netem::units::Span;
use netem::{Profile, Profiles};

#[expect(
    dead_code,
    reason = "shared with benches/lossy.rs, which reads every field"
)]
#[path = "../../benches/lossy/clients.rs"]
mod clients;
#[expect(
    dead_code,
    reason = "shared with benches/lossy.rs, which reads every field"
)]
#[path = "../../benches/lossy/path.rs"]
mod path;

use clients::{ClientReport, ClientSpec, Phase, QuicCc, Transport};
use path::{ChildCommand, Setup, Via};

/// The client half of packet-mode runs: started by the tests below inside the link's
/// namespace (`lossy::client_role --exact --ignored`), with its work in `PETREL_LOSSY_CLIENT`.
#[test]
#[ignore = "the client half of the packet-mode tests, run by them in the link's namespace"]
fn client_role() {
    if std::env::var_os(clients::SPEC_VAR).is_some() {
        clients::child_main().unwrap();
    }
}

fn child() -> ChildCommand {
    ChildCommand::this_program(&[
        "lossy::client_role",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .unwrap()
}

fn profile(name: &str) -> Profile {
    Profiles::builtin().find(name).unwrap().clone()
}

fn spec(transport: Transport, phases: Vec<Phase>) -> ClientSpec {
    ClientSpec {
        transport,
        server: "0.0.0.0:0".parse().unwrap(),
        ca_file: Default::default(),
        quic_cc: QuicCc::Cubic,
        topics: 8,
        payload: 256,
        phases,
        keep_alive: 30,
        drain: 30.0,
        reconnect_probes: 0,
        rebind_every: None,
        result_file: None,
    }
}

fn packet_setup(profile: Profile, seed: u64) -> Option<Setup> {
    if let Some(why) = path::packet_unavailable() {
        eprintln!("skipping a packet-mode lossy test: {why}");
        return None;
    }
    Some(Setup {
        profile,
        seed,
        via: Via::Packet,
        tcp_cc: Some("cubic"),
        quic_cc: QuicCc::Cubic,
    })
}

/// Every QoS 1 and 2 message arrived, QoS 2 exactly once, no publish failed.
fn assert_delivered(report: &ClientReport, what: &str, seed: u64) {
    for p in &report.phases {
        let qos = p.phase.qos;
        assert!(
            p.lost() == 0 && p.publish_errors == 0,
            "{what}, QoS {qos}: lost {} of {}, {} publishes failed {:?} (seed {seed}; replay with NETEM_SEED={seed})",
            p.lost(),
            p.expected(),
            p.publish_errors,
            p.first_errors,
        );
        assert!(p.expected() > 0, "{what}, QoS {qos}: nothing was published");
        if qos == 2 {
            assert_eq!(
                p.duplicates, 0,
                "{what}: QoS 2 delivered duplicates (seed {seed}; replay with NETEM_SEED={seed})"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_qos1_and_qos2_complete_over_tcp_and_quic_per_topic() {
    let seed = netem::seed::from_env_or_random();
    let Some(setup) = packet_setup(profile("lossy-5"), seed) else {
        return;
    };
    for transport in [Transport::Tcp, Transport::QuicPerTopic] {
        let phases = vec![Phase::paced(1, 500.0, 1.5), Phase::paced(2, 500.0, 1.5)];
        let outcome = path::run(&setup, spec(transport, phases), &child())
            .await
            .unwrap();
        assert_delivered(
            &outcome.report,
            &format!("lossy-5 over {}", transport.label()),
            seed,
        );
        assert!(
            outcome.down.lost > 0,
            "the link lost nothing: the test did not test loss"
        );
    }
}

/// The datagram class (docs/datagram.md) at the reference loss: QoS 0 goes by datagram, two
/// copies each and no retransmission, so about 0.25 % is expected lost; the bound is generous.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_datagram_qos0_nearly_all_arrive_without_retransmission() {
    let seed = netem::seed::from_env_or_random();
    let Some(mut setup) = packet_setup(profile("lossy-5"), seed) else {
        return;
    };
    // Petrel's default congestion controller, as in the bench's reference variant.
    setup.quic_cc = QuicCc::Bbr;
    let mut spec = spec(Transport::QuicDatagram, vec![Phase::paced(0, 500.0, 2.0)]);
    spec.quic_cc = QuicCc::Bbr;
    let outcome = path::run(&setup, spec, &child()).await.unwrap();
    let report = &outcome.report;
    let phase = &report.phases[0];
    let (lost, expected) = (phase.lost(), phase.expected());
    assert!(expected > 0, "nothing was published (seed {seed})");
    eprintln!(
        "datagram class at lossy-5: lost {lost} of {expected}, {} by datagram, link lost {} of {} packets",
        report.datagram_messages, outcome.down.lost, outcome.down.sent
    );
    assert!(
        outcome.down.lost > 0,
        "the link lost nothing: the test did not test loss (seed {seed})"
    );
    assert!(
        report.datagram_messages > expected / 2,
        "QoS 0 did not go by datagram: {} of {expected} (seed {seed})",
        report.datagram_messages
    );
    assert!(
        lost * 50 <= expected,
        "lost {lost} of {expected} QoS 0 messages, more than 2 % (seed {seed}; replay with NETEM_SEED={seed})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_blackout_resumes_persistent_sessions_without_loss_or_duplicates() {
    let seed = netem::seed::from_env_or_random();
    // One 3 s blackout 1.5 s into the link's life; keep-alive 1 s, so both ends notice it.
    let mut tunnel = profile("tunnel");
    tunnel.events.blackouts = Some(Periodic {
        gap: Span::fixed(Duration::from_millis(1500)),
        duration: Some(Span::fixed(Duration::from_secs(3))),
        count: Some(1),
    });
    let Some(setup) = packet_setup(tunnel, seed) else {
        return;
    };
    let mut spec = spec(Transport::Tcp, vec![Phase::paced(2, 200.0, 5.0)]);
    spec.keep_alive = 1;
    let outcome = path::run(&setup, spec, &child()).await.unwrap();
    let report = &outcome.report;
    assert!(
        outcome.down.blackout_dropped > 0,
        "no packet met the blackout (seed {seed})"
    );
    assert!(
        report.reconnects > 0,
        "nobody reconnected across a 3 s blackout with a 1 s keep-alive (seed {seed}): {:?}",
        report.events
    );
    assert_eq!(
        report.sessions_lost, 0,
        "a reconnect found no session (seed {seed}; replay with NETEM_SEED={seed}): {:?}",
        report.events
    );
    assert_delivered(report, "blackout over tcp", seed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_quic_handover_migrates_without_reconnect() {
    let seed = netem::seed::from_env_or_random();
    // The relay rebinds the clients' addresses every second (NAT rebinding) and the clients
    // move to new sockets every 1.5 s (client-side migration).
    let mut handover = profile("handover");
    handover.events.address_changes = Some(Periodic {
        gap: Span::fixed(Duration::from_secs(1)),
        duration: None,
        count: None,
    });
    let setup = Setup {
        profile: handover,
        seed,
        via: Via::Relay,
        tcp_cc: None,
        quic_cc: QuicCc::Cubic,
    };
    let mut spec = spec(
        Transport::QuicPerTopic,
        vec![Phase::paced(1, 200.0, 2.5), Phase::paced(2, 200.0, 2.5)],
    );
    spec.rebind_every = Some(1.5);
    let outcome = path::run(&setup, spec, &child()).await.unwrap();
    let report = &outcome.report;
    assert!(
        outcome.address_changes > 0 && report.rebinds > 0,
        "no address changed (seed {seed}): relay {} rebinds {}",
        outcome.address_changes,
        report.rebinds
    );
    assert_eq!(
        report.reconnects, 0,
        "an address change caused a reconnect (seed {seed}; replay with NETEM_SEED={seed}): {:?}",
        report.events
    );
    assert_delivered(report, "handover over quic-per-topic", seed);
}
