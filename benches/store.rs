//! The durable store's engine on the broker's workload, and the broker's start-up over a big
//! store. Prints figures for `docs/storage.md`; asserts nothing about speed.
//!
//!   cargo bench --bench store
//!
//! A. Queue churn, as in the redb/fjall evaluation (docs/storage.md): 200,000 records of a
//!    16-byte key and a 250-byte value, committed (fsync) in batches of B, each batch also
//!    deleting the keys written 4 batches earlier. Records/s, commits/s, bytes written per
//!    record (this process's `write_bytes` in /proc/self/io, compaction included).
//! B. Start-up: a store with 10,000 persistent sessions (one subscription and 10 queued
//!    deliveries each) and 100,000 retained messages, written with the broker's own record
//!    format; then the `petrel` binary is started on it: time until it listens, and its RSS.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use petrel::codec::{Properties, QoS, SubscriptionOptions};
use petrel::storage::engine::{self, Engine, Write};
use petrel::storage::record::{
    self, StoredDelivery, StoredMessage, StoredSession, StoredSubscription,
};

fn write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| {
                    l.strip_prefix("write_bytes: ")
                        .map(|v| v.trim().parse().ok())
                })
                .flatten()
        })
        .unwrap_or(0)
}

/// Bytes in the files of `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn fresh(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("petrel-store-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn key(i: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(16);
    k.extend_from_slice(&0x5eed_u64.to_be_bytes());
    k.extend_from_slice(&i.to_be_bytes());
    k
}

fn workload_a(batch: u64) {
    const RECORDS: u64 = 200_000;
    let dir = fresh(&format!("a{batch}"));
    let value = Bytes::from(vec![0xa5u8; 250]);
    let before = write_bytes();
    let started = Instant::now();
    let mut commits = 0u64;
    {
        let mut log = engine::open(&dir).expect("open");
        let mut writes = Vec::with_capacity(batch as usize * 2);
        let mut i = 0;
        while i < RECORDS {
            writes.clear();
            for j in i..(i + batch).min(RECORDS) {
                writes.push(Write::Put {
                    key: key(j),
                    value: value.clone(),
                });
            }
            if i >= 4 * batch {
                let old = i - 4 * batch;
                writes.push(Write::Delete((old..old + batch).map(key).collect()));
            }
            log.apply(&writes).expect("commit");
            commits += 1;
            i += batch;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let written = write_bytes() - before;
    let disk = dir_bytes(&dir);
    println!(
        "A log B={batch:<4} records/s {:>9.0}  commits/s {:>7.0}  bytes/record {:>6.0}  disk {:.1} MB",
        RECORDS as f64 / secs,
        commits as f64 / secs,
        written as f64 / RECORDS as f64,
        disk as f64 / 1e6
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn message(topic: String, size: usize) -> StoredMessage {
    StoredMessage {
        topic,
        payload: Bytes::from(vec![0x42u8; size]),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
        publisher: Some("bench-pub".into()),
        expires_at_ms: None,
    }
}

/// Writes a broker store: `sessions` persistent sessions with `queued` deliveries each, and
/// `retained` retained messages.
fn write_store(data_dir: &Path, sessions: u64, queued: u64, retained: u64) {
    let mut log = engine::open(&data_dir.join("store")).expect("open");
    let mut writes = Vec::new();
    let mut key_no = 0u64;
    for s in 0..sessions {
        let client = format!("vehicle-{s:06}");
        writes.push(Write::Put {
            key: record::session_key(&client),
            value: record::session_value(&StoredSession {
                expiry_interval: 86_400,
                offline_since_ms: None,
                subscriptions: vec![StoredSubscription {
                    filter: format!("fleet/{s}/cmd/#"),
                    options: SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        ..Default::default()
                    },
                    id: None,
                }],
            }),
        });
        for _ in 0..queued {
            writes.push(Write::Put {
                key: record::queued_key(&client, key_no),
                value: record::stored_delivery_value(&StoredDelivery {
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    subscription_ids: Vec::new(),
                    shared: None,
                    message: message(format!("fleet/{s}/cmd/set"), 250),
                }),
            });
            key_no += 1;
        }
        if writes.len() >= 1000 {
            log.apply(&writes).expect("commit");
            writes.clear();
        }
    }
    for r in 0..retained {
        let mut m = message(format!("fleet/{r}/state"), 200);
        m.retain = true;
        writes.push(Write::Put {
            key: record::retained_key(&m.topic),
            value: record::retained_value(m.as_ref()),
        });
        if writes.len() >= 1000 {
            log.apply(&writes).expect("commit");
            writes.clear();
        }
    }
    log.apply(&writes).expect("commit");
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| {
                    l.strip_prefix(field)
                        .map(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
                })
                .flatten()
        })
        .unwrap_or(0)
}

fn start_up(data_dir: &Path, label: &str) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let started = Instant::now();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_petrel"))
        .arg("--tcp")
        .arg(addr.to_string())
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--set", "api.enable=false"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("petrel starts");
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "petrel did not listen");
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let rss = status_kib(child.id(), "VmRSS:");
    let hwm = status_kib(child.id(), "VmHWM:");
    let _ = child.kill();
    let _ = child.wait();
    let disk = dir_bytes(&data_dir.join("store"));
    println!(
        "B {label}: listening after {:.0} ms, RSS {:.1} MiB (peak {:.1} MiB), store {:.1} MB",
        took.as_secs_f64() * 1000.0,
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        disk as f64 / 1e6
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects a part.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants = |part: &str| only.is_empty() || only.iter().any(|o| o == part);
    if wants("a") {
        for batch in [1, 16, 128] {
            for _ in 0..2 {
                workload_a(batch);
            }
        }
    }
    if wants("b") {
        let empty = fresh("empty");
        start_up(&empty, "empty store");
        let _ = std::fs::remove_dir_all(&empty);
        let dir = fresh("startup");
        let started = Instant::now();
        write_store(&dir, 10_000, 10, 100_000);
        println!(
            "B wrote 10,000 sessions x 10 queued + 100,000 retained in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        // The first start compacts the log into a base; the second reads the base.
        start_up(&dir, "first start (replays the log, compacts)");
        start_up(&dir, "second start (reads the base)");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
