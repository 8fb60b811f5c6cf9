//! Authentication and authorization, with Mosquitto's names and file formats so its users'
//! files load unchanged: `password_file` (`mosquitto_passwd`), `acl_file`, `allow_anonymous`.
//!
//! Secure by default, like Mosquitto 2.0: with no `allow_anonymous` set and no password file,
//! clients without a username are accepted from loopback addresses only; a remote one gets
//! CONNACK 0x87 (5.0) / 0x05 (3.1.1). With a password file, anonymous clients are refused
//! unless `allow_anonymous = true`. A client whose username the listener took from its
//! certificate (`peer_cert_as_username`) is authenticated by that certificate.
//!
//! [`AuthService`] holds the loaded rules behind a lock that only a reload writes; SIGHUP
//! reloads both files, and a file that fails to load keeps the old rules and says why.
//! This module reads files and nothing else: no sockets, no tasks.

pub mod acl;
pub mod banned;
pub mod cache;
pub mod password;
pub mod scram;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::Deserialize;

use crate::codec::ReasonCode;
use crate::core::access::{Access, Authorizer};
use acl::AclFile;
use password::PasswordFile;

/// The `[auth]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// A file in Mosquitto's password file format (`mosquitto_passwd`, `petrel passwd`).
    pub password_file: Option<PathBuf>,
    /// A file in Mosquitto's ACL format. Without one, every authenticated client may publish
    /// and subscribe to anything but `$SYS`.
    pub acl_file: Option<PathBuf>,
    /// Clients without a username: `true` accepted from anywhere, `false` refused; unset,
    /// accepted from loopback only when no password file is configured, refused otherwise.
    pub allow_anonymous: Option<bool>,
}

/// Who is connecting, as the listener saw it.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    pub peer: SocketAddr,
    /// The username came from a verified client certificate.
    pub certified: bool,
}

/// Why a CONNECT was refused; each maps to its CONNACK reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No username, and anonymous access is off (or this client is not on loopback).
    AnonymousNotAllowed,
    BadCredentials,
    /// On the banned list.
    Banned,
}

impl Refusal {
    pub fn reason_code(self) -> ReasonCode {
        match self {
            Self::AnonymousNotAllowed => ReasonCode::NOT_AUTHORIZED,
            Self::BadCredentials => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            Self::Banned => ReasonCode::BANNED,
        }
    }
}

/// The rules in force: what the files said at the last (re)load.
#[derive(Debug, Default)]
struct Rules {
    passwords: Option<PasswordFile>,
    acl: Option<AclFile>,
}

impl Rules {
    fn load(settings: &AuthSettings) -> Result<Self, String> {
        Ok(Self {
            passwords: settings
                .password_file
                .as_deref()
                .map(PasswordFile::load)
                .transpose()?,
            acl: settings
                .acl_file
                .as_deref()
                .map(AclFile::load)
                .transpose()?,
        })
    }
}

/// Authentication and authorization for the whole broker.
#[derive(Debug)]
pub struct AuthService {
    settings: AuthSettings,
    rules: RwLock<Arc<Rules>>,
    generation: AtomicU64,
    banned: banned::Banned,
}

impl Default for AuthService {
    fn default() -> Self {
        Self {
            settings: AuthSettings::default(),
            rules: RwLock::new(Arc::new(Rules::default())),
            generation: AtomicU64::new(0),
            banned: banned::Banned::default(),
        }
    }
}

impl AuthService {
    /// Loads the configured files; an error names the file and the line.
    pub fn load(settings: &AuthSettings) -> Result<Self, String> {
        Ok(Self {
            settings: settings.clone(),
            rules: RwLock::new(Arc::new(Rules::load(settings)?)),
            generation: AtomicU64::new(0),
            banned: banned::Banned::default(),
        })
    }

    /// Reads the files again. On error the old rules stay in force.
    pub fn reload(&self) -> Result<(), String> {
        let rules = Rules::load(&self.settings)?;
        *self.rules.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(rules);
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    fn rules(&self) -> Arc<Rules> {
        Arc::clone(&self.rules.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// One line for the start-up log.
    pub fn describe(&self) -> String {
        let rules = self.rules();
        let anonymous = match self.anonymous_policy(&rules) {
            Anonymous::Everywhere => "anonymous allowed",
            Anonymous::LoopbackOnly => {
                "anonymous from loopback only (set auth.allow_anonymous or auth.password_file)"
            }
            Anonymous::Never => "anonymous refused",
        };
        let passwords = match &rules.passwords {
            Some(file) => format!("password file with {} users", file.len()),
            None => "no password file".into(),
        };
        let acl = match &rules.acl {
            Some(acl) => format!("ACL file with {} rules", acl.rule_count()),
            None => "no ACL (all topics but $SYS)".into(),
        };
        format!("{passwords}, {anonymous}, {acl}")
    }

    fn anonymous_policy(&self, rules: &Rules) -> Anonymous {
        match self.settings.allow_anonymous {
            Some(true) => Anonymous::Everywhere,
            Some(false) => Anonymous::Never,
            None if rules.passwords.is_some() => Anonymous::Never,
            None => Anonymous::LoopbackOnly,
        }
    }

    /// The service with this banned list (by default an empty one in memory).
    pub fn with_banned(mut self, banned: banned::Banned) -> Self {
        self.banned = banned;
        self
    }

    pub fn banned(&self) -> &banned::Banned {
        &self.banned
    }

    /// Decides a CONNECT.
    pub fn authenticate(&self, credentials: &Credentials<'_>) -> Result<(), Refusal> {
        let rules = self.rules();
        if credentials.certified {
            return Ok(());
        }
        let Some(username) = credentials.username else {
            return match self.anonymous_policy(&rules) {
                Anonymous::Everywhere => Ok(()),
                Anonymous::LoopbackOnly if is_loopback(credentials.peer.ip()) => Ok(()),
                _ => Err(Refusal::AnonymousNotAllowed),
            };
        };
        match &rules.passwords {
            Some(file) => {
                let password = credentials.password.unwrap_or_default();
                if file.verify(username, password) {
                    Ok(())
                } else {
                    Err(Refusal::BadCredentials)
                }
            }
            // No password file: a username is only a name, as in Mosquitto; the anonymous
            // policy still decides who may connect.
            None => match self.anonymous_policy(&rules) {
                Anonymous::Everywhere => Ok(()),
                Anonymous::LoopbackOnly if is_loopback(credentials.peer.ip()) => Ok(()),
                _ => Err(Refusal::AnonymousNotAllowed),
            },
        }
    }

    /// SCRAM-SHA-256 keys for `username` from the password file, and whether they are
    /// real (mock keys for a user without a `$scram-sha-256$` line: the exchange then fails
    /// as a wrong password does); `None` without a password file.
    pub fn scram_keys(&self, username: &str) -> Option<(scram::ScramKeys, bool)> {
        self.rules()
            .passwords
            .as_ref()
            .map(|file| file.scram_keys(username))
    }

    /// Whether a password file is in force.
    pub fn has_passwords(&self) -> bool {
        self.rules().passwords.is_some()
    }

    /// Whether an ACL file is in force (connections then check every topic).
    pub fn has_acl(&self) -> bool {
        self.rules().acl.is_some()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Anonymous {
    Everywhere,
    LoopbackOnly,
    Never,
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

impl Authorizer for AuthService {
    fn allows(&self, client_id: &str, username: Option<&str>, access: Access, topic: &str) -> bool {
        match &self.rules().acl {
            Some(acl) => acl.allows(client_id, username, access, topic),
            None => true,
        }
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds<'a>(
        username: Option<&'a str>,
        password: Option<&'a [u8]>,
        peer: &str,
    ) -> Credentials<'a> {
        Credentials {
            client_id: "c",
            username,
            password,
            peer: peer.parse().unwrap(),
            certified: false,
        }
    }

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("petrel-auth-{}-{name}", std::process::id()));
        std::fs::write(&dir, text).unwrap();
        dir
    }

    #[test]
    fn default_allows_anonymous_from_loopback_only() {
        let auth = AuthService::default();
        assert_eq!(auth.authenticate(&creds(None, None, "127.0.0.1:1")), Ok(()));
        assert_eq!(auth.authenticate(&creds(None, None, "[::1]:1")), Ok(()));
        assert_eq!(
            auth.authenticate(&creds(None, None, "[::ffff:127.0.0.1]:1")),
            Ok(())
        );
        assert_eq!(
            auth.authenticate(&creds(None, None, "192.0.2.7:1")),
            Err(Refusal::AnonymousNotAllowed)
        );
        assert_eq!(
            auth.authenticate(&creds(Some("u"), Some(b"p"), "192.0.2.7:1")),
            Err(Refusal::AnonymousNotAllowed)
        );
    }

    #[test]
    fn password_file_checks_users_and_refuses_anonymous() {
        let mut file = PasswordFile::default();
        file.set("alice", password::PasswordHash::new_pbkdf2(b"secret"));
        let path = temp_file("pw", &file.to_text());
        let settings = AuthSettings {
            password_file: Some(path.clone()),
            ..AuthSettings::default()
        };
        let auth = AuthService::load(&settings).unwrap();
        assert_eq!(
            auth.authenticate(&creds(Some("alice"), Some(b"secret"), "192.0.2.7:1")),
            Ok(())
        );
        assert_eq!(
            auth.authenticate(&creds(Some("alice"), Some(b"nope"), "127.0.0.1:1")),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            auth.authenticate(&creds(Some("eve"), Some(b"secret"), "127.0.0.1:1")),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            auth.authenticate(&creds(None, None, "127.0.0.1:1")),
            Err(Refusal::AnonymousNotAllowed)
        );

        // A bad file on reload keeps the old rules.
        std::fs::write(&path, "alice\n").unwrap();
        let err = auth.reload().unwrap_err();
        assert!(err.contains("line 1"), "{err}");
        assert_eq!(
            auth.authenticate(&creds(Some("alice"), Some(b"secret"), "127.0.0.1:1")),
            Ok(())
        );
        assert_eq!(auth.generation(), 0);
        // A good one replaces them.
        let mut file = PasswordFile::default();
        file.set("alice", password::PasswordHash::new_pbkdf2(b"changed"));
        std::fs::write(&path, file.to_text()).unwrap();
        auth.reload().unwrap();
        assert_eq!(auth.generation(), 1);
        assert_eq!(
            auth.authenticate(&creds(Some("alice"), Some(b"secret"), "127.0.0.1:1")),
            Err(Refusal::BadCredentials)
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn allow_anonymous_overrides_the_default() {
        let open = AuthService::load(&AuthSettings {
            allow_anonymous: Some(true),
            ..AuthSettings::default()
        })
        .unwrap();
        assert_eq!(open.authenticate(&creds(None, None, "192.0.2.7:1")), Ok(()));
        let closed = AuthService::load(&AuthSettings {
            allow_anonymous: Some(false),
            ..AuthSettings::default()
        })
        .unwrap();
        assert_eq!(
            closed.authenticate(&creds(None, None, "127.0.0.1:1")),
            Err(Refusal::AnonymousNotAllowed)
        );
        let mut certified = creds(Some("cn"), None, "192.0.2.7:1");
        certified.certified = true;
        assert_eq!(closed.authenticate(&certified), Ok(()));
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let err = AuthService::load(&AuthSettings {
            acl_file: Some("/nonexistent/acl".into()),
            ..AuthSettings::default()
        })
        .unwrap_err();
        assert!(err.contains("/nonexistent/acl"), "{err}");
    }
}
