//! The broker in the same process, when the bridge has one (`axion serve`).
//!
//! The bridge hands the events its WebSocket clients publish to its own
//! WebSocket subscribers itself (`hub.rs`) and publishes them on MQTT for
//! everybody else. Over a socket it cannot know whether anybody else is
//! there, so every event makes the trip: encoded, written, read and decoded
//! by the broker, routed, sent back to the bridge's own session and dropped
//! there (its subscriptions are No Local). That trip was three quarters of
//! `axion serve`'s CPU per event in the legacy workload, where every
//! publisher and subscriber is a WebSocket client. A broker in the same
//! process answers "does anybody else read this topic?" with a lookup, and
//! an event nobody else reads stays in the process.
//!
//! `axion bridge` has no such broker and publishes every event, as it must
//! for a broker it cannot see into.

/// What the broker in the same process tells the bridge, and how the
/// bridge connects to it (see `link.rs`).
pub trait LocalBroker: std::fmt::Debug + Send + Sync + 'static {
    /// Serves one MQTT connection of the bridge's through `pipe`, as the
    /// broker serves a socket, until it ends: on the caller's runtime, so
    /// that the session runs on the bridge's thread.
    fn serve_link(
        &self,
        pipe: tokio::io::DuplexStream,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>;

    /// Whether a client other than `client_id` (the bridge's own MQTT
    /// connection) holds a subscription that `topic` matches: connected, or
    /// a kept session away. A subscriber must count from the moment its
    /// SUBACK can have been sent, so that an event published after it was
    /// told it is subscribed reaches it.
    fn read_by_others(&self, topic: &str, client_id: &str) -> bool;
}
