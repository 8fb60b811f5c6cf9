//! The store's binary record keys (`storage::record`) as JetStream KV keys, and back (pure,
//! no I/O).
//!
//! KV keys allow only `[-/_=.A-Za-z0-9]`, so every byte string goes in as a *token*: lowercase
//! hex, `-` for the empty string, or, past `HEX_MAX` bytes (the subject must stay well under
//! the NATS control-line limit, and a client picks its id and topics), `=` and the SHA-256 of
//! the bytes in hex; a record under a hashed token carries its binary key in the
//! `Petrel-Key` header (`KvKey::carried`). The layout:
//!
//! | record | KV key |
//! |---|---|
//! | `S`/`Q`/`P`/`I`/`W` of a client | `c.<client>.<kind>[.<rest>]` (one filter `c.<client>.>` takes them all) |
//! | the owner of a session | `c.<client>.o` (no record: the node that serves it) |
//! | `R` topic | `r.<topic>` |
//! | `D` key | `d.<node>.<rest>` (each node reloads its own delayed messages) |
//! | anything else (`V`) | `x.<key>` |

use crate::storage::record;

/// Byte strings longer than this are hashed into their token.
pub const HEX_MAX: usize = 256;

/// Kinds of records kept per client, after `c.<client>.`.
const CLIENT_KINDS: [u8; 5] = [
    record::SESSION,
    record::QUEUED,
    record::PACKET_ID,
    record::INBOUND,
    record::WILL,
];

/// A record's KV key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvKey {
    pub key: String,
    /// A token of it is hashed: the binary key travels in the `Petrel-Key` header.
    pub carried: bool,
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

/// The bytes of lowercase hex, or `None`.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let text = text.as_bytes();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.chunks_exact(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// One byte string as one KV key token; the flag says whether it was hashed.
pub fn token(bytes: &[u8]) -> (String, bool) {
    if bytes.is_empty() {
        return ("-".into(), false);
    }
    if bytes.len() <= HEX_MAX {
        return (hex(bytes), false);
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    (format!("={}", hex(digest.as_ref())), true)
}

/// The bytes of an unhashed token; `None` for a hashed or malformed one.
fn untoken(token: &str) -> Option<Vec<u8>> {
    match token {
        "-" => Some(Vec::new()),
        _ if token.starts_with('=') => None,
        _ => unhex(token).filter(|b| !b.is_empty()),
    }
}

/// The token of a client id (the `<client>` of `c.<client>.…`).
pub fn client_token(client_id: &[u8]) -> String {
    token(client_id).0
}

/// The KV key naming the node that owns a client's session.
pub fn owner_key(client_id: &[u8]) -> String {
    format!("c.{}.o", client_token(client_id))
}

/// The filter over every record (and the owner) of one client.
pub fn client_filter(client_id: &[u8]) -> String {
    format!("c.{}.>", client_token(client_id))
}

/// The filter over one node's delayed messages.
pub fn delayed_filter(node: &str) -> String {
    format!("d.{}.>", token(node.as_bytes()).0)
}

/// The client id and the rest of a per-client binary key, if it is one.
fn split_client(key: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&kind, body) = key.split_first()?;
    if kind == record::SESSION {
        return Some((kind, body, &[]));
    }
    if !CLIENT_KINDS.contains(&kind) || body.len() < 2 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let body = &body[2..];
    (body.len() >= len).then(|| (kind, &body[..len], &body[len..]))
}

/// The KV key of a binary record key written by `node`.
pub fn to_kv(key: &[u8], node: &str) -> KvKey {
    let join = |parts: &[(String, bool)], head: &str| KvKey {
        key: std::iter::once(head.to_owned())
            .chain(parts.iter().map(|(t, _)| t.clone()))
            .collect::<Vec<_>>()
            .join("."),
        carried: parts.iter().any(|(_, hashed)| *hashed),
    };
    if let Some((kind, client, rest)) = split_client(key) {
        let mut parts = vec![token(client), (char::from(kind).to_string(), false)];
        if !rest.is_empty() {
            parts.push(token(rest));
        }
        return join(&parts, "c");
    }
    match key.split_first() {
        Some((&record::RETAINED, topic)) => join(&[token(topic)], "r"),
        Some((&record::DELAYED, rest)) => join(&[token(node.as_bytes()), token(rest)], "d"),
        _ => join(&[token(key)], "x"),
    }
}

/// The binary record key of a KV key; `carried` is the `Petrel-Key` header's, which a key
/// with a hashed token needs. `None`: not a record (an owner key) or not one of ours.
pub fn from_kv(kv_key: &str, carried: Option<&[u8]>) -> Option<Vec<u8>> {
    let tokens: Vec<&str> = kv_key.split('.').collect();
    if tokens.iter().skip(1).any(|t| t.starts_with('=')) {
        // Checked against the key it claims, so that a stray header cannot misplace a record.
        let carried = carried?;
        let node_token = (tokens[0] == "d").then(|| tokens[1]);
        return matches_key(carried, kv_key, node_token).then(|| carried.to_vec());
    }
    let mut key = Vec::new();
    match tokens.as_slice() {
        ["c", client, kind, rest @ ..] => {
            let client = untoken(client)?;
            let &[kind] = kind.as_bytes() else {
                return None;
            };
            if !CLIENT_KINDS.contains(&kind) {
                return None;
            }
            let rest = match rest {
                [] => Vec::new(),
                [rest] => untoken(rest).filter(|r| !r.is_empty())?,
                _ => return None,
            };
            key.push(kind);
            if kind == record::SESSION {
                if !rest.is_empty() {
                    return None;
                }
            } else {
                key.extend_from_slice(&u16::try_from(client.len()).ok()?.to_be_bytes());
            }
            key.extend_from_slice(&client);
            key.extend_from_slice(&rest);
        }
        ["r", topic] => {
            key.push(record::RETAINED);
            key.extend(untoken(topic)?);
        }
        ["d", node, rest] => {
            untoken(node)?;
            key.push(record::DELAYED);
            key.extend(untoken(rest)?);
        }
        ["x", whole] => key = untoken(whole)?,
        _ => return None,
    }
    // Only the canonical form: one record, one KV key.
    let node_token = (tokens[0] == "d").then(|| tokens[1]);
    matches_key(&key, kv_key, node_token).then_some(key)
}

/// Whether `key`, written by the node whose token is `node_token` (delayed records), has
/// the KV key `kv_key`.
fn matches_key(key: &[u8], kv_key: &str, node_token: Option<&str>) -> bool {
    let mapped = match node_token {
        None => to_kv(key, "").key,
        Some(node_token) => {
            // The node's name is only known by its token here: map with a stand-in and put
            // the real token back.
            let mapped = to_kv(key, "");
            match mapped.key.strip_prefix("d.-.") {
                Some(rest) => format!("d.{node_token}.{rest}"),
                None => return false,
            }
        }
    };
    mapped == kv_key
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn valid_kv_key(key: &str) -> bool {
        !key.is_empty()
            && !key.starts_with('.')
            && !key.ends_with('.')
            && !key.contains("..")
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b))
    }

    fn round_trip(key: &[u8], node: &str) {
        let kv = to_kv(key, node);
        assert!(valid_kv_key(&kv.key), "{:?} -> {:?}", key, kv.key);
        assert!(kv.key.len() < 1200, "{} chars", kv.key.len());
        let carried = kv.carried.then_some(key);
        assert_eq!(
            from_kv(&kv.key, carried).as_deref(),
            Some(key),
            "{:?}",
            kv.key
        );
    }

    #[test]
    fn layout() {
        let node = "n1";
        assert_eq!(to_kv(&record::session_key("ab"), node).key, "c.6162.S");
        assert_eq!(
            to_kv(&record::queued_key("ab", 1), node).key,
            "c.6162.Q.0000000000000001"
        );
        assert_eq!(to_kv(&record::will_key("ab"), node).key, "c.6162.W");
        assert_eq!(to_kv(&record::retained_key("a/b"), node).key, "r.612f62");
        assert_eq!(
            to_kv(&record::delayed_key(7), node).key,
            "d.6e31.0000000000000007"
        );
        assert_eq!(to_kv(record::META, node).key, "x.56");
        assert_eq!(owner_key(b"ab"), "c.6162.o");
        assert_eq!(from_kv("c.6162.o", None), None);
        for prefix in record::client_prefixes("ab") {
            assert!(to_kv(&prefix, node).key.starts_with("c.6162."));
        }
    }

    #[test]
    fn long_ids_and_topics_are_hashed_and_carried() {
        let long = "x".repeat(5000);
        for key in [
            record::session_key(&long),
            record::queued_key(&long, 3),
            record::retained_key(&long),
        ] {
            let kv = to_kv(&key, "n");
            assert!(kv.carried);
            round_trip(&key, "n");
            assert_eq!(
                from_kv(&kv.key, None),
                None,
                "a hashed key needs its header"
            );
            assert_eq!(
                from_kv(&kv.key, Some(b"Rother")),
                None,
                "a header must match"
            );
        }
        assert!(to_kv(&record::queued_key(&long, 3), "n")
            .key
            .starts_with(&format!("c.{}.", client_token(long.as_bytes()))));
    }

    #[test]
    fn foreign_keys_are_refused() {
        for key in [
            "c.zz.S",
            "c.61.S.01",
            "c.61.Z",
            "r.",
            "r.6",
            "q.61",
            "c.61",
            "r.00.00",
        ] {
            assert_eq!(from_kv(key, None), None, "{key}");
        }
        // Not canonical: `-` is the only form of the empty string.
        assert_eq!(from_kv("x.", None), None);
    }

    proptest! {
        #[test]
        fn any_key_round_trips(
            key in proptest::collection::vec(any::<u8>(), 0..400),
            node in "[a-z@0-9.-]{0,300}",
        ) {
            round_trip(&key, &node);
        }

        #[test]
        fn record_keys_round_trip(
            client in "\\PC{0,300}",
            topic in "\\PC{1,300}",
            seq in any::<u64>(),
            flow in any::<u64>(),
            id in any::<u16>(),
            node in "[a-z0-9@]{1,20}",
        ) {
            for key in [
                record::session_key(&client),
                record::queued_key(&client, seq),
                record::sent_key(&client, seq),
                record::inbound_key(&client, flow, crate::codec::PacketId(id)),
                record::will_key(&client),
                record::retained_key(&topic),
                record::delayed_key(seq),
            ] {
                round_trip(&key, &node);
            }
            // Every record of a client is under its filter.
            let filter = client_filter(client.as_bytes());
            let stem = filter.trim_end_matches('>');
            for key in [record::session_key(&client), record::queued_key(&client, seq)] {
                prop_assert!(to_kv(&key, &node).key.starts_with(stem));
            }
        }
    }
}
