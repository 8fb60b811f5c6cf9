//! The client half of a lossy-link run: one publisher and one subscriber on `petrel::client`
//! (plus short-lived probes for connect times), wherever the clients must run: inside the
//! packet link's namespace as a child process, or in-process behind the UDP relay.
//!
//! The publisher sends each phase's messages round-robin over `topics` topics, paced (open
//! loop, stamped with the *scheduled* send time so a stalled sender cannot hide its own delay)
//! or saturating (closed loop, a bounded number awaiting acknowledgement). The subscriber holds
//! one subscription per topic, so with per-topic QUIC streams the broker delivers every topic on
//! its own stream. Every payload carries phase, topic, sequence number and send time; the
//! subscriber counts each (phase, topic, sequence) it sees, so losses, duplicates and
//! reorderings are told apart across reconnects, blackouts and address changes. Both clients
//! keep persistent sessions. Nothing here knows about links or the broker's process: the spec
//! names an address to dial and a CA to trust.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::{BufMut, Bytes, BytesMut};
use petrel::client::{
    Backoff, Client, ClientError, ClientOptions, Event, Events, Message, PublishHandle, QoS,
    QuicStreams, Subscription, Version,
};
use petrel::config::{Congestion, ListenerKind, QuicSettings};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

/// The environment variable that hands a child process its [`ClientSpec`] (JSON).
pub const SPEC_VAR: &str = "PETREL_LOSSY_CLIENT";

/// Phase (2), topic (2), sequence (8), scheduled send time in µs since the run's start (8).
const HEADER: usize = 2 + 2 + 8 + 8;

/// How long a phase waits, once its publishing ended, for stragglers it may still get.
const QOS0_QUIET: Duration = Duration::from_millis(1500);
/// After a QoS 1/2 phase is complete: time for late duplicates to show.
const SETTLE: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    Tcp,
    Tls,
    QuicSingle,
    QuicPerTopic,
    /// Per-topic streams plus the QoS 0 datagram class (docs/datagram.md), 2 copies. Not in
    /// `ALL`: a reference-condition variant only.
    QuicDatagram,
}

impl Transport {
    pub const ALL: [Transport; 4] = [Self::Tcp, Self::Tls, Self::QuicSingle, Self::QuicPerTopic];

    pub fn label(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Tls => "tls",
            Self::QuicSingle => "quic-single",
            Self::QuicPerTopic => "quic-per-topic",
            Self::QuicDatagram => "quic-datagram",
        }
    }

    pub fn listener(self) -> ListenerKind {
        match self {
            Self::Tcp => ListenerKind::Tcp,
            Self::Tls => ListenerKind::Tls,
            Self::QuicSingle | Self::QuicPerTopic | Self::QuicDatagram => ListenerKind::Quic,
        }
    }

    pub fn is_quic(self) -> bool {
        self.listener() == ListenerKind::Quic
    }
}

/// QUIC congestion controller (quinn's three), for the broker and the clients alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuicCc {
    Cubic,
    NewReno,
    Bbr,
}

impl QuicCc {
    pub fn label(self) -> &'static str {
        match self {
            Self::Cubic => "cubic",
            Self::NewReno => "newreno",
            Self::Bbr => "bbr",
        }
    }

    pub fn settings(self) -> QuicSettings {
        QuicSettings {
            congestion: match self {
                Self::Cubic => Congestion::Cubic,
                Self::NewReno => Congestion::NewReno,
                Self::Bbr => Congestion::Bbr,
            },
            ..QuicSettings::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Load {
    /// `rate` messages per second in total, open loop.
    Paced { rate: f64 },
    /// As fast as acknowledgements allow, `inflight` awaiting them (QoS 1/2) or written.
    Saturate { inflight: usize },
    /// As fast as the subscriber takes them: at most `window` messages published and not yet
    /// delivered (closed loop end to end, so no queue on the way overflows and the rate is
    /// what the path carries), and at most `window` awaiting their acknowledgement.
    Closed { window: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    pub qos: u8,
    pub load: Load,
    pub seconds: f64,
}

impl Phase {
    /// `seconds` of publishing at QoS `qos`, `rate` messages per second in total.
    pub fn paced(qos: u8, rate: f64, seconds: f64) -> Self {
        Self {
            qos,
            load: Load::Paced { rate },
            seconds,
        }
    }
}

/// Everything the client half needs (sent to a child process as JSON in [`SPEC_VAR`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientSpec {
    pub transport: Transport,
    /// Where to dial: the broker's listener on the host end of the link, or the relay.
    pub server: std::net::SocketAddr,
    pub ca_file: PathBuf,
    pub quic_cc: QuicCc,
    pub topics: u16,
    pub payload: usize,
    pub phases: Vec<Phase>,
    /// Seconds of keep-alive (short ones make both sides notice a blackout).
    pub keep_alive: u64,
    /// Upper bound on waiting for a phase's stragglers.
    pub drain: f64,
    /// Takeover rounds after the phases, each timing one fresh connect and one resumption.
    pub reconnect_probes: u32,
    /// QUIC only: both clients move to a new UDP socket this often (client-side migration).
    pub rebind_every: Option<f64>,
    /// Where a child process writes its [`ClientReport`].
    pub result_file: Option<PathBuf>,
}

/// What the client half saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClientReport {
    /// The run's time origin (every `_us` below counts from it), as Unix time.
    pub started_unix_us: u64,
    /// Fresh clients, connect call to CONNACK.
    pub cold_connect_ms: Vec<f64>,
    /// Resumptions after a takeover (QUIC: 0-RTT when the ticket was used), attempt to CONNACK.
    pub warm_connect_ms: Vec<f64>,
    pub warm_zero_rtt: u32,
    pub phases: Vec<PhaseReport>,
    pub events: Vec<ConnEvent>,
    /// Reconnects of the publisher and the subscriber during the phases.
    pub reconnects: u64,
    /// Reconnects whose CONNACK said the session was not present (a persistent session lost).
    pub sessions_lost: u64,
    pub rebinds: u64,
    /// Messages the subscriber received by QUIC datagram (the datagram class), once each.
    #[serde(default)]
    pub datagram_messages: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseReport {
    pub phase: Phase,
    pub start_us: u64,
    /// When publishing stopped.
    pub end_us: u64,
    /// Messages published per topic (sequence numbers `0..sent`).
    pub sent: Vec<u64>,
    /// QoS 1/2 publishes completed (PUBACK / PUBCOMP), and those that failed.
    pub acked: u64,
    /// When each QoS 1/2 publish completed, µs from the run's start (the timeline's
    /// publisher side).
    #[serde(default)]
    pub acked_us: Vec<u64>,
    pub publish_errors: u64,
    pub first_errors: Vec<String>,
    /// First copies: `[topic, seq, sent_us, latency_us]`.
    pub deliveries: Vec<[u64; 4]>,
    pub duplicates: u64,
    pub reordered: u64,
    /// When the last missing message arrived, if every one did.
    pub complete_us: Option<u64>,
}

impl PhaseReport {
    pub fn expected(&self) -> u64 {
        self.sent.iter().sum()
    }

    pub fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.deliveries.len() as u64)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnEvent {
    pub who: String,
    pub at_us: u64,
    /// `connected`, `disconnected: REASON` or `reconnecting`.
    pub what: String,
    pub session_present: Option<bool>,
}

/// The child process's entry: reads the spec from [`SPEC_VAR`], runs, writes the report.
/// `PETREL_LOSSY_TRACE=FILTER` (an `EnvFilter`, e.g. `petrel::client=debug`): the clients'
/// and the broker's tracing on stderr, stamped in µs since the Unix epoch (the timeline
/// prints the blackout's end on the same clock).
pub fn trace_from_env() {
    struct UnixMicros;
    impl tracing_subscriber::fmt::time::FormatTime for UnixMicros {
        fn format_time(
            &self,
            w: &mut tracing_subscriber::fmt::format::Writer<'_>,
        ) -> std::fmt::Result {
            write!(w, "{}", unix_us())
        }
    }
    if let Ok(filter) = std::env::var("PETREL_LOSSY_TRACE") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_timer(UnixMicros)
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .try_init();
    }
}

pub fn child_main() -> anyhow::Result<()> {
    let spec: ClientSpec = serde_json::from_str(
        &std::env::var(SPEC_VAR).with_context(|| format!("{SPEC_VAR} is not set"))?,
    )
    .context("the client spec")?;
    trace_from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = runtime.block_on(run(&spec))?;
    let out = spec.result_file.as_ref().context("no result file given")?;
    std::fs::write(out, serde_json::to_vec(&report)?)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// Runs the spec's phases and probes against its server.
pub async fn run(spec: &ClientSpec) -> anyhow::Result<ClientReport> {
    let t0 = Instant::now();
    let mut report = ClientReport {
        started_unix_us: unix_us(),
        ..ClientReport::default()
    };
    let log = Arc::new(Mutex::new(Vec::new()));
    let run_id = format!("{}-{:x}", std::process::id(), report.started_unix_us);
    let topics: Vec<String> = (0..spec.topics)
        .map(|t| format!("lossy/{run_id}/{t}"))
        .collect();

    let started = Instant::now();
    let (sub, sub_events) = Client::connect(options(spec, &format!("sub-{run_id}"))?)
        .await
        .context("the subscriber cannot connect")?;
    report.cold_connect_ms.push(ms(started.elapsed()));
    let subscribed = futures_util::future::join_all(
        topics
            .iter()
            .map(|t| sub.subscribe_with(Subscription::new(t, QoS::ExactlyOnce))),
    )
    .await;
    for s in subscribed {
        s.context("subscribing")?;
    }
    let started = Instant::now();
    let (publisher, pub_events) = Client::connect(options(spec, &format!("pub-{run_id}"))?)
        .await
        .context("the publisher cannot connect")?;
    report.cold_connect_ms.push(ms(started.elapsed()));

    let progress: Arc<Vec<AtomicU64>> =
        Arc::new((0..spec.phases.len()).map(|_| AtomicU64::new(0)).collect());
    let (stop_tx, stop_rx) = watch::channel(false);
    let subscriber = tokio::spawn(subscribe_loop(
        sub_events,
        spec.phases.len(),
        t0,
        Arc::clone(&progress),
        Arc::clone(&log),
        stop_rx.clone(),
    ));
    let watcher = tokio::spawn(watch_events(
        "pub",
        pub_events,
        t0,
        Arc::clone(&log),
        stop_rx.clone(),
    ));
    let rebinds = Arc::new(AtomicU64::new(0));
    let rebinder = spec
        .rebind_every
        .filter(|_| spec.transport.is_quic())
        .map(|every| {
            tokio::spawn(rebind_loop(
                [publisher.clone(), sub.clone()],
                Duration::from_secs_f64(every),
                Arc::clone(&rebinds),
                stop_rx.clone(),
            ))
        });

    let mut phases = Vec::new();
    for (index, phase) in spec.phases.iter().enumerate() {
        phases.push(
            publish_phase(
                &publisher,
                spec,
                index as u16,
                *phase,
                &topics,
                t0,
                &progress[index],
            )
            .await?,
        );
    }
    let _ = stop_tx.send(true);
    if let Some(rebinder) = rebinder {
        let _ = rebinder.await;
    }
    report.rebinds = rebinds.load(Ordering::Relaxed);
    let tallies = subscriber.await.context("the subscriber task")?;
    let _ = watcher.await;
    for (mut phase, tally) in phases.into_iter().zip(tallies) {
        phase.deliveries = tally.deliveries;
        phase.duplicates = tally.duplicates;
        phase.reordered = tally.reordered;
        phase.complete_us = (phase.lost() == 0).then_some(tally.last_new_us);
        report.phases.push(phase);
    }
    report.reconnects = (publisher.stats().connects + sub.stats().connects).saturating_sub(2);
    report.datagram_messages = sub.stats().datagram_messages;
    let _ = publisher.disconnect().await;
    let _ = sub.disconnect().await;

    if spec.reconnect_probes > 0 {
        probe_reconnects(spec, &run_id, &mut report).await?;
    }
    report.events = std::mem::take(&mut *log.lock().expect("never poisoned"));
    report.sessions_lost = sessions_lost(&report.events);
    Ok(report)
}

/// Client options for the spec: persistent session, short reconnect backoff, room for a
/// blackout's worth of publishes, the development CA (its certificate names `localhost`).
pub fn options(spec: &ClientSpec, id: &str) -> anyhow::Result<ClientOptions> {
    let scheme = match spec.transport {
        Transport::Tcp => "mqtt",
        Transport::Tls => "mqtts",
        Transport::QuicSingle | Transport::QuicPerTopic | Transport::QuicDatagram => "quic",
    };
    let mut options = ClientOptions::new(&format!("{scheme}://{}", spec.server))?
        .client_id(id)
        .version(Version::V5)
        .persistent(600)
        .keep_alive(Duration::from_secs(spec.keep_alive))
        .ca_file(&spec.ca_file)
        .server_name("localhost")
        .connect_timeout(Duration::from_secs(5))
        .reconnect(Some(Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(2),
            jitter: 0.5,
        }))
        .offline_buffer(100_000)
        .event_capacity(8192)
        .quic(spec.quic_cc.settings());
    if matches!(
        spec.transport,
        Transport::QuicPerTopic | Transport::QuicDatagram
    ) {
        options = options.streams(QuicStreams::per_topic());
    }
    if spec.transport == Transport::QuicDatagram {
        options = options.datagrams(2);
    }
    Ok(options)
}

/// Waits for the oldest publish in `window` (and counts how it ended) while the window holds
/// `limit` (at least 1) or more.
async fn retire_beyond(
    window: &mut std::collections::VecDeque<PublishHandle>,
    limit: usize,
    completions: &Mutex<Completions>,
    t0: Instant,
) {
    if window.len() >= limit.max(1) {
        let handle = window.pop_front().expect("non-empty");
        let outcome = handle.await;
        completions
            .lock()
            .expect("never poisoned")
            .count(outcome, us(t0.elapsed()));
    }
}

async fn publish_phase(
    client: &Client,
    spec: &ClientSpec,
    index: u16,
    phase: Phase,
    topics: &[String],
    t0: Instant,
    delivered: &AtomicU64,
) -> anyhow::Result<PhaseReport> {
    let qos = QoS::from_u8(phase.qos).context("QoS is 0, 1 or 2")?;
    let n_topics = topics.len() as u64;
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(phase.seconds);
    let completions = Arc::new(Mutex::new(Completions::default()));
    let (handles_tx, handles_rx) = mpsc::unbounded_channel();
    let completer = tokio::spawn(complete(handles_rx, Arc::clone(&completions), t0));
    let mut window = std::collections::VecDeque::new();
    let mut i = 0u64;
    loop {
        let now = Instant::now();
        if now >= until {
            break;
        }
        let scheduled = match phase.load {
            Load::Paced { rate } => {
                let at = start + Duration::from_secs_f64(i as f64 / rate);
                if at > now {
                    tokio::time::sleep_until(at.min(until).into()).await;
                    continue;
                }
                at
            }
            Load::Closed { window: limit } => {
                if i.saturating_sub(delivered.load(Ordering::Relaxed)) >= limit as u64 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                retire_beyond(&mut window, limit, &completions, t0).await;
                Instant::now()
            }
            Load::Saturate { inflight } => {
                retire_beyond(&mut window, inflight, &completions, t0).await;
                Instant::now()
            }
        };
        let topic = i % n_topics;
        let payload = payload(
            spec.payload,
            index,
            topic as u16,
            i / n_topics,
            us(scheduled - t0),
        );
        let message = Message::new(topics[topic as usize].clone(), payload).qos(qos);
        let handle = client.publish_nowait(message).await.context("publishing")?;
        match phase.load {
            Load::Saturate { .. } | Load::Closed { .. } => window.push_back(handle),
            Load::Paced { .. } if qos != QoS::AtMostOnce => {
                let _ = handles_tx.send(handle);
            }
            Load::Paced { .. } => {}
        }
        i += 1;
    }
    let end = Instant::now();
    for handle in window {
        let _ = handles_tx.send(handle);
    }
    drop(handles_tx);
    let sent: Vec<u64> = (0..n_topics)
        .map(|t| i / n_topics + u64::from(t < i % n_topics))
        .collect();
    let expected = i;

    // Stragglers: QoS 1/2 until every publish completed and every message arrived (bounded);
    // QoS 0 until everything arrived or nothing new came for a while.
    let drain_until = end + Duration::from_secs_f64(spec.drain);
    let mut last = (delivered.load(Ordering::Relaxed), Instant::now());
    let mut completer = Some(completer);
    loop {
        let got = delivered.load(Ordering::Relaxed);
        if got != last.0 {
            last = (got, Instant::now());
        }
        if qos != QoS::AtMostOnce {
            if let Some(done) = completer.as_ref().map(|c| c.is_finished()) {
                if done {
                    completer.take().expect("present").await?;
                }
            }
        }
        let complete = got >= expected && (qos == QoS::AtMostOnce || completer.is_none());
        let quiet = qos == QoS::AtMostOnce && last.1.elapsed() > QOS0_QUIET;
        if complete || quiet || Instant::now() >= drain_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if qos != QoS::AtMostOnce {
        tokio::time::sleep(SETTLE).await;
    }
    if let Some(completer) = completer {
        completer.abort();
    }
    let mut completions = std::mem::take(&mut *completions.lock().expect("never poisoned"));
    Ok(PhaseReport {
        phase,
        start_us: us(start - t0),
        end_us: us(end - t0),
        sent,
        acked: completions.acked,
        acked_us: std::mem::take(&mut completions.acked_us),
        publish_errors: completions.errors,
        first_errors: std::mem::take(&mut completions.first),
        deliveries: Vec::new(),
        duplicates: 0,
        reordered: 0,
        complete_us: None,
    })
}

async fn complete(
    mut handles: mpsc::UnboundedReceiver<PublishHandle>,
    completions: Arc<Mutex<Completions>>,
    t0: Instant,
) {
    while let Some(handle) = handles.recv().await {
        let outcome = handle.await;
        completions
            .lock()
            .expect("never poisoned")
            .count(outcome, us(t0.elapsed()));
    }
}

/// How the publishes of a phase completed.
#[derive(Default)]
struct Completions {
    acked: u64,
    acked_us: Vec<u64>,
    errors: u64,
    /// The first few distinct errors, for the report.
    first: Vec<String>,
}

impl Completions {
    fn count<T>(&mut self, outcome: Result<T, ClientError>, at_us: u64) {
        match outcome {
            Ok(_) => {
                self.acked += 1;
                self.acked_us.push(at_us);
            }
            Err(e) => {
                self.errors += 1;
                let text = e.to_string();
                if self.first.len() < 5 && !self.first.contains(&text) {
                    self.first.push(text);
                }
            }
        }
    }
}

/// What the subscriber saw of one phase.
#[derive(Default)]
struct Tally {
    /// Copies seen per topic and sequence number.
    seen: Vec<Vec<u8>>,
    highest: Vec<Option<u64>>,
    deliveries: Vec<[u64; 4]>,
    duplicates: u64,
    reordered: u64,
    last_new_us: u64,
}

impl Tally {
    /// Records a delivery; true if it is the first copy.
    fn record(&mut self, topic: usize, seq: u64, sent_us: u64, now_us: u64) -> bool {
        if topic >= self.seen.len() {
            self.seen.resize(topic + 1, Vec::new());
            self.highest.resize(topic + 1, None);
        }
        let seen = &mut self.seen[topic];
        if seq as usize >= seen.len() {
            seen.resize(seq as usize + 1, 0);
        }
        seen[seq as usize] = seen[seq as usize].saturating_add(1);
        if seen[seq as usize] > 1 {
            self.duplicates += 1;
            return false;
        }
        if self.highest[topic].is_some_and(|h| seq < h) {
            self.reordered += 1;
        }
        self.highest[topic] = Some(self.highest[topic].map_or(seq, |h| h.max(seq)));
        self.deliveries
            .push([topic as u64, seq, sent_us, now_us.saturating_sub(sent_us)]);
        self.last_new_us = now_us;
        true
    }
}

async fn subscribe_loop(
    mut events: Events,
    phases: usize,
    t0: Instant,
    progress: Arc<Vec<AtomicU64>>,
    log: Arc<Mutex<Vec<ConnEvent>>>,
    mut stop: watch::Receiver<bool>,
) -> Vec<Tally> {
    let mut tallies: Vec<Tally> = (0..phases).map(|_| Tally::default()).collect();
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = stop.wait_for(|s| *s) => break,
        };
        match event {
            None => break,
            Some(Event::Message(m)) => {
                let now = us(m.at.saturating_duration_since(t0));
                let Some((phase, topic, seq, sent_us)) = parse(&m.payload) else {
                    continue;
                };
                let Some(tally) = tallies.get_mut(phase as usize) else {
                    continue;
                };
                if tally.record(topic as usize, seq, sent_us, now) {
                    progress[phase as usize].fetch_add(1, Ordering::Relaxed);
                }
            }
            Some(other) => note("sub", &other, t0, &log),
        }
    }
    tallies
}

async fn watch_events(
    who: &'static str,
    mut events: Events,
    t0: Instant,
    log: Arc<Mutex<Vec<ConnEvent>>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = stop.wait_for(|s| *s) => break,
        };
        match event {
            None => break,
            Some(event) => note(who, &event, t0, &log),
        }
    }
}

fn note(who: &str, event: &Event, t0: Instant, log: &Mutex<Vec<ConnEvent>>) {
    let (at, what, session_present) = match event {
        Event::Connected {
            at,
            session_present,
            ..
        } => (*at, "connected".to_owned(), Some(*session_present)),
        Event::Disconnected { reason, at } => (*at, format!("disconnected: {reason}"), None),
        Event::Reconnecting { at, .. } => (*at, "reconnecting".to_owned(), None),
        Event::Message(_) => return,
    };
    log.lock().expect("never poisoned").push(ConnEvent {
        who: who.to_owned(),
        at_us: us(at.saturating_duration_since(t0)),
        what,
        session_present,
    });
}

/// Reconnects (a `connected` after a `disconnected` of the same client) that found no session.
fn sessions_lost(events: &[ConnEvent]) -> u64 {
    let mut lost = 0;
    for who in ["pub", "sub"] {
        let mut dropped = false;
        for e in events.iter().filter(|e| e.who == who) {
            if e.what.starts_with("disconnected") {
                dropped = true;
            } else if dropped && e.session_present == Some(false) {
                lost += 1;
            }
        }
    }
    lost
}

async fn rebind_loop(
    clients: [Client; 2],
    every: Duration,
    rebinds: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        for client in &clients {
            if client.rebind().await.is_ok() {
                rebinds.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Takeover rounds: a fresh client takes the probe's session and leaves; the probe resumes
/// it. The fresh client's connect is a cold sample; the probe's reconnect a warm one (TLS
/// resumption, QUIC 0-RTT with the ticket of its first connection).
async fn probe_reconnects(
    spec: &ClientSpec,
    run_id: &str,
    report: &mut ClientReport,
) -> anyhow::Result<()> {
    let id = format!("probe-{run_id}");
    let backoff = Backoff {
        initial: Duration::from_millis(300),
        max: Duration::from_millis(300),
        jitter: 0.0,
    };
    let started = Instant::now();
    let (probe, mut events) = Client::connect(options(spec, &id)?.reconnect(Some(backoff)))
        .await
        .context("the probe cannot connect")?;
    report.cold_connect_ms.push(ms(started.elapsed()));
    for _ in 0..spec.reconnect_probes {
        // Let the session ticket arrive before the connection is taken away.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        let (kicker, _kicker_events) = Client::connect(options(spec, &id)?.reconnect(None))
            .await
            .context("the takeover client cannot connect")?;
        report.cold_connect_ms.push(ms(started.elapsed()));
        let _ = kicker.disconnect().await;
        let attempt_at = tokio::time::timeout(Duration::from_secs(30), async {
            let mut attempt = None;
            while let Some(event) = events.recv().await {
                match event {
                    Event::Reconnecting { delay, at, .. } => attempt = Some(at + delay),
                    Event::Connected { at, zero_rtt, .. } => {
                        if let Some(attempt) = attempt {
                            return Some((at.saturating_duration_since(attempt), zero_rtt));
                        }
                    }
                    _ => {}
                }
            }
            None
        })
        .await;
        if let Ok(Some((took, zero_rtt))) = attempt_at {
            report.warm_connect_ms.push(ms(took));
            report.warm_zero_rtt += u32::from(zero_rtt);
        }
    }
    let _ = probe.disconnect().await;
    Ok(())
}

fn payload(size: usize, phase: u16, topic: u16, seq: u64, sent_us: u64) -> Bytes {
    let mut buf = BytesMut::with_capacity(size.max(HEADER));
    buf.put_u16(phase);
    buf.put_u16(topic);
    buf.put_u64(seq);
    buf.put_u64(sent_us);
    buf.resize(size.max(HEADER), 0x5a);
    buf.freeze()
}

fn parse(payload: &[u8]) -> Option<(u16, u16, u64, u64)> {
    let h = payload.get(..HEADER)?;
    Some((
        u16::from_be_bytes(h[0..2].try_into().ok()?),
        u16::from_be_bytes(h[2..4].try_into().ok()?),
        u64::from_be_bytes(h[4..12].try_into().ok()?),
        u64::from_be_bytes(h[12..20].try_into().ok()?),
    ))
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
