//! Clears the retained records of instances that died long ago.
//!
//! Every record carries MQTT 5 message expiry, but not every broker drops
//! expired retained messages (rumqttd keeps its retained store forever), so
//! `axion serve` also runs this janitor: it watches every heartbeat and,
//! once an instance has said nothing new for `ghost_after`
//! (`HEARTBEAT_GHOST_SECS`, default one hour), publishes an empty retained
//! message on its topic, which removes it from the broker and from every
//! dashboard.
//!
//! "Said nothing new" is measured from the later of the record's own
//! timestamp and the moment the janitor first saw that exact record: a will
//! carries the time of its connection, not of the loss, and a janitor that
//! just started must not clear an instance it knows nothing about yet.

use crate::connection::{options_v5, Failover, Reconnect};
use crate::fleet::parse_heartbeat_topic;
use axion_wire::schema::{now_unix, Heartbeat};
use axion_wire::{topics, BrokerUrls};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// What the janitor remembers per topic.
struct Seen {
    timestamp: f64,
    boot_id: String,
    seq: u64,
    status: axion_wire::schema::Status,
    /// When this janitor first saw this exact record.
    first_seen: f64,
}

/// The janitor's pure bookkeeping, separate from I/O so it can be tested.
pub struct GhostTable {
    ghost_after: f64,
    seen: HashMap<String, Seen>,
}

impl GhostTable {
    pub fn new(ghost_after: Duration) -> Self {
        Self {
            ghost_after: ghost_after.as_secs_f64(),
            seen: HashMap::new(),
        }
    }

    pub fn observe(&mut self, topic: &str, payload: &[u8], now: f64) {
        match Heartbeat::from_payload(payload) {
            None => {
                self.seen.remove(topic);
            }
            Some(Ok(hb)) => {
                let same = self.seen.get(topic).is_some_and(|s| {
                    s.boot_id == hb.boot_id
                        && s.seq == hb.seq
                        && s.status == hb.status
                        && s.timestamp == hb.timestamp
                });
                if !same {
                    self.seen.insert(
                        topic.to_string(),
                        Seen {
                            timestamp: hb.timestamp,
                            boot_id: hb.boot_id,
                            seq: hb.seq,
                            status: hb.status,
                            first_seen: now,
                        },
                    );
                }
            }
            // Not ours to judge: something that is not a heartbeat sits on a
            // heartbeat topic. It ages like a record from `now`.
            Some(Err(_)) => {
                self.seen.entry(topic.to_string()).or_insert(Seen {
                    timestamp: 0.0,
                    boot_id: String::new(),
                    seq: 0,
                    status: axion_wire::schema::Status::Offline,
                    first_seen: now,
                });
            }
        }
    }

    /// Topics whose last word is older than the ghost time; they are
    /// forgotten here, the caller clears them on the broker.
    pub fn take_ghosts(&mut self, now: f64) -> Vec<String> {
        let ghost_after = self.ghost_after;
        let ghosts: Vec<String> = self
            .seen
            .iter()
            .filter(|(_, s)| now - s.timestamp.max(s.first_seen) > ghost_after)
            .map(|(t, _)| t.clone())
            .collect();
        for t in &ghosts {
            self.seen.remove(t);
        }
        ghosts
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// Starts the janitor on its own connection. It checks every
/// `min(ghost_after / 4, 60 s)` and runs until the handle is dropped or
/// aborted. It fails over between the broker's nodes like every client.
pub fn spawn_janitor(urls: &BrokerUrls, ghost_after: Duration) -> JoinHandle<()> {
    let client_id = format!(
        "axion-janitor-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let mut failover = Failover::new(urls.clone(), Reconnect::default());
    let mut opts = options_v5(failover.current(), &client_id);
    opts.set_clean_start(true);
    opts.set_max_packet_size(Some(1 << 20));
    let (client, mut eventloop) = AsyncClient::new(opts, 256);
    let check_every = (ghost_after / 4).clamp(Duration::from_millis(200), Duration::from_secs(60));
    let (msg_tx, mut msg_rx) = mpsc::channel::<(String, bytes::Bytes)>(4096);
    let sub_client = client.clone();
    let poller = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    failover.connected();
                    if let Err(err) =
                        sub_client.try_subscribe(topics::ALL_HEARTBEATS, QoS::AtLeastOnce)
                    {
                        tracing::warn!(error = %err, "janitor subscribe failed");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Ok(topic) = String::from_utf8(p.topic.to_vec()) else {
                        continue;
                    };
                    if msg_tx.send((topic, p.payload)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    if msg_tx.is_closed() {
                        return;
                    }
                    let broker = failover.current().to_string();
                    let wait = failover.after_failure(&mut eventloop, &err);
                    tracing::warn!(broker, error = %err, retry_in = ?wait, "janitor connection lost");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    });
    tokio::spawn(async move {
        // Aborting the janitor must also end its connection task.
        let _poller = AbortOnDrop(poller);
        let mut table = GhostTable::new(ghost_after);
        let mut tick = tokio::time::interval(check_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = msg_rx.recv() => match msg {
                    Some((topic, payload)) => {
                        if parse_heartbeat_topic(&topic).is_some() {
                            table.observe(&topic, &payload, now_unix());
                        }
                    }
                    None => return,
                },
                _ = tick.tick() => {
                    for topic in table.take_ghosts(now_unix()) {
                        tracing::info!(topic = %topic, "clearing ghost heartbeat");
                        if let Err(err) = client.publish(topic.as_str(), QoS::AtLeastOnce, true, Vec::new()).await {
                            tracing::warn!(topic = %topic, error = %err, "janitor could not clear a ghost");
                        }
                    }
                }
            }
        }
    })
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(boot: &str, ts: f64, seq: u64, status: &str) -> Vec<u8> {
        serde_json::to_vec(
            &json!({"service": "s", "instance_id": "h:1", "hostname": "h",
            "port": 1, "timestamp": ts, "status": status, "boot_id": boot, "seq": seq}),
        )
        .unwrap()
    }

    #[test]
    fn clears_only_after_the_ghost_time() {
        let mut t = GhostTable::new(Duration::from_secs(60));
        let topic = "axion/p/heartbeat/s/h:1";
        // A will stamped long ago but seen just now is not a ghost yet.
        t.observe(topic, &rec("a", 0.0, 3, "offline"), 1000.0);
        assert!(t.take_ghosts(1050.0).is_empty());
        // The same record redelivered (reconnect) does not reset the clock.
        t.observe(topic, &rec("a", 0.0, 3, "offline"), 1050.0);
        assert_eq!(t.take_ghosts(1061.0), vec![topic.to_string()]);
        assert!(t.is_empty());
        // A live instance keeps refreshing and never becomes a ghost.
        for i in 0..10u32 {
            let now = 2000.0 + f64::from(i) * 15.0;
            t.observe(topic, &rec("b", now, u64::from(i), "online"), now);
            assert!(t.take_ghosts(now + 1.0).is_empty());
        }
        t.observe(topic, b"", 3000.0);
        assert!(t.is_empty());
    }
}
