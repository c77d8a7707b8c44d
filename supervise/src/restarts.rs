//! Restart loops: a service that keeps dying and coming back.
//!
//! A restart is a new run (a new `boot_id`; for a legacy process, a new
//! pid) of the same service on the same host. More than `threshold`
//! restarts within `window` raise a retained alarm on
//! `axion/<package>/alarm/<service>` with a hint for the operator; the
//! alarm clears itself once no new run started for `quiet`. The table is
//! pure (no I/O): the reaper feeds it records and publishes what it says.

use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// What to tell an operator who sees a restart loop.
pub const HINT: &str = "the service keeps dying: raise its capacity (memory, CPU, MAX_QUEUE) or lower its concurrency (MAX_INFLIGHT, PM2 instances); its records' reasons say how it ends";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlarmRules {
    /// Alarm when more than this many restarts fall in `window`.
    pub threshold: usize,
    pub window: Duration,
    /// Clear once no run started for this long.
    pub quiet: Duration,
}

impl Default for AlarmRules {
    fn default() -> Self {
        Self {
            threshold: 5,
            window: Duration::from_secs(600),
            quiet: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub package: String,
    pub service: String,
    pub host: String,
}

#[derive(Debug, Default)]
struct Starts {
    /// Start time (Unix seconds) of each run seen, by boot id.
    runs: BTreeMap<String, f64>,
    /// Restarts last published in an alarm; `None` while no alarm is up.
    alarmed: Option<usize>,
    /// When the last alarm cleared: runs started before are not counted.
    quiet_since: Option<f64>,
}

/// A change to publish.
#[derive(Debug, Clone, PartialEq)]
pub enum AlarmChange {
    /// Publish (retained) this alarm body.
    Raise { key: ServiceKey, body: Value },
    /// Clear the alarm (an empty retained payload).
    Clear { key: ServiceKey },
}

#[derive(Debug, Default)]
pub struct RestartTable {
    rules: AlarmRules,
    services: HashMap<ServiceKey, Starts>,
}

impl RestartTable {
    pub fn new(rules: AlarmRules) -> Self {
        Self {
            rules,
            services: HashMap::new(),
        }
    }

    /// Notes a run of `key` that started at `started_at` (Unix seconds).
    pub fn observe(&mut self, key: &ServiceKey, boot_id: &str, started_at: f64, now: f64) {
        if boot_id.is_empty() || now - started_at > self.rules.window.as_secs_f64() {
            return;
        }
        let starts = self.services.entry(key.clone()).or_default();
        if starts.quiet_since.is_some_and(|q| started_at <= q) {
            return;
        }
        starts.runs.entry(boot_id.to_string()).or_insert(started_at);
    }

    /// Forgets runs out of the window and says which alarms to raise,
    /// update or clear.
    pub fn evaluate(&mut self, now: f64) -> Vec<AlarmChange> {
        let window = self.rules.window.as_secs_f64();
        let quiet = self.rules.quiet.as_secs_f64();
        let mut changes = Vec::new();
        self.services.retain(|key, starts| {
            starts.runs.retain(|_, at| now - *at <= window);
            let last = starts.runs.values().copied().fold(f64::MIN, f64::max);
            let restarts = starts.runs.len().saturating_sub(1);
            match starts.alarmed {
                Some(_) if starts.runs.is_empty() || now - last > quiet => {
                    changes.push(AlarmChange::Clear { key: key.clone() });
                    starts.alarmed = None;
                    // The loop is over: only runs started after it count
                    // again (their records stay retained for a while).
                    starts.runs.clear();
                    starts.quiet_since = Some(now);
                }
                alarmed if restarts > self.rules.threshold && alarmed != Some(restarts) => {
                    let first = starts.runs.values().copied().fold(f64::MAX, f64::min);
                    changes.push(AlarmChange::Raise {
                        key: key.clone(),
                        body: json!({
                            "kind": "restart_loop",
                            "package": key.package,
                            "service": key.service,
                            "host": key.host,
                            "restarts": restarts,
                            "window_secs": self.rules.window.as_secs(),
                            "threshold": self.rules.threshold,
                            "first_start": first,
                            "last_start": last,
                            "timestamp": now,
                            "hint": HINT,
                        }),
                    });
                    starts.alarmed = Some(restarts);
                }
                _ => {}
            }
            starts.alarmed.is_some()
                || !starts.runs.is_empty()
                || starts.quiet_since.is_some_and(|q| now - q <= window)
        });
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ServiceKey {
        ServiceKey {
            package: "p".into(),
            service: "embed".into(),
            host: "h".into(),
        }
    }

    fn rules() -> AlarmRules {
        AlarmRules {
            threshold: 5,
            window: Duration::from_secs(600),
            quiet: Duration::from_secs(60),
        }
    }

    #[test]
    fn six_restarts_in_a_minute_raise_one_alarm_that_clears_after_the_quiet_period() {
        let mut t = RestartTable::new(rules());
        for i in 0..6 {
            t.observe(&key(), &format!("b{i}"), 1000.0 + i as f64 * 10.0, 1050.0);
            assert!(t.evaluate(1050.0).is_empty(), "five restarts are allowed");
        }
        t.observe(&key(), "b6", 1060.0, 1060.0);
        let raised = t.evaluate(1060.0);
        match &raised[..] {
            [AlarmChange::Raise { body, .. }] => {
                assert_eq!(body["restarts"], 6);
                assert_eq!(body["service"], "embed");
                assert_eq!(body["hint"], HINT);
            }
            other => panic!("expected one alarm, got {other:?}"),
        }
        // Seeing the same runs again changes nothing.
        t.observe(&key(), "b6", 1060.0, 1061.0);
        assert!(t.evaluate(1061.0).is_empty());
        // One more restart updates the count.
        t.observe(&key(), "b7", 1070.0, 1070.0);
        assert!(
            matches!(&t.evaluate(1070.0)[..], [AlarmChange::Raise { body, .. }] if body["restarts"] == 7)
        );
        assert!(t.evaluate(1129.0).is_empty());
        assert_eq!(t.evaluate(1131.0), vec![AlarmChange::Clear { key: key() }]);
        // The old runs' records are still retained: they do not count again.
        for i in 0..8 {
            t.observe(&key(), &format!("b{i}"), 1000.0 + i as f64 * 10.0, 1200.0);
        }
        assert!(t.evaluate(1200.0).is_empty());
    }

    #[test]
    fn runs_that_started_before_the_window_do_not_count() {
        let mut t = RestartTable::new(rules());
        for i in 0..10 {
            t.observe(&key(), &format!("old{i}"), 0.0, 5000.0);
        }
        assert!(t.evaluate(5000.0).is_empty());
        assert!(t.services.is_empty());
    }
}
