//! The session registry: which client ids have a session, whether a connection serves it or
//! it waits offline, and the timers that end offline sessions and publish delayed wills.
//!
//! Sans-IO, like `Channel`: the shell keeps the registry under its sessions lock, passes `now`,
//! and carries out what the registry decides — it asks a serving connection to hand over
//! ([`Open::Busy`]), takes ended sessions' subscriptions out of the router and publishes due
//! wills ([`Event`]s from [`Registry::poll_event`]), and sleeps until
//! [`Registry::poll_timeout`]. Every MQTT rule of the session lifecycle lives here: resume,
//! takeover, clean start, session expiry, will and delayed will [MQTT-3.1.2-23],
//! [MQTT-3.1.3-9]. The events are also the seam where persistence and observability attach.
//!
//! Generic over the handle that reaches a session's connection (the shell's mailbox), so it is
//! tested synchronously, without a runtime.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::channel::{Close, PendingWill};
use super::session::Session;
use super::timers::TimerTable;

/// What the registry needs of the handle through which a session's connection is reached.
pub trait SessionHandle: Clone {
    /// Marks whether a connection serves the session (routing prefers online members of a
    /// shared group).
    fn set_online(&self, online: bool);
}

/// The answer to a CONNECT's request for its session.
#[derive(Debug)]
pub enum Open<M> {
    /// Connection `conn_id` serves the session: the shell asks it, through `handle`, to close
    /// with 0x8E and file the session offline, then asks again.
    Busy { handle: M, conn_id: u64 },
    /// The session is now served by the asking connection: resumed (`Some`) or new.
    Ready {
        /// Boxed: a session is large beside the other answers.
        session: Option<Box<Session>>,
        handle: M,
    },
    /// A new session is needed and the registry holds its maximum (online and offline):
    /// refused (CONNACK 0x97, 3.1.1 return code 3). Nothing changed.
    Full,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Its connection closed with a Session Expiry Interval of 0.
    Closed,
    /// Offline past its Session Expiry Interval.
    Expired,
    /// A CONNECT with Clean Start replaced it.
    CleanStart,
    /// An operator discarded it (the HTTP API's kick of an offline session).
    Discarded,
}

/// What the shell must carry out after a registry call, in order.
#[derive(Debug)]
pub enum Event {
    /// A session ended: its subscriptions must leave the router.
    Ended {
        client_id: Arc<str>,
        session: Session,
        reason: EndReason,
    },
    /// A will is due: publish it (after releasing the sessions lock).
    Will(PendingWill),
}

#[derive(Debug)]
enum SlotState {
    /// Served by the connection with this id.
    Online { conn_id: u64 },
    /// Boxed: most slots are online, and the table holds one per client.
    Offline { session: Box<Session> },
}

#[derive(Debug)]
struct Slot<M> {
    handle: M,
    state: SlotState,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum TimerKey {
    Expire(Arc<str>),
    Will(Arc<str>),
}

/// The session table; see the module documentation.
#[derive(Debug)]
pub struct Registry<M> {
    slots: HashMap<Arc<str>, Slot<M>>,
    wills: HashMap<Arc<str>, PendingWill>,
    timers: TimerTable<TimerKey>,
    events: VecDeque<Event>,
    /// Sessions held at once, online and offline (0: no limit).
    max_sessions: usize,
}

impl<M> Default for Registry<M> {
    fn default() -> Self {
        Self {
            slots: HashMap::new(),
            wills: HashMap::new(),
            timers: TimerTable::new(),
            events: VecDeque::new(),
            max_sessions: 0,
        }
    }
}

impl<M> Registry<M> {
    /// At most `max` sessions held at once, online and offline (0: no limit): past it, a
    /// CONNECT that needs a new session gets [`Open::Full`]; resuming or replacing a held
    /// one is always possible.
    pub fn set_max_sessions(&mut self, max: usize) {
        self.max_sessions = max;
    }
}

impl<M: SessionHandle> Registry<M> {
    /// A CONNECT for `client_id` was accepted on connection `conn_id`: resume the offline
    /// session, ask the serving connection to hand it over, or start a new one with the
    /// handle `new_handle` makes.
    ///
    /// Reconnecting cancels a delayed will [MQTT-3.1.3-9]; a clean start ends the old session,
    /// which publishes its pending will at once [MQTT-3.1.2-4].
    pub fn open(
        &mut self,
        client_id: &Arc<str>,
        clean_start: bool,
        conn_id: u64,
        new_handle: impl FnOnce() -> M,
    ) -> Open<M> {
        if let Some(Slot {
            handle,
            state: SlotState::Online { conn_id: serving },
        }) = self.slots.get(client_id)
        {
            return Open::Busy {
                handle: handle.clone(),
                conn_id: *serving,
            };
        }
        if self.max_sessions > 0
            && self.slots.len() >= self.max_sessions
            && !self.slots.contains_key(client_id)
        {
            return Open::Full;
        }
        self.timers.cancel(&TimerKey::Will(Arc::clone(client_id)));
        let will = self.wills.remove(client_id);
        self.timers.cancel(&TimerKey::Expire(Arc::clone(client_id)));
        let (session, handle) = match self.slots.remove(client_id) {
            Some(Slot {
                handle,
                state: SlotState::Offline { session },
            }) if !clean_start => (Some(*session), handle),
            Some(Slot {
                state: SlotState::Offline { session },
                ..
            }) => {
                self.events.push_back(Event::Ended {
                    client_id: Arc::clone(client_id),
                    session: *session,
                    reason: EndReason::CleanStart,
                });
                (None, new_handle())
            }
            _ => (None, new_handle()),
        };
        if let (Some(will), true) = (will, clean_start) {
            self.events.push_back(Event::Will(will));
        }
        handle.set_online(true);
        self.slots.insert(
            Arc::clone(client_id),
            Slot {
                handle: handle.clone(),
                state: SlotState::Online { conn_id },
            },
        );
        Open::Ready {
            session: session.map(Box::new),
            handle,
        }
    }

    /// Connection `conn_id`, which served `client_id`, closed: file its session offline until
    /// it expires, or end it, and publish or schedule its will. A connection that no longer
    /// serves the session (it was taken over, or its CONNECT was refused) changes nothing.
    pub fn close(&mut self, now: Instant, conn_id: u64, client_id: &Arc<str>, close: Close) {
        let Some(slot) = self.slots.get_mut(client_id) else {
            return;
        };
        if !matches!(slot.state, SlotState::Online { conn_id: c } if c == conn_id) {
            return;
        }
        let Some(session) = close.session else {
            self.slots.remove(client_id);
            return;
        };
        let expiry = session.expiry_interval;
        if expiry == 0 {
            self.slots.remove(client_id);
            self.events.push_back(Event::Ended {
                client_id: Arc::clone(client_id),
                session,
                reason: EndReason::Closed,
            });
            self.events.extend(close.will.map(Event::Will));
            return;
        }
        slot.handle.set_online(false);
        slot.state = SlotState::Offline {
            session: Box::new(session),
        };
        if expiry != u32::MAX {
            let at = now + Duration::from_secs(u64::from(expiry));
            self.timers
                .schedule(TimerKey::Expire(Arc::clone(client_id)), at);
        }
        if let Some(will) = close.will {
            if will.delay == 0 {
                self.events.push_back(Event::Will(will));
            } else {
                // The will is published when the session ends, if that comes first.
                let delay = will.delay.min(expiry);
                let at = now + Duration::from_secs(u64::from(delay));
                self.timers
                    .schedule(TimerKey::Will(Arc::clone(client_id)), at);
                self.wills.insert(Arc::clone(client_id), will);
            }
        }
    }

    /// Files a persistent session read back from a durable store at start-up: offline, ending
    /// at `expires_at` (`None`: never; an instant already past ends it at the next
    /// `handle_timeout`), with a will due at `will.1` unless the session ends first.
    pub fn restore(
        &mut self,
        session: Session,
        handle: M,
        expires_at: Option<Instant>,
        will: Option<(PendingWill, Instant)>,
    ) {
        let client_id = Arc::clone(&session.client_id);
        handle.set_online(false);
        if let Some(at) = expires_at {
            self.timers
                .schedule(TimerKey::Expire(Arc::clone(&client_id)), at);
        }
        if let Some((will, at)) = will {
            let at = expires_at.map_or(at, |end| at.min(end));
            self.timers
                .schedule(TimerKey::Will(Arc::clone(&client_id)), at);
            self.wills.insert(Arc::clone(&client_id), will);
        }
        self.slots.insert(
            client_id,
            Slot {
                handle,
                state: SlotState::Offline {
                    session: Box::new(session),
                },
            },
        );
    }

    /// Fires every session-expiry and will timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(key) = self.timers.pop_due(now) {
            match key {
                TimerKey::Will(id) => self.events.extend(self.wills.remove(&id).map(Event::Will)),
                TimerKey::Expire(id) => {
                    if let Some(Slot {
                        state: SlotState::Offline { session },
                        ..
                    }) = self.slots.remove(&id)
                    {
                        self.events.push_back(Event::Ended {
                            client_id: Arc::clone(&id),
                            session: *session,
                            reason: EndReason::Expired,
                        });
                    }
                    // The session ended before the will delay: publish the will now.
                    self.timers.cancel(&TimerKey::Will(Arc::clone(&id)));
                    self.events.extend(self.wills.remove(&id).map(Event::Will));
                }
            }
        }
    }

    /// The handle of the session connection `conn_id` serves as `client_id`.
    /// Ends `client_id`'s offline session now, as if it had expired (its pending will is
    /// published). `false` if it has none offline.
    pub fn discard(&mut self, client_id: &str) -> bool {
        let Some((id, slot)) = self.slots.remove_entry(client_id) else {
            return false;
        };
        let session = match slot.state {
            SlotState::Offline { session } => session,
            state @ SlotState::Online { .. } => {
                self.slots.insert(id, Slot { state, ..slot });
                return false;
            }
        };
        self.timers.cancel(&TimerKey::Expire(Arc::clone(&id)));
        self.timers.cancel(&TimerKey::Will(Arc::clone(&id)));
        self.events.extend(self.wills.remove(&id).map(Event::Will));
        self.events.push_back(Event::Ended {
            client_id: id,
            session: *session,
            reason: EndReason::Discarded,
        });
        true
    }

    /// Lets go of `client_id`'s session, served by connection `conn_id`, without ending it:
    /// it moves to another node of a cluster, with its will, which this node no longer
    /// publishes. `false` (nothing changed) unless `conn_id` serves it.
    pub fn release(&mut self, client_id: &str, conn_id: u64) -> bool {
        match self.slots.get(client_id) {
            Some(Slot {
                state: SlotState::Online { conn_id: serving },
                ..
            }) if *serving == conn_id => {}
            _ => return false,
        }
        let Some((id, _)) = self.slots.remove_entry(client_id) else {
            return false;
        };
        self.timers.cancel(&TimerKey::Expire(Arc::clone(&id)));
        self.timers.cancel(&TimerKey::Will(Arc::clone(&id)));
        self.wills.remove(&id);
        true
    }

    /// Every offline session with its handle, in no order.
    pub fn offline_with_handles(&self) -> impl Iterator<Item = (&Session, &M)> {
        self.slots.values().filter_map(|slot| match &slot.state {
            SlotState::Offline { session } => Some((&**session, &slot.handle)),
            SlotState::Online { .. } => None,
        })
    }

    /// `client_id`'s session and handle, if it is offline.
    pub fn offline_with_handle(&self, client_id: &str) -> Option<(&Session, &M)> {
        let slot = self.slots.get(client_id)?;
        match &slot.state {
            SlotState::Offline { session } => Some((session, &slot.handle)),
            SlotState::Online { .. } => None,
        }
    }

    pub fn served_handle(&self, client_id: &str, conn_id: u64) -> Option<&M> {
        match self.slots.get(client_id)? {
            Slot {
                handle,
                state: SlotState::Online { conn_id: c },
            } if *c == conn_id => Some(handle),
            _ => None,
        }
    }

    /// Whether `client_id` has a session (online or offline) or a will waiting: what a
    /// CONNECT for it would take over, resume, wipe or cancel.
    pub fn knows(&self, client_id: &str) -> bool {
        self.slots.contains_key(client_id) || self.wills.contains_key(client_id)
    }

    /// Whether connection `conn_id` serves `client_id`'s session.
    pub fn is_served_by(&self, client_id: &str, conn_id: u64) -> bool {
        matches!(
            self.slots.get(client_id),
            Some(Slot { state: SlotState::Online { conn_id: c }, .. }) if *c == conn_id
        )
    }

    /// The next instant at which [`Registry::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

    /// The next thing the shell must carry out.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Sessions known, online and offline.
    pub fn count(&self) -> usize {
        self.slots.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
#[path = "registry_tests.rs"]
#[allow(clippy::disallowed_methods)] // tests make up instants from the real clock
mod tests;
