//! Topic names and topic filters (MQTT 5.0 §4.7, shared subscriptions §4.8.2).
//!
//! This module validates PUBLISH topic names, parses SUBSCRIBE topic filters into [`TopicFilter`]
//! (recognising `$share/{group}/{filter}` and EMQX's legacy `$queue/{filter}`), and matches a filter
//! against a topic name, including the rule that wildcard-led filters never match `$` topics.
//!
//! It must not do I/O, read the clock, or know about sessions or routing: it is pure string logic.
//! Every scan is iterative, so a hostile topic with a huge number of levels costs time linear in
//! its length and never stack depth.

/// Why a topic name or filter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The string is empty [MQTT-4.7.3-1].
    #[error("empty topic")]
    Empty,
    /// A PUBLISH topic name contains `+` or `#` [MQTT-3.3.2-2]; the broker answers 0x90.
    #[error("wildcard in a topic name")]
    WildcardInName,
    /// The filter breaks a wildcard rule; the broker answers 0x8F.
    #[error("invalid topic filter: {0}")]
    InvalidFilter(&'static str),
    /// A `$share/` (or `$queue/`) filter is malformed; the broker answers 0x8F.
    #[error("invalid shared subscription: {0}")]
    InvalidShare(&'static str),
    /// More levels than the configured maximum.
    #[error("topic has more than {0} levels")]
    TooDeep(usize),
    /// Longer than an MQTT UTF-8 string can be.
    #[error("topic longer than 65535 bytes")]
    TooLong,
}

/// The longest string the wire format can carry (§1.5.4).
const MAX_TOPIC_BYTES: usize = 65_535;

const SHARE_PREFIX: &str = "$share/";
const QUEUE_PREFIX: &str = "$queue/";
/// EMQX's exclusive subscription: one client at a time holds `$exclusive/{filter}`.
const EXCLUSIVE_PREFIX: &str = "$exclusive/";
/// The group name reported for EMQX's `$queue/{filter}` form.
const QUEUE_GROUP: &str = "$queue";

/// A valid topic name: what a PUBLISH (or a will) was validated into, and the only form in
/// which a topic travels from a channel to the router, the retained store and other sessions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicName(String);

impl TopicName {
    /// Parses a PUBLISH or will topic (see [`validate_topic_name`]).
    pub fn parse(name: String, max_levels: usize) -> Result<Self, TopicError> {
        validate_topic_name(&name, max_levels)?;
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether it is under `$SYS`, the broker's own tree.
    pub fn is_sys(&self) -> bool {
        self.0 == "$SYS" || self.0.starts_with("$SYS/")
    }
}

impl std::ops::Deref for TopicName {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TopicName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for TopicName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for TopicName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl From<TopicName> for String {
    fn from(topic: TopicName) -> Self {
        topic.0
    }
}

/// Validates a PUBLISH topic name: non-empty, no `+` or `#`, at most `max_levels` levels
/// (0 = no limit), at most 65535 bytes.
pub fn validate_topic_name(name: &str, max_levels: usize) -> Result<(), TopicError> {
    if name.is_empty() {
        return Err(TopicError::Empty);
    }
    if name.len() > MAX_TOPIC_BYTES {
        return Err(TopicError::TooLong);
    }
    if name.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(TopicError::WildcardInName);
    }
    check_depth(name, max_levels)
}

/// Counts levels while scanning and stops as soon as the limit is passed.
fn check_depth(s: &str, max_levels: usize) -> Result<(), TopicError> {
    if max_levels == 0 {
        return Ok(());
    }
    let mut levels = 1usize;
    for b in s.bytes() {
        if b == b'/' {
            levels += 1;
            if levels > max_levels {
                return Err(TopicError::TooDeep(max_levels));
            }
        }
    }
    Ok(())
}

/// A parsed, valid topic filter, possibly shared.
///
/// The original string is kept whole (it is what the client subscribed to and will unsubscribe
/// from); the share group and the matching part are ranges into it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicFilter {
    full: Box<str>,
    /// Byte range of the share group name inside `full`, if shared.
    group: Option<(usize, usize)>,
    /// Byte offset in `full` where the matching filter starts.
    filter_start: usize,
    /// `$exclusive/{filter}` (EMQX): matches as `{filter}`, held by one client at a time.
    exclusive: bool,
}

impl TopicFilter {
    /// Parses and validates a SUBSCRIBE/UNSUBSCRIBE topic filter. `max_levels` bounds the levels
    /// of the matching part (0 = no limit).
    pub fn parse(s: &str, max_levels: usize) -> Result<Self, TopicError> {
        if s.is_empty() {
            return Err(TopicError::Empty);
        }
        if s.len() > MAX_TOPIC_BYTES {
            return Err(TopicError::TooLong);
        }
        let (group, filter_start) = if let Some(rest) = s.strip_prefix(SHARE_PREFIX) {
            let Some(slash) = rest.find('/') else {
                return Err(TopicError::InvalidShare(
                    "$share/{group} must be followed by /{filter} [MQTT-4.8.2-2]",
                ));
            };
            let name = &rest[..slash];
            if name.is_empty() {
                return Err(TopicError::InvalidShare("empty share name [MQTT-4.8.2-1]"));
            }
            if name.contains(['+', '#']) {
                return Err(TopicError::InvalidShare(
                    "share name contains a wildcard [MQTT-4.8.2-2]",
                ));
            }
            let start = SHARE_PREFIX.len();
            (Some((start, start + slash)), start + slash + 1)
        } else if s.starts_with(QUEUE_PREFIX) {
            (Some((0, QUEUE_GROUP.len())), QUEUE_PREFIX.len())
        } else if s.starts_with(EXCLUSIVE_PREFIX) {
            (None, EXCLUSIVE_PREFIX.len())
        } else {
            (None, 0)
        };
        let filter = &s[filter_start..];
        if filter.is_empty() {
            return Err(if group.is_some() {
                TopicError::InvalidShare("no topic filter after the share name [MQTT-4.8.2-2]")
            } else {
                TopicError::Empty
            });
        }
        validate_filter_levels(filter, max_levels)?;
        Ok(TopicFilter {
            full: s.into(),
            group,
            filter_start,
            exclusive: group.is_none() && filter_start > 0,
        })
    }

    /// The filter exactly as subscribed, including any `$share/{group}/` prefix.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The part that matches topic names (share prefix removed).
    pub fn filter(&self) -> &str {
        &self.full[self.filter_start..]
    }

    /// Whether this is an exclusive subscription (`$exclusive/{filter}`).
    pub fn is_exclusive(&self) -> bool {
        self.exclusive
    }

    /// The share group name, if this is a shared subscription.
    pub fn share_group(&self) -> Option<&str> {
        self.group.map(|(start, end)| &self.full[start..end])
    }

    /// Whether [`filter`](Self::filter) contains `+` or `#`.
    pub fn has_wildcards(&self) -> bool {
        // Validation guarantees any '+' or '#' is a whole wildcard level.
        self.filter().contains(['+', '#'])
    }

    /// Whether this filter matches the topic name, `$` rule included.
    pub fn matches(&self, topic: &str) -> bool {
        filter_matches(self.filter(), topic)
    }
}

impl std::fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.full)
    }
}

/// Checks the wildcard rules on a (non-shared) filter, one level at a time.
fn validate_filter_levels(filter: &str, max_levels: usize) -> Result<(), TopicError> {
    let mut levels = filter.split('/').peekable();
    let mut count = 0usize;
    while let Some(level) = levels.next() {
        count += 1;
        if max_levels != 0 && count > max_levels {
            return Err(TopicError::TooDeep(max_levels));
        }
        if level.contains('#') {
            if level != "#" {
                return Err(TopicError::InvalidFilter(
                    "'#' must occupy a whole level [MQTT-4.7.1-1]",
                ));
            }
            if levels.peek().is_some() {
                return Err(TopicError::InvalidFilter(
                    "'#' must be the last level [MQTT-4.7.1-1]",
                ));
            }
        } else if level.contains('+') && level != "+" {
            return Err(TopicError::InvalidFilter(
                "'+' must occupy a whole level [MQTT-4.7.1-2]",
            ));
        }
    }
    Ok(())
}

/// Filter-vs-name matching on raw strings (same semantics as [`TopicFilter::matches`]).
///
/// `filter` is assumed valid (no share prefix); `a/#` matches `a`, and a filter starting with a
/// wildcard never matches a name starting with `$` [MQTT-4.7.2-1].
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) => {
                if fl != tl {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests make up instants from the real clock
mod tests {
    use super::*;

    #[test]
    fn topic_name_is_a_validated_topic() {
        let name = TopicName::parse("a/b".into(), 0).unwrap();
        assert_eq!(name, "a/b");
        assert!(!name.is_sys());
        assert!(TopicName::parse("$SYS/broker/uptime".into(), 0)
            .unwrap()
            .is_sys());
        assert!(TopicName::parse("$SYS".into(), 0).unwrap().is_sys());
        assert!(!TopicName::parse("$SYSTEM".into(), 0).unwrap().is_sys());
        assert_eq!(
            TopicName::parse("a/+".into(), 0),
            Err(TopicError::WildcardInName)
        );
        assert_eq!(TopicName::parse(String::new(), 0), Err(TopicError::Empty));
        assert_eq!(
            TopicName::parse("a/b/c".into(), 2),
            Err(TopicError::TooDeep(2))
        );
    }

    #[test]
    fn valid_filters() {
        for f in [
            "#",
            "+",
            "a",
            "a/b",
            "a/#",
            "a/+",
            "+/+",
            "/+",
            "+/a/#",
            "a//b",
            "/a",
            "a/",
            "/",
            "$SYS/#",
            "sport/tennis/player1/#",
            "$share",
            "$sharex/a",
        ] {
            let parsed = TopicFilter::parse(f, 0);
            assert!(parsed.is_ok(), "{f} should be valid: {parsed:?}");
            let parsed = parsed.unwrap();
            assert_eq!(parsed.as_str(), f);
            assert_eq!(parsed.filter(), f);
            assert_eq!(parsed.share_group(), None);
        }
    }

    #[test]
    fn invalid_filters() {
        for f in ["a/#/b", "a#", "#/", "a+", "+a", "+#", "a/b#", "#a", "a/++"] {
            let parsed = TopicFilter::parse(f, 0);
            assert!(
                matches!(parsed, Err(TopicError::InvalidFilter(_))),
                "{f} should be invalid: {parsed:?}"
            );
        }
        assert_eq!(TopicFilter::parse("", 0), Err(TopicError::Empty));
    }

    #[test]
    fn invalid_shares() {
        for f in [
            "$share/g",
            "$share//t",
            "$share/g+/t",
            "$share/g#/t",
            "$share/",
            "$share/g/",
            "$queue/",
        ] {
            let parsed = TopicFilter::parse(f, 0);
            assert!(
                matches!(parsed, Err(TopicError::InvalidShare(_))),
                "{f} should be an invalid share: {parsed:?}"
            );
        }
        // The filter part of a share is checked like any filter.
        assert!(matches!(
            TopicFilter::parse("$share/g/a#", 0),
            Err(TopicError::InvalidFilter(_))
        ));
    }

    #[test]
    fn share_parsing() {
        let f = TopicFilter::parse("$share/grp/a/+/#", 0).unwrap();
        assert_eq!(f.as_str(), "$share/grp/a/+/#");
        assert_eq!(f.filter(), "a/+/#");
        assert_eq!(f.share_group(), Some("grp"));
        assert!(f.has_wildcards());
        assert!(f.matches("a/b/c"));

        let q = TopicFilter::parse("$queue/x/y", 0).unwrap();
        assert_eq!(q.share_group(), Some("$queue"));
        assert_eq!(q.filter(), "x/y");
        assert!(!q.has_wildcards());
        assert!(q.matches("x/y"));

        // The share filter itself may be a `$` filter or a bare wildcard.
        let s = TopicFilter::parse("$share/g/#", 0).unwrap();
        assert_eq!(s.filter(), "#");
        assert!(!s.matches("$SYS/x"));
        assert_ne!(s, TopicFilter::parse("#", 0).unwrap());
    }

    #[test]
    fn topic_names() {
        assert_eq!(validate_topic_name("a/b", 0), Ok(()));
        assert_eq!(validate_topic_name("/", 0), Ok(()));
        assert_eq!(validate_topic_name("$SYS/x", 0), Ok(()));
        assert_eq!(validate_topic_name("", 0), Err(TopicError::Empty));
        assert_eq!(
            validate_topic_name("a/+", 0),
            Err(TopicError::WildcardInName)
        );
        assert_eq!(
            validate_topic_name("a#", 0),
            Err(TopicError::WildcardInName)
        );
        assert_eq!(validate_topic_name("a/b/c", 3), Ok(()));
        assert_eq!(
            validate_topic_name("a/b/c/d", 3),
            Err(TopicError::TooDeep(3))
        );
        let long = "a".repeat(MAX_TOPIC_BYTES + 1);
        assert_eq!(validate_topic_name(&long, 0), Err(TopicError::TooLong));
        assert_eq!(validate_topic_name(&long[1..], 0), Ok(()));
    }

    #[test]
    fn deep_filters() {
        assert!(TopicFilter::parse("a/b/c", 3).is_ok());
        assert_eq!(
            TopicFilter::parse("a/b/c/d", 3),
            Err(TopicError::TooDeep(3))
        );
        // The level limit applies to the matching part, not the share prefix.
        assert!(TopicFilter::parse("$share/g/a/b/c", 3).is_ok());
        // The most levels a wire string can carry: accepted without a limit, iteratively.
        let deep = "/".repeat(MAX_TOPIC_BYTES);
        let f = TopicFilter::parse(&deep, 0).unwrap();
        assert!(f.matches(&deep));
        assert!(!f.matches(&deep[1..]));
        assert_eq!(TopicFilter::parse(&deep, 16), Err(TopicError::TooDeep(16)));
        // A million levels: refused by length before any scan.
        let huge = "a/".repeat(1_000_000) + "a";
        assert_eq!(TopicFilter::parse(&huge, 16), Err(TopicError::TooLong));
        assert_eq!(TopicFilter::parse(&huge, 0), Err(TopicError::TooLong));
        assert!(filter_matches(&huge, &huge));
    }

    #[test]
    fn spec_matching_examples() {
        let cases: &[(&str, &str, bool)] = &[
            ("sport/tennis/player1/#", "sport/tennis/player1", true),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/ranking",
                true,
            ),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/score/wimbledon",
                true,
            ),
            ("sport/tennis/player1/#", "sport/tennis/player2", false),
            ("sport/#", "sport", true),
            ("#", "sport/tennis", true),
            ("sport/tennis/+", "sport/tennis/player1", true),
            ("sport/tennis/+", "sport/tennis/player1/ranking", false),
            ("sport/+", "sport/tennis/player1", false),
            ("sport/+", "sport/", true),
            ("sport/+", "sport", false),
            ("+/+", "/finance", true),
            ("/+", "/finance", true),
            ("+", "/finance", false),
            ("+/tennis/#", "sport/tennis/x", true),
            ("a//b", "a//b", true),
            ("a/+/b", "a//b", true),
            ("a/b", "a/b/", false),
            ("a/b", "a", false),
            // The `$` rule [MQTT-4.7.2-1].
            ("#", "$SYS/uptime", false),
            ("+/monitor/Clients", "$SYS/monitor/Clients", false),
            ("$SYS/#", "$SYS/monitor/Clients", true),
            ("$SYS/#", "$SYS", true),
            ("$SYS/monitor/+", "$SYS/monitor/Clients", true),
            ("+", "$x", false),
            ("a/#", "a/$x", true),
            ("a/+", "a/$x", true),
        ];
        for &(filter, topic, want) in cases {
            assert_eq!(filter_matches(filter, topic), want, "{filter} vs {topic}");
            let parsed = TopicFilter::parse(filter, 0).unwrap();
            assert_eq!(parsed.matches(topic), want, "parsed {filter} vs {topic}");
            let shared = TopicFilter::parse(&format!("$share/g/{filter}"), 0).unwrap();
            assert_eq!(shared.matches(topic), want, "shared {filter} vs {topic}");
        }
    }

    #[test]
    fn error_texts_cite_the_spec() {
        let err = TopicFilter::parse("a/#/b", 0).unwrap_err();
        assert!(err.to_string().contains("[MQTT-4.7.1-1]"), "{err}");
        let err = TopicFilter::parse("a+", 0).unwrap_err();
        assert!(err.to_string().contains("[MQTT-4.7.1-2]"), "{err}");
    }
}
