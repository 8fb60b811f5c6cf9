//! The one connection driver: a thin loop around one [`Link`] (a `Channel` and its ties to
//! the broker), the same for every transport.
//!
//! Each turn it feeds the channel every input the transport has already received (carrying
//! out the channel's actions after each: a CONNECT must be answered before what follows it),
//! moves deliveries from the session's mailbox into the channel while the window and the
//! transport allow, and then waits in **one poll function** for whatever comes next: the
//! transport (input, output written, its own affairs), the mailbox (deliveries, a takeover),
//! the channel's one timer, the relief of a connection holding input (see `link`: while the
//! broker queues more than its budget, PUBLISHes are held but reading goes on), shutdown.
//! Every wait is a `poll_*`
//! call on state the connection owns, so the task's future is little more than that state,
//! and nothing half-parsed lives in a future that could be cancelled.
//!
//! What differs between transports is a [`Wire`]: `connection::StreamWire` for the
//! byte-stream transports (TCP, TLS, WebSocket, WSS), `quic::QuicWire` for MQTT over QUIC
//! (a control stream and data flows).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::clock;
use super::link::{self, Link};

/// A connection with no traffic for this long gives back every buffer and queue it holds
/// empty (not at once: a connection between two packets would allocate them again).
const TRIM_AFTER: Duration = Duration::from_millis(500);

/// What a transport gives the driver. Every method is called from the connection's task.
pub trait Wire: Send {
    /// Hands the channel one input the transport has already received (a decoded packet, a
    /// stream event); `false` when there is none.
    fn handle_input(&mut self, link: &mut Link, now: Instant) -> bool;

    /// Receives more input. Ready when some came in, or when the transport ended (the
    /// channel has been told).
    fn poll_receive(&mut self, cx: &mut Context<'_>, link: &mut Link) -> Poll<()>;

    /// Writes what the channel has for the peer. Ready once it is all out, or when the
    /// transport failed (the channel has been told).
    fn poll_send(&mut self, cx: &mut Context<'_>, link: &mut Link) -> Poll<()>;

    /// The transport's own affairs (QUIC: the handshake, the connection closing, migration).
    /// Ready when something changed that the loop must look at.
    fn poll_transport(&mut self, _cx: &mut Context<'_>, _link: &mut Link) -> Poll<()> {
        Poll::Pending
    }

    /// Called before deliveries are taken from the mailbox.
    fn before_deliveries(&mut self, _link: &mut Link) {}

    /// Whether the transport takes more deliveries now (QUIC: its writers' backlog).
    fn has_room(&self) -> bool {
        true
    }

    /// Bytes of output written by the channel and not yet taken by the peer's transport.
    fn backlog(&self, link: &mut Link) -> usize {
        link.channel.out().len()
    }

    /// Gives back buffers the transport does not need between turns.
    fn release_buffers(&mut self, _link: &mut Link) {}

    /// The connection has been quiet for a while: give back every empty buffer.
    fn trim(&mut self) {}

    /// The channel has closed: send its last words within the linger time and close.
    fn close(&mut self, link: &mut Link) -> impl Future<Output = ()> + Send;
}

/// One connection: its link and its transport.
pub struct Driver<W> {
    pub link: Link,
    pub wire: W,
    shutting_down: bool,
    /// When the connection, quiet since, gives back its empty buffers (`None`: it has).
    trim_at: Option<Instant>,
}

/// What the connection waits on besides its own state, pinned in the task.
struct Waits<'a, 'b> {
    cancelled: Pin<&'a mut WaitForCancellationFuture<'b>>,
    timer: Pin<&'a mut Sleep>,
    /// Armed (the channel has a deadline).
    timer_armed: bool,
    /// While input is held for the broker's queue budget.
    relief: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl<W: Wire> Driver<W> {
    pub fn new(link: Link, wire: W) -> Self {
        Self {
            link,
            wire,
            shutting_down: false,
            trim_at: None,
        }
    }

    /// Serves the connection until its channel closes, then closes the transport.
    pub async fn run(&mut self, shutdown: &CancellationToken) {
        let cancelled = std::pin::pin!(shutdown.cancelled());
        let timer = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
        let mut waits = Waits {
            cancelled,
            timer,
            timer_armed: false,
            relief: None,
        };
        loop {
            self.handle_inputs().await;
            self.wire.before_deliveries(&mut self.link);
            self.check_backlog();
            let wire = &self.wire;
            self.link.pump_deliveries(|| wire.has_room());
            if self.link.closed {
                break;
            }
            if !self.link.is_holding() {
                waits.relief = None;
            } else if waits.relief.is_none() {
                waits.relief = Some(link::relief(&self.link.broker.budget));
            }
            // One timer for the channel's deadline and the trim. It is moved only when the
            // deadline comes earlier or it has fired: a timer that fires early finds nothing
            // due and is re-armed (a busy connection's keep-alive deadline moves with every
            // packet, its timer rarely).
            let deadline = match (self.link.channel.poll_timeout(), self.trim_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            match deadline {
                Some(deadline) => {
                    let deadline = tokio::time::Instant::from_std(deadline);
                    if !waits.timer_armed
                        || waits.timer.is_elapsed()
                        || deadline < waits.timer.deadline()
                    {
                        waits.timer.as_mut().reset(deadline);
                    }
                    waits.timer_armed = true;
                }
                None => waits.timer_armed = false,
            }
            self.wire.release_buffers(&mut self.link);
            let active = std::future::poll_fn(|cx| self.poll_wait(cx, &mut waits)).await;
            let now = self.link.tick();
            if active {
                self.trim_at = Some(now + TRIM_AFTER);
            }
            self.link.carry_out_actions().await;
        }
        // Last words go only once what they acknowledge is on disk.
        let linger = self.link.broker.settings().close_linger;
        if !Box::pin(self.link.durable(linger)).await {
            self.link.channel.handle_store_failed();
        }
        // Boxed: it runs once, and would otherwise enlarge every connection's task.
        Box::pin(self.wire.close(&mut self.link)).await;
    }

    /// Closes a connection whose client sends but does not read, once its output backlog
    /// passes the channel's ceiling (`mqtt.max_outbound_buffer`); counted and logged.
    fn check_backlog(&mut self) {
        let backlog = self.wire.backlog(&mut self.link);
        if self.link.channel.handle_backlog(backlog) {
            let metrics = &self.link.broker.metrics;
            metrics
                .slow_readers_closed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Peer-caused: debug, and counted (`connections.slow_reader_closed`).
            tracing::debug!(
                backlog,
                "client does not read its output: closed (0x97), past mqtt.max_outbound_buffer"
            );
        }
    }

    /// Feeds the channel the input it held while the budget now allows, then every input
    /// already received (which it may hold in turn), carrying out its actions after each,
    /// until held input is at its bound or the channel closes.
    async fn handle_inputs(&mut self) {
        let now = self.link.tick();
        while !self.link.channel.is_closed() && self.link.release_held(now) {
            self.link.carry_out_actions().await;
        }
        while !self.link.channel.is_closed() && !self.link.input_blocked() {
            if !self.wire.handle_input(&mut self.link, now) {
                break;
            }
            self.link.carry_out_actions().await;
        }
    }

    /// Waits for the next thing to do, doing what can be done at once (writing, reading) on
    /// the way. Ready when the loop has work: input, the mailbox or the timer due, held input
    /// to look at again, shutdown, or the transport gone; `true` if it was traffic rather than the timer
    /// alone.
    fn poll_wait(&mut self, cx: &mut Context<'_>, waits: &mut Waits<'_, '_>) -> Poll<bool> {
        let mut ready = false;
        if !self.shutting_down && waits.cancelled.as_mut().poll(cx).is_ready() {
            self.shutting_down = true;
            self.link.channel.handle_shutdown();
            ready = true;
        }
        ready |= self.wire.poll_transport(cx, &mut self.link).is_ready();
        // Output that acknowledges what is not yet on disk waits for the store's commit, and
        // so does further input (its answers would wait behind it anyway): the client's own
        // window then batches its messages into the commits.
        let durable = self.link.poll_durable(cx).is_ready();
        if durable {
            // Ready only on a failure: what was written needs no turn of the loop.
            let _ = self.wire.poll_send(cx, &mut self.link);
        }
        ready |= self.link.channel.is_closed();
        if let Some(relief) = &mut waits.relief {
            if relief.as_mut().poll(cx).is_ready() {
                waits.relief = None;
                ready = true;
            }
        }
        if durable && !self.link.input_blocked() {
            ready |= self.wire.poll_receive(cx, &mut self.link).is_ready();
        }
        if let Poll::Ready(takeover) = self.link.poll_mailbox(cx) {
            if let Some(ack) = takeover {
                self.link.handle_takeover(ack);
            }
            ready = true;
        }
        let active = ready;
        if waits.timer_armed && waits.timer.as_mut().poll(cx).is_ready() {
            waits.timer_armed = false;
            let now = clock::now();
            if !active && self.trim_at.is_some_and(|at| now >= at) {
                self.trim_at = None;
                self.wire.trim();
                self.link.trim();
            }
            if self.link.is_holding() {
                // The broker's own pause never closes a client for keep-alive.
                self.link.channel.handle_traffic(now);
            }
            self.link.channel.handle_timeout(now);
            ready = true;
        }
        if ready {
            Poll::Ready(active)
        } else {
            Poll::Pending
        }
    }
}
