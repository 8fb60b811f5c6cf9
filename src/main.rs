//! The `petrel` command: runs the broker (the default) and its tools.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use petrel::config::{Config, ListenerKind};
use petrel::server::RunningBroker;
use tracing_subscriber::EnvFilter;

mod logging;
mod tools;

/// Petrel, a QUIC-first MQTT broker (MQTT 3.1, 3.1.1 and 5.0).
///
/// With no arguments it serves MQTT over TCP (0.0.0.0:1883), TLS (8883), WebSocket (8083,
/// path /mqtt), WebSocket over TLS (8084) and QUIC (14567/udp, ALPN mqtt), with a development
/// certificate made under
/// <data_dir>/certs/, and the defaults documented in petrel.example.toml. Naming any listener
/// on the command line (--tcp, --tls, --ws, --wss, --quic) starts only the listeners named there. Environment variables PETREL_SECTION__KEY=value override the file;
/// --set section.key=value overrides both.
#[derive(Debug, Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory for persistent state [default: ./data, or broker.data_dir].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Serve MQTT over TCP on ADDR (repeatable), e.g. 127.0.0.1:1883.
    #[arg(long, value_name = "ADDR")]
    tcp: Vec<SocketAddr>,
    /// Serve MQTT over TLS on ADDR (repeatable), e.g. 127.0.0.1:8883.
    #[arg(long, value_name = "ADDR")]
    tls: Vec<SocketAddr>,
    /// Serve MQTT over WebSocket on ADDR (repeatable), e.g. 127.0.0.1:8083.
    #[arg(long, value_name = "ADDR")]
    ws: Vec<SocketAddr>,
    /// Serve MQTT over WebSocket with TLS on ADDR (repeatable), e.g. 127.0.0.1:8084.
    #[arg(long, value_name = "ADDR")]
    wss: Vec<SocketAddr>,
    /// Serve MQTT over QUIC (UDP, ALPN mqtt) on ADDR (repeatable), e.g. 127.0.0.1:14567.
    #[arg(long, value_name = "ADDR")]
    quic: Vec<SocketAddr>,
    /// Override one setting, e.g. --set mqtt.max_packet_size=65536 (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker (the default when no command is given).
    Serve(ServeArgs),
    /// Validate a configuration file; exits non-zero naming the offending key.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Write a development CA, a server certificate (localhost, 127.0.0.1, ::1, this host)
    /// and a client certificate for mTLS: ca.pem/.key, server.pem/.key, client.pem/.key.
    Certs {
        /// Directory to write to (created if missing; existing files are replaced).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Common Name (and DNS SAN) of the client certificate.
        #[arg(long, value_name = "NAME", default_value = "petrel-client")]
        client_cn: String,
    },
    /// Add, update or delete a user in a password file (mosquitto_passwd's format and flags):
    /// `petrel passwd [-c] FILE USER` reads the password from standard input,
    /// `-b FILE USER PASSWORD` takes it from the command line, `-D FILE USER` deletes;
    /// `--hash argon2id|scram-sha-256` writes another hash than Mosquitto's `$7$`.
    Passwd(PasswdArgs),
    /// Publish messages (mosquitto_pub habits) over mqtt://, mqtts://, ws://, wss:// or quic://.
    Pub(tools::pubsub::PubArgs),
    /// Subscribe and print messages (mosquitto_sub habits) over any transport.
    Sub(tools::pubsub::SubArgs),
    /// End-to-end load generator: throughput, latency percentiles, losses, duplicates.
    Bench(Box<tools::bench::BenchArgs>),
    /// Administer a running broker over its HTTP API (emqx ctl's commands): status, stats,
    /// clients list|show|kick, subscriptions, retained list|show|delete,
    /// banned list|add|remove, reload.
    #[command(after_help = tools::ctl::EXIT_CODES)]
    Ctl(tools::ctl::CtlArgs),
    /// Inspect or repair the durable store (`<data_dir>/store`) while the broker is stopped.
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Read every file and record without changing anything; exits non-zero if the broker
    /// would refuse to start over it.
    Check {
        /// The store directory (`<data_dir>/store`, or the data directory holding it).
        dir: PathBuf,
    },
    /// Keep every record that can be read: damaged files are cut at their first bad frame,
    /// unreadable records dropped (each reported); the originals are moved into
    /// `DIR/damaged-<time>/`, never deleted.
    Repair {
        /// The store directory (`<data_dir>/store`, or the data directory holding it).
        dir: PathBuf,
    },
}

/// The store directory named on the command line: the directory itself, or the `store`
/// directory inside a data directory.
fn store_dir(dir: PathBuf) -> PathBuf {
    let inner = petrel::storage::store_dir(&dir);
    if inner.is_dir() {
        inner
    } else {
        dir
    }
}

fn store(command: StoreCommand) -> ExitCode {
    match command {
        StoreCommand::Check { dir } => {
            let dir = store_dir(dir);
            let report = petrel::storage::check::check(&dir);
            print!("{}: {}", dir.display(), report.text);
            if report.healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        StoreCommand::Repair { dir } => {
            let dir = store_dir(dir);
            match petrel::storage::check::repair(&dir) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("error: {err}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[derive(Debug, clap::Args)]
struct PasswdArgs {
    /// Create the file (replacing an existing one).
    #[arg(short = 'c')]
    create: bool,
    /// Batch mode: the password is the last argument.
    #[arg(short = 'b')]
    batch: bool,
    /// Delete the user.
    #[arg(short = 'D', conflicts_with_all = ["create", "batch"])]
    delete: bool,
    /// The hash to write: `pbkdf2` (Mosquitto's `$7$`, readable by mosquitto too),
    /// `argon2id`, or `scram-sha-256` (Petrel only; needed for MQTT 5 SCRAM-SHA-256
    /// authentication, and verifies plain passwords too).
    #[arg(long = "hash", value_name = "KIND", default_value = "pbkdf2")]
    hash: petrel::auth::password::HashKind,
    file: PathBuf,
    username: String,
    password: Option<String>,
}

fn passwd(args: PasswdArgs) -> anyhow::Result<()> {
    use petrel::auth::password::{PasswordFile, PasswordHash};
    anyhow::ensure!(
        !args.username.contains(':') && !args.username.is_empty(),
        "a username must be non-empty and contain no ':'"
    );
    let mut file = if args.create {
        PasswordFile::default()
    } else {
        PasswordFile::load(&args.file).map_err(anyhow::Error::msg)?
    };
    if args.delete {
        anyhow::ensure!(
            file.remove(&args.username),
            "user {} not found",
            args.username
        );
    } else {
        let password = match (args.batch, args.password) {
            (true, Some(password)) => password,
            (true, None) => anyhow::bail!("-b needs a password after the username"),
            (false, Some(_)) => anyhow::bail!("a password on the command line needs -b"),
            (false, None) => {
                eprint!("Password: ");
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)?;
                line.trim_end_matches(['\r', '\n']).to_owned()
            }
        };
        file.set(
            &args.username,
            PasswordHash::new(args.hash, password.as_bytes()),
        );
    }
    // Owner-only: it holds password hashes.
    petrel::transport::certs::write_owner_only(&args.file, &file.to_text())
        .with_context(|| format!("cannot write {}", args.file.display()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file }) => {
            let checked = Config::load(Some(&file), std::env::vars(), &[])
                .map_err(|err| err.to_string())
                .and_then(|config| petrel::auth::AuthService::load(&config.auth).map(drop));
            match checked {
                Ok(()) => {
                    println!("{}: ok", file.display());
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("error: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Certs { out, client_cn }) => {
            match petrel::transport::certs::write_bundle(&out, &client_cn) {
                Ok(files) => {
                    for file in files {
                        println!("{}", file.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("error: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Serve(args)) => run(args),
        Some(Command::Store(command)) => store(command),
        Some(Command::Passwd(args)) => match passwd(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Pub(args)) => tool(tools::pubsub::publish(args)),
        Some(Command::Sub(args)) => tool(tools::pubsub::subscribe(args)),
        Some(Command::Bench(args)) => tool(async move {
            let json = args.json;
            let report = tools::bench::run(*args).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{}", report.summary());
            }
            Ok(())
        }),
        Some(Command::Ctl(args)) => tools::ctl::run(args),
        None => run(cli.serve),
    }
}

/// Runs a client tool on a fresh runtime; errors go to standard error with a non-zero exit.
fn tool(task: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    block_on(task, |err| eprintln!("error: {err:#}"))
}

/// Runs `task` on a fresh multi-threaded runtime; an error is reported by `report` and
/// exits non-zero.
fn block_on(
    task: impl std::future::Future<Output = anyhow::Result<()>>,
    report: impl FnOnce(anyhow::Error),
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            report(err);
            ExitCode::FAILURE
        }
    }
}

fn run(args: ServeArgs) -> ExitCode {
    let mut config = match Config::load(args.config.as_deref(), std::env::vars(), &args.set) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    let named = [
        (ListenerKind::Tcp, &args.tcp),
        (ListenerKind::Tls, &args.tls),
        (ListenerKind::Ws, &args.ws),
        (ListenerKind::Wss, &args.wss),
        (ListenerKind::Quic, &args.quic),
    ];
    config.replace_listeners(
        named
            .iter()
            .flat_map(|(kind, addrs)| addrs.iter().map(move |&addr| (*kind, addr))),
    );
    if let Some(dir) = args.data_dir {
        config.broker.data_dir = dir;
    }
    // Held until the broker has stopped: dropping it flushes and closes the log file.
    let logging = match logging::init(&config.log) {
        Ok(logging) => logging,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let reload = Reload {
        config: args.config,
        sets: args.set,
        log: logging.reload.clone(),
    };
    block_on(serve(config, reload), |err| tracing::error!("{err:#}"))
}

/// What SIGHUP needs to re-read the configuration as the process was started with.
struct Reload {
    config: Option<PathBuf>,
    sets: Vec<String>,
    log: logging::LogReload,
}

impl Reload {
    /// What SIGHUP (and `petrel ctl reload`) does: the password and ACL files, then the
    /// configuration's log level and `$SYS` interval. On any error what was in force stays;
    /// the answer says what happened.
    fn run(&self, broker: &RunningBroker) -> Result<String, String> {
        let auth = broker.broker_auth_reload();
        let config = Config::load(self.config.as_deref(), std::env::vars(), &self.sets)
            .map_err(|err| format!("configuration not reloaded: {err}"));
        let config = match (auth, config) {
            (Err(err), _) => return Err(format!("reload failed, the old rules stay: {err}")),
            (Ok(_), Err(err)) => return Err(err),
            (Ok(described), Ok(config)) => {
                tracing::info!("reloaded: {described}");
                config
            }
        };
        if self.log.set_by_env() {
            tracing::info!("RUST_LOG is set, so log.level is not reloaded");
        } else if let Err(err) = self.log.set_level(&config.log.level) {
            return Err(format!("{err}; the log level stays {}", self.log.level()));
        }
        broker
            .apply(&config)
            .map_err(|err| format!("limits not reloaded: {err:#}"))?;
        Ok(format!("reloaded; log level {}", self.log.level()))
    }
}

async fn serve(config: Config, reload: Reload) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.broker.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            config.broker.data_dir.display()
        )
    })?;
    let mut broker = RunningBroker::start(&config).await?;
    tracing::info!(data_dir = %config.broker.data_dir.display(), "petrel {} ready", env!("CARGO_PKG_VERSION"));
    let requests = broker.take_reload_requests();
    wait_for_signal(&broker, &reload, requests).await;
    tracing::info!("shutting down");
    broker.shutdown().await;
    Ok(())
}

/// Waits for Ctrl-C or SIGTERM; SIGHUP reloads the password and ACL files and the log level
/// meanwhile.
async fn wait_for_signal(
    broker: &RunningBroker,
    reload: &Reload,
    mut requests: Option<tokio::sync::mpsc::Receiver<petrel::admin::ReloadRequest>>,
) {
    /// The next reload asked for through the API (never, without the API).
    async fn recv(
        requests: &mut Option<tokio::sync::mpsc::Receiver<petrel::admin::ReloadRequest>>,
    ) -> Option<petrel::admin::ReloadRequest> {
        match requests {
            Some(rx) => rx.recv().await,
            None => std::future::pending().await,
        }
    }
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(mut term), Ok(mut hup)) => loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    _ = term.recv() => break,
                    _ = hup.recv() => {
                        if let Err(err) = reload.run(broker) {
                            tracing::error!("{err}");
                        }
                    }
                    Some(answer) = recv(&mut requests) => {
                        let outcome = reload.run(broker);
                        if let Err(err) = &outcome {
                            tracing::error!("{err}");
                        }
                        let _ = answer.send(outcome);
                    }
                }
            },
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
