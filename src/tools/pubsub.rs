//! `petrel pub` and `petrel sub`: mosquitto_pub / mosquitto_sub over every transport.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;

use super::{generated_id, parse_qos, ConnectArgs};
use petrel::client::{Client, Event, Message, QoS, Received};

#[derive(Debug, Clone, clap::Args)]
pub struct PubArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Topic to publish to.
    #[arg(short = 't', long = "topic")]
    pub topic: String,
    /// Payload.
    #[arg(short = 'm', long = "message", conflicts_with_all = ["file", "stdin_lines"])]
    pub message: Option<String>,
    /// Send the contents of FILE as one message.
    #[arg(
        short = 'f',
        long = "file",
        value_name = "FILE",
        conflicts_with = "stdin_lines"
    )]
    pub file: Option<PathBuf>,
    /// Send each line of standard input as a message.
    #[arg(short = 'l', long = "stdin-lines")]
    pub stdin_lines: bool,
    #[arg(short = 'q', long = "qos", default_value = "0", value_parser = parse_qos)]
    pub qos: QoS,
    /// Set the retain flag.
    #[arg(short = 'r', long = "retain")]
    pub retain: bool,
    /// Publish the message N times.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub repeat: u64,
    /// Wait this long between repeats.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub interval_ms: u64,
    /// A v5 user property (repeatable).
    #[arg(long = "user-property", value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub user_properties: Vec<(String, String)>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct SubArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Topic filter (repeatable).
    #[arg(short = 't', long = "topic", required = true)]
    pub topics: Vec<String>,
    #[arg(short = 'q', long = "qos", default_value = "0", value_parser = parse_qos)]
    pub qos: QoS,
    /// Print the topic before each payload.
    #[arg(short = 'v', long = "verbose")]
    pub verbose: bool,
    /// Exit after COUNT messages.
    #[arg(short = 'C', long = "count", value_name = "COUNT")]
    pub count: Option<u64>,
    /// Exit after SECONDS without a message.
    #[arg(short = 'W', long = "timeout", value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// One JSON object per message, with its properties.
    #[arg(long)]
    pub json: bool,
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, not {text:?}"))
}

pub async fn publish(args: PubArgs) -> anyhow::Result<()> {
    let options = args.connect.options(&generated_id("petrel-pub"))?;
    let (client, _events) = Client::connect(options).await.context("cannot connect")?;
    let message = |payload: Bytes| {
        let mut m = Message::new(args.topic.clone(), payload)
            .qos(args.qos)
            .retain(args.retain);
        for (k, v) in &args.user_properties {
            m = m.user_property(k.clone(), v.clone());
        }
        m
    };
    if args.stdin_lines {
        for line in std::io::stdin().lock().lines() {
            let line = line.context("cannot read standard input")?;
            client.publish(message(Bytes::from(line))).await?;
        }
    } else {
        let payload = match (&args.message, &args.file) {
            (Some(m), _) => Bytes::from(m.clone()),
            (None, Some(path)) => Bytes::from(
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
            ),
            (None, None) => anyhow::bail!("give a payload: -m MESSAGE, -f FILE or --stdin-lines"),
        };
        for i in 0..args.repeat {
            if i > 0 && args.interval_ms > 0 {
                tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
            }
            client.publish(message(payload.clone())).await?;
        }
    }
    client.disconnect().await?;
    Ok(())
}

pub async fn subscribe(args: SubArgs) -> anyhow::Result<()> {
    let options = args.connect.options(&generated_id("petrel-sub"))?;
    let (client, mut events) = Client::connect(options).await.context("cannot connect")?;
    for topic in &args.topics {
        client
            .subscribe(topic, args.qos)
            .await
            .with_context(|| format!("cannot subscribe to {topic}"))?;
    }
    let mut received = 0u64;
    let mut out = std::io::stdout().lock();
    while args.count.is_none_or(|c| received < c) {
        let next = match args.timeout {
            Some(secs) => {
                match tokio::time::timeout(Duration::from_secs(secs), events.recv()).await {
                    Ok(event) => event,
                    Err(_) => break,
                }
            }
            None => events.recv().await,
        };
        let Some(event) = next else { break };
        match event {
            Event::Message(message) => {
                print_message(&mut out, &message, &args)?;
                received += 1;
            }
            Event::Disconnected { reason, .. } => eprintln!("disconnected: {reason}"),
            Event::Reconnecting { attempt, delay, .. } => {
                eprintln!("reconnecting (attempt {attempt}) in {delay:?}")
            }
            Event::Connected { .. } => {}
        }
    }
    drop(out);
    client.disconnect().await?;
    Ok(())
}

fn print_message(out: &mut impl Write, message: &Received, args: &SubArgs) -> std::io::Result<()> {
    if args.json {
        let user: Vec<_> = message
            .properties
            .user_properties
            .iter()
            .map(|(k, v)| serde_json::json!([k, v]))
            .collect();
        let line = serde_json::json!({
            "topic": message.topic,
            "payload": String::from_utf8_lossy(&message.payload),
            "qos": message.qos as u8,
            "retain": message.retain,
            "dup": message.dup,
            "user_properties": user,
            "content_type": message.properties.content_type,
            "response_topic": message.properties.response_topic,
            "message_expiry_interval": message.properties.message_expiry_interval,
            "subscription_identifiers": message.properties.subscription_identifiers,
        });
        writeln!(out, "{line}")?;
    } else {
        if args.verbose {
            write!(out, "{} ", message.topic)?;
        }
        out.write_all(&message.payload)?;
        writeln!(out)?;
    }
    out.flush()
}
