//! The thresholds of the fail-fast contract (docs/DESIGN.md "Exit codes of the
//! service runtime", the legacy fleet's "Config"), read from the environment so an
//! operator tunes a deployed service without rebuilding it.

use std::time::Duration;

use super::RuntimeError;

/// Default `MAX_INFLIGHT`: handlers running at once.
pub const DEFAULT_MAX_INFLIGHT: usize = 8;
/// Default `MAX_QUEUE`: requests waiting for a free handler slot.
pub const DEFAULT_MAX_QUEUE: usize = 256;
/// Default `DISCONNECT_KILL_MS`.
pub const DEFAULT_DISCONNECT_KILL: Duration = Duration::from_millis(10_000);
/// Default `LIVENESS_MAX_STALL_MS`.
pub const DEFAULT_LIVENESS_MAX_STALL: Duration = Duration::from_millis(30_000);
/// Default `DRAIN_MS`.
pub const DEFAULT_DRAIN: Duration = Duration::from_millis(5_000);
/// Default `WATCHDOG_INTERVAL_MS`: small against the kill thresholds so an
/// exit lands well within "threshold + 1 s".
pub const DEFAULT_WATCHDOG_INTERVAL: Duration = Duration::from_millis(250);
/// Default `AXION_QUEUE_ACK_WAIT_MS`: the queue owner's default ack wait.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_millis(30_000);

/// How much work a service takes and how quickly it gives up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Handlers running at once (`MAX_INFLIGHT`); also the queue credit.
    pub max_inflight: usize,
    /// Requests waiting for a slot (`MAX_QUEUE`); beyond it a request is
    /// answered `overloaded` at once.
    pub max_queue: usize,
    /// Exit 70 after the broker has been unreachable this long.
    pub disconnect_kill: Duration,
    /// Exit 71 after work has been pending this long with no progress.
    pub liveness_max_stall: Duration,
    /// How long SIGTERM waits for running handlers before handing their
    /// tasks back.
    pub drain: Duration,
    /// How often the watchdog thread looks.
    pub watchdog_interval: Duration,
    /// The queue owner's ack wait; `progress` goes out every third of it
    /// while a task is held.
    pub ack_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_inflight: DEFAULT_MAX_INFLIGHT,
            max_queue: DEFAULT_MAX_QUEUE,
            disconnect_kill: DEFAULT_DISCONNECT_KILL,
            liveness_max_stall: DEFAULT_LIVENESS_MAX_STALL,
            drain: DEFAULT_DRAIN,
            watchdog_interval: DEFAULT_WATCHDOG_INTERVAL,
            ack_wait: DEFAULT_ACK_WAIT,
        }
    }
}

impl Limits {
    /// The defaults, overridden by `MAX_INFLIGHT`, `MAX_QUEUE`,
    /// `DISCONNECT_KILL_MS`, `LIVENESS_MAX_STALL_MS`, `DRAIN_MS`,
    /// `WATCHDOG_INTERVAL_MS` and `AXION_QUEUE_ACK_WAIT_MS` when set.
    pub fn from_env() -> Result<Self, RuntimeError> {
        let d = Self::default();
        Ok(Self {
            max_inflight: env_num("MAX_INFLIGHT", d.max_inflight as u64)? as usize,
            max_queue: env_num("MAX_QUEUE", d.max_queue as u64)? as usize,
            disconnect_kill: env_ms("DISCONNECT_KILL_MS", d.disconnect_kill)?,
            liveness_max_stall: env_ms("LIVENESS_MAX_STALL_MS", d.liveness_max_stall)?,
            drain: env_ms("DRAIN_MS", d.drain)?,
            watchdog_interval: env_ms("WATCHDOG_INTERVAL_MS", d.watchdog_interval)?,
            ack_wait: env_ms("AXION_QUEUE_ACK_WAIT_MS", d.ack_wait)?,
        })
    }

    /// Refuses limits that would make the service useless or the watchdog blind.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        let bad = |what: &'static str, why: &'static str| Err(RuntimeError::Limit { what, why });
        if self.max_inflight == 0 {
            return bad("MAX_INFLIGHT", "must be at least 1");
        }
        if self.watchdog_interval.is_zero() {
            return bad("WATCHDOG_INTERVAL_MS", "must be at least 1");
        }
        if self.disconnect_kill.is_zero() || self.liveness_max_stall.is_zero() {
            return bad(
                "DISCONNECT_KILL_MS/LIVENESS_MAX_STALL_MS",
                "must be at least 1",
            );
        }
        if self.ack_wait < Duration::from_millis(30) {
            return bad("AXION_QUEUE_ACK_WAIT_MS", "must be at least 30");
        }
        Ok(())
    }
}

fn env_num(name: &'static str, default: u64) -> Result<u64, RuntimeError> {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => value
            .trim()
            .parse::<u64>()
            .map_err(|_| RuntimeError::Env { name, value }),
        _ => Ok(default),
    }
}

fn env_ms(name: &'static str, default: Duration) -> Result<Duration, RuntimeError> {
    env_num(name, default.as_millis() as u64).map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_design() {
        let l = Limits::default();
        assert_eq!((l.max_inflight, l.max_queue), (8, 256));
        assert_eq!(l.disconnect_kill, Duration::from_secs(10));
        assert_eq!(l.liveness_max_stall, Duration::from_secs(30));
        assert!(l.validate().is_ok());
        let zero = Limits {
            max_inflight: 0,
            ..Limits::default()
        };
        assert!(zero.validate().is_err());
    }
}
