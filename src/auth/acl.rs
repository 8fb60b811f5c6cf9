//! Mosquitto's `acl_file` format, loaded unchanged:
//!
//! ```text
//! # before any `user` line: rules for clients without a username
//! topic read public/#
//! user alice
//! topic readwrite alice/#
//! topic deny alice/secret
//! pattern write devices/%c/state     # every client; %c = client id, %u = username
//! ```
//!
//! `topic [read|write|readwrite|deny] TOPIC` (access `readwrite` when omitted; the topic is the
//! rest of the line, spaces included), `user NAME`, `pattern [access] TOPIC`. As in Mosquitto,
//! every `deny` rule that matches is checked first; then the first matching rule that grants
//! the access allows it; anything else is denied. `read` grants subscribing and receiving,
//! `write` publishing. A subscription is allowed when a rule's topic covers the whole filter
//! (`sensors/#` covers `sensors/+/temp`; `sensors/a` does not cover `sensors/+`). A pattern
//! whose `%c`/`%u` would bring in `/`, `+` or `#`, or a `%u` for a client without a username,
//! matches nothing.

use std::collections::HashMap;
use std::path::Path;

use crate::core::access::Access;
use crate::core::topic::filter_matches;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Grant {
    fn allows(self, access: Access) -> bool {
        matches!(
            (self, access),
            (Self::ReadWrite, _)
                | (Self::Read, Access::Subscribe | Access::Receive)
                | (Self::Write, Access::Publish)
        )
    }
}

#[derive(Debug, Clone)]
struct Rule {
    grant: Grant,
    topic: String,
}

/// A loaded ACL file.
#[derive(Debug, Clone, Default)]
pub struct AclFile {
    /// `topic` lines before the first `user` line.
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

impl AclFile {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
        Self::parse(&text).map_err(|err| format!("{}: {err}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut acl = Self::default();
        let mut user: Option<String> = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_start().trim_end_matches(['\r', '\n']);
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let error = |message: &str| format!("line {}: {message}", n + 1);
            let (keyword, rest) = line.split_once([' ', '\t']).unwrap_or((line, ""));
            let rest = rest.trim_start();
            match keyword {
                "user" => {
                    let name = rest.trim_end();
                    if name.is_empty() {
                        return Err(error("`user` needs a name"));
                    }
                    user = Some(name.to_owned());
                    acl.users.entry(name.to_owned()).or_default();
                }
                "topic" | "pattern" => {
                    let (grant, topic) = match rest.split_once([' ', '\t']) {
                        Some((word, topic)) => match parse_grant(word) {
                            Some(grant) => (grant, topic.trim_start()),
                            None => (Grant::ReadWrite, rest),
                        },
                        None => match parse_grant(rest) {
                            Some(_) => return Err(error("a rule needs a topic")),
                            None => (Grant::ReadWrite, rest),
                        },
                    };
                    let topic = topic.trim_end();
                    if topic.is_empty() {
                        return Err(error("a rule needs a topic"));
                    }
                    validate_rule_topic(topic).map_err(|m| error(&m))?;
                    let rule = Rule {
                        grant,
                        topic: topic.to_owned(),
                    };
                    match (keyword, &user) {
                        ("pattern", _) => acl.patterns.push(rule),
                        (_, Some(name)) => acl.users.entry(name.clone()).or_default().push(rule),
                        (_, None) => acl.anonymous.push(rule),
                    }
                }
                other => {
                    return Err(error(&format!(
                        "unknown keyword `{other}` (expected `user`, `topic` or `pattern`)"
                    )))
                }
            }
        }
        Ok(acl)
    }

    /// The number of rules, for the start-up log.
    pub fn rule_count(&self) -> usize {
        self.anonymous.len()
            + self.patterns.len()
            + self.users.values().map(Vec::len).sum::<usize>()
    }

    /// Whether the client may do `access` on `topic` (a topic name, or for
    /// [`Access::Subscribe`] a filter without its `$share/group/` prefix).
    pub fn allows(
        &self,
        client_id: &str,
        username: Option<&str>,
        access: Access,
        topic: &str,
    ) -> bool {
        let own: &[Rule] = match username {
            Some(name) => self.users.get(name).map_or(&[], Vec::as_slice),
            None => &self.anonymous,
        };
        let any = |pred: &dyn Fn(Grant, &str) -> bool| {
            let mut scratch = String::new();
            own.iter().any(|r| pred(r.grant, &r.topic))
                || self.patterns.iter().any(|r| {
                    substitute(&r.topic, client_id, username, &mut scratch)
                        && pred(r.grant, &scratch)
                })
        };
        if any(&|grant, acl| grant == Grant::Deny && filter_matches(acl, topic)) {
            return false;
        }
        any(&|grant, acl| grant.allows(access) && filter_matches(acl, topic))
    }
}

fn parse_grant(word: &str) -> Option<Grant> {
    match word {
        "read" => Some(Grant::Read),
        "write" => Some(Grant::Write),
        "readwrite" => Some(Grant::ReadWrite),
        "deny" => Some(Grant::Deny),
        _ => None,
    }
}

fn validate_rule_topic(topic: &str) -> Result<(), String> {
    let mut levels = topic.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(format!("`{topic}`: '#' must be a whole, last level"));
        }
        if level.contains('+') && level != "+" {
            return Err(format!("`{topic}`: '+' must be a whole level"));
        }
    }
    Ok(())
}

/// Writes `pattern` with `%c` and `%u` replaced into `out`; false when the pattern cannot
/// apply to this client.
fn substitute(pattern: &str, client_id: &str, username: Option<&str>, out: &mut String) -> bool {
    let unsafe_value = |v: &str| v.contains(['/', '+', '#']);
    out.clear();
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '%' {
            match chars.peek() {
                Some('c') => {
                    chars.next();
                    if unsafe_value(client_id) {
                        return false;
                    }
                    out.push_str(client_id);
                    continue;
                }
                Some('u') => {
                    chars.next();
                    match username {
                        Some(u) if !unsafe_value(u) => out.push_str(u),
                        _ => return false,
                    }
                    continue;
                }
                _ => {}
            }
        }
        out.push(c);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# anonymous clients
topic read public/#

user alice
topic readwrite alice/#
topic deny alice/secret
topic write shared/in
topic read $SYS/#

user bob
topic bob/with space
pattern write devices/%c/state
pattern read users/%u/#
";

    fn acl() -> AclFile {
        AclFile::parse(FILE).unwrap()
    }

    #[test]
    fn anonymous_rules_come_before_the_first_user() {
        let acl = acl();
        assert!(acl.allows("c", None, Access::Subscribe, "public/#"));
        assert!(acl.allows("c", None, Access::Receive, "public/x"));
        assert!(!acl.allows("c", None, Access::Publish, "public/x"));
        assert!(!acl.allows("c", Some("alice"), Access::Subscribe, "public/#"));
    }

    #[test]
    fn deny_wins_over_an_earlier_grant() {
        let acl = acl();
        assert!(acl.allows("c", Some("alice"), Access::Publish, "alice/x"));
        assert!(!acl.allows("c", Some("alice"), Access::Publish, "alice/secret"));
        assert!(!acl.allows("c", Some("alice"), Access::Receive, "alice/secret"));
    }

    #[test]
    fn read_and_write_grant_their_own_access() {
        let acl = acl();
        assert!(acl.allows("c", Some("alice"), Access::Publish, "shared/in"));
        assert!(!acl.allows("c", Some("alice"), Access::Subscribe, "shared/in"));
        assert!(acl.allows("c", Some("alice"), Access::Subscribe, "$SYS/broker/uptime"));
        // `#` alone does not reach `$SYS`.
        let all = AclFile::parse("user u\ntopic #\n").unwrap();
        assert!(!all.allows("c", Some("u"), Access::Subscribe, "$SYS/#"));
        assert!(all.allows("c", Some("u"), Access::Subscribe, "a/#"));
    }

    #[test]
    fn subscriptions_must_be_covered_by_a_rule() {
        let acl = acl();
        assert!(acl.allows("c", Some("alice"), Access::Subscribe, "alice/+/x"));
        assert!(acl.allows("c", Some("alice"), Access::Subscribe, "alice/#"));
        assert!(!acl.allows("c", Some("alice"), Access::Subscribe, "+/x"));
        assert!(!acl.allows("c", Some("alice"), Access::Subscribe, "#"));
    }

    #[test]
    fn patterns_substitute_client_id_and_username() {
        let acl = acl();
        assert!(acl.allows("car1", Some("bob"), Access::Publish, "devices/car1/state"));
        assert!(!acl.allows("car1", Some("bob"), Access::Publish, "devices/car2/state"));
        assert!(acl.allows("car1", None, Access::Publish, "devices/car1/state"));
        assert!(acl.allows("x", Some("bob"), Access::Receive, "users/bob/inbox"));
        assert!(!acl.allows("x", None, Access::Receive, "users//inbox"));
        // A client id with a wildcard or separator cannot widen a pattern.
        assert!(!acl.allows("+", Some("bob"), Access::Publish, "devices/+/state"));
        assert!(!acl.allows("a/b", Some("bob"), Access::Publish, "devices/a/b/state"));
    }

    #[test]
    fn topics_may_contain_spaces_and_default_to_readwrite() {
        let acl = acl();
        assert!(acl.allows("c", Some("bob"), Access::Publish, "bob/with space"));
        assert!(acl.allows("c", Some("bob"), Access::Receive, "bob/with space"));
    }

    #[test]
    fn bad_lines_name_the_line() {
        for (text, needle) in [
            ("topic\n", "needs a topic"),
            ("topic read\n", "needs a topic"),
            ("user\n", "needs a name"),
            ("topic a/#/b\n", "'#'"),
            ("topic a/b+\n", "'+'"),
            ("allow a\n", "unknown keyword"),
        ] {
            let err = AclFile::parse(&format!("# c\n{text}")).unwrap_err();
            assert!(err.starts_with("line 2:"), "{text}: {err}");
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    /// Lines made of the format's own words, so the parser's every branch is reached.
    fn acl_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let word = prop::sample::select(vec![
            "user",
            "topic",
            "pattern",
            "read",
            "write",
            "readwrite",
            "deny",
            "#",
            "+",
            "a/+",
            "a/#",
            "%c",
            "%u",
            "a/%c/#",
            "$SYS/#",
            "",
            " ",
            "\t",
            "# note",
        ]);
        let line = proptest::collection::vec(word, 0..5).prop_map(|w| w.join(" "));
        proptest::collection::vec(line, 0..20).prop_map(|l| l.join("\n"))
    }

    fn check_any(text: &str) -> Result<(), proptest::test_runner::TestCaseError> {
        match AclFile::parse(text) {
            Ok(acl) => {
                for access in [Access::Publish, Access::Subscribe, Access::Receive] {
                    for topic in ["a/b", "a/c/d", "$SYS/x", "c/u"] {
                        let _ = acl.allows("c", Some("u"), access, topic);
                        let _ = acl.allows("c", None, access, topic);
                    }
                }
            }
            Err(e) => proptest::prop_assert!(e.starts_with("line "), "{}", e),
        }
        Ok(())
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "[a-z%/+# \n]{0,200}") {
            check_any(&text)?;
        }

        #[test]
        fn arbitrary_rules_parse_or_name_the_line(text in acl_text()) {
            check_any(&text)?;
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(20_000))]

        #[test]
        #[ignore = "long fuzzing run; cargo test --lib fuzz_long -- --ignored"]
        fn fuzz_long_acl_rules(text in acl_text()) {
            check_any(&text)?;
        }
    }
}
