//! One WebSocket client as the rest of the bridge sees it: an id, and a
//! bounded outgoing queue that never blocks the sender.
//!
//! Fan-out runs on the MQTT side's single event loop, so a client that
//! stops reading must cost nothing there. Policy: the queue is bounded in
//! frames and in bytes; the first frame that does not fit disconnects the
//! client (WebSocket close 1008 "slow consumer" when it can still be sent),
//! counted in [`Metrics::slow_consumers`] and logged at `warn`. Dropping
//! frames silently instead would leave a client believing it saw every
//! event; a disconnect is something its reconnect logic already handles.

use axum::extract::ws::Utf8Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Counters shown at `/stats` and used by tests and benchmarks.
#[derive(Debug, Default)]
pub struct Metrics {
    /// WebSocket clients connected now.
    pub clients: AtomicU64,
    pub connections_total: AtomicU64,
    /// Clients disconnected because their outgoing queue was full.
    pub slow_consumers: AtomicU64,
    /// Clients disconnected because they answered no ping.
    pub dead_peers: AtomicU64,
    pub frames_in: AtomicU64,
    pub bad_frames: AtomicU64,
    /// Events published to MQTT on behalf of WebSocket clients.
    pub events_published: AtomicU64,
    /// `{"event": …}` frames queued to clients.
    pub events_delivered: AtomicU64,
    pub mqtt_connected: AtomicBool,
}

impl Metrics {
    pub fn snapshot(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "clients": get(&self.clients),
            "connections_total": get(&self.connections_total),
            "slow_consumers": get(&self.slow_consumers),
            "dead_peers": get(&self.dead_peers),
            "frames_in": get(&self.frames_in),
            "bad_frames": get(&self.bad_frames),
            "events_published": get(&self.events_published),
            "events_delivered": get(&self.events_delivered),
            "mqtt_connected": self.mqtt_connected.load(Ordering::Relaxed),
        })
    }
}

/// Why a client's connection is being closed by the bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    SlowConsumer,
    DeadPeer,
}

pub struct ClientHandle {
    /// Internal key, cheaper than the id in maps.
    pub key: u64,
    /// The id the legacy broker gave each connection (a UUID), used as the
    /// `source` of events it publishes without one.
    pub id: String,
    tx: mpsc::Sender<Utf8Bytes>,
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    kicked: AtomicBool,
    slow: AtomicBool,
    /// Cancelled when the connection must end, whatever the reason.
    pub cancel: CancellationToken,
}

impl ClientHandle {
    pub fn new(
        key: u64,
        id: String,
        tx: mpsc::Sender<Utf8Bytes>,
        max_bytes: usize,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            key,
            id,
            tx,
            queued_bytes: AtomicUsize::new(0),
            max_bytes,
            kicked: AtomicBool::new(false),
            slow: AtomicBool::new(false),
            cancel,
        }
    }

    /// Queues a frame without waiting. Returns false when the client is
    /// gone or was just disconnected for being slow.
    pub fn send(&self, frame: Utf8Bytes, metrics: &Metrics) -> bool {
        if self.kicked.load(Ordering::Relaxed) {
            return false;
        }
        let len = frame.len();
        let before = self.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if before + len > self.max_bytes {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            self.kick(Kick::SlowConsumer, metrics);
            return false;
        }
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                self.kick(Kick::SlowConsumer, metrics);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                false
            }
        }
    }

    /// The writer took `len` bytes off the queue.
    pub fn dequeued(&self, len: usize) {
        self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
    }

    pub fn kick(&self, why: Kick, metrics: &Metrics) {
        if self.kicked.swap(true, Ordering::Relaxed) {
            return;
        }
        match why {
            Kick::SlowConsumer => {
                self.slow.store(true, Ordering::Relaxed);
                metrics.slow_consumers.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(client = %self.id, queued_bytes = self.queued_bytes.load(Ordering::Relaxed),
                    "disconnecting slow consumer: its outgoing queue is full");
            }
            Kick::DeadPeer => {
                metrics.dead_peers.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(client = %self.id, "disconnecting client that answered no ping");
            }
        }
        self.cancel.cancel();
    }

    pub fn was_slow(&self) -> bool {
        self.slow.load(Ordering::Relaxed)
    }
}
