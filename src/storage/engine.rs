//! The storage engine under the store: an append-only log of checksummed frames, one frame
//! per group commit, with compaction into a snapshot in the background. Chosen by
//! measurement over redb and fjall for this workload (many small appends, deletes on
//! acknowledgement, everything read back once at start-up): see `docs/storage.md`.
//!
//! # Files (in `<data_dir>/store`)
//! - `seg-N.plog`: log segments, appended to in order; a new one every `SEGMENT_MAX` bytes.
//! - `base-N.plog`: a snapshot of every live record as of the end of segment `N`; replay
//!   starts from the newest base and goes on with the segments after it.
//!
//! Each file starts with `MAGIC` and the log format version; then frames:
//! `[body length u32][CRC-32 of body u32][body]`, a body being one commit's operations
//! (`put key value`, `delete key`, `delete every key under a prefix`).
//!
//! # Recovery
//! A frame cut short or failing its checksum **at the end of a segment** is a write that
//! power loss (or a failed write) interrupted: it was never acknowledged, and it is cut off
//! with one log line saying how many bytes went. A bad frame with good data after it, a bad
//! header, or another version is damage: opening fails, naming the file and the offset, and
//! `petrel store check` / `petrel store repair` take it from there.
//!
//! # Compaction
//! Once `COMPACT_AFTER` segments have been sealed since the last base, a background thread
//! replays the base and those segments into an index of live records (keys and where their
//! values lie, not the values), copies the live values into `base-N.plog.tmp`, syncs it,
//! renames it into place and deletes what it replaces. The writer goes on appending to the
//! current segment meanwhile: nothing waits for a compaction. Opening the store compacts
//! everything once, so each start begins with one base and an empty segment.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write as _};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::record;

/// One write, as the store queues it for the writer thread.
#[derive(Debug)]
pub enum Write {
    Put {
        key: Vec<u8>,
        value: bytes::Bytes,
    },
    Delete(Vec<Vec<u8>>),
    /// A session ended: its record and everything under its prefixes go.
    EndSession {
        key: Vec<u8>,
        prefixes: [Vec<u8>; 4],
    },
    /// A message committed to a cluster's message stream (`cluster`): an engine that is not
    /// a cluster's has nowhere to send it and drops it.
    Publish {
        subject: String,
        payload: bytes::Bytes,
    },
}

impl Write {
    /// Whether a record of this key counts against `max_bytes` (queued deliveries, retained
    /// and delayed messages; sessions and small markers do not).
    pub fn is_admitted(key: &[u8]) -> bool {
        matches!(
            key.first(),
            Some(&record::QUEUED) | Some(&record::RETAINED) | Some(&record::DELAYED)
        )
    }

    /// Bytes this write admitted against `max_bytes`.
    pub fn admitted_bytes(&self) -> u64 {
        match self {
            Self::Put { key, value } if Self::is_admitted(key) => value.len() as u64,
            _ => 0,
        }
    }
}

/// What the store needs of an engine.
pub trait Engine: Send {
    /// Applies `batch` atomically and makes it durable (fsync) before returning.
    fn apply(&mut self, batch: &[Write]) -> std::io::Result<()>;
    /// Every live record read at open, in key order (handed over once).
    fn take_records(&mut self) -> BTreeMap<Vec<u8>, Vec<u8>>;
    /// Bytes appended so far (for the benchmarks' bytes-per-message figure).
    fn bytes_written(&self) -> u64;
}

const MAGIC: &[u8; 8] = b"PETRELOG";
/// The log's framing version (the records inside have their own, `record::FORMAT`).
pub const LOG_VERSION: u32 = 1;
const HEADER_LEN: u64 = 12;
const FRAME_HEADER: u64 = 8;
/// A segment is sealed and a new one started past this size.
pub const SEGMENT_MAX: u64 = 64 << 20;
/// Sealed segments since the last base that start a compaction.
const COMPACT_AFTER: usize = 2;
/// No frame is larger (a batch is bounded far below it).
const MAX_FRAME: u64 = 1 << 31;

const OP_PUT: u8 = 1;
const OP_DELETE: u8 = 2;
const OP_DELETE_PREFIX: u8 = 3;

/// Why a log cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{file}: {error}")]
    Io { file: String, error: std::io::Error },
    #[error("{file}: not a Petrel store file (bad header)")]
    NotALog { file: String },
    #[error("{file}: log format version {version}; this build reads version {LOG_VERSION}")]
    Version { file: String, version: u32 },
    #[error("{file}: damaged frame at byte {offset} ({reason}), with data after it")]
    Damaged {
        file: String,
        offset: u64,
        reason: &'static str,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Base,
    Segment,
}

#[derive(Debug, Clone)]
struct LogFile {
    kind: Kind,
    number: u64,
    path: PathBuf,
}

fn file_name(kind: Kind, number: u64) -> String {
    match kind {
        Kind::Base => format!("base-{number:020}.plog"),
        Kind::Segment => format!("seg-{number:020}.plog"),
    }
}

fn show(path: &Path) -> String {
    path.display().to_string()
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |error| LogError::Io {
        file: show(path),
        error,
    }
}

/// The log files in `dir`: the newest base, the segments after it (in order), and the
/// files a finished or interrupted compaction left behind.
/// The live records: key to value.
pub type Records = BTreeMap<Vec<u8>, Vec<u8>>;

/// A store directory's files: the newest base, the segments after it, and leftovers.
type Listing = (Option<LogFile>, Vec<LogFile>, Vec<PathBuf>);

fn list(dir: &Path) -> Result<Listing, LogError> {
    let mut files = Vec::new();
    let mut leftovers = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.ends_with(".tmp") {
            leftovers.push(path);
            continue;
        }
        let Some(stem) = name.strip_suffix(".plog") else {
            continue;
        };
        let (kind, number) = if let Some(n) = stem.strip_prefix("base-") {
            (Kind::Base, n)
        } else if let Some(n) = stem.strip_prefix("seg-") {
            (Kind::Segment, n)
        } else {
            continue;
        };
        let Ok(number) = number.parse::<u64>() else {
            continue;
        };
        files.push(LogFile { kind, number, path });
    }
    files.sort_by_key(|f| (f.number, f.kind));
    let base = files
        .iter()
        .filter(|f| f.kind == Kind::Base)
        .max_by_key(|f| f.number)
        .cloned();
    let covered = base.as_ref().map(|b| b.number);
    let mut segments = Vec::new();
    for file in files {
        let stale = match (&base, file.kind) {
            (Some(b), Kind::Base) => file.number < b.number,
            (_, Kind::Segment) => covered.is_some_and(|n| file.number <= n),
            (None, Kind::Base) => false,
        };
        if stale {
            leftovers.push(file.path);
        } else if file.kind == Kind::Segment {
            segments.push(file);
        }
    }
    Ok((base, segments, leftovers))
}

/// One operation read back from a frame; `at` is where a put's value lies in its file.
enum Op<'a> {
    Put {
        key: &'a [u8],
        value: &'a [u8],
        at: u64,
    },
    Delete {
        key: &'a [u8],
    },
    DeletePrefix {
        prefix: &'a [u8],
    },
}

/// How a file's replay ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    /// Where the good frames end.
    pub valid_end: u64,
    /// Bytes after it: a torn last frame (0 when the file ended cleanly).
    pub torn: u64,
    pub frames: u64,
}

fn read_u32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes[..4].try_into().expect("four bytes"))
}

/// Splits one frame body into its operations.
fn ops(body: &[u8], body_at: u64, mut visit: impl FnMut(Op<'_>)) -> Result<(), &'static str> {
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> Result<std::ops::Range<usize>, &'static str> {
        let end = at
            .checked_add(n)
            .filter(|&e| e <= body.len())
            .ok_or("operation cut short")?;
        let range = *at..end;
        *at = end;
        Ok(range)
    };
    while at < body.len() {
        let op = body[at];
        at += 1;
        let len = read_u32(&body[take(&mut at, 4)?]) as usize;
        let key = &body[take(&mut at, len)?];
        match op {
            OP_PUT => {
                let vlen = read_u32(&body[take(&mut at, 4)?]) as usize;
                let range = take(&mut at, vlen)?;
                visit(Op::Put {
                    key,
                    value: &body[range.clone()],
                    at: body_at + range.start as u64,
                });
            }
            OP_DELETE => visit(Op::Delete { key }),
            OP_DELETE_PREFIX => visit(Op::DeletePrefix { prefix: key }),
            _ => return Err("unknown operation"),
        }
    }
    Ok(())
}

/// Reads a file's frames in order. A bad frame at the very end is a torn write (reported in
/// `Replayed::torn`); one with data after it, or a bad header, is an error.
fn replay(path: &Path, mut visit: impl FnMut(Op<'_>)) -> Result<Replayed, LogError> {
    let file = File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut header = [0u8; HEADER_LEN as usize];
    if reader.read_exact(&mut header).is_err() || &header[..8] != MAGIC {
        return Err(LogError::NotALog { file: show(path) });
    }
    let version = read_u32(&header[8..]);
    if version != LOG_VERSION {
        return Err(LogError::Version {
            file: show(path),
            version,
        });
    }
    let mut offset = HEADER_LEN;
    let mut body = Vec::new();
    let mut frames = 0;
    while offset < len {
        let torn = |reason| {
            // Cut short by the end of the file, or bad with nothing after it: torn.
            Ok::<_, LogError>(Err(reason))
        };
        let outcome: Result<(), &'static str> = (|| {
            if len - offset < FRAME_HEADER {
                return torn("frame header cut short");
            }
            let mut frame_header = [0u8; FRAME_HEADER as usize];
            reader.read_exact(&mut frame_header).map_err(io_err(path))?;
            let body_len = u64::from(read_u32(&frame_header));
            let crc = read_u32(&frame_header[4..]);
            if body_len > MAX_FRAME || len - offset - FRAME_HEADER < body_len {
                return torn("frame cut short");
            }
            body.resize(body_len as usize, 0);
            reader.read_exact(&mut body).map_err(io_err(path))?;
            if crc32fast::hash(&body) != crc {
                return torn("checksum mismatch");
            }
            Ok(Ok(()))
        })()?;
        match outcome {
            Ok(()) => {
                let body_at = offset + FRAME_HEADER;
                let next = body_at + body.len() as u64;
                ops(&body, body_at, &mut visit).map_err(|reason| LogError::Damaged {
                    file: show(path),
                    offset,
                    reason,
                })?;
                offset = next;
                frames += 1;
            }
            Err(reason) => {
                // Torn only if no good frame could follow: the bad frame claims the rest of
                // the file, or its header does not even fit. A checksum mismatch on a frame
                // that ends before the file does has data after it: damage.
                let claimed_end = if len - offset >= FRAME_HEADER {
                    let mut frame_header = [0u8; FRAME_HEADER as usize];
                    let file = File::open(path).map_err(io_err(path))?;
                    file.read_exact_at(&mut frame_header, offset)
                        .map_err(io_err(path))?;
                    offset + FRAME_HEADER + u64::from(read_u32(&frame_header))
                } else {
                    len
                };
                if reason == "checksum mismatch" && claimed_end < len {
                    return Err(LogError::Damaged {
                        file: show(path),
                        offset,
                        reason,
                    });
                }
                return Ok(Replayed {
                    valid_end: offset,
                    torn: len - offset,
                    frames,
                });
            }
        }
    }
    Ok(Replayed {
        valid_end: offset,
        torn: 0,
        frames,
    })
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn create_log(path: &Path) -> std::io::Result<File> {
    let mut file = OpenOptions::new().create_new(true).write(true).open(path)?;
    file.write_all(MAGIC)?;
    file.write_all(&LOG_VERSION.to_le_bytes())?;
    file.sync_all()?;
    Ok(file)
}

fn put_op(buf: &mut Vec<u8>, op: u8, key: &[u8], value: Option<&[u8]>) {
    buf.push(op);
    buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
    buf.extend_from_slice(key);
    if let Some(value) = value {
        buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
        buf.extend_from_slice(value);
    }
}

/// Starts a frame in `buf` (its header filled in by `end_frame`).
fn begin_frame(buf: &mut Vec<u8>) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; FRAME_HEADER as usize]);
    start
}

fn end_frame(buf: &mut [u8], start: usize) {
    let body = start + FRAME_HEADER as usize;
    let len = (buf.len() - body) as u32;
    let crc = crc32fast::hash(&buf[body..]);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..body].copy_from_slice(&crc.to_le_bytes());
}

/// Where a live value lies, for compaction.
#[derive(Clone, Copy)]
struct Loc {
    file: usize,
    at: u64,
    len: u32,
}

/// Writes `base-N.plog` with every record live in `sources` (replayed in order), then
/// deletes the files it replaces. Returns the bytes of live records.
fn compact(dir: &Path, sources: &[LogFile], number: u64) -> Result<u64, LogError> {
    let mut index: BTreeMap<Vec<u8>, Loc> = BTreeMap::new();
    for (i, source) in sources.iter().enumerate() {
        replay(&source.path, |op| match op {
            Op::Put { key, value, at } => {
                index.insert(
                    key.to_vec(),
                    Loc {
                        file: i,
                        at,
                        len: value.len() as u32,
                    },
                );
            }
            Op::Delete { key } => {
                index.remove(key);
            }
            Op::DeletePrefix { prefix } => {
                remove_prefix(&mut index, prefix);
            }
        })?;
    }
    let files: Vec<File> = sources
        .iter()
        .map(|s| File::open(&s.path).map_err(io_err(&s.path)))
        .collect::<Result<_, _>>()?;
    let path = dir.join(file_name(Kind::Base, number));
    let tmp = dir.join(format!("{}.tmp", file_name(Kind::Base, number)));
    let _ = std::fs::remove_file(&tmp);
    let mut out =
        std::io::BufWriter::with_capacity(1 << 20, create_log(&tmp).map_err(io_err(&tmp))?);
    let mut buf = Vec::with_capacity(4 << 20);
    let mut value = Vec::new();
    let mut live = 0u64;
    let mut start = begin_frame(&mut buf);
    for (key, loc) in &index {
        value.resize(loc.len as usize, 0);
        files[loc.file]
            .read_exact_at(&mut value, loc.at)
            .map_err(io_err(&sources[loc.file].path))?;
        put_op(&mut buf, OP_PUT, key, Some(&value));
        live += value.len() as u64;
        if buf.len() >= 4 << 20 {
            end_frame(&mut buf, start);
            out.write_all(&buf).map_err(io_err(&tmp))?;
            buf.clear();
            start = begin_frame(&mut buf);
        }
    }
    if buf.len() > FRAME_HEADER as usize {
        end_frame(&mut buf, start);
        out.write_all(&buf).map_err(io_err(&tmp))?;
    }
    let out = out.into_inner().map_err(|e| LogError::Io {
        file: show(&tmp),
        error: e.into_error(),
    })?;
    out.sync_all().map_err(io_err(&tmp))?;
    drop(out);
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(dir).map_err(io_err(dir))?;
    for source in sources {
        if source.path != path {
            let _ = std::fs::remove_file(&source.path);
        }
    }
    sync_dir(dir).map_err(io_err(dir))?;
    Ok(live)
}

/// Removes every key under `prefix`.
fn remove_prefix<V>(map: &mut BTreeMap<Vec<u8>, V>, prefix: &[u8]) {
    let keys: Vec<Vec<u8>> = map
        .range(prefix.to_vec()..)
        .take_while(|(k, _)| k.starts_with(prefix))
        .map(|(k, _)| k.clone())
        .collect();
    for key in keys {
        map.remove(&key);
    }
}

/// What opening found, for the start-up log and `petrel store check`.
#[derive(Debug, Default)]
pub struct Opened {
    pub files: usize,
    pub frames: u64,
    /// Torn bytes cut off the end of segments.
    pub torn: u64,
}

/// Reads every file in `dir` into the live records, in order. With `cut_torn`, a torn
/// tail is cut off the file (and logged); without, the files are only read.
pub fn read_dir(dir: &Path, cut_torn: bool) -> Result<(Records, Opened), LogError> {
    read_sources(dir, cut_torn).map(|(records, opened, _)| (records, opened))
}

fn read_sources(dir: &Path, cut_torn: bool) -> Result<(Records, Opened, Vec<LogFile>), LogError> {
    let (base, segments, leftovers) = list(dir)?;
    if cut_torn {
        for path in leftovers {
            let _ = std::fs::remove_file(path);
        }
    }
    let mut records: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut opened = Opened::default();
    let sources: Vec<LogFile> = base.into_iter().chain(segments).collect();
    for source in &sources {
        let replayed = replay(&source.path, |op| match op {
            Op::Put { key, value, .. } => {
                records.insert(key.to_vec(), value.to_vec());
            }
            Op::Delete { key } => {
                records.remove(key);
            }
            Op::DeletePrefix { prefix } => {
                remove_prefix(&mut records, prefix);
            }
        })?;
        opened.files += 1;
        opened.frames += replayed.frames;
        if replayed.torn > 0 {
            if source.kind == Kind::Base {
                return Err(LogError::Damaged {
                    file: show(&source.path),
                    offset: replayed.valid_end,
                    reason: "snapshot cut short",
                });
            }
            // Only the newest segment can end in an interrupted write; anywhere else the
            // bytes are damage, and they are kept for `petrel store repair` to judge.
            if sources.last().map(|l| &l.path) != Some(&source.path) {
                return Err(LogError::Damaged {
                    file: show(&source.path),
                    offset: replayed.valid_end,
                    reason: "a sealed segment ends in a bad frame",
                });
            }
            opened.torn += replayed.torn;
            if cut_torn {
                tracing::warn!(
                    file = %source.path.display(),
                    discarded_bytes = replayed.torn,
                    "store: cut off a torn write at the end of the log (a commit interrupted \
                     before it was acknowledged)"
                );
                let file = OpenOptions::new()
                    .write(true)
                    .open(&source.path)
                    .map_err(io_err(&source.path))?;
                file.set_len(replayed.valid_end)
                    .map_err(io_err(&source.path))?;
                file.sync_all().map_err(io_err(&source.path))?;
            }
        }
    }
    Ok((records, opened, sources))
}

/// The log engine; see the module documentation.
pub struct Log {
    dir: PathBuf,
    current: File,
    number: u64,
    size: u64,
    buf: Vec<u8>,
    /// Segments sealed since the last base (or the compaction in progress).
    sealed: Vec<LogFile>,
    base: Option<LogFile>,
    compaction: Option<std::thread::JoinHandle<Result<(LogFile, usize), LogError>>>,
    records: BTreeMap<Vec<u8>, Vec<u8>>,
    written: u64,
    /// A failed write could be neither cut off nor left behind in a sealed segment.
    broken: bool,
}

/// Opens (or creates) the log in `dir`: replays it, cuts a torn tail, compacts what it
/// read into one base, and starts a fresh segment.
pub fn open(dir: &Path) -> Result<Log, LogError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let (records, opened, sources) = read_sources(dir, true)?;
    let last = sources.iter().map(|s| s.number).max();
    let fresh = sources.is_empty();
    let base = match last {
        Some(number) => {
            compact(dir, &sources, number)?;
            Some(LogFile {
                kind: Kind::Base,
                number,
                path: dir.join(file_name(Kind::Base, number)),
            })
        }
        None => None,
    };
    let number = last.map_or(0, |n| n + 1);
    let path = dir.join(file_name(Kind::Segment, number));
    let _ = std::fs::remove_file(&path);
    let current = create_log(&path).map_err(io_err(&path))?;
    sync_dir(dir).map_err(io_err(dir))?;
    tracing::debug!(
        files = opened.files,
        frames = opened.frames,
        "store log replayed"
    );
    let mut log = Log {
        dir: dir.to_owned(),
        current,
        number,
        size: HEADER_LEN,
        buf: Vec::new(),
        sealed: Vec::new(),
        base,
        compaction: None,
        records,
        written: 0,
        broken: false,
    };
    if fresh {
        log.apply(&[Write::Put {
            key: record::META.to_vec(),
            value: record::meta_value(),
        }])
        .map_err(io_err(dir))?;
        log.records
            .insert(record::META.to_vec(), record::meta_value().to_vec());
    }
    Ok(log)
}

impl Log {
    /// Starts the next segment; starts a compaction once enough are sealed.
    fn rotate(&mut self) -> std::io::Result<()> {
        let number = self.number + 1;
        let path = self.dir.join(file_name(Kind::Segment, number));
        let file = create_log(&path)?;
        sync_dir(&self.dir)?;
        let old = std::mem::replace(&mut self.current, file);
        drop(old);
        self.sealed.push(LogFile {
            kind: Kind::Segment,
            number: self.number,
            path: self.dir.join(file_name(Kind::Segment, self.number)),
        });
        self.number = number;
        self.size = HEADER_LEN;
        self.finish_compaction(false);
        if self.compaction.is_none() && self.sealed.len() >= COMPACT_AFTER {
            let sources: Vec<LogFile> = self
                .base
                .iter()
                .cloned()
                .chain(self.sealed.iter().cloned())
                .collect();
            let upto = self.sealed.last().map_or(0, |s| s.number);
            let dir = self.dir.clone();
            let count = self.sealed.len();
            self.compaction = Some(
                std::thread::Builder::new()
                    .name("petrel-compact".into())
                    .spawn(move || {
                        let started = std::time::Instant::now();
                        let live = compact(&dir, &sources, upto)?;
                        tracing::info!(
                            segments = count,
                            live_bytes = live,
                            took_ms = started.elapsed().as_millis() as u64,
                            "store compacted"
                        );
                        Ok((
                            LogFile {
                                kind: Kind::Base,
                                number: upto,
                                path: dir.join(file_name(Kind::Base, upto)),
                            },
                            count,
                        ))
                    })?,
            );
        }
        Ok(())
    }

    /// Takes in a finished compaction (waiting for it with `wait`).
    fn finish_compaction(&mut self, wait: bool) {
        let done = self
            .compaction
            .as_ref()
            .is_some_and(|c| wait || c.is_finished());
        if !done {
            return;
        }
        let Some(handle) = self.compaction.take() else {
            return;
        };
        match handle.join() {
            Ok(Ok((base, count))) => {
                self.base = Some(base);
                self.sealed.drain(..count);
            }
            Ok(Err(err)) => tracing::error!(error = %err, "store compaction failed; will retry"),
            Err(_) => tracing::error!("store compaction panicked; will retry"),
        }
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        self.finish_compaction(true);
    }
}

impl Engine for Log {
    fn apply(&mut self, batch: &[Write]) -> std::io::Result<()> {
        self.buf.clear();
        let start = begin_frame(&mut self.buf);
        for write in batch {
            match write {
                Write::Put { key, value } => put_op(&mut self.buf, OP_PUT, key, Some(value)),
                Write::Delete(keys) => {
                    for key in keys {
                        put_op(&mut self.buf, OP_DELETE, key, None);
                    }
                }
                Write::EndSession { key, prefixes } => {
                    put_op(&mut self.buf, OP_DELETE, key, None);
                    for prefix in prefixes {
                        put_op(&mut self.buf, OP_DELETE_PREFIX, prefix, None);
                    }
                }
                Write::Publish { .. } => {}
            }
        }
        end_frame(&mut self.buf, start);
        if self.broken {
            return Err(std::io::Error::other(
                "the log could not be repaired after a failed write; restart the broker",
            ));
        }
        // Written at the end of what is committed (not at the file cursor, which a failed
        // write may have moved past bytes since cut off).
        let written = self
            .current
            .write_all_at(&self.buf, self.size)
            .and_then(|()| self.current.sync_data());
        if let Err(err) = written {
            // Nothing may follow a torn frame in the same file: cut it off, or failing that,
            // go on in a new segment (a torn end is cut at the next start); failing both,
            // refuse every later write rather than append after garbage.
            if self.current.set_len(self.size).is_err() && self.rotate().is_err() {
                self.broken = true;
            }
            return Err(err);
        }
        self.size += self.buf.len() as u64;
        self.written += self.buf.len() as u64;
        if self.buf.capacity() > 4 << 20 {
            self.buf = Vec::new();
        }
        if self.size >= SEGMENT_MAX {
            if let Err(err) = self.rotate() {
                tracing::error!(error = %err, "store: cannot start a new log segment");
            }
        }
        Ok(())
    }

    fn take_records(&mut self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        std::mem::take(&mut self.records)
    }

    fn bytes_written(&self) -> u64 {
        self.written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("petrel-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn put(key: &str, value: &str) -> Write {
        Write::Put {
            key: key.as_bytes().to_vec(),
            value: bytes::Bytes::copy_from_slice(value.as_bytes()),
        }
    }

    fn keys(records: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<String> {
        records
            .keys()
            .filter(|k| k.as_slice() != record::META)
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect()
    }

    fn segment(dir: &Path) -> PathBuf {
        let (_, segments, _) = list(dir).unwrap();
        segments.last().unwrap().path.clone()
    }

    #[test]
    fn records_survive_reopen_with_deletes_and_prefixes() {
        let dir = temp_dir("reopen");
        {
            let mut log = open(&dir).unwrap();
            log.apply(&[put("a1", "x"), put("a2", "y"), put("b", "z")])
                .unwrap();
            log.apply(&[Write::Delete(vec![b"b".to_vec()])]).unwrap();
            log.apply(&[Write::EndSession {
                key: b"zz".to_vec(),
                prefixes: [b"a".to_vec(), b"q".to_vec(), b"r".to_vec(), b"w".to_vec()],
            }])
            .unwrap();
            log.apply(&[put("c", "w")]).unwrap();
        }
        let mut log = open(&dir).unwrap();
        let records = log.take_records();
        assert_eq!(keys(&records), ["c"]);
        assert_eq!(records[&b"c".to_vec()], b"w");
        // Opening compacted everything into one base and a fresh segment.
        let (base, segments, _) = list(&dir).unwrap();
        assert!(base.is_some());
        assert_eq!(segments.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_the_rest_kept() {
        let dir = temp_dir("torn");
        {
            let mut log = open(&dir).unwrap();
            log.apply(&[put("kept", "1")]).unwrap();
            log.apply(&[put("torn", "2")]).unwrap();
        }
        let path = segment(&dir);
        let len = std::fs::metadata(&path).unwrap().len();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(len - 3).unwrap();
        let (records, opened) = read_dir(&dir, false).unwrap();
        assert_eq!(keys(&records), ["kept"]);
        assert!(opened.torn > 0);
        let mut log = open(&dir).unwrap();
        assert_eq!(keys(&log.take_records()), ["kept"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn damage_with_data_after_it_is_refused() {
        let dir = temp_dir("damaged");
        {
            let mut log = open(&dir).unwrap();
            log.apply(&[put("one", "1111")]).unwrap();
            log.apply(&[put("two", "2222")]).unwrap();
        }
        let path = segment(&dir);
        let mut bytes = std::fs::read(&path).unwrap();
        // The first frame's body (after the file header and its frame header).
        let at = (HEADER_LEN + FRAME_HEADER + 2) as usize;
        bytes[at] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let err = open(&dir).err().expect("damage is refused");
        assert!(matches!(err, LogError::Damaged { .. }), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn another_version_or_a_foreign_file_is_refused() {
        let dir = temp_dir("version");
        drop(open(&dir).unwrap());
        let path = segment(&dir);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[8] = 9;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            open(&dir),
            Err(LogError::Version { version: 9, .. })
        ));
        std::fs::write(&path, b"hello world, not a log").unwrap();
        assert!(matches!(open(&dir), Err(LogError::NotALog { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn background_compaction_keeps_exactly_the_live_records() {
        let dir = temp_dir("compact");
        let big = "v".repeat(1 << 20);
        {
            let mut log = open(&dir).unwrap();
            // Enough to seal several segments; every other key deleted again.
            for i in 0..200u32 {
                log.apply(&[put(&format!("k{i:04}"), &big)]).unwrap();
                if i % 2 == 1 {
                    log.apply(&[Write::Delete(vec![format!("k{:04}", i - 1).into_bytes()])])
                        .unwrap();
                }
            }
            log.finish_compaction(true);
            assert!(log.base.is_some(), "a compaction ran");
        }
        let mut log = open(&dir).unwrap();
        let records = log.take_records();
        let expected: Vec<String> = (0..200u32)
            .filter(|i| i % 2 == 1)
            .map(|i| format!("k{i:04}"))
            .collect();
        assert_eq!(keys(&records), expected);
        assert!(records
            .values()
            .all(|v| v.len() == big.len() || v == &record::meta_value()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
