//! The public MQTT listener: accepts connections, bounds them, and stops.
//!
//! One port serves MQTT 3.1.1 and 5 (the session picks the codec from the
//! CONNECT). State the sessions share (router, limits, shared-group
//! membership) lives in [`Shared`].

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use bytes::Bytes;
use rumqttd::protocol::{Packet, Publish, PublishProperties};

use crate::expiry::Lifetimes;
use crate::flow::Flow;
use crate::listener::{self, Listener};
use crate::marks::{self, Needed};
use crate::refusals::Refusals;
use crate::renewal::Renewal;
use crate::retained::{Retained, RetainedStore, Stored};
use crate::router::RouterHandle;
use crate::{session, BrokerConfig};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen for MQTT on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen for MQTT on the Unix socket {path}: {source}")]
    BindUnix {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    BrokerDisk(#[from] crate::disk::DiskError),
}

/// State shared by every session.
pub struct Shared {
    pub config: BrokerConfig,
    /// The current router and its generation (see [`crate::renewal`]).
    router: std::sync::RwLock<(u64, Arc<RouterHandle>)>,
    /// Sessions past their CONNECT (counted from accept, released on close).
    pub sessions: AtomicUsize,
    /// Connections refused at the limit, for logs and tests.
    pub refused: AtomicU64,
    /// Second copies of `$share` messages the router sent and the front
    /// end dropped (see `session::repeats`).
    pub share_repeats: AtomicU64,
    /// Filters created in the current router (it never frees one).
    filters: Mutex<HashSet<String>>,
    /// Filters refused because the current router holds `max_filters`,
    /// for one log line per episode.
    pub filter_limit_refusals: Refusals,
    /// Filters refused because their session held `max_filters_per_client`.
    pub filters_refused_per_client: AtomicU64,
    /// Filters refused because the current router held `max_filters`.
    pub filters_refused_at_limit: AtomicU64,
    groups: Mutex<HashMap<String, HashSet<String>>>,
    retained: Mutex<RetainedStore>,
    /// Where retained changes are also written (see [`crate::disk`]).
    pub(crate) disk: Option<Arc<crate::disk::BrokerDisk>>,
    /// What away kept sessions are owed (see [`crate::offline`]).
    pub offline: crate::offline::Offline,
    pub flow: Flow,
    /// What publishes must carry for their subscribers (see [`marks`]).
    pub needed: Needed,
    /// When disconnected sessions end (see [`crate::expiry`]).
    pub lifetimes: Lifetimes,
    /// Moving sessions to a fresh router (see [`crate::renewal`]).
    pub renewal: Renewal,
    /// Copies of queue publishes for the queue owner beside this broker
    /// (see [`axion_queues::tap`]).
    pub queue_tap: std::sync::OnceLock<axion_queues::tap::Tap>,
    /// What crossed the sockets (see [`crate::traffic`]).
    pub traffic: crate::traffic::Traffic,
    /// The `$SYS/broker/…` values (see [`crate::sys`]).
    pub sys: crate::sys::SysTopics,
    /// When the broker started, for its uptime.
    pub started: std::time::Instant,
}

impl Shared {
    /// Turns a validated, router-form PUBLISH from `origin` (a router id)
    /// into what the router gets: a retained message goes to the front
    /// end's store and on as live traffic, and the publish carries the
    /// [`crate::marks`] its subscribers need.
    pub fn prepare_publish(
        &self,
        publish: Publish,
        qos: u8,
        props: Option<PublishProperties>,
        origin: Option<&str>,
    ) -> Packet {
        self.prepare_publish_durable(publish, qos, props, origin).0
    }

    /// [`Shared::prepare_publish`] for a publish whose bytes are its own,
    /// not slices of a read buffer (the queue owner's, through its outlet).
    pub fn prepare_owned_publish(
        &self,
        publish: Publish,
        qos: u8,
        props: Option<PublishProperties>,
        origin: Option<&str>,
    ) -> Packet {
        self.prepare_durable(publish, qos, props, origin).0
    }

    /// [`Shared::prepare_publish`], also handing back the disk commit of a
    /// retained message (when the store is on disk), which a QoS 1 or 2
    /// publish must await before the router may acknowledge it.
    pub fn prepare_publish_durable(
        &self,
        mut publish: Publish,
        qos: u8,
        props: Option<PublishProperties>,
        origin: Option<&str>,
    ) -> (Packet, Option<crate::disk::Commit>) {
        // The decoder hands out slices of the connection's read buffer; a
        // message kept in the router's log or the retained store would pin
        // that whole buffer (rumqtt#1001: tens of times the message's size).
        // Owned copies keep memory proportional to what is stored.
        publish.topic = Bytes::copy_from_slice(&publish.topic);
        publish.payload = Bytes::copy_from_slice(&publish.payload);
        let mut props = props;
        if let Some(data) = props.as_mut().and_then(|p| p.correlation_data.as_mut()) {
            *data = Bytes::copy_from_slice(data);
        }
        self.prepare_durable(publish, qos, props, origin)
    }

    fn prepare_durable(
        &self,
        mut publish: Publish,
        qos: u8,
        mut props: Option<PublishProperties>,
        origin: Option<&str>,
    ) -> (Packet, Option<crate::disk::Commit>) {
        let mut commit = None;
        let mark = self.needed.mark(qos, publish.retain, origin);
        if let Some(p) = props.as_mut() {
            // The mark's key is reserved: a client cannot forge one.
            if !p.user_properties.is_empty() {
                p.user_properties.retain(|(k, _)| k != marks::KEY);
            }
        }
        if publish.retain && !publish.topic.is_empty() {
            let stored_props = props.clone().map(|mut p| {
                p.topic_alias = None;
                p.subscription_identifiers.clear();
                p
            });
            let mut store = self.retained.lock().unwrap_or_else(|p| p.into_inner());
            let on_disk = stored_props.clone();
            match store.store(
                publish.topic.clone(),
                publish.payload.clone(),
                qos,
                stored_props,
            ) {
                Stored::Refused => warn!(
                    topic = %String::from_utf8_lossy(&publish.topic),
                    refused_total = store.refused_total,
                    retained = store.len(),
                    "retained store full; message delivered but not retained"
                ),
                // Written under the store's lock, so the disk sees the
                // changes of one topic in the order memory did.
                Stored::Kept => {
                    commit = self.disk.as_ref().map(|d| {
                        d.put(
                            publish.topic.clone(),
                            &publish.payload,
                            qos,
                            on_disk.as_ref(),
                        )
                    })
                }
                Stored::Cleared => {
                    commit = self.disk.as_ref().map(|d| d.delete(publish.topic.clone()))
                }
            }
            publish.retain = false;
        }
        (Packet::Publish(publish, mark.attach(props)), commit)
    }

    /// Retained messages for a router-form filter; for a `$SYS` filter,
    /// the broker's own `$SYS` values (see [`crate::sys`]).
    pub fn retained_matching(&self, filter: &str) -> Vec<(Bytes, Retained)> {
        if crate::sys::is_sys_filter(filter) {
            return self
                .sys
                .matching(filter)
                .into_iter()
                .map(|(topic, payload)| (topic, Retained::new(payload, 0)))
                .collect();
        }
        let mut store = self.retained.lock().unwrap_or_else(|p| p.into_inner());
        store.matching(filter)
    }

    /// Retained messages kept now (the `$SYS` values not included).
    pub fn retained_count(&self) -> usize {
        self.retained
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Retained messages refused because the store was full, in total.
    pub fn retained_refused(&self) -> u64 {
        self.retained
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refused_total
    }

    /// The router sessions link to now.
    pub fn router(&self) -> Arc<RouterHandle> {
        self.router_epoch().1
    }

    /// The current router with its generation.
    pub fn router_epoch(&self) -> (u64, Arc<RouterHandle>) {
        let slot = self.router.read().unwrap_or_else(|p| p.into_inner());
        (slot.0, slot.1.clone())
    }

    /// Makes `new` the current router; returns the previous one.
    pub fn replace_router(&self, new: Arc<RouterHandle>) -> Arc<RouterHandle> {
        let mut slot = self.router.write().unwrap_or_else(|p| p.into_inner());
        let epoch = slot.0 + 1;
        std::mem::replace(&mut *slot, (epoch, new)).1
    }

    /// How many filters the current router has created.
    pub fn created_filters(&self) -> usize {
        self.filters.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// A fresh router holds exactly the filters sessions hold.
    pub fn reset_created_filters(&self, filters: HashSet<String>) {
        *self.filters.lock().unwrap_or_else(|p| p.into_inner()) = filters;
    }

    /// True if `filter` exists already or there is room for one more.
    pub fn admit_filter(&self, filter: &str) -> bool {
        let mut filters = self.filters.lock().unwrap_or_else(|p| p.into_inner());
        if filters.contains(filter) {
            return true;
        }
        if filters.len() >= self.config.max_filters {
            return false;
        }
        filters.insert(filter.to_string());
        true
    }

    pub fn join_group(&self, group: &str, client: &str) {
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        groups
            .entry(group.to_string())
            .or_default()
            .insert(client.to_string());
    }

    pub fn leave_groups(&self, client: &str) {
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        groups.retain(|_, members| {
            members.remove(client);
            !members.is_empty()
        });
    }

    pub fn sole_member(&self, group: &str, client: &str) -> bool {
        let groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        groups
            .get(group)
            .is_none_or(|m| m.len() == 1 && m.contains(client))
    }
}

/// What the broker has counted since it started, for the heartbeat record
/// (`mosquitto_sub -t 'axion/+/heartbeat/broker/#'` shows it) and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Sessions connected now.
    pub sessions: usize,
    /// Connections refused at `--max-connections`.
    pub refused_at_limit: u64,
    /// Subscribers cut off for holding publishers back past the timeout.
    pub slow_consumers_cut_off: u64,
    /// Kept sessions erased when their expiry passed.
    pub sessions_expired: u64,
    /// With an auth file: connects refused, publishes and subscriptions denied.
    pub auth_refused_connects: u64,
    /// With an auth file: logins (MQTT and the bridge's) refused unchecked
    /// because their address failed too often or had too many checks running.
    pub auth_throttled_logins: u64,
    pub acl_denied_publishes: u64,
    pub acl_denied_subscribes: u64,
    /// Times every session moved to a fresh router to free filter and
    /// topic memory, and times that was put off.
    pub router_renewals: u64,
    pub router_renewals_put_off: u64,
    /// How long the last renewal paused publishing, in milliseconds.
    pub router_renewal_pause_ms: u64,
    /// Repeated `$share` deliveries from the router, dropped.
    pub share_repeats_dropped: u64,
    /// Subscriptions refused because the client held
    /// `--max-filters-per-client` filters already.
    pub filters_refused_per_client: u64,
    /// QoS 1/2 messages waiting in the queues of away kept sessions, and
    /// messages dropped because a queue was full (see [`crate::offline`]).
    pub queued_messages: u64,
    pub queued_dropped: u64,
}

/// A running broker.
pub struct Broker {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
    /// The MQTT-over-TLS listener's address and accept loop, if configured.
    tls: Option<(SocketAddr, tokio::task::JoinHandle<()>)>,
    /// The Unix socket's path and accept loop, if configured.
    unix: Option<(PathBuf, tokio::task::JoinHandle<()>)>,
}

impl Broker {
    /// Starts the router and listens on `config.listen`.
    pub async fn start(config: BrokerConfig) -> Result<Broker, BrokerError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| BrokerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| BrokerError::Bind {
            addr: config.listen,
            source,
        })?;
        let tls_listener = match &config.tls {
            Some((addr, acceptor)) => {
                let listener =
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| BrokerError::Bind {
                            addr: *addr,
                            source,
                        })?;
                let bound = listener.local_addr().map_err(|source| BrokerError::Bind {
                    addr: *addr,
                    source,
                })?;
                Some((listener, bound, acceptor.clone()))
            }
            None => None,
        };
        let unix_listener =
            match &config.unix {
                Some(path) => Some(listener::bind_unix(path).await.map_err(|source| {
                    BrokerError::BindUnix {
                        path: path.clone(),
                        source,
                    }
                })?),
                None => None,
            };
        let router = std::sync::RwLock::new((0, Arc::new(RouterHandle::spawn(&config))));
        let flow = Flow::new(config.high_water(), config.slow_consumer_timeout);
        let mut store = RetainedStore::new(config.max_retained, config.max_retained_bytes);
        let mut kept_sessions = Vec::new();
        let mut queues = HashMap::new();
        let disk = match &config.state_file {
            Some(path) => {
                let started = std::time::Instant::now();
                let crate::disk::Opened {
                    disk,
                    retained: loaded,
                    sessions,
                    queues: found_queues,
                } = crate::disk::BrokerDisk::open(path)?;
                kept_sessions = sessions;
                queues = found_queues;
                let found = loaded.len();
                let kept = loaded
                    .into_iter()
                    .filter(|m| {
                        store.restore(
                            m.topic.clone(),
                            m.payload.clone(),
                            m.qos,
                            m.properties.clone(),
                            m.age,
                        )
                    })
                    .count();
                if kept < found {
                    warn!(
                        found,
                        kept,
                        max = config.max_retained,
                        "retained messages on disk beyond the store's bounds were not loaded"
                    );
                }
                info!(file = %path.display(), retained = kept, took_ms = started.elapsed().as_millis() as u64, "retained messages restored");
                Some(Arc::new(disk))
            }
            None => None,
        };
        let retained = Mutex::new(store);
        let offline = crate::offline::Offline::new(
            config.max_queued_messages,
            config.max_queued_bytes,
            queues,
        );
        let shared = Arc::new(Shared {
            config,
            router,
            sessions: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            share_repeats: AtomicU64::new(0),
            filters: Mutex::new(HashSet::new()),
            filter_limit_refusals: Refusals::default(),
            filters_refused_per_client: AtomicU64::new(0),
            filters_refused_at_limit: AtomicU64::new(0),
            groups: Mutex::new(HashMap::new()),
            retained,
            disk,
            offline,
            flow,
            needed: Needed::default(),
            lifetimes: Lifetimes::default(),
            renewal: Renewal::default(),
            queue_tap: std::sync::OnceLock::new(),
            traffic: Default::default(),
            sys: Default::default(),
            started: std::time::Instant::now(),
        });
        // Before any client can connect: kept sessions are back on the
        // router, so a client resuming finds its session present.
        crate::expiry::restore_kept(&shared, kept_sessions).await;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let tls = tls_listener.map(|(listener, addr, acceptor)| {
            info!(%addr, "MQTT over TLS listening (3.1.1 and 5)");
            let task = tokio::spawn(accept_loop(
                Listener::Tcp(listener),
                shared.clone(),
                shutdown_rx.clone(),
                Some(acceptor),
            ));
            (addr, task)
        });
        tokio::spawn(crate::renewal::run(shared.clone(), shutdown_rx.clone()));
        if let Some(every) = shared.config.sys_interval.filter(|d| !d.is_zero()) {
            tokio::spawn(crate::sys::run(
                Arc::downgrade(&shared),
                every,
                shutdown_rx.clone(),
            ));
        }
        if shared.disk.is_some() {
            tokio::spawn(crate::offline::write_held(Arc::downgrade(&shared)));
        }
        let unix = unix_listener
            .zip(shared.config.unix.clone())
            .map(|(listener, path)| {
                info!(path = %path.display(), "MQTT listening on a Unix socket (3.1.1 and 5)");
                let task = tokio::spawn(accept_loop(
                    Listener::Unix(listener),
                    shared.clone(),
                    shutdown_rx.clone(),
                    None,
                ));
                (path, task)
            });
        let accept = tokio::spawn(accept_loop(
            Listener::Tcp(listener),
            shared.clone(),
            shutdown_rx,
            None,
        ));
        info!(%local_addr, "MQTT listening (3.1.1 and 5)");
        Ok(Broker {
            local_addr,
            shared,
            shutdown,
            accept,
            tls,
            unix,
        })
    }

    /// Address of the MQTT-over-TLS listener, if one is configured.
    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().map(|(addr, _)| *addr)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// From now on, sessions hand publishes to `package`'s queue topics
    /// (`enqueue`, `ack`, …) to the returned end as well as to the router:
    /// for the queue owner running beside this broker. `None` if a tap is
    /// already installed.
    pub fn tap_queues(&self, package: &str) -> Option<axion_queues::tap::TapRx> {
        let (tap, rx) = axion_queues::tap::tap(package);
        self.shared.queue_tap.set(tap).ok().map(|()| rx)
    }

    /// A handle that serves MQTT connections arriving by other means than
    /// the broker's listeners (the bridge's `/mqtt`, MQTT over WebSocket),
    /// through the same front end: handshake, auth, ACLs, limits.
    pub fn connections(&self) -> Connections {
        Connections {
            shared: self.shared.clone(),
            shutdown: self.shutdown.subscribe(),
        }
    }

    /// Path of the Unix socket listener, if one is configured.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_ref().map(|(path, _)| path.as_path())
    }

    /// Reads [`Counters`] whenever called, for a task that outlives `&self`.
    pub fn counters(&self) -> impl Fn() -> Counters + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || counters(&shared)
    }

    /// The broker's figures for Prometheus (see [`crate::metrics`]).
    pub fn metrics(&self) -> crate::metrics::BrokerMetrics {
        crate::metrics::BrokerMetrics::new(self.shared.clone())
    }

    /// The kept sessions whose queue dropped messages (client id, how
    /// many), most first, at most `n`.
    pub fn queue_drops(&self, n: usize) -> Vec<(String, u64)> {
        self.shared.offline.drops(n)
    }

    /// False once rumqttd's router thread has died; the process should exit.
    pub fn is_healthy(&self) -> bool {
        self.shared.router().is_alive()
    }

    /// Stops accepting, tells every client the server is shutting down and
    /// waits (bounded) for sessions to close.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        if let Some((_, task)) = self.tls {
            if tokio::time::timeout(Duration::from_secs(3), task)
                .await
                .is_err()
            {
                warn!("TLS sessions did not close within 3 s");
            }
        }
        if let Some((path, task)) = self.unix {
            if tokio::time::timeout(Duration::from_secs(3), task)
                .await
                .is_err()
            {
                warn!("Unix socket sessions did not close within 3 s");
            }
            if let Err(err) = std::fs::remove_file(&path) {
                warn!(path = %path.display(), %err, "could not remove the Unix socket");
            }
        }
        if tokio::time::timeout(Duration::from_secs(3), self.accept)
            .await
            .is_err()
        {
            warn!("sessions did not close within 3 s");
        }
        // Sessions of [`Connections`] run in their callers' tasks: every
        // listener's are done by now, so what the count still holds is theirs.
        let external = tokio::time::timeout(Duration::from_secs(3), async {
            while self.shared.sessions.load(Ordering::Relaxed) > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        if external.is_err() {
            warn!(
                sessions = self.shared.sessions.load(Ordering::Relaxed),
                "MQTT over WebSocket sessions did not close within 3 s"
            );
        }
        // What kept sessions were owed when their connections closed goes
        // to their queues before the process ends. Every connection is
        // closed by now, so the in-process router hands drainers what it
        // holds within milliseconds: once they have read nothing for
        // `DRAINED_QUIET`, nothing more is coming, whatever flow control's
        // count says.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let mut last = (
            self.shared.offline.drained_total.load(Ordering::Relaxed),
            tokio::time::Instant::now(),
        );
        while !self.shared.lifetimes.settled(&self.shared).await {
            let now = tokio::time::Instant::now();
            let drained = self.shared.offline.drained_total.load(Ordering::Relaxed);
            if drained != last.0 {
                last = (drained, now);
            } else if now - last.1 >= DRAINED_QUIET {
                debug!("drainers read nothing more; stopping without waiting for the rest of flow control's count");
                break;
            }
            if now >= deadline {
                warn!("what away sessions were owed was not all queued within 3 s");
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(disk) = &self.shared.disk {
            self.shared.offline.write_all_held(disk);
            let _ = disk.sync().await;
        }
    }
}

/// Serves MQTT connections that reach the broker by other means than its
/// own listeners: the bridge hands it each MQTT over WebSocket connection
/// as a byte stream. Each is a session like a TCP client's, counted
/// against `max_connections`, and ended by [`Broker::shutdown`].
#[derive(Clone)]
pub struct Connections {
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("listen", &self.shared.config.listen)
            .finish_non_exhaustive()
    }
}

impl Connections {
    /// Largest MQTT packet the broker accepts, for a transport to bound
    /// its own buffers by.
    pub fn max_packet_size(&self) -> usize {
        self.shared.config.max_packet_size
    }

    /// Whether a client other than `client_id` holds a subscription that
    /// `topic` matches, connected or a kept session away. The bridge in
    /// the same process asks before publishing its WebSocket clients'
    /// events: it delivers to its own clients itself, so an event nobody
    /// else reads need not make the trip through the broker at all.
    pub fn read_by_others(&self, topic: &str, client_id: &str) -> bool {
        let topic = crate::names::escape_topic_ref(topic.as_bytes());
        self.shared.flow.read_by_others(&topic, client_id)
    }

    /// Serves one connection until it ends. `peer` is where it comes from:
    /// logins are limited per address, and loopback matters to the same
    /// rules as on TCP. Once the broker is stopping, returns at once and
    /// drops the streams.
    pub async fn serve<R, W>(&self, reader: R, writer: W, peer: SocketAddr)
    where
        R: tokio::io::AsyncRead + Send + Sync + Unpin + 'static,
        W: tokio::io::AsyncWrite + Send + Sync + Unpin + 'static,
    {
        if *self.shutdown.borrow() {
            return;
        }
        self.shared.sessions.fetch_add(1, Ordering::Relaxed);
        let guard = SessionGuard(self.shared.clone());
        let shared = self.shared.clone();
        let shutdown = self.shutdown.clone();
        // A task of its own, as from an accept loop: a panic ends this
        // session alone and is logged the same way.
        let session = tokio::spawn(async move {
            let _guard = guard;
            session::run_io(Box::new(reader), Box::new(writer), peer, shared, shutdown).await;
        });
        if let Err(err) = session.await {
            error!(%err, %peer, "a client session panicked");
        }
    }
}

/// How long a clean stop waits for drainers that have stopped reading.
const DRAINED_QUIET: Duration = Duration::from_millis(100);

/// Decrements the session count when a connection ends, however it ends.
struct SessionGuard(Arc<Shared>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn accept_loop(
    listener: Listener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            Some(done) = sessions.join_next(), if !sessions.is_empty() => {
                if let Err(err) = done {
                    error!(%err, "a client session panicked");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    shared.sessions.fetch_add(1, Ordering::Relaxed);
                    shared.traffic.connections.fetch_add(1, Ordering::Relaxed);
                    let guard = SessionGuard(shared.clone());
                    let shared = shared.clone();
                    let shutdown = shutdown.clone();
                    let tls = tls.clone();
                    sessions.spawn(async move {
                        let _guard = guard;
                        session::run(stream, peer, shared, shutdown, tls).await;
                    });
                }
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    drop(listener);
    while let Some(done) = sessions.join_next().await {
        if let Err(err) = done {
            error!(%err, "a client session panicked");
        }
    }
}

pub(crate) fn counters(s: &Shared) -> Counters {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let audit = s.config.auth.as_ref().map(|a| &a.audit);
    Counters {
        sessions: s.sessions.load(Ordering::Relaxed),
        refused_at_limit: get(&s.refused),
        slow_consumers_cut_off: get(&s.flow.slow_consumers_disconnected),
        sessions_expired: get(&s.lifetimes.expired),
        auth_refused_connects: audit.map_or(0, |a| get(&a.refused_connects)),
        auth_throttled_logins: audit.map_or(0, |a| get(&a.throttled_logins)),
        acl_denied_publishes: audit.map_or(0, |a| get(&a.denied_publishes)),
        acl_denied_subscribes: audit.map_or(0, |a| get(&a.denied_subscribes)),
        router_renewals: get(&s.renewal.renewals),
        router_renewals_put_off: get(&s.renewal.deferred),
        router_renewal_pause_ms: get(&s.renewal.last_pause_ms),
        share_repeats_dropped: get(&s.share_repeats),
        filters_refused_per_client: get(&s.filters_refused_per_client),
        queued_messages: s.offline.waiting(),
        queued_dropped: get(&s.offline.dropped_total),
    }
}
