//! The reaper: stops the processes of this host that hang, whatever
//! language they are written in, and raises an alarm on restart loops.
//!
//! It reads the heartbeat mesh like any dashboard (a [`FleetWatcher`] over
//! every package, or one) and, every check interval, judges the records of
//! processes on its own host with [`policy`](crate::policy). A process
//! that breaks a rule gets SIGTERM, then SIGKILL after the grace period;
//! the record is then republished `offline` with `reason: killed:<rule>`
//! and the kill is logged and counted (on the reaper's own record).
//!
//! Nothing is killed by mistake: a record is acted on only when its
//! `hostname` and `host_boot_id` are this machine's and it carries the
//! process's start ticks; the pid is signalled through a pidfd and only
//! while `/proc` still shows that start time (see
//! [`axion_client::process`]); pid 1 and the reaper's own pid never.

use crate::link::Link;
use crate::policy::{self, Memory, Reason, Thresholds};
use crate::restarts::{AlarmChange, AlarmRules, RestartTable, ServiceKey};
use axion_client::fleet::{FleetWatcher, WatchOptions};
use axion_client::process::{self, ProcessIdentity, Sig, SignalError};
use axion_client::{HeartbeatConfig, HeartbeatPublisher};
use axion_wire::schema::now_unix;
use axion_wire::{topics, BrokerUrls, Heartbeat, Status};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How long a killed process's record is defended against late records
/// of the same run (its will, the legacy service's `exited`).
const TOMBSTONE_TTL: Duration = Duration::from_secs(60);
/// How long the reaper waits for a SIGKILLed process to be gone.
const KILL_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct ReaperConfig {
    /// The broker's nodes; every connection fails over between them.
    pub mqtt: BrokerUrls,
    /// Watch one package, or every package (`None`).
    pub package: Option<String>,
    /// The package of the reaper's own heartbeat record.
    pub own_package: String,
    pub thresholds: Thresholds,
    pub check_interval: Duration,
    /// Between SIGTERM and SIGKILL.
    pub grace: Duration,
    pub alarms: AlarmRules,
    /// Defaults to this machine's hostname.
    pub hostname: Option<String>,
    /// Message expiry of the records and alarms it publishes.
    pub ghost_after: Duration,
}

impl ReaperConfig {
    pub fn new(mqtt: impl Into<BrokerUrls>, own_package: impl Into<String>) -> Self {
        Self {
            mqtt: mqtt.into(),
            package: None,
            own_package: own_package.into(),
            thresholds: Thresholds::default(),
            check_interval: Duration::from_secs(1),
            grace: Duration::from_secs(5),
            alarms: AlarmRules::default(),
            hostname: None,
            ghost_after: Duration::from_secs(axion_wire::schema::DEFAULT_GHOST_SECS),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    #[error(transparent)]
    Heartbeat(#[from] axion_client::HeartbeatError),
    #[error("this machine has no kernel boot id (/proc/sys/kernel/random/boot_id): the reaper cannot tell its own processes from others")]
    NoBootId,
}

/// Kills counted by reason, for the reaper's record.
#[derive(Debug, Default)]
struct Kills {
    by_reason: BTreeMap<&'static str, u64>,
    refused: u64,
}

/// A killed run whose record is defended for a while.
struct Tombstone {
    boot_id: String,
    reason: String,
    payload: Vec<u8>,
    until: Instant,
    last_sent: Instant,
}

/// Runs the reaper until `stop` is cancelled.
pub async fn run(config: ReaperConfig, stop: CancellationToken) -> Result<(), ReaperError> {
    let host = match &config.hostname {
        Some(h) => h.clone(),
        None => axion_client::publisher::local_hostname()?,
    };
    let boot_id = process::host_boot_id().ok_or(ReaperError::NoBootId)?;
    let watcher = FleetWatcher::start(
        &config.mqtt,
        WatchOptions {
            package: config.package.clone(),
            ..WatchOptions::default()
        },
    )?;
    let link = Link::start(&config.mqtt, "axion-reaper");
    let mut hb = HeartbeatConfig::new(config.mqtt.clone(), config.own_package.clone(), "reaper")?;
    hb.host = Some(host.clone());
    let own = HeartbeatPublisher::start(hb)?;
    tracing::info!(host, package = ?config.package, heartbeat_timeout_ms = config.thresholds.heartbeat_timeout.as_millis() as u64,
        disconnect_kill_ms = config.thresholds.disconnect_kill.as_millis() as u64,
        max_stall_ms = config.thresholds.max_stall.as_millis() as u64,
        check_interval_ms = config.check_interval.as_millis() as u64,
        grace_ms = config.grace.as_millis() as u64, "reaper watching this host's processes");

    let ghost_secs = u32::try_from(config.ghost_after.as_secs()).unwrap_or(u32::MAX);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<KillOutcome>();
    let mut memories: HashMap<String, Memory> = HashMap::new();
    let mut killing: HashMap<String, String> = HashMap::new();
    let mut tombstones: HashMap<String, Tombstone> = HashMap::new();
    let mut restarts = RestartTable::new(config.alarms);
    let mut kills = Kills::default();
    let mut changes = watcher.changes();
    let mut tick = tokio::time::interval(config.check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let judge = tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => true,
            changed = changes.changed() => {
                if changed.is_err() {
                    break;
                }
                false
            }
            outcome = done_rx.recv() => {
                if let Some(outcome) = outcome {
                    killing.remove(&outcome.topic);
                    match outcome.result {
                        Ok(tombstone) => {
                            *kills.by_reason.entry(outcome.reason.as_str()).or_default() += 1;
                            link.publish_retained(&outcome.topic, tombstone.payload.clone(), Some(ghost_secs));
                            tombstones.insert(outcome.topic, tombstone);
                        }
                        Err(()) => kills.refused += 1,
                    }
                    own.set_extra("reaper", json!({
                        "kills": kills.by_reason,
                        "kills_total": kills.by_reason.values().sum::<u64>(),
                        "not_signalled": kills.refused,
                    }));
                    own.publish_now();
                }
                false
            }
        };
        let now = now_unix();
        let records: Vec<(String, String, String, Heartbeat)> = watcher.with_fleet(|fleet| {
            fleet
                .instances()
                .filter(|i| i.record.hostname == host)
                .map(|i| {
                    (
                        i.topic.clone(),
                        i.package.clone(),
                        i.service.clone(),
                        i.record.clone(),
                    )
                })
                .collect()
        });

        // A killed run's record stays `killed:…` against its own late will.
        tombstones.retain(|_, t| t.until > Instant::now());
        for (topic, _, _, record) in &records {
            if let Some(t) = tombstones.get_mut(topic) {
                let ours = record.boot_id == t.boot_id
                    && record.reason.as_deref() == Some(t.reason.as_str());
                if record.boot_id == t.boot_id
                    && !ours
                    && t.last_sent.elapsed() >= Duration::from_millis(200)
                {
                    link.publish_retained(topic, t.payload.clone(), Some(ghost_secs));
                    t.last_sent = Instant::now();
                }
            }
        }

        for (topic, package, service, record) in &records {
            if record.host_boot_id.as_deref() != Some(boot_id.as_str()) {
                continue;
            }
            let started = record
                .started_at
                .unwrap_or(record.timestamp - record.uptime_seconds as f64);
            restarts.observe(
                &ServiceKey {
                    package: package.clone(),
                    service: service.clone(),
                    host: host.clone(),
                },
                &record.boot_id,
                started,
                now,
            );
            let memory = memories.entry(topic.clone()).or_default();
            memory.observe(record);
            if !judge || record.status == Status::Offline || killing.contains_key(topic) {
                continue;
            }
            let Some(start_ticks) = record.proc_start_ticks else {
                continue;
            };
            let identity = ProcessIdentity {
                pid: record.pid,
                start_ticks,
            };
            if identity.pid <= 1 || identity.pid == std::process::id() {
                continue;
            }
            let Some(reason) = policy::verdict(record, memory, now, &config.thresholds) else {
                continue;
            };
            if !process::is_running(identity) {
                // Gone already, or the pid is someone else's now: its own
                // will or the legacy service says so; nothing to signal.
                continue;
            }
            tracing::warn!(
                topic,
                service,
                pid = identity.pid,
                reason = reason.as_str(),
                age_secs = now - record.timestamp,
                connected = record.connected,
                queue_depth = record.queue_depth,
                inflight = record.inflight,
                "stopping a process that hangs"
            );
            killing.insert(topic.clone(), record.boot_id.clone());
            let job = KillJob {
                topic: topic.clone(),
                record: record.clone(),
                identity,
                reason,
                grace: config.grace,
            };
            let done = done_tx.clone();
            tokio::spawn(async move {
                let outcome = job.run().await;
                let _ = done.send(outcome);
            });
        }
        memories.retain(|topic, _| records.iter().any(|(t, ..)| t == topic));

        if judge {
            for change in restarts.evaluate(now) {
                match change {
                    AlarmChange::Raise { key, body } => {
                        tracing::warn!(package = key.package, service = key.service, host = key.host,
                            restarts = %body["restarts"], window_secs = %body["window_secs"],
                            hint = crate::restarts::HINT, "restart loop");
                        let payload = serde_json::to_vec(&body).unwrap_or_default();
                        link.publish_retained(
                            &topics::alarm(&key.package, &key.service),
                            payload,
                            Some(ghost_secs),
                        );
                    }
                    AlarmChange::Clear { key } => {
                        tracing::info!(
                            package = key.package,
                            service = key.service,
                            host = key.host,
                            "restart loop over; alarm cleared"
                        );
                        link.publish_retained(
                            &topics::alarm(&key.package, &key.service),
                            Vec::new(),
                            None,
                        );
                    }
                }
            }
        }
    }
    if let Err(error) = own.stop("stopped").await {
        tracing::warn!(%error, "reaper heartbeat stop failed");
    }
    watcher.stop().await;
    link.stop().await;
    Ok(())
}

struct KillJob {
    topic: String,
    record: Heartbeat,
    identity: ProcessIdentity,
    reason: Reason,
    grace: Duration,
}

struct KillOutcome {
    topic: String,
    reason: Reason,
    result: Result<Tombstone, ()>,
}

impl KillJob {
    /// SIGTERM, wait up to the grace period, SIGKILL, wait; then the
    /// record to publish.
    async fn run(self) -> KillOutcome {
        let result = self.stop_process().await;
        let result = match result {
            Ok(signal) => {
                tracing::warn!(
                    topic = self.topic,
                    pid = self.identity.pid,
                    reason = self.reason.as_str(),
                    signal,
                    "process stopped by the reaper"
                );
                let reason = format!("killed:{}", self.reason.as_str());
                let mut record = self.record.clone();
                record.status = Status::Offline;
                record.reason = Some(reason.clone());
                record.timestamp = now_unix();
                record.seq += 1;
                Ok(Tombstone {
                    boot_id: record.boot_id.clone(),
                    payload: serde_json::to_vec(&record).unwrap_or_default(),
                    reason,
                    until: Instant::now() + TOMBSTONE_TTL,
                    last_sent: Instant::now(),
                })
            }
            Err(error) => {
                tracing::warn!(topic = self.topic, pid = self.identity.pid, reason = self.reason.as_str(), %error, "process not signalled");
                Err(())
            }
        };
        KillOutcome {
            topic: self.topic,
            reason: self.reason,
            result,
        }
    }

    /// Which signal ended it: `SIGTERM` or `SIGKILL`.
    async fn stop_process(&self) -> Result<&'static str, SignalError> {
        let target = process::Target::open(self.identity)?;
        target.signal(Sig::Term)?;
        if wait_exit(&target, self.grace).await {
            return Ok("SIGTERM");
        }
        match target.signal(Sig::Kill) {
            // It exited between the wait and the signal.
            Err(SignalError::NotTheSameProcess(_)) => return Ok("SIGTERM"),
            other => other?,
        }
        if !wait_exit(&target, KILL_WAIT).await {
            tracing::error!(
                pid = self.identity.pid,
                "process still there after SIGKILL (uninterruptible sleep?)"
            );
        }
        Ok("SIGKILL")
    }
}

/// Waits until the process behind `target` has exited: its pidfd turns
/// readable then. False on timeout.
async fn wait_exit(target: &process::Target, timeout: Duration) -> bool {
    let fd = match target.as_fd().try_clone_to_owned() {
        Ok(fd) => fd,
        Err(_) => return false,
    };
    // SAFETY: an `OwnedFd` is open until dropped, and the `AsyncFd` owns it
    // for its whole life, so it always names the same open pidfd.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    };
    let Ok(watched) = registered else {
        return false;
    };
    tokio::time::timeout(timeout, watched.readable())
        .await
        .is_ok_and(|r| r.is_ok())
}

#[cfg(test)]
mod tests {
    //! The grace period between SIGTERM and SIGKILL on tokio's paused
    //! clock: an hour of grace passes at once, and the test still sees the
    //! process alive a second before it ends.

    use super::*;
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Command, Stdio};

    /// A child that ignores SIGTERM, killed and reaped on drop whatever
    /// the test's outcome.
    struct Stubborn(Child);

    impl Stubborn {
        fn start() -> Self {
            let mut child = Command::new("sh")
                .args(["-c", "trap '' TERM; echo ready; exec sleep 600"])
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn sh");
            // The trap is set once it says so; an ignored signal stays
            // ignored across the exec.
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert_eq!(line.trim(), "ready");
            Self(child)
        }
    }

    impl Drop for Stubborn {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn job(identity: ProcessIdentity, grace: Duration) -> KillJob {
        let record: Heartbeat = serde_json::from_value(json!({
            "service": "s", "instance_id": "h:1", "hostname": "h", "port": 1,
            "timestamp": 1.0, "boot_id": "b1", "interval_secs": 1
        }))
        .unwrap();
        KillJob {
            topic: "axion/p/heartbeat/s/h:1".into(),
            record,
            identity,
            reason: Reason::NoHeartbeat,
            grace,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_process_that_ignores_sigterm_gets_sigkill_when_the_grace_is_over() {
        let mut stubborn = Stubborn::start();
        let identity = process::identity(stubborn.0.id()).expect("the child runs");
        let grace = Duration::from_secs(3600);
        let started = tokio::time::Instant::now();
        let kill = tokio::spawn(async move { job(identity, grace).stop_process().await });

        tokio::time::sleep(grace - Duration::from_secs(1)).await;
        assert!(!kill.is_finished(), "no SIGKILL before the grace is over");
        assert!(process::is_running(identity), "SIGTERM was ignored");

        assert_eq!(kill.await.unwrap(), Ok("SIGKILL"));
        assert!(started.elapsed() >= grace);
        let status = stubborn.0.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
    }
}
