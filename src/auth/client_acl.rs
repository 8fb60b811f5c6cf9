//! Per-client ACL rules an authentication source hands out with its answer: a JWT's `acl`
//! claim or an HTTP backend's `acl` field, in EMQX's two shapes:
//!
//! ```json
//! {"pub": ["t/1"], "sub": ["${clientid}/#"], "all": ["eq x/#"]}
//! [{"permission": "allow", "action": "publish", "topic": "t/${clientid}"},
//!  {"permission": "deny", "action": "all", "topics": ["#"]}]
//! ```
//!
//! The object form lists what the client may do, and denies the rest. The list form (EMQX
//! 5.5) is checked rule by rule, the first match deciding; a request no rule matches goes on
//! to the broker's own ACL (`acl_file`), as in EMQX. `${clientid}` and `${username}` are
//! replaced when the rules are made (one set per connection); a value that would bring in
//! `/`, `+` or `#`, or `${username}` for a client without one, makes its rule match nothing.
//! `eq TOPIC` matches the filter itself only. A rule restricted by `qos` or `retain` (which
//! our checks do not see) is kept when it denies, applying to every QoS, and dropped when it
//! allows: never wider than written. This module decides; it reads nothing.

use serde_json::Value;

use crate::core::access::Access;
use crate::core::topic::filter_matches;

/// At most this many rules from one token or response (bounded work per check).
pub const MAX_RULES: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Publish,
    Subscribe,
    All,
}

impl Action {
    fn covers(self, access: Access) -> bool {
        matches!(
            (self, access),
            (Self::All, _)
                | (Self::Publish, Access::Publish)
                | (Self::Subscribe, Access::Subscribe | Access::Receive)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    allow: bool,
    action: Action,
    /// `None`: a placeholder could not be filled; the rule matches nothing.
    topic: Option<String>,
    /// `eq TOPIC`: the filter itself, not what it matches.
    exact: bool,
}

/// The rules of one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAcl {
    rules: Vec<Rule>,
    /// The object form: what no rule allows is denied.
    deny_unmatched: bool,
}

impl ClientAcl {
    /// Reads the claim or field; an error says what is wrong with it.
    pub fn parse(value: &Value, client_id: &str, username: Option<&str>) -> Result<Self, String> {
        let mut rules = Vec::new();
        let deny_unmatched = match value {
            Value::Object(map) => {
                for (key, action) in [
                    ("pub", Action::Publish),
                    ("sub", Action::Subscribe),
                    ("all", Action::All),
                ] {
                    match map.get(key) {
                        None | Some(Value::Null) => {}
                        Some(Value::Array(topics)) => {
                            for topic in topics {
                                let topic = topic
                                    .as_str()
                                    .ok_or_else(|| format!("`{key}`: topics must be strings"))?;
                                rules.push(Rule::new(true, action, topic, client_id, username)?);
                            }
                        }
                        Some(_) => return Err(format!("`{key}` must be a list of topics")),
                    }
                }
                if let Some(other) = map.keys().find(|k| !["pub", "sub", "all"].contains(&&***k)) {
                    return Err(format!("unknown key `{other}` (expected pub, sub, all)"));
                }
                true
            }
            Value::Array(list) => {
                for (i, rule) in list.iter().enumerate() {
                    let error = |m: &str| format!("rule {}: {m}", i + 1);
                    let rule = rule.as_object().ok_or_else(|| error("not an object"))?;
                    let allow = match rule.get("permission").and_then(Value::as_str) {
                        Some("allow") => true,
                        Some("deny") => false,
                        _ => return Err(error("`permission` must be \"allow\" or \"deny\"")),
                    };
                    let action = match rule.get("action").and_then(Value::as_str) {
                        Some("publish" | "pub") => Action::Publish,
                        Some("subscribe" | "sub") => Action::Subscribe,
                        Some("all") => Action::All,
                        _ => {
                            return Err(error(
                                "`action` must be \"publish\", \"subscribe\" or \"all\"",
                            ))
                        }
                    };
                    let topics: Vec<&str> = match (rule.get("topic"), rule.get("topics")) {
                        (Some(Value::String(t)), None) => vec![t],
                        (None, Some(Value::Array(ts))) => ts
                            .iter()
                            .map(|t| t.as_str().ok_or_else(|| error("topics must be strings")))
                            .collect::<Result<_, _>>()?,
                        _ => return Err(error("needs `topic` (a string) or `topics` (a list)")),
                    };
                    let restricted = rule.contains_key("qos") || rule.contains_key("retain");
                    if restricted && allow {
                        // Our checks do not see QoS or retain: dropping the grant keeps it
                        // no wider than written.
                        continue;
                    }
                    for topic in topics {
                        rules.push(Rule::new(allow, action, topic, client_id, username)?);
                    }
                }
                false
            }
            _ => return Err("must be an object (pub/sub/all) or a list of rules".into()),
        };
        if rules.len() > MAX_RULES {
            return Err(format!("more than {MAX_RULES} rules"));
        }
        Ok(Self {
            rules,
            deny_unmatched,
        })
    }

    /// `Some(allowed)` when the rules decide, `None` when the broker's ACL is to.
    pub fn decide(&self, access: Access, topic: &str) -> Option<bool> {
        for rule in &self.rules {
            if rule.action.covers(access) && rule.matches(topic) {
                return Some(rule.allow);
            }
        }
        self.deny_unmatched.then_some(false)
    }
}

impl Rule {
    fn new(
        allow: bool,
        action: Action,
        topic: &str,
        client_id: &str,
        username: Option<&str>,
    ) -> Result<Self, String> {
        let (exact, topic) = match topic.strip_prefix("eq ") {
            Some(rest) => (true, rest),
            None => (false, topic),
        };
        if topic.is_empty() {
            return Err("empty topic".into());
        }
        Ok(Self {
            allow,
            action,
            topic: fill(topic, client_id, username),
            exact,
        })
    }

    fn matches(&self, topic: &str) -> bool {
        match &self.topic {
            None => false,
            Some(rule) if self.exact => rule == topic,
            Some(rule) => filter_matches(rule, topic),
        }
    }
}

/// `topic` with `${clientid}` and `${username}` filled in; `None` when a value is missing or
/// would change the topic's levels.
fn fill(topic: &str, client_id: &str, username: Option<&str>) -> Option<String> {
    let safe = |v: &str| !v.contains(['/', '+', '#']);
    let mut out = topic.to_owned();
    if out.contains("${clientid}") {
        if !safe(client_id) {
            return None;
        }
        out = out.replace("${clientid}", client_id);
    }
    if out.contains("${username}") {
        match username {
            Some(u) if safe(u) => out = out.replace("${username}", u),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn object_form_allows_what_it_lists_and_denies_the_rest() {
        let acl = ClientAcl::parse(
            &json!({"pub": ["up/${clientid}"], "sub": ["down/#"], "all": ["eq both/#"]}),
            "car1",
            None,
        )
        .unwrap();
        assert_eq!(acl.decide(Access::Publish, "up/car1"), Some(true));
        assert_eq!(acl.decide(Access::Publish, "up/car2"), Some(false));
        assert_eq!(acl.decide(Access::Subscribe, "down/+"), Some(true));
        assert_eq!(acl.decide(Access::Receive, "down/x"), Some(true));
        assert_eq!(acl.decide(Access::Publish, "down/x"), Some(false));
        assert_eq!(acl.decide(Access::Subscribe, "both/#"), Some(true));
        assert_eq!(acl.decide(Access::Subscribe, "both/x"), Some(false));
    }

    #[test]
    fn list_form_first_match_decides_and_passes_on_the_rest() {
        let acl = ClientAcl::parse(
            &json!([
                {"permission": "deny", "action": "publish", "topic": "t/secret"},
                {"permission": "allow", "action": "all", "topics": ["t/#", "${username}/#"]},
                {"permission": "allow", "action": "publish", "topic": "q/#", "qos": [1]},
                {"permission": "deny", "action": "subscribe", "topic": "r/#", "qos": [2]},
            ]),
            "c",
            Some("ann"),
        )
        .unwrap();
        assert_eq!(acl.decide(Access::Publish, "t/secret"), Some(false));
        assert_eq!(acl.decide(Access::Subscribe, "t/secret"), Some(true));
        assert_eq!(acl.decide(Access::Publish, "ann/x"), Some(true));
        assert_eq!(acl.decide(Access::Publish, "other"), None);
        // A restricted grant is dropped, a restricted denial applies to every QoS.
        assert_eq!(acl.decide(Access::Publish, "q/1"), None);
        assert_eq!(acl.decide(Access::Subscribe, "r/1"), Some(false));
    }

    #[test]
    fn placeholders_never_widen_a_rule() {
        let acl = ClientAcl::parse(
            &json!({"all": ["d/${clientid}", "u/${username}"]}),
            "+",
            None,
        )
        .unwrap();
        assert_eq!(acl.decide(Access::Publish, "d/+"), Some(false));
        assert_eq!(acl.decide(Access::Publish, "d/x"), Some(false));
        assert_eq!(acl.decide(Access::Publish, "u/"), Some(false));
    }

    #[test]
    fn malformed_claims_are_errors() {
        for bad in [
            json!("t/#"),
            json!({"pub": "t/#"}),
            json!({"publish": ["t"]}),
            json!([{"permission": "maybe", "action": "all", "topic": "t"}]),
            json!([{"permission": "allow", "action": "read", "topic": "t"}]),
            json!([{"permission": "allow", "action": "all"}]),
            json!({"pub": [""]}),
        ] {
            assert!(ClientAcl::parse(&bad, "c", None).is_err(), "{bad}");
        }
    }
}
