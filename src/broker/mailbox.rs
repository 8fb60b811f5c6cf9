//! A session's bounded queue of deliveries, shared by the router (producer) and whichever
//! connection currently serves the session (consumer).
//!
//! The mailbox outlives connections: while a persistent session is offline, deliveries queue
//! here and are drained on reconnect. When it is full the new delivery is dropped and counted
//! (as Mosquitto and EMQX do with their message queues); the router never waits.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::core::message::Delivery;

#[derive(Debug)]
pub struct Mailbox {
    queue: Mutex<VecDeque<Delivery>>,
    capacity: usize,
    notify: Notify,
    online: AtomicBool,
    dropped: AtomicU64,
}

impl Mailbox {
    pub fn new(capacity: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            capacity,
            notify: Notify::new(),
            online: AtomicBool::new(true),
            dropped: AtomicU64::new(0),
        }
    }

    /// Queue a delivery; `false` if the mailbox was full and the delivery was dropped.
    pub fn push(&self, delivery: Delivery) -> bool {
        {
            let mut queue = self.queue.lock().expect("mailbox lock is never poisoned");
            if queue.len() >= self.capacity {
                drop(queue);
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            queue.push_back(delivery);
        }
        self.notify.notify_one();
        true
    }

    /// Take the oldest queued delivery.
    pub fn pop(&self) -> Option<Delivery> {
        self.queue
            .lock()
            .expect("mailbox lock is never poisoned")
            .pop_front()
    }

    pub fn len(&self) -> usize {
        self.queue
            .lock()
            .expect("mailbox lock is never poisoned")
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves when a delivery has been pushed since the last wait (a permit is kept if
    /// nobody was waiting, so no push is missed).
    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Relaxed)
    }

    pub fn set_online(&self, online: bool) {
        self.online.store(online, Ordering::Relaxed);
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}
