//! The legacy task actions (`enqueue`, `pull`/`ready`, `ack`, `fail`)
//! translated onto the queue topics of docs/DESIGN.md, so the durable queue
//! owner (`axion-queues`) does the queueing and the bridge only
//! carries messages. The topic contract is in `bridge/QUEUE-CONTRACT.md`.
//!
//! The bridge is one MQTT worker (its client id) acting for all its
//! WebSocket clients: a `pull` adds one credit on `…/ready` and queues the
//! client as waiting; each task record that arrives on the shared `…/tasks`
//! subscription goes to the longest-waiting client of that queue; a record
//! addressed to another member of the shared group is claimed when a client
//! is waiting and released otherwise. Tasks a client holds when it leaves
//! are released (`…/release`), and credit it no longer backs is withdrawn
//! (`…/ready` with `reset`), so the owner hands that work to another worker
//! at once rather than after the ack wait. A restarted owner's
//! `axion/<pkg>/cmd/announce` is answered with the credit of every queue.
//!
//! An enqueue is the bridge's until the owner confirms it: a broker may
//! PUBACK a publish and still drop it (Mosquitto drops QoS 1 messages past
//! a subscriber's `max_queued_messages`, 1 000 by default), and legacy
//! clients never look for a confirmation. So every enqueue carries an id
//! the bridge chose, at most [`ENQUEUE_WINDOW`] wait for their confirmation
//! (further `enqueue` frames wait, which pushes back on that client's
//! socket), and one unconfirmed after [`RETRY_AFTER`] is published again
//! under the same id, which the owner enqueues once.

use crate::client::{ClientHandle, Metrics};
use crate::hub::{Hub, SubscribeError};
use crate::mqtt::Mqtt;
use axion_wire::queue::{Ready, TaskRecord, TaskRef, TaskRequest};
use axion_wire::topics;
use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Enqueues published and not yet confirmed by the owner, per bridge.
/// Well under Mosquitto's default `max_queued_messages` (1 000), so a
/// bridge alone never makes it drop.
pub const ENQUEUE_WINDOW: usize = 512;

/// An enqueue still unconfirmed this long is published again (then after
/// twice as long, up to [`RETRY_MAX`]).
pub const RETRY_AFTER: Duration = Duration::from_secs(3);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// At most this many copies every [`RETRY_TICK`].
const RETRY_BATCH: usize = 128;
const RETRY_TICK: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{0}")]
    Subscribe(#[from] SubscribeError),
    #[error("too many pending pulls on this connection (limit {0})")]
    TooManyPulls(usize),
    #[error("taskId {0:?} is not held by this connection")]
    NotHeld(String),
    #[error("the MQTT broker is unreachable; try again")]
    Unavailable,
    #[error("task {0}")]
    TooLarge(String),
    #[error("task cannot be encoded as JSON: {0}")]
    Encode(#[from] serde_json::Error),
}

struct Held {
    queue: String,
    client: u64,
}

#[derive(Default)]
struct ClientTasks {
    handle: Option<Arc<ClientHandle>>,
    pulls: usize,
    held: HashSet<String>,
}

/// An enqueue the owner has not confirmed yet.
struct Pending {
    /// The WebSocket client told of the confirmation, if still connected.
    client: u64,
    topic: String,
    body: Bytes,
    sent: Instant,
    retries: u32,
}

#[derive(Default)]
struct State {
    /// queue → clients waiting for one task each, oldest first.
    waiting: HashMap<String, VecDeque<u64>>,
    held: HashMap<String, Held>,
    clients: HashMap<u64, ClientTasks>,
    /// By task id, which is also the correlation data.
    pending: HashMap<String, Pending>,
    next_enqueue: u64,
}

pub struct Tasks {
    package: String,
    reply_topic: String,
    announce_topic: String,
    max_pulls_per_client: usize,
    mqtt: Arc<Mqtt>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    window: Semaphore,
    /// Makes this process's task ids unique across bridge restarts.
    nonce: String,
}

impl Tasks {
    pub fn new(
        package: &str,
        max_pulls_per_client: usize,
        mqtt: Arc<Mqtt>,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let reply_topic = format!("axion/{package}/bridge/{}/enqueued", mqtt.client_id);
        Self {
            package: package.to_string(),
            reply_topic,
            announce_topic: topics::announce(package),
            max_pulls_per_client,
            mqtt,
            hub,
            metrics,
            state: Mutex::new(State::default()),
            window: Semaphore::new(ENQUEUE_WINDOW),
            nonce: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn worker(&self) -> &str {
        &self.mqtt.client_id
    }

    /// The worker id the bridge announces credit under.
    pub fn worker_id(&self) -> &str {
        self.worker()
    }

    /// The bridge's own reply topic and the owner's announce topic,
    /// subscribed for the bridge's lifetime.
    pub async fn start(&self) -> Result<(), TaskError> {
        for filter in [&self.reply_topic, &self.announce_topic] {
            self.hub.pin(filter, QoS::AtLeastOnce)?;
            self.mqtt
                .reconcile(filter)
                .await
                .map_err(|_| TaskError::Unavailable)?;
        }
        Ok(())
    }

    pub fn register(&self, client: &Arc<ClientHandle>) {
        self.lock().clients.insert(
            client.key,
            ClientTasks {
                handle: Some(client.clone()),
                ..Default::default()
            },
        );
    }

    async fn publish(&self, topic: String, body: Bytes) -> Result<(), TaskError> {
        self.mqtt
            .client
            .publish(topic, QoS::AtLeastOnce, body, None)
            .await
            .map_err(|error| {
                tracing::error!(%error, "queue publish failed");
                TaskError::Unavailable
            })
    }

    /// For the event-loop task, which must never await a client call.
    fn publish_detached(self: &Arc<Self>, topic: String, body: Bytes) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(error) = this.publish(topic.clone(), body).await {
                tracing::error!(%error, topic, "detached queue publish failed");
            }
        });
    }

    /// `enqueue`: a task request on `…/enqueue`; the owner's confirmation
    /// comes back as `{"enqueued": {"id", "queue"}}`. Waits while
    /// [`ENQUEUE_WINDOW`] enqueues are unconfirmed.
    pub async fn enqueue(
        &self,
        client: &ClientHandle,
        queue: &str,
        task: Value,
    ) -> Result<(), TaskError> {
        self.window
            .acquire()
            .await
            .map_err(|_| TaskError::Unavailable)?
            .forget();
        let topic = topics::queue(&self.package, queue, "enqueue");
        let payload = serde_json::value::to_raw_value(&task)?;
        // The body is `{"id":…,"payload":…}`: checked before anything is
        // taken or sent.
        let body_len = payload.get().len() + 64;
        let props_len = 3 + self.reply_topic.len() + 3 + 64;
        if let Err(why) = self.metrics.fits(topic.len(), body_len, props_len) {
            self.window.add_permits(1);
            return Err(TaskError::TooLarge(why));
        }
        let (id, body) = {
            let mut st = self.lock();
            st.next_enqueue += 1;
            // Zero-padded, so ids sort in the order they were made (the
            // owner's store then writes to a few pages, not random ones).
            let id = format!("{}-{:012}", self.nonce, st.next_enqueue);
            let request = TaskRequest {
                id: Some(id.clone()),
                ..TaskRequest::new(payload)
            };
            let body = encode(&request);
            st.pending.insert(
                id.clone(),
                Pending {
                    client: client.key,
                    topic: topic.clone(),
                    body: body.clone(),
                    sent: Instant::now(),
                    retries: 0,
                },
            );
            (id, body)
        };
        let sent = self.publish_enqueue(topic, body, &id).await;
        if sent.is_err() && self.lock().pending.remove(&id).is_some() {
            // Never reached the broker: the client hears so and may retry.
            self.window.add_permits(1);
        }
        sent
    }

    async fn publish_enqueue(&self, topic: String, body: Bytes, id: &str) -> Result<(), TaskError> {
        let props = PublishProperties {
            response_topic: Some(self.reply_topic.clone()),
            correlation_data: Some(Bytes::from(id.to_string())),
            ..Default::default()
        };
        self.mqtt
            .client
            .publish(topic, QoS::AtLeastOnce, body, Some(props))
            .await
            .map_err(|error| {
                tracing::error!(%error, task = id, "enqueue publish failed");
                TaskError::Unavailable
            })
    }

    /// Publishes again every enqueue whose confirmation is overdue, until
    /// `cancel`. The owner keeps the first copy that reaches it.
    pub async fn retry_unconfirmed(&self, cancel: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(RETRY_TICK);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let due: Vec<(String, String, Bytes, u32)> = {
                let mut st = self.lock();
                let mut due: Vec<(&String, &mut Pending)> = st
                    .pending
                    .iter_mut()
                    .filter(|(_, p)| {
                        let wait = (RETRY_AFTER * 2u32.pow(p.retries.min(4))).min(RETRY_MAX);
                        now.duration_since(p.sent) >= wait
                    })
                    .collect();
                // Oldest first, a few at a time: a burst of copies would
                // overflow the broker queue that dropped the originals.
                due.sort_by_key(|(_, p)| p.sent);
                due.into_iter()
                    .take(RETRY_BATCH)
                    .map(|(id, p)| {
                        p.sent = now;
                        p.retries += 1;
                        (id.clone(), p.topic.clone(), p.body.clone(), p.retries)
                    })
                    .collect()
            };
            for (id, topic, body, retries) in due {
                tracing::warn!(task = %id, topic, retries, "enqueue not confirmed by the queue owner; publishing it again");
                self.metrics.enqueue_retries.fetch_add(1, Ordering::Relaxed);
                let _ = self.publish_enqueue(topic, body, &id).await;
            }
        }
    }

    /// `pull`/`ready`: one more task for this client when one is there.
    pub async fn pull(&self, client: &ClientHandle, queue: &str) -> Result<(), TaskError> {
        let filter = topics::queue_tasks_shared(&self.package, queue);
        self.hub.pin(&filter, QoS::AtLeastOnce)?;
        self.mqtt
            .reconcile(&filter)
            .await
            .map_err(|_| TaskError::Unavailable)?;
        {
            let mut st = self.lock();
            let entry = st.clients.entry(client.key).or_default();
            if entry.pulls >= self.max_pulls_per_client {
                return Err(TaskError::TooManyPulls(self.max_pulls_per_client));
            }
            entry.pulls += 1;
            st.waiting
                .entry(queue.to_string())
                .or_default()
                .push_back(client.key);
        }
        self.publish(
            topics::queue(&self.package, queue, "ready"),
            encode(&Ready::more(self.worker(), 1)),
        )
        .await
    }

    /// `ack` (`reason` = None) or `fail`.
    pub async fn finish(
        &self,
        client: &ClientHandle,
        task_id: &str,
        fail: Option<Option<String>>,
    ) -> Result<(), TaskError> {
        let queue = {
            let mut st = self.lock();
            match st.held.get(task_id) {
                Some(h) if h.client == client.key => {}
                _ => return Err(TaskError::NotHeld(task_id.to_string())),
            }
            let held = st
                .held
                .remove(task_id)
                .ok_or_else(|| TaskError::NotHeld(task_id.to_string()))?;
            if let Some(c) = st.clients.get_mut(&client.key) {
                c.held.remove(task_id);
            }
            held.queue
        };
        match fail {
            None => {
                self.publish(
                    topics::queue(&self.package, &queue, "ack"),
                    encode(&TaskRef::task(task_id)),
                )
                .await
            }
            Some(reason) => {
                let reason = reason.unwrap_or_else(|| "unspecified".into());
                self.publish(
                    topics::queue(&self.package, &queue, "fail"),
                    encode(&TaskRef::task(task_id).with_reason(reason)),
                )
                .await
            }
        }
    }

    /// A client left: release what it held, withdraw the credit it backed.
    pub async fn client_gone(&self, key: u64) {
        let (released, resets) = {
            let mut st = self.lock();
            let Some(gone) = st.clients.remove(&key) else {
                return;
            };
            let released: Vec<(String, String)> = gone
                .held
                .iter()
                .filter_map(|id| st.held.remove(id).map(|h| (h.queue, id.clone())))
                .collect();
            let mut resets = Vec::new();
            if gone.pulls > 0 {
                for (queue, waiting) in st.waiting.iter_mut() {
                    let before = waiting.len();
                    waiting.retain(|k| *k != key);
                    if waiting.len() != before {
                        resets.push((queue.clone(), waiting.len()));
                    }
                }
            }
            (released, resets)
        };
        for (queue, id) in released {
            tracing::info!(task = %id, queue, "releasing a task held by a disconnected client");
            if let Err(error) = self
                .publish(
                    topics::queue(&self.package, &queue, "release"),
                    encode(&TaskRef::task(id.as_str()).with_worker(self.worker())),
                )
                .await
            {
                tracing::error!(%error, task = %id, "could not release task");
            }
        }
        for (queue, credits) in resets {
            if let Err(error) = self.announce(&queue, credits).await {
                tracing::error!(%error, queue, "could not withdraw credit");
            }
        }
    }

    async fn announce(&self, queue: &str, credits: usize) -> Result<(), TaskError> {
        self.publish(
            topics::queue(&self.package, queue, "ready"),
            encode(&Ready::exactly(
                self.worker(),
                u32::try_from(credits).unwrap_or(u32::MAX),
            )),
        )
        .await
    }

    /// After a (re)connect the owner may have lost our credit: state it.
    pub async fn on_connected(&self) {
        let queues: Vec<(String, usize)> = self
            .lock()
            .waiting
            .iter()
            .map(|(q, w)| (q.clone(), w.len()))
            .collect();
        for (queue, credits) in queues {
            if let Err(error) = self.announce(&queue, credits).await {
                tracing::error!(%error, queue, "could not re-announce credit");
            }
        }
    }

    /// On shutdown: hand every held task back and withdraw all credit.
    pub async fn shutdown(&self) {
        let keys: Vec<u64> = self.lock().clients.keys().copied().collect();
        for key in keys {
            self.client_gone(key).await;
        }
        let unconfirmed = self.lock().pending.len();
        if unconfirmed > 0 {
            tracing::warn!(
                unconfirmed,
                "stopping with enqueues the queue owner has not confirmed; they may or may not be queued"
            );
        }
    }

    /// A publish outside the event tree: a task record or an enqueue
    /// confirmation. Runs on the event-loop task, so it never waits.
    pub fn on_publish(self: &Arc<Self>, topic: &str, publish: &Publish) {
        if topic == self.reply_topic {
            self.on_confirmation(publish);
            return;
        }
        if topic == self.announce_topic {
            let this = self.clone();
            tokio::spawn(async move { this.on_connected().await });
            return;
        }
        let queue = topic
            .strip_prefix("axion/")
            .and_then(|t| t.strip_prefix(self.package.as_str()))
            .and_then(|t| t.strip_prefix("/queue/"))
            .and_then(|t| t.strip_suffix("/tasks"));
        match queue {
            Some(queue) if !queue.contains('/') => self.on_task(queue, &publish.payload),
            _ => tracing::debug!(topic, "ignoring a publish the bridge did not ask for"),
        }
    }

    fn on_confirmation(&self, publish: &Publish) {
        let Some(corr) = publish
            .properties
            .as_ref()
            .and_then(|p| p.correlation_data.as_ref())
            .and_then(|c| std::str::from_utf8(c).ok())
        else {
            tracing::debug!("enqueue confirmation without correlation data");
            return;
        };
        let Ok(body) = std::str::from_utf8(&publish.payload) else {
            return;
        };
        #[derive(Deserialize)]
        struct Answer {
            #[serde(default)]
            error: Option<String>,
        }
        let Ok(answer) = serde_json::from_str::<Answer>(body) else {
            tracing::warn!("enqueue confirmation is not a JSON object");
            return;
        };
        let mut st = self.lock();
        let Some(pending) = st.pending.remove(corr) else {
            // The answer to a copy published again: already answered.
            return;
        };
        self.window.add_permits(1);
        // A refusal (the queue is at its limit) is final: the client hears
        // it as the legacy protocol says errors go, and nothing is retried.
        let frame = match answer.error {
            Some(error) => {
                tracing::warn!(
                    task = corr,
                    topic = pending.topic,
                    error,
                    "the queue owner refused an enqueue"
                );
                json!({ "error": error }).to_string()
            }
            None => format!("{{\"enqueued\":{body}}}"),
        };
        if let Some(handle) = st
            .clients
            .get(&pending.client)
            .and_then(|c| c.handle.clone())
        {
            drop(st);
            handle.send(Utf8Bytes::from(frame), &self.metrics);
        }
    }

    fn on_task(self: &Arc<Self>, queue: &str, payload: &[u8]) {
        let Ok(text) = std::str::from_utf8(payload) else {
            tracing::warn!(queue, "task record is not UTF-8; ignored");
            return;
        };
        // Only the id and the worker are read: the record reaches the
        // client as it came.
        let probe = match serde_json::from_str::<TaskRecord>(text) {
            Ok(p) => p,
            Err(error) => {
                tracing::warn!(%error, queue, "task record without an id; ignored");
                return;
            }
        };
        let release = || {
            self.publish_detached(
                topics::queue(&self.package, queue, "release"),
                encode(&TaskRef::task(probe.id.as_ref()).with_worker(self.worker())),
            )
        };
        // Another member's credit reached us through the shared group:
        // claim it when a client is waiting here, else hand it back.
        let foreign = probe.worker.as_deref().is_some_and(|w| w != self.worker());
        let mut st = self.lock();
        let target = loop {
            let Some(key) = st.waiting.get_mut(queue).and_then(VecDeque::pop_front) else {
                break None;
            };
            if let Some(client) = st.clients.get_mut(&key) {
                client.pulls = client.pulls.saturating_sub(1);
                if let Some(handle) = client.handle.clone() {
                    client.held.insert(probe.id.to_string());
                    break Some(handle);
                }
            }
        };
        match target {
            Some(handle) => {
                st.held.insert(
                    probe.id.to_string(),
                    Held {
                        queue: queue.to_string(),
                        client: handle.key,
                    },
                );
                drop(st);
                if foreign {
                    self.publish_detached(
                        topics::queue(&self.package, queue, "progress"),
                        encode(&TaskRef::task(probe.id.as_ref()).with_worker(self.worker())),
                    );
                }
                // If this fails the client was just disconnected; its
                // cleanup finds the task in `held` and releases it.
                handle.send(
                    Utf8Bytes::from(format!("{{\"task\":{text}}}")),
                    &self.metrics,
                );
            }
            None => {
                drop(st);
                tracing::debug!(task = %probe.id, queue, "no client waiting for this task; releasing");
                release();
            }
        }
    }
}

/// A queue message's body. These messages hold only strings, numbers and
/// flags, which always encode.
fn encode(message: &impl Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(message).unwrap_or_default())
}
