//! Who may use the API: API keys (EMQX's `api_key.bootstrap_file`, `key:secret[:role]` lines,
//! sent as HTTP Basic auth) and dashboard users, who log in for a bearer token
//! (`POST /api/v5/login`). Secrets are kept only as salted PBKDF2 hashes. With no password
//! configured for the dashboard's administrator, the first start writes a random one to
//! `<data_dir>/dashboard_admin_password` (owner-only) and logs that path: there is no
//! well-known default password.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use ring::rand::SecureRandom as _;

use super::ApiSettings;
use crate::auth::password::PasswordHash;

/// Logins at once (tokens beyond it push out the oldest).
const MAX_TOKENS: usize = 1024;
/// The file the generated administrator password is written to, under the data directory.
pub const ADMIN_PASSWORD_FILE: &str = "dashboard_admin_password";

#[derive(Debug, thiserror::Error)]
pub enum ApiAuthError {
    #[error("{path}:{line}: expected `key:secret` (EMQX's api_key.bootstrap_file format)")]
    BadKeyLine { path: PathBuf, line: usize },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the dashboard password to {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Who a request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    ApiKey(String),
    User(String),
}

impl Caller {
    pub fn name(&self) -> &str {
        match self {
            Self::ApiKey(name) | Self::User(name) => name,
        }
    }
}

struct Token {
    username: String,
    expires: Instant,
}

pub struct ApiAuth {
    keys: HashMap<String, PasswordHash>,
    users: HashMap<String, PasswordHash>,
    tokens: Mutex<HashMap<String, Token>>,
    token_ttl: Duration,
}

impl ApiAuth {
    /// Reads the bootstrap file and sets up the administrator (writing a generated password
    /// under `data_dir` on first start).
    pub fn load(settings: &ApiSettings, data_dir: &Path) -> Result<Self, ApiAuthError> {
        let mut keys = HashMap::new();
        if let Some(path) = &settings.bootstrap_file {
            let text = std::fs::read_to_string(path).map_err(|source| ApiAuthError::Read {
                path: path.clone(),
                source,
            })?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let mut fields = line.splitn(3, ':');
                match (fields.next(), fields.next()) {
                    (Some(key), Some(secret)) if !key.is_empty() && !secret.is_empty() => {
                        keys.insert(key.to_owned(), PasswordHash::new_pbkdf2(secret.as_bytes()));
                    }
                    _ => {
                        return Err(ApiAuthError::BadKeyLine {
                            path: path.clone(),
                            line: n + 1,
                        })
                    }
                }
            }
        }
        let password = match &settings.default_password {
            Some(password) => password.clone(),
            None => admin_password(data_dir)?,
        };
        let users = HashMap::from([(
            settings.default_username.clone(),
            PasswordHash::new_pbkdf2(password.as_bytes()),
        )]);
        Ok(Self {
            keys,
            users,
            tokens: Mutex::new(HashMap::new()),
            token_ttl: settings.token_expired_time,
        })
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// A dashboard login: a new token, or `None` for bad credentials.
    pub fn login(&self, username: &str, password: &str, now: Instant) -> Option<String> {
        if !self
            .users
            .get(username)
            .is_some_and(|hash| hash.verify(password.as_bytes()))
        {
            return None;
        }
        let token = random_token();
        let mut tokens = self.tokens.lock().expect("tokens lock is never poisoned");
        tokens.retain(|_, t| t.expires > now);
        if tokens.len() >= MAX_TOKENS {
            let oldest = tokens
                .iter()
                .min_by_key(|(_, t)| t.expires)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                tokens.remove(&oldest);
            }
        }
        tokens.insert(
            token.clone(),
            Token {
                username: username.to_owned(),
                expires: now + self.token_ttl,
            },
        );
        Some(token)
    }

    /// Ends a login.
    pub fn logout(&self, token: &str) {
        self.tokens
            .lock()
            .expect("tokens lock is never poisoned")
            .remove(token);
    }

    /// Who sent `authorization` (the header's value), if anyone we know.
    pub fn check(&self, authorization: &str, now: Instant) -> Option<Caller> {
        if let Some(token) = authorization.strip_prefix("Bearer ") {
            let tokens = self.tokens.lock().expect("tokens lock is never poisoned");
            let t = tokens.get(token.trim()).filter(|t| t.expires > now)?;
            return Some(Caller::User(t.username.clone()));
        }
        let encoded = authorization.strip_prefix("Basic ")?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (key, secret) = decoded.split_once(':')?;
        if self
            .keys
            .get(key)
            .is_some_and(|hash| hash.verify(secret.as_bytes()))
        {
            return Some(Caller::ApiKey(key.to_owned()));
        }
        // A dashboard user may also use Basic auth (scripts, `petrel ctl`).
        self.users
            .get(key)
            .is_some_and(|hash| hash.verify(secret.as_bytes()))
            .then(|| Caller::User(key.to_owned()))
    }
}

/// The administrator's generated password: read back from `<data_dir>`, or made and written
/// there (owner-only) on the first start.
fn admin_password(data_dir: &Path) -> Result<String, ApiAuthError> {
    let path = data_dir.join(ADMIN_PASSWORD_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => {
            tracing::info!(
                file = %path.display(),
                "dashboard: the administrator's password is in this file (set api.default_password to choose one)"
            );
            return Ok(text.trim().to_owned());
        }
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(ApiAuthError::Read { path, source }),
    }
    let password = random_token();
    let written = std::fs::create_dir_all(data_dir)
        .and_then(|()| crate::transport::certs::write_owner_only(&path, &format!("{password}\n")));
    written.map_err(|source| ApiAuthError::Write {
        path: path.clone(),
        source,
    })?;
    tracing::warn!(
        file = %path.display(),
        "dashboard: generated a password for the administrator; it is in this file (set api.default_password to choose one)"
    );
    Ok(password)
}

/// 24 random bytes, URL-safe base64.
fn random_token() -> String {
    let mut bytes = [0u8; 24];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the operating system's random source is available");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("petrel-apiauth-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn basic(user: &str, secret: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"))
        )
    }

    #[test]
    fn keys_from_the_bootstrap_file_and_the_generated_admin_password() {
        let dir = temp_dir("keys");
        let file = dir.join("keys");
        std::fs::write(&file, "# comment\nk1:s1\nk2:s2:administrator\n").unwrap();
        let settings = ApiSettings {
            bootstrap_file: Some(file),
            ..ApiSettings::default()
        };
        let auth = ApiAuth::load(&settings, &dir).unwrap();
        let now = Instant::now();
        assert_eq!(auth.key_count(), 2);
        assert_eq!(
            auth.check(&basic("k1", "s1"), now),
            Some(Caller::ApiKey("k1".into()))
        );
        assert_eq!(
            auth.check(&basic("k2", "s2"), now),
            Some(Caller::ApiKey("k2".into()))
        );
        assert_eq!(auth.check(&basic("k1", "s2"), now), None);
        assert_eq!(auth.check("Bearer nope", now), None);
        let password = std::fs::read_to_string(dir.join(ADMIN_PASSWORD_FILE)).unwrap();
        let password = password.trim();
        assert!(password.len() >= 24);
        assert!(
            auth.login("admin", "admin", now).is_none(),
            "no well-known default"
        );
        let token = auth.login("admin", password, now).unwrap();
        let bearer = format!("Bearer {token}");
        assert_eq!(auth.check(&bearer, now), Some(Caller::User("admin".into())));
        assert_eq!(
            auth.check(&bearer, now + Duration::from_secs(3601)),
            None,
            "expired"
        );
        auth.logout(&token);
        assert_eq!(auth.check(&bearer, now), None);
        // The same password on the next start.
        let again = ApiAuth::load(&settings, &dir).unwrap();
        assert!(again.login("admin", password, now).is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_bootstrap_line_is_named() {
        let dir = temp_dir("bad");
        let file = dir.join("keys");
        std::fs::write(&file, "k1:s1\nno-secret\n").unwrap();
        let settings = ApiSettings {
            bootstrap_file: Some(file),
            default_password: Some("p".into()),
            ..ApiSettings::default()
        };
        let err = ApiAuth::load(&settings, &dir).err().unwrap().to_string();
        assert!(
            err.ends_with("keys:2: expected `key:secret` (EMQX's api_key.bootstrap_file format)"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
