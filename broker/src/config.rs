//! Broker settings, each chosen on purpose.
//!
//! The router keeps one in-memory commit log per subscription filter and a
//! cache entry per matched topic, and frees neither; the front end renews
//! the router (see `renewal`) once enough of them are dead, so its memory
//! is bounded by `max_filters` filters (~7.6 KB each when idle, at most
//! `segment_size × segment_count` while data flows) plus `max_topics`
//! topics (~190 B each). Past `max_filters` filters in one router, new
//! ones are refused until a renewal frees room.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub struct BrokerConfig {
    /// The one public port serving MQTT 3.1.1 and MQTT 5.
    pub listen: SocketAddr,
    /// Client connections accepted at once; one more gets a CONNACK refusal.
    pub max_connections: usize,
    /// Largest MQTT packet accepted (remaining length), in bytes.
    pub max_packet_size: usize,
    /// Time a new TCP connection has to send its CONNECT.
    pub connect_timeout: Duration,
    /// Distinct subscription filters a router may create; the router is
    /// renewed (see `renewal`) well before, once enough of them are dead.
    pub max_filters: usize,
    /// Distinct filters one session may hold (`$share` ones included): one
    /// client cannot take the router's whole `max_filters` for itself and
    /// leave none to the others until a renewal, which a kept session still
    /// owed messages can put off for as long as it lives. Axion's own
    /// components are not held to it (the bridge subscribes for all its
    /// WebSocket clients in one session, within its own bound).
    pub max_filters_per_client: usize,
    /// Distinct topics matching some filter after which the router is
    /// renewed (its topic cache is never freed otherwise).
    pub max_topics: usize,
    /// Size of one commit-log segment per filter.
    pub segment_size: usize,
    /// Segments kept per filter before the oldest is dropped.
    pub segment_count: usize,
    /// Retained messages kept (distinct topics); more are delivered, not retained.
    pub max_retained: usize,
    /// Bytes of retained topics and payloads kept.
    pub max_retained_bytes: usize,
    /// How long a subscriber may hold publishers back (see `flow`) before
    /// it is disconnected.
    pub slow_consumer_timeout: Duration,
    /// Users, roles and ACLs, and the limit on failed logins per address
    /// (one table, shared with the bridge); `None` lets every client in
    /// with every right.
    pub auth: Option<Arc<axion_access::auth::Auth>>,
    /// A second listener speaking MQTT over TLS, with its certificate.
    pub tls: Option<(SocketAddr, tokio_rustls::TlsAcceptor)>,
    /// A listener on this Unix domain socket: local clients (the embedded
    /// queue owner and bridge, `mosquitto_sub --unix`) skip the TCP stack.
    pub unix: Option<PathBuf>,
    /// Longest keep-alive an MQTT 5 client gets: one asking for more is
    /// told this in CONNACK (Server Keep Alive), so a dead peer is noticed
    /// within 1.5× of it.
    pub max_keep_alive: u16,
    /// Longest a disconnected session is kept, in seconds: caps an MQTT 5
    /// Session Expiry Interval and is the expiry of 3.1.1 persistent
    /// sessions, so abandoned client ids do not hold memory forever.
    pub max_session_expiry: u32,
    /// File that keeps retained messages, kept sessions and what they are
    /// owed across restarts (`None`: memory only, and the router holds
    /// what an away session is owed).
    pub state_file: Option<PathBuf>,
    /// Messages, and bytes on disk, one away session's queue may hold;
    /// past either, new messages for it are dropped and counted.
    pub max_queued_messages: u64,
    pub max_queued_bytes: u64,
    /// Bytes a connected client may leave untaken (unread by its socket or
    /// waiting for its receive window) before it is disconnected (MQTT 5
    /// reason 0x97): its own buffer, so it never holds publishers back.
    pub max_subscriber_buffer: usize,
    /// How often the `$SYS/broker/…` topics are refreshed (see `sys`);
    /// `None`: never (Mosquitto's `sys_interval 0`).
    pub sys_interval: Option<Duration>,
}

impl BrokerConfig {
    /// Lag at which publishers wait: half a filter's log, so the router
    /// never drops a segment a subscriber has not read.
    pub fn high_water(&self) -> u64 {
        (self.segment_size * self.segment_count / 2) as u64
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            max_connections: 10_000,
            max_packet_size: 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
            max_filters: 10_000,
            max_filters_per_client: 1_000,
            max_topics: 100_000,
            segment_size: 256 * 1024,
            segment_count: 4,
            max_retained: 100_000,
            max_retained_bytes: 256 * 1024 * 1024,
            slow_consumer_timeout: Duration::from_secs(10),
            auth: None,
            tls: None,
            unix: None,
            max_keep_alive: 60,
            max_session_expiry: 86_400,
            state_file: None,
            max_queued_messages: 50_000,
            max_queued_bytes: 64 * 1024 * 1024,
            max_subscriber_buffer: 32 * 1024 * 1024,
            // Mosquitto's default `sys_interval`.
            sys_interval: Some(Duration::from_secs(10)),
        }
    }
}

impl std::fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerConfig")
            .field("listen", &self.listen)
            .field("max_connections", &self.max_connections)
            .field("max_packet_size", &self.max_packet_size)
            .field("max_filters", &self.max_filters)
            .field("max_filters_per_client", &self.max_filters_per_client)
            .field("max_topics", &self.max_topics)
            .field("auth", &self.auth)
            .field("tls", &self.tls.as_ref().map(|(addr, _)| addr))
            .field("unix", &self.unix)
            .field("sys_interval", &self.sys_interval)
            .finish_non_exhaustive()
    }
}
