//! `axion heartbeat`: the heartbeat sidecar for processes that cannot link
//! the Rust publisher (Python, Node, shell). It publishes the same retained
//! record a Rust service would and, given `--pid`, watches that process and
//! marks it `offline`/`exited` the moment it is gone.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use axion_client::publisher::HeartbeatConfig;
use axion_client::HeartbeatPublisher;
use axion_wire::schema::{DEFAULT_GHOST_SECS, DEFAULT_INTERVAL_SECS};
use axion_wire::{BrokerUrls, DEFAULT_MQTT_URL};
use serde_json::Value;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

/// How often the watched pid is checked.
const PID_POLL: Duration = Duration::from_millis(200);

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Service name of the instance (one topic level).
    #[arg(long, env = "AXION_SERVICE")]
    pub service: String,
    /// Listening port of the instance; without it the pid fills the port slot.
    #[arg(long, env = "AXION_PORT")]
    pub port: Option<u16>,
    /// Pid of the process to watch: when it exits, publish offline/exited and exit 0.
    #[arg(long, env = "AXION_PID")]
    pub pid: Option<u32>,
    /// Package the instance belongs to (one topic level).
    #[arg(long, env = "AXION_PACKAGE", default_value = "default")]
    pub package: String,
    /// Hostname to report (defaults to this machine's).
    #[arg(long, env = "AXION_HOSTNAME")]
    pub hostname: Option<String>,
    /// Broker URL, mqtt://[user[:password]@]host[:port]; the nodes of a clustered broker comma-separated (mqtt://a:1883,mqtt://b:1883), failed over in turn.
    #[arg(long, env = "AXION_MQTT_URL", default_value = DEFAULT_MQTT_URL)]
    pub mqtt: BrokerUrls,
    /// Extra field for every record, key=value (value parsed as JSON when it is JSON); repeatable.
    #[arg(long = "extra", env = "AXION_HEARTBEAT_EXTRAS", value_delimiter = ',', value_parser = parse_extra)]
    pub extras: Vec<(String, Value)>,
    /// Seconds between heartbeats.
    #[arg(long, env = "HEARTBEAT_INTERVAL_SECS", default_value_t = DEFAULT_INTERVAL_SECS)]
    pub interval_secs: u64,
    /// Seconds a dead instance's record stays retained (MQTT 5 message expiry).
    #[arg(long, env = "HEARTBEAT_GHOST_SECS", default_value_t = DEFAULT_GHOST_SECS)]
    pub ghost_secs: u64,
}

fn parse_extra(raw: &str) -> Result<(String, Value), String> {
    let (key, value) = raw
        .split_once('=')
        .ok_or_else(|| format!("--extra {raw:?} must be key=value"))?;
    if key.is_empty() {
        return Err(format!("--extra {raw:?} has an empty key"));
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
    Ok((key.to_string(), value))
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(sidecar(args))
}

async fn sidecar(args: Args) -> anyhow::Result<ExitCode> {
    let mut config =
        HeartbeatConfig::new(args.mqtt.with_env_credentials(), args.package, args.service)?;
    config.port = args.port;
    config.pid = args.pid;
    config.host = args.hostname;
    config.interval = Duration::from_secs(args.interval_secs);
    config.ghost_after = Duration::from_secs(args.ghost_secs);
    config.extras = args.extras.into_iter().collect();
    let mut sigterm = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    let handle = HeartbeatPublisher::start(config)?;
    info!(topic = handle.topic(), pid = ?args.pid, "heartbeat sidecar running");

    let reason = tokio::select! {
        _ = sigterm.recv() => "stopped",
        _ = sigint.recv() => "stopped",
        _ = watch_pid(args.pid) => "exited",
    };
    info!(topic = handle.topic(), reason, "publishing offline");
    handle
        .stop(reason)
        .await
        .context("publish the offline record")?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves when `pid` is gone; never without a pid.
async fn watch_pid(pid: Option<u32>) {
    let Some(pid) = pid else {
        return std::future::pending().await;
    };
    let mut tick = tokio::time::interval(PID_POLL);
    loop {
        tick.tick().await;
        if !pid_alive(pid) {
            warn!(pid, "watched process exited");
            return;
        }
    }
}

/// Whether `pid` runs: it exists (kill 0 succeeds or is refused for
/// permission) and is not a zombie waiting for its parent to reap it.
fn pid_alive(pid: u32) -> bool {
    let Some(raw) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    match rustix::process::test_kill_process(raw) {
        Ok(()) | Err(rustix::io::Errno::PERM) => {}
        Err(_) => return false,
    }
    // /proc/<pid>/stat: "pid (comm) S ..."; comm may itself contain ')'.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().chars().next()),
            Some(Some('Z' | 'X'))
        ),
        Err(_) => true,
    }
}
