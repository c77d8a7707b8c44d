//! When a process must be stopped, decided from its heartbeat records
//! alone (no I/O, unit-tested with made-up clocks).
//!
//! Three rules, checked in this order:
//! - `no_heartbeat`: the record is older than `HEARTBEAT_TIMEOUT`, or three
//!   of the instance's own intervals if that is longer (a Rust service
//!   beats every 15 s; it is not silent after 10). A Node service whose
//!   event loop is blocked stops beating: this is how it is caught.
//! - `broker_disconnected`: the instance has said `connected: false` for
//!   longer than `DISCONNECT_KILL_MS`, counted from the first such record
//!   seen.
//! - `no_progress`: work is pending (`queue_depth + inflight > 0`) and
//!   nothing moved for `LIVENESS_MAX_STALL_MS`, counted from the later of
//!   its `last_progress_ts` and the first record that showed work pending
//!   (an idle service that just got work is not stalled).

use axion_wire::Heartbeat;
use std::time::Duration;

/// Why a process is stopped; written on its record as `killed:<reason>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    NoHeartbeat,
    BrokerDisconnected,
    NoProgress,
}

impl Reason {
    pub const ALL: [Reason; 3] = [
        Reason::NoHeartbeat,
        Reason::BrokerDisconnected,
        Reason::NoProgress,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoHeartbeat => "no_heartbeat",
            Reason::BrokerDisconnected => "broker_disconnected",
            Reason::NoProgress => "no_progress",
        }
    }
}

/// The bounds of the three rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub heartbeat_timeout: Duration,
    pub disconnect_kill: Duration,
    pub max_stall: Duration,
}

impl Default for Thresholds {
    /// The legacy heartbeat service's timeout and the service runtime's
    /// own watchdog bounds.
    fn default() -> Self {
        Self {
            heartbeat_timeout: Duration::from_millis(10_000),
            disconnect_kill: Duration::from_millis(10_000),
            max_stall: Duration::from_millis(30_000),
        }
    }
}

impl Thresholds {
    /// How long `record`'s instance may stay silent.
    pub fn silence_allowed(&self, record: &Heartbeat) -> f64 {
        let own = 3.0 * record.interval_secs as f64;
        self.heartbeat_timeout.as_secs_f64().max(own)
    }
}

/// What the policy remembers of one run of one instance between looks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Memory {
    pub boot_id: String,
    /// Timestamp of the first record of the current `connected: false` spell.
    pub disconnected_since: Option<f64>,
    /// Timestamp of the first record of the current spell with work pending.
    pub pending_since: Option<f64>,
}

impl Memory {
    /// Takes in a record (a new run starts afresh).
    pub fn observe(&mut self, record: &Heartbeat) {
        if record.boot_id != self.boot_id {
            *self = Memory {
                boot_id: record.boot_id.clone(),
                ..Memory::default()
            };
        }
        if record.connected {
            self.disconnected_since = None;
        } else {
            self.disconnected_since.get_or_insert(record.timestamp);
        }
        if record.queue_depth + record.inflight > 0 {
            self.pending_since.get_or_insert(record.timestamp);
        } else {
            self.pending_since = None;
        }
    }
}

/// The rule `record` breaks at `now` (Unix seconds), if any.
pub fn verdict(record: &Heartbeat, memory: &Memory, now: f64, t: &Thresholds) -> Option<Reason> {
    if now - record.timestamp > t.silence_allowed(record) {
        return Some(Reason::NoHeartbeat);
    }
    if let Some(since) = memory.disconnected_since {
        if now - since > t.disconnect_kill.as_secs_f64() {
            return Some(Reason::BrokerDisconnected);
        }
    }
    if let Some(pending) = memory.pending_since {
        let moved = record.last_progress_ts.unwrap_or(pending).max(pending);
        if now - moved > t.max_stall.as_secs_f64() {
            return Some(Reason::NoProgress);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use axion_wire::Status;

    fn record(ts: f64) -> Heartbeat {
        serde_json::from_value(serde_json::json!({
            "service": "s", "instance_id": "h:1", "hostname": "h", "port": 1,
            "timestamp": ts, "boot_id": "b1", "interval_secs": 1
        }))
        .unwrap()
    }

    fn t() -> Thresholds {
        Thresholds {
            heartbeat_timeout: Duration::from_secs(3),
            disconnect_kill: Duration::from_secs(5),
            max_stall: Duration::from_secs(7),
        }
    }

    fn judge(r: &Heartbeat, m: &mut Memory, now: f64) -> Option<Reason> {
        m.observe(r);
        verdict(r, m, now, &t())
    }

    #[test]
    fn silence_is_measured_against_the_longer_of_the_timeout_and_three_intervals() {
        let mut m = Memory::default();
        let r = record(100.0);
        assert_eq!(judge(&r, &mut m, 103.0), None);
        assert_eq!(judge(&r, &mut m, 103.1), Some(Reason::NoHeartbeat));
        let slow = Heartbeat {
            interval_secs: 15,
            ..record(100.0)
        };
        assert_eq!(judge(&slow, &mut m, 144.0), None);
        assert_eq!(judge(&slow, &mut m, 145.1), Some(Reason::NoHeartbeat));
    }

    #[test]
    fn disconnection_counts_from_the_first_record_that_said_so_and_resets() {
        let mut m = Memory::default();
        let down = |ts| Heartbeat {
            connected: false,
            ..record(ts)
        };
        assert_eq!(judge(&down(100.0), &mut m, 100.0), None);
        assert_eq!(judge(&down(104.0), &mut m, 105.0), None);
        // Back up for a moment: the spell starts again.
        assert_eq!(judge(&record(105.5), &mut m, 105.5), None);
        assert_eq!(judge(&down(106.0), &mut m, 106.0), None);
        assert_eq!(judge(&down(110.5), &mut m, 110.6), None);
        assert_eq!(
            judge(&down(111.0), &mut m, 111.1),
            Some(Reason::BrokerDisconnected)
        );
    }

    #[test]
    fn an_idle_service_is_never_stalled_and_new_work_restarts_the_clock() {
        let mut m = Memory::default();
        let idle = Heartbeat {
            last_progress_ts: Some(0.0),
            ..record(1000.0)
        };
        assert_eq!(judge(&idle, &mut m, 1000.0), None);
        // Work arrives an hour after the last job: not stalled yet.
        let busy = |ts| Heartbeat {
            queue_depth: 3,
            inflight: 1,
            last_progress_ts: Some(0.0),
            ..record(ts)
        };
        assert_eq!(judge(&busy(1001.0), &mut m, 1001.0), None);
        assert_eq!(judge(&busy(1007.0), &mut m, 1008.0), None);
        assert_eq!(
            judge(&busy(1008.0), &mut m, 1008.1),
            Some(Reason::NoProgress)
        );
        // Progress reported: fine again.
        let moving = Heartbeat {
            last_progress_ts: Some(1008.0),
            ..busy(1008.0)
        };
        assert_eq!(judge(&moving, &mut m, 1010.0), None);
    }

    #[test]
    fn a_new_run_forgets_the_old_runs_spells() {
        let mut m = Memory::default();
        let down = Heartbeat {
            connected: false,
            ..record(100.0)
        };
        m.observe(&down);
        let reborn = Heartbeat {
            boot_id: "b2".into(),
            connected: false,
            status: Status::Online,
            ..record(200.0)
        };
        assert_eq!(judge(&reborn, &mut m, 202.0), None);
        assert_eq!(m.disconnected_since, Some(200.0));
    }
}
