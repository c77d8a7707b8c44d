//! `axion serve`: the embedded default — broker, queues, bridge and
//! Axion's own heartbeat on loopback, stopped cleanly by SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axion_access::login_limit::LoginLimits;
use axion_bridge::{Bridge, BridgeConfig};
use axion_broker::{Broker, BrokerConfig};
use axion_client::ports_file::PortsFile;
use axion_client::{spawn_janitor, HeartbeatConfig, HeartbeatHandle, HeartbeatPublisher};
use axion_queues::QueueOwner;
use axion_wire::ports::{self, Ports};
use axion_wire::{BrokerUrls, MqttUrl};
use tracing::{error, info, warn};

use super::bridge::{BridgeLimits, WsTls};
use super::queues::QueueTuning;
use super::reap::{LegacyArgs, ReapTuning};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Read settings from this TOML file: each key is a long flag of this command (`mqtt-listen = "0.0.0.0:1883"`, `allow-anonymous-remote = true`); a flag on the command line or its environment variable wins over the file; an unknown key is an error (exit 78). Example: packaging/axion.toml.
    #[arg(long, env = "AXION_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address of the MQTT listener (3.1.1 and 5 on one port); port 0 picks a free port (see --ports-file).
    #[arg(long, env = "AXION_MQTT_LISTEN", default_value = "127.0.0.1:1883")]
    pub mqtt_listen: SocketAddr,
    /// Unix socket the broker also listens on (`off`: none). Axion's own queue owner, bridge and heartbeat use it instead of TCP. Default: <data-dir>/mqtt.sock.
    #[arg(long, env = "AXION_MQTT_UNIX", value_name = "PATH|off")]
    pub mqtt_unix: Option<String>,
    /// Address of the legacy WebSocket bridge; port 0 picks a free port (see --ports-file).
    #[arg(long, env = "AXION_WS_LISTEN", default_value = "127.0.0.1:7000")]
    pub ws_listen: SocketAddr,
    /// Package this instance belongs to (one topic level).
    #[arg(long, env = "AXION_PACKAGE", default_value = "default")]
    pub package: String,
    /// Directory for durable queue data.
    #[arg(long, env = "AXION_DATA_DIR", default_value = "./axion-data")]
    pub data_dir: PathBuf,
    /// MQTT connections accepted at once; one more is refused with a CONNACK.
    #[arg(long, env = "AXION_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Largest MQTT packet accepted, in bytes.
    #[arg(long, env = "AXION_MAX_PACKET_SIZE", default_value_t = 1024 * 1024)]
    pub max_packet_size: usize,
    /// Distinct subscription filters one router holds (bounds its memory); the router is renewed once enough are unused.
    #[arg(long, env = "AXION_MAX_FILTERS", default_value_t = 10_000)]
    pub max_filters: usize,
    /// Distinct subscription filters one client may hold ($share ones included); more get SUBACK 0x97 (0x80 in MQTT 3.1.1), so one client cannot use up --max-filters for everyone. Must be below --max-filters; default: a tenth of it (1000).
    #[arg(long, env = "AXION_MAX_FILTERS_PER_CLIENT", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_filters_per_client: Option<u64>,
    /// Distinct published topics after which the router is renewed to free its topic cache (~190 B each).
    #[arg(long, env = "AXION_MAX_TOPICS", default_value_t = 100_000)]
    pub max_topics: usize,
    /// Retained messages (distinct topics) the broker keeps; more are delivered but not retained.
    #[arg(long, env = "AXION_MAX_RETAINED", default_value_t = 100_000)]
    pub max_retained: usize,
    /// Milliseconds a subscriber still on the router's window (a QoS 2 one, say) may hold publishers back before it is disconnected; a kept session with a data directory gets 100 ms, then its backlog goes to its queue.
    #[arg(long, env = "AXION_SLOW_CONSUMER_TIMEOUT_MS", default_value_t = 10_000)]
    pub slow_consumer_timeout_ms: u64,
    /// Longest keep-alive (seconds) an MQTT 5 client gets; one asking for more is told this value in CONNACK.
    #[arg(long, env = "AXION_MAX_KEEP_ALIVE_SECS", default_value_t = 60)]
    pub max_keep_alive_secs: u16,
    /// Longest time (seconds) a disconnected client's session (subscriptions, queued messages) is kept; also the expiry of MQTT 3.1.1 persistent sessions.
    #[arg(long, env = "AXION_MAX_SESSION_EXPIRY_SECS", default_value_t = 86_400)]
    pub max_session_expiry_secs: u32,
    /// QoS 1/2 messages one disconnected kept session may have queued on disk; past it (or --max-queued-bytes) new ones for it are dropped and counted.
    #[arg(long, env = "AXION_MAX_QUEUED_MESSAGES", default_value_t = 50_000)]
    pub max_queued_messages: u64,
    /// Bytes one disconnected kept session's queue may take on disk.
    #[arg(long, env = "AXION_MAX_QUEUED_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_queued_bytes: u64,
    /// Bytes a connected subscriber may leave unread before it is disconnected (MQTT 5 reason 0x97; a kept session's backlog goes to its queue).
    #[arg(long, env = "AXION_MAX_SUBSCRIBER_BUFFER_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_subscriber_buffer_bytes: usize,
    /// Seconds between refreshes of the retained `$SYS/broker/…` topics (Mosquitto's sys_interval); 0: no `$SYS` topics.
    #[arg(long, env = "AXION_SYS_INTERVAL_SECS", default_value_t = 10)]
    pub sys_interval_secs: u64,
    /// TOML file of users (argon2 hashes), roles and ACLs; without it every client has every right and listeners must be loopback.
    #[arg(long, env = "AXION_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    #[command(flatten)]
    pub login_limits: LoginLimitArgs,
    /// Allow listening on a non-loopback address without an auth file (anyone who reaches the port may do anything).
    #[arg(long, env = "AXION_ALLOW_ANONYMOUS_REMOTE")]
    pub allow_anonymous_remote: bool,
    /// Address of the MQTT-over-TLS listener (needs --tls-cert and --tls-key); port 0 picks a free port (see --ports-file).
    #[arg(long, env = "AXION_MQTTS_LISTEN", requires_all = ["tls_cert", "tls_key"])]
    pub mqtts_listen: Option<SocketAddr>,
    /// PEM certificate chain for TLS.
    #[arg(long, env = "AXION_TLS_CERT", requires = "mqtts_listen")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, env = "AXION_TLS_KEY", requires = "mqtts_listen")]
    pub tls_key: Option<PathBuf>,
    #[command(flatten)]
    pub queues: QueueTuning,
    #[command(flatten)]
    pub bridge: BridgeLimits,
    #[command(flatten)]
    pub ws_tls: WsTls,
    /// Run the reaper: stop this host's processes whose heartbeat says they hang (see `axion reap --help`).
    #[arg(long, env = "AXION_REAP")]
    pub reap: bool,
    #[command(flatten)]
    pub reap_tuning: ReapTuning,
    #[command(flatten)]
    pub legacy: LegacyArgs,
    #[command(flatten)]
    pub ports: PortsFileArgs,
}

/// Where the addresses the listeners are bound to are reported, shared
/// with `axion bridge` (flatten them there).
#[derive(clap::Args, Debug, Clone)]
pub struct PortsFileArgs {
    /// Once every listener is bound, write the address of each to this file, one `name=address` line per listener (`mqtt`, `mqtts`, `ws`, `legacy-heartbeat`: the listen flag without `-listen`); how a supervisor or script learns the port picked for port 0. Written whole (a temporary file renamed over it); removed at start and at a clean stop.
    #[arg(long, env = "AXION_PORTS_FILE", value_name = "PATH")]
    pub ports_file: Option<PathBuf>,
}

impl PortsFileArgs {
    /// Removes the file an earlier run left, before anything binds: a
    /// reader waiting for it must not find the last run's ports.
    pub fn clear(&self) -> anyhow::Result<()> {
        if let Some(path) = &self.ports_file {
            axion_client::ports_file::clear(path)
                .with_context(|| format!("remove the old ports file {}", path.display()))?;
        }
        Ok(())
    }

    /// Logs each bound listener and writes the ports file if one was
    /// asked for; the file goes when the returned handle is dropped.
    pub fn announce(&self, ports: &Ports) -> anyhow::Result<Option<PortsFile>> {
        for (name, addr) in ports.iter() {
            info!(listener = name, %addr, "listening");
        }
        self.ports_file
            .as_deref()
            .map(|path: &Path| {
                PortsFile::write(path, ports)
                    .with_context(|| format!("write the ports file {}", path.display()))
            })
            .transpose()
    }
}

/// How failed logins per client address are limited (with an auth file),
/// shared with `axion bridge` (flatten them there).
#[derive(clap::Args, Debug, Clone)]
pub struct LoginLimitArgs {
    /// Failed logins (MQTT passwords and bridge tokens together) one client address may make before its logins are refused for a backoff; a successful login resets the count. IPv6 addresses count per /64.
    #[arg(long, env = "AXION_LOGIN_MAX_FAILURES", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub login_max_failures: u32,
    /// Seconds after an address's last failed login (or the end of its backoff) after which its count starts over.
    #[arg(long, env = "AXION_LOGIN_FAILURE_WINDOW_SECS", default_value_t = 60)]
    pub login_failure_window_secs: u64,
    /// The first backoff, in milliseconds; every further failed login from the address doubles it.
    #[arg(long, env = "AXION_LOGIN_BACKOFF_MS", default_value_t = 1_000)]
    pub login_backoff_ms: u64,
    /// The longest backoff, in seconds.
    #[arg(long, env = "AXION_LOGIN_MAX_BACKOFF_SECS", default_value_t = 300)]
    pub login_max_backoff_secs: u64,
}

impl LoginLimitArgs {
    pub fn limits(&self) -> LoginLimits {
        LoginLimits {
            max_failures: self.login_max_failures,
            window: Duration::from_secs(self.login_failure_window_secs),
            backoff: Duration::from_millis(self.login_backoff_ms),
            max_backoff: Duration::from_secs(self.login_max_backoff_secs),
            ..LoginLimits::default()
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // First, so a start that fails on a bad setting leaves no file behind.
    args.ports.clear()?;
    axion_wire::topics::validate_level("package", &args.package)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("axion")
        .build()
        .context("start the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<ExitCode> {
    let max_filters_per_client = filters_per_client(&args)?;
    // Installed first: a SIGTERM during start-up must stop us cleanly too,
    // and a SIGHUP (a terminal hang-up, `systemctl reload`) must never
    // kill us.
    let signals = Signals::install()?;
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("install the SIGHUP handler")?;
    // The embedded components log in as an internal superuser with a
    // password that lives only in this process.
    let internal_secret = axion_access::auth::random_secret();
    let auth = match &args.auth_file {
        Some(path) => {
            let auth = axion_access::auth::Auth::load(path)?
                .with_internal_secret(internal_secret.clone())
                .with_login_limits(args.login_limits.limits());
            info!(auth_file = %path.display(), "authentication and ACLs on");
            Some(std::sync::Arc::new(auth))
        }
        None => {
            let remote = [
                Some(args.mqtt_listen),
                Some(args.ws_listen),
                args.mqtts_listen,
            ]
            .into_iter()
            .flatten()
            .find(|a| !a.ip().is_loopback());
            if let Some(addr) = remote {
                if !args.allow_anonymous_remote {
                    anyhow::bail!(
                        "refusing to listen on {addr} without --auth-file: anyone reaching it could publish, delete heartbeats and ack tasks (pass --allow-anonymous-remote to do it anyway)"
                    );
                }
                warn!(%addr, "authentication is OFF on a non-loopback listener (--allow-anonymous-remote)");
            } else {
                warn!("authentication is off (no --auth-file); listening on loopback only");
            }
            None
        }
    };
    {
        let (auth, path) = (auth.clone(), args.auth_file.clone());
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                reload_auth(auth.as_deref(), path.as_deref());
            }
        });
    }
    let tls = match (&args.mqtts_listen, &args.tls_cert, &args.tls_key) {
        (Some(addr), Some(cert), Some(key)) => {
            Some((*addr, axion_access::tls::acceptor(cert, key)?))
        }
        _ => None,
    };
    let unix = unix_socket(&args)?;
    let config = BrokerConfig {
        listen: args.mqtt_listen,
        max_connections: args.max_connections,
        max_packet_size: args.max_packet_size,
        max_filters: args.max_filters,
        max_filters_per_client,
        max_topics: args.max_topics,
        max_retained: args.max_retained,
        slow_consumer_timeout: Duration::from_millis(args.slow_consumer_timeout_ms),
        max_keep_alive: args.max_keep_alive_secs,
        max_session_expiry: args.max_session_expiry_secs,
        max_queued_messages: args.max_queued_messages,
        max_queued_bytes: args.max_queued_bytes,
        max_subscriber_buffer: args.max_subscriber_buffer_bytes,
        sys_interval: (args.sys_interval_secs > 0)
            .then(|| Duration::from_secs(args.sys_interval_secs)),
        auth: auth.clone(),
        tls,
        unix: unix.as_ref().map(|u| u.path.clone()),
        state_file: Some(args.data_dir.join("broker.redb")),
        ..BrokerConfig::default()
    };
    let broker = match Broker::start(config.clone()).await {
        Err(err @ axion_broker::BrokerError::BindUnix { .. })
            if unix.as_ref().is_some_and(|u| !u.asked) =>
        {
            warn!(error = %err, "no Unix socket; Axion's own clients use TCP");
            Broker::start(BrokerConfig {
                unix: None,
                ..config
            })
            .await?
        }
        started => started?,
    };
    let mqtt_port = broker.local_addr().port();
    // The embedded components reach the broker over its Unix socket, or
    // over TCP: on loopback when the public listener takes every address
    // (0.0.0.0, ::), else where it is bound (one bound to 127.0.0.2 or
    // 10.0.0.5 alone does not answer on 127.0.0.1).
    let mut local = match broker.unix_path() {
        Some(path) => MqttUrl::unix(path),
        None => {
            let mut addr = broker.local_addr();
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr {
                    SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            MqttUrl::parse(&format!("mqtt://{addr}"))?
        }
    };
    if auth.is_some() {
        local.user = Some(axion_access::auth::INTERNAL_USER.to_string());
        local.password = Some(internal_secret);
    }

    let mut queue_config =
        args.queues
            .config(local.clone(), args.data_dir.clone(), args.package.clone());
    // The embedded broker dies with the owner: nothing to hand over again.
    queue_config.ack_after_commit = false;
    // Installed before the owner loads its store: what producers send
    // meanwhile waits for it instead of finding no subscriber.
    let tap = broker
        .tap_queues(&args.package)
        .context("install the queue tap")?;
    let mut queues = QueueOwner::start_tapped(queue_config, tap)
        .await
        .context("start the queue owner")?;

    let supervision = tokio_util::sync::CancellationToken::new();
    let mut legacy_config =
        args.legacy
            .config(local.clone(), &args.package, Some(&args.reap_tuning))?;
    legacy_config.local_only = auth.is_some();
    let legacy = axion_supervise::LegacyHeartbeats::start(legacy_config, supervision.clone())?;
    let mut bound = Ports::new();
    bound.insert(ports::MQTT, broker.local_addr());
    if let Some(addr) = broker.tls_local_addr() {
        bound.insert(ports::MQTTS, addr);
    }
    if let Some(addr) = args.legacy.legacy_heartbeat_listen {
        let addr =
            axion_supervise::legacy::serve(addr, legacy.clone(), supervision.clone()).await?;
        bound.insert(ports::LEGACY_HEARTBEAT, addr);
    }
    let reaper = args.reap.then(|| {
        let config = args.reap_tuning.config(local.clone(), &args.package);
        let stop = supervision.clone();
        tokio::spawn(async move {
            let ended = axion_supervise::reaper::run(config, stop).await;
            if let Err(err) = &ended {
                error!(%err, "the reaper stopped; processes that hang are not stopped");
            }
            ended
        })
    });

    let mut bridge_config = BridgeConfig::new(args.ws_listen, local.clone(), args.package.clone());
    bridge_config.legacy_heartbeats = Some(legacy.clone());
    // `/metrics` on the bridge's port shows the broker and the queues too.
    bridge_config.metrics = vec![Arc::new(broker.metrics()), queues.metrics()];
    bridge_config.limits = args.bridge.limits();
    bridge_config.threads = args.bridge.ws_threads;
    bridge_config.auth = auth.clone();
    bridge_config.tls = args.ws_tls.files();
    let embedded = Arc::new(EmbeddedMqtt(
        broker.connections(),
        tokio::runtime::Handle::current(),
    ));
    bridge_config.mqtt_endpoint = Some(embedded.clone());
    bridge_config.local_broker = Some(embedded);
    let bridge = Bridge::bind(bridge_config).await?;
    let ws = bridge.local_addr();
    bound.insert(ports::WS, ws);
    let (stop_bridge, bridge_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut bridge_task = tokio::spawn(bridge.serve(async move {
        let _ = bridge_stopped.await;
    }));

    let heartbeat_config =
        HeartbeatConfig::new(local.clone(), &args.package, "broker")?.port(mqtt_port);
    let ghost_after = heartbeat_config.ghost_after;
    let heartbeat = HeartbeatPublisher::start(heartbeat_config)?;
    heartbeat.set_connected(true);
    let janitor = spawn_janitor(&BrokerUrls::from(local.clone()), ghost_after);
    // Last of start-up, so a reader that sees the file finds every part up;
    // held to the end of the clean stop, which removes it.
    let _ports_file = args.ports.announce(&bound)?;
    info!(mqtt = %broker.local_addr(), mqtts = ?broker.tls_local_addr(), unix = ?broker.unix_path(), %ws, auth = auth.is_some(), package = args.package, config = ?args.config, data_dir = %args.data_dir.display(), allocator = crate::alloc::in_use().unwrap_or("mimalloc"), "axion serve is up");

    let mut bridge_done = false;
    let code = tokio::select! {
        signal = signals.recv() => {
            info!(signal, "stopping");
            ExitCode::SUCCESS
        }
        never = report_counters(&broker, &heartbeat) => match never {},
        _ = router_died(&broker) => {
            error!("the broker's router thread died; exiting so a supervisor restarts us");
            ExitCode::from(70)
        }
        err = queues.failed() => {
            error!(error = %err, "the queue owner stopped; exiting so a supervisor restarts us");
            ExitCode::from(70)
        }
        ended = &mut bridge_task => {
            bridge_done = true;
            error!(result = ?ended.map(|r| r.map_err(|e| e.to_string())), "the WebSocket bridge stopped; exiting so a supervisor restarts us");
            ExitCode::from(70)
        }
    };

    // Stop in dependency order: announce draining, stop taking work at the
    // edges (bridge), commit the queues, say offline, then close the broker.
    if let Err(err) = heartbeat.set_draining().await {
        warn!(%err, "could not publish the draining heartbeat");
    }
    let _ = stop_bridge.send(());
    if !bridge_done {
        match tokio::time::timeout(Duration::from_secs(5), bridge_task).await {
            Ok(Ok(Ok(()))) => {}
            other => {
                warn!(result = ?other.map(|j| j.map(|r| r.map_err(|e| e.to_string()))), "bridge did not stop cleanly")
            }
        }
    }
    supervision.cancel();
    if let Some(reaper) = reaper {
        match tokio::time::timeout(Duration::from_secs(5), reaper).await {
            Ok(Ok(Ok(()))) => {}
            other => {
                warn!(result = ?other.map(|j| j.map(|r| r.map_err(|e| e.to_string()))), "reaper did not stop cleanly")
            }
        }
    }
    legacy.stop().await;
    if let Err(err) = queues.shutdown().await {
        warn!(%err, "queue owner did not stop cleanly");
    }
    if let Err(err) = heartbeat.stop("stopped").await {
        warn!(%err, "could not publish the offline heartbeat");
    }
    janitor.abort();
    broker.shutdown().await;
    info!("stopped");
    Ok(code)
}

/// MQTT over WebSocket on the bridge's port, served by the embedded
/// broker's front end like any TCP client, on the broker's runtime (the
/// bridge has its own); and what the bridge asks the broker beside it
/// before publishing an event.
#[derive(Debug)]
struct EmbeddedMqtt(axion_broker::Connections, tokio::runtime::Handle);

impl axion_bridge::LocalBroker for EmbeddedMqtt {
    fn serve_link(
        &self,
        pipe: tokio::io::DuplexStream,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>> {
        let connections = self.0.clone();
        let (reader, writer) = tokio::io::split(pipe);
        // A loopback peer: the bridge is this process.
        let peer = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0));
        Box::pin(async move { connections.serve(reader, writer, peer).await })
    }

    fn read_by_others(&self, topic: &str, client_id: &str) -> bool {
        self.0.read_by_others(topic, client_id)
    }
}

impl axion_bridge::MqttEndpoint for EmbeddedMqtt {
    fn max_packet_size(&self) -> usize {
        self.0.max_packet_size()
    }

    fn serve(
        &self,
        reader: axion_bridge::ws_io::WsReader,
        writer: axion_bridge::ws_io::WsWriter,
        peer: SocketAddr,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>> {
        let (connections, runtime) = (self.0.clone(), self.1.clone());
        Box::pin(async move {
            let session =
                runtime.spawn(async move { connections.serve(reader, writer, peer).await });
            // `Connections::serve` logs a panicking session itself.
            let _ = session.await;
        })
    }
}

/// `--max-filters-per-client`, or its default. A bound at or above
/// `--max-filters` would let one client take every filter again.
fn filters_per_client(args: &Args) -> anyhow::Result<usize> {
    let Some(asked) = args.max_filters_per_client else {
        return Ok((args.max_filters / 10).max(1));
    };
    match usize::try_from(asked) {
        Ok(n) if n < args.max_filters => Ok(n),
        _ => anyhow::bail!(
            "--max-filters-per-client ({asked}) must be below --max-filters ({}): otherwise one client can hold every filter and leave none to the others",
            args.max_filters
        ),
    }
}

/// The Unix socket to listen on, and whether the user named it (then not
/// getting it is an error, not a fallback to TCP).
struct UnixSocket {
    path: PathBuf,
    asked: bool,
}

fn unix_socket(args: &Args) -> anyhow::Result<Option<UnixSocket>> {
    match args.mqtt_unix.as_deref() {
        Some("off") => Ok(None),
        Some(path) => Ok(Some(UnixSocket {
            path: PathBuf::from(path),
            asked: true,
        })),
        None => {
            std::fs::create_dir_all(&args.data_dir).with_context(|| {
                format!("create the data directory {}", args.data_dir.display())
            })?;
            Ok(Some(UnixSocket {
                path: args.data_dir.join("mqtt.sock"),
                asked: false,
            }))
        }
    }
}

/// SIGHUP: reads the auth file again. A file that does not load is
/// refused with a log line and the one in force stays.
pub fn reload_auth(auth: Option<&axion_access::auth::Auth>, path: Option<&std::path::Path>) {
    let (Some(auth), Some(path)) = (auth, path) else {
        info!("SIGHUP: no --auth-file, nothing to reload");
        return;
    };
    match auth.reload(path) {
        Ok(changed) => info!(
            auth_file = %path.display(),
            users_added = ?changed.users_added,
            users_removed = ?changed.users_removed,
            users_changed = ?changed.users_changed,
            deny_lists_changed = changed.deny_lists_changed,
            anonymous_changed = changed.anonymous_changed,
            "SIGHUP: auth file reloaded; new logins and checks use it, connected clients keep their rights"
        ),
        Err(err) => {
            error!(auth_file = %path.display(), %err, "SIGHUP: auth file refused; the one loaded before stays in force")
        }
    }
}

/// Puts the broker's counters on its heartbeat record (`"broker": {…}`)
/// whenever they change, looked at every 2 s, so `mosquitto_sub` and
/// `axion monitor` show refusals, slow consumers cut off and expired
/// sessions as they happen.
async fn report_counters(broker: &Broker, heartbeat: &HeartbeatHandle) -> std::convert::Infallible {
    let read = broker.counters();
    let mut last = None;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let now = read();
        if last == Some(now) {
            continue;
        }
        last = Some(now);
        match serde_json::to_value(now) {
            Ok(mut value) => {
                // Which away sessions lost messages at their queue's bound.
                let drops: serde_json::Map<String, serde_json::Value> = broker
                    .queue_drops(20)
                    .into_iter()
                    .map(|(client, n)| (client, n.into()))
                    .collect();
                if let Some(counters) = value.as_object_mut() {
                    counters.insert("queue_drops_by_client".into(), drops.into());
                }
                heartbeat.set_extra("broker", value);
                heartbeat.publish_now();
            }
            Err(err) => warn!(%err, "could not encode the broker's counters"),
        }
    }
}

async fn router_died(broker: &Broker) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        if !broker.is_healthy() {
            return;
        }
    }
}

/// SIGTERM and SIGINT handlers, installed before anything starts.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("install SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("install SIGINT handler")?,
        })
    }

    /// Resolves on SIGTERM or SIGINT with the signal's name.
    pub async fn recv(mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Resolves on SIGTERM or SIGINT with the signal's name.
pub async fn shutdown_signal() -> anyhow::Result<&'static str> {
    Ok(Signals::install()?.recv().await)
}
