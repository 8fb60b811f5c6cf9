//! Delayed publish (EMQX's `$delayed/{seconds}/{topic}`): the topic syntax, and the queue of
//! messages waiting for their time, ordered by due instant in a binary heap (O(log n) a
//! message, one timer for all: the shell sleeps until [`DelayedQueue::poll_timeout`]).
//! Sans-IO: time is passed in.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::message::AppMessage;
use super::session::StoreKey;

/// The topic prefix of a delayed publish.
pub const PREFIX: &str = "$delayed/";
/// EMQX's ceiling on the interval, in seconds.
pub const MAX_INTERVAL: u32 = 4_294_967;

/// Why a `$delayed/` topic cannot be scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelayedError {
    /// The interval is not a whole number of seconds up to [`MAX_INTERVAL`].
    BadInterval,
    /// Nothing, or a `$delayed/` topic again, after the interval.
    BadTopic,
}

/// Splits `$delayed/{seconds}/{topic}` into the delay and the target topic; `None` for a topic
/// without the prefix.
pub fn parse(topic: &str) -> Option<Result<(Duration, &str), DelayedError>> {
    let rest = topic.strip_prefix(PREFIX)?;
    let Some((interval, target)) = rest.split_once('/') else {
        return Some(Err(DelayedError::BadTopic));
    };
    let valid_digits = !interval.is_empty() && interval.bytes().all(|b| b.is_ascii_digit());
    let seconds = interval
        .parse::<u32>()
        .ok()
        .filter(|&s| valid_digits && s <= MAX_INTERVAL);
    let Some(seconds) = seconds else {
        return Some(Err(DelayedError::BadInterval));
    };
    if target.is_empty() || target.starts_with(PREFIX) {
        return Some(Err(DelayedError::BadTopic));
    }
    Some(Ok((Duration::from_secs(u64::from(seconds)), target)))
}

struct Entry {
    at: Instant,
    /// Arrival order, so that messages due at the same instant go out in the order they came.
    seq: u64,
    message: Arc<AppMessage>,
    /// Its key in the durable store, when it was stored.
    stored: Option<StoreKey>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Messages waiting to be published, earliest first.
#[derive(Default)]
pub struct DelayedQueue {
    heap: BinaryHeap<Reverse<Entry>>,
    next_seq: u64,
}

impl DelayedQueue {
    /// Holds `message` until `at` (`stored`: its key in the durable store).
    pub fn push(&mut self, at: Instant, message: Arc<AppMessage>, stored: Option<StoreKey>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.heap.push(Reverse(Entry {
            at,
            seq,
            message,
            stored,
        }));
    }

    /// The next message due at `now`, if any.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Arc<AppMessage>, Option<StoreKey>)> {
        if self.heap.peek()?.0.at > now {
            return None;
        }
        self.heap
            .pop()
            .map(|Reverse(entry)| (entry.message, entry.stored))
    }

    /// When the next message is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(entry)| entry.at)
    }

    /// Messages waiting.
    pub fn count(&self) -> usize {
        self.heap.len()
    }

    /// Visits every waiting message, in no order: its id in this queue, when it is due.
    pub fn for_each(&self, mut visit: impl FnMut(u64, Instant, &Arc<AppMessage>)) {
        for Reverse(entry) in &self.heap {
            visit(entry.seq, entry.at, &entry.message);
        }
    }

    /// Takes the waiting message with id `seq` out (an operator deleted it).
    pub fn remove(&mut self, seq: u64) -> Option<(Arc<AppMessage>, Option<StoreKey>)> {
        let mut removed = None;
        self.heap.retain(|Reverse(entry)| {
            if entry.seq == seq && removed.is_none() {
                removed = Some((Arc::clone(&entry.message), entry.stored));
                return false;
            }
            true
        });
        removed
    }
}

impl std::fmt::Debug for DelayedQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DelayedQueue")
            .field("waiting", &self.heap.len())
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests make up instants from the real clock
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::codec::{Publish, QoS};
    use crate::core::topic::TopicName;

    fn message(topic: &str) -> Arc<AppMessage> {
        let publish = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: String::new(),
            packet_id: None,
            properties: Default::default(),
            payload: Bytes::from_static(b"d"),
        };
        let topic = TopicName::parse(topic.into(), 0).unwrap();
        Arc::new(AppMessage::from_publish(
            topic,
            publish,
            None,
            Instant::now(),
        ))
    }

    #[test]
    fn the_topic_names_the_interval_and_the_target() {
        assert_eq!(parse("x/y"), None);
        assert_eq!(
            parse("$delayed/15/x/y"),
            Some(Ok((Duration::from_secs(15), "x/y")))
        );
        assert_eq!(parse("$delayed/0/t"), Some(Ok((Duration::ZERO, "t"))));
        assert_eq!(
            parse("$delayed/4294967/$SYS/t"),
            Some(Ok((Duration::from_secs(4_294_967), "$SYS/t")))
        );
        for bad in [
            "$delayed/4294968/t",
            "$delayed/1.5/t",
            "$delayed/-1/t",
            "$delayed/+1/t",
            "$delayed//t",
            "$delayed/abc/t",
        ] {
            assert_eq!(parse(bad), Some(Err(DelayedError::BadInterval)), "{bad}");
        }
        for bad in ["$delayed/15", "$delayed/15/", "$delayed/1/$delayed/1/t"] {
            assert_eq!(parse(bad), Some(Err(DelayedError::BadTopic)), "{bad}");
        }
    }

    #[test]
    fn messages_come_out_when_due_in_due_then_arrival_order() {
        let t0 = Instant::now();
        let mut queue = DelayedQueue::default();
        queue.push(t0 + Duration::from_secs(5), message("b"), None);
        queue.push(t0 + Duration::from_secs(1), message("a"), Some(7));
        queue.push(t0 + Duration::from_secs(5), message("c"), None);
        assert_eq!(queue.poll_timeout(), Some(t0 + Duration::from_secs(1)));
        assert!(queue.pop_due(t0).is_none());
        let (first, stored) = queue.pop_due(t0 + Duration::from_secs(1)).unwrap();
        assert_eq!((first.topic.as_str(), stored), ("a", Some(7)));
        assert!(queue.pop_due(t0 + Duration::from_secs(4)).is_none());
        let due: Vec<_> = std::iter::from_fn(|| queue.pop_due(t0 + Duration::from_secs(9)))
            .map(|(m, _)| m.topic.to_string())
            .collect();
        assert_eq!(due, ["b", "c"]);
        assert_eq!(queue.count(), 0);
        assert_eq!(queue.poll_timeout(), None);
    }

    #[test]
    fn a_waiting_message_is_listed_and_removed_by_its_id() {
        let t0 = Instant::now();
        let mut queue = DelayedQueue::default();
        queue.push(t0 + Duration::from_secs(5), message("a"), Some(3));
        queue.push(t0 + Duration::from_secs(1), message("b"), None);
        let mut listed = Vec::new();
        queue.for_each(|id, at, m| listed.push((id, at - t0, m.topic.to_string())));
        listed.sort();
        assert_eq!(
            listed,
            [
                (0, Duration::from_secs(5), "a".to_owned()),
                (1, Duration::from_secs(1), "b".to_owned())
            ]
        );
        let (removed, stored) = queue.remove(0).unwrap();
        assert_eq!((removed.topic.as_str(), stored), ("a", Some(3)));
        assert!(queue.remove(0).is_none());
        assert_eq!(queue.count(), 1);
        assert_eq!(queue.poll_timeout(), Some(t0 + Duration::from_secs(1)));
    }
}
