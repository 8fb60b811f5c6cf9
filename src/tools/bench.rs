//! `petrel bench`: an end-to-end MQTT load generator in the manner of emqtt-bench.
//!
//! Every payload carries a sequence number, the send time (nanoseconds since the Unix epoch,
//! so a `sub` run in another process on the same machine can measure latency too) and the
//! publisher's index. Subscribers count deliveries per publisher and sequence number, so the
//! report tells losses, duplicates and reorderings apart, and records latency in an
//! HdrHistogram. Publishers run closed-loop (at most `--inflight` publishes awaiting their
//! acknowledgement each) or at a fixed `--rate`. The bench's own CPU use is reported so a
//! reader can see whether the load generator was the bottleneck.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{generated_id, parse_qos, ConnectArgs};
use petrel::client::{Client, Event, Events, Message, QoS, SharedTransport};

/// Sequence, send time, publisher index.
const HEADER: usize = 8 + 8 + 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// N publishers, each on its own topic, to every subscriber on `PREFIX/#`.
    FanIn,
    /// Publishers on one topic, M subscribers to it.
    FanOut,
    /// N pairs: publisher i to subscriber i on topic i.
    P2p,
    /// Publishers only: publish rate and acknowledgement latency.
    Pub,
    /// Subscribers only, on `PREFIX/#`, for publishers elsewhere (e.g. another `bench pub`).
    Sub,
    /// Connection storm: N clients connect at once and then stay idle.
    Conn,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    #[arg(long, value_enum, default_value = "fan-in")]
    pub scenario: Scenario,
    /// Publishers (for `conn`: connections).
    #[arg(long, default_value_t = 1)]
    pub pubs: usize,
    /// Subscribers (`p2p` uses one per publisher).
    #[arg(long, default_value_t = 1)]
    pub subs: usize,
    #[arg(short = 'q', long = "qos", default_value = "0", value_parser = parse_qos)]
    pub qos: QoS,
    /// Payload bytes (at least 20: sequence, timestamp, publisher).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Seconds of publishing (for `conn` and `sub`: of holding on).
    #[arg(long, default_value_t = 5)]
    pub duration: u64,
    /// Stop each publisher after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Messages per second per publisher [default: as fast as the window allows].
    #[arg(long)]
    pub rate: Option<f64>,
    /// Publishes awaiting acknowledgement per publisher (closed loop).
    #[arg(long, default_value_t = 64)]
    pub inflight: usize,
    /// Topic prefix; a random run id is appended so runs never mix.
    #[arg(long, default_value = "petrel-bench")]
    pub topic_prefix: String,
    /// Seconds to wait for stragglers after the publishers stop.
    #[arg(long, default_value_t = 3)]
    pub drain: u64,
    /// Connections opened at once in `conn` (and while setting up other scenarios).
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// Local addresses the `conn` storm's connections are made from, in turn (e.g.
    /// 127.0.0.1,127.0.0.2 on loopback): one address has only ~28 k ephemeral ports, and
    /// connecting slows once about half of them are in use. Default: the system's choice.
    #[arg(long, value_delimiter = ',', value_name = "IP,...")]
    pub source_addrs: Vec<std::net::IpAddr>,
    /// `conn`: the storm's clients share their TLS and QUIC configurations (the CA parsed
    /// once) and one QUIC endpoint (UDP socket) per this many clients
    /// (`ClientOptions::shared_transport`), so that the load generator costs less than the
    /// broker it measures; 0: every client builds its own, as an application's client does.
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub clients_per_endpoint: usize,
    /// Publish through EMQX's delayed publish (`$delayed/SECONDS/topic`); latency is then
    /// measured from the publish plus the delay (how late each message fired).
    #[arg(long, value_name = "SECONDS")]
    pub delay: Option<u32>,
    /// Subscribers join the shared group GROUP (`$share/GROUP/...`): each message goes to
    /// one of them, so one delivery is expected per message (duplicates are counted per
    /// subscriber only).
    #[arg(long, value_name = "GROUP")]
    pub share: Option<String>,
    /// Persistent sessions for every client (3.1.1: clean session 0; 5: session expiry
    /// 300 s), so the broker keeps, and with a durable store writes, each delivery.
    #[arg(long)]
    pub persistent: bool,
    /// Subscribers connect here instead of `--url`, in turn (repeat it: subscriber i uses
    /// the i-th modulo their number), e.g. other nodes of a cluster than the publishers'.
    #[arg(long, value_name = "URL")]
    pub sub_url: Vec<String>,
    /// Milliseconds to wait between subscribing and publishing (a cluster's nodes learn of
    /// new subscriptions asynchronously).
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub settle_ms: u64,
    /// Write the report as one JSON object on standard output.
    #[arg(long)]
    pub json: bool,
    /// No progress lines on standard error.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Self {
        Self {
            count: h.len(),
            mean_us: (h.mean() * 10.0).round() / 10.0,
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub scenario: Scenario,
    pub url: String,
    pub qos: u8,
    pub size: usize,
    pub pubs: usize,
    pub subs: usize,
    pub seconds: f64,
    pub sent: u64,
    /// Deliveries the subscribers should have seen (sent x matching subscribers).
    pub expected: u64,
    /// Distinct deliveries seen.
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Deliveries per second, from the start of publishing to the last delivery (so a broker
    /// that queues and delivers late is not flattered).
    pub delivered_per_sec: f64,
    /// Seconds from the start of publishing to the last delivery.
    pub delivery_seconds: f64,
    pub sent_per_sec: f64,
    pub bytes_per_sec: f64,
    /// Publish to delivery (subscribers), or publish to acknowledgement (`pub`).
    pub latency: Option<Latency>,
    pub reconnects: u64,
    /// Connection storm: time until 99 % and 100 % of the clients were connected.
    pub connect_p99_ms: Option<f64>,
    pub connect_all_ms: Option<f64>,
    pub connect_failures: u64,
    /// CPU used by this bench process, in percent of one core, over the whole run.
    pub bench_cpu_percent: f64,
}

impl BenchReport {
    /// A human-readable summary (the JSON form has every field).
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{:?} over {} QoS {} {} B, {} pub / {} sub, {:.1} s: sent {} ({:.0}/s), delivered {} of {} ({:.0}/s, {:.1} MB/s), lost {}, duplicates {}, reordered {}",
            self.scenario,
            self.url,
            self.qos,
            self.size,
            self.pubs,
            self.subs,
            self.seconds,
            self.sent,
            self.sent_per_sec,
            self.delivered,
            self.expected,
            self.delivered_per_sec,
            self.bytes_per_sec / 1e6,
            self.lost,
            self.duplicates,
            self.reordered
        );
        if let Some(l) = &self.latency {
            s += &format!(
                "\nlatency us: p50 {} p90 {} p99 {} p99.9 {} max {} (mean {:.1}, n {})",
                l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us, l.mean_us, l.count
            );
        }
        if let (Some(p99), Some(all)) = (self.connect_p99_ms, self.connect_all_ms) {
            s += &format!(
                "\nconnected: 99 % in {p99:.0} ms, all in {all:.0} ms, {} failed",
                self.connect_failures
            );
        }
        s += &format!(
            "\nreconnects {}, bench CPU {:.0} % of one core",
            self.reconnects, self.bench_cpu_percent
        );
        s
    }
}

/// What one subscriber saw, per publisher.
struct Tally {
    seen: Vec<Vec<u64>>,
    last: Vec<Option<u64>>,
    distinct: u64,
    duplicates: u64,
    reordered: u64,
    latency: Histogram<u64>,
    /// When the last new delivery arrived.
    last_at: Option<Instant>,
}

impl Tally {
    fn new(pubs: usize) -> Self {
        Self {
            seen: vec![Vec::new(); pubs],
            last: vec![None; pubs],
            distinct: 0,
            duplicates: 0,
            reordered: 0,
            latency: histogram(),
            last_at: None,
        }
    }

    fn record(&mut self, payload: &[u8], now_ns: u64) -> bool {
        let Some((seq, sent_ns, publisher)) = parse_header(payload) else {
            return false;
        };
        let publisher = publisher as usize;
        if publisher >= self.seen.len() {
            self.seen.resize(publisher + 1, Vec::new());
            self.last.resize(publisher + 1, None);
        }
        let bits = &mut self.seen[publisher];
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= bits.len() {
            bits.resize(word + 1, 0);
        }
        if bits[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return false;
        }
        bits[word] |= 1 << bit;
        self.distinct += 1;
        self.last_at = Some(Instant::now());
        if self.last[publisher].is_some_and(|last| seq < last) {
            self.reordered += 1;
        }
        self.last[publisher] = Some(self.last[publisher].map_or(seq, |l| l.max(seq)));
        self.latency
            .saturating_record(now_ns.saturating_sub(sent_ns) / 1000);
        true
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}

fn payload(size: usize, seq: u64, publisher: u32) -> Bytes {
    let mut buf = BytesMut::with_capacity(size.max(HEADER));
    buf.put_u64(seq);
    buf.put_u64(unix_ns());
    buf.put_u32(publisher);
    buf.resize(size.max(HEADER), 0x5a);
    buf.freeze()
}

fn parse_header(payload: &[u8]) -> Option<(u64, u64, u32)> {
    let header = payload.get(..HEADER)?;
    let seq = u64::from_be_bytes(header[0..8].try_into().ok()?);
    let sent = u64::from_be_bytes(header[8..16].try_into().ok()?);
    let publisher = u32::from_be_bytes(header[16..20].try_into().ok()?);
    Some((seq, sent, publisher))
}

/// CPU seconds (user + system) used by this process so far, from /proc (Linux's 100 Hz
/// clock tick); `None` where /proc is missing.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

struct Counters {
    sent: AtomicU64,
    delivered: AtomicU64,
    reconnects: AtomicU64,
}

/// Runs a benchmark and returns its report (also printed unless `quiet` / `json`).
pub async fn run(args: BenchArgs) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(args.inflight > 0, "--inflight must be at least 1");
    let cpu_start = cpu_seconds();
    let wall_start = Instant::now();
    let run_id = generated_id("run");
    let prefix = format!("{}/{run_id}", args.topic_prefix);
    let counters = Arc::new(Counters {
        sent: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let url = args.connect.urls.first().cloned().unwrap_or_default();

    if args.scenario == Scenario::Conn {
        let mut report = connection_storm(&args, &url).await?;
        report.bench_cpu_percent = cpu_percent(cpu_start, wall_start);
        return Ok(report);
    }

    let (pubs, subs) = match args.scenario {
        Scenario::P2p => (args.pubs, args.pubs),
        Scenario::Pub => (args.pubs, 0),
        Scenario::Sub => (0, args.subs),
        _ => (args.pubs, args.subs),
    };
    let topic_of = |p: usize| {
        let topic = match args.scenario {
            Scenario::FanOut => format!("{prefix}/all"),
            _ => format!("{prefix}/{p}"),
        };
        match args.delay {
            Some(seconds) => format!("$delayed/{seconds}/{topic}"),
            None => topic,
        }
    };
    let filter_of = |s: usize| match args.scenario {
        Scenario::P2p => format!("{prefix}/{s}"),
        Scenario::FanOut => format!("{prefix}/all"),
        Scenario::Sub => format!("{}/#", args.topic_prefix),
        _ => format!("{prefix}/#"),
    };

    let filter_of = |s: usize| match &args.share {
        Some(group) => format!("$share/{group}/{}", filter_of(s)),
        None => filter_of(s),
    };
    // Subscribers first, so nothing published is missed.
    let subscribers = connect_all(&args, "bench-sub", subs).await?;
    for (i, (client, _)) in subscribers.iter().enumerate() {
        client
            .subscribe(&filter_of(i), args.qos)
            .await
            .with_context(|| format!("subscriber {i} cannot subscribe"))?;
    }
    if args.settle_ms > 0 {
        tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
    }
    let publishers = connect_all(&args, "bench-pub", pubs).await?;

    let mut sub_tasks = JoinSet::new();
    for (client, events) in subscribers {
        let counters = Arc::clone(&counters);
        let delay_ns = u64::from(args.delay.unwrap_or(0)) * 1_000_000_000;
        sub_tasks.spawn(collect(
            client,
            events,
            pubs,
            counters,
            stop_rx.clone(),
            delay_ns,
        ));
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration);
    let mut pub_tasks = JoinSet::new();
    for (i, (client, events)) in publishers.into_iter().enumerate() {
        let counters = Arc::clone(&counters);
        let topic = topic_of(i);
        let args = args.clone();
        pub_tasks.spawn(publish_loop(
            client, events, i as u32, topic, args, deadline, counters,
        ));
    }

    let progress = (!args.quiet).then(|| tokio::spawn(progress(Arc::clone(&counters), started)));
    let mut ack_latency = histogram();
    let mut idle_publishers = Vec::new();
    while let Some(done) = pub_tasks.join_next().await {
        let (histogram, client) = done.context("a publisher failed")??;
        ack_latency.add(histogram).ok();
        // Publishers stay connected until the subscribers have drained.
        idle_publishers.push(client);
    }
    if args.scenario == Scenario::Sub {
        tokio::time::sleep_until(deadline.into()).await;
    }
    let publishing = started.elapsed().as_secs_f64();
    let sent = counters.sent.load(Ordering::Relaxed);
    let per_message = match args.scenario {
        Scenario::FanIn | Scenario::FanOut if args.share.is_some() => 1,
        Scenario::FanIn | Scenario::FanOut => subs as u64,
        Scenario::P2p => 1,
        Scenario::Pub | Scenario::Sub | Scenario::Conn => 0,
    };
    let expected = sent * per_message;
    // Drain: wait for stragglers, bounded.
    let drain_until =
        Instant::now() + Duration::from_secs(args.drain + u64::from(args.delay.unwrap_or(0)));
    while counters.delivered.load(Ordering::Relaxed) < expected && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    if let Some(progress) = progress {
        progress.abort();
    }
    let mut tallies = Vec::new();
    while let Some(done) = sub_tasks.join_next().await {
        tallies.push(done.context("a subscriber failed")?);
    }
    for client in idle_publishers {
        let _ = client.disconnect().await;
    }
    let mut latency = histogram();
    let (mut delivered, mut duplicates, mut reordered) = (0, 0, 0);
    let last_delivery = tallies.iter().filter_map(|t| t.last_at).max();
    let delivering = last_delivery.map_or(0.0, |at| at.duration_since(started).as_secs_f64());
    for tally in &tallies {
        latency.add(&tally.latency).ok();
        delivered += tally.distinct;
        duplicates += tally.duplicates;
        reordered += tally.reordered;
    }
    let measured = match args.scenario {
        Scenario::Pub => &ack_latency,
        _ => &latency,
    };
    let count_rate = |n: u64| {
        if publishing > 0.0 {
            n as f64 / publishing
        } else {
            0.0
        }
    };
    Ok(BenchReport {
        scenario: args.scenario,
        url,
        qos: args.qos as u8,
        size: args.size.max(HEADER),
        pubs,
        subs,
        seconds: (publishing * 1000.0).round() / 1000.0,
        sent,
        expected,
        delivered,
        lost: expected.saturating_sub(delivered),
        duplicates,
        reordered,
        delivered_per_sec: if delivering > 0.0 {
            (delivered as f64 / delivering).round()
        } else {
            0.0
        },
        delivery_seconds: (delivering * 1000.0).round() / 1000.0,
        sent_per_sec: count_rate(sent).round(),
        bytes_per_sec: if delivering > 0.0 {
            (delivered as f64 / delivering * args.size.max(HEADER) as f64).round()
        } else {
            0.0
        },
        latency: (!measured.is_empty()).then(|| Latency::of(measured)),
        reconnects: counters.reconnects.load(Ordering::Relaxed),
        connect_p99_ms: None,
        connect_all_ms: None,
        connect_failures: 0,
        bench_cpu_percent: cpu_percent(cpu_start, wall_start),
    })
}

fn cpu_percent(start: Option<f64>, wall: Instant) -> f64 {
    match (start, cpu_seconds()) {
        (Some(a), Some(b)) => ((b - a) / wall.elapsed().as_secs_f64() * 1000.0).round() / 10.0,
        _ => 0.0,
    }
}

async fn connect_all(
    args: &BenchArgs,
    role: &str,
    n: usize,
) -> anyhow::Result<Vec<(Client, Events)>> {
    let mut set = JoinSet::new();
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let mut connect = args.connect.clone();
        if role == "bench-sub" && !args.sub_url.is_empty() {
            connect.urls = vec![args.sub_url[i % args.sub_url.len()].clone()];
        }
        let mut options = connect
            .options(&generated_id(&format!("{role}-{i}")))?
            .offline_buffer(args.inflight.max(1000))
            .event_capacity(4096);
        if args.persistent {
            options = options.persistent(300);
        }
        set.spawn(async move { (i, Client::connect(options).await) });
        if set.len() >= args.connect_concurrency.max(1) {
            collect_connected(&mut set, &mut clients, role).await?;
        }
    }
    while !set.is_empty() {
        collect_connected(&mut set, &mut clients, role).await?;
    }
    clients.sort_by_key(|(i, _)| *i);
    Ok(clients.into_iter().map(|(_, c)| c).collect())
}

type Connecting = JoinSet<(usize, Result<(Client, Events), petrel::client::ClientError>)>;

async fn collect_connected(
    set: &mut Connecting,
    into: &mut Vec<(usize, (Client, Events))>,
    role: &str,
) -> anyhow::Result<()> {
    if let Some(done) = set.join_next().await {
        let (i, connected) = done?;
        into.push((
            i,
            connected.with_context(|| format!("{role} {i} cannot connect"))?,
        ));
    }
    Ok(())
}

async fn publish_loop(
    client: Client,
    mut events: Events,
    index: u32,
    topic: String,
    args: BenchArgs,
    deadline: Instant,
    counters: Arc<Counters>,
) -> anyhow::Result<(Histogram<u64>, Client)> {
    let mut acks = histogram();
    let mut pending = std::collections::VecDeque::with_capacity(args.inflight);
    let interval = args
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(1.0 / r));
    let mut next_send = Instant::now();
    let mut seq = 0u64;
    // Reconnect events are counted; the publisher's own events are otherwise not needed.
    let reconnects = Arc::clone(&counters);
    let watcher = tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if matches!(event, Event::Reconnecting { .. }) {
                reconnects.reconnects.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    while Instant::now() < deadline && args.count.is_none_or_lt(seq) {
        if let Some(interval) = interval {
            tokio::time::sleep_until(next_send.into()).await;
            next_send += interval;
        }
        if pending.len() >= args.inflight {
            let handle: petrel::client::PublishHandle = pending.pop_front().expect("non-empty");
            let outcome = handle.await.context("publish failed")?;
            acks.saturating_record(outcome.latency.as_micros() as u64);
        }
        let message = Message::new(topic.clone(), payload(args.size, seq, index)).qos(args.qos);
        pending.push_back(
            client
                .publish_nowait(message)
                .await
                .context("publish failed")?,
        );
        counters.sent.fetch_add(1, Ordering::Relaxed);
        seq += 1;
    }
    while let Some(handle) = pending.pop_front() {
        let outcome = handle.await.context("publish failed")?;
        acks.saturating_record(outcome.latency.as_micros() as u64);
    }
    watcher.abort();
    Ok((acks, client))
}

/// `Option<u64>::is_none_or(|c| n < c)` for Rust 1.80.
trait CountLimit {
    fn is_none_or_lt(&self, n: u64) -> bool;
}

impl CountLimit for Option<u64> {
    fn is_none_or_lt(&self, n: u64) -> bool {
        self.is_none_or(|c| n < c)
    }
}

async fn collect(
    client: Client,
    mut events: Events,
    pubs: usize,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
    delay_ns: u64,
) -> Tally {
    let mut tally = Tally::new(pubs);
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let Some(event) = event else { break };
        match event {
            Event::Message(message)
                if tally.record(&message.payload, unix_ns().saturating_sub(delay_ns)) =>
            {
                counters.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Event::Reconnecting { .. } => {
                counters.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
    let _ = client.disconnect().await;
    tally
}

async fn progress(counters: Arc<Counters>, started: Instant) {
    let mut last = (0, 0);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let sent = counters.sent.load(Ordering::Relaxed);
        let delivered = counters.delivered.load(Ordering::Relaxed);
        eprintln!(
            "{:>5.1} s  sent {sent} (+{}/s)  delivered {delivered} (+{}/s)",
            started.elapsed().as_secs_f64(),
            sent - last.0,
            delivered - last.1
        );
        last = (sent, delivered);
    }
}

async fn connection_storm(args: &BenchArgs, url: &str) -> anyhow::Result<BenchReport> {
    let n = args.pubs.max(1);
    let started = Instant::now();
    let mut times = Vec::with_capacity(n);
    let mut failures = 0u64;
    let mut clients = Vec::with_capacity(n);
    let mut set = JoinSet::new();
    let shared = match args.clients_per_endpoint {
        0 => None,
        per => Some(Arc::new(SharedTransport::new(
            &args.connect.options("bench-conn")?,
            n.div_ceil(per),
        )?)),
    };
    for i in 0..n {
        let mut options = args
            .connect
            .options(&generated_id(&format!("bench-conn-{i}")))?;
        if let Some(shared) = &shared {
            options = options.shared_transport(Arc::clone(shared));
        }
        if !args.source_addrs.is_empty() {
            options.local_addr = Some(args.source_addrs[i % args.source_addrs.len()]);
        }
        set.spawn(async move { Client::connect(options).await });
        while set.len() >= args.connect_concurrency.max(1) {
            take_one(&mut set, &mut clients, &mut times, &mut failures, started).await;
        }
    }
    while !set.is_empty() {
        take_one(&mut set, &mut clients, &mut times, &mut failures, started).await;
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| {
        times
            .get(((times.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
    };
    if !args.quiet {
        eprintln!(
            "{} connected, holding them for {} s",
            clients.len(),
            args.duration
        );
    }
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    for (client, _) in &clients {
        let _ = client.disconnect().await;
    }
    Ok(BenchReport {
        scenario: Scenario::Conn,
        url: url.to_owned(),
        qos: args.qos as u8,
        size: 0,
        pubs: n,
        subs: 0,
        seconds: args.duration as f64,
        sent: 0,
        expected: 0,
        delivered: 0,
        lost: 0,
        duplicates: 0,
        reordered: 0,
        delivered_per_sec: 0.0,
        delivery_seconds: 0.0,
        sent_per_sec: 0.0,
        bytes_per_sec: 0.0,
        latency: None,
        reconnects: 0,
        connect_p99_ms: at(0.99),
        connect_all_ms: times.last().copied(),
        connect_failures: failures,
        bench_cpu_percent: 0.0,
    })
}

async fn take_one(
    set: &mut JoinSet<Result<(Client, Events), petrel::client::ClientError>>,
    clients: &mut Vec<(Client, Events)>,
    times: &mut Vec<f64>,
    failures: &mut u64,
    started: Instant,
) {
    match set.join_next().await {
        Some(Ok(Ok(client))) => {
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            clients.push(client);
        }
        Some(_) => *failures += 1,
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_tells_losses_duplicates_and_reordering_apart() {
        let mut t = Tally::new(2);
        let now = unix_ns();
        for seq in [0u64, 1, 3, 2, 3] {
            t.record(&payload(32, seq, 1), now);
        }
        assert_eq!(t.distinct, 4);
        assert_eq!(t.duplicates, 1);
        assert_eq!(t.reordered, 1, "2 arrived after 3");
        assert!(
            !t.record(b"short", now),
            "payloads without the header are ignored"
        );
    }

    #[test]
    fn payload_header_round_trips_and_pads_to_size() {
        let p = payload(100, 42, 7);
        assert_eq!(p.len(), 100);
        let (seq, sent, publisher) = parse_header(&p).unwrap();
        assert_eq!((seq, publisher), (42, 7));
        assert!(sent > 0);
        assert_eq!(
            payload(1, 0, 0).len(),
            HEADER,
            "never shorter than the header"
        );
    }
}
