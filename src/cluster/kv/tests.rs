//! The engine against a real `nats-server -js` (loopback, a free port, a temporary
//! directory; killed at the end of each test, panics included).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;

use super::*;
use crate::codec::{PacketId, Properties, QoS};
use crate::storage::record::{MessageRef, StoredSession};

use crate::cluster::test_nats::Server;

async fn js(server: &Server) -> Context {
    jetstream::new(server.connect().await)
}

async fn open_on(server: &Server, node: &str) -> KvEngine {
    open(js(server).await, "test", 1, node)
        .await
        .expect("opens the bucket")
}

/// Applies `batch` from a thread of its own, as the store's writer does.
async fn apply(mut engine: KvEngine, batch: Vec<Write>) -> KvEngine {
    tokio::task::spawn_blocking(move || {
        engine.apply(&batch).expect("the batch commits");
        engine
    })
    .await
    .expect("the writer thread")
}

/// What the bucket should hold, applied like the log engine does.
fn model_apply(model: &mut BTreeMap<Vec<u8>, Vec<u8>>, batch: &[Write]) {
    for write in batch {
        match write {
            Write::Put { key, value } => {
                model.insert(key.clone(), value.to_vec());
            }
            Write::Delete(keys) => {
                for key in keys {
                    model.remove(key);
                }
            }
            Write::EndSession { key, prefixes } => {
                model.remove(key);
                model.retain(|k, _| !prefixes.iter().any(|p| k.starts_with(p)));
            }
            // A forwarded message goes to the message stream, not to the bucket.
            Write::Publish { .. } => {}
        }
    }
}

fn put(key: Vec<u8>, value: &[u8]) -> Write {
    Write::Put {
        key,
        value: Bytes::copy_from_slice(value),
    }
}

fn end(client: &str) -> Write {
    Write::EndSession {
        key: record::session_key(client),
        prefixes: record::client_prefixes(client),
    }
}

/// xorshift64*: the seed is printed, so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_restores_what_was_applied() {
    let server = Server::start("reopen").await;
    let mut engine = open_on(&server, "n1").await;
    let mut model = engine.take_records();
    assert_eq!(
        model.get(record::META),
        Some(&record::meta_value().to_vec()),
        "a new bucket gets the format record"
    );
    let seed = std::env::var("KV_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| u64::from(std::process::id()) | 1);
    println!("KV_SEED={seed}");
    let mut rng = Rng(seed);
    let long = "L".repeat(3000);
    let clients = ["a", "b", "", long.as_str()];
    // Records of a client come after its session record (which names the owner), as the
    // store writes them.
    let mut alive = [false; 4];
    for round in 0..20 {
        let mut batch = Vec::new();
        for _ in 0..1 + rng.next(30) {
            let c = rng.next(clients.len() as u64) as usize;
            let client = clients[c];
            let seq = rng.next(8);
            let value = format!("v{round}-{seq}").into_bytes();
            let mut op = rng.next(10);
            if (2..=6).contains(&op) && !alive[c] {
                op = 0;
            }
            alive[c] = match op {
                0 | 1 => true,
                9 => false,
                _ => alive[c],
            };
            batch.push(match op {
                0 | 1 => put(record::session_key(client), &value),
                2 | 3 => put(record::queued_key(client, seq), &value),
                4 => put(record::sent_key(client, seq), &value),
                5 => put(
                    record::inbound_key(client, seq, PacketId(seq as u16 + 1)),
                    &value,
                ),
                6 => Write::Delete(vec![
                    record::queued_key(client, seq),
                    record::sent_key(client, seq),
                ]),
                7 => put(record::retained_key(&format!("t/{seq}")), &value),
                8 => put(record::delayed_key(seq), &value),
                _ => end(client),
            });
        }
        model_apply(&mut model, &batch);
        engine = apply(engine, batch).await;
    }
    // A long retained topic (hashed key), then a delete of one retained message.
    let long_topic = format!("t/{}", "x".repeat(4000));
    let batch = vec![
        put(record::retained_key(&long_topic), b"long"),
        put(record::session_key("a"), b"last"),
        Write::Delete(vec![record::retained_key("t/1")]),
    ];
    model_apply(&mut model, &batch);
    engine = apply(engine, batch).await;
    assert!(engine.bytes_written() > 0);
    drop(engine);

    let mut again = open_on(&server, "n1").await;
    assert_eq!(again.take_records(), model, "seed {seed}");

    // Another node restores the retained messages and the format record only.
    let mut other = open_on(&server, "n2").await;
    let shared: BTreeMap<_, _> = model
        .iter()
        .filter(|(k, _)| k.first() == Some(&record::RETAINED) || k.as_slice() == record::META)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(other.take_records(), shared, "seed {seed}");
}

fn message(topic: &str) -> MessageRef<'_> {
    static PROPERTIES: std::sync::LazyLock<Properties> =
        std::sync::LazyLock::new(Properties::default);
    MessageRef {
        topic,
        payload: b"hello",
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: &PROPERTIES,
        publisher: Some("p"),
        expires_at_ms: None,
    }
}

fn session_writes(client: &str, key: u64) -> Vec<Write> {
    let session = StoredSession {
        expiry_interval: 3600,
        offline_since_ms: None,
        subscriptions: Vec::new(),
    };
    vec![
        Write::Put {
            key: record::session_key(client),
            value: record::session_value(&session),
        },
        Write::Put {
            key: record::queued_key(client, key),
            value: record::delivery_value(QoS::AtLeastOnce, false, &[], None, message("a/b")),
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_follows_the_last_node_to_store_the_session() {
    let server = Server::start("owner").await;
    let n1 = open_on(&server, "n1").await;
    let h1 = n1.handle();
    let n1 = apply(n1, session_writes("c1", 7)).await;
    assert_eq!(h1.owner_of("c1").await.unwrap().as_deref(), Some("n1"));
    assert_eq!(h1.owner_of("nobody").await.unwrap(), None);
    assert_eq!((h1.node(), h1.bucket()), ("n1", "test_store"));

    // Another node takes the session over: reads it, restores it, stores it as its own.
    let n2 = open_on(&server, "n2").await;
    let h2 = n2.handle();
    let records = h2.load_client("c1").await.unwrap();
    assert_eq!(
        records.len(),
        2,
        "the session and its queued delivery, no owner key"
    );
    let recovered = crate::storage::recover::read(records).expect("records decode");
    assert_eq!(recovered.sessions.len(), 1);
    assert_eq!(recovered.sessions[0].queued.len(), 1);
    assert_eq!(recovered.next_key, 8);
    let (store, restored) =
        crate::storage::open_with(Box::new(n2), &crate::storage::StorageSettings::default())
            .expect("opens on the engine");
    assert!(restored.sessions.is_empty(), "n2 owned nothing at start-up");
    store.raise_next_key(recovered.next_key);
    use crate::core::hooks::Store as _;
    assert!(store.next_key() >= 8);
    drop(store);

    let n2 = open_on(&server, "n2").await;
    let n2 = apply(n2, session_writes("c1", 9)).await;
    assert_eq!(h1.owner_of("c1").await.unwrap().as_deref(), Some("n2"));
    drop((n1, n2));
    let mut n1 = open_on(&server, "n1").await;
    let records = n1.take_records();
    assert!(
        !records.keys().any(|k| k.first() == Some(&record::SESSION)),
        "n1 no longer restores c1"
    );
    let mut n2 = open_on(&server, "n2").await;
    let recovered = crate::storage::recover::read(n2.take_records()).unwrap();
    assert_eq!(recovered.sessions.len(), 1);
    assert_eq!(recovered.sessions[0].queued.len(), 2);

    // An ended session leaves nothing behind, owner included.
    let n2 = apply(n2, vec![end("c1")]).await;
    assert_eq!(h1.owner_of("c1").await.unwrap(), None);
    assert!(h1.load_client("c1").await.unwrap().is_empty());
    drop(n2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_watch_sees_other_nodes_only() {
    let server = Server::start("watch").await;
    let n1 = open_on(&server, "n1").await;
    let n2 = open_on(&server, "n2").await;
    let mut changes = Box::pin(n1.handle().watch_retained("n1", false).await.unwrap());
    let long_topic = format!("t/{}", "y".repeat(2000));
    let n1 = apply(n1, vec![put(record::retained_key("own"), b"mine")]).await;
    let n2 = apply(
        n2,
        vec![
            put(record::retained_key("t/1"), b"v1"),
            put(record::retained_key(&long_topic), b"v2"),
        ],
    )
    .await;
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), changes.next())
            .await
            .expect("a change within 10 s")
            .expect("the watch goes on")
            .expect("no error")
    };
    // n1's own write came first in the stream: had it not been skipped, it would be here.
    let seen = BTreeMap::from([next().await, next().await]);
    assert_eq!(
        seen,
        BTreeMap::from([
            ("t/1".to_owned(), Some(Bytes::from_static(b"v1"))),
            (long_topic, Some(Bytes::from_static(b"v2"))),
        ]),
        "n1's own write is skipped"
    );
    let n2 = apply(n2, vec![Write::Delete(vec![record::retained_key("t/1")])]).await;
    assert_eq!(next().await, ("t/1".to_owned(), None));
    drop((n1, n2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_beyond_the_servers_say_so() {
    let server = Server::start("replicas").await;
    let err = open(js(&server).await, "r3", 3, "n1")
        .await
        .err()
        .expect("one server cannot hold 3 replicas")
        .to_string();
    assert!(err.contains("cluster.replicas"), "{err}");
    assert!(err.contains("3 replicas"), "{err}");
    println!("{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_past_max_payload_fails_its_commit_clearly() {
    let server = Server::start("big").await;
    let engine = open_on(&server, "n1").await;
    let err = tokio::task::spawn_blocking(move || {
        let mut engine = engine;
        engine
            .apply(&[put(record::retained_key("big"), &vec![0; 2 << 20])])
            .expect_err("2 MiB do not fit 1 MiB")
    })
    .await
    .unwrap()
    .to_string();
    assert!(err.contains("max_payload"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_commits_through_the_engine_and_restores() {
    use crate::core::hooks::Store as _;
    use crate::core::message::AppMessage;
    use crate::core::session::Session;
    use crate::core::topic::TopicName;
    use crate::storage::{open_with, StorageSettings};

    let server = Server::start("store").await;
    let settings = StorageSettings::default();
    let (store, recovered) = open_with(Box::new(open_on(&server, "n1").await), &settings).unwrap();
    assert!(recovered.sessions.is_empty() && recovered.retained.is_empty());
    let session = Session::new(std::sync::Arc::from("s1"), 600);
    let first = store.session_saved(&session);
    let retained = AppMessage {
        topic: TopicName::parse("a/b".to_owned(), 0).unwrap(),
        payload: Bytes::from_static(b"r"),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: Properties::default(),
        publisher: None,
        expires_at: None,
    };
    let last = store.retained_set(&retained).unwrap();
    std::future::poll_fn(|cx| store.poll_durable(cx, first, last))
        .await
        .expect("committed to JetStream");
    // The writer thread commits through the runtime: closed off the runtime's threads.
    tokio::task::spawn_blocking(move || store.close())
        .await
        .unwrap();

    let (store, recovered) = open_with(Box::new(open_on(&server, "n1").await), &settings).unwrap();
    assert_eq!(recovered.sessions.len(), 1);
    assert_eq!(&*recovered.sessions[0].session.client_id, "s1");
    assert_eq!(recovered.retained.len(), 1);
    assert_eq!(recovered.retained[0].payload, Bytes::from_static(b"r"));
    tokio::task::spawn_blocking(move || store.close())
        .await
        .unwrap();
}

/// Figures, not a check: `cargo test --lib cluster::kv::tests::figures -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints throughput figures"]
async fn figures_pipelined_batches() {
    let server = Server::start("figures").await;
    let mut engine = open_on(&server, "n1").await;
    for batch_len in [1usize, 10, 100, 1000] {
        let rounds = (4000 / batch_len).max(20);
        let started = std::time::Instant::now();
        for round in 0..rounds {
            let batch = (0..batch_len)
                .map(|i| {
                    put(
                        record::queued_key("c", (round * batch_len + i) as u64),
                        &[7; 200],
                    )
                })
                .collect();
            engine = apply(engine, batch).await;
        }
        let took = started.elapsed();
        println!(
            "batch {batch_len:>4}: {:>7.0} writes/s, {:>6.2} ms per commit",
            (rounds * batch_len) as f64 / took.as_secs_f64(),
            took.as_secs_f64() * 1000.0 / rounds as f64
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_three_servers() {
    let servers = Server::cluster("r3").await;
    // The cluster elects its JetStream leader first: retried for up to 20 s.
    let mut last = String::new();
    let mut engine = None;
    for _ in 0..40 {
        match open(js(&servers[0]).await, "r3", 3, "n1").await {
            Ok(opened) => {
                engine = Some(opened);
                break;
            }
            Err(err) => last = err.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let engine = engine.unwrap_or_else(|| panic!("no R3 bucket on 3 servers: {last}"));
    let info = engine.kv.stream.cached_info().clone();
    assert_eq!(info.config.num_replicas, 3);
    // Written through one server, read back through another.
    let _engine = apply(engine, session_writes("c1", 1)).await;
    let other = open(js(&servers[2]).await, "r3", 3, "n2").await.unwrap();
    assert_eq!(other.handle().load_client("c1").await.unwrap().len(), 2);
    assert_eq!(
        other.handle().owner_of("c1").await.unwrap().as_deref(),
        Some("n1")
    );

    let err = open(js(&servers[1]).await, "r5", 5, "n1")
        .await
        .err()
        .expect("3 servers cannot hold 5 replicas")
        .to_string();
    println!("{err}");
    assert!(err.contains("cluster.replicas"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_deliveries_leave_no_markers_behind() {
    let server = Server::start("markers").await;
    let engine = open_on(&server, "n1").await;
    let handle = engine.handle();
    let mut batch = vec![put(record::session_key("c"), b"s")];
    batch.extend((0..50).map(|k| put(record::queued_key("c", k), b"q")));
    let engine = apply(engine, batch).await;
    let deletes = (0..50)
        .map(|k| Write::Delete(vec![record::queued_key("c", k), record::sent_key("c", k)]))
        .collect();
    let engine = apply(engine, deletes).await;
    // The next commit removes the markers of the one before.
    let engine = apply(engine, vec![put(record::retained_key("t"), b"r")]).await;
    let state = handle.stream.get_info().await.unwrap().state;
    // The format record, the session, its owner key, the retained message.
    assert_eq!(state.messages, 4, "{state:?}");
    let records = handle.load_client("c").await.unwrap();
    assert_eq!(
        records.keys().collect::<Vec<_>>(),
        [&record::session_key("c")]
    );
    drop(engine);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_owned_sessions_are_read_in_one_pass() {
    let server = Server::start("many").await;
    let clients = PER_CLIENT_READS + 6;
    let mut writes = Vec::new();
    for i in 0..clients {
        writes.extend(session_writes(&format!("mine{i}"), i as u64));
    }
    let n1 = apply(open_on(&server, "n1").await, writes).await;
    let n2 = apply(open_on(&server, "n2").await, session_writes("theirs", 1)).await;
    drop((n1, n2));
    let mut n1 = open_on(&server, "n1").await;
    let recovered = crate::storage::recover::read(n1.take_records()).unwrap();
    let mut names: Vec<String> = recovered
        .sessions
        .iter()
        .map(|s| s.session.client_id.to_string())
        .collect();
    names.sort();
    let mut expected: Vec<String> = (0..clients).map(|i| format!("mine{i}")).collect();
    expected.sort();
    assert_eq!(names, expected);
    assert!(recovered.sessions.iter().all(|s| s.queued.len() == 1));
}
