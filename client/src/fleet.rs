//! The fleet as a reader sees it: every instance's latest heartbeat and the
//! state that follows from it.
//!
//! `Fleet` is the pure table (no I/O, unit-tested): feed it every message
//! from `axion/+/heartbeat/+/+` and it keeps one row per topic, drops late
//! records of an earlier run (the `boot_id` rule of docs/DESIGN.md), removes a row
//! on an empty retained payload, and derives `online`/`draining`/`stale`/
//! `offline`. `FleetWatcher` is that table fed by its own MQTT connection,
//! for the dashboard and for the queue owner (to notice a worker went away).

use crate::connection::{options_v5, Failover, Reconnect};
use crate::HeartbeatError;
use axion_wire::schema::{now_unix, Heartbeat, Status, DEFAULT_STALE_SECS};
use axion_wire::{topics, BrokerUrls};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What a reader concludes about an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Online,
    Draining,
    /// Claims to be alive but its last record is older than the stale threshold.
    Stale,
    Offline,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Online => "online",
            State::Draining => "draining",
            State::Stale => "stale",
            State::Offline => "offline",
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Instance {
    pub topic: String,
    /// From the topic, which is authoritative even when a foreign publisher
    /// left `package` out of its record.
    pub package: String,
    pub service: String,
    pub record: Heartbeat,
}

/// A row as printed by `axion monitor --once --json`: the record's fields
/// plus what the reader derived.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceView {
    #[serde(flatten)]
    pub record: Heartbeat,
    pub topic: String,
    pub state: State,
    pub age_secs: f64,
    /// The active alarm of this instance's service (`axion/<pkg>/alarm/<service>`),
    /// when the watcher was asked for alarms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alarm: Option<Value>,
}

/// Why a message did not change the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    NotAHeartbeatTopic,
    InvalidJson,
    /// A record of an earlier run (another `boot_id`, older timestamp).
    OlderBoot,
}

/// What `Fleet::apply` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Upserted {
        previous: Option<State>,
        now: State,
    },
    Removed {
        previous: State,
    },
    /// An empty payload for a row we did not have.
    Nothing,
    Ignored(Ignored),
}

/// Counts per state, for the dashboard header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub online: usize,
    pub draining: usize,
    pub stale: usize,
    pub offline: usize,
}

/// `(package, service, instance)` of a heartbeat topic.
pub fn parse_heartbeat_topic(topic: &str) -> Option<(&str, &str, &str)> {
    let mut parts = topic.split('/');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("axion"), Some(pkg), Some("heartbeat"), Some(svc), Some(inst), None)
            if !pkg.is_empty() && !svc.is_empty() && !inst.is_empty() =>
        {
            Some((pkg, svc, inst))
        }
        _ => None,
    }
}

/// The table of instances, keyed by topic.
#[derive(Debug, Clone)]
pub struct Fleet {
    rows: BTreeMap<String, Instance>,
    stale_after: f64,
}

impl Fleet {
    pub fn new(stale_after: Duration) -> Self {
        Self {
            rows: BTreeMap::new(),
            stale_after: stale_after.as_secs_f64(),
        }
    }

    /// The state a record implies at `now`. An `offline` record stays
    /// offline however old: it is already the final word, and its timestamp
    /// is that of the connection whose will it was, not of the loss.
    pub fn state_of(&self, record: &Heartbeat, now: f64) -> State {
        match record.status {
            Status::Offline => State::Offline,
            _ if record.age_secs(now) > self.stale_after => State::Stale,
            Status::Draining => State::Draining,
            Status::Online => State::Online,
        }
    }

    /// Applies one message received on a heartbeat topic.
    pub fn apply(&mut self, topic: &str, payload: &[u8], now: f64) -> Applied {
        let Some((package, service, _)) = parse_heartbeat_topic(topic) else {
            return Applied::Ignored(Ignored::NotAHeartbeatTopic);
        };
        let record = match Heartbeat::from_payload(payload) {
            None => {
                return match self.rows.remove(topic) {
                    Some(old) => Applied::Removed {
                        previous: self.state_of(&old.record, now),
                    },
                    None => Applied::Nothing,
                }
            }
            Some(Err(err)) => {
                tracing::debug!(topic, error = %err, "heartbeat is not valid JSON");
                return Applied::Ignored(Ignored::InvalidJson);
            }
            Some(Ok(record)) => record,
        };
        let previous = match self.rows.get(topic) {
            Some(old) => {
                if old.record.boot_id != record.boot_id && record.timestamp < old.record.timestamp {
                    return Applied::Ignored(Ignored::OlderBoot);
                }
                Some(self.state_of(&old.record, now))
            }
            None => None,
        };
        let state = self.state_of(&record, now);
        self.rows.insert(
            topic.to_string(),
            Instance {
                topic: topic.to_string(),
                package: package.to_string(),
                service: service.to_string(),
                record,
            },
        );
        Applied::Upserted {
            previous,
            now: state,
        }
    }

    pub fn get(&self, topic: &str) -> Option<&Instance> {
        self.rows.get(topic)
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn instances(&self) -> impl Iterator<Item = &Instance> {
        self.rows.values()
    }

    /// Every row with its derived state, ordered by topic.
    pub fn views(&self, now: f64) -> Vec<InstanceView> {
        self.rows
            .values()
            .map(|i| InstanceView {
                record: i.record.clone(),
                topic: i.topic.clone(),
                state: self.state_of(&i.record, now),
                age_secs: i.record.age_secs(now),
                alarm: None,
            })
            .collect()
    }

    pub fn counts(&self, now: f64) -> Counts {
        let mut counts = Counts::default();
        for i in self.rows.values() {
            match self.state_of(&i.record, now) {
                State::Online => counts.online += 1,
                State::Draining => counts.draining += 1,
                State::Stale => counts.stale += 1,
                State::Offline => counts.offline += 1,
            }
        }
        counts
    }
}

/// What a `FleetWatcher` subscribes to.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// One package, or all.
    pub package: Option<String>,
    /// One service, or all.
    pub service: Option<String>,
    /// Also keep the retained `axion/<pkg>/queue/<queue>/stats` records.
    pub queues: bool,
    /// Also keep the retained `axion/<pkg>/alarm/<service>` records.
    pub alarms: bool,
    /// Prefix of the watcher's random client id: `axion-fleet` for Axion's
    /// components; a tool run by an operator (`axion monitor`) takes one
    /// outside the `axion-` ids an auth file reserves to components.
    pub client_prefix: &'static str,
    pub stale_after: Duration,
    /// Once subscribed, ask every instance to publish its record again
    /// (`axion/cmd/announce`): on a clustered broker, a record retained on
    /// another node may never reach this one as retained.
    pub announce: bool,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            package: None,
            service: None,
            queues: false,
            alarms: false,
            client_prefix: "axion-fleet",
            stale_after: Duration::from_secs(DEFAULT_STALE_SECS),
            announce: false,
        }
    }
}

impl WatchOptions {
    fn filters(&self) -> Result<Vec<String>, HeartbeatError> {
        let pkg = level_or_wildcard("package", self.package.as_deref())?;
        let svc = level_or_wildcard("service", self.service.as_deref())?;
        let mut filters = vec![format!("axion/{pkg}/heartbeat/{svc}/+")];
        if self.queues {
            filters.push(topics::queue(pkg, "+", "stats"));
        }
        if self.alarms {
            filters.push(topics::alarm(pkg, svc));
        }
        Ok(filters)
    }
}

fn level_or_wildcard<'a>(
    what: &'static str,
    value: Option<&'a str>,
) -> Result<&'a str, HeartbeatError> {
    match value {
        Some(v) => {
            topics::validate_level(what, v)?;
            Ok(v)
        }
        None => Ok("+"),
    }
}

struct WatchState {
    fleet: Fleet,
    /// Latest stats record per queue topic.
    queues: BTreeMap<String, Value>,
    /// Latest alarm per alarm topic.
    alarms: BTreeMap<String, Value>,
    /// When the last message flagged retained arrived: the burst after a
    /// SUBACK is over once these stop.
    last_retained: Option<Instant>,
}

/// A `Fleet` kept current by its own MQTT connection.
pub struct FleetWatcher {
    state: Arc<Mutex<WatchState>>,
    subscribed: watch::Receiver<bool>,
    changes: watch::Receiver<u64>,
    client: AsyncClient,
    task: JoinHandle<()>,
}

impl FleetWatcher {
    /// Connects and subscribes, failing over between the broker's nodes;
    /// returns at once. Must run inside tokio.
    pub fn start(urls: &BrokerUrls, options: WatchOptions) -> Result<Self, HeartbeatError> {
        let filters = options.filters()?;
        let client_id = format!(
            "{}-{}",
            options.client_prefix,
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let mut failover = Failover::new(urls.clone(), Reconnect::default());
        let mut opts = options_v5(failover.current(), &client_id);
        opts.set_clean_start(true);
        opts.set_max_packet_size(Some(1 << 20));
        // Every retained record arrives in one burst right after SUBACK.
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let state = Arc::new(Mutex::new(WatchState {
            fleet: Fleet::new(options.stale_after),
            queues: BTreeMap::new(),
            alarms: BTreeMap::new(),
            last_retained: None,
        }));
        let (subscribed_tx, subscribed) = watch::channel(false);
        let (changes_tx, changes) = watch::channel(0u64);
        let task_state = state.clone();
        let task_client = client.clone();
        let announce = options.announce;
        let task = tokio::spawn(async move {
            let mut pending_subacks = 0usize;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        failover.connected();
                        pending_subacks = 0;
                        for filter in &filters {
                            // QoS 0: brokers cap queued QoS 1 messages per
                            // client (Mosquitto: 1000 + inflight) and silently
                            // drop the rest of a large retained burst.
                            match task_client.try_subscribe(filter.as_str(), QoS::AtMostOnce) {
                                Ok(()) => pending_subacks += 1,
                                Err(err) => {
                                    tracing::warn!(filter = %filter, error = %err, "fleet subscribe failed")
                                }
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        pending_subacks = pending_subacks.saturating_sub(1);
                        if pending_subacks == 0 {
                            // Subscribed first, so every answer is heard.
                            if announce {
                                if let Err(err) = task_client.try_publish(
                                    topics::ANNOUNCE_FLEET,
                                    QoS::AtLeastOnce,
                                    false,
                                    "{}",
                                ) {
                                    tracing::warn!(error = %err, "fleet announce request failed");
                                }
                            }
                            subscribed_tx.send_replace(true);
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let Ok(topic) = std::str::from_utf8(&p.topic) else {
                            continue;
                        };
                        let mut st = lock(&task_state);
                        if p.retain {
                            st.last_retained = Some(Instant::now());
                        }
                        if parse_heartbeat_topic(topic).is_some() {
                            st.fleet.apply(topic, &p.payload, now_unix());
                        } else if topics::parse_alarm(topic).is_some() {
                            match serde_json::from_slice::<Value>(&p.payload) {
                                Ok(v) if !p.payload.is_empty() => {
                                    st.alarms.insert(topic.to_string(), v);
                                }
                                _ => {
                                    st.alarms.remove(topic);
                                }
                            }
                        } else if p.payload.is_empty() {
                            st.queues.remove(topic);
                        } else if let Ok(v) = serde_json::from_slice::<Value>(&p.payload) {
                            st.queues.insert(topic.to_string(), v);
                        }
                        drop(st);
                        changes_tx.send_modify(|n| *n += 1);
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(err) => {
                        subscribed_tx.send_replace(false);
                        if changes_tx.is_closed() {
                            return;
                        }
                        let broker = failover.current().to_string();
                        let wait = failover.after_failure(&mut eventloop, &err);
                        tracing::warn!(broker, error = %err, retry_in = ?wait, "fleet watcher connection lost");
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        });
        Ok(Self {
            state,
            subscribed,
            changes,
            client,
            task,
        })
    }

    /// Waits until the broker acknowledged every subscription (retained
    /// records follow right after).
    pub async fn wait_subscribed(&self, timeout: Duration) -> Result<(), HeartbeatError> {
        let mut rx = self.subscribed.clone();
        let outcome = match tokio::time::timeout(timeout, rx.wait_for(|s| *s)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(HeartbeatError::Stopped),
            Err(_) => Err(HeartbeatError::SubscribeTimeout(timeout)),
        };
        outcome
    }

    /// Waits out the burst of retained records that follows SUBACK: at
    /// least `min`, then until no retained record came for `quiet`, at most
    /// `max` in all (a busy fleet never goes quiet).
    pub async fn settle(&self, min: Duration, quiet: Duration, max: Duration) {
        let start = Instant::now();
        tokio::time::sleep(min).await;
        while start.elapsed() < max {
            let last = lock(&self.state).last_retained;
            match last {
                Some(at) if at.elapsed() < quiet => tokio::time::sleep(quiet - at.elapsed()).await,
                _ => return,
            }
        }
    }

    /// Ticks on every message received; the dashboard and the queue owner
    /// await it instead of polling.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// The table with states at `now`, each row with its service's alarm.
    pub fn views(&self, now: f64) -> Vec<InstanceView> {
        let st = lock(&self.state);
        let mut views = st.fleet.views(now);
        if !st.alarms.is_empty() {
            for view in &mut views {
                if let Some((pkg, svc, _)) = parse_heartbeat_topic(&view.topic) {
                    view.alarm = st.alarms.get(&topics::alarm(pkg, svc)).cloned();
                }
            }
        }
        views
    }

    /// The active alarms by topic (when `alarms` was asked for).
    pub fn alarms(&self) -> Vec<(String, Value)> {
        lock(&self.state)
            .alarms
            .iter()
            .map(|(t, v)| (t.clone(), v.clone()))
            .collect()
    }

    pub fn counts(&self, now: f64) -> Counts {
        lock(&self.state).fleet.counts(now)
    }

    /// Runs `f` on the live table without copying it.
    pub fn with_fleet<R>(&self, f: impl FnOnce(&Fleet) -> R) -> R {
        f(&lock(&self.state).fleet)
    }

    /// The latest retained queue stats records by topic (when `queues` was
    /// asked for).
    pub fn queue_stats(&self) -> Vec<(String, Value)> {
        lock(&self.state)
            .queues
            .iter()
            .map(|(t, v)| (t.clone(), v.clone()))
            .collect()
    }

    /// Disconnects cleanly.
    pub async fn stop(self) {
        if let Err(err) = self.client.disconnect().await {
            tracing::debug!(error = %err, "fleet watcher already disconnected");
        }
        if tokio::time::timeout(Duration::from_secs(2), self.task)
            .await
            .is_err()
        {
            tracing::debug!("fleet watcher did not finish its disconnect in time");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const T: &str = "axion/p/heartbeat/svc/h:1";

    fn rec(boot: &str, ts: f64, status: &str) -> Vec<u8> {
        serde_json::to_vec(
            &json!({"service": "svc", "instance_id": "h:1", "hostname": "h",
            "port": 1, "package": "p", "pid": 7, "uptime_seconds": 1, "timestamp": ts,
            "status": status, "boot_id": boot, "seq": 1}),
        )
        .unwrap()
    }

    fn fleet() -> Fleet {
        Fleet::new(Duration::from_secs(45))
    }

    #[test]
    fn parses_topics() {
        assert_eq!(parse_heartbeat_topic(T), Some(("p", "svc", "h:1")));
        assert_eq!(parse_heartbeat_topic("axion/p/heartbeat/svc"), None);
        assert_eq!(parse_heartbeat_topic("axion/p/queue/q/stats"), None);
        assert_eq!(parse_heartbeat_topic("axion/p/heartbeat/svc/h:1/x"), None);
    }

    #[test]
    fn states_follow_status_and_age() {
        let mut f = fleet();
        let now = 1000.0;
        assert_eq!(
            f.apply(T, &rec("a", now - 1.0, "online"), now),
            Applied::Upserted {
                previous: None,
                now: State::Online
            }
        );
        assert_eq!(
            f.state_of(&f.get(T).unwrap().record, now + 50.0),
            State::Stale
        );
        f.apply(T, &rec("a", now, "draining"), now);
        assert_eq!(f.counts(now).draining, 1);
        assert_eq!(f.counts(now + 46.0).stale, 1);
        // A will keeps the connection's timestamp: offline wins over stale.
        f.apply(T, &rec("a", now - 500.0, "offline"), now);
        assert_eq!(f.counts(now).offline, 1);
    }

    #[test]
    fn a_late_will_of_an_earlier_run_is_dropped() {
        let mut f = fleet();
        let now = 1000.0;
        f.apply(T, &rec("new", now - 1.0, "online"), now);
        // The old run's will: connected long ago, fired late.
        assert_eq!(
            f.apply(T, &rec("old", now - 300.0, "offline"), now),
            Applied::Ignored(Ignored::OlderBoot)
        );
        assert_eq!(f.get(T).unwrap().record.boot_id, "new");
        // The same run's own will is always taken.
        f.apply(T, &rec("new", now - 200.0, "offline"), now);
        assert_eq!(f.counts(now).offline, 1);
        // A newer run replaces it.
        f.apply(T, &rec("newer", now, "online"), now);
        assert_eq!(f.counts(now).online, 1);
    }

    #[test]
    fn empty_payload_removes_and_garbage_is_ignored() {
        let mut f = fleet();
        f.apply(T, &rec("a", 1000.0, "online"), 1000.0);
        assert_eq!(
            f.apply(T, b"", 1000.0),
            Applied::Removed {
                previous: State::Online
            }
        );
        assert!(f.is_empty());
        assert_eq!(f.apply(T, b"", 1000.0), Applied::Nothing);
        assert_eq!(
            f.apply(T, b"{", 1000.0),
            Applied::Ignored(Ignored::InvalidJson)
        );
        assert_eq!(
            f.apply("axion/p/event/x", &rec("a", 1.0, "online"), 1.0),
            Applied::Ignored(Ignored::NotAHeartbeatTopic)
        );
    }

    #[test]
    fn views_serialize_record_fields_plus_state() {
        let mut f = fleet();
        f.apply(T, &rec("a", 1000.0, "online"), 1000.0);
        let v = serde_json::to_value(f.views(1010.0)).unwrap();
        assert_eq!(v[0]["state"], "online");
        assert_eq!(v[0]["topic"], T);
        assert_eq!(v[0]["age_secs"], 10.0);
        assert_eq!(v[0]["boot_id"], "a");
        assert_eq!(v[0]["service"], "svc");
    }

    #[test]
    fn filters_narrow_by_package_and_service() {
        let o = WatchOptions {
            package: Some("p".into()),
            queues: true,
            ..Default::default()
        };
        assert_eq!(
            o.filters().unwrap(),
            vec!["axion/p/heartbeat/+/+", "axion/p/queue/+/stats"]
        );
        let bad = WatchOptions {
            service: Some("a/b".into()),
            ..Default::default()
        };
        assert!(bad.filters().is_err());
    }
}
