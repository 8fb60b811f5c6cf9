//! Reading a store back at start-up: every record decoded, grouped by session, and turned
//! into what the broker restores (core types, with expiry instants counted from the wall
//! clock, so that time spent down counts).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::codec::PacketId;
use crate::core::channel::PendingWill;
use crate::core::message::{AppMessage, Delivery, Flow};
use crate::core::session::{Outgoing, Session, StoreKey, Subscription};
use crate::core::topic::{TopicFilter, TopicName};

use super::engine::Write;
use super::record::{
    self, Record, RecordError, SentAs, StoredDelivery, StoredMessage, StoredSession,
};

/// A persistent session as the store kept it.
#[derive(Debug)]
pub struct RecoveredSession {
    /// Subscriptions, deliveries in flight under their packet ids, inbound QoS 2 ids.
    pub session: Session,
    /// Deliveries queued and not yet sent, in order.
    pub queued: Vec<Delivery>,
    /// How long it has left offline (`None`: it never expires); zero when it expired while
    /// the broker was down.
    pub expires_in: Option<Duration>,
    /// A will waiting for its delay, with the delay left.
    pub will: Option<(PendingWill, Duration)>,
    /// Inbound QoS 2 ids stored under a data flow, now the control flow's: the store must
    /// follow (`Change::Freed` of the old key, `Change::Held` of the new).
    pub inbound_rehomed: Vec<(Flow, PacketId)>,
}

/// What a store held.
#[derive(Debug, Default)]
pub struct Recovered {
    pub sessions: Vec<RecoveredSession>,
    pub retained: Vec<AppMessage>,
    /// Stored deliveries that expired while the broker was down (client id, key): to forget.
    pub expired: Vec<(Arc<str>, StoreKey)>,
    /// Retained messages that expired meanwhile: to clear.
    pub expired_retained: Vec<String>,
    /// `$delayed/` messages with their keys and the time left until they are due (zero:
    /// due while the broker was down, published at once).
    pub delayed: Vec<(StoreKey, Duration, AppMessage)>,
    /// The next free delivery key.
    pub next_key: u64,
    /// Sizes of live queued deliveries and retained messages (for `max_bytes`).
    pub sizes: super::Sizes,
}

impl Recovered {
    pub fn queued_count(&self) -> usize {
        self.sessions
            .iter()
            .map(|s| s.queued.len() + s.session.inflight())
            .sum()
    }

    pub fn live_bytes(&self) -> u64 {
        self.sizes.values().sum()
    }
}

/// Why a store could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("record {key} is unreadable: {error}")]
    Record { key: String, error: RecordError },
    #[error("store format version {0}; this build reads version {v}", v = record::FORMAT)]
    Version(u8),
}

/// A key as a log line shows it.
pub fn show_key(key: &[u8]) -> String {
    key.iter()
        .map(|&b| {
            if b.is_ascii_graphic() {
                (b as char).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect()
}

#[derive(Default)]
struct Gathered {
    session: Option<StoredSession>,
    will: Option<super::record::StoredWill>,
    queued: BTreeMap<u64, StoredDelivery>,
    sent: HashMap<u64, SentAs>,
    inbound: Vec<(u64, PacketId)>,
}

/// Decodes and checks every record: the first unreadable one stops it (see `check` for
/// listing them all).
pub fn read(records: BTreeMap<Vec<u8>, Vec<u8>>) -> Result<Recovered, ReadError> {
    let mut clients: BTreeMap<String, Gathered> = BTreeMap::new();
    let mut retained = Vec::new();
    let mut delayed: Vec<(u64, u64, StoredMessage)> = Vec::new();
    let mut sizes = super::Sizes::default();
    let mut next_key = 0u64;
    let mut bad = None;
    let mut visit = |key: &[u8], value: &[u8]| {
        let record = match record::decode(key, value) {
            Ok(record) => record,
            Err(error) => {
                bad = Some(ReadError::Record {
                    key: show_key(key),
                    error,
                });
                return false;
            }
        };
        if Write::is_admitted(key) {
            sizes.insert(key.to_vec(), value.len() as u64);
        }
        match record {
            Record::Meta(version) if version != record::FORMAT => {
                bad = Some(ReadError::Version(version));
                return false;
            }
            Record::Meta(_) => {}
            // Read by the cluster when it needs one (`cluster::node`), not restored.
            Record::Mark { .. } => {}
            Record::Session { client_id, session } => {
                clients.entry(client_id).or_default().session = Some(session);
            }
            Record::Queued {
                client_id,
                key,
                delivery,
            } => {
                next_key = next_key.max(key + 1);
                clients
                    .entry(client_id)
                    .or_default()
                    .queued
                    .insert(key, delivery);
            }
            Record::Sent {
                client_id,
                key,
                sent,
            } => {
                next_key = next_key.max(key + 1);
                clients.entry(client_id).or_default().sent.insert(key, sent);
            }
            Record::Inbound {
                client_id,
                flow,
                id,
            } => clients
                .entry(client_id)
                .or_default()
                .inbound
                .push((flow, id)),
            Record::Retained(message) => retained.push(message),
            Record::Delayed {
                key,
                due_ms,
                message,
            } => {
                next_key = next_key.max(key + 1);
                delayed.push((key, due_ms, message));
            }
            Record::Will { client_id, will } => {
                clients.entry(client_id).or_default().will = Some(will);
            }
        }
        true
    };
    for (key, value) in &records {
        if !visit(key, value) {
            break;
        }
    }
    drop(records);
    if let Some(bad) = bad {
        return Err(bad);
    }
    let now = Instant::now();
    let wall = super::wall_ms();
    let mut out = Recovered {
        next_key,
        sizes,
        ..Recovered::default()
    };
    for (key, due_ms, message) in delayed {
        if let Some(message) = app_message(message, now, wall) {
            let left = Duration::from_millis(due_ms.saturating_sub(wall));
            out.delayed.push((key, left, message));
        }
    }
    for message in retained {
        match app_message(message, now, wall) {
            Some(m) if !m.is_expired(now) => out.retained.push(m),
            Some(m) => out.expired_retained.push(m.topic.as_str().to_owned()),
            None => {}
        }
    }
    for (client_id, mut gathered) in clients {
        let client_id: Arc<str> = Arc::from(client_id);
        let Some(stored) = gathered.session.take() else {
            // Deliveries of a session whose record is gone (it ended mid-commit): dropped.
            out.expired
                .extend(gathered.queued.keys().map(|k| (Arc::clone(&client_id), *k)));
            continue;
        };
        out.sessions.push(session(
            &client_id,
            stored,
            gathered,
            now,
            wall,
            &mut out.expired,
        ));
    }
    Ok(out)
}

fn session(
    client_id: &Arc<str>,
    stored: StoredSession,
    gathered: Gathered,
    now: Instant,
    wall: u64,
    expired: &mut Vec<(Arc<str>, StoreKey)>,
) -> RecoveredSession {
    let mut session = Session::new(Arc::clone(client_id), stored.expiry_interval);
    for sub in stored.subscriptions {
        // A filter this build would not accept is skipped (it was valid when stored).
        let Ok(filter) = TopicFilter::parse(&sub.filter, 0) else {
            tracing::warn!(%client_id, filter = %sub.filter, "stored subscription skipped");
            continue;
        };
        session.subscribe(Subscription {
            filter,
            options: sub.options,
            id: sub.id,
            flow: Flow::CONTROL,
        });
    }
    // Offline since it closed; a session that was online when the broker stopped counts
    // from now (the moment of a crash is not known: it may live longer, never shorter).
    let offline_ms = stored
        .offline_since_ms
        .map_or(0, |since| wall.saturating_sub(since));
    let expires_in = (stored.expiry_interval != u32::MAX).then(|| {
        Duration::from_secs(u64::from(stored.expiry_interval))
            .saturating_sub(Duration::from_millis(offline_ms))
    });
    let will = gathered.will.and_then(|will| {
        let message = app_message(will.message, now, wall)?;
        let left = Duration::from_secs(u64::from(will.delay))
            .saturating_sub(Duration::from_millis(offline_ms));
        Some((
            PendingWill {
                message,
                delay: will.delay,
                expiry_interval: will.expiry_interval,
            },
            left,
        ))
    });
    let mut queued = Vec::new();
    for (key, stored) in gathered.queued {
        let sent = gathered.sent.get(&key).copied();
        // Past PUBREC: the client waits for PUBREL under that id, whatever the message.
        if let Some(sent) = sent.filter(|s| s.released) {
            if session.restore_outgoing(sent.id, Outgoing::Release(Flow::CONTROL, Some(key))) {
                continue;
            }
        }
        let Some(message) = app_message(stored.message, now, wall) else {
            expired.push((Arc::clone(client_id), key));
            continue;
        };
        // An expired message that was never sent is dropped; one already sent under an id
        // goes again (the client may hold that id).
        if message.is_expired(now) && sent.is_none() {
            expired.push((Arc::clone(client_id), key));
            continue;
        }
        let delivery = Delivery {
            message: Arc::new(message),
            qos: stored.qos,
            retain: stored.retain,
            subscription_ids: stored.subscription_ids,
            flow: Flow::CONTROL,
            shared: stored
                .shared
                .and_then(|f| TopicFilter::parse(&f, 0).ok())
                .map(Arc::new),
            stored: Some(key),
        };
        let restored = match sent {
            Some(sent) if !sent.released => {
                session.restore_outgoing(sent.id, Outgoing::Publish(delivery.clone()))
            }
            _ => false,
        };
        if !restored {
            queued.push(delivery);
        }
    }
    let mut inbound_rehomed = Vec::new();
    for (flow, id) in gathered.inbound {
        // A data stream's id space is gone with its connection: the control flow's now.
        if flow != 0 && session.awaiting_release.insert((Flow::CONTROL, id)) {
            inbound_rehomed.push((Flow(flow), id));
        } else {
            session.awaiting_release.insert((Flow::CONTROL, id));
        }
    }
    RecoveredSession {
        session,
        queued,
        expires_in,
        will,
        inbound_rehomed,
    }
}

/// A stored message as the router takes it; `None` if its topic is no longer valid.
pub(crate) fn app_message(m: StoredMessage, now: Instant, wall: u64) -> Option<AppMessage> {
    let topic = TopicName::parse(m.topic, 0).ok()?;
    let expires_at = m.expires_at_ms.map(|at| {
        if at > wall {
            // A far-future time from a damaged record must not overflow the clock.
            now.checked_add(Duration::from_millis(at - wall))
                .unwrap_or(now + Duration::from_secs(u64::from(u32::MAX)))
        } else {
            now.checked_sub(Duration::from_millis(1)).unwrap_or(now)
        }
    });
    Some(AppMessage {
        topic,
        payload: m.payload,
        qos: m.qos,
        retain: m.retain,
        properties: m.properties,
        publisher: m.publisher.map(Arc::from),
        expires_at,
    })
}
