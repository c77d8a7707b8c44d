//! The heartbeat record of docs/DESIGN.md, as one serde type.
//!
//! The publisher, the aggregation, the janitor, the dashboard and the tests
//! all read and write this one struct, so the JSON on
//! `axion/<pkg>/heartbeat/<service>/<host>:<port>` cannot drift between them.
//! Records from other publishers (the legacy Python `start_heartbeat`)
//! carry only the first eight fields; everything Axion added is optional on
//! the way in.

use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

/// Heartbeat interval when `HEARTBEAT_INTERVAL_SECS` is not set.
pub const DEFAULT_INTERVAL_SECS: u64 = 15;
/// An instance whose last record is older than this is stale
/// (`HEARTBEAT_STALE_SECS`): three missed beats at the default interval.
pub const DEFAULT_STALE_SECS: u64 = 45;
/// How long the record of a dead instance stays retained
/// (`HEARTBEAT_GHOST_SECS`). One hour: long enough for an operator to see on
/// the dashboard what died and when, short enough that a fleet with churn
/// (ephemeral ports, autoscaling) does not pile up ghosts.
pub const DEFAULT_GHOST_SECS: u64 = 3600;

/// What the instance says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    #[default]
    Online,
    Draining,
    Offline,
}

/// One retained heartbeat record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub service: String,
    /// `<host>:<port>`, the last topic level.
    pub instance_id: String,
    pub hostname: String,
    /// The listening port, or the pid for an instance without one (a pid
    /// does not fit a `u16`).
    pub port: u32,
    #[serde(default)]
    pub package: String,
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub uptime_seconds: u64,
    /// Unix seconds.
    pub timestamp: f64,
    #[serde(default)]
    pub status: Status,
    /// Why an instance is offline: `lost` (its MQTT will), `stopped`,
    /// `exited` (the sidecar saw its pid go).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// New at every start of the process; empty for publishers that have none.
    #[serde(default)]
    pub boot_id: String,
    #[serde(default)]
    pub seq: u64,
    #[serde(default)]
    pub interval_secs: u64,
    #[serde(default = "default_true")]
    pub connected: bool,
    #[serde(default)]
    pub queue_depth: u64,
    #[serde(default)]
    pub inflight: u64,
    /// Unix seconds of the last finished (or progressing) job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress_ts: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avg_job_ms: Option<f64>,
    /// CPU use of the process in percent of one core, from `/proc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f64>,
    /// Resident memory of the process in bytes, from `/proc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// When the process started, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<f64>,
    /// The process's start time in clock ticks since boot: with `pid` and
    /// `host_boot_id` it names exactly one process (see `process`). A
    /// record without it is never acted on by the reaper.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proc_start_ticks: Option<u64>,
    /// The kernel boot id of the machine the process runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_boot_id: Option<String>,
    /// Whatever else the caller put in (the legacy publisher's `extras`), at top level.
    #[serde(flatten)]
    pub extras: serde_json::Map<String, serde_json::Value>,
}

fn default_true() -> bool {
    true
}

impl Heartbeat {
    /// Parses a record; `None` for an empty payload (a cleared retained
    /// message), which is not an error.
    pub fn from_payload(payload: &[u8]) -> Option<Result<Self, serde_json::Error>> {
        if payload.is_empty() {
            return None;
        }
        Some(serde_json::from_slice(payload))
    }

    /// Seconds since this record was written, by the reader's clock.
    pub fn age_secs(&self, now: f64) -> f64 {
        (now - self.timestamp).max(0.0)
    }
}

/// Now as float Unix seconds, the unit of `timestamp`.
pub fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_legacy_python_record() {
        let raw = br#"{"service":"report","instance_id":"myhost:9400","hostname":"myhost",
            "port":9400,"package":"homechoice","uptime_seconds":3600,"pid":12345,
            "timestamp":1700000000.0}"#;
        let hb = Heartbeat::from_payload(raw).unwrap().unwrap();
        assert_eq!(hb.status, Status::Online);
        assert!(hb.connected);
        assert!(hb.extras.is_empty());
        assert_eq!(hb.port, 9400);
    }

    #[test]
    fn round_trips_every_field_and_flattens_extras() {
        let raw = serde_json::json!({"service": "report", "instance_id": "myhost:9400",
            "hostname": "myhost", "port": 9400, "package": "homechoice", "pid": 12345,
            "uptime_seconds": 3600, "timestamp": 1700000000.0, "status": "offline",
            "reason": "lost", "boot_id": "9f1c", "seq": 240, "interval_secs": 15,
            "connected": true, "queue_depth": 0, "inflight": 0,
            "last_progress_ts": 1700000000.0, "avg_job_ms": 37.0, "model": "bge"});
        let hb: Heartbeat = serde_json::from_value(raw.clone()).unwrap();
        assert_eq!(hb.status, Status::Offline);
        assert_eq!(hb.reason.as_deref(), Some("lost"));
        assert_eq!(hb.extras.get("model"), Some(&serde_json::json!("bge")));
        assert_eq!(serde_json::to_value(&hb).unwrap(), raw);
        assert!(Heartbeat::from_payload(b"").is_none());
        assert!(Heartbeat::from_payload(b"nope").unwrap().is_err());
    }
}
