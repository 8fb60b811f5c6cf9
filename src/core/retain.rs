//! Retained messages by topic (MQTT 5.0 §3.3.1.3): at most one per topic name, found by filter
//! when a client subscribes.
//!
//! [`RetainedStore`] is a trie keyed by topic level; each node may hold the message retained on the
//! topic that ends there, together with that topic's full name. Matching a filter walks the trie
//! with an explicit stack, so a deep topic never costs stack depth.
//!
//! It must not do I/O, read the clock or decide policy: expiry is the caller's `retain` predicate,
//! and "empty payload clears" is the caller's call to `remove`. It keeps the count and the
//! bytes it holds, so that the caller can ask [`RetainedStore::admits`] against its
//! [`RetainLimits`] before a message is kept.

use std::collections::HashMap;
use std::str::Split;

use super::topic::TopicFilter;

/// Bounds on the retained store (EMQX's `[retainer]` settings), each 0 for none. Past one,
/// a message is still routed but not retained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainLimits {
    /// Retained messages held (`retainer.max_retained_messages`).
    pub max_messages: usize,
    /// Topic and payload bytes held, over every retained message
    /// (`retainer.max_retained_bytes`).
    pub max_bytes: usize,
    /// The largest payload retained (`retainer.max_payload_size`).
    pub max_payload_size: usize,
}

impl Default for RetainLimits {
    fn default() -> Self {
        Self {
            max_messages: 1_000_000,
            max_bytes: 256 * 1024 * 1024,
            max_payload_size: 1024 * 1024,
        }
    }
}

/// Why a message was not retained: which of [`RetainLimits`] it met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetainRefusal {
    PayloadTooLarge,
    TooManyMessages,
    TooManyBytes,
}

impl RetainRefusal {
    /// The setting to raise.
    pub fn setting(self) -> &'static str {
        match self {
            Self::PayloadTooLarge => "retainer.max_payload_size",
            Self::TooManyMessages => "retainer.max_retained_messages",
            Self::TooManyBytes => "retainer.max_retained_bytes",
        }
    }
}

/// Retained messages keyed by topic name. `M` is the caller's message type.
pub struct RetainedStore<M> {
    root: Node<M>,
    len: usize,
    /// Topic and payload bytes held, as `weigh` tells the payload's.
    bytes: usize,
    /// A message's payload size.
    weigh: fn(&M) -> usize,
}

struct Node<M> {
    children: HashMap<Box<str>, Node<M>>,
    /// The full topic name and the message retained on it.
    message: Option<(Box<str>, M)>,
}

impl<M> Node<M> {
    fn new() -> Self {
        Node {
            children: HashMap::new(),
            message: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.message.is_none() && self.children.is_empty()
    }
}

impl<M> Drop for Node<M> {
    /// Tears the subtree down with an explicit stack: the derived drop would recurse once per level.
    fn drop(&mut self) {
        let mut stack: Vec<Node<M>> = std::mem::take(&mut self.children).into_values().collect();
        while let Some(mut node) = stack.pop() {
            stack.extend(std::mem::take(&mut node.children).into_values());
        }
    }
}

/// Pending work of a filter match.
enum Frame<'a, M> {
    /// Match the remaining filter levels against `node`'s subtree.
    Match {
        node: &'a Node<M>,
        rest: Split<'a, char>,
        at_root: bool,
    },
    /// Everything at and below `node` matches (a `#` reached it).
    All(&'a Node<M>),
}

impl<M> Default for RetainedStore<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M> std::fmt::Debug for RetainedStore<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetainedStore")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl<M> RetainedStore<M> {
    /// A store that counts topics only (no payload weight).
    pub fn new() -> Self {
        Self::weighed(|_| 0)
    }

    /// A store that counts each message as its topic plus `weigh(message)` bytes.
    pub fn weighed(weigh: fn(&M) -> usize) -> Self {
        RetainedStore {
            root: Node::new(),
            len: 0,
            bytes: 0,
            weigh,
        }
    }

    /// Whether a message of `payload_len` bytes on `topic` may be retained under `limits`
    /// (replacing the one retained there, if any). A walk down `topic`'s levels, nothing
    /// more.
    pub fn admits(
        &self,
        topic: &str,
        payload_len: usize,
        limits: &RetainLimits,
    ) -> Result<(), RetainRefusal> {
        if limits.max_payload_size > 0 && payload_len > limits.max_payload_size {
            return Err(RetainRefusal::PayloadTooLarge);
        }
        let replaced = self.get(topic).map(|old| topic.len() + (self.weigh)(old));
        if limits.max_messages > 0 && replaced.is_none() && self.len >= limits.max_messages {
            return Err(RetainRefusal::TooManyMessages);
        }
        let bytes = self.bytes - replaced.unwrap_or(0) + topic.len() + payload_len;
        if limits.max_bytes > 0 && bytes > limits.max_bytes {
            return Err(RetainRefusal::TooManyBytes);
        }
        Ok(())
    }

    /// Retains `msg` on `topic` (a valid topic name), returning the message it replaces.
    pub fn insert(&mut self, topic: &str, msg: M) -> Option<M> {
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.entry(level.into()).or_insert_with(Node::new);
        }
        self.bytes += topic.len() + (self.weigh)(&msg);
        match &mut node.message {
            Some((_, old)) => {
                let old = std::mem::replace(old, msg);
                self.bytes -= topic.len() + (self.weigh)(&old);
                Some(old)
            }
            slot @ None => {
                *slot = Some((topic.into(), msg));
                self.len += 1;
                None
            }
        }
    }

    /// Removes the message retained on `topic`, pruning nodes left empty.
    pub fn remove(&mut self, topic: &str) -> Option<M> {
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.get_mut(level)?;
        }
        let (_, msg) = node.message.take()?;
        self.len -= 1;
        self.bytes -= topic.len() + (self.weigh)(&msg);
        if node.children.is_empty() {
            self.prune(topic);
        }
        Some(msg)
    }

    /// Removes the chain of empty nodes ending at `topic`'s node, if that node is empty.
    ///
    /// One walk finds the deepest ancestor that must stay (the root, or a node with a message or
    /// another child); a second walk cuts the branch below it.
    fn prune(&mut self, topic: &str) {
        let mut cut_depth = 0usize;
        let mut node = &self.root;
        for (depth, level) in topic.split('/').enumerate() {
            if depth > 0 && (node.message.is_some() || node.children.len() > 1) {
                cut_depth = depth;
            }
            match node.children.get(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        if !node.is_empty() {
            return;
        }
        let mut levels = topic.split('/');
        let mut node = &mut self.root;
        for _ in 0..cut_depth {
            let Some(level) = levels.next() else { return };
            match node.children.get_mut(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        if let Some(level) = levels.next() {
            node.children.remove(level);
        }
    }

    /// The message retained on exactly `topic`.
    pub fn get(&self, topic: &str) -> Option<&M> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.message.as_ref().map(|(_, m)| m)
    }

    /// Calls `visit(topic, msg)` for every retained message whose topic matches
    /// `filter.filter()` (any share prefix is ignored). Filters starting with a wildcard skip
    /// topics starting with `$` [MQTT-4.7.2-1].
    pub fn for_each_match(&self, filter: &TopicFilter, mut visit: impl FnMut(&str, &M)) {
        let mut stack = vec![Frame::Match {
            node: &self.root,
            rest: filter.filter().split('/'),
            at_root: true,
        }];
        while let Some(frame) = stack.pop() {
            match frame {
                Frame::All(node) => {
                    if let Some((topic, msg)) = &node.message {
                        visit(topic, msg);
                    }
                    stack.extend(node.children.values().map(Frame::All));
                }
                Frame::Match {
                    node,
                    mut rest,
                    at_root,
                } => match rest.next() {
                    None => {
                        if let Some((topic, msg)) = &node.message {
                            visit(topic, msg);
                        }
                    }
                    Some("#") if at_root => {
                        // The root holds no message: every first level except `$` ones.
                        stack.extend(
                            node.children
                                .iter()
                                .filter(|(level, _)| !level.starts_with('$'))
                                .map(|(_, child)| Frame::All(child)),
                        );
                    }
                    // `a/#` matches `a` too: the node itself and its whole subtree.
                    Some("#") => stack.push(Frame::All(node)),
                    Some("+") => {
                        for (level, child) in &node.children {
                            if at_root && level.starts_with('$') {
                                continue;
                            }
                            stack.push(Frame::Match {
                                node: child,
                                rest: rest.clone(),
                                at_root: false,
                            });
                        }
                    }
                    Some(level) => {
                        if let Some(child) = node.children.get(level) {
                            stack.push(Frame::Match {
                                node: child,
                                rest,
                                at_root: false,
                            });
                        }
                    }
                },
            }
        }
    }

    /// Drops every message for which `keep(topic, msg)` is false (e.g. expired ones), pruning
    /// nodes left empty.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &M) -> bool) {
        let mut dropped: Vec<Box<str>> = Vec::new();
        let mut freed = 0;
        let mut stack: Vec<&mut Node<M>> = vec![&mut self.root];
        while let Some(node) = stack.pop() {
            if let Some((topic, msg)) = &node.message {
                if !keep(topic, msg) {
                    if let Some((topic, msg)) = node.message.take() {
                        freed += topic.len() + (self.weigh)(&msg);
                        dropped.push(topic);
                    }
                }
            }
            stack.extend(node.children.values_mut());
        }
        self.bytes -= freed;
        self.len -= dropped.len();
        for topic in &dropped {
            self.prune(topic);
        }
    }

    /// The number of retained messages.
    pub fn count(&self) -> usize {
        self.len
    }

    /// Topic and payload bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests make up instants from the real clock
mod tests {
    use super::*;
    use crate::core::topic::filter_matches;
    use proptest::prelude::*;

    fn tf(s: &str) -> TopicFilter {
        TopicFilter::parse(s, 0).unwrap()
    }

    fn matches_of(store: &RetainedStore<u32>, filter: &str) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        store.for_each_match(&tf(filter), |t, m| out.push((t.to_string(), *m)));
        out.sort();
        out
    }

    impl<M> RetainedStore<M> {
        fn node_count(&self) -> usize {
            let mut count = 0;
            let mut stack = vec![&self.root];
            while let Some(n) = stack.pop() {
                count += 1;
                stack.extend(n.children.values());
            }
            count
        }
    }

    #[test]
    fn insert_get_replace_remove() {
        let mut s = RetainedStore::new();
        assert!(s.is_empty());
        assert_eq!(s.insert("a/b", 1), None);
        assert_eq!(s.insert("a/b", 2), Some(1));
        assert_eq!(s.insert("a", 3), None);
        assert_eq!(s.count(), 2);
        assert_eq!(s.get("a/b"), Some(&2));
        assert_eq!(s.get("a/b/c"), None);
        assert_eq!(s.get("a/"), None);
        assert_eq!(s.remove("a/c"), None);
        assert_eq!(s.remove("a/b"), Some(2));
        assert_eq!(s.remove("a/b"), None);
        assert_eq!(s.count(), 1);
    }

    #[test]
    fn remove_prunes() {
        let mut s = RetainedStore::new();
        s.insert("a/b/c/d", 1);
        s.insert("a/b", 2);
        s.insert("a/x", 3);
        assert_eq!(s.node_count(), 1 + 5);
        s.remove("a/b/c/d");
        assert_eq!(s.node_count(), 1 + 3);
        s.remove("a/b");
        assert_eq!(s.node_count(), 1 + 2);
        s.remove("a/x");
        assert_eq!(s.node_count(), 1);
        // Removing an inner topic keeps the branch below it.
        s.insert("p/q/r", 4);
        s.insert("p", 5);
        s.remove("p");
        assert_eq!(s.node_count(), 1 + 3);
        assert_eq!(s.get("p/q/r"), Some(&4));
    }

    #[test]
    fn retain_purges_and_prunes() {
        let mut s = RetainedStore::new();
        for (i, t) in ["a", "a/b", "a/b/c", "x/y", "$SYS/z"].iter().enumerate() {
            s.insert(t, i as u32);
        }
        s.retain(|_, m| m % 2 == 0);
        assert_eq!(s.count(), 3);
        assert_eq!(s.get("a"), Some(&0));
        assert_eq!(s.get("a/b"), None);
        assert_eq!(s.get("a/b/c"), Some(&2));
        assert_eq!(s.get("x/y"), None);
        assert_eq!(s.get("$SYS/z"), Some(&4));
        assert_eq!(s.node_count(), 1 + 3 + 2);
        s.retain(|t, _| t != "a/b/c");
        assert_eq!(s.node_count(), 1 + 1 + 2);
        s.retain(|_, _| false);
        assert!(s.is_empty());
        assert_eq!(s.node_count(), 1);
    }

    #[test]
    fn filter_matching() {
        let mut s = RetainedStore::new();
        for (i, t) in ["a", "a/b", "a/", "/a", "$SYS/up", "$SYS", "b/c"]
            .iter()
            .enumerate()
        {
            s.insert(t, i as u32);
        }
        let topics =
            |f: &str| -> Vec<String> { matches_of(&s, f).into_iter().map(|(t, _)| t).collect() };
        assert_eq!(topics("#"), ["/a", "a", "a/", "a/b", "b/c"]);
        assert_eq!(topics("a/#"), ["a", "a/", "a/b"]);
        assert_eq!(topics("a/+"), ["a/", "a/b"]);
        assert_eq!(topics("+"), ["a"]);
        assert_eq!(topics("+/+"), ["/a", "a/", "a/b", "b/c"]);
        assert_eq!(topics("$SYS/#"), ["$SYS", "$SYS/up"]);
        assert_eq!(topics("$SYS/+"), ["$SYS/up"]);
        assert_eq!(topics("$share/g/a/#"), ["a", "a/", "a/b"]);
        assert_eq!(topics("$share/g/#").len(), 5);
    }

    #[test]
    fn deep_topics_do_not_recurse() {
        let deep = "/".repeat(60_000);
        let mut s = RetainedStore::new();
        s.insert(&deep, 1u32);
        assert_eq!(matches_of(&s, "#"), [(deep.clone(), 1)]);
        assert_eq!(matches_of(&s, &deep), [(deep.clone(), 1)]);
        s.retain(|_, _| false);
        assert_eq!(s.node_count(), 1);
        s.insert(&deep, 2);
        assert_eq!(s.remove(&deep), Some(2));
        assert_eq!(s.node_count(), 1);
        s.insert(&deep, 3);
        drop(s); // iterative drop of a 60 001-level chain
    }

    fn level() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["a", "b", "$x", ""])
    }

    fn topic_strategy() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..5)
            .prop_map(|levels| levels.join("/"))
            .prop_filter("non-empty", |s| !s.is_empty())
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

    #[derive(Debug, Clone)]
    enum Op {
        Insert(String, u32),
        Remove(String),
        Purge(u32),
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (topic_strategy(), 0u32..100).prop_map(|(t, m)| Op::Insert(t, m)),
            2 => topic_strategy().prop_map(Op::Remove),
            1 => (2u32..5).prop_map(Op::Purge),
        ]
    }

    proptest! {
        #[test]
        fn matches_model(
            ops in prop::collection::vec(op_strategy(), 0..60),
            filters in prop::collection::vec(filter_strategy(), 1..20),
        ) {
            let mut store = RetainedStore::weighed(|m: &u32| *m as usize);
            let mut model: HashMap<String, u32> = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(t, m) => {
                        prop_assert_eq!(store.insert(&t, m), model.insert(t, m));
                    }
                    Op::Remove(t) => {
                        prop_assert_eq!(store.remove(&t), model.remove(&t));
                    }
                    Op::Purge(d) => {
                        store.retain(|_, m| m % d != 0);
                        model.retain(|_, m| *m % d != 0);
                    }
                }
                prop_assert_eq!(store.count(), model.len());
                let bytes: usize = model.iter().map(|(t, m)| t.len() + *m as usize).sum();
                prop_assert_eq!(store.bytes(), bytes);
            }
            for (t, m) in &model {
                prop_assert_eq!(store.get(t), Some(m));
            }
            for f in &filters {
                let mut want: Vec<(String, u32)> = model
                    .iter()
                    .filter(|(t, _)| filter_matches(f, t))
                    .map(|(t, m)| (t.clone(), *m))
                    .collect();
                want.sort();
                prop_assert_eq!(matches_of(&store, f), want, "filter {}", f);
            }
            store.retain(|_, _| false);
            prop_assert!(store.is_empty());
            prop_assert_eq!(store.node_count(), 1);
        }
    }

    #[test]
    fn admits_checks_payload_count_and_bytes() {
        let limits = RetainLimits {
            max_messages: 2,
            max_bytes: 20,
            max_payload_size: 8,
        };
        let mut s = RetainedStore::weighed(|m: &u32| *m as usize);
        assert_eq!(
            s.admits("a", 9, &limits),
            Err(RetainRefusal::PayloadTooLarge)
        );
        assert_eq!(s.admits("a", 8, &limits), Ok(()));
        s.insert("a", 8);
        s.insert("b", 8);
        assert_eq!(s.bytes(), 18);
        // A third topic is one too many; replacing a held one is not.
        assert_eq!(
            s.admits("c", 1, &limits),
            Err(RetainRefusal::TooManyMessages)
        );
        assert_eq!(s.admits("b", 8, &limits), Ok(()));
        // Replacing counts the new size against the bytes, less the old.
        s.remove("b");
        s.insert("bb", 1);
        assert_eq!(s.bytes(), 9 + 3);
        assert_eq!(s.admits("bb", 8, &limits), Ok(()));
        s.insert("bb", 8);
        assert_eq!(s.admits("bb", 8, &limits), Ok(()));
        let tight = RetainLimits {
            max_bytes: 18,
            ..limits
        };
        assert_eq!(s.admits("bb", 8, &tight), Err(RetainRefusal::TooManyBytes));
        // Zero is no limit.
        let none = RetainLimits {
            max_messages: 0,
            max_bytes: 0,
            max_payload_size: 0,
        };
        assert_eq!(s.admits("z", usize::MAX / 2, &none), Ok(()));
        assert_eq!(
            RetainRefusal::TooManyBytes.setting(),
            "retainer.max_retained_bytes"
        );
    }
}
