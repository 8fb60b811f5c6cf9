//! EMQX's topic rewrite and automatic subscriptions: rules from the configuration, applied by
//! the channel. Rewrite runs before everything else a topic goes through (the ACL, retained,
//! delayed and shared handling), as EMQX orders it.

use regex::Regex;

use super::topic::TopicFilter;
use crate::codec::SubscriptionOptions;

/// The most rules of each kind, as EMQX allows.
pub const MAX_RULES: usize = 30;

/// Which packets a rewrite rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewriteAction {
    Publish,
    /// SUBSCRIBE and UNSUBSCRIBE (so that unsubscribing undoes what subscribing did).
    Subscribe,
    All,
}

/// One `[[rewrite]]` rule: a topic matching `source` and `re` becomes `dest`, with `$1`…`$N`
/// the regular expression's groups and `${clientid}`, `${username}` the client's.
#[derive(Debug, Clone)]
pub struct RewriteRule {
    pub action: RewriteAction,
    pub source: TopicFilter,
    pub re: Regex,
    pub dest: String,
}

/// Rewrites `topic` by the first rule for `action` whose source filter matches it; that rule
/// decides alone (if its regular expression does not match, the topic stays as it is).
/// `None`: unchanged.
pub fn rewrite(
    rules: &[RewriteRule],
    action: RewriteAction,
    topic: &str,
    client_id: &str,
    username: Option<&str>,
) -> Option<String> {
    let rule = rules.iter().find(|rule| {
        (rule.action == action || rule.action == RewriteAction::All) && rule.source.matches(topic)
    })?;
    let captures = rule.re.captures(topic)?;
    let mut out = String::with_capacity(rule.dest.len() + topic.len());
    let mut rest = rule.dest.as_str();
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("${clientid}") {
            out.push_str(client_id);
            rest = after;
        } else if let Some(after) = rest.strip_prefix("${username}") {
            out.push_str(username.unwrap_or(""));
            rest = after;
        } else {
            let digits = rest[1..].bytes().take_while(u8::is_ascii_digit).count();
            match rest[1..=digits].parse::<usize>() {
                Ok(group) => {
                    out.push_str(captures.get(group).map_or("", |m| m.as_str()));
                    rest = &rest[1 + digits..];
                }
                Err(_) => {
                    out.push('$');
                    rest = &rest[1..];
                }
            }
        }
    }
    out.push_str(rest);
    Some(out)
}

/// One `[[auto_subscribe.topics]]` rule: a filter with `${clientid}`, `${username}`,
/// `${host}`, `${port}` placeholders, subscribed for every client that connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoSubscribe {
    pub topic: String,
    pub options: SubscriptionOptions,
}

/// `rule`'s filter for one client.
pub fn expand(
    topic: &str,
    client_id: &str,
    username: Option<&str>,
    host: &str,
    port: u16,
) -> String {
    topic
        .replace("${clientid}", client_id)
        .replace("${username}", username.unwrap_or(""))
        .replace("${host}", host)
        .replace("${port}", &port.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(action: RewriteAction, source: &str, re: &str, dest: &str) -> RewriteRule {
        RewriteRule {
            action,
            source: TopicFilter::parse(source, 0).unwrap(),
            re: Regex::new(re).unwrap(),
            dest: dest.into(),
        }
    }

    /// EMQX's documented examples.
    #[test]
    fn the_first_matching_rule_rewrites_with_groups_and_placeholders() {
        let rules = [
            rule(RewriteAction::All, "y/+/z/#", r"^y/(.+)/z/(.+)$", "y/z/$2"),
            rule(RewriteAction::All, "x/#", r"^x/y/(.+)$", "z/y/$1"),
            rule(
                RewriteAction::All,
                "x/y/+",
                r"^x/y/(\d+)$",
                "x/y/$1/${clientid}/${username}",
            ),
            rule(RewriteAction::Publish, "p/#", r"^p/(.+)$", "published/$1"),
        ];
        let go = |action, topic| rewrite(&rules, action, topic, "c1", Some("u1"));
        assert_eq!(
            go(RewriteAction::Publish, "y/a/z/b").as_deref(),
            Some("y/z/b")
        );
        assert_eq!(
            go(RewriteAction::Subscribe, "y/def"),
            None,
            "no source matches"
        );
        assert_eq!(
            go(RewriteAction::Publish, "x/1/2"),
            None,
            "x/# decides: its re fails"
        );
        assert_eq!(
            go(RewriteAction::Publish, "x/y/12345").as_deref(),
            Some("z/y/12345")
        );
        assert_eq!(
            go(RewriteAction::Publish, "p/q").as_deref(),
            Some("published/q")
        );
        assert_eq!(
            go(RewriteAction::Subscribe, "p/q"),
            None,
            "publish-only rule"
        );
        let placeholders = [rule(
            RewriteAction::All,
            "a/+",
            r"^a/(\d+)$",
            "b/$1/${clientid}/${username}/$9/$",
        )];
        assert_eq!(
            rewrite(&placeholders, RewriteAction::Publish, "a/7", "c", None).as_deref(),
            Some("b/7/c///$")
        );
    }

    #[test]
    fn auto_subscribe_placeholders_expand_per_client() {
        assert_eq!(
            expand(
                "c/${clientid}/u/${username}/${host}:${port}",
                "car",
                Some("al"),
                "127.0.0.1",
                4242
            ),
            "c/car/u/al/127.0.0.1:4242"
        );
    }
}
