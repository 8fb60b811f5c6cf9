//! Authentication and authorization, with Mosquitto's names and file formats so its users'
//! files load unchanged: `password_file` (`mosquitto_passwd`), `acl_file`, `allow_anonymous`.
//!
//! Secure by default, like Mosquitto 2.0: with no `allow_anonymous` set and no password file,
//! clients without a username are accepted from loopback addresses only; a remote one gets
//! CONNACK 0x87 (5.0) / 0x05 (3.1.1). With a password file, anonymous clients are refused
//! unless `allow_anonymous = true`. A client whose username the listener took from its
//! certificate (`peer_cert_as_username`) is authenticated by that certificate.
//!
//! Beyond Mosquitto, EMQX's authentication chain (`chain`): `[[auth.authentication]]`
//! entries — a password file (`built_in_database`), JWT (`jwt`), an HTTP service (`http`) —
//! tried in order after `password_file`; each allows, denies or passes on. When all pass, a
//! client that presented a username or password is refused (0x86) once any source is
//! configured, and one that presented neither falls to the anonymous policy. A source may
//! hand out per-client ACL rules (a JWT's `acl` claim), checked before the ACL file.
//!
//! [`AuthService`] holds the loaded rules behind a lock that only a reload writes; SIGHUP
//! reloads every file (password files, ACL file, JWT keys), and a file that fails to load
//! keeps the old rules and says why. Only the HTTP source (`http`) has sockets and tasks.

pub mod acl;
pub mod banned;
pub mod cache;
pub mod chain;
pub mod client_acl;
pub mod http;
mod http_connect;
pub mod jwks;
pub mod jwt;
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
pub use chain::Grant;
use chain::{Source, SourceKind};
use client_acl::ClientAcl;
use http::HttpAuth;

/// The `[auth]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// A file in Mosquitto's password file format (`mosquitto_passwd`, `petrel passwd`).
    pub password_file: Option<PathBuf>,
    /// A file in Mosquitto's ACL format. Without one, every authenticated client may publish
    /// and subscribe to anything but `$SYS`.
    pub acl_file: Option<PathBuf>,
    /// Clients without a username: `true` accepted from anywhere, `false` refused; unset,
    /// accepted from loopback only when no authentication source (password file or
    /// `[[auth.authentication]]` entry) is configured, refused otherwise.
    pub allow_anonymous: Option<bool>,
    /// `[[auth.authentication]]`: EMQX's chain, tried in order after `password_file`.
    pub authentication: Vec<chain::SourceSettings>,
    /// How long a password a password file verified is remembered (`cache`), so that a
    /// reconnecting fleet does not pay the hash for every client; `0s` turns it off.
    #[serde(deserialize_with = "crate::duration::deserialize")]
    pub cache_ttl: std::time::Duration,
    /// Users remembered at most, per password file.
    pub cache_max_size: usize,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            password_file: None,
            acl_file: None,
            allow_anonymous: None,
            authentication: Vec::new(),
            cache_ttl: cache::DEFAULT_TTL,
            cache_max_size: cache::DEFAULT_MAX_SIZE,
        }
    }
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
    /// The listener, EMQX's `${listener}` (`tcp:default`).
    pub listener: &'a str,
    /// The wall clock, in seconds since the Unix epoch (JWT `exp` and `nbf`).
    pub now_unix: u64,
}

/// Why a CONNECT was refused; each maps to its CONNACK reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No username, and anonymous access is off (or this client is not on loopback).
    AnonymousNotAllowed,
    BadCredentials,
    /// An authentication source refused the client (an HTTP service's `"deny"`).
    NotAuthorized,
    /// On the banned list.
    Banned,
}

impl Refusal {
    pub fn reason_code(self) -> ReasonCode {
        match self {
            Self::AnonymousNotAllowed | Self::NotAuthorized => ReasonCode::NOT_AUTHORIZED,
            Self::BadCredentials => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            Self::Banned => ReasonCode::BANNED,
        }
    }
}

/// The rules in force: what the files said at the last (re)load.
#[derive(Debug, Default)]
struct Rules {
    /// The chain: `password_file` first, then the enabled `[[auth.authentication]]` entries.
    sources: Vec<Source>,
    acl: Option<AclFile>,
}

impl Rules {
    /// `http` holds the HTTP sources, made once (in chain order).
    fn load(settings: &AuthSettings, http: &[Arc<HttpAuth>]) -> Result<Self, String> {
        let mut sources = Vec::new();
        if let Some(path) = &settings.password_file {
            sources.push(Source::PasswordFile(Box::new(chain::PasswordSource::load(
                path,
                settings.cache_ttl,
                settings.cache_max_size,
            )?)));
        }
        let mut http = http.iter();
        for (i, entry) in settings.authentication.iter().enumerate() {
            if !entry.enable {
                continue;
            }
            let named = |err: String| format!("auth.authentication #{}: {err}", i + 1);
            sources.push(match &entry.kind {
                SourceKind::PasswordFile(path) => Source::PasswordFile(Box::new(
                    chain::PasswordSource::load(path, settings.cache_ttl, settings.cache_max_size)
                        .map_err(named)?,
                )),
                SourceKind::Jwt(jwt) => Source::Jwt(Box::new(jwt::Jwt::load(jwt).map_err(named)?)),
                SourceKind::Http(_) => Source::Http(Arc::clone(
                    http.next().expect("one HTTP source made per enabled entry"),
                )),
            });
        }
        Ok(Self {
            sources,
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
    /// The HTTP sources (their pools and caches outlive reloads).
    http: Vec<Arc<HttpAuth>>,
}

impl Default for AuthService {
    fn default() -> Self {
        Self {
            settings: AuthSettings::default(),
            rules: RwLock::new(Arc::new(Rules::default())),
            generation: AtomicU64::new(0),
            banned: banned::Banned::default(),
            http: Vec::new(),
        }
    }
}

impl AuthService {
    /// Loads the configured files; an error names the file and the line.
    pub fn load(settings: &AuthSettings) -> Result<Self, String> {
        let http = settings
            .authentication
            .iter()
            .enumerate()
            .filter(|(_, entry)| entry.enable)
            .filter_map(|(i, entry)| match &entry.kind {
                SourceKind::Http(http) => Some(
                    HttpAuth::new(http)
                        .map(Arc::new)
                        .map_err(|err| format!("auth.authentication #{}: {err}", i + 1)),
                ),
                _ => None,
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            settings: settings.clone(),
            rules: RwLock::new(Arc::new(Rules::load(settings, &http)?)),
            generation: AtomicU64::new(0),
            banned: banned::Banned::default(),
            http,
        })
    }

    /// Reads the files again. On error the old rules stay in force.
    pub fn reload(&self) -> Result<(), String> {
        let rules = Rules::load(&self.settings, &self.http)?;
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
                "anonymous from loopback only (set auth.allow_anonymous, auth.password_file or [[auth.authentication]])"
            }
            Anonymous::Never => "anonymous refused",
        };
        let passwords = match rules.sources.as_slice() {
            [] => "no password file".into(),
            [only] => only.describe(),
            sources => {
                let names: Vec<String> = sources.iter().map(Source::describe).collect();
                format!("chain: {}", names.join(" -> "))
            }
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
            None if !rules.sources.is_empty() => Anonymous::Never,
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

    /// Decides a CONNECT: the chain in order, then the anonymous policy. An HTTP source is
    /// awaited (never blocking the runtime).
    pub async fn authenticate(&self, credentials: &Credentials<'_>) -> Result<Grant, Refusal> {
        let rules = self.rules();
        if credentials.certified {
            return Ok(Grant::default());
        }
        if let Some((i, decided)) = chain::run(&rules.sources, credentials).await {
            tracing::debug!(
                source = %rules.sources[i].describe(),
                allowed = decided.is_ok(),
                "authentication decided"
            );
            return decided;
        }
        let presented = credentials.username.is_some() || credentials.password.is_some();
        if presented && !rules.sources.is_empty() {
            // Credentials no source accepts (an unknown user, a token of another issuer).
            return Err(Refusal::BadCredentials);
        }
        // No source, or nothing presented: a username without sources is only a name, as in
        // Mosquitto; the anonymous policy decides who may connect.
        match self.anonymous_policy(&rules) {
            Anonymous::Everywhere => Ok(Grant::default()),
            Anonymous::LoopbackOnly if is_loopback(credentials.peer.ip()) => Ok(Grant::default()),
            _ => Err(Refusal::AnonymousNotAllowed),
        }
    }

    /// Whether a JWT source takes its token from the username (`from = "username"`): the
    /// username is then a credential, kept out of the logs.
    pub fn username_carries_token(&self) -> bool {
        self.settings.authentication.iter().any(|entry| {
            entry.enable
                && matches!(&entry.kind, SourceKind::Jwt(jwt) if jwt.from == jwt::TokenField::Username)
        })
    }

    /// SCRAM-SHA-256 keys for `username` from the password file (`[auth] password_file`),
    /// and whether they are real (mock keys for a user without a `$scram-sha-256$` line: the
    /// exchange then fails as a wrong password does); `None` without a password file.
    pub fn scram_keys(&self, username: &str) -> Option<(scram::ScramKeys, bool)> {
        // `password_file`, when set, is always the chain's first source.
        self.settings.password_file.as_ref()?;
        match self.rules().sources.first() {
            Some(Source::PasswordFile(file)) => Some(file.scram_keys(username)),
            _ => None,
        }
    }

    /// Whether any authentication source is in force (a password file or a chain entry).
    pub fn has_sources(&self) -> bool {
        !self.rules().sources.is_empty()
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

/// One connection's authorizer when its source handed out rules: those first, then the
/// broker's (the ACL file, or everything but `$SYS` without one).
#[derive(Debug)]
pub struct ClientAuthorizer {
    pub acl: Arc<ClientAcl>,
    pub service: Arc<AuthService>,
}

impl Authorizer for ClientAuthorizer {
    fn allows(&self, client_id: &str, username: Option<&str>, access: Access, topic: &str) -> bool {
        match self.acl.decide(access, topic) {
            Some(decided) => decided,
            None => self.service.allows(client_id, username, access, topic),
        }
    }

    fn generation(&self) -> u64 {
        self.service.generation()
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
    use password::PasswordFile;

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
            listener: "tcp:default",
            now_unix: 1_700_000_000,
        }
    }

    /// `authenticate`, run to completion (no source here waits on anything).
    trait Decide {
        fn decide(&self, credentials: &Credentials<'_>) -> Result<(), Refusal>;
    }

    impl Decide for AuthService {
        fn decide(&self, credentials: &Credentials<'_>) -> Result<(), Refusal> {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(self.authenticate(credentials))
                .map(drop)
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
        assert_eq!(auth.decide(&creds(None, None, "127.0.0.1:1")), Ok(()));
        assert_eq!(auth.decide(&creds(None, None, "[::1]:1")), Ok(()));
        assert_eq!(
            auth.decide(&creds(None, None, "[::ffff:127.0.0.1]:1")),
            Ok(())
        );
        assert_eq!(
            auth.decide(&creds(None, None, "192.0.2.7:1")),
            Err(Refusal::AnonymousNotAllowed)
        );
        assert_eq!(
            auth.decide(&creds(Some("u"), Some(b"p"), "192.0.2.7:1")),
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
            auth.decide(&creds(Some("alice"), Some(b"secret"), "192.0.2.7:1")),
            Ok(())
        );
        assert_eq!(
            auth.decide(&creds(Some("alice"), Some(b"nope"), "127.0.0.1:1")),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            auth.decide(&creds(Some("eve"), Some(b"secret"), "127.0.0.1:1")),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            auth.decide(&creds(None, None, "127.0.0.1:1")),
            Err(Refusal::AnonymousNotAllowed)
        );

        // A bad file on reload keeps the old rules.
        std::fs::write(&path, "alice\n").unwrap();
        let err = auth.reload().unwrap_err();
        assert!(err.contains("line 1"), "{err}");
        assert_eq!(
            auth.decide(&creds(Some("alice"), Some(b"secret"), "127.0.0.1:1")),
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
            auth.decide(&creds(Some("alice"), Some(b"secret"), "127.0.0.1:1")),
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
        assert_eq!(open.decide(&creds(None, None, "192.0.2.7:1")), Ok(()));
        let closed = AuthService::load(&AuthSettings {
            allow_anonymous: Some(false),
            ..AuthSettings::default()
        })
        .unwrap();
        assert_eq!(
            closed.decide(&creds(None, None, "127.0.0.1:1")),
            Err(Refusal::AnonymousNotAllowed)
        );
        let mut certified = creds(Some("cn"), None, "192.0.2.7:1");
        certified.certified = true;
        assert_eq!(closed.decide(&certified), Ok(()));
    }

    fn parse(toml_text: &str) -> Result<AuthSettings, String> {
        toml::from_str(toml_text).map_err(|e| e.to_string())
    }

    #[test]
    fn the_chain_is_tried_in_order() {
        use jsonwebtoken::{encode, EncodingKey, Header};
        let mut first = PasswordFile::default();
        first.set("alice", password::PasswordHash::new_pbkdf2(b"secret"));
        let first = temp_file("chain1", &first.to_text());
        let mut second = PasswordFile::default();
        second.set("alice", password::PasswordHash::new_pbkdf2(b"second"));
        second.set("bob", password::PasswordHash::new_pbkdf2(b"builder"));
        let second = temp_file("chain2", &second.to_text());
        let mut settings = parse(&format!(
            r#"
            password_file = "{}"
            [[authentication]]
            mechanism = "jwt"
            secret = "k"
            [[authentication]]
            mechanism = "password_based"
            backend = "built_in_database"
            password_file = "{}"
            [[authentication]]
            mechanism = "jwt"
            enable = false
            secret = "disabled"
            "#,
            first.display(),
            second.display()
        ))
        .unwrap();
        let auth = AuthService::load(&settings).unwrap();
        let describe = auth.describe();
        assert!(describe.contains("chain: password file with 1 users -> jwt (hmac-based, from password) -> password file with 2 users"), "{describe}");
        let remote = "192.0.2.7:1";
        // The first source that knows the user decides: alice's second password is never
        // reached.
        assert_eq!(
            auth.decide(&creds(Some("alice"), Some(b"secret"), remote)),
            Ok(())
        );
        assert_eq!(
            auth.decide(&creds(Some("alice"), Some(b"second"), remote)),
            Err(Refusal::BadCredentials)
        );
        // Unknown to the first file, not a token: the second file decides.
        assert_eq!(
            auth.decide(&creds(Some("bob"), Some(b"builder"), remote)),
            Ok(())
        );
        let token = |secret: &str| {
            encode(
                &Header::default(),
                &serde_json::json!({"exp": 1_700_000_060}),
                &EncodingKey::from_secret(secret.as_bytes()),
            )
            .unwrap()
        };
        let good = token("k");
        assert_eq!(
            auth.decide(&creds(Some("carol"), Some(good.as_bytes()), remote)),
            Ok(())
        );
        // The disabled entry's key is not in the chain; no source accepts: refused.
        let disabled = token("disabled");
        assert_eq!(
            auth.decide(&creds(Some("carol"), Some(disabled.as_bytes()), remote)),
            Err(Refusal::BadCredentials)
        );
        // Once a source is configured, anonymous clients are refused, even on loopback...
        assert_eq!(
            auth.decide(&creds(None, None, "127.0.0.1:1")),
            Err(Refusal::AnonymousNotAllowed)
        );
        // ...unless allow_anonymous says otherwise; presented credentials still must pass.
        settings.allow_anonymous = Some(true);
        let open = AuthService::load(&settings).unwrap();
        assert_eq!(open.decide(&creds(None, None, remote)), Ok(()));
        assert_eq!(
            open.decide(&creds(Some("mallory"), Some(b"x"), remote)),
            Err(Refusal::BadCredentials)
        );
        // A token in the password field without a username (MQTT 5 allows it).
        assert_eq!(
            open.decide(&creds(None, Some(good.as_bytes()), remote)),
            Ok(())
        );
        std::fs::remove_file(first).unwrap();
        std::fs::remove_file(second).unwrap();
    }

    #[test]
    fn a_reload_rereads_the_chain_files_and_keeps_them_on_error() {
        let mut file = PasswordFile::default();
        file.set("bob", password::PasswordHash::new_pbkdf2(b"one"));
        let path = temp_file("chain-reload", &file.to_text());
        let settings = parse(&format!(
            "[[authentication]]\nmechanism = \"password_based\"\nbackend = \"built_in_database\"\npassword_file = \"{}\"\n",
            path.display()
        ))
        .unwrap();
        let auth = AuthService::load(&settings).unwrap();
        std::fs::write(&path, "bob\n").unwrap();
        let err = auth.reload().unwrap_err();
        assert!(err.starts_with("auth.authentication #1:"), "{err}");
        assert_eq!(
            auth.decide(&creds(Some("bob"), Some(b"one"), "192.0.2.7:1")),
            Ok(())
        );
        file.set("bob", password::PasswordHash::new_pbkdf2(b"two"));
        std::fs::write(&path, file.to_text()).unwrap();
        auth.reload().unwrap();
        assert_eq!(
            auth.decide(&creds(Some("bob"), Some(b"two"), "192.0.2.7:1")),
            Ok(())
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn chain_entries_are_checked_when_parsed() {
        for (text, needle) in [
            ("mechanism = \"scram\"", "mechanism must be"),
            ("mechanism = \"password_based\"", "backend must be"),
            ("mechanism = \"password_based\"\nbackend = \"mysql\"", "backend must be"),
            ("mechanism = \"jwt\"", "exactly one of secret, public_key, jwks_file"),
            ("mechanism = \"jwt\"\nsecret = \"k\"\nurl = \"http://x\"", "`url` is not a setting of mechanism = \"jwt\""),
            ("mechanism = \"jwt\"\nalgorithm = \"public-key\"\nsecret = \"k\"", "needs public_key"),
            ("mechanism = \"jwt\"\nsecret = \"k\"\nfrom = \"clientid\"", "from"),
            ("mechanism = \"jwt\"\nuse_jwks = true", "needs endpoint"),
            ("mechanism = \"jwt\"\nsecret = \"k\"\nendpoint = \"https://x\"", "go with use_jwks = true"),
            ("mechanism = \"jwt\"\nuse_jwks = true\nendpoint = \"https://x\"\nssl = { verify = \"verify_none\" }", "ssl.verify"),
            ("mechanism = \"password_based\"\nbackend = \"http\"", "needs url"),
            ("mechanism = \"password_based\"\nbackend = \"http\"\nurl = \"http://x/\"\nrequest_timeout = \"soon\"", "request_timeout"),
            ("mechanism = \"password_based\"\nbackend = \"http\"\nurl = \"http://x/\"\nsecret = \"k\"", "`secret` is not a setting of backend = \"http\""),
            ("mechanism = \"password_based\"\nbackend = \"built_in_database\"", "needs password_file"),
            ("mechanism = \"password_based\"\nbackend = \"http\"\nurl = \"https://x/\"\nssl = { verify = \"verify_none\" }", "ssl.verify"),
            ("mechanism = \"password_based\"\nbackend = \"http\"\nurl = \"https://x/\"\nssl = { enable = false }", "ssl.enable"),
        ] {
            let err = parse(&format!("[[authentication]]\n{text}\n")).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
        let http = parse(
            "[[authentication]]\nmechanism = \"password_based\"\nbackend = \"http\"\nmethod = \"get\"\nurl = \"http://127.0.0.1:9/auth\"\nrequest_timeout = \"2s\"\npool_size = 2\nbody = { user = \"${username}\" }\n",
        )
        .unwrap();
        let SourceKind::Http(http) = &http.authentication[0].kind else {
            panic!("an http entry");
        };
        assert_eq!(http.method, http::Method::Get);
        assert_eq!(http.request_timeout, std::time::Duration::from_secs(2));
        assert_eq!(http.pool_size, 2);
        assert_eq!(http.body.len(), 1);
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
