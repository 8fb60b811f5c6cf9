//! Mosquitto's password file: `username:$7$iterations$salt$hash` (PBKDF2-HMAC-SHA512, as
//! `mosquitto_passwd` writes since 2.0) and the older `username:$6$salt$hash`
//! (SHA-512 over password then salt), salts and hashes in standard base64. A file made by
//! `mosquitto_passwd` loads unchanged, and `petrel passwd` writes `$7$` entries it reads.
//!
//! Verification is constant-time in the hash, and an unknown user costs the same PBKDF2 work
//! as a known one, so timing says nothing about which users exist.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ring::{digest, pbkdf2};

/// Mosquitto's defaults for new `$7$` entries.
const DEFAULT_ITERATIONS: u32 = 101;
const SALT_LEN: usize = 12;
const HASH_LEN: usize = 64;
/// A cap on the iteration count a file may ask for, so one line cannot make every login
/// cost seconds of CPU.
const MAX_ITERATIONS: u32 = 10_000_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PasswordFileError {
    #[error("line {line}: {message}")]
    Line { line: usize, message: String },
}

/// One stored password hash.
#[derive(Clone, PartialEq, Eq)]
pub enum PasswordHash {
    /// `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2 {
        iterations: NonZeroU32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    /// `$6$`: SHA-512(password || salt).
    Sha512 { salt: Vec<u8>, hash: Vec<u8> },
}

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pbkdf2 { iterations, .. } => write!(f, "Pbkdf2({iterations} iterations)"),
            Self::Sha512 { .. } => f.write_str("Sha512"),
        }
    }
}

impl PasswordHash {
    /// Parses the part after `username:`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = text.split('$');
        if parts.next() != Some("") {
            return Err("the hash must start with `$6$` or `$7$`".into());
        }
        let decode = |part: Option<&str>, what: &str| -> Result<Vec<u8>, String> {
            let part = part.ok_or_else(|| format!("missing {what}"))?;
            BASE64
                .decode(part)
                .map_err(|err| format!("{what} is not base64: {err}"))
        };
        let parsed = match parts.next() {
            Some("7") => {
                let iterations = parts
                    .next()
                    .and_then(|n| n.parse::<u32>().ok())
                    .filter(|&n| n <= MAX_ITERATIONS)
                    .and_then(NonZeroU32::new)
                    .ok_or_else(|| format!("the iteration count must be 1 to {MAX_ITERATIONS}"))?;
                let salt = decode(parts.next(), "salt")?;
                let hash = decode(parts.next(), "hash")?;
                Self::Pbkdf2 {
                    iterations,
                    salt,
                    hash,
                }
            }
            Some("6") => {
                let salt = decode(parts.next(), "salt")?;
                let hash = decode(parts.next(), "hash")?;
                Self::Sha512 { salt, hash }
            }
            _ => return Err("unknown hash type: only `$6$` and `$7$` are supported".into()),
        };
        if parts.next().is_some() {
            return Err("too many `$`-separated fields".into());
        }
        match &parsed {
            Self::Pbkdf2 { hash, .. } | Self::Sha512 { hash, .. } if hash.len() != HASH_LEN => Err(
                format!("the hash must be {HASH_LEN} bytes, not {}", hash.len()),
            ),
            _ => Ok(parsed),
        }
    }

    /// A new `$7$` hash with a random salt, as `mosquitto_passwd` makes.
    pub fn new_pbkdf2(password: &[u8]) -> Self {
        let mut salt = vec![0; SALT_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
            .expect("the operating system's random source is available");
        let iterations = NonZeroU32::new(DEFAULT_ITERATIONS).expect("a non-zero constant");
        let mut hash = vec![0; HASH_LEN];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA512,
            iterations,
            &salt,
            password,
            &mut hash,
        );
        Self::Pbkdf2 {
            iterations,
            salt,
            hash,
        }
    }

    /// Whether `password` matches, compared in constant time.
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            Self::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => pbkdf2::verify(
                pbkdf2::PBKDF2_HMAC_SHA512,
                *iterations,
                salt,
                password,
                hash,
            )
            .is_ok(),
            Self::Sha512 { salt, hash } => {
                let mut ctx = digest::Context::new(&digest::SHA512);
                ctx.update(password);
                ctx.update(salt);
                constant_time_eq(ctx.finish().as_ref(), hash)
            }
        }
    }
}

impl std::fmt::Display for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => write!(
                f,
                "$7${iterations}${}${}",
                BASE64.encode(salt),
                BASE64.encode(hash)
            ),
            Self::Sha512 { salt, hash } => {
                write!(f, "$6${}${}", BASE64.encode(salt), BASE64.encode(hash))
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The users of a password file, in file order.
#[derive(Debug, Clone, Default)]
pub struct PasswordFile {
    entries: Vec<(String, PasswordHash)>,
    index: HashMap<String, usize>,
    /// Verified against when the user is unknown, so that case costs the same.
    decoy: Option<PasswordHash>,
}

impl PasswordFile {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
        Self::parse(&text).map_err(|err| format!("{}: {err}", path.display()))
    }

    /// Blank lines and lines starting with `#` are skipped, as Mosquitto does.
    pub fn parse(text: &str) -> Result<Self, PasswordFileError> {
        let mut file = Self::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let error = |message: String| PasswordFileError::Line {
                line: n + 1,
                message,
            };
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| error("expected `username:hash`".into()))?;
            if user.is_empty() {
                return Err(error("empty username".into()));
            }
            let hash = PasswordHash::parse(hash).map_err(error)?;
            file.set(user, hash);
        }
        file.decoy = Some(PasswordHash::new_pbkdf2(b"decoy"));
        Ok(file)
    }

    /// Adds or replaces a user.
    pub fn set(&mut self, user: &str, hash: PasswordHash) {
        match self.index.get(user) {
            Some(&i) => self.entries[i].1 = hash,
            None => {
                self.index.insert(user.to_owned(), self.entries.len());
                self.entries.push((user.to_owned(), hash));
            }
        }
    }

    pub fn remove(&mut self, user: &str) -> bool {
        let Some(i) = self.index.remove(user) else {
            return false;
        };
        self.entries.remove(i);
        for slot in self.index.values_mut() {
            if *slot > i {
                *slot -= 1;
            }
        }
        true
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `user` exists and `password` is theirs. Unknown users cost a decoy check.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.index.get(user) {
            Some(&i) => self.entries[i].1.verify(password),
            None => {
                if let Some(decoy) = &self.decoy {
                    let _ = decoy.verify(password);
                }
                false
            }
        }
    }

    /// The file's text: one `username:hash` line per user.
    pub fn to_text(&self) -> String {
        self.entries
            .iter()
            .map(|(user, hash)| format!("{user}:{hash}\n"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by Debian's `mosquitto_passwd` 2.0.11 (`-c -b FILE alice secret`).
    const MOSQUITTO_7: &str = "alice:$7$101$8ir136lqBeYRR6Hc$ZOYyX/QplPXvYfRhlvrDF4P3fGruALo2hprckGgFwTTMBpSg/cOJrZXx9WRFC35/kpQoes/l9Sk8kHsmFtpFLg==\n";

    #[test]
    fn mosquitto_pbkdf2_entry_verifies() {
        let file = PasswordFile::parse(MOSQUITTO_7).unwrap();
        assert!(file.verify("alice", b"secret"));
        assert!(!file.verify("alice", b"Secret"));
        assert!(!file.verify("bob", b"secret"));
    }

    #[test]
    fn sha512_entry_verifies() {
        let salt = b"0123456789ab";
        let mut ctx = digest::Context::new(&digest::SHA512);
        ctx.update(b"pw");
        ctx.update(salt);
        let line = format!(
            "u:$6${}${}\n",
            BASE64.encode(salt),
            BASE64.encode(ctx.finish())
        );
        let file = PasswordFile::parse(&line).unwrap();
        assert!(file.verify("u", b"pw"));
        assert!(!file.verify("u", b"px"));
    }

    #[test]
    fn written_entries_read_back() {
        let mut file = PasswordFile::parse("# users\n\n").unwrap();
        file.set("a", PasswordHash::new_pbkdf2(b"one"));
        file.set("b", PasswordHash::new_pbkdf2(b"two"));
        file.set("a", PasswordHash::new_pbkdf2(b"three"));
        let again = PasswordFile::parse(&file.to_text()).unwrap();
        assert_eq!(again.len(), 2);
        assert!(again.verify("a", b"three"));
        assert!(!again.verify("a", b"one"));
        assert!(again.verify("b", b"two"));
        let mut again = again;
        assert!(again.remove("a"));
        assert!(!again.verify("a", b"three"));
        assert!(again.verify("b", b"two"));
    }

    #[test]
    fn bad_lines_name_the_line() {
        for (text, needle) in [
            ("alice\n", "username:hash"),
            (":$7$101$AAAA$AAAA\n", "empty username"),
            ("a:plain\n", "must start"),
            ("a:$5$x$y\n", "unknown hash type"),
            ("a:$7$0$AAAA$AAAA\n", "iteration count"),
            ("a:$7$101$!!$AAAA\n", "base64"),
            ("a:$7$101$AAAA$AAAA\n", "64 bytes"),
        ] {
            let err = PasswordFile::parse(&format!("# c\n{text}")).unwrap_err();
            let PasswordFileError::Line { line, message } = &err;
            assert_eq!(*line, 2, "{text}");
            assert!(message.contains(needle), "{text}: {message}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,200}") {
            let _ = PasswordFile::parse(&text);
        }
    }
}
