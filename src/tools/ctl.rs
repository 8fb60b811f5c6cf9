//! `petrel ctl`: the administrator's command line over the HTTP API (`/api/v5`, EMQX's paths
//! and JSON), with `emqx ctl`'s command names. It knows the API's routes and shapes, nothing of
//! the broker's internals, so it works against a broker on another host (or EMQX itself for the
//! commands EMQX shares). Blocking HTTP (ureq, in `http`): one request at a time, each
//! bounded by 10 s. This file holds the commands and their text output.
//!
//! Exit codes are part of the interface ([`EXIT_CODES`]): scripts tell "the API said no" (1)
//! from "nothing answered" (3). Credentials go only into the `Authorization` header: they are
//! never printed, not in errors and not in `Debug` output.

mod http;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{json, Value};

use http::{parse_json, Api, CtlError, CtlResult, Secret};

/// The `--help` text on exit codes; the README repeats it for readers without the binary.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the API refused the request (an HTTP error: `error: CODE: message` on standard error),
     or answered something that is not the API's
  2  usage error (bad arguments or options, an unreadable --cafile)
  3  the API could not be reached (connection refused, timeout, TLS failure)";

#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[command(subcommand)]
    command: CtlCommand,
}

/// Where the API is and who we are to it.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "API options")]
struct ApiArgs {
    /// Base URL of the HTTP API (http:// or https://).
    #[arg(
        long,
        global = true,
        env = "PETREL_API_URL",
        value_name = "URL",
        default_value = "http://127.0.0.1:18083"
    )]
    url: String,
    /// An API key from api.bootstrap_file, sent as HTTP Basic auth (preferred over --user).
    #[arg(
        long,
        global = true,
        env = "PETREL_API_KEY",
        hide_env_values = true,
        value_name = "KEY:SECRET"
    )]
    api_key: Option<Secret>,
    /// A dashboard user, sent as HTTP Basic auth with --password [default: admin when only a
    /// password is given].
    #[arg(long, global = true, env = "PETREL_API_USER", value_name = "NAME")]
    user: Option<String>,
    /// The dashboard user's password.
    #[arg(
        long,
        global = true,
        env = "PETREL_API_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD"
    )]
    password: Option<Secret>,
    /// CA certificate (PEM) to trust for an https:// API with a private CA (instead of the
    /// public roots).
    #[arg(long, global = true, value_name = "FILE")]
    cafile: Option<PathBuf>,
    /// Print the API's JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, clap::Subcommand)]
enum CtlCommand {
    /// Whether the broker runs (GET /api/v5/status; needs no credentials).
    Status,
    /// Connection, session, topic, subscription and retained counts (GET /api/v5/stats).
    Stats,
    /// Clients and sessions: list, show, kick.
    #[command(subcommand)]
    Clients(ClientsCommand),
    /// Subscriptions of every client (GET /api/v5/subscriptions).
    Subscriptions(SubscriptionsArgs),
    /// Retained messages: list, show, delete.
    #[command(subcommand)]
    Retained(RetainedCommand),
    /// The banned list: list, add, remove.
    #[command(subcommand)]
    Banned(BannedCommand),
    /// Re-read the password and ACL files, the log level and the $SYS interval, as SIGHUP
    /// does (POST /api/v5/reload); prints what was reloaded.
    Reload,
}

/// Paging of a listing: every page unless `--page` picks one.
#[derive(Debug, clap::Args)]
struct PageArgs {
    /// Rows per request (the API's page size, 1 to 10000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    limit: Option<u32>,
    /// Fetch only this page (from 1) [default: every page].
    #[arg(long, value_name = "P", value_parser = clap::value_parser!(u32).range(1..))]
    page: Option<u32>,
}

#[derive(Debug, clap::Subcommand)]
enum ClientsCommand {
    /// One line per client: id, username, address, transport, protocol version, state,
    /// subscriptions and queued messages.
    List {
        /// Only client ids containing this text.
        #[arg(long, value_name = "ID")]
        like: Option<String>,
        /// Only clients logged in as this user.
        #[arg(long, value_name = "U")]
        username: Option<String>,
        /// Only clients connected from this IP address.
        #[arg(long, value_name = "IP")]
        ip: Option<String>,
        /// Only connected clients, or only sessions without a connection.
        #[arg(long, value_name = "STATE", value_parser = ["connected", "disconnected"])]
        state: Option<String>,
        #[command(flatten)]
        paging: PageArgs,
    },
    /// A client's details and its subscriptions.
    Show { clientid: String },
    /// Disconnect a client (DELETE /api/v5/clients/{clientid}).
    Kick { clientid: String },
}

#[derive(Debug, clap::Args)]
struct SubscriptionsArgs {
    /// Only this client's subscriptions.
    #[arg(long, value_name = "ID")]
    clientid: Option<String>,
    /// Only subscriptions to exactly this filter.
    #[arg(long, value_name = "T")]
    topic: Option<String>,
    /// Only subscriptions whose filter matches this topic name.
    #[arg(long, value_name = "TOPIC")]
    match_topic: Option<String>,
    #[command(flatten)]
    paging: PageArgs,
}

#[derive(Debug, clap::Subcommand)]
enum RetainedCommand {
    /// Retained messages: topic, QoS, publisher.
    List {
        /// Only topics matching this filter (wildcards allowed).
        #[arg(long, value_name = "FILTER")]
        topic: Option<String>,
        #[command(flatten)]
        paging: PageArgs,
    },
    /// One retained message with its payload.
    Show { topic: String },
    /// Delete the retained message on a topic.
    Delete { topic: String },
}

#[derive(Debug, clap::Subcommand)]
enum BannedCommand {
    /// Every ban: kind, who, reason, by whom, since and until when.
    List {
        #[command(flatten)]
        paging: PageArgs,
    },
    /// Ban a client id, username or IP address (a banned client id is also kicked).
    Add {
        /// What WHO is.
        #[arg(long = "as", value_name = "KIND", value_parser = BAN_KINDS)]
        kind: String,
        who: String,
        #[arg(long, value_name = "R")]
        reason: Option<String>,
        /// End of the ban: RFC 3339 time, seconds since the epoch, or a duration from now
        /// such as 90m or 2days [default: never].
        #[arg(long, value_name = "WHEN")]
        until: Option<String>,
    },
    /// Lift a ban.
    Remove {
        #[arg(long = "as", value_name = "KIND", value_parser = BAN_KINDS)]
        kind: String,
        who: String,
    },
}

const BAN_KINDS: [&str; 3] = ["clientid", "username", "peerhost"];

/// Runs one `petrel ctl` command and exits as [`EXIT_CODES`] says.
pub fn run(args: CtlArgs) -> ExitCode {
    let outcome = Api::new(&args.api).and_then(|api| dispatch(&api, args.command));
    match outcome {
        Ok(text) => {
            write_stdout(&text);
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}

/// Writes to standard output, ignoring a closed pipe (`petrel ctl clients list | head`).
fn write_stdout(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

// ---- the commands -------------------------------------------------------------------------

const API: [&str; 2] = ["api", "v5"];

fn path<'a>(rest: &[&'a str]) -> Vec<&'a str> {
    API.iter().copied().chain(rest.iter().copied()).collect()
}

/// Runs `command`; the text to print on success.
fn dispatch(api: &Api, command: CtlCommand) -> CtlResult<String> {
    match command {
        CtlCommand::Status => {
            let query = if api.json {
                vec![("format", "json".to_owned())]
            } else {
                Vec::new()
            };
            let url = api.url(&path(&["status"]), &query);
            let text = api.call("GET", &url, None)?;
            Ok(line(&text))
        }
        CtlCommand::Stats => {
            let stats = api.get(&path(&["stats"]), &[("aggregate", "true".into())])?;
            Ok(if api.json {
                line(&stats.to_string())
            } else {
                key_values(&stats)
            })
        }
        CtlCommand::Clients(command) => clients(api, command),
        CtlCommand::Subscriptions(args) => {
            let query = [
                ("clientid", args.clientid),
                ("topic", args.topic),
                ("match_topic", args.match_topic),
            ];
            let (rows, body) = api.list(&path(&["subscriptions"]), filters(query), &args.paging)?;
            Ok(if api.json {
                line(&body.to_string())
            } else {
                subscription_table(&rows, true)
            })
        }
        CtlCommand::Retained(command) => retained(api, command),
        CtlCommand::Banned(command) => banned(api, command),
        CtlCommand::Reload => {
            let url = api.url(&path(&["reload"]), &[]);
            let answer = parse_json(&url, &api.call("POST", &url, None)?)?;
            Ok(if api.json {
                line(&answer.to_string())
            } else {
                line(&text(&answer["message"]))
            })
        }
    }
}

fn filters<const N: usize>(pairs: [(&str, Option<String>); N]) -> Vec<(&str, String)> {
    pairs
        .into_iter()
        .filter_map(|(key, value)| value.map(|v| (key, v)))
        .collect()
}

fn clients(api: &Api, command: ClientsCommand) -> CtlResult<String> {
    match command {
        ClientsCommand::List {
            like,
            username,
            ip,
            state,
            paging,
        } => {
            let query = [
                ("like_clientid", like),
                ("username", username),
                ("ip_address", ip),
                ("conn_state", state),
            ];
            let (rows, body) = api.list(&path(&["clients"]), filters(query), &paging)?;
            if api.json {
                return Ok(line(&body.to_string()));
            }
            let lines = rows.iter().map(|c| {
                vec![
                    text(&c["clientid"]),
                    text(&c["username"]),
                    peer(c),
                    text(&c["transport"]),
                    text(&c["proto_ver"]),
                    text(&c["conn_state"]),
                    text(&c["subscriptions_cnt"]),
                    text(&c["mqueue_len"]),
                ]
            });
            Ok(table(
                &[
                    "CLIENTID",
                    "USERNAME",
                    "PEER",
                    "TRANSPORT",
                    "PROTO",
                    "STATE",
                    "SUBS",
                    "MQUEUE",
                ],
                lines.collect(),
            ))
        }
        ClientsCommand::Show { clientid } => {
            let client = api.get(&path(&["clients", &clientid]), &[])?;
            let subscriptions = api.get(&path(&["clients", &clientid, "subscriptions"]), &[])?;
            if api.json {
                let both = json!({"client": client, "subscriptions": subscriptions});
                return Ok(line(&both.to_string()));
            }
            let mut out = key_values(&client);
            let subscriptions = subscriptions.as_array().cloned().unwrap_or_default();
            out.push_str(&format!("subscriptions: {}\n", subscriptions.len()));
            out.push_str(&indent(&subscription_table(&subscriptions, false)));
            Ok(out)
        }
        ClientsCommand::Kick { clientid } => {
            let url = api.url(&path(&["clients", &clientid]), &[]);
            api.call("DELETE", &url, None)?;
            Ok(quiet(api, format!("kicked {clientid}")))
        }
    }
}

fn retained(api: &Api, command: RetainedCommand) -> CtlResult<String> {
    match command {
        RetainedCommand::List { topic, paging } => {
            let segments = path(&["mqtt", "retainer", "messages"]);
            let (rows, body) = api.list(&segments, filters([("topic", topic)]), &paging)?;
            if api.json {
                return Ok(line(&body.to_string()));
            }
            let lines = rows.iter().map(|m| {
                vec![
                    text(&m["topic"]),
                    text(&m["qos"]),
                    text(&m["from_clientid"]),
                ]
            });
            Ok(table(&["TOPIC", "QOS", "FROM"], lines.collect()))
        }
        RetainedCommand::Show { topic } => {
            let mut message = api.get(&path(&["mqtt", "retainer", "message", &topic]), &[])?;
            if api.json {
                return Ok(line(&message.to_string()));
            }
            // The API sends the payload in base64: show it as text when it is UTF-8.
            let payload = message["payload"].as_str().map(|encoded| {
                base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .ok()
                    .and_then(|bytes| String::from_utf8(bytes).ok())
                    .map_or_else(|| json!(format!("(base64) {encoded}")), Value::from)
            });
            if let Some(payload) = payload {
                message["payload"] = payload;
            }
            Ok(key_values(&message))
        }
        RetainedCommand::Delete { topic } => {
            let url = api.url(&path(&["mqtt", "retainer", "message", &topic]), &[]);
            api.call("DELETE", &url, None)?;
            Ok(quiet(
                api,
                format!("deleted the retained message of {topic}"),
            ))
        }
    }
}

fn banned(api: &Api, command: BannedCommand) -> CtlResult<String> {
    match command {
        BannedCommand::List { paging } => {
            let (rows, body) = api.list(&path(&["banned"]), Vec::new(), &paging)?;
            Ok(if api.json {
                line(&body.to_string())
            } else {
                ban_table(&rows)
            })
        }
        BannedCommand::Add {
            kind,
            who,
            reason,
            until,
        } => {
            let mut body = json!({"as": kind, "who": who});
            if let Some(reason) = reason {
                body["reason"] = json!(reason);
            }
            if let Some(until) = until {
                body["until"] = json!(until_value(&until, SystemTime::now())?);
            }
            let url = api.url(&path(&["banned"]), &[]);
            let ban = parse_json(&url, &api.call("POST", &url, Some(body))?)?;
            Ok(if api.json {
                line(&ban.to_string())
            } else {
                ban_table(&[ban])
            })
        }
        BannedCommand::Remove { kind, who } => {
            let url = api.url(&path(&["banned", &kind, &who]), &[]);
            api.call("DELETE", &url, None)?;
            Ok(quiet(api, format!("removed the ban on {kind} {who}")))
        }
    }
}

/// `--until` as the API takes it: a duration from now (`90m`) becomes seconds since the
/// epoch; RFC 3339 times, epoch seconds and `infinity` pass unchanged (the API checks them).
fn until_value(text: &str, now: SystemTime) -> CtlResult<String> {
    if text.parse::<u64>().is_ok() || text == "infinity" {
        return Ok(text.to_owned());
    }
    if let Ok(duration) = humantime::parse_duration(text) {
        let end = now + duration;
        let secs = end.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        return Ok(secs.to_string());
    }
    humantime::parse_rfc3339_weak(text).map_err(|_| {
        CtlError::Usage(format!(
            "--until {text:?}: expected an RFC 3339 time, seconds since the epoch or a duration \
             such as 90m"
        ))
    })?;
    Ok(text.to_owned())
}

// ---- text output --------------------------------------------------------------------------

/// What a command with no answer body prints: a confirmation, nothing with `--json`.
fn quiet(api: &Api, message: String) -> String {
    if api.json {
        String::new()
    } else {
        line(&message)
    }
}

fn line(text: &str) -> String {
    format!("{}\n", text.trim_end())
}

/// A JSON value as a table cell: strings bare, null as `-`.
fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `ip:port` of a client (`[v6]:port`), `-` for a session without a connection.
fn peer(client: &Value) -> String {
    match (client["ip_address"].as_str(), client["port"].as_u64()) {
        (Some(ip), Some(port)) if ip.contains(':') => format!("[{ip}]:{port}"),
        (Some(ip), Some(port)) => format!("{ip}:{port}"),
        _ => "-".into(),
    }
}

/// `key: value` lines of an object, keys sorted.
fn key_values(object: &Value) -> String {
    let Some(map) = object.as_object() else {
        return line(&object.to_string());
    };
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    keys.iter()
        .map(|key| format!("{key}: {}\n", text(&map[*key])))
        .collect()
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

fn subscription_table(rows: &[Value], with_client: bool) -> String {
    let lines = rows.iter().map(|s| {
        let mut cells = Vec::new();
        if with_client {
            cells.push(text(&s["clientid"]));
        }
        cells.extend(["topic", "qos", "nl", "rap", "rh"].map(|k| text(&s[k])));
        cells
    });
    let header: &[&str] = if with_client {
        &["CLIENTID", "TOPIC", "QOS", "NL", "RAP", "RH"]
    } else {
        &["TOPIC", "QOS", "NL", "RAP", "RH"]
    };
    table(header, lines.collect())
}

fn ban_table(rows: &[Value]) -> String {
    let lines = rows.iter().map(|b| {
        ["as", "who", "reason", "by", "at", "until"]
            .map(|k| text(&b[k]))
            .to_vec()
    });
    table(
        &["AS", "WHO", "REASON", "BY", "AT", "UNTIL"],
        lines.collect(),
    )
}

/// Columns padded to their widest cell under a header; nothing at all for no rows (so
/// `| wc -l` counts rows plus one only when there are some).
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn table_aligns_columns_and_prints_nothing_for_no_rows() {
        let rows = vec![
            vec!["a".to_owned(), "1".to_owned()],
            vec!["longer".to_owned(), "22".to_owned()],
        ];
        assert_eq!(
            table(&["ID", "N"], rows),
            "ID      N\na       1\nlonger  22\n"
        );
        assert_eq!(table(&["ID"], Vec::new()), "");
    }

    #[test]
    fn until_takes_durations_from_now_and_passes_times_through() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(until_value("90m", now).unwrap(), "6400");
        assert_eq!(until_value("1700000000", now).unwrap(), "1700000000");
        assert_eq!(
            until_value("2030-01-01T00:00:00Z", now).unwrap(),
            "2030-01-01T00:00:00Z"
        );
        assert_eq!(until_value("infinity", now).unwrap(), "infinity");
        assert!(matches!(
            until_value("someday", now),
            Err(CtlError::Usage(_))
        ));
    }
}
