//! `axion-bridge`: the legacy WebSocket JSON protocol of the old Node broker
//! (docs/DESIGN.md, "The legacy WebSocket protocol"), translated onto Axion's
//! MQTT topics so the old JS and Python clients keep working unchanged
//! against any MQTT 5 broker, the embedded one included.
//!
//! ```no_run
//! # async fn f() -> Result<(), axion_bridge::BridgeError> {
//! use axion_bridge::{Bridge, BridgeConfig};
//! let config = BridgeConfig::new(
//!     "127.0.0.1:7000".parse().unwrap(),
//!     "mqtt://127.0.0.1:1883".parse().unwrap(),
//!     "default",
//! );
//! let bridge = Bridge::bind(config).await?;
//! println!("bridge on {}", bridge.local_addr());
//! bridge.serve(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

mod client;
mod hub;
mod link;
pub mod local;
mod metrics;
mod mqtt;
pub mod mqtt_ws;
pub mod protocol;
mod server;
mod tasks;
mod tls;
mod web;
pub mod ws_io;

pub use client::Metrics;
pub use local::LocalBroker;
pub use mqtt_ws::MqttEndpoint;

use axion_client::connection::{options_v5, Failover, Reconnect};
use axion_client::publisher::{HeartbeatConfig, HeartbeatPublisher};
use axion_wire::BrokerUrls;
use axum::serve::ListenerExt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Bounds on what clients can make the bridge hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest text frame handled; larger ones get an error reply.
    pub max_frame_bytes: usize,
    /// Distinct MQTT filters held for all clients together.
    pub max_filters: usize,
    pub max_subscriptions_per_client: usize,
    pub max_clients: usize,
    /// Outgoing queue per client, in frames and in bytes; a client whose
    /// queue overflows is disconnected (see `client.rs`).
    pub client_queue_frames: usize,
    pub client_queue_bytes: usize,
    /// How long a WebSocket publisher waits for room in a subscriber's full
    /// queue before that subscriber is disconnected as a slow consumer.
    pub slow_consumer_timeout: Duration,
    /// Pulls a client may have waiting at once.
    pub max_pulls_per_client: usize,
    /// WebSocket ping period; a peer silent for two periods is dropped.
    pub ping_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 1024 * 1024,
            max_filters: 10_000,
            max_subscriptions_per_client: 1_000,
            max_clients: 10_000,
            client_queue_frames: 8_192,
            client_queue_bytes: 16 * 1024 * 1024,
            slow_consumer_timeout: Duration::from_secs(2),
            max_pulls_per_client: 1_024,
            ping_interval: Duration::from_secs(20),
        }
    }
}

#[derive(Debug, Clone)]
pub struct BridgeConfig {
    pub listen: SocketAddr,
    /// The broker's nodes; the bridge fails over between them.
    pub mqtt: BrokerUrls,
    /// One topic level: events live under `axion/<package>/event/`.
    pub package: String,
    pub limits: Limits,
    /// Publish the bridge's own retained heartbeat (service `bridge`).
    pub heartbeat: bool,
    /// More figures for `GET /metrics`, beside the bridge's own: `axion
    /// serve` adds its broker's and its queues'.
    pub metrics: Vec<Arc<dyn prometheus_client::collector::Collector>>,
    /// Users and ACLs (the broker's auth file): when set, every WebSocket
    /// client must present a bearer token and is held to its user's ACL.
    pub auth: Option<Arc<axion_access::auth::Auth>>,
    /// Serve `wss://` (and `/health` over `https://`) instead of plain `ws://`.
    pub tls: Option<TlsFiles>,
    /// The legacy heartbeat service, answered on this port too
    /// (`/heartbeat`, `/heartbeats`), and fed the `heartbeat` events that
    /// WebSocket clients publish.
    pub legacy_heartbeats: Option<Arc<axion_supervise::LegacyHeartbeats>>,
    /// Serves MQTT over WebSocket at `/mqtt` (the embedded broker); without
    /// one, `/mqtt` answers 404.
    pub mqtt_endpoint: Option<Arc<dyn MqttEndpoint>>,
    /// The broker in the same process (`axion serve`): events nobody but
    /// the bridge's own clients read are then not published on MQTT.
    pub local_broker: Option<Arc<dyn LocalBroker>>,
    /// Threads the bridge runs on, apart from the caller's runtime (see
    /// [`Bridge::serve`]). One, the default, costs the least CPU per event.
    pub threads: usize,
}

/// PEM files of the bridge's TLS certificate chain and private key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl BridgeConfig {
    pub fn new(
        listen: SocketAddr,
        mqtt: impl Into<BrokerUrls>,
        package: impl Into<String>,
    ) -> Self {
        Self {
            listen,
            mqtt: mqtt.into(),
            package: package.into(),
            limits: Limits::default(),
            heartbeat: true,
            metrics: Vec::new(),
            auth: None,
            tls: None,
            legacy_heartbeats: None,
            mqtt_endpoint: None,
            local_broker: None,
            threads: 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("invalid package name: {0}")]
    Package(#[from] axion_wire::TopicError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("WebSocket server failed: {0}")]
    Serve(std::io::Error),
    /// Not a `source`: the message already carries it, and error chains
    /// would print it twice.
    #[error("WebSocket TLS: {0}")]
    Tls(axion_access::tls::TlsError),
    #[error("heartbeat: {0}")]
    Heartbeat(#[from] axion_client::HeartbeatError),
    #[error("cannot start the bridge's threads: {0}")]
    Threads(std::io::Error),
    #[error("the bridge's thread ended without a result (a panic, logged above)")]
    Panicked,
}

/// A bridge whose port is bound; [`Bridge::serve`] runs it.
pub struct Bridge {
    config: BridgeConfig,
    listener: TcpListener,
    local_addr: SocketAddr,
    metrics: Arc<Metrics>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Bridge {
    /// Binds the WebSocket port, so the caller knows the address (port 0
    /// picks a free one) before anything runs. The TLS certificate, if
    /// any, is loaded here so a bad one stops start-up with a clear error.
    pub async fn bind(config: BridgeConfig) -> Result<Self, BridgeError> {
        axion_wire::topics::validate_level("package", &config.package)?;
        let tls = match &config.tls {
            Some(files) => Some(
                axion_access::tls::acceptor(&files.cert, &files.key).map_err(BridgeError::Tls)?,
            ),
            None => None,
        };
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| BridgeError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| BridgeError::Bind {
            addr: config.listen,
            source,
        })?;
        Ok(Self {
            config,
            listener,
            local_addr,
            metrics: Arc::new(Metrics::default()),
            tls,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Live counters (clients, slow consumers, events…), also at `/stats`.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Binds and serves until `shutdown` completes.
    pub async fn run(
        config: BridgeConfig,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), BridgeError> {
        Self::bind(config).await?.serve(shutdown).await
    }

    /// Serves WebSocket clients until `shutdown` completes, then releases
    /// held tasks, says `offline` in the heartbeat, and disconnects.
    ///
    /// Everything the bridge does runs on a runtime of its own, on
    /// `config.threads` threads of its own: with one (the default), a
    /// frame read, its fan-out and the writes to every subscriber happen
    /// on one thread, which then sleeps until the next. On the caller's
    /// multi-threaded runtime each event also woke an idle worker to
    /// steal a subscriber's writer, and at 10k events/s those wake-ups
    /// were a third of the CPU. The legacy broker ran on one thread too.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), BridgeError> {
        let threads = self.config.threads.max(1);
        let runtime = if threads == 1 {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("axion-bridge")
                .enable_all()
                .build()
        }
        .map_err(BridgeError::Threads)?;
        // The listener moves to the bridge's runtime: connections it
        // accepts are then watched by that runtime's own poller.
        let listener = self.listener.into_std().map_err(BridgeError::Serve)?;
        let (done, result) = tokio::sync::oneshot::channel();
        let mqtt_sessions = Arc::new(mqtt_ws::Sessions::default());
        std::thread::Builder::new()
            .name("axion-bridge".into())
            .spawn(move || {
                let sessions = mqtt_sessions.clone();
                let served = runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).map_err(BridgeError::Serve)?;
                    Bridge { listener, ..self }
                        .serve_here(shutdown, sessions)
                        .await
                });
                let _ = done.send(served);
                // MQTT over WebSocket connections outlive the bridge: the
                // broker ends them when it stops, after the bridge.
                runtime.block_on(mqtt_sessions.all_ended());
            })
            .map_err(BridgeError::Threads)?;
        result.await.unwrap_or(Err(BridgeError::Panicked))
    }

    async fn serve_here(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        mqtt_sessions: Arc<mqtt_ws::Sessions>,
    ) -> Result<(), BridgeError> {
        let Bridge {
            config,
            listener,
            local_addr,
            metrics,
            tls,
        } = self;
        let cancel = CancellationToken::new();
        let hub = Arc::new(hub::Hub::new(
            &config.package,
            config.limits.max_filters,
            metrics.clone(),
        ));

        let client_id = format!(
            "axion-bridge-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let max_packet = u32::try_from(config.limits.max_frame_bytes.saturating_add(64 * 1024))
            .unwrap_or(u32::MAX);
        metrics
            .own_max_packet
            .store(u64::from(max_packet), Ordering::Relaxed);
        // The in-process link to the broker beside the bridge, or rumqttc
        // over a socket to any broker.
        let (client, connection) = match &config.local_broker {
            Some(broker) => {
                let (client, requests) = link::channel(REQUEST_QUEUE);
                (
                    mqtt::Client::Link(client),
                    Connection::Link(broker.clone(), requests),
                )
            }
            None => {
                let failover = Failover::new(
                    config.mqtt.clone(),
                    Reconnect::new(mqtt::BACKOFF_MIN, mqtt::BACKOFF_MAX),
                );
                let mut options = options_v5(failover.current(), &client_id);
                options.set_max_packet_size(Some(max_packet));
                options.set_clean_start(true);
                // Events are small and latency matters more than packet count.
                let mut network = rumqttc::NetworkOptions::new();
                network.set_tcp_nodelay(true);
                options.set_network_options(network);
                let (client, eventloop) = rumqttc::v5::AsyncClient::new(options, REQUEST_QUEUE);
                (
                    mqtt::Client::Socket(client),
                    Connection::Socket(Box::new(eventloop), failover),
                )
            }
        };
        let mqtt = Arc::new(mqtt::Mqtt::new(
            client.clone(),
            client_id.clone(),
            hub.clone(),
        ));
        let tasks = Arc::new(tasks::Tasks::new(
            &config.package,
            config.limits.max_pulls_per_client,
            mqtt.clone(),
            hub.clone(),
            metrics.clone(),
        ));
        let resync = Arc::new(Notify::new());
        let inbox = mqtt::Inbox {
            hub: hub.clone(),
            tasks: tasks.clone(),
            resync: resync.clone(),
            metrics: metrics.clone(),
        };
        let event_loop = match connection {
            Connection::Socket(eventloop, failover) => tokio::spawn(mqtt::run_event_loop(
                *eventloop,
                failover,
                inbox,
                cancel.clone(),
            )),
            Connection::Link(broker, requests) => {
                // The broker beside the bridge is this process's own: its
                // one URL carries the login.
                let local = config.mqtt.first();
                let options = link::LinkOptions {
                    client_id: client_id.clone(),
                    login: local
                        .user
                        .clone()
                        .map(|user| (user, local.password.clone().unwrap_or_default())),
                    max_packet,
                };
                tokio::spawn(link::run(broker, options, requests, inbox, cancel.clone()))
            }
        };
        if let Err(error) = tasks.start().await {
            tracing::error!(%error, "could not subscribe the enqueue reply topic");
        }
        let retrier = {
            let (tasks, cancel) = (tasks.clone(), cancel.clone());
            tokio::spawn(async move { tasks.retry_unconfirmed(cancel).await })
        };
        let resyncer = {
            let (mqtt, tasks, cancel) = (mqtt.clone(), tasks.clone(), cancel.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = resync.notified() => {}
                    }
                    mqtt.resync().await;
                    tasks.on_connected().await;
                }
            })
        };

        let heartbeat = if config.heartbeat {
            let mut hb =
                HeartbeatConfig::new(config.mqtt.clone(), config.package.clone(), "bridge")?
                    .port(local_addr.port());
            // The queue owner treats this worker as gone when the heartbeat
            // turns offline (its will), releasing what the bridge held.
            hb.extras.insert("worker".into(), tasks.worker_id().into());
            let handle = HeartbeatPublisher::start(hb)?;
            let (metrics, cancel) = (metrics.clone(), cancel.clone());
            let reporter = {
                let shared = Arc::new(handle);
                let h = shared.clone();
                let task: tokio::task::JoinHandle<()> = tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    let mut was_connected = None;
                    loop {
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tick.tick() => {}
                        }
                        let connected = metrics.mqtt_connected.load(Ordering::Relaxed);
                        h.set_connected(connected);
                        h.set_extra("clients", metrics.clients.load(Ordering::Relaxed).into());
                        // The first record goes out before the bridge's own
                        // MQTT client is up: say so at once, not a whole
                        // heartbeat interval later.
                        if was_connected.replace(connected) != Some(connected) {
                            h.publish_now();
                        }
                    }
                });
                (shared, task)
            };
            Some(reporter)
        } else {
            None
        };

        let clients_root = CancellationToken::new();
        let registry = metrics::registry(
            &config.metrics,
            metrics::BridgeCollector {
                metrics: metrics.clone(),
                hub: hub.clone(),
            },
        );
        let shared = Arc::new(server::Shared {
            registry,
            limits: config.limits.clone(),
            auth: config.auth.clone(),
            package: config.package.clone(),
            hub,
            mqtt: mqtt.clone(),
            tasks: tasks.clone(),
            metrics: metrics.clone(),
            shutdown: clients_root.clone(),
            next_key: AtomicU64::new(1),
            legacy_heartbeats: config.legacy_heartbeats.clone(),
            local_broker: config.local_broker.clone(),
        });
        tracing::info!(listen = %local_addr, tls = tls.is_some(), mqtt = %config.mqtt, package = config.package, client_id, "WebSocket bridge up");
        // Upgraded connections outlive hyper's graceful shutdown, so the
        // same signal cancels them through their parent token.
        let stop_clients = clients_root.clone();
        let shutdown = async move {
            shutdown.await;
            stop_clients.cancel();
        };
        let app = server::router(shared)
            .merge(mqtt_ws::routes(config.mqtt_endpoint.clone(), mqtt_sessions));
        let result = match tls {
            Some(acceptor) => {
                tls::serve(listener, acceptor, app, shutdown).await;
                Ok(())
            }
            None => {
                let listener = listener.tap_io(|tcp| {
                    if let Err(error) = tcp.set_nodelay(true) {
                        tracing::debug!(%error, "TCP_NODELAY on a WebSocket connection");
                    }
                });
                let app = app.into_make_service_with_connect_info::<SocketAddr>();
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
                    .map_err(BridgeError::Serve)
            }
        };
        clients_root.cancel();
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while metrics.clients.load(Ordering::Relaxed) > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                clients = metrics.clients.load(Ordering::Relaxed),
                "clients still closing at shutdown"
            );
        }

        tasks.shutdown().await;
        if let Some((handle, reporter)) = heartbeat {
            reporter.abort();
            let _ = reporter.await;
            match Arc::try_unwrap(handle) {
                Ok(handle) => {
                    if let Err(error) = handle.stop("stopped").await {
                        tracing::warn!(%error, "heartbeat stop failed");
                    }
                }
                Err(_) => tracing::warn!("heartbeat handle still shared at shutdown"),
            }
        }
        if let Err(error) = client.disconnect().await {
            tracing::debug!(%error, "MQTT disconnect request");
        }
        // The event loop returns once DISCONNECT (after the releases queued
        // before it) is written.
        let mut event_loop = event_loop;
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut event_loop)
            .await
            .is_err()
        {
            tracing::warn!("MQTT side did not disconnect in time");
        }
        cancel.cancel();
        event_loop.abort();
        let _ = resyncer.await;
        let _ = retrier.await;
        tracing::info!("WebSocket bridge stopped");
        result
    }
}

/// How long shutdown waits for clients to close and MQTT to disconnect.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Requests queued for the MQTT connection before senders wait.
const REQUEST_QUEUE: usize = 4096;

/// The receiving side of the bridge's MQTT connection, before its task
/// starts.
enum Connection {
    /// Boxed: rumqttc's event loop is over a kilobyte.
    Socket(Box<rumqttc::v5::EventLoop>, Failover),
    Link(
        Arc<dyn LocalBroker>,
        tokio::sync::mpsc::Receiver<rumqttc::v5::mqttbytes::v5::Packet>,
    ),
}
