//! Durable work queues over MQTT (see the crate's `README.md`).
//!
//! A shared subscription alone drops tasks when no worker is subscribed and
//! loses QoS 1 messages in flight to a member that disconnects. So one
//! process, the queue owner, keeps every task in an embedded store and only
//! hands tasks to workers that announced credit, with ack wait, retries,
//! dead letters and stats — NATS JetStream's work-queue model over the
//! docs/DESIGN.md topics. It is an ordinary MQTT client: `axion serve` runs it
//! against its embedded broker, and `axion queues --mqtt URL` runs it against
//! any MQTT 5 broker.
//!
//! ```no_run
//! # async fn demo() -> Result<(), axion_queues::QueueError> {
//! use axion_queues::{QueueConfig, QueueOwner};
//! let url = axion_wire::BrokerUrls::parse("mqtt://10.0.0.1:1883,mqtt://10.0.0.2:1883").expect("url");
//! let handle = QueueOwner::start(QueueConfig::new(url, "./axion-data".into(), "default".into())).await?;
//! // ... later:
//! handle.shutdown().await?;
//! # Ok(()) }
//! ```

mod cache;
pub mod metrics;
pub mod ops;
pub mod outlet;
mod owner;
mod queue;
mod store;
pub mod tap;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use axion_wire::{topics, BrokerUrls, TopicError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use metrics::QueueMetrics;
pub use store::StoreError;

/// Everything the owner needs. [`QueueConfig::new`] fills the defaults.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// The broker's nodes; the owner fails over between them.
    pub mqtt: BrokerUrls,
    /// The store lives in `<data_dir>/queues.redb`.
    pub data_dir: PathBuf,
    pub package: String,
    /// Time a worker has to ack (or send `progress`) before the task is
    /// delivered again. Default 30 s.
    pub ack_wait: Duration,
    /// Per-queue ack waits that replace `ack_wait`.
    pub ack_wait_overrides: HashMap<String, Duration>,
    /// Deliveries before a task is dead-lettered, when the request sets no
    /// `maxAttempts`. Default 5.
    pub max_attempts: u32,
    /// First retry delay after `fail`; doubles per attempt (with jitter)
    /// up to `retry_backoff_max`. Defaults 1 s and 60 s.
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    /// MQTT client id; default `axion-queues-<package>` (stable, so a
    /// restart takes over its session).
    pub client_id: Option<String>,
    /// Largest MQTT packet accepted (task payloads). Default 1 MiB.
    pub max_packet_size: u32,
    /// How long the broker keeps the owner's session (and enqueues for it)
    /// while the owner is away. Default 600 s.
    pub session_expiry_secs: u32,
    /// Acknowledge an `enqueue` to the broker only once the task is on
    /// disk, so a broker that outlives the owner (an external one, with the
    /// owner's persistent session) hands unsaved enqueues over again after
    /// a crash. Pointless beside the embedded broker, which dies with the
    /// owner; there it only costs throughput, because rumqttd's router
    /// keeps at most 100 messages unacknowledged per client and everything
    /// behind them (task acks included) would wait for each fsync.
    /// Everything else is acknowledged on receipt either way; when nothing
    /// waits, the MQTT client acknowledges by itself, a read's worth of
    /// PUBACKs in one write (by hand, rumqttc 0.25 writes each alone).
    /// Default true.
    pub ack_after_commit: bool,
    /// Bytes of task bodies kept in memory beside the store, for the tasks
    /// about to be delivered (bodies not on disk yet are held whatever
    /// this says). Default 32 MiB.
    pub cache_bytes: u64,
    /// Tasks one queue may hold, waiting or in flight; past it enqueues are
    /// refused. 0: no limit. Default 100 000.
    pub max_depth: u64,
    /// Bytes of task bodies one queue may hold; past it enqueues are
    /// refused. 0: no limit. Default 1 GiB.
    pub max_bytes: u64,
    /// Per-queue limits that replace `max_depth` and `max_bytes`.
    pub limit_overrides: HashMap<String, QueueLimit>,
    /// Deliver every task on its worker's own topic
    /// (`…/tasks/<worker>`), never on the shared one, whatever the worker
    /// asked. Also done when the broker's CONNACK says it has no shared
    /// subscriptions. Default false: each worker's `ready` says which it
    /// wants.
    pub directed_delivery: bool,
}

/// One queue's own limits; `None` keeps the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueLimit {
    pub depth: Option<u64>,
    pub bytes: Option<u64>,
}

impl QueueConfig {
    pub fn new(mqtt: impl Into<BrokerUrls>, data_dir: PathBuf, package: String) -> Self {
        Self {
            mqtt: mqtt.into(),
            data_dir,
            package,
            ack_wait: Duration::from_secs(30),
            ack_wait_overrides: HashMap::new(),
            max_attempts: 5,
            retry_backoff: Duration::from_secs(1),
            retry_backoff_max: Duration::from_secs(60),
            client_id: None,
            max_packet_size: 1024 * 1024,
            session_expiry_secs: 600,
            ack_after_commit: true,
            cache_bytes: 32 * 1024 * 1024,
            max_depth: 100_000,
            max_bytes: 1024 * 1024 * 1024,
            limit_overrides: HashMap::new(),
            directed_delivery: false,
        }
    }

    pub fn ack_wait_for(&self, queue: &str) -> Duration {
        self.ack_wait_overrides
            .get(queue)
            .copied()
            .unwrap_or(self.ack_wait)
    }

    /// The (depth, bytes) limits of `queue`; 0 is no limit.
    pub fn limits_for(&self, queue: &str) -> (u64, u64) {
        let own = self.limit_overrides.get(queue).copied().unwrap_or_default();
        (
            own.depth.unwrap_or(self.max_depth),
            own.bytes.unwrap_or(self.max_bytes),
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error("invalid queue setting: {0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the queue store thread: {0}")]
    Thread(std::io::Error),
    #[error("the queue store thread stopped")]
    StoreThread,
    #[error("the queue owner's MQTT loop stopped")]
    MqttLoop,
    #[error("the queue owner task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Starts queue owners.
pub struct QueueOwner;

impl QueueOwner {
    /// Opens (or creates) the store, loads every queue, connects to the
    /// broker and starts serving. Returns once the store is loaded; the MQTT
    /// connection is made (and remade) in the background.
    pub async fn start(cfg: QueueConfig) -> Result<QueueHandle, QueueError> {
        Self::start_with(cfg, None).await
    }

    /// [`QueueOwner::start`] beside the embedded broker: the owner's
    /// inbound queue traffic comes through `tap` (see [`tap`]) instead of
    /// its MQTT subscriptions, and what it publishes goes out through the
    /// tap's outlet (see [`outlet`]) when it connects under the default
    /// client id.
    pub async fn start_tapped(
        cfg: QueueConfig,
        tap: tap::TapRx,
    ) -> Result<QueueHandle, QueueError> {
        Self::start_with(cfg, Some(tap)).await
    }

    async fn start_with(
        cfg: QueueConfig,
        tap: Option<tap::TapRx>,
    ) -> Result<QueueHandle, QueueError> {
        topics::validate_level("package", &cfg.package)?;
        for queue in cfg
            .ack_wait_overrides
            .keys()
            .chain(cfg.limit_overrides.keys())
        {
            topics::validate_level("queue", queue)?;
        }
        if cfg.max_attempts == 0 {
            return Err(QueueError::Config("max attempts must be at least 1".into()));
        }
        if cfg.ack_wait.is_zero() || cfg.ack_wait_overrides.values().any(|d| d.is_zero()) {
            return Err(QueueError::Config("ack wait must be more than 0".into()));
        }
        let dir = cfg.data_dir.clone();
        let (store, loaded) = tokio::task::spawn_blocking(move || {
            let store = store::Store::open(&dir)?;
            let loaded = store.load()?;
            Ok::<_, StoreError>((store, loaded))
        })
        .await??;
        tracing::info!(
            mqtt = %cfg.mqtt,
            data_dir = %cfg.data_dir.display(),
            package = %cfg.package,
            ack_wait_ms = cfg.ack_wait.as_millis() as u64,
            cache_bytes = cfg.cache_bytes,
            max_depth = cfg.max_depth,
            max_bytes = cfg.max_bytes,
            "queue owner starting"
        );
        let (tx, rx) = oneshot::channel();
        let metrics = std::sync::Arc::new(QueueMetrics::default());
        let task = tokio::spawn(owner::run(cfg, store, loaded, rx, tap, metrics.clone()));
        Ok(QueueHandle {
            shutdown: Some(tx),
            task,
            finished: false,
            metrics,
        })
    }
}

/// A running queue owner.
pub struct QueueHandle {
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), QueueError>>,
    finished: bool,
    metrics: std::sync::Arc<QueueMetrics>,
}

impl QueueHandle {
    /// Every queue's figures and ack latency for Prometheus (register it
    /// with a `prometheus_client` registry; see [`metrics`]).
    pub fn metrics(&self) -> std::sync::Arc<QueueMetrics> {
        self.metrics.clone()
    }

    /// Commits what was accepted, publishes final stats and disconnects.
    pub async fn shutdown(mut self) -> Result<(), QueueError> {
        if self.finished {
            return Ok(());
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.await?
    }

    /// Resolves only if the owner stops by itself, which is always an error
    /// (the store failed): callers select on it beside their shutdown signal.
    /// Cancel-safe.
    pub async fn failed(&mut self) -> QueueError {
        if self.finished {
            return QueueError::MqttLoop;
        }
        let result = (&mut self.task).await;
        self.finished = true;
        match result {
            Ok(Err(err)) => err,
            Ok(Ok(())) => QueueError::MqttLoop,
            Err(err) => QueueError::Join(err),
        }
    }
}
