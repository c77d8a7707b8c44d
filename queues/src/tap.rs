//! The queue owner's inbound traffic, straight from the client sessions of
//! the embedded broker it runs beside.
//!
//! Per task the owner receives an `enqueue` and an `ack`. As an MQTT client
//! each costs a router delivery, the owner's session writing it out, a
//! socket and rumqttc reading it back. Inside `axion serve` the session
//! that received the publish hands the owner a copy instead (after the ACL
//! check, as the router gets it), and the owner subscribes only to what it
//! still needs over MQTT (heartbeats). The router still gets every publish,
//! so `mosquitto_sub -t 'axion/#'` shows queue traffic as before.
//!
//! The channel is bounded: a session whose copy does not fit waits, which
//! holds back that client alone, as a slow owner connection did. Installed
//! as the broker starts, it also keeps what arrives before the owner has
//! loaded its store, where a subscription would have missed it.

use std::sync::Arc;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use tokio::sync::{mpsc, oneshot};

use super::outlet::{self, Outlet, OutletTx};

/// Topic leaves (`axion/<pkg>/queue/<q>/<leaf>`) the owner acts on.
pub(crate) const LEAVES: [&str; 7] = [
    "enqueue", "ready", "ack", "fail", "progress", "release", "cmd",
];

/// User property the tap puts on each copy: the client id of the session
/// that sent it, as the broker knows it. The owner believes it over any
/// `worker` field in the body, and only from the tap: over MQTT anyone
/// could set it, so the owner ignores it there.
pub const SENDER: &str = "axion-sender";

/// User property the tap puts on an `ack`, `fail` or `progress` copy when
/// the sending session was itself delivered that task: a shared group may
/// deliver a task to a member other than the one whose credit it used, and
/// that member may claim it (see `bridge/QUEUE-CONTRACT.md`). The broker
/// vouches for the delivery, so nobody claims a task it never got.
pub const RECEIVED: &str = "axion-received";

/// The `id` of a task record or task message: its first field, as the
/// owner and Axion's workers write them, read without a parse; anything
/// else is parsed.
pub fn task_id(payload: &[u8]) -> Option<String> {
    if let Some(rest) = payload.strip_prefix(br#"{"id":""#) {
        if let Some(end) = rest.iter().position(|b| *b == b'"' || *b == b'\\') {
            if rest[end] == b'"' {
                return std::str::from_utf8(&rest[..end]).ok().map(str::to_string);
            }
        }
    }
    #[derive(serde::Deserialize)]
    struct Id {
        id: String,
    }
    serde_json::from_slice::<Id>(payload).ok().map(|i| i.id)
}

/// True for `axion/<pkg>/queue/<q>/ack|fail|progress`.
pub fn is_task_answer(topic: &[u8]) -> bool {
    [&b"/ack"[..], b"/fail", b"/progress"]
        .iter()
        .any(|leaf| topic.ends_with(leaf))
}

/// Copies waiting for the owner; past this, sessions wait.
const CAPACITY: usize = 4096;

/// The sessions' end: which topics to copy, and where to; and the
/// owner's way out (see [`super::outlet`]).
pub struct Tap {
    prefix: String,
    /// The package's list request (`topics::queues_list`), outside the
    /// per-queue tree but the owner's to answer.
    list: String,
    tx: mpsc::Sender<Copied>,
    pub outlet: Arc<Outlet>,
}

/// Where the owner says why it refused an enqueue. It answers only a
/// refusal: dropped unanswered, the queue took the task (or the owner never
/// decided, having stopped).
pub type Verdict = oneshot::Sender<String>;

/// A publish handed to the owner, and for an enqueue whose producer hears
/// the outcome in its PUBACK (MQTT 5, QoS 1), where the verdict goes.
pub(crate) struct Copied {
    pub(crate) publish: Box<Publish>,
    pub(crate) verdict: Option<Verdict>,
}

/// The owner's end, handed to [`super::QueueOwner::start_tapped`].
pub struct TapRx {
    pub(crate) rx: mpsc::Receiver<Copied>,
    pub(crate) outlet: OutletTx,
}

/// A tap for the queues of `package`, with an outlet for the owner's
/// session (client id [`axion_wire::ids::queue_owner_client`]).
pub fn tap(package: &str) -> (Tap, TapRx) {
    let (tx, rx) = mpsc::channel(CAPACITY);
    let (outlet, outlet_tx) = outlet::outlet(&axion_wire::ids::queue_owner_client(package));
    let tap = Tap {
        prefix: format!("axion/{package}/queue/"),
        list: axion_wire::topics::queues_list(package),
        tx,
        outlet,
    };
    (
        tap,
        TapRx {
            rx,
            outlet: outlet_tx,
        },
    )
}

impl Tap {
    /// The leaf of `axion/<package>/queue/<q>/<leaf>`, if `topic` is one.
    fn leaf<'t>(&self, topic: &'t [u8]) -> Option<&'t [u8]> {
        let rest = topic.strip_prefix(self.prefix.as_bytes())?;
        let mut levels = rest.split(|b| *b == b'/');
        match (levels.next(), levels.next(), levels.next()) {
            (Some(queue), Some(leaf), None) if !queue.is_empty() => Some(leaf),
            _ => None,
        }
    }

    /// True for `axion/<package>/queue/<q>/<leaf>` with a leaf in
    /// [`LEAVES`], and for the package's list request.
    pub fn wants(&self, topic: &[u8]) -> bool {
        self.leaf(topic)
            .is_some_and(|leaf| LEAVES.iter().any(|l| l.as_bytes() == leaf))
            || topic == self.list.as_bytes()
    }

    /// True for `axion/<package>/queue/<q>/enqueue`.
    pub fn is_enqueue(&self, topic: &[u8]) -> bool {
        self.leaf(topic) == Some(b"enqueue".as_slice())
    }

    /// True for `axion/<package>/queue/<q>/tasks`: a delivery of the owner.
    pub fn is_task(&self, topic: &[u8]) -> bool {
        self.leaf(topic) == Some(b"tasks".as_slice())
    }

    /// Hands the owner back a task (`task_topic`, `payload`) that
    /// `client_id` never acknowledged receiving: a `release` from that
    /// client, as a worker that got another's task and has no room sends
    /// it (`bridge/QUEUE-CONTRACT.md`).
    pub async fn give_back(&self, task_topic: &[u8], payload: &[u8], client_id: &str) {
        let client_id_owned = client_id.to_string();
        #[derive(serde::Deserialize)]
        struct Delivered {
            id: String,
        }
        let (Some(queue_prefix), Ok(task)) = (
            task_topic.strip_suffix(b"tasks"),
            serde_json::from_slice::<Delivered>(payload),
        ) else {
            return;
        };
        let mut topic = queue_prefix.to_vec();
        topic.extend_from_slice(b"release");
        let body = serde_json::json!({ "id": task.id, "worker": client_id });
        tracing::debug!(
            client_id,
            id = task.id,
            "task the client never received given back to the queue owner"
        );
        self.send(
            Bytes::from(topic),
            Bytes::from(body.to_string()),
            false,
            None,
            &client_id_owned,
            true,
            None,
        )
        .await;
    }

    /// Hands the owner a copy of a publish the router is about to get,
    /// sent by `sender` (a client id), with where its verdict goes if it is
    /// an enqueue. Waits while the owner is behind; once the owner has
    /// stopped the copy is dropped (the router still has the publish, and
    /// `axion serve` stops with its owner).
    #[allow(clippy::too_many_arguments)]
    pub async fn send(
        &self,
        topic: Bytes,
        payload: Bytes,
        retain: bool,
        props: Option<rumqttd::protocol::PublishProperties>,
        sender: &str,
        received: bool,
        verdict: Option<Verdict>,
    ) {
        let mut properties = props.map(|p| PublishProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            topic_alias: None,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user_properties,
            subscription_identifiers: Vec::new(),
            content_type: p.content_type,
        });
        let props = properties.get_or_insert_with(Default::default);
        props
            .user_properties
            .retain(|(k, _)| k != SENDER && k != RECEIVED);
        props
            .user_properties
            .push((SENDER.to_string(), sender.to_string()));
        if received {
            props
                .user_properties
                .push((RECEIVED.to_string(), "1".to_string()));
        }
        let publish = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain,
            topic,
            pkid: 0,
            payload,
            properties,
        };
        let copy = Copied {
            publish: Box::new(publish),
            verdict,
        };
        if self.tx.send(copy).await.is_err() {
            tracing::debug!("queue owner gone; its copy of a queue publish dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_packages_queue_leaves_are_copied() {
        let (tap, _rx) = tap("p");
        for topic in [
            "axion/p/queue/jobs/enqueue",
            "axion/p/queue/jobs/ack",
            "axion/p/queue/jobs/cmd",
            "axion/p/queues/cmd/list",
        ] {
            assert!(tap.wants(topic.as_bytes()), "{topic}");
        }
        for topic in [
            "axion/p/queue/jobs/tasks",
            "axion/p/queue/jobs/stats",
            "axion/p/queue/jobs/enqueue/more",
            "axion/p/queue//enqueue",
            "axion/q/queue/jobs/enqueue",
            "axion/p/heartbeat/svc/h:1",
            "axion/q/queues/cmd/list",
            "axion/p/queues/cmd/list/more",
        ] {
            assert!(!tap.wants(topic.as_bytes()), "{topic}");
        }
    }
}
