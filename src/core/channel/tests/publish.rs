//! Inbound PUBLISH: QoS 2 deduplication and our Receive Maximum, topic aliases.

use super::*;
use crate::codec::PacketId;

#[test]
fn broker_receive_maximum_is_enforced_on_inbound_qos2() {
    let limits = Limits {
        receive_maximum: 2,
        ..Limits::default()
    };
    let mut h = Harness::new(limits);
    h.connect(connect(ProtocolVersion::V5, "rm"));
    h.packet(Packet::Publish(publish("t", QoS::ExactlyOnce, Some(1))));
    h.packet(Packet::Publish(publish("t", QoS::ExactlyOnce, Some(2))));
    assert_eq!(h.packets().len(), 2, "two PUBRECs");
    h.packet(Packet::Publish(publish("t", QoS::ExactlyOnce, Some(3))));
    assert_eq!(
        h.packets(),
        vec![Packet::Disconnect(Disconnect::new(
            ReasonCode::RECEIVE_MAXIMUM_EXCEEDED
        ))]
    );
    assert!(h.channel.is_closed());
}

#[test]
fn inbound_qos2_is_routed_once_even_when_resent() {
    let mut h = Harness::new(Limits::default());
    h.connect(connect(ProtocolVersion::V311, "eo"));
    h.packet(Packet::Publish(publish("t", QoS::ExactlyOnce, Some(7))));
    let mut again = publish("t", QoS::ExactlyOnce, Some(7));
    again.dup = true;
    h.packet(Packet::Publish(again));
    let routes = h
        .actions()
        .into_iter()
        .filter(|a| matches!(a, Action::Route { .. }))
        .count();
    assert_eq!(routes, 1);
    assert_eq!(
        h.packets(),
        vec![
            Packet::PubRec(Ack::new(PacketId(7), ReasonCode::SUCCESS)),
            Packet::PubRec(Ack::new(PacketId(7), ReasonCode::SUCCESS))
        ]
    );
    h.packet(Packet::PubRel(Ack::new(PacketId(7), ReasonCode::SUCCESS)));
    assert_eq!(
        h.packets(),
        vec![Packet::PubComp(Ack::new(PacketId(7), ReasonCode::SUCCESS))]
    );
}

#[test]
fn topic_alias_rules_on_ingress() {
    let mut h = Harness::new(Limits {
        topic_alias_maximum: 5,
        ..Limits::default()
    });
    h.connect(connect(ProtocolVersion::V5, "alias"));
    let mut define = publish("long/topic", QoS::AtMostOnce, None);
    define.properties.topic_alias = Some(3);
    h.packet(Packet::Publish(define));
    let mut reuse = publish("", QoS::AtMostOnce, None);
    reuse.properties.topic_alias = Some(3);
    h.packet(Packet::Publish(reuse));
    let topics: Vec<String> = h
        .actions()
        .into_iter()
        .filter_map(|a| match a {
            Action::Route { message: m, .. } => Some(m.topic.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(topics, vec!["long/topic", "long/topic"]);

    let mut too_big = publish("x", QoS::AtMostOnce, None);
    too_big.properties.topic_alias = Some(6);
    h.packet(Packet::Publish(too_big));
    assert_eq!(
        h.packets(),
        vec![Packet::Disconnect(Disconnect::new(
            ReasonCode::TOPIC_ALIAS_INVALID
        ))]
    );
}

fn aliased(topic: &str, alias: u16) -> Packet {
    let mut p = publish(topic, QoS::AtMostOnce, None);
    p.properties.topic_alias = Some(alias);
    Packet::Publish(p)
}

/// Each alias costs its topic plus 32 bytes of entry; rebinding an alias frees the old
/// topic's share; past `max_topic_alias_bytes` the client hears 0x97 (it stayed within its
/// Topic Alias Maximum, so 0x94 would be wrong).
#[test]
fn topic_alias_memory_is_bounded_in_bytes() {
    let mut h = Harness::new(Limits {
        max_topic_alias_bytes: 3 * (32 + 10),
        ..Limits::default()
    });
    h.connect(connect(ProtocolVersion::V5, "alias-bytes"));
    for alias in 1..=3 {
        h.packet(aliased(&format!("topic/{alias:04}"), alias));
    }
    // Rebinding alias 3 to a topic of the same length stays within the budget.
    h.packet(aliased("other/0003", 3));
    assert!(!h.channel.is_closed());
    assert!(h.packets().is_empty());
    h.packet(aliased("t", 4));
    assert_eq!(
        h.packets(),
        vec![Packet::Disconnect(Disconnect::new(
            ReasonCode::QUOTA_EXCEEDED
        ))]
    );
    assert_eq!(h.close().reason, ReasonCode::QUOTA_EXCEEDED);
}

/// The default budget (64 KiB) holds a realistic alias table and stops a flood of
/// 65,535 aliases long before the old worst case of 4 GiB.
#[test]
fn topic_alias_flood_stops_at_the_default_budget() {
    let limits = Limits::default();
    let budget = limits.max_topic_alias_bytes;
    let mut h = Harness::new(limits);
    h.connect(connect(ProtocolVersion::V5, "alias-flood"));
    let topic = "f".repeat(1024);
    let mut accepted = 0usize;
    for alias in 1..=u16::MAX {
        h.packet(aliased(&topic, alias));
        if h.channel.is_closed() {
            break;
        }
        accepted += 1;
    }
    assert_eq!(accepted, budget / (1024 + 32));
    assert_eq!(h.close().reason, ReasonCode::QUOTA_EXCEEDED);
}
