//! The `$SYS/broker/…` topics: a Mosquitto-compatible subset of the
//! broker's figures, refreshed every `sys_interval` and retained, so a
//! dashboard written for Mosquitto (`mosquitto_sub -t '$SYS/#'`) reads
//! Axion unchanged.
//!
//! The topics never go through rumqttd's router: it matches no topic that
//! starts with `$` and refuses (by dropping the link) any `$` filter other
//! than `$share/…`. They live here instead, written only by the broker:
//! a client's publish or will on `$SYS` is refused (see
//! `session::inbound`). A session with a `$SYS` filter gets the current
//! values as retained messages after its SUBACK, as any retained message
//! (`Shared::retained_matching`), and each change as it is made, from
//! [`SysTopics::changed_since`] when [`SysTopics::subscribe`]'s receiver
//! says there is one. Nothing else is ever matched against them, so a
//! `#` or `+/…` subscription never sees them (MQTT-4.7.2-1).
//!
//! Like Mosquitto, a value is published when it changed since the last
//! round, and `$SYS/broker/version` once, at start. Payloads are
//! Mosquitto's: plain decimal numbers, `N seconds` for the uptime.

use std::collections::BTreeMap;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use crate::server::Shared;

/// The root every topic here is under.
pub const ROOT: &str = "$SYS";

/// True for a filter over the `$SYS` tree (not `$share/…/$SYS/…`, which
/// the caller refuses with other `$` filters).
pub fn is_sys_filter(filter: &str) -> bool {
    filter == ROOT || filter.starts_with("$SYS/")
}

/// True for a topic in the `$SYS` tree: only the broker writes there.
pub fn is_sys_topic(topic: &[u8]) -> bool {
    topic == ROOT.as_bytes() || topic.starts_with(b"$SYS/")
}

struct Entry {
    payload: Bytes,
    /// The round that last changed it.
    seq: u64,
}

/// The current `$SYS` values and which round changed each.
pub struct SysTopics {
    entries: Mutex<BTreeMap<String, Entry>>,
    /// The last round that changed something; sessions with a `$SYS`
    /// filter wait on it.
    round: watch::Sender<u64>,
}

impl Default for SysTopics {
    fn default() -> Self {
        Self {
            entries: Mutex::new(BTreeMap::new()),
            round: watch::channel(0).0,
        }
    }
}

impl SysTopics {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes when a round changed something; its value is that round.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.round.subscribe()
    }

    /// The last round that changed something.
    pub fn round(&self) -> u64 {
        *self.round.borrow()
    }

    /// How many topics hold a value.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sets each (topic, payload); those that changed are stamped with a
    /// new round, and subscribers are woken once if any did.
    pub fn update(&self, values: impl IntoIterator<Item = (String, String)>) {
        let mut entries = self.lock();
        let round = self.round() + 1;
        let mut changed = false;
        for (topic, payload) in values {
            match entries.get_mut(&topic) {
                Some(e) if e.payload == payload.as_bytes() => {}
                Some(e) => {
                    e.payload = Bytes::from(payload);
                    e.seq = round;
                    changed = true;
                }
                None => {
                    entries.insert(
                        topic,
                        Entry {
                            payload: Bytes::from(payload),
                            seq: round,
                        },
                    );
                    changed = true;
                }
            }
        }
        if changed {
            // Under the lock: a reader that saw the round sees its values.
            self.round.send_replace(round);
        }
    }

    /// Topics changed after round `seen` and matching one of `filters`
    /// (client form), with the round they are current to.
    pub fn changed_since<'f>(
        &self,
        seen: u64,
        filters: impl Iterator<Item = &'f str> + Clone,
    ) -> (Vec<(Bytes, Bytes)>, u64) {
        let entries = self.lock();
        let now = self.round();
        let out = entries
            .iter()
            .filter(|(_, e)| e.seq > seen)
            .filter(|(topic, _)| {
                filters
                    .clone()
                    .any(|f| axion_access::acl::topic_matches(f, topic))
            })
            .map(|(topic, e)| (Bytes::from(topic.clone()), e.payload.clone()))
            .collect();
        (out, now)
    }

    /// Every topic matching `filter`, with its value.
    pub fn matching(&self, filter: &str) -> Vec<(Bytes, Bytes)> {
        let (found, _) = self.changed_since(0, std::iter::once(filter));
        found
    }
}

/// Values that only grow or are kept across rounds.
#[derive(Default)]
struct Rounds {
    /// Most clients connected at once, as seen at a round (as Mosquitto
    /// counts it: short-lived connections between rounds are missed).
    max_connected: u64,
}

/// Refreshes the `$SYS` topics every `interval` until the broker is
/// dropped or stops.
pub async fn run(shared: Weak<Shared>, interval: Duration, mut stop: watch::Receiver<bool>) {
    let mut rounds = Rounds::default();
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let values = values(&shared, shared.started.elapsed(), &mut rounds);
        shared.sys.update(values);
    }
}

/// This round's values, Mosquitto's topics and payloads.
fn values(shared: &Shared, uptime: Duration, rounds: &mut Rounds) -> Vec<(String, String)> {
    let t = shared.traffic.snapshot();
    let counters = crate::server::counters(shared);
    let connected = counters.sessions as u64;
    rounds.max_connected = rounds.max_connected.max(connected);
    let (_, away) = shared.lifetimes.kept_sessions();
    let retained = shared.retained_count() + shared.sys.len();
    let pairs: [(&str, String); 15] = [
        (
            "version",
            format!("axion version {}", env!("CARGO_PKG_VERSION")),
        ),
        ("uptime", format!("{} seconds", uptime.as_secs())),
        ("clients/connected", connected.to_string()),
        ("clients/disconnected", away.to_string()),
        ("clients/total", (connected + away as u64).to_string()),
        ("clients/maximum", rounds.max_connected.to_string()),
        ("clients/expired", counters.sessions_expired.to_string()),
        ("messages/received", t.packets_received.to_string()),
        ("messages/sent", t.packets_sent.to_string()),
        (
            "publish/messages/received",
            t.publishes_received.to_string(),
        ),
        ("publish/messages/sent", t.publishes_sent.to_string()),
        (
            "publish/messages/dropped",
            counters.queued_dropped.to_string(),
        ),
        ("bytes/received", t.bytes_received.to_string()),
        ("bytes/sent", t.bytes_sent.to_string()),
        ("retained messages/count", retained.to_string()),
    ];
    pairs
        .into_iter()
        .map(|(leaf, value)| (format!("{ROOT}/broker/{leaf}"), value))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changed_values_start_a_round() {
        let sys = SysTopics::default();
        let rx = sys.subscribe();
        sys.update([
            ("$SYS/broker/version".to_string(), "v".to_string()),
            ("$SYS/broker/uptime".to_string(), "0 seconds".to_string()),
        ]);
        assert_eq!(*rx.borrow(), 1);
        sys.update([
            ("$SYS/broker/version".to_string(), "v".to_string()),
            ("$SYS/broker/uptime".to_string(), "10 seconds".to_string()),
        ]);
        let (changed, now) = sys.changed_since(1, ["$SYS/#"].into_iter());
        assert_eq!(now, 2);
        assert_eq!(
            changed,
            vec![(Bytes::from("$SYS/broker/uptime"), Bytes::from("10 seconds"))]
        );
        // Nothing changed: no new round.
        sys.update([("$SYS/broker/version".to_string(), "v".to_string())]);
        assert_eq!(sys.round(), 2);
        assert_eq!(sys.matching("$SYS/broker/+").len(), 2);
        assert_eq!(sys.matching("$SYS/broker/version").len(), 1);
    }

    #[test]
    fn wildcards_do_not_reach_the_sys_tree() {
        let sys = SysTopics::default();
        sys.update([("$SYS/broker/uptime".to_string(), "1 seconds".to_string())]);
        assert!(sys.matching("#").is_empty());
        assert!(sys.matching("+/broker/uptime").is_empty());
        assert_eq!(sys.matching("$SYS/#").len(), 1);
        assert!(is_sys_filter("$SYS/#") && is_sys_filter("$SYS"));
        assert!(!is_sys_filter("$SYSTEM/x") && !is_sys_filter("#"));
        assert!(is_sys_topic(b"$SYS/broker/uptime") && !is_sys_topic(b"$SYSx"));
    }
}
