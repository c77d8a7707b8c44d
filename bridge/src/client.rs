//! One WebSocket client as the rest of the bridge sees it: an id, and a
//! bounded outgoing queue.
//!
//! Policy for a client that does not keep up, bounded in frames and in
//! bytes, like the broker's own (README, flow control): an event a
//! WebSocket client published waits for room in a full queue, holding back
//! that publisher (its socket is not read meanwhile), for at most the
//! slow-consumer timeout; a client whose queue stays full that long is
//! disconnected (WebSocket close 1008 "slow consumer" when it can still be
//! sent), counted in [`Metrics::slow_consumers`] and logged at `warn`. So a
//! healthy subscriber that is momentarily behind a fast publisher paces it
//! instead of being dropped, and a stalled one costs its publishers that
//! timeout once. Events from the MQTT side arrive on the MQTT connection's
//! single event loop, which must never wait: there a full queue disconnects
//! the client at once. Dropping frames silently instead would leave a client
//! believing it saw every event; a disconnect is something its reconnect
//! logic already handles.

use axum::extract::ws::Utf8Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
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
    /// Frames written to clients (events, replies, errors).
    pub frames_out: AtomicU64,
    pub bad_frames: AtomicU64,
    /// Events published to MQTT on behalf of WebSocket clients.
    pub events_published: AtomicU64,
    /// Events of WebSocket clients that no MQTT client read, delivered by
    /// the bridge alone and not published (`axion serve`, see `local.rs`).
    pub events_kept_local: AtomicU64,
    /// `{"event": …}` frames queued to clients.
    pub events_delivered: AtomicU64,
    /// Enqueues published again because the owner had not confirmed them.
    pub enqueue_retries: AtomicU64,
    pub mqtt_connected: AtomicBool,
    /// The broker's Maximum Packet Size from its last CONNACK (0: none
    /// given, so only the bridge's own limit applies).
    pub broker_max_packet: AtomicU64,
    /// The bridge's own limit on what it sends (its MQTT client's).
    pub own_max_packet: AtomicU64,
    /// Frames refused because the MQTT packet they would make is too large
    /// for the broker, or a property too long.
    pub oversize_refused: AtomicU64,
    /// CONNACKs from the broker: more than one means the connection dropped.
    pub mqtt_connects: AtomicU64,
}

/// Largest MQTT 5 binary or string property (a two-byte length).
pub const MAX_PROPERTY: usize = u16::MAX as usize;

impl Metrics {
    /// Checks that a publish of `topic` and `payload` with `properties`
    /// bytes of properties fits the broker's Maximum Packet Size and the
    /// bridge's own: one client's frame must never become a packet that
    /// makes the MQTT connection every client shares drop.
    pub fn fits(&self, topic: usize, payload: usize, properties: usize) -> Result<(), String> {
        // Fixed header (≤ 5), topic length (2), packet id (2), property
        // length (≤ 4).
        let size = (5 + 2 + topic + 2 + 4 + properties + payload) as u64;
        let broker = self.broker_max_packet.load(Ordering::Relaxed);
        let own = self.own_max_packet.load(Ordering::Relaxed);
        let limit = [broker, own].into_iter().filter(|l| *l > 0).min();
        match limit {
            Some(limit) if size > limit => {
                self.oversize_refused.fetch_add(1, Ordering::Relaxed);
                Err(format!(
                    "too large for MQTT: this would be a {size}-byte packet and the broker takes at most {limit}"
                ))
            }
            _ => Ok(()),
        }
    }
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
            "frames_out": get(&self.frames_out),
            "bad_frames": get(&self.bad_frames),
            "events_published": get(&self.events_published),
            "events_kept_local": get(&self.events_kept_local),
            "events_delivered": get(&self.events_delivered),
            "enqueue_retries": get(&self.enqueue_retries),
            "oversize_refused": get(&self.oversize_refused),
            "mqtt_connects": get(&self.mqtt_connects),
            "mqtt_connected": self.mqtt_connected.load(Ordering::Relaxed),
        })
    }
}

/// How often a publisher waiting for room in a full queue looks again.
const FULL_QUEUE_POLL: Duration = Duration::from_millis(1);

/// The outcome of [`ClientHandle::offer`].
pub enum Offer {
    Queued,
    /// No room: the frame comes back.
    Full(Utf8Bytes),
    /// The client is gone or being disconnected.
    Gone,
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
    /// `id` as a JSON string, written into every such event.
    pub id_json: String,
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
        let id_json = serde_json::to_string(&id).unwrap_or_else(|_| "\"\"".into());
        Self {
            key,
            id,
            id_json,
            tx,
            queued_bytes: AtomicUsize::new(0),
            max_bytes,
            kicked: AtomicBool::new(false),
            slow: AtomicBool::new(false),
            cancel,
        }
    }

    /// Queues a frame if there is room, without waiting.
    pub fn offer(&self, frame: Utf8Bytes) -> Offer {
        if self.kicked.load(Ordering::Relaxed) {
            return Offer::Gone;
        }
        let len = frame.len();
        let before = self.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if before + len > self.max_bytes {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            return Offer::Full(frame);
        }
        match self.tx.try_send(frame) {
            Ok(()) => Offer::Queued,
            Err(mpsc::error::TrySendError::Full(frame)) => {
                self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                Offer::Full(frame)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                Offer::Gone
            }
        }
    }

    /// Queues a frame without waiting; a full queue disconnects the client.
    /// Returns false when the client is gone or was just disconnected.
    pub fn send(&self, frame: Utf8Bytes, metrics: &Metrics) -> bool {
        match self.offer(frame) {
            Offer::Queued => true,
            Offer::Gone => false,
            Offer::Full(_) => {
                self.kick(Kick::SlowConsumer, metrics);
                false
            }
        }
    }

    /// Queues a frame, waiting up to `patience` for room; a queue still
    /// full then disconnects the client. Returns false when the client is
    /// gone or was disconnected.
    pub async fn send_waiting(
        &self,
        frame: Utf8Bytes,
        metrics: &Metrics,
        patience: Duration,
    ) -> bool {
        let deadline = Instant::now() + patience;
        let mut frame = frame;
        loop {
            match self.offer(frame) {
                Offer::Queued => return true,
                Offer::Gone => return false,
                Offer::Full(back) => frame = back,
            }
            if Instant::now() >= deadline {
                self.kick(Kick::SlowConsumer, metrics);
                return false;
            }
            // Rare (a queue of thousands of frames is full), so polling
            // costs less than waking a waiter on every frame written.
            tokio::select! {
                _ = self.cancel.cancelled() => return false,
                _ = tokio::time::sleep(FULL_QUEUE_POLL) => {}
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

#[cfg(test)]
mod tests {
    //! The slow-consumer timeout on tokio's paused clock: the publisher's
    //! wait is measured exactly, and no test waits for it in real time.

    use super::*;
    use std::sync::Arc;

    const PATIENCE: Duration = Duration::from_secs(2);

    /// A client whose queue holds one frame, already full.
    fn full_client() -> (Arc<ClientHandle>, mpsc::Receiver<Utf8Bytes>) {
        let (tx, rx) = mpsc::channel(1);
        let client = ClientHandle::new(1, "c".into(), tx, 1 << 20, CancellationToken::new());
        assert!(matches!(client.offer("first".into()), Offer::Queued));
        (Arc::new(client), rx)
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_still_full_after_the_patience_disconnects_its_client() {
        let (client, _rx) = full_client();
        let metrics = Metrics::default();
        let started = Instant::now();
        assert!(!client.send_waiting("next".into(), &metrics, PATIENCE).await);
        let waited = started.elapsed();
        assert!(
            waited >= PATIENCE && waited <= PATIENCE + FULL_QUEUE_POLL,
            "{waited:?}"
        );
        assert_eq!(metrics.slow_consumers.load(Ordering::Relaxed), 1);
        assert!(client.was_slow() && client.cancel.is_cancelled());
        assert!(matches!(client.offer("more".into()), Offer::Gone));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_reads_within_the_patience_only_paces_the_publisher() {
        let (client, mut rx) = full_client();
        let metrics = Metrics::default();
        let reader = client.clone();
        tokio::spawn(async move {
            tokio::time::sleep(PATIENCE - Duration::from_millis(100)).await;
            let frame = rx.recv().await.unwrap();
            reader.dequeued(frame.len());
            // Kept open, as a connected client's queue is.
            std::future::pending::<()>().await;
        });
        let started = Instant::now();
        assert!(client.send_waiting("next".into(), &metrics, PATIENCE).await);
        let waited = started.elapsed();
        assert!(waited < PATIENCE, "{waited:?}");
        assert!(
            waited >= PATIENCE - Duration::from_millis(100),
            "{waited:?}"
        );
        assert_eq!(metrics.slow_consumers.load(Ordering::Relaxed), 0);
        assert!(!client.cancel.is_cancelled());
    }
}
