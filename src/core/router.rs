//! The subscription trie: which clients want a topic (MQTT 5.0 §4.7, shared subscriptions §4.8.2).
//!
//! [`SubscriptionTree`] stores subscriptions by filter level, with `+` and `#` as separate child
//! slots, so routing a PUBLISH costs one hash lookup per literal level plus the wildcard branches.
//! Shared groups live on the node of their filter and hand each message to one member, round robin.
//!
//! It must not do I/O, read the clock, queue messages or know about sessions: it only answers
//! "who matches". Every walk (insert, remove, match, drop) is iterative, so a filter or topic with
//! tens of thousands of levels never costs stack depth.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::topic::TopicFilter;

/// How a shared group picks the member for a message (EMQX's strategies).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SharedStrategy {
    /// Each member in turn.
    #[default]
    RoundRobin,
    /// Each member in turn, one turn for the whole group (the same as `round_robin` on a
    /// single node, where one dispatcher serves every publisher).
    RoundRobinPerGroup,
    /// A member chosen at random for each message.
    Random,
    /// The same member until it leaves (or cannot take messages).
    Sticky,
    /// The same member for every message of one publisher.
    HashClientid,
    /// The same member for every message on one topic.
    HashTopic,
    /// Members on this node first: on a single node, `random`.
    Local,
}

/// Subscriptions by filter. `K` identifies a client (e.g. `Arc<str>`), `V` is the caller's
/// per-subscription data (QoS, options, subscription id, …).
pub struct SubscriptionTree<K, V> {
    root: Node<K, V>,
    len: usize,
    /// The strategy of groups not named in `group_strategies`.
    strategy: SharedStrategy,
    group_strategies: HashMap<Box<str>, SharedStrategy>,
}

/// What a shared group's strategy may look at: the message's topic and publisher.
#[derive(Debug, Clone, Copy)]
pub struct Dispatch<'a> {
    pub topic: &'a str,
    pub publisher: Option<&'a str>,
}

/// A topic alone (no publisher: `hash_clientid` treats it as one anonymous publisher).
impl<'a> From<&'a str> for Dispatch<'a> {
    fn from(topic: &'a str) -> Self {
        Dispatch {
            topic,
            publisher: None,
        }
    }
}

/// One filter level. The node reached by a filter's levels holds that filter's subscriptions.
struct Node<K, V> {
    children: HashMap<Box<str>, Node<K, V>>,
    plus: Option<Box<Node<K, V>>>,
    hash: Option<Box<Node<K, V>>>,
    subscribers: HashMap<K, V>,
    groups: Vec<SharedGroup<K, V>>,
}

/// A `$share/{name}/…` group on one filter: each matching message goes to one member.
struct SharedGroup<K, V> {
    name: Box<str>,
    strategy: SharedStrategy,
    members: Vec<(K, V)>,
    /// Index of the member to try first next time. Relaxed: concurrent routers under a read lock
    /// may occasionally pick the same member, which only perturbs fairness.
    cursor: AtomicUsize,
}

impl<K, V> Node<K, V> {
    fn new() -> Self {
        Node {
            children: HashMap::new(),
            plus: None,
            hash: None,
            subscribers: HashMap::new(),
            groups: Vec::new(),
        }
    }

    fn child(&self, level: &str) -> Option<&Node<K, V>> {
        match level {
            "+" => self.plus.as_deref(),
            "#" => self.hash.as_deref(),
            _ => self.children.get(level),
        }
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node<K, V>> {
        match level {
            "+" => self.plus.as_deref_mut(),
            "#" => self.hash.as_deref_mut(),
            _ => self.children.get_mut(level),
        }
    }

    fn child_or_insert(&mut self, level: &str) -> &mut Node<K, V> {
        match level {
            "+" => self.plus.get_or_insert_with(|| Box::new(Node::new())),
            "#" => self.hash.get_or_insert_with(|| Box::new(Node::new())),
            _ => self.children.entry(level.into()).or_insert_with(Node::new),
        }
    }

    fn remove_child(&mut self, level: &str) {
        match level {
            "+" => self.plus = None,
            "#" => self.hash = None,
            _ => {
                self.children.remove(level);
            }
        }
    }

    fn child_count(&self) -> usize {
        self.children.len() + usize::from(self.plus.is_some()) + usize::from(self.hash.is_some())
    }

    fn has_subscriptions(&self) -> bool {
        !self.subscribers.is_empty() || !self.groups.is_empty()
    }

    fn is_empty(&self) -> bool {
        !self.has_subscriptions() && self.child_count() == 0
    }
}

impl<K, V> Drop for Node<K, V> {
    /// Tears the subtree down with an explicit stack: the derived drop would recurse once per level.
    fn drop(&mut self) {
        let mut stack: Vec<Node<K, V>> = Vec::new();
        detach_children(self, &mut stack);
        while let Some(mut node) = stack.pop() {
            detach_children(&mut node, &mut stack);
        }
    }
}

fn detach_children<K, V>(node: &mut Node<K, V>, stack: &mut Vec<Node<K, V>>) {
    stack.extend(std::mem::take(&mut node.children).into_values());
    stack.extend(node.plus.take().map(|b| *b));
    stack.extend(node.hash.take().map(|b| *b));
}

impl<K: Eq + Hash + Clone, V> Default for SubscriptionTree<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K, V> std::fmt::Debug for SubscriptionTree<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionTree")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl<K: Eq + Hash + Clone, V> SubscriptionTree<K, V> {
    pub fn new() -> Self {
        SubscriptionTree {
            root: Node::new(),
            len: 0,
            strategy: SharedStrategy::default(),
            group_strategies: HashMap::new(),
        }
    }

    /// The strategy of shared groups created from now on: `per_group` by name, `default`
    /// for the rest.
    pub fn set_strategies(
        &mut self,
        default: SharedStrategy,
        per_group: HashMap<Box<str>, SharedStrategy>,
    ) {
        self.strategy = default;
        self.group_strategies = per_group;
    }

    /// Inserts or replaces `client`'s subscription on `filter`. A shared filter joins group
    /// `share_group()` on `filter()`; a client's shared and plain subscriptions on the same filter
    /// are distinct. Returns the previous value for exactly this (client, `filter.as_str()`).
    pub fn insert(&mut self, filter: &TopicFilter, client: K, value: V) -> Option<V> {
        let mut node = &mut self.root;
        for level in filter.filter().split('/') {
            node = node.child_or_insert(level);
        }
        let previous = match filter.share_group() {
            None => node.subscribers.insert(client, value),
            Some(name) => {
                let group = match node.groups.iter().position(|g| &*g.name == name) {
                    Some(i) => &mut node.groups[i],
                    None => {
                        let strategy = self
                            .group_strategies
                            .get(name)
                            .copied()
                            .unwrap_or(self.strategy);
                        node.groups.push(SharedGroup {
                            name: name.into(),
                            strategy,
                            members: Vec::new(),
                            cursor: AtomicUsize::new(0),
                        });
                        let last = node.groups.len() - 1;
                        &mut node.groups[last]
                    }
                };
                match group.members.iter_mut().find(|(k, _)| *k == client) {
                    Some((_, v)) => Some(std::mem::replace(v, value)),
                    None => {
                        group.members.push((client, value));
                        None
                    }
                }
            }
        };
        if previous.is_none() {
            self.len += 1;
        }
        previous
    }

    /// Removes `client`'s subscription on exactly `filter` (shared or plain), pruning nodes left
    /// empty.
    pub fn remove(&mut self, filter: &TopicFilter, client: &K) -> Option<V> {
        let mut node = &mut self.root;
        for level in filter.filter().split('/') {
            node = node.child_mut(level)?;
        }
        let removed = match filter.share_group() {
            None => node.subscribers.remove(client),
            Some(name) => {
                let gi = node.groups.iter().position(|g| &*g.name == name)?;
                let group = &mut node.groups[gi];
                let mi = group.members.iter().position(|(k, _)| k == client)?;
                // Order is kept so that the round robin stays fair to the remaining members,
                // and the cursor keeps pointing at the same member (sticky: the one that holds
                // the group) when one before it leaves.
                let len = group.members.len();
                let (_, v) = group.members.remove(mi);
                if matches!(
                    group.strategy,
                    SharedStrategy::RoundRobin
                        | SharedStrategy::RoundRobinPerGroup
                        | SharedStrategy::Sticky
                ) {
                    let cursor = group.cursor.get_mut();
                    let at = *cursor % len;
                    *cursor = if mi < at { at - 1 } else { at };
                }
                if group.members.is_empty() {
                    node.groups.swap_remove(gi);
                }
                Some(v)
            }
        }?;
        self.len -= 1;
        if node.is_empty() {
            self.prune(filter.filter());
        }
        Some(removed)
    }

    /// Removes the chain of empty nodes ending at `filter`'s (empty, childless) node.
    ///
    /// One walk finds the deepest ancestor that must stay (the root, or a node with
    /// subscriptions or another child); a second walk cuts the branch below it.
    fn prune(&mut self, filter: &str) {
        let mut cut_depth = 0usize;
        let mut node = &self.root;
        for (depth, level) in filter.split('/').enumerate() {
            if depth > 0 && (node.has_subscriptions() || node.child_count() > 1) {
                cut_depth = depth;
            }
            match node.child(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        let mut levels = filter.split('/');
        let mut node = &mut self.root;
        for _ in 0..cut_depth {
            let Some(level) = levels.next() else { return };
            match node.child_mut(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        if let Some(level) = levels.next() {
            node.remove_child(level);
        }
    }

    /// How many subscriptions there are on exactly `filter` (the members of its group for a
    /// shared one).
    pub fn count_on(&self, filter: &TopicFilter) -> usize {
        let mut node = &self.root;
        for level in filter.filter().split('/') {
            match node.child(level) {
                Some(child) => node = child,
                None => return 0,
            }
        }
        match filter.share_group() {
            None => node.subscribers.len(),
            Some(name) => node
                .groups
                .iter()
                .find(|g| &*g.name == name)
                .map_or(0, |g| g.members.len()),
        }
    }

    /// The value of `client`'s subscription on exactly `filter` (shared or plain).
    #[cfg(test)]
    pub fn get(&self, filter: &TopicFilter, client: &K) -> Option<&V> {
        let mut node = &self.root;
        for level in filter.filter().split('/') {
            node = node.child(level)?;
        }
        match filter.share_group() {
            None => node.subscribers.get(client),
            Some(name) => node
                .groups
                .iter()
                .find(|g| &*g.name == name)?
                .members
                .iter()
                .find(|(k, _)| k == client)
                .map(|(_, v)| v),
        }
    }

    /// Calls `visit(client, value)` once for every matching non-shared subscription and, for each
    /// matching shared group, once for one member chosen round robin among the members for which
    /// `eligible(client, value)` holds (among all members if none is eligible).
    ///
    /// `topic` is a valid topic name. Filters starting with a wildcard do not match topics
    /// starting with `$` [MQTT-4.7.2-1].
    #[cfg(any(test, feature = "internals"))]
    pub fn for_each_match<'a>(
        &self,
        dispatch: impl Into<Dispatch<'a>>,
        eligible: impl Fn(&K, &V) -> bool,
        visit: impl FnMut(&K, &V),
    ) {
        self.for_each_match_in(dispatch, Groups::All, eligible, visit);
    }

    /// [`Self::for_each_match`], with the shared groups `groups` names (a cluster dispatches
    /// the others across nodes: see `cluster`).
    pub fn for_each_match_in<'a>(
        &self,
        dispatch: impl Into<Dispatch<'a>>,
        groups: Groups,
        eligible: impl Fn(&K, &V) -> bool,
        mut visit: impl FnMut(&K, &V),
    ) {
        let dispatch = dispatch.into();
        let topic = dispatch.topic;
        let dollar = topic.starts_with('$');
        let mut frontier: Vec<&Node<K, V>> = vec![&self.root];
        let mut next: Vec<&Node<K, V>> = Vec::new();
        for (depth, level) in topic.split('/').enumerate() {
            let wildcards_allowed = !(depth == 0 && dollar);
            for node in frontier.drain(..) {
                if wildcards_allowed {
                    if let Some(hash) = node.hash.as_deref() {
                        visit_node(hash, dispatch, groups, &eligible, &mut visit);
                    }
                    if let Some(plus) = node.plus.as_deref() {
                        next.push(plus);
                    }
                }
                if let Some(child) = node.children.get(level) {
                    next.push(child);
                }
            }
            if next.is_empty() {
                return;
            }
            std::mem::swap(&mut frontier, &mut next);
        }
        for node in frontier {
            visit_node(node, dispatch, groups, &eligible, &mut visit);
            // `a/#` also matches `a` [MQTT-4.7.1-1].
            if let Some(hash) = node.hash.as_deref() {
                visit_node(hash, dispatch, groups, &eligible, &mut visit);
            }
        }
    }

    /// The number of (client, filter) subscriptions, shared ones included.
    /// A member of `filter`'s shared group that `eligible` accepts, chosen by the group's
    /// strategy; `None` if the group is gone or no member qualifies.
    pub fn pick_shared<'a>(
        &self,
        filter: &TopicFilter,
        dispatch: Dispatch<'a>,
        eligible: impl Fn(&K, &V) -> bool,
    ) -> Option<(&K, &V)> {
        let name = filter.share_group()?;
        let mut node = &self.root;
        for level in filter.filter().split('/') {
            node = node.child(level)?;
        }
        let group = node.groups.iter().find(|g| &*g.name == name)?;
        let (k, v) = &group.members[group.pick(dispatch, &eligible)?];
        eligible(k, v).then_some((k, v))
    }

    /// Subscriptions held (a shared group's members each count).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Distinct filters with a subscription (EMQX's topics: a shared group's filter counts
    /// once), and the shared subscriptions among all; one walk, no allocation per node.
    pub fn filter_counts(&self) -> (usize, usize) {
        let (mut filters, mut shared) = (0, 0);
        let mut stack = vec![&self.root];
        while let Some(node) = stack.pop() {
            if node.has_subscriptions() {
                filters += 1;
            }
            shared += node.groups.iter().map(|g| g.members.len()).sum::<usize>();
            stack.extend(node.children.values());
            stack.extend(node.plus.as_deref());
            stack.extend(node.hash.as_deref());
        }
        (filters, shared)
    }

    /// Visits every subscription: its filter as subscribed (`$share/{group}/…` for a group
    /// member), the client and its data. For the operator's listings, not the message path:
    /// it walks the whole tree (with an explicit stack) and builds each filter's text.
    pub fn for_each(&self, mut visit: impl FnMut(&str, &K, &V)) {
        let mut stack: Vec<(&Node<K, V>, String)> = vec![(&self.root, String::new())];
        let mut shared = String::new();
        while let Some((node, path)) = stack.pop() {
            for (k, v) in &node.subscribers {
                visit(&path, k, v);
            }
            for group in &node.groups {
                shared.clear();
                shared.push_str("$share/");
                shared.push_str(&group.name);
                shared.push('/');
                shared.push_str(&path);
                for (k, v) in &group.members {
                    visit(&shared, k, v);
                }
            }
            let child = |level: &str| {
                if path.is_empty() && std::ptr::eq(node, &self.root) {
                    level.to_owned()
                } else {
                    format!("{path}/{level}")
                }
            };
            for (level, next) in &node.children {
                stack.push((next, child(level)));
            }
            if let Some(next) = &node.plus {
                stack.push((next, child("+")));
            }
            if let Some(next) = &node.hash {
                stack.push((next, child("#")));
            }
        }
    }

    #[cfg(any(test, feature = "internals"))]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Which shared groups a match visits (one member each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Groups {
    All,
    None,
    /// Only groups with the `local` strategy (members on this node first): in a cluster, the
    /// publisher's node serves them when it has members.
    Local,
}

/// Visits every plain subscriber of `node` and one member of each of its shared groups that
/// `groups` names.
fn visit_node<K, V>(
    node: &Node<K, V>,
    dispatch: Dispatch<'_>,
    groups: Groups,
    eligible: &impl Fn(&K, &V) -> bool,
    visit: &mut impl FnMut(&K, &V),
) {
    for (k, v) in &node.subscribers {
        visit(k, v);
    }
    if groups == Groups::None {
        return;
    }
    for group in &node.groups {
        if groups == Groups::Local && group.strategy != SharedStrategy::Local {
            continue;
        }
        if let Some(chosen) = group.pick(dispatch, eligible) {
            let (k, v) = &group.members[chosen];
            visit(k, v);
        }
    }
}

impl<K, V> SharedGroup<K, V> {
    /// The member for one message: where the strategy points, or the next eligible member
    /// from there (any member if none is eligible).
    fn pick(&self, dispatch: Dispatch<'_>, eligible: &impl Fn(&K, &V) -> bool) -> Option<usize> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let start = match self.strategy {
            SharedStrategy::RoundRobin
            | SharedStrategy::RoundRobinPerGroup
            | SharedStrategy::Sticky => self.cursor.load(Ordering::Relaxed),
            // A counter through a mixing function: uniform, and no randomness to pass in.
            SharedStrategy::Random | SharedStrategy::Local => {
                mix(self.cursor.fetch_add(1, Ordering::Relaxed) as u64) as usize
            }
            SharedStrategy::HashClientid => stable_hash(dispatch.publisher.unwrap_or("")),
            SharedStrategy::HashTopic => stable_hash(dispatch.topic),
        } % n;
        let chosen = (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| {
                let (k, v) = &self.members[i];
                eligible(k, v)
            })
            .unwrap_or(start);
        match self.strategy {
            SharedStrategy::RoundRobin | SharedStrategy::RoundRobinPerGroup => {
                self.cursor.store(chosen.wrapping_add(1), Ordering::Relaxed);
            }
            // Stays on the chosen member until it is no longer eligible.
            SharedStrategy::Sticky => self.cursor.store(chosen, Ordering::Relaxed),
            _ => {}
        }
        Some(chosen)
    }
}

/// splitmix64's finaliser: spreads consecutive counters over the whole range.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A hash that is the same in every process (FNV-1a, mixed), so a publisher or a topic maps
/// to the same member across restarts as long as the group's members do not change.
fn stable_hash(s: &str) -> usize {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in s.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3);
    }
    mix(h) as usize
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests make up instants from the real clock
mod tests {
    use super::*;
    use crate::core::topic::filter_matches;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn tf(s: &str) -> TopicFilter {
        TopicFilter::parse(s, 0).unwrap()
    }

    #[test]
    fn sticky_stays_on_its_member_when_another_member_leaves() {
        let mut tree: SubscriptionTree<u32, String> = SubscriptionTree::new();
        tree.set_strategies(SharedStrategy::Sticky, HashMap::new());
        let f = tf("$share/g/t");
        for k in 0..4 {
            tree.insert(&f, k, "v".into());
        }
        let pick = |tree: &SubscriptionTree<u32, String>, skip: Option<u32>| {
            let mut got = Vec::new();
            tree.for_each_match("t", |k, _| Some(*k) != skip, |k, _| got.push(*k));
            got
        };
        // Member 0 is passed over (not eligible): 1 holds the group from then on.
        assert_eq!(pick(&tree, Some(0)), [1]);
        assert_eq!(pick(&tree, None), [1]);
        // Member 0, before the holder, leaves: 1 still holds it.
        tree.remove(&f, &0);
        assert_eq!(pick(&tree, None), [1]);
        assert_eq!(pick(&tree, None), [1]);
        // The holder leaves: one other member holds it from then on.
        tree.remove(&f, &1);
        let next = pick(&tree, None);
        assert_eq!(pick(&tree, None), next);
    }

    #[test]
    fn for_each_lists_every_subscription_with_its_filter_as_subscribed() {
        let mut tree: SubscriptionTree<u32, String> = SubscriptionTree::new();
        for (i, f) in [
            "a/b",
            "a/+",
            "#",
            "/x",
            "a/b/#",
            "$share/g/a/b",
            "$share/g/a/b",
        ]
        .iter()
        .enumerate()
        {
            tree.insert(&tf(f), i as u32, f.to_string());
        }
        let mut seen = Vec::new();
        tree.for_each(|filter, k, v| seen.push((filter.to_owned(), *k, v.clone())));
        seen.sort();
        // `a/b` holds a plain subscription and a group: one filter.
        assert_eq!(tree.filter_counts(), (5, 2));
        let mut want: Vec<_> = [
            ("#", 2),
            ("$share/g/a/b", 5),
            ("$share/g/a/b", 6),
            ("/x", 3),
            ("a/+", 1),
            ("a/b", 0),
            ("a/b/#", 4),
        ]
        .iter()
        .map(|(f, k)| (f.to_string(), *k, f.to_string()))
        .collect();
        want.sort();
        assert_eq!(seen, want);
        assert_eq!(tree.len(), 7);
    }

    fn matches_of(tree: &SubscriptionTree<u32, String>, topic: &str) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        tree.for_each_match(topic, |_, _| true, |k, v| out.push((*k, v.clone())));
        out.sort();
        out
    }

    impl<K, V> SubscriptionTree<K, V> {
        fn node_count(&self) -> usize {
            let mut count = 0;
            let mut stack = vec![&self.root];
            while let Some(n) = stack.pop() {
                count += 1;
                stack.extend(n.children.values());
                stack.extend(n.plus.as_deref());
                stack.extend(n.hash.as_deref());
            }
            count
        }
    }

    #[test]
    fn insert_replace_remove_counts() {
        let mut t = SubscriptionTree::new();
        assert!(t.is_empty());
        assert_eq!(t.insert(&tf("a/b"), 1u32, "x"), None);
        assert_eq!(t.insert(&tf("a/b"), 2, "y"), None);
        assert_eq!(t.insert(&tf("a/b"), 1, "z"), Some("x"));
        assert_eq!(t.insert(&tf("$share/g/a/b"), 1, "s"), None);
        assert_eq!(t.insert(&tf("$share/g/a/b"), 1, "s2"), Some("s"));
        assert_eq!(t.len(), 3);
        assert_eq!(t.get(&tf("a/b"), &1), Some(&"z"));
        assert_eq!(t.get(&tf("$share/g/a/b"), &1), Some(&"s2"));
        assert_eq!(t.get(&tf("$share/h/a/b"), &1), None);
        assert_eq!(t.get(&tf("a/+"), &1), None);
        assert_eq!(t.remove(&tf("a/+"), &1), None);
        assert_eq!(t.remove(&tf("a/b"), &3), None);
        assert_eq!(t.remove(&tf("$share/h/a/b"), &1), None);
        assert_eq!(t.remove(&tf("$share/g/a/b"), &2), None);
        assert_eq!(t.len(), 3);
        assert_eq!(t.remove(&tf("$share/g/a/b"), &1), Some("s2"));
        assert_eq!(t.remove(&tf("a/b"), &1), Some("z"));
        assert_eq!(t.get(&tf("a/b"), &1), None);
        assert_eq!(t.len(), 1);
        assert_eq!(t.remove(&tf("a/b"), &2), Some("y"));
        assert!(t.is_empty());
    }

    #[test]
    fn removal_prunes() {
        let mut t = SubscriptionTree::new();
        t.insert(&tf("a/b/c/d"), 1u32, ());
        t.insert(&tf("a/b"), 1, ());
        t.insert(&tf("a/+/#"), 1, ());
        t.insert(&tf("$share/g/x/y"), 1, ());
        assert_eq!(t.node_count(), 1 + 4 + 2 + 2);
        t.remove(&tf("a/b/c/d"), &1);
        assert_eq!(t.node_count(), 1 + 2 + 2 + 2);
        t.remove(&tf("a/b"), &1);
        assert_eq!(t.node_count(), 1 + 1 + 2 + 2);
        t.remove(&tf("$share/g/x/y"), &1);
        assert_eq!(t.node_count(), 1 + 1 + 2);
        t.remove(&tf("a/+/#"), &1);
        assert_eq!(t.node_count(), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn shared_round_robin_is_even() {
        let mut t = SubscriptionTree::new();
        for c in 0..3u32 {
            t.insert(&tf("$share/g/s/+"), c, ());
        }
        let mut counts = [0usize; 3];
        let mut order = Vec::new();
        for _ in 0..30 {
            t.for_each_match(
                "s/x",
                |_, _| true,
                |k, _| {
                    counts[*k as usize] += 1;
                    order.push(*k);
                },
            );
        }
        assert_eq!(counts, [10, 10, 10]);
        // Consecutive deliveries go to different members.
        assert!(order.windows(2).all(|w| w[0] != w[1]), "{order:?}");
    }

    /// Members of group `g` on `s/+` chosen for `n` messages from `publishers` (in turn) on
    /// `topics` (in turn), with every member eligible but `ineligible`.
    fn picks(
        strategy: SharedStrategy,
        members: u32,
        n: usize,
        publishers: &[&str],
        topics: &[&str],
        ineligible: Option<u32>,
    ) -> Vec<u32> {
        let mut t = SubscriptionTree::new();
        t.set_strategies(
            SharedStrategy::RoundRobin,
            HashMap::from([("g".into(), strategy)]),
        );
        for c in 0..members {
            t.insert(&tf("$share/g/s/+"), c, ());
        }
        let mut got = Vec::new();
        for i in 0..n {
            let dispatch = Dispatch {
                topic: topics[i % topics.len()],
                publisher: Some(publishers[i % publishers.len()]),
            };
            t.for_each_match(dispatch, |k, _| Some(*k) != ineligible, |k, _| got.push(*k));
        }
        got
    }

    fn counts(picks: &[u32], members: usize) -> Vec<usize> {
        let mut counts = vec![0; members];
        for &p in picks {
            counts[p as usize] += 1;
        }
        counts
    }

    #[test]
    fn each_strategy_distributes_as_emqx_documents() {
        use SharedStrategy::*;
        for strategy in [RoundRobin, RoundRobinPerGroup] {
            let got = picks(strategy, 4, 40, &["p"], &["s/x"], None);
            assert_eq!(counts(&got, 4), [10, 10, 10, 10], "{strategy:?}");
        }
        // Random: every member gets a fair share of 4,000 messages, not a fixed order.
        for strategy in [Random, Local] {
            let got = picks(strategy, 4, 4000, &["p"], &["s/x"], None);
            assert!(
                counts(&got, 4).iter().all(|&c| (800..1200).contains(&c)),
                "{strategy:?}"
            );
            assert!(got.windows(2).any(|w| w[0] == w[1]), "not round robin");
        }
        // Sticky: one member for everything until it cannot take messages.
        let got = picks(Sticky, 4, 20, &["p", "q"], &["s/x", "s/y"], None);
        assert!(got.iter().all(|&m| m == got[0]), "{got:?}");
        let away = picks(Sticky, 4, 20, &["p"], &["s/x"], Some(0));
        assert!(away.iter().all(|&m| m == away[0] && m != 0), "{away:?}");
        // hash_clientid: each publisher always to one member; hash_topic: each topic.
        let publishers = ["car-1", "car-2", "car-3", "car-4", "car-5", "car-6"];
        let got = picks(HashClientid, 3, 60, &publishers, &["s/x", "s/y"], None);
        for (i, p) in got.iter().enumerate() {
            assert_eq!(
                *p,
                got[i % publishers.len()],
                "publisher {}",
                publishers[i % 6]
            );
        }
        assert!(
            counts(&got, 3).iter().filter(|&&c| c > 0).count() > 1,
            "all on one member"
        );
        let topics = ["s/1", "s/2", "s/3", "s/4", "s/5", "s/6", "s/7"];
        let got = picks(HashTopic, 3, 70, &["a", "b"], &topics, None);
        for (i, p) in got.iter().enumerate() {
            assert_eq!(*p, got[i % topics.len()], "topic {}", topics[i % 7]);
        }
        // A member that cannot take messages is passed over by every strategy.
        for strategy in [RoundRobin, Random, Sticky, HashClientid, HashTopic] {
            let got = picks(strategy, 3, 30, &["p", "q"], &["s/x", "s/y"], Some(1));
            assert!(!got.contains(&1), "{strategy:?}: {got:?}");
        }
    }

    #[test]
    fn eligibility_skips_members() {
        let mut t = SubscriptionTree::new();
        for c in 0..4u32 {
            t.insert(&tf("$share/g/s"), c, ());
        }
        let mut got = Vec::new();
        for _ in 0..6 {
            t.for_each_match("s", |k, _| *k % 2 == 1, |k, _| got.push(*k));
        }
        assert_eq!(got, [1, 3, 1, 3, 1, 3]);
        // Nobody eligible: still delivered, round robin over all.
        let mut got = Vec::new();
        for _ in 0..8 {
            t.for_each_match("s", |_, _| false, |k, _| got.push(*k));
        }
        got.sort();
        assert_eq!(got, [0, 0, 1, 1, 2, 2, 3, 3]);
    }

    #[test]
    fn separate_groups_each_get_one() {
        let mut t = SubscriptionTree::new();
        t.insert(&tf("$share/g/s"), 1u32, ());
        t.insert(&tf("$share/g/s"), 2, ());
        t.insert(&tf("$share/h/s"), 3, ());
        t.insert(&tf("$share/h/+"), 4, ());
        let mut got = Vec::new();
        t.for_each_match("s", |_, _| true, |k, _| got.push(*k));
        got.sort();
        assert_eq!(got.len(), 3);
        assert!(got.contains(&3) && got.contains(&4));
    }

    #[test]
    fn plain_and_shared_on_same_filter_both_visited() {
        let mut t = SubscriptionTree::new();
        t.insert(&tf("a/#"), 7u32, "plain".to_string());
        t.insert(&tf("$share/g/a/#"), 7, "shared".to_string());
        assert_eq!(
            matches_of(&t, "a/b"),
            [(7, "plain".to_string()), (7, "shared".to_string())]
        );
        assert_eq!(matches_of(&t, "a").len(), 2);
    }

    #[test]
    fn dollar_rule_and_parent_match() {
        let mut t = SubscriptionTree::new();
        for (c, f) in ["#", "+/x", "$SYS/#", "a/#", "+"].iter().enumerate() {
            t.insert(&tf(f), c as u32, f.to_string());
        }
        let names =
            |topic| -> Vec<String> { matches_of(&t, topic).into_iter().map(|(_, f)| f).collect() };
        assert_eq!(names("$SYS/x"), ["$SYS/#"]);
        assert_eq!(names("$SYS"), ["$SYS/#"]);
        assert_eq!(names("a"), ["#", "a/#", "+"]); // sorted by client
        assert_eq!(names("b/x"), ["#", "+/x"]);
        assert!(names("$x").is_empty());
    }

    #[test]
    fn deep_filters_and_topics_do_not_recurse() {
        // 60 001 empty levels; the `#` variant stays under the 65535-byte limit.
        let deep = "/".repeat(60_000);
        let mut t = SubscriptionTree::new();
        t.insert(&tf(&deep), 1u32, ());
        t.insert(&tf(&format!("{deep}#")), 2u32, ());
        let mut got = Vec::new();
        t.for_each_match(deep.as_str(), |_, _| true, |k, _| got.push(*k));
        got.sort();
        assert_eq!(got, [1, 2]);
        assert_eq!(t.remove(&tf(&deep), &1), Some(()));
        assert_eq!(t.remove(&tf(&format!("{deep}#")), &2), Some(()));
        assert_eq!(t.node_count(), 1);
        t.insert(&tf(&deep), 1u32, ());
        drop(t); // iterative drop of a 60 001-level chain
    }

    fn level() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["a", "b", "$x", ""])
    }

    fn filter_strategy() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(prop_oneof![3 => level(), 1 => Just("+")], 1..4),
            any::<bool>(),
        )
            .prop_map(|(mut levels, hash)| {
                if hash {
                    levels.push("#");
                }
                levels.join("/")
            })
            .prop_filter("non-empty", |s| !s.is_empty())
    }

    fn topic_strategy() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..5)
            .prop_map(|levels| levels.join("/"))
            .prop_filter("non-empty", |s| !s.is_empty())
    }

    proptest! {
        #[test]
        fn matches_model(
            subs in prop::collection::vec((filter_strategy(), 0u32..4), 0..40),
            removals in prop::collection::vec((filter_strategy(), 0u32..4), 0..20),
            topics in prop::collection::vec(topic_strategy(), 1..20),
        ) {
            let mut tree = SubscriptionTree::new();
            let mut model: BTreeMap<(String, u32), ()> = BTreeMap::new();
            for (f, c) in &subs {
                let prev = tree.insert(&tf(f), *c, f.clone());
                prop_assert_eq!(prev.is_some(), model.insert((f.clone(), *c), ()).is_some());
            }
            for (f, c) in &removals {
                let removed = tree.remove(&tf(f), c);
                prop_assert_eq!(removed.is_some(), model.remove(&(f.clone(), *c)).is_some());
            }
            prop_assert_eq!(tree.len(), model.len());
            for topic in &topics {
                let mut want: Vec<(u32, String)> = model
                    .keys()
                    .filter(|(f, _)| filter_matches(f, topic))
                    .map(|(f, c)| (*c, f.clone()))
                    .collect();
                want.sort();
                prop_assert_eq!(matches_of(&tree, topic), want, "topic {}", topic);
            }
            let keys: Vec<_> = model.keys().cloned().collect();
            for (f, c) in keys {
                prop_assert!(tree.remove(&tf(&f), &c).is_some());
            }
            prop_assert!(tree.is_empty());
            prop_assert_eq!(tree.node_count(), 1);
        }
    }
}
