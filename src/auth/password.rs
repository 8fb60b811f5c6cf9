//! Mosquitto's password file: `username:$7$iterations$salt$hash` (PBKDF2-HMAC-SHA512, as
//! `mosquitto_passwd` writes since 2.0) and the older `username:$6$salt$hash`
//! (SHA-512 over password then salt), salts and hashes in standard base64. A file made by
//! `mosquitto_passwd` loads unchanged, and `petrel passwd` writes `$7$` entries it reads.
//!
//! Two more line forms, which `petrel passwd --hash` writes:
//! - `username:$argon2id$v=19$m=…,t=…,p=…$salt$hash`, the PHC string of argon2id (the form
//!   libargon2 writes; Mosquitto 2.0 does not read it);
//! - `username:$scram-sha-256$iterations$salt$StoredKey$ServerKey` (Petrel only; RFC 5802's
//!   stored keys, base64), the only form a SCRAM-SHA-256 exchange can use
//!   ([`super::scram`]); it verifies plain CONNECT passwords too.
//!
//! Verification is constant-time in the hash, and an unknown user costs the same hash work
//! as a known one (a check against some user's hash), so timing says nothing about which
//! users exist. A SCRAM exchange for a
//! user without a SCRAM line gets mock keys ([`PasswordFile::scram_keys`]).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ring::{digest, pbkdf2};

use super::scram::{self, ScramKeys};

/// Mosquitto's defaults for new `$7$` entries.
const DEFAULT_ITERATIONS: u32 = 101;
const SALT_LEN: usize = 12;
const HASH_LEN: usize = 64;
// A cap on the iteration count a file may ask for, so one line cannot make every login
// cost seconds of CPU (the same for every hash kind).
use super::scram::{parse_iterations, MAX_ITERATIONS};

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
    /// `$argon2id$…`: the PHC string, checked for syntax and cost when loaded.
    Argon2id(String),
    /// `$scram-sha-256$…`: SCRAM-SHA-256's stored keys.
    Scram(ScramKeys),
}

/// Which hash `petrel passwd` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HashKind {
    /// `$7$`, PBKDF2-HMAC-SHA512: Mosquitto reads it too.
    #[default]
    Pbkdf2,
    /// `$argon2id$` (Mosquitto 2.0 does not read it).
    Argon2id,
    /// `$scram-sha-256$` (Petrel only): SCRAM-SHA-256 enhanced authentication and plain
    /// passwords.
    ScramSha256,
}

impl std::str::FromStr for HashKind {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "pbkdf2" | "sha512-pbkdf2" | "7" => Ok(Self::Pbkdf2),
            "argon2id" => Ok(Self::Argon2id),
            "scram-sha-256" | "SCRAM-SHA-256" => Ok(Self::ScramSha256),
            _ => Err(format!(
                "unknown hash `{text}`: pbkdf2, argon2id or scram-sha-256"
            )),
        }
    }
}

/// Ceilings on the argon2id cost a file may ask for, so one line cannot make every login
/// take a gigabyte or a minute.
const ARGON2_MAX_MEMORY_KIB: u32 = 256 * 1024;
const ARGON2_MAX_TIME: u32 = 64;
const ARGON2_MAX_LANES: u32 = 16;

fn parse_argon2id(text: &str) -> Result<String, String> {
    let parsed =
        argon2::PasswordHash::new(text).map_err(|err| format!("bad argon2id hash: {err}"))?;
    if parsed.algorithm != argon2::Algorithm::Argon2id.ident() {
        return Err("only argon2id is supported among the argon2 variants".into());
    }
    let params = argon2::Params::try_from(&parsed)
        .map_err(|err| format!("bad argon2id parameters: {err}"))?;
    if params.m_cost() > ARGON2_MAX_MEMORY_KIB
        || params.t_cost() > ARGON2_MAX_TIME
        || params.p_cost() > ARGON2_MAX_LANES
    {
        return Err(format!(
            "argon2id cost too high: at most m={ARGON2_MAX_MEMORY_KIB} (KiB), t={ARGON2_MAX_TIME}, p={ARGON2_MAX_LANES}"
        ));
    }
    if parsed.hash.is_none() {
        return Err("argon2id string without a hash".into());
    }
    Ok(text.to_owned())
}

fn random_salt(len: usize) -> Vec<u8> {
    let mut salt = vec![0; len];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .expect("the operating system's random source is available");
    salt
}

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pbkdf2 { iterations, .. } => write!(f, "Pbkdf2({iterations} iterations)"),
            Self::Sha512 { .. } => f.write_str("Sha512"),
            Self::Argon2id(_) => f.write_str("Argon2id"),
            Self::Scram(keys) => write!(f, "Scram({} iterations)", keys.iterations),
        }
    }
}

impl PasswordHash {
    /// Parses the part after `username:`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = text.split('$');
        if parts.next() != Some("") {
            return Err(
                "the hash must start with `$6$`, `$7$`, `$argon2id$` or `$scram-sha-256$`".into(),
            );
        }
        let decode = |part: Option<&str>, what: &str| -> Result<Vec<u8>, String> {
            let part = part.ok_or_else(|| format!("missing {what}"))?;
            BASE64
                .decode(part)
                .map_err(|err| format!("{what} is not base64: {err}"))
        };
        let parsed = match parts.next() {
            Some("7") => {
                let iterations = parse_iterations(parts.next())
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
            Some("argon2id") => return parse_argon2id(text).map(Self::Argon2id),
            Some("scram-sha-256") => return ScramKeys::parse_fields(parts).map(Self::Scram),
            _ => return Err(
                "unknown hash type: `$6$`, `$7$`, `$argon2id$` and `$scram-sha-256$` are supported"
                    .into(),
            ),
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

    /// A new hash of `kind` with a random salt.
    pub fn new(kind: HashKind, password: &[u8]) -> Self {
        match kind {
            HashKind::Pbkdf2 => Self::new_pbkdf2(password),
            HashKind::Argon2id => Self::new_argon2id(password),
            HashKind::ScramSha256 => Self::new_scram(password),
        }
    }

    /// A new argon2id hash with the argon2 crate's defaults (OWASP's m=19 MiB, t=2, p=1).
    pub fn new_argon2id(password: &[u8]) -> Self {
        use argon2::password_hash::{PasswordHasher as _, SaltString};
        let salt = SaltString::encode_b64(&random_salt(16)).expect("16 bytes fit a salt");
        let hash = argon2::Argon2::default()
            .hash_password(password, &salt)
            .expect("the default parameters are valid");
        Self::Argon2id(hash.to_string())
    }

    /// New SCRAM-SHA-256 stored keys (4096 iterations, RFC 7677's minimum).
    pub fn new_scram(password: &[u8]) -> Self {
        let iterations = NonZeroU32::new(scram::DEFAULT_ITERATIONS).expect("a non-zero constant");
        Self::Scram(ScramKeys::derive(
            password,
            random_salt(scram::SALT_LEN),
            iterations,
        ))
    }

    /// A new `$7$` hash with a random salt, as `mosquitto_passwd` makes.
    pub fn new_pbkdf2(password: &[u8]) -> Self {
        let salt = random_salt(SALT_LEN);
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
                scram::constant_time_eq(ctx.finish().as_ref(), hash)
            }
            Self::Argon2id(text) => {
                use argon2::password_hash::PasswordVerifier as _;
                // Checked when loaded; a failure here is a mismatch all the same.
                argon2::PasswordHash::new(text).is_ok_and(|parsed| {
                    argon2::Argon2::default()
                        .verify_password(password, &parsed)
                        .is_ok()
                })
            }
            Self::Scram(keys) => keys.verify_password(password),
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
            Self::Argon2id(text) => f.write_str(text),
            Self::Scram(keys) => f.write_str(&keys.to_line()),
        }
    }
}

/// The users of a password file, in file order.
#[derive(Debug, Clone, Default)]
pub struct PasswordFile {
    entries: Vec<(String, PasswordHash)>,
    index: HashMap<String, usize>,
    /// Verified against when the user is unknown, so that case costs the same.
    decoy: Option<PasswordHash>,
    /// The key of SCRAM's mock salts: a hash of the file's text, so a mock user's salt stays
    /// the same while the file does and cannot be computed without the file.
    mock_secret: [u8; 32],
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
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(b"petrel scram mock salt\n");
        ctx.update(text.as_bytes());
        file.mock_secret.copy_from_slice(ctx.finish().as_ref());
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

    /// Whether `user` exists and `password` is theirs. An unknown user costs a check against
    /// some user's hash (picked by a keyed hash of the name, the answer ignored), so with
    /// several hash kinds in one file (`$7$`, argon2id, SCRAM) the time still looks like a
    /// real user's; an empty file checks a decoy.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        if let Some(&i) = self.index.get(user) {
            return self.entries[i].1.verify(password);
        }
        if !self.entries.is_empty() {
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.mock_secret);
            let tag = ring::hmac::sign(&key, user.as_bytes());
            let mut pick = [0u8; 8];
            pick.copy_from_slice(&tag.as_ref()[..8]);
            let i = (u64::from_le_bytes(pick) % self.entries.len() as u64) as usize;
            let _ = self.entries[i].1.verify(password);
        } else if let Some(decoy) = &self.decoy {
            let _ = decoy.verify(password);
        }
        false
    }

    /// The SCRAM-SHA-256 keys of `user`, and whether they are real: a user without a
    /// `$scram-sha-256$` line, or none at all, gets mock keys (the same each time), so the
    /// exchange fails the way a wrong password does.
    pub fn scram_keys(&self, user: &str) -> (ScramKeys, bool) {
        match self.index.get(user).map(|&i| &self.entries[i].1) {
            Some(PasswordHash::Scram(keys)) => (keys.clone(), true),
            _ => (ScramKeys::mock(&self.mock_secret, user), false),
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

    /// Written by libargon2's `argon2` tool (Debian's `argon2` package):
    /// `echo -n secret | argon2 somesaltsalt -id -t 2 -m 12 -p 1 -e`.
    const ARGON2ID: &str =
        "$argon2id$v=19$m=4096,t=2,p=1$c29tZXNhbHRzYWx0$sEn/ACjRGd0PpV+ePykwrOQg2kBZ0K9LA8J3UleojG0";

    #[test]
    fn mosquitto_file_with_an_argon2id_line_loads() {
        let text = format!("{MOSQUITTO_7}bob:{ARGON2ID}\n");
        let file = PasswordFile::parse(&text).unwrap();
        assert_eq!(file.len(), 2);
        assert!(file.verify("alice", b"secret"));
        assert!(file.verify("bob", b"secret"));
        assert!(!file.verify("bob", b"Secret"));
        // And it is written back unchanged.
        assert_eq!(file.to_text(), text);
    }

    #[test]
    fn new_hashes_of_every_kind_verify() {
        for kind in [HashKind::Pbkdf2, HashKind::Argon2id, HashKind::ScramSha256] {
            let hash = PasswordHash::new(kind, b"pw");
            let line = format!("u:{hash}\n");
            let file = PasswordFile::parse(&line).unwrap();
            assert!(file.verify("u", b"pw"), "{kind:?}");
            assert!(!file.verify("u", b"px"), "{kind:?}");
        }
        assert_eq!("argon2id".parse(), Ok(HashKind::Argon2id));
        assert_eq!("scram-sha-256".parse(), Ok(HashKind::ScramSha256));
        assert!("md5".parse::<HashKind>().is_err());
    }

    #[test]
    fn scram_keys_are_real_only_for_scram_lines() {
        let mut file = PasswordFile::parse("").unwrap();
        file.set("s", PasswordHash::new_scram(b"pw"));
        file.set("p", PasswordHash::new_pbkdf2(b"pw"));
        let file = PasswordFile::parse(&file.to_text()).unwrap();
        let (keys, real) = file.scram_keys("s");
        assert!(real && keys.verify_password(b"pw"));
        for user in ["p", "nobody"] {
            let (mock, real) = file.scram_keys(user);
            assert!(!real);
            assert_eq!(mock, file.scram_keys(user).0, "the same every time");
            assert_eq!(mock.salt.len(), keys.salt.len(), "looks like a real one");
            assert_eq!(mock.iterations, keys.iterations);
        }
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
            ("a:$argon2i$v=19$m=4096,t=2,p=1$c29tZXNhbHQ$AAAAAAAAAAAAAAAAAAAAAA\n", "unknown hash type"),
            ("a:$argon2id$v=19$m=4096,t=2$!!\n", "argon2id"),
            ("a:$argon2id$v=19$m=2097152,t=2,p=1$c29tZXNhbHRzYWx0$sEn/ACjRGd0PpV+ePykwrOQg2kBZ0K9LA8J3UleojG0\n", "cost too high"),
            ("a:$scram-sha-256$4096$AAAA$AAAA$AAAA\n", "32 bytes"),
            ("a:$scram-sha-256$0$AAAA\n", "iteration count"),
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
