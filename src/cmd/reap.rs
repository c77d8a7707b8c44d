//! `axion reap`: the reaper alone, for hosts that run services but no
//! broker; and the reaper's and the legacy heartbeat service's flags,
//! shared with `axion serve` and `axion bridge`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use axion_supervise::policy::Thresholds;
use axion_supervise::restarts::AlarmRules;
use axion_supervise::{InstanceLimits, LegacyConfig, ReaperConfig};
use axion_wire::{BrokerUrls, DEFAULT_MQTT_URL};

/// When the reaper stops a process, and when it raises an alarm.
#[derive(clap::Args, Debug, Clone)]
pub struct ReapTuning {
    /// Milliseconds a process may stay silent before it is stopped (no_heartbeat); an instance that beats less often gets three of its own intervals.
    #[arg(long, env = "HEARTBEAT_TIMEOUT", default_value_t = 10_000)]
    pub heartbeat_timeout_ms: u64,
    /// Milliseconds a process may report connected=false before it is stopped (broker_disconnected).
    #[arg(long, env = "DISCONNECT_KILL_MS", default_value_t = 10_000)]
    pub disconnect_kill_ms: u64,
    /// Milliseconds a process with work pending may make no progress before it is stopped (no_progress).
    #[arg(long, env = "LIVENESS_MAX_STALL_MS", default_value_t = 30_000)]
    pub liveness_max_stall_ms: u64,
    /// Milliseconds between two looks at the records (also how often legacy pids are checked for exit).
    #[arg(long, env = "CHECK_INTERVAL", default_value_t = 1_000)]
    pub check_interval_ms: u64,
    /// Milliseconds between SIGTERM and SIGKILL.
    #[arg(long, env = "REAP_GRACE_MS", default_value_t = 5_000)]
    pub reap_grace_ms: u64,
    /// Restarts of one service on one host, within the window, above which an alarm is raised.
    #[arg(long, env = "RESTART_ALARM_COUNT", default_value_t = 5)]
    pub restart_alarm_count: usize,
    /// Seconds over which restarts are counted.
    #[arg(long, env = "RESTART_ALARM_WINDOW_SECS", default_value_t = 600)]
    pub restart_alarm_window_secs: u64,
    /// Seconds without a new start after which an alarm clears itself.
    #[arg(long, env = "ALARM_QUIET_SECS", default_value_t = 600)]
    pub alarm_quiet_secs: u64,
}

impl ReapTuning {
    pub fn config(&self, mqtt: impl Into<BrokerUrls>, own_package: &str) -> ReaperConfig {
        let mut config = ReaperConfig::new(mqtt, own_package);
        config.thresholds = Thresholds {
            heartbeat_timeout: Duration::from_millis(self.heartbeat_timeout_ms),
            disconnect_kill: Duration::from_millis(self.disconnect_kill_ms),
            max_stall: Duration::from_millis(self.liveness_max_stall_ms),
        };
        config.check_interval = Duration::from_millis(self.check_interval_ms.max(10));
        config.grace = Duration::from_millis(self.reap_grace_ms);
        config.alarms = AlarmRules {
            threshold: self.restart_alarm_count,
            window: Duration::from_secs(self.restart_alarm_window_secs),
            quiet: Duration::from_secs(self.alarm_quiet_secs),
        };
        config
    }
}

/// The legacy heartbeat service: where else it listens, and the instance
/// limits it enforces.
#[derive(clap::Args, Debug, Clone)]
pub struct LegacyArgs {
    /// Also serve the legacy heartbeat service (POST /heartbeat, WebSocket /heartbeat, GET /heartbeats) on this address, for deployments that keep the old URL; port 0 picks a free port (see --ports-file).
    #[arg(long, env = "AXION_LEGACY_HEARTBEAT_LISTEN")]
    pub legacy_heartbeat_listen: Option<SocketAddr>,
    /// Most live instances of a service, SERVICE=N (repeatable); one more is refused with 409.
    #[arg(
        long = "max-instances",
        env = "AXION_MAX_INSTANCES",
        value_delimiter = ','
    )]
    pub max_instances: Vec<String>,
    /// PM2 ecosystem file (ecosystem.config.js or .json) whose apps[].instances limit each service; --max-instances overrides it.
    #[arg(long, env = "ECOSYSTEM_CONFIG")]
    pub ecosystem: Option<PathBuf>,
}

impl LegacyArgs {
    /// The service's configuration; a bad limit or ecosystem file stops
    /// start-up with a clear error.
    pub fn config(
        &self,
        mqtt: impl Into<BrokerUrls>,
        package: &str,
        tuning: Option<&ReapTuning>,
    ) -> anyhow::Result<LegacyConfig> {
        let limits = match &self.ecosystem {
            Some(path) => InstanceLimits::from_ecosystem(path)?,
            None => InstanceLimits::default(),
        }
        .with_flags(&self.max_instances)?;
        let mut config = LegacyConfig::new(mqtt, package);
        config.limits = limits;
        if let Some(tuning) = tuning {
            config.heartbeat_timeout = Duration::from_millis(tuning.heartbeat_timeout_ms);
            config.check_interval = Duration::from_millis(tuning.check_interval_ms.max(10));
        }
        Ok(config)
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Broker URL, mqtt://[user[:password]@]host[:port]; the nodes of a clustered broker comma-separated (mqtt://a:1883,mqtt://b:1883), failed over in turn.
    #[arg(long, env = "AXION_MQTT_URL", default_value = DEFAULT_MQTT_URL)]
    pub mqtt: BrokerUrls,
    /// Watch one package only (default: every package).
    #[arg(long, env = "AXION_REAP_PACKAGE")]
    pub watch_package: Option<String>,
    /// Package of the reaper's own heartbeat record.
    #[arg(long, env = "AXION_PACKAGE", default_value = "default")]
    pub package: String,
    #[command(flatten)]
    pub tuning: ReapTuning,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    axion_wire::topics::validate_level("package", &args.package)?;
    if let Some(p) = &args.watch_package {
        axion_wire::topics::validate_level("package", p)?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(async {
        let mut config = args
            .tuning
            .config(args.mqtt.with_env_credentials(), &args.package);
        config.package = args.watch_package;
        let signals = super::serve::Signals::install()?;
        let stop = tokio_util::sync::CancellationToken::new();
        let mut reaper = tokio::spawn(axion_supervise::reaper::run(config, stop.clone()));
        tokio::select! {
            signal = signals.recv() => {
                tracing::info!(signal, "stopping");
                stop.cancel();
                reaper.await.context("reaper task")??;
            }
            ended = &mut reaper => ended.context("reaper task")??,
        }
        Ok(ExitCode::SUCCESS)
    })
}
