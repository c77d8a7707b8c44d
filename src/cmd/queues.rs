//! `axion queues`: the durable queue owner on its own, against any MQTT 5
//! broker (`axion serve` runs the same owner beside its embedded broker).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use axion_client::{HeartbeatConfig, HeartbeatPublisher};
use axion_queues::{QueueConfig, QueueLimit, QueueOwner};
use axion_wire::BrokerUrls;
use tracing::{error, info, warn};

/// Queue tuning flags, shared with `axion serve` (flatten them there).
#[derive(clap::Args, Debug, Clone)]
pub struct QueueTuning {
    /// Milliseconds a worker has to ack (or send progress) before a task is delivered again.
    #[arg(long, env = "AXION_QUEUE_ACK_WAIT_MS", default_value_t = 30_000)]
    pub ack_wait_ms: u64,
    /// Per-queue ack wait overrides, as QUEUE=MS (repeat, or comma-separate in the env var).
    #[arg(long = "queue-ack-wait", env = "AXION_QUEUE_ACK_WAITS", value_delimiter = ',', value_parser = parse_override)]
    pub queue_ack_wait: Vec<(String, u64)>,
    /// Deliveries before a task is dead-lettered when its request sets no maxAttempts.
    #[arg(long, env = "AXION_QUEUE_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,
    /// First retry delay after a fail, in ms; doubles per attempt, with jitter.
    #[arg(long, env = "AXION_QUEUE_RETRY_BACKOFF_MS", default_value_t = 1_000)]
    pub retry_backoff_ms: u64,
    /// Longest retry delay, in ms.
    #[arg(
        long,
        env = "AXION_QUEUE_RETRY_BACKOFF_MAX_MS",
        default_value_t = 60_000
    )]
    pub retry_backoff_max_ms: u64,
    /// Bytes of task bodies the queue owner keeps in memory, for the tasks next in line; the others wait on disk (queues.redb) and are read when due. Bodies not yet committed are held whatever this says.
    #[arg(long, env = "AXION_QUEUE_CACHE_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub queue_cache_bytes: u64,
    /// Tasks one work queue may hold, waiting or in flight; past it an enqueue is refused with an error reply naming the limit. 0: no limit. (--max-queued-messages is for away MQTT sessions.)
    #[arg(long, env = "AXION_MAX_QUEUE_DEPTH", default_value_t = 100_000)]
    pub max_queue_depth: u64,
    /// Bytes of task bodies one work queue may hold; past it an enqueue is refused with an error reply naming the limit. 0: no limit. (--max-queued-bytes is for away MQTT sessions.)
    #[arg(long, env = "AXION_MAX_QUEUE_BYTES", default_value_t = 1024 * 1024 * 1024)]
    pub max_queue_bytes: u64,
    /// Per-queue limits replacing --max-queue-depth and --max-queue-bytes, as QUEUE=DEPTH, QUEUE=DEPTH:BYTES or QUEUE=:BYTES (repeat, or comma-separate in the env var); 0: no limit.
    #[arg(long = "queue-limit", env = "AXION_QUEUE_LIMITS", value_delimiter = ',', value_parser = parse_limit)]
    pub queue_limit: Vec<(String, QueueLimit)>,
    /// Deliver every task on its worker's own topic (axion/<pkg>/queue/<q>/tasks/<worker>) instead of the shared subscription; for brokers without shared subscriptions (also done at once when the broker's CONNACK says it has none, and per worker when its ready asks).
    #[arg(long, env = "AXION_DIRECTED_DELIVERY")]
    pub directed_delivery: bool,
}

fn parse_override(s: &str) -> Result<(String, u64), String> {
    let (queue, ms) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not QUEUE=MS"))?;
    let ms = ms
        .trim()
        .parse::<u64>()
        .map_err(|e| format!("{s:?}: bad milliseconds: {e}"))?;
    Ok((queue.trim().to_string(), ms))
}

/// `QUEUE=DEPTH`, `QUEUE=DEPTH:BYTES` or `QUEUE=:BYTES`.
fn parse_limit(s: &str) -> Result<(String, QueueLimit), String> {
    let (queue, limits) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not QUEUE=DEPTH[:BYTES]"))?;
    let (depth, bytes) = limits.split_once(':').unwrap_or((limits, ""));
    let number = |what: &str, text: &str| -> Result<Option<u64>, String> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(None);
        }
        text.parse::<u64>()
            .map(Some)
            .map_err(|e| format!("{s:?}: bad {what}: {e}"))
    };
    let limit = QueueLimit {
        depth: number("depth", depth)?,
        bytes: number("bytes", bytes)?,
    };
    if limit == QueueLimit::default() {
        return Err(format!(
            "{s:?} sets no limit: QUEUE=DEPTH[:BYTES] or QUEUE=:BYTES"
        ));
    }
    Ok((queue.trim().to_string(), limit))
}

impl QueueTuning {
    /// The owner's configuration for this broker, directory and package.
    pub fn config(
        &self,
        mqtt: impl Into<BrokerUrls>,
        data_dir: PathBuf,
        package: String,
    ) -> QueueConfig {
        let mut cfg = QueueConfig::new(mqtt, data_dir, package);
        cfg.ack_wait = Duration::from_millis(self.ack_wait_ms);
        cfg.ack_wait_overrides = self
            .queue_ack_wait
            .iter()
            .map(|(q, ms)| (q.clone(), Duration::from_millis(*ms)))
            .collect();
        cfg.max_attempts = self.max_attempts;
        cfg.retry_backoff = Duration::from_millis(self.retry_backoff_ms);
        cfg.retry_backoff_max = Duration::from_millis(self.retry_backoff_max_ms);
        cfg.cache_bytes = self.queue_cache_bytes;
        cfg.max_depth = self.max_queue_depth;
        cfg.max_bytes = self.max_queue_bytes;
        cfg.limit_overrides = self.queue_limit.iter().cloned().collect();
        cfg.directed_delivery = self.directed_delivery;
        cfg
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Broker to connect to (user/password in each URL or AXION_MQTT_USER/AXION_MQTT_PASSWORD; a clustered broker's nodes comma-separated, failed over in turn).
    #[arg(long, env = "AXION_MQTT_URL", default_value = axion_wire::DEFAULT_MQTT_URL)]
    pub mqtt: BrokerUrls,
    /// Directory holding the queue store (queues.redb).
    #[arg(long, env = "AXION_DATA_DIR", default_value = "./axion-data")]
    pub data_dir: PathBuf,
    /// Package whose queues this owner serves (one topic level).
    #[arg(long, env = "AXION_PACKAGE", default_value = "default")]
    pub package: String,
    #[command(flatten)]
    pub tuning: QueueTuning,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("axion-queues")
        .build()
        .context("start the async runtime")?;
    runtime.block_on(async move {
        let cfg = args.tuning.config(
            args.mqtt.with_env_credentials(),
            args.data_dir,
            args.package,
        );
        let mqtt = cfg.mqtt.clone();
        let package = cfg.package.clone();
        let mut owner = QueueOwner::start(cfg)
            .await
            .context("start the queue owner")?;
        // No listening port: the pid stands in the port slot (docs/DESIGN.md).
        let heartbeat = HeartbeatPublisher::start(HeartbeatConfig::new(mqtt, &package, "queues")?)
            .context("start the heartbeat")?;
        tokio::select! {
            signal = super::serve::shutdown_signal() => {
                info!(signal = signal?, "stopping the queue owner");
                if let Err(err) = heartbeat.set_draining().await {
                    warn!(%err, "could not publish the draining heartbeat");
                }
                owner.shutdown().await.context("stop the queue owner")?;
                if let Err(err) = heartbeat.stop("stopped").await {
                    warn!(%err, "could not publish the offline heartbeat");
                }
                Ok(ExitCode::SUCCESS)
            }
            err = owner.failed() => {
                error!(error = %err, "queue owner failed");
                Err(anyhow::Error::new(err).context("queue owner"))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_limits_parse() {
        let limit = |depth, bytes| QueueLimit { depth, bytes };
        assert_eq!(
            parse_limit("jobs=50"),
            Ok(("jobs".into(), limit(Some(50), None)))
        );
        assert_eq!(
            parse_limit("jobs=50:4096"),
            Ok(("jobs".into(), limit(Some(50), Some(4096))))
        );
        assert_eq!(
            parse_limit("big=:0"),
            Ok(("big".into(), limit(None, Some(0))))
        );
        for bad in ["jobs", "jobs=", "jobs=:", "jobs=x", "jobs=1:y"] {
            assert!(parse_limit(bad).is_err(), "{bad}");
        }
    }
}
