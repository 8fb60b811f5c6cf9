//! The broker's log: the `tracing` subscriber that `petrel` (serve) installs from `[log]`, and
//! the handle that swaps its level filter while the broker runs (SIGHUP).
//!
//! Output goes to standard output as text (colours only on a terminal, and never with
//! `NO_COLOR`) or as JSON, one object per line; with `log.file` the same lines also go to a
//! rotated file, never coloured. The library never installs a subscriber: only this binary
//! module decides where the log goes.

use std::io::IsTerminal as _;
use std::path::Path;

use anyhow::Context as _;
use petrel::config::{LogFormat, LogRotation, LogSection};
use tracing_appender::non_blocking::{NonBlocking, WorkerGuard};
use tracing_appender::rolling::{RollingFileAppender, Rotation};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Layered, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{fmt, reload, EnvFilter, Layer, Registry};

/// The subscriber under the output layers: the registry behind the reloadable filter.
type Filtered = Layered<reload::Layer<EnvFilter, Registry>, Registry>;
type OutputLayer = Box<dyn Layer<Filtered> + Send + Sync>;

/// The installed log. Keep it until the process ends: dropping it stops the file writer.
pub struct Logging {
    pub reload: LogReload,
    /// Flushes the lines still queued for the file when dropped (`None` without `log.file`).
    _file_guard: Option<WorkerGuard>,
}

/// Changes the level filter of the running log.
#[derive(Clone)]
pub struct LogReload {
    handle: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` chose the filter at start-up, and it wins over `log.level`.
    from_env: bool,
}

impl LogReload {
    /// Replaces the filter by `level` (a `tracing` filter such as `debug` or
    /// `info,petrel=trace`) and logs "log level now ..."; an invalid one is refused and the
    /// current filter stays.
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        let filter = EnvFilter::try_new(level)
            .map_err(|err| format!("invalid log level `{level}`: {err}"))?;
        // The operator should see the change either way: a filter quieter than info would
        // hide the line, so it is written under the old one.
        let quieter = filter
            .max_level_hint()
            .is_some_and(|max| max < LevelFilter::INFO);
        if quieter {
            tracing::info!("log level now {level}");
        }
        self.handle
            .reload(filter)
            .map_err(|err| format!("cannot change the log level: {err}"))?;
        if !quieter {
            tracing::info!("log level now {level}");
        }
        Ok(())
    }

    /// The filter in force, as text.
    pub fn level(&self) -> String {
        self.handle
            .with_current(ToString::to_string)
            .unwrap_or_else(|_| "unknown".into())
    }

    /// Whether `RUST_LOG` set the filter (a reload of `log.level` then leaves it alone).
    pub fn set_by_env(&self) -> bool {
        self.from_env
    }
}

/// Installs the global subscriber described by `settings`. `RUST_LOG`, when set and valid,
/// replaces `log.level`.
pub fn init(settings: &LogSection) -> anyhow::Result<Logging> {
    let env = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    let (filter, from_env, env_error) = match env.as_deref().map(EnvFilter::try_new) {
        Some(Ok(filter)) => (filter, true, None),
        // A bad RUST_LOG falls back to the file's level, and says so once the log is up.
        other => (
            EnvFilter::try_new(&settings.level)
                .with_context(|| format!("invalid value for `log.level`: {}", settings.level))?,
            false,
            other.and_then(Result::err),
        ),
    };
    let (filter, handle) = reload::Layer::new(filter);

    let ansi = std::io::stdout().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let mut outputs = vec![output(settings.format, ansi, std::io::stdout)];
    let file_guard = match &settings.file {
        Some(path) => {
            let (writer, guard) = file_writer(path, settings.rotation, settings.max_files)?;
            outputs.push(output(settings.format, false, writer));
            Some(guard)
        }
        None => None,
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(outputs)
        .try_init()
        .context("cannot install the log subscriber")?;
    if let Some(err) = env_error {
        tracing::warn!(
            "RUST_LOG ignored ({err}); using log.level = {}",
            settings.level
        );
    }
    Ok(Logging {
        reload: LogReload { handle, from_env },
        _file_guard: file_guard,
    })
}

/// One output in `format`; `ansi` applies to text only (JSON is never coloured).
fn output<W>(format: LogFormat, ansi: bool, writer: W) -> OutputLayer
where
    W: for<'w> fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        LogFormat::Text => fmt::layer().with_ansi(ansi).with_writer(writer).boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .with_ansi(false)
            .with_writer(writer)
            .boxed(),
    }
}

/// A writer to `path`, rotated every `rotation` (the date is appended to the file name) and
/// keeping `max_files` files (0: all). Its directory is created if missing.
fn file_writer(
    path: &Path,
    rotation: LogRotation,
    max_files: usize,
) -> anyhow::Result<(NonBlocking, WorkerGuard)> {
    let name = path
        .file_name()
        .with_context(|| format!("log.file {} does not name a file", path.display()))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the log directory {}", dir.display()))?;
    let rotation = match rotation {
        LogRotation::Minutely => Rotation::MINUTELY,
        LogRotation::Hourly => Rotation::HOURLY,
        LogRotation::Daily => Rotation::DAILY,
        LogRotation::Never => Rotation::NEVER,
    };
    let appender = RollingFileAppender::builder()
        .rotation(rotation)
        .filename_prefix(name.to_string_lossy())
        .max_log_files(max_files)
        .build(dir)
        .with_context(|| format!("cannot open the log file {}", path.display()))?;
    // Written by a thread of its own, so a slow disk never stalls a connection task; past
    // its queue (128k lines) lines are dropped rather than blocking the broker.
    Ok(tracing_appender::non_blocking(appender))
}
