//! Persistence: what must outlive the process, on disk under `<data_dir>/store`.
//!
//! [`Embedded`] implements the core's [`Store`] seam for one node: every write is encoded
//! into a record (`record`) on the caller's thread and queued with a [`Ticket`]; one writer
//! thread commits the queue to the engine (`engine`) in batches, one commit (fsync) each,
//! and then wakes the connections waiting for those tickets (group commit). With
//! `durability = "group"` the writer gathers writes for up to `group_window` after the first
//! one; with `"sync"` it commits as soon as the previous commit is done (writes that arrive
//! during a commit still share the next one). `"none"` builds no store at all.
//!
//! The store bounds itself by `max_bytes` of live records (queued deliveries, retained
//! messages): past it, [`Store::queued`] and [`Store::retained_set`] are refused, and the
//! connection answers 0x97 (Quota exceeded) instead of acknowledging; nothing already stored
//! is dropped. A failed commit is reported to every ticket it held (their connections close
//! without acknowledging) and refuses new writes until a commit succeeds again.
//!
//! At start-up [`open`] reads every record back (`recover`) into what the broker restores:
//! sessions with their subscriptions, in-flight and queued deliveries and inbound QoS 2
//! state, and retained messages, with expiry counted across the downtime.

pub mod check;
pub mod engine;
pub mod record;
pub mod recover;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::core::channel::PendingWill;
use crate::core::hooks::{Refused, Store, Ticket};
use crate::core::message::{AppMessage, Delivery};
use crate::core::session::{Change, Session, StoreKey};
use engine::{Engine, Write};
use record::{MessageRef, SentAs, StoredSession, StoredSubscription};

pub use recover::Recovered;

/// When an acknowledged message is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Each commit as soon as the previous one is done.
    Sync,
    /// Commits gather writes for up to `group_window`.
    #[default]
    Group,
    /// No store: sessions, queues and retained messages live in memory only.
    None,
}

/// `[storage]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    pub durability: Durability,
    /// How long a group commit gathers writes after the first one.
    #[serde(deserialize_with = "crate::duration::deserialize")]
    pub group_window: Duration,
    /// Bytes of live records (queued deliveries, retained messages) the store holds at most
    /// (0: no limit).
    pub max_bytes: u64,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            durability: Durability::Group,
            group_window: Duration::from_millis(2),
            max_bytes: 1 << 30,
        }
    }
}

/// The store's directory under the data directory.
pub fn store_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("store")
}

/// Why the store could not be opened: the message names the store and what to do.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "the store in {dir} cannot be read: {reason}\n\
         Petrel will not start over it empty. Choices:\n  \
         petrel store check {dir}    (say what is wrong)\n  \
         petrel store repair {dir}   (keep every record that can be read)\n  \
         or move {dir} away to start with an empty store"
    )]
    /// The embedded log in `dir`.
    Dir { dir: String, reason: String },
    /// Another engine's records (`open_with`).
    #[error(
        "the store cannot be read: {reason}\n\
         Petrel will not start over it empty: remove or repair the record named"
    )]
    Engine { reason: String },
}

/// Opens (or creates) the store in `<data_dir>/store` and reads back what it holds.
pub fn open(
    data_dir: &Path,
    settings: &StorageSettings,
) -> Result<(Arc<Embedded>, Recovered), OpenError> {
    let dir = store_dir(data_dir);
    let fail = |reason: String| OpenError::Dir {
        dir: dir.display().to_string(),
        reason,
    };
    let started = Instant::now();
    let mut engine = engine::open(&dir).map_err(|e| fail(e.to_string()))?;
    let mut recovered = recover::read(engine.take_records()).map_err(|e| fail(e.to_string()))?;
    tracing::info!(
        dir = %dir.display(),
        sessions = recovered.sessions.len(),
        queued = recovered.queued_count(),
        retained = recovered.retained.len(),
        took_ms = started.elapsed().as_millis() as u64,
        "store opened"
    );
    let store = Embedded::start(Box::new(engine), settings, &mut recovered);
    Ok((store, recovered))
}

/// Starts the store on another engine (cluster mode: `cluster::kv`) and reads back what it
/// holds, as [`open`] does.
pub fn open_with(
    mut engine: Box<dyn Engine>,
    settings: &StorageSettings,
) -> Result<(Arc<Embedded>, Recovered), OpenError> {
    let started = Instant::now();
    let mut recovered = recover::read(engine.take_records()).map_err(|e| OpenError::Engine {
        reason: e.to_string(),
    })?;
    tracing::info!(
        sessions = recovered.sessions.len(),
        queued = recovered.queued_count(),
        retained = recovered.retained.len(),
        took_ms = started.elapsed().as_millis() as u64,
        "store opened"
    );
    let store = Embedded::start(engine, settings, &mut recovered);
    Ok((store, recovered))
}

/// Commits that failed: the newest ranges, and how far the forgotten ones went.
#[derive(Default)]
struct FailedRanges {
    ranges: Vec<(Ticket, Ticket)>,
    forgotten_upto: Ticket,
}

#[derive(Default)]
struct Pending {
    writes: Vec<Write>,
    /// Groups in progress (`Store::begin_group`): their token and where in `writes` they
    /// start. A commit never takes a group's first write without its last: it stops at the
    /// oldest open group.
    open_groups: Vec<(u64, usize)>,
    next_group: u64,
    /// The ticket of the last write in `writes`.
    last: Ticket,
    /// When the oldest write in `writes` was queued.
    since: Option<Instant>,
    shutdown: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    work: Condvar,
    /// Every ticket up to this one is decided: on disk, or failed (`failed`).
    decided: AtomicU64,
    waiters: Mutex<Vec<(Ticket, Waker)>>,
    /// Ticket ranges whose commit failed (the newest few).
    failed: Mutex<FailedRanges>,
    any_failed: AtomicBool,
    /// The last commit failed: new deliveries and retained messages are refused.
    failing: AtomicBool,
    /// Bytes of live queued deliveries and retained messages (admitted, maybe not yet
    /// written).
    used: AtomicU64,
    next_key: AtomicU64,
    settings: StorageSettings,
    /// Commits and bytes written, for the benchmarks.
    commits: AtomicU64,
    bytes_written: AtomicU64,
}

/// The one-node durable store; see the module documentation.
pub struct Embedded {
    shared: Arc<Shared>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

thread_local! {
    /// This thread's open group of writes (`Store::begin_group`), by its token.
    static GROUP: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Failed ranges remembered for late waiters.
const FAILED_KEPT: usize = 64;
/// A group commit goes early once this many writes are waiting.
const GROUP_MAX_WRITES: usize = 8192;

impl Embedded {
    fn start(
        engine: Box<dyn Engine>,
        settings: &StorageSettings,
        recovered: &mut Recovered,
    ) -> Arc<Self> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            work: Condvar::new(),
            decided: AtomicU64::new(0),
            waiters: Mutex::new(Vec::new()),
            failed: Mutex::new(FailedRanges::default()),
            any_failed: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            used: AtomicU64::new(recovered.live_bytes()),
            next_key: AtomicU64::new(recovered.next_key),
            settings: settings.clone(),
            commits: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
        });
        // Handed over, not copied: the broker does not need them.
        let sizes = std::mem::take(&mut recovered.sizes);
        let writer = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("petrel-store".into())
                .spawn(move || write_loop(&shared, engine, sizes))
                .expect("the store's writer thread starts")
        };
        Arc::new(Self {
            shared,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Commits what is queued and stops the writer (graceful shutdown).
    pub fn close(&self) {
        {
            let mut pending = self.shared.pending.lock().expect("never poisoned");
            pending.shutdown = true;
        }
        self.shared.work.notify_one();
        if let Some(writer) = self.writer.lock().expect("never poisoned").take() {
            let _ = writer.join();
            tracing::info!(
                commits = self.commits(),
                bytes_written = self.bytes_written(),
                live_bytes = self.used_bytes(),
                "store closed"
            );
        }
    }

    /// Raises the next delivery key to at least `at_least`: records restored after start-up
    /// (a session taken over from another node) keep keys below every new one.
    pub fn raise_next_key(&self, at_least: u64) {
        self.shared.next_key.fetch_max(at_least, Ordering::Relaxed);
    }

    /// Commits so far.
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }

    /// Bytes appended to the log so far.
    pub fn bytes_written(&self) -> u64 {
        self.shared.bytes_written.load(Ordering::Relaxed)
    }

    /// Bytes of live records held.
    pub fn used_bytes(&self) -> u64 {
        self.shared.used.load(Ordering::Relaxed)
    }

    fn submit(&self, write: Write) -> Ticket {
        self.enqueue(std::iter::once(write))
    }

    /// Queues writes under one lock: the writer takes them into one commit.
    fn enqueue(&self, writes: impl ExactSizeIterator<Item = Write>) -> Ticket {
        let n = writes.len() as u64;
        if n == 0 {
            return 0;
        }
        let mut pending = self.shared.pending.lock().expect("never poisoned");
        pending.writes.extend(writes);
        pending.last += n;
        let first = pending.since.is_none();
        if first {
            pending.since = Some(Instant::now());
        }
        let ticket = pending.last;
        drop(pending);
        if first {
            self.shared.work.notify_one();
        }
        ticket
    }

    /// Commits `payload` to the cluster's message stream on `subject` with the next group
    /// commit (see `cluster`): the returned ticket is decided once the stream has it.
    pub fn publish(&self, subject: String, payload: bytes::Bytes) -> Result<Ticket, Refused> {
        if self.shared.failing.load(Ordering::Relaxed) {
            return Err(Refused::Failed);
        }
        Ok(self.submit(Write::Publish { subject, payload }))
    }

    /// Records that node `node` has routed every message of the cluster's stream up to
    /// `seq` (committed after everything routing them wrote: see `cluster::node`).
    pub fn mark(&self, node: &str, seq: u64) -> Ticket {
        self.submit(Write::Put {
            key: record::mark_key(node),
            value: record::mark_value(seq),
        })
    }

    /// Admits `bytes` more of live records, or says why not.
    fn admit(&self, bytes: u64) -> Result<(), Refused> {
        if self.shared.failing.load(Ordering::Relaxed) {
            return Err(Refused::Failed);
        }
        let max = self.shared.settings.max_bytes;
        if max == 0 {
            self.shared.used.fetch_add(bytes, Ordering::Relaxed);
            return Ok(());
        }
        self.shared
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used + bytes <= max).then_some(used + bytes)
            })
            .map(|_| ())
            .map_err(|_| Refused::Full)
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.close();
    }
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The wall-clock time of an instant (for expiry that must count across downtime).
fn instant_to_ms(at: Instant) -> u64 {
    let now = Instant::now();
    let wall = wall_ms();
    if at >= now {
        wall.saturating_add(u64::try_from((at - now).as_millis()).unwrap_or(u64::MAX))
    } else {
        wall.saturating_sub(u64::try_from((now - at).as_millis()).unwrap_or(u64::MAX))
    }
}

pub(crate) fn message_ref(m: &AppMessage) -> MessageRef<'_> {
    MessageRef {
        topic: m.topic.as_str(),
        payload: &m.payload,
        qos: m.qos,
        retain: m.retain,
        properties: &m.properties,
        publisher: m.publisher.as_deref(),
        expires_at_ms: m.expires_at.map(instant_to_ms),
    }
}

fn stored_session(session: &Session, offline: bool) -> StoredSession {
    StoredSession {
        expiry_interval: session.expiry_interval,
        offline_since_ms: offline.then(wall_ms),
        subscriptions: session
            .subscriptions
            .values()
            .map(|s| StoredSubscription {
                filter: s.filter.as_str().to_owned(),
                options: s.options,
                id: s.id,
            })
            .collect(),
    }
}

impl Store for Embedded {
    fn next_key(&self) -> StoreKey {
        self.shared.next_key.fetch_add(1, Ordering::Relaxed)
    }

    fn session_saved(&self, session: &Session) -> Ticket {
        // Connected again: a will waiting from the last connection is cancelled.
        self.submit(Write::Delete(vec![record::will_key(&session.client_id)]));
        self.submit(Write::Put {
            key: record::session_key(&session.client_id),
            value: record::session_value(&stored_session(session, false)),
        })
    }

    fn session_filed(&self, session: &Session, will: Option<&PendingWill>) -> Ticket {
        // The will under its own key, so that publishing it forgets it (`will_published`).
        let will_key = record::will_key(&session.client_id);
        self.submit(match will.filter(|w| w.delay > 0) {
            Some(w) => Write::Put {
                key: will_key,
                value: record::will_value(w.delay, w.expiry_interval, message_ref(&w.message)),
            },
            None => Write::Delete(vec![will_key]),
        });
        self.submit(Write::Put {
            key: record::session_key(&session.client_id),
            value: record::session_value(&stored_session(session, true)),
        })
    }

    fn will_published(&self, client_id: &str) -> Ticket {
        self.submit(Write::Delete(vec![record::will_key(client_id)]))
    }

    fn session_ended(&self, client_id: &str) -> Ticket {
        self.submit(Write::EndSession {
            key: record::session_key(client_id),
            prefixes: record::client_prefixes(client_id),
        })
    }

    fn queued(
        &self,
        client_id: &str,
        key: StoreKey,
        delivery: &Delivery,
    ) -> Result<Ticket, Refused> {
        let value = record::delivery_value(
            delivery.qos,
            delivery.retain,
            &delivery.subscription_ids,
            delivery.shared.as_ref().map(|f| f.as_str()),
            message_ref(&delivery.message),
        );
        self.admit(value.len() as u64)?;
        Ok(self.submit(Write::Put {
            key: record::queued_key(client_id, key),
            value,
        }))
    }

    fn changed(&self, client_id: &str, change: Change) -> Ticket {
        let write = match change {
            Change::Sent { key, id, .. } => Write::Put {
                key: record::sent_key(client_id, key),
                value: record::sent_value(SentAs {
                    id,
                    released: false,
                }),
            },
            Change::Released { key, id } => Write::Put {
                key: record::sent_key(client_id, key),
                value: record::sent_value(SentAs { id, released: true }),
            },
            Change::Done { key } => Write::Delete(vec![
                record::queued_key(client_id, key),
                record::sent_key(client_id, key),
            ]),
            Change::Held { flow, id } => Write::Put {
                key: record::inbound_key(client_id, flow.0, id),
                value: record::inbound_value(),
            },
            Change::Freed { flow, id } => {
                Write::Delete(vec![record::inbound_key(client_id, flow.0, id)])
            }
        };
        self.submit(write)
    }

    fn delayed_held(
        &self,
        key: StoreKey,
        message: &AppMessage,
        at: Instant,
    ) -> Result<Ticket, Refused> {
        let value = record::delayed_value(instant_to_ms(at), message_ref(message));
        self.admit(value.len() as u64)?;
        Ok(self.submit(Write::Put {
            key: record::delayed_key(key),
            value,
        }))
    }

    fn delayed_done(&self, key: StoreKey) -> Ticket {
        self.submit(Write::Delete(vec![record::delayed_key(key)]))
    }

    fn retained_set(&self, message: &AppMessage) -> Result<Ticket, Refused> {
        let value = record::retained_value(message_ref(message));
        self.admit(value.len() as u64)?;
        Ok(self.submit(Write::Put {
            key: record::retained_key(&message.topic),
            value,
        }))
    }

    fn retained_cleared(&self, topic: &str) -> Ticket {
        self.submit(Write::Delete(vec![record::retained_key(topic)]))
    }

    fn begin_group(&self) {
        let mut pending = self.shared.pending.lock().expect("never poisoned");
        let token = pending.next_group;
        pending.next_group += 1;
        let start = pending.writes.len();
        pending.open_groups.push((token, start));
        drop(pending);
        GROUP.set(Some(token));
    }

    fn end_group(&self) -> Ticket {
        let Some(token) = GROUP.take() else {
            return 0;
        };
        let mut pending = self.shared.pending.lock().expect("never poisoned");
        pending.open_groups.retain(|(t, _)| *t != token);
        let last = pending.last;
        drop(pending);
        // The writer may be waiting for this group to close.
        self.shared.work.notify_one();
        last
    }

    fn poll_durable(
        &self,
        cx: &mut Context<'_>,
        from: Ticket,
        upto: Ticket,
    ) -> Poll<Result<(), Refused>> {
        let shared = &self.shared;
        if shared.decided.load(Ordering::Acquire) < upto {
            let mut waiters = shared.waiters.lock().expect("never poisoned");
            // Looked at again under the lock the writer takes to wake: no wake-up is lost.
            // (A connection polled again before the commit adds its waker again: every
            // commit empties the list of what it decided, so that stays bounded.)
            if shared.decided.load(Ordering::Acquire) < upto {
                waiters.push((upto, cx.waker().clone()));
                return Poll::Pending;
            }
        }
        if shared.any_failed.load(Ordering::Acquire) {
            let failed = shared.failed.lock().expect("never poisoned");
            // Ranges too old to be kept count as failed for anyone still asking about them.
            let overlaps = failed.ranges.iter().any(|&(a, b)| a <= upto && b >= from);
            if overlaps || (failed.forgotten_upto != 0 && from <= failed.forgotten_upto) {
                return Poll::Ready(Err(Refused::Failed));
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The writer thread: commits what is pending, one batch at a time, until shutdown.
/// Sizes of live records that count against `max_bytes`, by key.
pub(crate) type Sizes = rustc_hash::FxHashMap<Vec<u8>, u64>;

fn write_loop(shared: &Shared, mut engine: Box<dyn Engine>, mut sizes: Sizes) {
    let window = match shared.settings.durability {
        Durability::Group => shared.settings.group_window,
        _ => Duration::ZERO,
    };
    let mut batch = Vec::new();
    loop {
        let (last, shutdown) = {
            let mut pending = shared.pending.lock().expect("never poisoned");
            loop {
                if pending.shutdown {
                    break;
                }
                match pending.since {
                    None => pending = shared.work.wait(pending).expect("never poisoned"),
                    Some(since) => {
                        let due = since + window;
                        let now = Instant::now();
                        if now >= due || pending.writes.len() >= GROUP_MAX_WRITES {
                            break;
                        }
                        pending = shared
                            .work
                            .wait_timeout(pending, due - now)
                            .expect("never poisoned")
                            .0;
                    }
                }
            }
            // Up to the oldest open group: its writes go together, in a later commit (at
            // shutdown every connection is gone: everything goes).
            let cut = match pending.shutdown {
                true => pending.writes.len(),
                false => pending
                    .open_groups
                    .iter()
                    .map(|(_, start)| *start)
                    .min()
                    .unwrap_or(pending.writes.len()),
            };
            if cut == 0 && !pending.writes.is_empty() && !pending.shutdown {
                // Everything waiting belongs to a group still being written: a moment more.
                drop(
                    shared
                        .work
                        .wait_timeout(pending, Duration::from_micros(200))
                        .expect("never poisoned"),
                );
                continue;
            }
            let held = pending.writes.len() - cut;
            batch.extend(pending.writes.drain(..cut));
            for (_, start) in &mut pending.open_groups {
                *start = start.saturating_sub(cut);
            }
            pending.since = (held > 0).then(Instant::now);
            (pending.last - held as u64, pending.shutdown)
        };
        if !batch.is_empty() {
            let first = last + 1 - batch.len() as u64;
            match engine.apply(&batch) {
                Ok(()) => {
                    shared.failing.store(false, Ordering::Relaxed);
                    let freed = account(&mut sizes, &batch);
                    shared.used.fetch_sub(
                        freed.min(shared.used.load(Ordering::Relaxed)),
                        Ordering::Relaxed,
                    );
                }
                Err(err) => {
                    tracing::error!(
                        error = %err,
                        writes = batch.len(),
                        "store commit failed: nothing in it is acknowledged; new persistent \
                         messages are refused (0x97) until a commit succeeds"
                    );
                    shared.failing.store(true, Ordering::Relaxed);
                    let mut failed = shared.failed.lock().expect("never poisoned");
                    if failed.ranges.len() >= FAILED_KEPT {
                        let (_, upto) = failed.ranges.remove(0);
                        failed.forgotten_upto = failed.forgotten_upto.max(upto);
                    }
                    failed.ranges.push((first, last));
                    shared.any_failed.store(true, Ordering::Release);
                    // What these writes admitted is not held after all.
                    let admitted: u64 = batch.iter().map(Write::admitted_bytes).sum();
                    shared.used.fetch_sub(
                        admitted.min(shared.used.load(Ordering::Relaxed)),
                        Ordering::Relaxed,
                    );
                }
            }
            shared.commits.fetch_add(1, Ordering::Relaxed);
            shared
                .bytes_written
                .store(engine.bytes_written(), Ordering::Relaxed);
            batch.clear();
            shared.decided.store(last, Ordering::Release);
            let mut waiters = shared.waiters.lock().expect("never poisoned");
            waiters.retain(|(ticket, waker)| {
                if *ticket <= last {
                    waker.wake_by_ref();
                    false
                } else {
                    true
                }
            });
        }
        if shutdown {
            return;
        }
    }
}

/// Keeps the sizes of live queued deliveries and retained messages current after a commit;
/// returns the bytes that records replaced or deleted freed. (A hash map: this is on every
/// message's path; the rare ended session is found by one pass over it per batch.)
fn account(sizes: &mut Sizes, batch: &[Write]) -> u64 {
    let mut freed = 0;
    let mut ended: Vec<&[u8]> = Vec::new();
    for write in batch {
        match write {
            Write::Put { key, value } if Write::is_admitted(key) => {
                freed += sizes.insert(key.clone(), value.len() as u64).unwrap_or(0);
            }
            Write::Put { .. } => {}
            Write::Delete(keys) => {
                for key in keys {
                    freed += sizes.remove(key).unwrap_or(0);
                }
            }
            Write::EndSession { prefixes, .. } => {
                ended.extend(prefixes.iter().map(Vec::as_slice));
            }
            Write::Publish { .. } => {}
        }
    }
    if !ended.is_empty() {
        sizes.retain(|key, size| {
            let gone = ended.iter().any(|prefix| key.starts_with(prefix));
            if gone {
                freed += *size;
            }
            !gone
        });
    }
    freed
}
