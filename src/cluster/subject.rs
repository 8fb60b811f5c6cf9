//! MQTT topics and filters as NATS subjects: the route table of the cluster (issue 18).
//!
//! Each node subscribes in NATS only to what its clients' filters need, and publishes each
//! message under the subject of its topic, so a message crosses the network once per
//! interested node. Sans-IO: strings in, strings out.
//!
//! # Topics
//! A topic's subject is `{prefix}.{level}.{level}…`, one NATS token per MQTT level. NATS tokens
//! may not be empty and may not hold `.`, whitespace, or `*` / `>` (its wildcards), while an
//! MQTT level may be empty or hold any of them; so a level is escaped, byte-wise, with `%` and
//! two upper-case hex digits for `%`, `.`, `*`, `>`, space, controls and DEL, and an empty level
//! is `%00` (U+0000 is not allowed in MQTT topics [MQTT-4.7.3-2], so no level encodes to it).
//! The encoding is one-to-one: `topic_of` (tests) reverses [`subject_of`].
//!
//! # Filters
//! `+` becomes `*` (one level is one token, an empty level included: the semantics agree).
//! `#` becomes `>`, which needs at least one token where MQTT's `#` also matches the parent
//! level (`a/#` matches `a` [MQTT-4.7.1-2]): such a filter maps to two subjects, the parent's
//! and the `>` one. A filter starting with a wildcard must not match `$` topics in MQTT
//! [MQTT-4.7.2-1] but would in NATS: the interest is a superset, and the receiving node's
//! own router, which applies MQTT's rules to every message it is handed, drops the rest.
//! `$share/{group}/` and `$exclusive/` prefixes are not part of the subject (which nodes take
//! a shared message is decided elsewhere).

use std::fmt::Write as _;

/// Bytes escaped in a level (besides an empty level).
fn needs_escape(b: u8) -> bool {
    matches!(b, b'%' | b'.' | b'*' | b'>' | b' ' | 0x7f) || b < 0x20
}

/// Appends one MQTT level as a NATS token.
fn push_level(out: &mut String, level: &str) {
    if level.is_empty() {
        out.push_str("%00");
        return;
    }
    let bytes = level.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if needs_escape(b) {
            out.push_str(&level[start..i]);
            let _ = write!(out, "%{b:02X}");
            start = i + 1;
        }
    }
    out.push_str(&level[start..]);
}

/// The subject a message on `topic` is published under.
pub fn subject_of(prefix: &str, topic: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + topic.len() + 8);
    out.push_str(prefix);
    for level in topic.split('/') {
        out.push('.');
        push_level(&mut out, level);
    }
    out
}

/// The topic a subject made by [`subject_of`] with `prefix` carries; `None` for any other
/// subject (another prefix, or an escape [`subject_of`] never writes).
#[cfg(test)]
pub fn topic_of(prefix: &str, subject: &str) -> Option<String> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let mut topic = Vec::with_capacity(rest.len());
    for (n, token) in rest.split('.').enumerate() {
        if n > 0 {
            topic.push(b'/');
        }
        if token == "%00" {
            continue;
        }
        let bytes = token.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = token.get(i + 1..i + 3)?;
                let b = u8::from_str_radix(hex, 16).ok()?;
                if !needs_escape(b) || hex.bytes().any(|c| c.is_ascii_lowercase()) {
                    return None;
                }
                topic.push(b);
                i += 3;
            } else {
                topic.push(bytes[i]);
                i += 1;
            }
        }
        if bytes.is_empty() {
            return None;
        }
    }
    String::from_utf8(topic).ok()
}

/// The NATS subjects that together cover an MQTT filter (without `$share/{group}/` or
/// `$exclusive/`): one, or two when the filter ends in `#` after another level.
pub fn subjects_for_filter(prefix: &str, filter: &str) -> Vec<String> {
    let mut subject = String::with_capacity(prefix.len() + filter.len() + 8);
    subject.push_str(prefix);
    let mut parent = None;
    for level in filter.split('/') {
        match level {
            "#" => {
                // `a/#` also matches `a`; a lone `#` matches every topic (all have a level).
                if subject.len() > prefix.len() {
                    parent = Some(subject.clone());
                }
                subject.push_str(".>");
            }
            "+" => subject.push_str(".*"),
            _ => {
                subject.push('.');
                push_level(&mut subject, level);
            }
        }
    }
    parent.into_iter().chain(Some(subject)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::topic::TopicFilter;
    use proptest::prelude::*;

    const P: &str = "petrel.m";

    /// NATS's own matching: `*` one token, `>` one or more at the end.
    fn nats_matches(pattern: &str, subject: &str) -> bool {
        let mut p = pattern.split('.');
        let mut s = subject.split('.');
        loop {
            match (p.next(), s.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    fn covered(filter: &str, topic: &str) -> bool {
        let subject = subject_of(P, topic);
        subjects_for_filter(P, filter)
            .iter()
            .any(|pattern| nats_matches(pattern, &subject))
    }

    #[test]
    fn levels_become_tokens_and_awkward_ones_are_escaped() {
        assert_eq!(
            subject_of(P, "fleet/v1/telemetry"),
            "petrel.m.fleet.v1.telemetry"
        );
        assert_eq!(subject_of(P, "a//b"), "petrel.m.a.%00.b");
        assert_eq!(subject_of(P, "/"), "petrel.m.%00.%00");
        assert_eq!(
            subject_of(P, "v1.2/*/>/50%"),
            "petrel.m.v1%2E2.%2A.%3E.50%25"
        );
        assert_eq!(subject_of(P, "a b\tc"), "petrel.m.a%20b%09c");
        assert_eq!(subject_of(P, "$SYS/x"), "petrel.m.$SYS.x");
        assert_eq!(subject_of(P, "车/β"), "petrel.m.车.β");
    }

    #[test]
    fn subjects_read_back_into_their_topics_and_strangers_are_refused() {
        for topic in ["a", "a//b", "/", "v1.2/*/>/50%", "$SYS/brokers", "车"] {
            assert_eq!(topic_of(P, &subject_of(P, topic)).as_deref(), Some(topic));
        }
        for stranger in [
            "other.a",
            "petrel.m",
            "petrel.m.a..b",
            "petrel.m.%2",
            "petrel.m.%41",
            "petrel.m.%2e",
        ] {
            assert_eq!(topic_of(P, stranger), None, "{stranger}");
        }
    }

    #[test]
    fn filters_map_to_nats_wildcards() {
        assert_eq!(subjects_for_filter(P, "a/+/c"), ["petrel.m.a.*.c"]);
        assert_eq!(subjects_for_filter(P, "#"), ["petrel.m.>"]);
        assert_eq!(
            subjects_for_filter(P, "a/b/#"),
            ["petrel.m.a.b", "petrel.m.a.b.>"]
        );
        assert_eq!(
            subjects_for_filter(P, "+/#"),
            ["petrel.m.*", "petrel.m.*.>"]
        );
        assert_eq!(subjects_for_filter(P, "a.b/ /"), ["petrel.m.a%2Eb.%20.%00"]);
        assert!(covered("a/#", "a"), "the parent level [MQTT-4.7.1-2]");
        assert!(covered("a/+", "a/"), "an empty level is a level");
        assert!(!covered("a/+", "a/b/c"));
        assert!(!covered("a/b", "a.b"));
    }

    fn level() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["a", "b", "", ".", "*", ">", "%", "a b", "$SYS", "é"])
            .prop_map(str::to_owned)
    }

    fn filter_level() -> impl Strategy<Value = String> {
        prop_oneof![3 => level(), 1 => Just("+".to_owned())]
    }

    proptest! {
        /// Every topic an MQTT filter matches is covered by the filter's subjects, and
        /// nothing else is, but for `$` topics under a leading wildcard (the receiving
        /// router drops those).
        #[test]
        fn nats_interest_is_mqtt_matching(
            topic in prop::collection::vec(level(), 1..5),
            filter in prop::collection::vec(filter_level(), 1..5),
            hash in any::<bool>(),
        ) {
            let topic = topic.join("/");
            let mut filter = filter.join("/");
            if hash {
                filter.push_str("/#");
            }
            // MQTT has no empty topic or filter [MQTT-4.7.3-1].
            prop_assume!(!topic.is_empty() && !filter.is_empty());
            let parsed = TopicFilter::parse(&filter, 0).expect("a valid filter");
            let mqtt = parsed.matches(&topic);
            let nats = covered(&filter, &topic);
            let dollar_under_wildcard =
                topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#'));
            if dollar_under_wildcard {
                prop_assert!(!mqtt);
            } else {
                prop_assert_eq!(mqtt, nats, "{} against {}", filter, topic);
            }
            prop_assert_eq!(topic_of(P, &subject_of(P, &topic)), Some(topic));
        }
    }
}
