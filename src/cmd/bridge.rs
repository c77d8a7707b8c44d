//! `axion bridge`: the legacy WebSocket bridge on its own, against any MQTT
//! 5 broker (Mosquitto, EMQX, or an `axion serve` elsewhere).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use axion_bridge::{Bridge, BridgeConfig, Limits, TlsFiles};
use axion_wire::ports::{self, Ports};
use axion_wire::BrokerUrls;

/// Bridge limits, shared with `axion serve` (flatten them there).
#[derive(clap::Args, Debug, Clone)]
pub struct BridgeLimits {
    /// Largest WebSocket text frame handled, in bytes; larger frames get an error reply.
    #[arg(long, env = "AXION_WS_MAX_FRAME_BYTES", default_value_t = 1024 * 1024)]
    pub ws_max_frame_bytes: usize,
    /// Distinct MQTT subscriptions the bridge holds for all clients together.
    #[arg(long, env = "AXION_WS_MAX_FILTERS", default_value_t = 10_000)]
    pub ws_max_filters: usize,
    /// WebSocket clients connected at once.
    #[arg(long, env = "AXION_WS_MAX_CLIENTS", default_value_t = 10_000)]
    pub ws_max_clients: usize,
    /// Frames queued to one client before it is disconnected as a slow consumer.
    #[arg(long, env = "AXION_WS_CLIENT_QUEUE_FRAMES", default_value_t = 8_192)]
    pub ws_client_queue_frames: usize,
    /// Bytes queued to one client before it is disconnected as a slow consumer.
    #[arg(long, env = "AXION_WS_CLIENT_QUEUE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub ws_client_queue_bytes: usize,
    /// Milliseconds a WebSocket publisher waits for room in a subscriber's full queue before that subscriber is disconnected as a slow consumer.
    #[arg(long, env = "AXION_WS_SLOW_CONSUMER_MS", default_value_t = 2_000)]
    pub ws_slow_consumer_ms: u64,
    /// Seconds between WebSocket pings; a peer silent for two periods is dropped.
    #[arg(long, env = "AXION_WS_PING_SECS", default_value_t = 20)]
    pub ws_ping_secs: u64,
    /// Threads serving WebSocket clients (the legacy protocol), apart from the rest of the process. One costs the least CPU per event: no thread wakes another; more spread the work of very many clients over cores.
    #[arg(long, env = "AXION_WS_THREADS", default_value_t = 1)]
    pub ws_threads: usize,
}

impl BridgeLimits {
    pub fn limits(&self) -> Limits {
        Limits {
            max_frame_bytes: self.ws_max_frame_bytes,
            max_filters: self.ws_max_filters,
            max_clients: self.ws_max_clients,
            client_queue_frames: self.ws_client_queue_frames.max(1),
            client_queue_bytes: self.ws_client_queue_bytes,
            slow_consumer_timeout: Duration::from_millis(self.ws_slow_consumer_ms),
            ping_interval: Duration::from_secs(self.ws_ping_secs.max(1)),
            ..Limits::default()
        }
    }
}

/// TLS for the WebSocket listener, shared with `axion serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct WsTls {
    /// PEM certificate chain for the WebSocket listener: it then serves wss:// (and /health over https://).
    #[arg(long, env = "AXION_WS_TLS_CERT", requires = "ws_tls_key")]
    pub ws_tls_cert: Option<PathBuf>,
    /// PEM private key matching --ws-tls-cert.
    #[arg(long, env = "AXION_WS_TLS_KEY", requires = "ws_tls_cert")]
    pub ws_tls_key: Option<PathBuf>,
}

impl WsTls {
    pub fn files(&self) -> Option<TlsFiles> {
        match (&self.ws_tls_cert, &self.ws_tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// MQTT broker to bridge to (user/password in each URL or AXION_MQTT_USER/AXION_MQTT_PASSWORD; a clustered broker's nodes comma-separated, failed over in turn).
    #[arg(long, env = "AXION_MQTT_URL", default_value = axion_wire::DEFAULT_MQTT_URL)]
    pub mqtt: BrokerUrls,
    /// Address of the legacy WebSocket listener (also serves /health/live and /health/ready); port 0 picks a free port (see --ports-file).
    #[arg(long, env = "AXION_WS_LISTEN", default_value = "127.0.0.1:7000")]
    pub ws_listen: SocketAddr,
    /// Package whose events the bridge carries (one topic level).
    #[arg(long, env = "AXION_PACKAGE", default_value = "default")]
    pub package: String,
    /// TOML file of users, roles and ACLs (as for `axion serve`): WebSocket clients then need a bearer token and are held to their user's ACL.
    #[arg(long, env = "AXION_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    #[command(flatten)]
    pub login_limits: super::serve::LoginLimitArgs,
    #[command(flatten)]
    pub tls: WsTls,
    #[command(flatten)]
    pub limits: BridgeLimits,
    #[command(flatten)]
    pub legacy: super::reap::LegacyArgs,
    #[command(flatten)]
    pub ports: super::serve::PortsFileArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // First, so a start that fails on a bad setting leaves no file behind.
    args.ports.clear()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("axion-bridge")
        .build()
        .context("start the async runtime")?;
    runtime.block_on(async {
        let mut config = BridgeConfig::new(
            args.ws_listen,
            args.mqtt.with_env_credentials(),
            args.package,
        );
        config.limits = args.limits.limits();
        config.threads = args.limits.ws_threads;
        config.tls = args.tls.files();
        if let Some(path) = &args.auth_file {
            let auth =
                axion_access::auth::Auth::load(path)?.with_login_limits(args.login_limits.limits());
            config.auth = Some(std::sync::Arc::new(auth));
            tracing::info!(auth_file = %path.display(), "WebSocket authentication and ACLs on");
        }
        // SIGHUP reloads the auth file and never stops the bridge.
        let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("install the SIGHUP handler")?;
        {
            let (auth, path) = (config.auth.clone(), args.auth_file.clone());
            tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    super::serve::reload_auth(auth.as_deref(), path.as_deref());
                }
            });
        }
        let stop = tokio_util::sync::CancellationToken::new();
        let mut legacy_config = args
            .legacy
            .config(config.mqtt.clone(), &config.package, None)?;
        legacy_config.local_only = config.auth.is_some();
        let legacy = axion_supervise::LegacyHeartbeats::start(legacy_config, stop.clone())?;
        let mut bound = Ports::new();
        if let Some(addr) = args.legacy.legacy_heartbeat_listen {
            let addr = axion_supervise::legacy::serve(addr, legacy.clone(), stop.clone()).await?;
            bound.insert(ports::LEGACY_HEARTBEAT, addr);
        }
        config.legacy_heartbeats = Some(legacy.clone());
        let bridge = Bridge::bind(config).await?;
        bound.insert(ports::WS, bridge.local_addr());
        tracing::info!(listen = %bridge.local_addr(), "axion bridge listening");
        // Held until the bridge has stopped: dropping it removes the file.
        let _ports_file = args.ports.announce(&bound)?;
        bridge.serve(shutdown_signal()).await?;
        stop.cancel();
        legacy.stop().await;
        Ok(ExitCode::SUCCESS)
    })
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(%error, "cannot watch SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        r = tokio::signal::ctrl_c() => {
            if let Err(error) = r {
                tracing::error!(%error, "Ctrl-C handler failed");
            }
            tracing::info!("SIGINT: stopping");
        }
    }
}
