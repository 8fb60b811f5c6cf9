//! `petrel store check DIR` and `petrel store repair DIR`: what an operator runs when the
//! broker refuses to start over a damaged store.
//!
//! `check` reads every file and record without changing anything and says what it found.
//! `repair` keeps every record that can be read: a damaged file is cut at its first bad
//! frame (what follows it in that file is lost, and said so), records that do not decode are
//! dropped (each named), and the result is written as a fresh store; the original files are
//! moved into `DIR/damaged-<time>/` first, never deleted.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use super::engine::{self, LogError};
use super::record;
use super::recover::show_key;

/// What `check` found.
#[derive(Debug, Default)]
pub struct Report {
    pub text: String,
    /// Whether the broker would start over this store.
    pub healthy: bool,
}

/// Reads the store in `dir` without changing it.
pub fn check(dir: &Path) -> Report {
    let mut report = Report::default();
    let (records, opened) = match engine::read_dir(dir, false) {
        Ok((records, opened)) => (records, opened),
        Err(err) => {
            let _ = writeln!(report.text, "damaged: {err}");
            let _ = writeln!(
                report.text,
                "`petrel store repair {}` keeps what can be read (originals are moved aside)",
                dir.display()
            );
            return report;
        }
    };
    let _ = writeln!(
        report.text,
        "{} file(s), {} commit(s), {} record(s)",
        opened.files,
        opened.frames,
        records.len()
    );
    if opened.torn > 0 {
        let _ = writeln!(
            report.text,
            "a torn last write ({} bytes) will be cut off at the next start",
            opened.torn
        );
    }
    let bad = undecodable(&records);
    let mut counts: BTreeMap<char, usize> = BTreeMap::new();
    for key in records.keys() {
        *counts
            .entry(key.first().map_or('?', |&b| b as char))
            .or_default() += 1;
    }
    let _ = writeln!(
        report.text,
        "sessions {}, queued deliveries {}, in flight {}, inbound QoS 2 {}, retained {}, delayed {}",
        counts.get(&'S').unwrap_or(&0),
        counts.get(&'Q').unwrap_or(&0),
        counts.get(&'P').unwrap_or(&0),
        counts.get(&'I').unwrap_or(&0),
        counts.get(&'R').unwrap_or(&0),
        counts.get(&'D').unwrap_or(&0),
    );
    for (key, error) in &bad {
        let _ = writeln!(report.text, "unreadable record {}: {error}", show_key(key));
    }
    report.healthy = bad.is_empty();
    let _ = writeln!(
        report.text,
        "{}",
        if report.healthy {
            "ok"
        } else {
            "damaged: `petrel store repair` drops the unreadable records"
        }
    );
    report
}

/// The records that do not decode: their keys and why.
fn undecodable(records: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<(Vec<u8>, String)> {
    records
        .iter()
        .filter_map(|(k, v)| {
            record::decode(k, v)
                .err()
                .map(|e| (k.clone(), e.to_string()))
        })
        .collect()
}

/// Repairs the store in `dir`; returns what it did.
pub fn repair(dir: &Path) -> Result<String, String> {
    let mut text = String::new();
    let stamp = super::wall_ms() / 1000;
    let aside = dir.join(format!("damaged-{stamp}"));
    std::fs::create_dir_all(&aside).map_err(|e| format!("{}: {e}", aside.display()))?;
    let mut moved = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path();
        if path.is_file() {
            let to = aside.join(entry.file_name());
            std::fs::rename(&path, &to).map_err(|e| format!("{}: {e}", path.display()))?;
            moved.push(to);
        }
    }
    let _ = writeln!(text, "originals moved to {}", aside.display());
    // Read copies of the originals together, as the store reads them; each damaged file is
    // cut at its first bad frame (or left out, if not even its header reads) and the whole
    // read again.
    let scratch = aside.join("scratch");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
    for path in &moved {
        if let Some(name) = path.file_name() {
            std::fs::copy(path, scratch.join(name)).map_err(|e| e.to_string())?;
        }
    }
    let mut records = BTreeMap::new();
    for _ in 0..=moved.len() * 2 {
        match engine::read_dir(&scratch, true) {
            Ok((read, _)) => {
                records = read;
                break;
            }
            Err(LogError::Damaged { offset, file, .. }) => {
                let _ = writeln!(
                    text,
                    "{file}: cut at byte {offset}; what followed in that file is lost"
                );
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&file)
                    .map_err(|e| e.to_string())?;
                f.set_len(offset).map_err(|e| e.to_string())?;
            }
            Err(LogError::NotALog { file } | LogError::Version { file, .. }) => {
                let _ = writeln!(text, "{file}: left out (not a log this build reads)");
                std::fs::remove_file(&file).map_err(|e| e.to_string())?;
            }
            Err(err) => return Err(err.to_string()),
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    for (key, error) in undecodable(&records) {
        let _ = writeln!(
            text,
            "dropped unreadable record {}: {error}",
            show_key(&key)
        );
        records.remove(&key);
    }
    records.insert(record::META.to_vec(), record::meta_value().to_vec());
    let mut log = engine::open(dir).map_err(|e| e.to_string())?;
    let writes: Vec<engine::Write> = records
        .into_iter()
        .map(|(key, value)| engine::Write::Put {
            key,
            value: value.into(),
        })
        .collect();
    let kept = writes.len();
    for chunk in writes.chunks(4096) {
        use engine::Engine as _;
        log.apply(chunk).map_err(|e| e.to_string())?;
    }
    let _ = writeln!(
        text,
        "{kept} record(s) kept in a fresh store in {}",
        dir.display()
    );
    Ok(text)
}
