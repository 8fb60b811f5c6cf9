//! EMQX's messaging extensions (issue 17): delayed publish (`$delayed/{seconds}/{topic}`) and
//! exclusive subscriptions (`$exclusive/{filter}`), over MQTT 3.1.1 and 5.0 with raw packets.
//! Timing assertions are outcomes only: nothing before the interval has passed, everything
//! after it, in due order.

use std::time::Duration;

use petrel::codec::{Packet, ProtocolVersion, QoS, ReasonCode};

use crate::common::*;

use ProtocolVersion::{V311, V5};

#[tokio::test]
async fn delayed_publish_arrives_on_its_target_after_the_interval_in_due_order() {
    let broker = TestBroker::start().await;
    for version in [V311, V5] {
        let topic = unique("x/y");
        let (mut sub, _) =
            RawClient::connect_ok(broker.addr, connect_packet(version, &unique("s"))).await;
        sub.subscribe(1, &format!("{topic}/#"), QoS::AtLeastOnce)
            .await;
        let (mut publisher, _) =
            RawClient::connect_ok(broker.addr, connect_packet(version, &unique("p"))).await;
        let later = format!("$delayed/2/{topic}/later");
        let sooner = format!("$delayed/1/{topic}/sooner");
        let (reason, _) = publisher
            .publish_ack(publish_struct(&later, QoS::AtLeastOnce, Some(1), b"2"))
            .await;
        assert_eq!(reason, ReasonCode::SUCCESS);
        publisher
            .publish_acked(publish_struct(&sooner, QoS::ExactlyOnce, Some(2), b"1"))
            .await;
        // Not before its time.
        sub.expect_silence().await;
        let mut got = Vec::new();
        for _ in 0..2 {
            let publish = match sub.read(Duration::from_secs(5)).await {
                Read::Packet(packet) => match *packet {
                    Packet::Publish(publish) => publish,
                    other => panic!("expected PUBLISH, got {other:?}"),
                },
                other => panic!("{version:?}: no delayed message: {other:?}"),
            };
            if let Some(id) = publish.packet_id {
                sub.send(&Packet::PubAck(petrel::codec::Ack::new(
                    id,
                    ReasonCode::SUCCESS,
                )))
                .await;
            }
            got.push((publish.topic, publish.qos, publish.payload.to_vec()));
        }
        assert_eq!(
            got,
            [
                (format!("{topic}/sooner"), QoS::AtLeastOnce, b"1".to_vec()),
                (format!("{topic}/later"), QoS::AtLeastOnce, b"2".to_vec()),
            ],
            "{version:?}: due order, on the target topic, QoS kept (capped by the subscription)"
        );
        assert_eq!(broker.running.broker.delayed_count(), 0);
    }
}

#[tokio::test]
async fn delayed_retained_message_is_retained_on_its_target() {
    let broker = TestBroker::start().await;
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "p").await;
    let mut retained = publish_struct("$delayed/1/kept/t", QoS::AtLeastOnce, Some(1), b"r");
    retained.retain = true;
    publisher.publish_acked(retained).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (mut late, _) = RawClient::connect_v5(broker.addr, "late").await;
    late.subscribe(1, "kept/#", QoS::AtMostOnce).await;
    let got = late.expect_publish().await;
    assert_eq!((got.topic.as_str(), got.retain), ("kept/t", true));
}

#[tokio::test]
async fn v5_a_bad_delayed_topic_gets_0x90_and_is_dropped() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = RawClient::connect_v5(broker.addr, "s").await;
    sub.subscribe(1, "#", QoS::AtMostOnce).await;
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "p").await;
    for (id, topic) in [
        "$delayed/x/t",
        "$delayed/4294968/t",
        "$delayed/5",
        "$delayed/1.5/t",
    ]
    .into_iter()
    .enumerate()
    {
        let (reason, _) = publisher
            .publish_ack(publish_struct(
                topic,
                QoS::AtLeastOnce,
                Some(id as u16 + 1),
                b"x",
            ))
            .await;
        assert_eq!(reason, ReasonCode::TOPIC_NAME_INVALID, "{topic}");
    }
    sub.expect_silence().await;
    assert_eq!(broker.running.broker.delayed_count(), 0);
}

#[tokio::test]
async fn v5_past_max_delayed_messages_a_publish_gets_0x97() {
    let broker = TestBroker::start_with(|c| c.delayed.max_delayed_messages = 1).await;
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "p").await;
    let (first, _) = publisher
        .publish_ack(publish_struct(
            "$delayed/60/a",
            QoS::AtLeastOnce,
            Some(1),
            b"1",
        ))
        .await;
    let (second, _) = publisher
        .publish_ack(publish_struct(
            "$delayed/60/b",
            QoS::AtLeastOnce,
            Some(2),
            b"2",
        ))
        .await;
    assert_eq!(
        (first, second),
        (ReasonCode::SUCCESS, ReasonCode::QUOTA_EXCEEDED)
    );
    assert_eq!(broker.running.broker.delayed_count(), 1);
}

#[tokio::test]
async fn exclusive_subscription_is_held_by_one_client_until_released() {
    let broker = TestBroker::start().await;
    let (mut holder, _) = RawClient::connect_v5(broker.addr, "holder").await;
    assert_eq!(
        holder
            .subscribe_codes(1, &["$exclusive/t/1"], QoS::AtLeastOnce)
            .await,
        [ReasonCode::GRANTED_QOS_1]
    );
    // Claiming again what one holds succeeds.
    assert_eq!(
        holder
            .subscribe_codes(2, &["$exclusive/t/1"], QoS::AtLeastOnce)
            .await,
        [ReasonCode::GRANTED_QOS_1]
    );
    let (mut other5, _) = RawClient::connect_v5(broker.addr, "other5").await;
    let (mut other3, _) = RawClient::connect_v311(broker.addr, "other3").await;
    assert_eq!(
        other5
            .subscribe_codes(1, &["$exclusive/t/1", "t/1"], QoS::AtLeastOnce)
            .await,
        [ReasonCode::QUOTA_EXCEEDED, ReasonCode::GRANTED_QOS_1],
        "the filter without the prefix is unaffected"
    );
    assert_eq!(
        other3
            .subscribe_codes(1, &["$exclusive/t/1"], QoS::AtLeastOnce)
            .await,
        [ReasonCode::UNSPECIFIED_ERROR],
        "3.1.1 hears 0x80"
    );
    // The holder receives on t/1.
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "pub").await;
    publisher
        .publish_acked(publish_struct("t/1", QoS::AtMostOnce, None, b"m"))
        .await;
    assert_eq!(holder.expect_publish().await.topic, "t/1");
    assert_eq!(other5.expect_publish().await.topic, "t/1");

    // Unsubscribing lets go.
    assert_eq!(
        holder.unsubscribe(3, "$exclusive/t/1").await,
        [ReasonCode::SUCCESS]
    );
    assert_eq!(
        other3
            .subscribe_codes(2, &["$exclusive/t/1"], QoS::AtLeastOnce)
            .await,
        [ReasonCode::GRANTED_QOS_1]
    );
    // So does the end of the holder's session.
    other3.disconnect().await;
    assert_eq!(
        other5
            .subscribe_codes(2, &["$exclusive/t/1"], QoS::AtLeastOnce)
            .await,
        [ReasonCode::GRANTED_QOS_1]
    );
}

#[tokio::test]
async fn exclusive_subscription_switched_off_is_refused() {
    let broker = TestBroker::start_with(|c| c.mqtt.exclusive_subscription = false).await;
    let (mut client, _) = RawClient::connect_v5(broker.addr, "c").await;
    assert_eq!(
        client
            .subscribe_codes(1, &["$exclusive/t"], QoS::AtMostOnce)
            .await,
        [ReasonCode::TOPIC_FILTER_INVALID]
    );
}

fn rewrite_rule(action: &str, source: &str, re: &str, dest: &str) -> petrel::config::RewriteFile {
    petrel::config::RewriteFile {
        action: action.into(),
        source_topic: source.into(),
        re: re.into(),
        dest_topic: dest.into(),
    }
}

/// EMQX's documented example: `x/y/{n}` becomes `z/y/{n}` for publish and subscribe.
#[tokio::test]
async fn topic_rewrite_applies_to_publish_subscribe_and_unsubscribe() {
    let broker = TestBroker::start_with(|c| {
        c.rewrite
            .push(rewrite_rule("publish", "x/#", r"^x/y/(.+)$", "z/y/$1"));
        c.rewrite
            .push(rewrite_rule("subscribe", "s/+", r"^s/(\d+)$", "z/y/$1"));
        c.rewrite.push(rewrite_rule(
            "all",
            "c/+",
            r"^c/(.+)$",
            "own/${clientid}/$1",
        ));
    })
    .await;
    for version in [V311, V5] {
        let (mut sub, _) =
            RawClient::connect_ok(broker.addr, connect_packet(version, "rsub")).await;
        sub.subscribe(1, "z/y/#", QoS::AtMostOnce).await;
        let (mut publisher, _) =
            RawClient::connect_ok(broker.addr, connect_packet(version, "rpub")).await;
        publisher
            .publish_acked(publish_struct("x/y/1", QoS::AtLeastOnce, Some(1), b"p"))
            .await;
        assert_eq!(sub.expect_publish().await.topic, "z/y/1");
        // A publish the regular expression does not match goes out as it is.
        publisher
            .publish_acked(publish_struct("x/1", QoS::AtLeastOnce, Some(2), b"q"))
            .await;
        sub.expect_silence().await;

        // Subscribing to s/7 subscribes to z/y/7; unsubscribing s/7 undoes it.
        let (mut other, _) =
            RawClient::connect_ok(broker.addr, connect_packet(version, "rother")).await;
        other.subscribe(1, "s/7", QoS::AtMostOnce).await;
        publisher
            .publish_acked(publish_struct("z/y/7", QoS::AtMostOnce, None, b"r"))
            .await;
        assert_eq!(other.expect_publish().await.topic, "z/y/7");
        assert_eq!(sub.expect_publish().await.topic, "z/y/7");
        let codes = other.unsubscribe(2, "s/7").await;
        if version.is_v5() {
            assert_eq!(codes, [ReasonCode::SUCCESS]);
        }
        publisher
            .publish_acked(publish_struct("z/y/7", QoS::AtMostOnce, None, b"s"))
            .await;
        assert_eq!(sub.expect_publish().await.topic, "z/y/7");
        other.expect_silence().await;

        // Placeholders: c/x from client rpub lands on own/rpub/x.
        sub.subscribe(2, "own/#", QoS::AtMostOnce).await;
        publisher
            .publish_acked(publish_struct("c/x", QoS::AtMostOnce, None, b"t"))
            .await;
        assert_eq!(sub.expect_publish().await.topic, "own/rpub/x");
        for client in [sub, publisher, other] {
            client.disconnect().await;
        }
    }
}

#[tokio::test]
async fn auto_subscribe_subscribes_every_client_that_connects() {
    let broker = TestBroker::start_with(|c| {
        c.auto_subscribe
            .topics
            .push(petrel::config::AutoSubscribeFile {
                topic: "cmd/${clientid}/#".into(),
                qos: 1,
                rh: 0,
                rap: false,
                nl: false,
            });
    })
    .await;
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "commander").await;
    let mut retained = publish_struct("cmd/car-5/boot", QoS::AtLeastOnce, Some(1), b"r");
    retained.retain = true;
    publisher.publish_acked(retained).await;
    for (version, id) in [(V311, "car-3"), (V5, "car-5")] {
        let (mut car, _) = RawClient::connect_ok(broker.addr, connect_packet(version, id)).await;
        if id == "car-5" {
            // Retained messages come with an automatic subscription too.
            let got = car.expect_publish().await;
            assert_eq!((got.topic.as_str(), got.retain), ("cmd/car-5/boot", true));
            car.send(&Packet::PubAck(petrel::codec::Ack::new(
                got.packet_id.unwrap(),
                ReasonCode::SUCCESS,
            )))
            .await;
        }
        publisher
            .publish_acked(publish_struct(
                &format!("cmd/{id}/go"),
                QoS::AtLeastOnce,
                Some(2),
                b"go",
            ))
            .await;
        let got = car.expect_publish().await;
        assert_eq!(
            (got.topic, got.qos),
            (format!("cmd/{id}/go"), QoS::AtLeastOnce)
        );
        car.send(&Packet::PubAck(petrel::codec::Ack::new(
            got.packet_id.unwrap(),
            ReasonCode::SUCCESS,
        )))
        .await;
        car.expect_silence().await;
    }
}

#[test]
fn bad_rewrite_and_auto_subscribe_rules_name_their_key() {
    let load = |text: &str| {
        let dir = std::env::temp_dir().join(unique("petrel-rules"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("petrel.toml");
        std::fs::write(&path, text).unwrap();
        let result = petrel::config::Config::load(Some(&path), std::iter::empty(), &[]);
        let _ = std::fs::remove_dir_all(dir);
        result.err().map(|e| e.to_string())
    };
    let err = load(
        "[[rewrite]]\naction = \"all\"\nsource_topic = \"x/#\"\nre = \"(\"\ndest_topic = \"y\"\n",
    );
    assert!(
        err.as_deref().is_some_and(|e| e.contains("rewrite[0].re")),
        "{err:?}"
    );
    let err = load(
        "[[rewrite]]\naction = \"both\"\nsource_topic = \"x/#\"\nre = \"x\"\ndest_topic = \"y\"\n",
    );
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("rewrite[0].action")),
        "{err:?}"
    );
    let err = load("[[auto_subscribe.topics]]\ntopic = \"t\"\nqos = 3\n");
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("auto_subscribe.topics[0].qos")),
        "{err:?}"
    );
    let many = "[[auto_subscribe.topics]]\ntopic = \"t\"\n".repeat(31);
    assert!(load(&many).is_some_and(|e| e.contains("at most 30")));
    assert_eq!(
        load("[[auto_subscribe.topics]]\ntopic = \"t/${clientid}\"\nqos = 2\nrh = 1\n"),
        None
    );
}

/// `[mqtt] shared_subscription_strategy` for every group, `[shared_subscription_group.NAME]`
/// for one: sticky keeps one member, hash_clientid keeps each publisher on one member.
#[tokio::test]
async fn shared_subscription_strategies_are_configured_broker_wide_and_per_group() {
    let broker = TestBroker::start_with(|c| {
        c.mqtt.shared_subscription_strategy = petrel::config::SharedStrategy::Sticky;
        c.shared_subscription_group.insert(
            "byclient".into(),
            petrel::config::SharedGroupSettings {
                strategy: petrel::config::SharedStrategy::HashClientid,
            },
        );
    })
    .await;
    for (group, publishers) in [("sticky", 1usize), ("byclient", 4)] {
        let filter = format!("$share/{group}/shared/{group}");
        let mut members = Vec::new();
        for m in 0..3 {
            let (mut member, _) =
                RawClient::connect_v5(broker.addr, &format!("{group}-m{m}")).await;
            member.subscribe(1, &filter, QoS::AtMostOnce).await;
            members.push(member);
        }
        let mut senders = Vec::new();
        for p in 0..publishers {
            senders.push(
                RawClient::connect_v5(broker.addr, &format!("{group}-p{p}"))
                    .await
                    .0,
            );
        }
        let topic = format!("shared/{group}");
        for round in 0..3 {
            for (p, sender) in senders.iter_mut().enumerate() {
                let payload = format!("{p}:{round}");
                sender
                    .publish_acked(publish_struct(
                        &topic,
                        QoS::AtMostOnce,
                        None,
                        payload.as_bytes(),
                    ))
                    .await;
            }
        }
        // Which member got each publisher's messages.
        let mut owner = std::collections::HashMap::new();
        let mut total = 0;
        for (m, member) in members.iter_mut().enumerate() {
            while let Read::Packet(packet) = member.read(QUIET).await {
                let Packet::Publish(publish) = *packet else {
                    continue;
                };
                let text = String::from_utf8(publish.payload.to_vec()).unwrap();
                let publisher = text.split(':').next().unwrap().to_owned();
                let previous = owner.insert(publisher.clone(), m);
                assert!(
                    previous.is_none_or(|p| p == m),
                    "{group}: {publisher} split across members"
                );
                total += 1;
            }
        }
        assert_eq!(
            total,
            3 * publishers,
            "{group}: every message to one member"
        );
        if group == "sticky" {
            assert_eq!(owner.len(), 1);
        }
    }
}

/// EMQX's redispatch: a member of a shared group that leaves with unacknowledged QoS 1
/// messages (in flight, or still queued behind its Receive Maximum) has them go to another
/// member, and not again to itself when it returns.
#[tokio::test]
async fn a_leaving_shared_member_has_its_unacknowledged_messages_redispatched() {
    let broker = TestBroker::start().await;
    for version in [V311, V5] {
        let filter = format!("$share/rd/{}", unique("rd"));
        let topic = filter.splitn(3, '/').nth(2).unwrap().to_owned();
        let mut leaving_connect = connect_packet(version, &unique("leaving"));
        leaving_connect.clean_start = false;
        if version.is_v5() {
            leaving_connect.properties.session_expiry_interval = Some(60);
            // One in flight at a time: the member's second message waits in its queue.
            leaving_connect.properties.receive_maximum = Some(1);
        }
        let (mut leaving, _) = RawClient::connect_ok(broker.addr, leaving_connect.clone()).await;
        leaving.subscribe(1, &filter, QoS::AtLeastOnce).await;
        let (mut staying, _) =
            RawClient::connect_ok(broker.addr, connect_packet(version, &unique("staying"))).await;
        staying.subscribe(1, &filter, QoS::AtLeastOnce).await;
        let (mut publisher, _) = RawClient::connect_v5(broker.addr, &unique("rdpub")).await;
        let sent = ["m1", "m2", "m3", "m4"];
        for (id, payload) in sent.iter().enumerate() {
            publisher
                .publish_acked(publish_struct(
                    &topic,
                    QoS::AtLeastOnce,
                    Some(id as u16 + 1),
                    payload.as_bytes(),
                ))
                .await;
        }
        // Round robin: two messages each. The leaving member acknowledges none.
        let first = leaving.expect_publish().await;
        let mut got = Vec::new();
        for _ in 0..2 {
            let publish = staying.expect_publish().await;
            got.push(String::from_utf8(publish.payload.to_vec()).unwrap());
        }
        drop(leaving);
        for _ in 0..2 {
            let publish = staying.expect_publish().await;
            got.push(String::from_utf8(publish.payload.to_vec()).unwrap());
        }
        got.sort();
        assert_eq!(
            got, sent,
            "{version:?}: the staying member has every message"
        );
        assert!(got.contains(&String::from_utf8(first.payload.to_vec()).unwrap()));
        // Back with its session, the member does not get them again.
        let (mut back, connack) = RawClient::connect_ok(broker.addr, leaving_connect).await;
        assert!(connack.session_present);
        back.expect_silence().await;
    }
}
