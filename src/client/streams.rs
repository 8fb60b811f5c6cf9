//! The QUIC stream policy: which stream a topic (or a named group of topics) travels on.
//!
//! In multi-stream mode (EMQX mapping) every data stream is an independent ordered channel: a
//! lost packet on one stalls only that stream. The policy maps a PUBLISH topic or a SUBSCRIBE
//! filter to a [`Route`]: the control stream, or a data-stream *slot*. Slots are stable for
//! the life of the client, so after a reconnect a subscription is restored on the same slot
//! (a new QUIC stream). At most `max_data_streams` slots exist; beyond that, keys share slots
//! by a stable hash. Sans-IO: no streams are opened here, the driver opens a slot's stream
//! when it first carries a packet.

use std::collections::HashMap;

/// Where a packet travels: on byte-stream transports everything is `Control`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Route {
    /// The first stream (CONNECT, PING, DISCONNECT; and data in single-stream mode).
    Control,
    /// A data stream slot, `0..max_data_streams`.
    Data(u16),
}

/// How topics are spread over QUIC data streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamPolicy {
    /// Everything on the control stream, as over TCP.
    #[default]
    Single,
    /// Each topic (PUBLISH) and each filter (SUBSCRIBE) on its own stream, unless a group
    /// claims it.
    PerTopic,
    /// Only topics of named groups get streams; everything else stays on control.
    PerGroup,
}

/// A named set of topics that shares one stream, with that stream's send priority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamGroup {
    pub name: String,
    /// MQTT topic filters; a topic (or subscription filter) they match belongs to the group.
    pub filters: Vec<String>,
    /// `SendStream::set_priority`: higher is sent first.
    pub priority: i32,
}

/// The QUIC stream options of a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicStreams {
    pub policy: StreamPolicy,
    /// Data streams at most (the server grants 10 bidirectional streams by default, one of
    /// which is the control stream). Default 8.
    pub max_data_streams: u16,
    pub groups: Vec<StreamGroup>,
}

impl Default for QuicStreams {
    fn default() -> Self {
        Self {
            policy: StreamPolicy::Single,
            max_data_streams: 8,
            groups: Vec::new(),
        }
    }
}

impl QuicStreams {
    pub fn single() -> Self {
        Self::default()
    }

    pub fn per_topic() -> Self {
        Self {
            policy: StreamPolicy::PerTopic,
            ..Self::default()
        }
    }

    pub fn per_group() -> Self {
        Self {
            policy: StreamPolicy::PerGroup,
            ..Self::default()
        }
    }

    pub fn max_data_streams(mut self, max: u16) -> Self {
        self.max_data_streams = max;
        self
    }

    /// Names a group: topics matching `filters` share one stream sent with `priority`.
    pub fn group(mut self, name: &str, filters: &[&str], priority: i32) -> Self {
        self.groups.push(StreamGroup {
            name: name.to_owned(),
            filters: filters.iter().map(|f| (*f).to_owned()).collect(),
            priority,
        });
        self
    }
}

/// The slot assignment of one client (kept across reconnects).
#[derive(Debug, Clone)]
pub struct StreamMap {
    options: QuicStreams,
    slots: HashMap<String, u16>,
    priorities: Vec<i32>,
}

impl StreamMap {
    pub fn new(options: QuicStreams) -> Self {
        Self {
            options,
            slots: HashMap::new(),
            priorities: Vec::new(),
        }
    }

    /// Whether any data stream may be used.
    pub fn is_multi_stream(&self) -> bool {
        self.options.policy != StreamPolicy::Single && self.options.max_data_streams > 0
    }

    /// The route of a PUBLISH topic or a SUBSCRIBE filter; `group` names a group explicitly
    /// (it need not be configured: an unconfigured name gets priority 0).
    pub fn route(&mut self, topic_or_filter: &str, group: Option<&str>) -> Route {
        if !self.is_multi_stream() {
            return Route::Control;
        }
        let group = group
            .map(|name| {
                let configured = self.options.groups.iter().find(|g| g.name == name);
                (name.to_owned(), configured.map_or(0, |g| g.priority))
            })
            .or_else(|| {
                self.options
                    .groups
                    .iter()
                    .find(|g| g.filters.iter().any(|f| covers(f, topic_or_filter)))
                    .map(|g| (g.name.clone(), g.priority))
            });
        let (key, priority) = match (group, self.options.policy) {
            (Some((name, priority)), _) => (format!("g:{name}"), priority),
            (None, StreamPolicy::PerTopic) => (format!("t:{topic_or_filter}"), 0),
            (None, _) => return Route::Control,
        };
        if let Some(&slot) = self.slots.get(&key) {
            return Route::Data(slot);
        }
        let used = self.priorities.len();
        if used < usize::from(self.options.max_data_streams) {
            let slot = u16::try_from(used).expect("bounded by max_data_streams");
            self.slots.insert(key, slot);
            self.priorities.push(priority);
            return Route::Data(slot);
        }
        // Past the bound topics share streams; the hash is stable so a topic keeps its slot.
        Route::Data(
            u16::try_from(fnv1a(&key) % u64::from(self.options.max_data_streams))
                .expect("below a u16"),
        )
    }

    /// The send priority of a slot's stream (that of the first key assigned to it).
    pub fn priority(&self, slot: u16) -> i32 {
        self.priorities.get(usize::from(slot)).copied().unwrap_or(0)
    }
}

/// Whether the topic filter `filter` matches `subject`, a topic name or another filter
/// (whose wildcards are then taken as literal levels, so `cmd/#` covers `cmd/car-1/#`).
pub fn covers(filter: &str, subject: &str) -> bool {
    let mut subject = subject.split('/');
    for level in filter.split('/') {
        match (level, subject.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (l, Some(s)) if l == s => {}
            _ => return false,
        }
    }
    subject.next().is_none()
}

fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_stream_keeps_everything_on_control() {
        let mut map = StreamMap::new(QuicStreams::single().group("cmd", &["cmd/#"], 5));
        assert_eq!(map.route("a/b", None), Route::Control);
        assert_eq!(map.route("cmd/x", Some("cmd")), Route::Control);
    }

    #[test]
    fn per_topic_gives_each_topic_a_stream_up_to_the_bound_then_shares() {
        let mut map = StreamMap::new(QuicStreams::per_topic().max_data_streams(2));
        let a = map.route("t/a", None);
        let b = map.route("t/b", None);
        assert_ne!(a, b);
        assert_eq!(map.route("t/a", None), a, "stable");
        let c = map.route("t/c", None);
        assert!(c == a || c == b, "beyond the bound topics share a slot");
        assert_eq!(map.route("t/c", None), c, "stable past the bound too");
    }

    #[test]
    fn groups_claim_topics_and_filters_and_carry_priority() {
        let mut map = StreamMap::new(
            QuicStreams::per_group()
                .group("telemetry", &["telemetry/#"], 0)
                .group("commands", &["cmd/+/#"], 10),
        );
        let t = map.route("telemetry/car-1/speed", None);
        let c = map.route("cmd/car-1/#", None);
        assert_ne!(t, c);
        assert_eq!(map.route("cmd/car-2/stop", None), c);
        assert_eq!(map.route("other", None), Route::Control);
        let Route::Data(slot) = c else { panic!() };
        assert_eq!(map.priority(slot), 10);
        assert_eq!(
            map.route("anything", Some("telemetry")),
            t,
            "explicit group"
        );
    }

    #[test]
    fn filter_coverage() {
        assert!(covers("a/#", "a/b/c"));
        assert!(covers("a/#", "a"));
        assert!(covers("a/+/c", "a/b/c"));
        assert!(!covers("a/+/c", "a/b/d"));
        assert!(!covers("a/b", "a/b/c"));
        assert!(covers("cmd/#", "cmd/car-1/#"));
    }
}
