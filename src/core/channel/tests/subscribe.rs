//! SUBSCRIBE: granted QoS and the retained-message rules.

use super::*;

#[test]
fn subscribe_grants_capped_qos_and_reports_retained_per_retain_handling() {
    let mut h = Harness::new(Limits {
        maximum_qos: QoS::AtLeastOnce,
        ..Limits::default()
    });
    h.connect(connect(ProtocolVersion::V5, "sub"));
    let options = |rh| SubscriptionOptions {
        qos: QoS::ExactlyOnce,
        retain_handling: rh,
        ..Default::default()
    };
    let subscribe = |id, rh| {
        Packet::Subscribe(Subscribe {
            packet_id: PacketId(id),
            properties: Properties::default(),
            filters: vec![("a/+".into(), options(rh)), ("a/#/b".into(), options(rh))],
        })
    };
    h.packet(subscribe(1, 1));
    h.packet(subscribe(2, 1));
    let acks: Vec<Vec<ReasonCode>> = h
        .packets()
        .into_iter()
        .filter_map(|p| match p {
            Packet::SubAck(s) => Some(s.reasons),
            _ => None,
        })
        .collect();
    assert_eq!(
        acks,
        vec![vec![ReasonCode::GRANTED_QOS_1, ReasonCode::TOPIC_FILTER_INVALID]; 2]
    );
    let retained: Vec<bool> = h
        .actions()
        .into_iter()
        .filter_map(|a| match a {
            Action::Subscribe { send_retained, .. } => Some(send_retained),
            _ => None,
        })
        .collect();
    assert_eq!(
        retained,
        vec![true, false],
        "Retain Handling 1 sends retained only for a new subscription"
    );
}
