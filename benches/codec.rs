//! Codec micro-benchmarks: decode and encode by packet type, payload size and version.
//!
//! `cargo bench --bench codec`. Figures go to docs/benchmarks.md with the command that made them.

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use petrel::codec::PacketId;
use petrel::codec::{
    encode, Ack, Codec, Connect, Packet, Properties, ProtocolVersion, Publish, QoS, ReasonCode,
    Subscribe, SubscriptionOptions,
};

fn publish(size: usize, version: ProtocolVersion) -> Packet {
    let mut properties = Properties::default();
    if version.is_v5() {
        properties
            .user_properties
            .push(("trace".into(), "abc".into()));
    }
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "vehicles/car-42/telemetry/speed".into(),
        packet_id: Some(PacketId(7)),
        properties,
        payload: Bytes::from(vec![0x5a; size]),
    })
}

fn bench_publish(c: &mut Criterion) {
    let mut group = c.benchmark_group("publish");
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        for size in [64usize, 1024, 64 * 1024] {
            let packet = publish(size, version);
            let mut wire = BytesMut::new();
            encode(&packet, version, &mut wire);
            let wire = wire.freeze();
            group.throughput(Throughput::Bytes(wire.len() as u64));
            let id = format!("{version:?}/{size}");
            group.bench_with_input(BenchmarkId::new("decode", &id), &wire, |b, wire| {
                let mut codec = Codec::with_version(version, 1 << 20);
                b.iter(|| {
                    let mut buf = BytesMut::from(&wire[..]);
                    codec.decode(&mut buf).unwrap().unwrap()
                })
            });
            group.bench_with_input(BenchmarkId::new("encode", &id), &packet, |b, packet| {
                let mut out = BytesMut::with_capacity(wire.len() * 2);
                b.iter(|| {
                    out.clear();
                    encode(packet, version, &mut out);
                })
            });
        }
    }
    group.finish();
}

fn bench_acks(c: &mut Criterion) {
    let mut group = c.benchmark_group("puback");
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let packet = Packet::PubAck(Ack::new(PacketId(7), ReasonCode::SUCCESS));
        let mut wire = BytesMut::new();
        encode(&packet, version, &mut wire);
        let id = format!("{version:?}");
        group.bench_function(BenchmarkId::new("decode", &id), |b| {
            let mut codec = Codec::with_version(version, 1 << 20);
            b.iter(|| {
                let mut buf = BytesMut::from(&wire[..]);
                codec.decode(&mut buf).unwrap().unwrap()
            })
        });
        group.bench_function(BenchmarkId::new("encode", &id), |b| {
            let mut out = BytesMut::with_capacity(16);
            b.iter(|| {
                out.clear();
                encode(&packet, version, &mut out);
            })
        });
    }
    group.finish();
}

/// CONNECT and SUBSCRIBE: once per connection or subscription, not per message, but a
/// connection storm decodes 10 k of each.
fn bench_control(c: &mut Criterion) {
    let mut group = c.benchmark_group("control");
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let connect = Packet::Connect(Box::new(Connect {
            protocol: version,
            clean_start: true,
            keep_alive: 60,
            client_id: "vehicle-0042-telemetry".into(),
            will: None,
            username: Some("fleet".into()),
            password: Some(Bytes::from_static(b"secret")),
            properties: Properties::default(),
        }));
        let subscribe = Packet::Subscribe(Subscribe {
            packet_id: PacketId(9),
            properties: Properties::default(),
            filters: vec![
                (
                    "vehicles/+/telemetry/#".into(),
                    SubscriptionOptions::default(),
                ),
                (
                    "fleet/commands/car-42".into(),
                    SubscriptionOptions::default(),
                ),
            ],
        });
        for (name, packet) in [("connect", &connect), ("subscribe", &subscribe)] {
            let mut wire = BytesMut::new();
            encode(packet, version, &mut wire);
            let wire = wire.freeze();
            let id = format!("{name}/{version:?}");
            group.bench_with_input(BenchmarkId::new("decode", &id), &wire, |b, wire| {
                b.iter(|| {
                    // A fresh codec: CONNECT is the first packet a connection decodes.
                    let mut codec = Codec::new(1 << 20);
                    if name == "subscribe" {
                        codec = Codec::with_version(version, 1 << 20);
                    }
                    let mut buf = BytesMut::from(&wire[..]);
                    codec.decode(&mut buf).unwrap().unwrap()
                })
            });
            group.bench_with_input(BenchmarkId::new("encode", &id), packet, |b, packet| {
                let mut out = BytesMut::with_capacity(wire.len() * 2);
                b.iter(|| {
                    out.clear();
                    encode(packet, version, &mut out);
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_publish, bench_acks, bench_control);
criterion_main!(benches);
