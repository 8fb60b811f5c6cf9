//! Banned clients (EMQX's `banned` table): by client id, username or peer address, each
//! until a time or for ever. A banned client's CONNECT is refused with 0x8A (Banned; v3:
//! "not authorized"). The list is kept in `<data_dir>/banned.json` so that bans outlive a
//! restart; every change rewrites that small file (write to a temporary file, then rename).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

/// What a ban matches (EMQX's `as`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BanKind {
    Clientid,
    Username,
    Peerhost,
}

impl BanKind {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "clientid" => Some(Self::Clientid),
            "username" => Some(Self::Username),
            "peerhost" => Some(Self::Peerhost),
            _ => None,
        }
    }
}

/// One ban, in EMQX's field names (times in seconds since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ban {
    #[serde(rename = "as")]
    pub kind: BanKind,
    pub who: String,
    pub by: String,
    pub reason: String,
    pub at: u64,
    /// `None`: for ever.
    pub until: Option<u64>,
}

impl Ban {
    fn in_force(&self, now: u64) -> bool {
        self.until.is_none_or(|until| now < until)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BannedError {
    #[error("`who` is empty")]
    EmptyWho,
    #[error("`who` is not an IP address: {0}")]
    BadPeerhost(String),
    #[error("`until` is not after `at`")]
    AlreadyOver,
    #[error("cannot save {path}: {source}")]
    Save {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {message}")]
    Load { path: PathBuf, message: String },
}

/// The banned list.
#[derive(Debug, Default)]
pub struct Banned {
    bans: RwLock<HashMap<(BanKind, String), Ban>>,
    /// Whether any ban exists: a broker with none checks nothing per CONNECT.
    any: AtomicBool,
    /// Where the list is saved (`None`: in memory only).
    file: Option<PathBuf>,
}

impl Banned {
    /// The list saved in `file` (empty if the file does not exist).
    pub fn load(file: &Path) -> Result<Self, BannedError> {
        let bans: Vec<Ban> = match std::fs::read(file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|err| BannedError::Load {
                path: file.to_owned(),
                message: err.to_string(),
            })?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(err) => {
                return Err(BannedError::Load {
                    path: file.to_owned(),
                    message: err.to_string(),
                })
            }
        };
        let banned = Self {
            file: Some(file.to_owned()),
            ..Self::default()
        };
        {
            let mut table = banned.bans.write().expect("banned lock is never poisoned");
            for ban in bans {
                table.insert((ban.kind, ban.who.clone()), ban);
            }
            banned.any.store(!table.is_empty(), Ordering::Relaxed);
        }
        Ok(banned)
    }

    /// The ban in force on this client, if any (`now`: seconds since the epoch).
    pub fn find(
        &self,
        client_id: &str,
        username: Option<&str>,
        ip: IpAddr,
        now: u64,
    ) -> Option<Ban> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        let bans = self.bans.read().expect("banned lock is never poisoned");
        let key = |kind, who: &str| {
            bans.get(&(kind, who.to_owned()))
                .filter(|b| b.in_force(now))
        };
        key(BanKind::Clientid, client_id)
            .or_else(|| username.and_then(|u| key(BanKind::Username, u)))
            .or_else(|| key(BanKind::Peerhost, &ip.to_string()))
            .cloned()
    }

    /// Adds (or replaces) a ban, and saves the list. Bans over by the new ban's `at` are
    /// dropped on the way, so bans that expire (flapping detection's) do not pile up.
    pub fn add(&self, mut ban: Ban) -> Result<Ban, BannedError> {
        if ban.who.is_empty() {
            return Err(BannedError::EmptyWho);
        }
        if ban.kind == BanKind::Peerhost {
            let ip: IpAddr = ban
                .who
                .parse()
                .map_err(|_| BannedError::BadPeerhost(ban.who.clone()))?;
            ban.who = ip.to_string();
        }
        if ban.until.is_some_and(|until| until <= ban.at) {
            return Err(BannedError::AlreadyOver);
        }
        let mut bans = self.bans.write().expect("banned lock is never poisoned");
        bans.retain(|_, b| b.in_force(ban.at));
        let old = bans.insert((ban.kind, ban.who.clone()), ban.clone());
        if let Err(err) = self.save(&bans) {
            match old {
                Some(old) => bans.insert((old.kind, old.who.clone()), old),
                None => bans.remove(&(ban.kind, ban.who.clone())),
            };
            return Err(err);
        }
        self.any.store(true, Ordering::Relaxed);
        Ok(ban)
    }

    /// Lifts a ban; `Ok(false)` if there was none.
    pub fn remove(&self, kind: BanKind, who: &str) -> Result<bool, BannedError> {
        let mut bans = self.bans.write().expect("banned lock is never poisoned");
        let Some(old) = bans.remove(&(kind, who.to_owned())) else {
            return Ok(false);
        };
        if let Err(err) = self.save(&bans) {
            bans.insert((kind, who.to_owned()), old);
            return Err(err);
        }
        self.any.store(!bans.is_empty(), Ordering::Relaxed);
        Ok(true)
    }

    /// Every ban, oldest first (expired ones included until they are removed, or the next
    /// ban is added).
    pub fn list(&self) -> Vec<Ban> {
        let mut all: Vec<Ban> = self
            .bans
            .read()
            .expect("banned lock is never poisoned")
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| (a.at, &a.who).cmp(&(b.at, &b.who)));
        all
    }

    fn save(&self, bans: &HashMap<(BanKind, String), Ban>) -> Result<(), BannedError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let mut all: Vec<&Ban> = bans.values().collect();
        all.sort_by(|a, b| (a.at, &a.who).cmp(&(b.at, &b.who)));
        let text = serde_json::to_vec_pretty(&all).expect("bans always serialize");
        let tmp = path.with_extension("json.tmp");
        let saved = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path));
        saved.map_err(|source| BannedError::Save {
            path: path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adding_a_ban_drops_the_bans_that_are_over() {
        let banned = Banned::default();
        banned
            .add(ban(BanKind::Clientid, "short", Some(150)))
            .unwrap();
        banned
            .add(ban(BanKind::Clientid, "long", Some(1000)))
            .unwrap();
        let later = Ban {
            at: 200,
            ..ban(BanKind::Clientid, "new", Some(300))
        };
        banned.add(later).unwrap();
        let who: Vec<String> = banned.list().into_iter().map(|b| b.who).collect();
        assert_eq!(who, vec!["long".to_owned(), "new".to_owned()]);
    }

    fn ban(kind: BanKind, who: &str, until: Option<u64>) -> Ban {
        Ban {
            kind,
            who: who.into(),
            by: "test".into(),
            reason: "r".into(),
            at: 100,
            until,
        }
    }

    #[test]
    fn a_ban_matches_its_kind_until_it_is_over_and_survives_a_reload() {
        let dir = std::env::temp_dir().join(format!("petrel-banned-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("banned.json");
        let _ = std::fs::remove_file(&file);
        let banned = Banned::load(&file).unwrap();
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        assert!(banned.find("c", Some("u"), ip, 150).is_none());
        banned.add(ban(BanKind::Clientid, "c", Some(200))).unwrap();
        banned.add(ban(BanKind::Username, "u", None)).unwrap();
        banned
            .add(ban(BanKind::Peerhost, "10.0.0.9", None))
            .unwrap();
        assert_eq!(
            banned
                .find("c", None, "::1".parse().unwrap(), 150)
                .unwrap()
                .kind,
            BanKind::Clientid
        );
        assert!(
            banned
                .find("c", None, "::1".parse().unwrap(), 200)
                .is_none(),
            "over at `until`"
        );
        assert_eq!(
            banned
                .find("x", Some("u"), "::1".parse().unwrap(), 150)
                .unwrap()
                .kind,
            BanKind::Username
        );
        assert_eq!(
            banned.find("x", None, ip, 150).unwrap().kind,
            BanKind::Peerhost
        );
        let reloaded = Banned::load(&file).unwrap();
        assert_eq!(reloaded.list(), banned.list());
        assert!(reloaded.remove(BanKind::Username, "u").unwrap());
        assert!(!reloaded.remove(BanKind::Username, "u").unwrap());
        assert!(Banned::load(&file)
            .unwrap()
            .find("x", Some("u"), "::1".parse().unwrap(), 150)
            .is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_bans_are_refused_with_a_reason() {
        let banned = Banned::default();
        assert!(matches!(
            banned.add(ban(BanKind::Clientid, "", None)),
            Err(BannedError::EmptyWho)
        ));
        assert!(matches!(
            banned.add(ban(BanKind::Peerhost, "not-an-ip", None)),
            Err(BannedError::BadPeerhost(_))
        ));
        assert!(matches!(
            banned.add(ban(BanKind::Clientid, "c", Some(50))),
            Err(BannedError::AlreadyOver)
        ));
        assert!(banned.list().is_empty());
    }
}
