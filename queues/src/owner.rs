//! The queue owner process: an MQTT client that owns every queue of one
//! package, the redb store behind them, and the group commit.
//!
//! Three parts, so that no part ever waits on another in a cycle:
//! - the MQTT task polls rumqttc's event loop and forwards publishes to the
//!   core over a bounded channel (when the core is slow, the socket is read
//!   more slowly: backpressure, not loss);
//! - the core task owns all queue state; it never awaits the MQTT client (it
//!   uses `try_*` calls and keeps what does not fit in a small outbox);
//! - the store thread commits one batch at a time. Whatever arrives while a
//!   commit runs goes into the next one, so one fsync covers every enqueue of
//!   that window (group commit) without adding a fixed delay at low load.
//!   The batch is taken from the queues' changed records when the commit
//!   starts (see [`Core::start_commit`]).
//!
//! Task bodies are not kept in memory beyond a bounded cache (see
//! [`super::cache`]): bodies the core needs and does not have (the head of
//! a queue a worker waits on, a dead letter to announce, the tasks an ops
//! command lists) are read in batches on the blocking pool, and the core
//! carries on when they arrive.
//!
//! Beside a broker that outlives it, the owner acknowledges an incoming
//! `enqueue` (PUBACK) by hand only once the task is on disk, in receive
//! order. Beside the embedded broker, which dies with it, the MQTT client
//! acknowledges every publish on receipt.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axion_client::connection::{options_v5, Failover, Reconnect};
use axion_wire::topics;
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use tokio::sync::{mpsc, oneshot};

use super::cache::Cache;
use super::metrics::{QueueCells, QueueMetrics, SYNC_EVERY_MS};
use super::outlet::{Injected, OutletTx, Refused};
use super::queue::{After, DeadNotice, Effects, Limits, Outgoing, Queue};
use super::store::{Body, Loaded, Op, Store, StoreError};
use super::tap::{TapRx, LEAVES};
use super::{QueueConfig, QueueError};
use axion_wire::queue::{
    Command, CommandReply, CommandRequest, Enqueued, ListRequest, Ready, TaskRef, TaskRequest,
    TaskView,
};

/// Deliveries per queue per pass, so one busy queue does not starve others.
const DISPATCH_BUDGET: usize = 512;
/// Above this many unsent messages the core stops producing deliveries
/// until the MQTT client catches up.
const OUTBOX_HIGH: usize = 4096;
const INBOUND_CAPACITY: usize = 1024;
const REQUEST_CAPACITY: usize = 16_384;
const STATS_EVERY_MS: u64 = 1000;
const STATS_REFRESH_MS: u64 = 5000;
/// How long deletes of finished tasks may wait for a commit that writes
/// something else.
const DELETE_LINGER_MS: u64 = 20;

/// How often totals are written when no task changed with them.
const COUNTERS_EVERY_MS: u64 = 1000;

/// A group commit slower than this is logged.
const SLOW_COMMIT: Duration = Duration::from_millis(100);

/// Most bodies read for the head of a queue at once; they also weigh at
/// most a quarter of the cache (one at least).
const READ_BATCH: usize = 256;

/// Reads finished and not yet taken by the core.
const READS_CAPACITY: usize = 64;

/// The metrics cells of `queue`, looked up in the core's own map first
/// (the shared one takes a lock).
fn cells<'c>(
    cells: &'c mut HashMap<String, Arc<QueueCells>>,
    metrics: &QueueMetrics,
    queue: &str,
) -> &'c QueueCells {
    if !cells.contains_key(queue) {
        cells.insert(queue.to_string(), metrics.cells(queue));
    }
    &cells[queue]
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

enum Inbound {
    Publish(Box<Publish>),
    /// A copy from the embedded broker's sessions, which names its sender.
    Tapped(super::tap::Copied),
    /// Connected to a node; `shared`: it offers shared subscriptions (its
    /// CONNACK did not say `SharedSubscriptionAvailable = 0`).
    Connected {
        shared: bool,
    },
}

/// Who sent a tapped publish, as the embedded broker says.
struct Sender {
    client_id: String,
    /// The broker delivered this client the task the message is about.
    received: bool,
}

/// Where a reply goes: the requester's Response Topic (or the body's
/// `replyTo`), with its Correlation Data.
struct ReplyTo {
    topic: String,
    correlation: Option<Bytes>,
}

/// Bodies to read from the store (`seqs`, ascending where order matters)
/// and what they are for.
struct Read {
    queue: String,
    seqs: Vec<u64>,
    purpose: Purpose,
}

enum Purpose {
    /// The next tasks of the queue, for dispatch: their ids, in `seqs`'
    /// order.
    Dispatch(Vec<String>),
    /// Dead letters to announce.
    Dead(Vec<DeadNotice>),
    /// A command reply whose tasks need their payloads: per task in
    /// `reply.tasks`, its seq and the body the cache had.
    Reply {
        to: ReplyTo,
        reply: Box<CommandReply>,
        bodies: Vec<(u64, Option<Arc<Body>>)>,
    },
}

type ReadDone = (Read, Result<Vec<Option<Body>>, StoreError>);

enum Out {
    Publish(Outgoing),
    /// A publish the outlet had no room for, ready to go again.
    Injected(Injected),
    Ack(Publish),
}

pub(crate) struct Core {
    cfg: QueueConfig,
    prefix: String,
    client: AsyncClient,
    /// Beside the embedded broker: the way out that skips MQTT (see
    /// [`super::outlet`]); publishes go through `client` without it.
    outlet: Option<OutletTx>,
    queues: HashMap<String, Queue>,
    /// Task bodies in memory; the rest are read from `store`.
    cache: Cache,
    store: Arc<Store>,
    reads_tx: mpsc::Sender<ReadDone>,
    next_seq: u64,
    fx: Effects,
    committing: Vec<After>,
    writer_busy: bool,
    /// When the totals were last handed to the store (ms).
    counters_written_at: u64,
    /// Since when deletes alone wait for a commit (ms).
    deletes_since: Option<u64>,
    writer_tx: Option<std::sync::mpsc::SyncSender<Vec<Op>>>,
    outbox: VecDeque<Out>,
    wake: HashSet<String>,
    last_stats: HashMap<String, u64>,
    /// Acks, fails, progress and releases ignored because their sender
    /// does not hold the task.
    foreign_task_refs: u64,
    /// The broker node last connected to offers shared subscriptions.
    shared_available: bool,
    /// What `/metrics` reads (see [`super::metrics`]), each queue's cells,
    /// and when they were last brought up to date (ms).
    metrics: Arc<QueueMetrics>,
    cells: HashMap<String, Arc<QueueCells>>,
    metrics_synced_at: u64,
}

pub(crate) async fn run(
    cfg: QueueConfig,
    store: Store,
    loaded: Loaded,
    shutdown: oneshot::Receiver<()>,
    tap: Option<TapRx>,
    metrics: Arc<QueueMetrics>,
) -> Result<(), QueueError> {
    let client_id = cfg
        .client_id
        .clone()
        .unwrap_or_else(|| axion_wire::ids::queue_owner_client(&cfg.package));
    let failover = Failover::new(
        cfg.mqtt.clone(),
        Reconnect::new(Duration::from_millis(100), Duration::from_secs(5)),
    );
    let mut opts = options_v5(failover.current(), &client_id);
    // By hand only when an enqueue's PUBACK waits for its commit.
    opts.set_manual_acks(cfg.ack_after_commit);
    opts.set_max_packet_size(Some(cfg.max_packet_size));
    opts.set_receive_maximum(Some(1000));
    // A persistent session lets an external broker keep enqueues for the
    // owner while it restarts; unacknowledged ones come back after a crash.
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(cfg.session_expiry_secs));
    let (client, eventloop) = AsyncClient::new(opts, REQUEST_CAPACITY);

    let (in_tx, mut in_rx) = mpsc::channel(INBOUND_CAPACITY);
    let subs = subscriptions(&cfg.package, tap.is_some());
    let (mut tap_rx, outlet) = match tap {
        // The outlet feeds the session of one client id: this one's, unless
        // configured otherwise.
        Some(t) => {
            let ours = t.outlet.client_id() == client_id;
            (Some(t.rx), ours.then_some(t.outlet))
        }
        None => (None, None),
    };
    let announce = topics::announce(&cfg.package);
    let mqtt = tokio::spawn(mqtt_loop(
        eventloop,
        failover,
        client.clone(),
        in_tx,
        subs,
        announce,
    ));

    let store = Arc::new(store);
    let (writer_tx, writer_rx) = std::sync::mpsc::sync_channel::<Vec<Op>>(1);
    let (done_tx, mut done_rx) = mpsc::channel::<Result<(), StoreError>>(2);
    let (reads_tx, mut reads_rx) = mpsc::channel::<ReadDone>(READS_CAPACITY);
    let writer_store = store.clone();
    let writer = std::thread::Builder::new()
        .name("axion-queue-store".into())
        .spawn(move || {
            while let Ok(batch) = writer_rx.recv() {
                let started = std::time::Instant::now();
                let result = writer_store.commit(&batch);
                let took = started.elapsed();
                // Every task in the batch waits this long to be confirmed
                // or delivered: a slow disk shows here first.
                if took >= SLOW_COMMIT {
                    tracing::warn!(
                        ms = took.as_millis() as u64,
                        ops = batch.len(),
                        "slow queue store commit"
                    );
                }
                if let Err(err) = &result {
                    tracing::error!(error = %err, ops = batch.len(), "queue store commit failed");
                }
                if done_tx.blocking_send(result).is_err() {
                    break;
                }
            }
        })
        .map_err(QueueError::Thread)?;

    let mut core = Core::new(
        cfg,
        client.clone(),
        outlet,
        loaded,
        store,
        writer_tx,
        reads_tx,
    );
    core.metrics = metrics;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shutdown = shutdown;
    let result = loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break Ok(()),
            done = done_rx.recv() => match done {
                Some(Ok(())) => core.committed(),
                Some(Err(err)) => break Err(QueueError::Store(err)),
                None => break Err(QueueError::StoreThread),
            },
            read = reads_rx.recv() => match read {
                Some((read, Ok(bodies))) => core.read_done(read, bodies),
                Some((_, Err(err))) => break Err(QueueError::Store(err)),
                // The core holds a sender: never.
                None => break Err(QueueError::StoreThread),
            },
            inbound = in_rx.recv() => {
                let Some(first) = inbound else { break Err(QueueError::MqttLoop) };
                core.inbound(first);
                take_waiting(&mut in_rx, |more| core.inbound(more));
            }
            Some(first) = recv_tap(&mut tap_rx) => {
                core.inbound(Inbound::Tapped(first));
                if let Some(rx) = tap_rx.as_mut() {
                    take_waiting(rx, |more| core.inbound(Inbound::Tapped(more)));
                }
            }
            _ = tick.tick() => core.on_tick(),
        }
        core.settle();
    };

    // Finish the commit under way and the batch collected since, so nothing
    // accepted is left unconfirmed, then publish final stats.
    if result.is_ok() {
        core.drain_store(&mut done_rx).await;
        core.publish_all_stats();
        core.flush_outbox();
    }
    let now = now_ms();
    for q in core.queues.values_mut() {
        q.report_refusals(now, true);
    }
    core.writer_tx = None;
    drop(in_rx);
    let _ = client.try_disconnect();
    if tokio::time::timeout(Duration::from_secs(2), mqtt)
        .await
        .is_err()
    {
        tracing::warn!("queue owner's MQTT loop did not stop in time");
    }
    if tokio::task::spawn_blocking(move || writer.join())
        .await
        .is_err()
    {
        tracing::warn!("queue store thread did not stop cleanly");
    }
    tracing::info!("queue owner stopped");
    result
}

/// Hands `each` what is already waiting in `rx` (a channel's worth at
/// most), so that one commit covers it all.
fn take_waiting<T>(rx: &mut mpsc::Receiver<T>, mut each: impl FnMut(T)) {
    for _ in 0..INBOUND_CAPACITY {
        match rx.try_recv() {
            Ok(more) => each(more),
            Err(_) => break,
        }
    }
}

/// The next copy from the tap; never, without one.
async fn recv_tap(
    tap: &mut Option<mpsc::Receiver<super::tap::Copied>>,
) -> Option<super::tap::Copied> {
    match tap {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// What the owner subscribes to: its queues' inbound topics and the list
/// request, unless a tap brings them, and every heartbeat of its package
/// (workers that go).
fn subscriptions(package: &str, tapped: bool) -> Vec<String> {
    let mut subs: Vec<String> = if tapped {
        Vec::new()
    } else {
        LEAVES
            .iter()
            .map(|leaf| topics::queue(package, "+", leaf))
            .chain([topics::queues_list(package)])
            .collect()
    };
    subs.push(format!("axion/{package}/heartbeat/+/+"));
    subs
}

async fn mqtt_loop(
    mut eventloop: EventLoop,
    mut failover: Failover,
    client: AsyncClient,
    tx: mpsc::Sender<Inbound>,
    subs: Vec<String>,
    announce: String,
) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                let shared = ack
                    .properties
                    .as_ref()
                    .and_then(|p| p.shared_subscription_available)
                    != Some(0);
                tracing::info!(
                    broker = %failover.current(),
                    session_present = ack.session_present,
                    shared_subscriptions = shared,
                    "queue owner connected to the broker"
                );
                failover.connected();
                let client = client.clone();
                let subs = subs.clone();
                let announce = announce.clone();
                // Subscribing awaits the request channel, which only this
                // loop drains: do it on another task.
                tokio::spawn(async move {
                    let filters = subs
                        .into_iter()
                        .map(|s| rumqttc::v5::mqttbytes::v5::Filter::new(s, QoS::AtLeastOnce));
                    if let Err(err) = client.subscribe_many(filters).await {
                        tracing::error!(error = %err, "queue owner could not subscribe");
                        return;
                    }
                    // Workers answer with their free credit (`reset`), which
                    // this owner may have lost in a restart.
                    if let Err(err) = client
                        .publish(announce, QoS::AtLeastOnce, false, "{}")
                        .await
                    {
                        tracing::warn!(error = %err, "queue owner could not ask workers to re-announce");
                    }
                });
                if tx.send(Inbound::Connected { shared }).await.is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if tx.send(Inbound::Publish(Box::new(publish))).await.is_err() {
                    return;
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(err) => {
                if tx.is_closed() {
                    return;
                }
                let broker = failover.current().to_string();
                let wait = failover.after_failure(&mut eventloop, &err);
                tracing::warn!(broker, error = %err, retry_in_ms = wait.as_millis() as u64, "queue owner lost the broker; reconnecting");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

impl Core {
    fn new(
        cfg: QueueConfig,
        client: AsyncClient,
        outlet: Option<OutletTx>,
        loaded: Loaded,
        store: Arc<Store>,
        writer_tx: std::sync::mpsc::SyncSender<Vec<Op>>,
        reads_tx: mpsc::Sender<ReadDone>,
    ) -> Self {
        let mut core = Self {
            prefix: format!("axion/{}/", cfg.package),
            cache: Cache::new(cfg.cache_bytes),
            cfg,
            client,
            outlet,
            queues: HashMap::new(),
            store,
            reads_tx,
            next_seq: 1,
            fx: Effects::default(),
            committing: Vec::new(),
            writer_busy: false,
            counters_written_at: 0,
            deletes_since: None,
            writer_tx: Some(writer_tx),
            outbox: VecDeque::new(),
            wake: HashSet::new(),
            foreign_task_refs: 0,
            shared_available: true,
            last_stats: HashMap::new(),
            // Replaced by the owner's before any queue is metered.
            metrics: Arc::default(),
            cells: HashMap::new(),
            metrics_synced_at: 0,
        };
        let now = now_ms();
        let Loaded {
            tasks,
            dead,
            counters,
        } = loaded;
        for (queue, counters) in counters {
            core.queue_with(&queue, counters);
        }
        let (mut live, mut dead_n) = (0usize, 0usize);
        for (queue, id, stored) in tasks {
            core.next_seq = core.next_seq.max(stored.seq + 1);
            core.queue(&queue).restore(id, stored, now);
            live += 1;
        }
        for (queue, id, stored) in dead {
            core.next_seq = core.next_seq.max(stored.seq + 1);
            core.queue(&queue).restore_dead(id, stored);
            dead_n += 1;
        }
        tracing::info!(
            queues = core.queues.len(),
            live,
            dead = dead_n,
            "queue store loaded"
        );
        core
    }

    /// Every task goes on its worker's own topic: configured so, or the
    /// broker has no shared subscriptions for the shared topic.
    fn all_directed(&self) -> bool {
        self.cfg.directed_delivery || !self.shared_available
    }

    fn limits(&self, queue: &str) -> Limits {
        let (max_depth, max_bytes) = self.cfg.limits_for(queue);
        Limits {
            ack_wait: self.cfg.ack_wait_for(queue),
            default_max_attempts: self.cfg.max_attempts,
            retry_base: self.cfg.retry_backoff,
            retry_max: self.cfg.retry_backoff_max,
            max_depth,
            max_bytes,
        }
    }

    fn queue_with(&mut self, name: &str, counters: super::store::Counters) -> &mut Queue {
        let limits = self.limits(name);
        let package = self.cfg.package.clone();
        self.queues
            .entry(name.to_string())
            .or_insert_with(|| Queue::new(&package, name, limits, counters))
    }

    /// Creates the queue if it is new; on the hot path (it exists) without
    /// allocating.
    fn ensure_queue(&mut self, name: &str) {
        if !self.queues.contains_key(name) {
            self.queue(name);
        }
    }

    /// Marks a queue as having work to dispatch.
    fn wake(&mut self, name: &str) {
        if !self.wake.contains(name) {
            self.wake.insert(name.to_string());
        }
    }

    fn queue(&mut self, name: &str) -> &mut Queue {
        self.queue_with(name, Default::default())
    }

    fn inbound(&mut self, inbound: Inbound) {
        match inbound {
            Inbound::Connected { shared } => {
                if self.shared_available != shared {
                    tracing::info!(
                        shared_subscriptions = shared,
                        directed_delivery = self.cfg.directed_delivery || !shared,
                        "the broker's shared subscriptions changed; task delivery follows"
                    );
                }
                self.shared_available = shared;
                // The embedded broker keeps nothing retained across its own
                // restart: publish stats again.
                self.last_stats.clear();
                for q in self.queues.values_mut() {
                    q.changed = true;
                }
            }
            Inbound::Publish(publish) => self.publish_in(publish, None, None),
            Inbound::Tapped(super::tap::Copied { publish, verdict }) => {
                let property = |key: &str| {
                    publish.properties.as_ref().and_then(|p| {
                        p.user_properties
                            .iter()
                            .rev()
                            .find(|(k, _)| k == key)
                            .map(|(_, v)| v.clone())
                    })
                };
                let sender = property(super::tap::SENDER).map(|client_id| Sender {
                    client_id,
                    received: property(super::tap::RECEIVED).is_some(),
                });
                self.publish_in(publish, sender, verdict);
            }
        }
    }

    fn publish_in(
        &mut self,
        publish: Box<Publish>,
        sender: Option<Sender>,
        verdict: Option<super::tap::Verdict>,
    ) {
        self.on_publish(&publish, sender.as_ref(), verdict);
        if !self.cfg.ack_after_commit {
            return;
        }
        let wait = publish.topic.ends_with(b"/enqueue");
        let ack = Publish {
            payload: Bytes::new(),
            properties: None,
            ..*publish
        };
        if wait {
            self.fx.after.push(After::Ack(ack));
        } else {
            self.outbox.push_back(Out::Ack(ack));
        }
    }

    /// `sender`: the client id of the session that sent it, when the
    /// embedded broker says so (see [`super::tap::SENDER`]); `verdict`:
    /// where a refused enqueue's reason goes for its PUBACK.
    fn on_publish(
        &mut self,
        publish: &Publish,
        sender: Option<&Sender>,
        verdict: Option<super::tap::Verdict>,
    ) {
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return;
        };
        let Some(rest) = topic.strip_prefix(self.prefix.as_str()) else {
            return;
        };
        let mut parts = rest.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("queue"), Some(queue), Some(leaf), None) if !queue.is_empty() => {
                let body = &publish.payload;
                let now = now_ms();
                match leaf {
                    "enqueue" => self.on_enqueue(queue, publish, now, verdict),
                    "ready" => match serde_json::from_slice::<Ready>(body) {
                        Ok(mut ready) => {
                            // Credit is the sender's, whatever the body claims.
                            if let Some(sender) = sender {
                                ready.worker = sender.client_id.clone();
                            }
                            let directed = ready.directed || self.all_directed();
                            if directed {
                                if let Err(err) = topics::validate_level("worker", &ready.worker) {
                                    // Its own topic cannot be built: no
                                    // credit, rather than tasks lost on a
                                    // topic nobody reads.
                                    tracing::warn!(queue, error = %err, "credit ignored: a worker taking directed delivery needs an id that is one topic level");
                                    return;
                                }
                            }
                            self.ensure_queue(queue);
                            if let Some(q) = self.queues.get_mut(queue) {
                                q.ready(&ready.worker, ready.credits, ready.reset, ready.directed);
                            }
                            self.wake(queue);
                        }
                        Err(err) => bad_body(topic, &err),
                    },
                    "ack" | "fail" | "progress" | "release" => {
                        match serde_json::from_slice::<TaskRef>(body) {
                            Ok(r) => self.on_task_ref(queue, leaf, r, now, sender),
                            Err(err) => bad_body(topic, &err),
                        }
                    }
                    "cmd" => self.on_command(queue, publish),
                    _ => {}
                }
            }
            (Some("heartbeat"), Some(service), Some(instance), None) => {
                self.on_heartbeat(service, instance, &publish.payload);
            }
            (Some("queues"), Some("cmd"), Some("list"), None) => self.on_list(publish),
            _ => {}
        }
    }

    /// Topics a reply may never go to: the package's queue, queues,
    /// heartbeat, alarm and command trees, and `$` topics. (Beside the embedded
    /// broker the requester's own publish rights are checked as well.)
    fn reserved_reply(&self, topic: &str) -> bool {
        if topic.starts_with('$') {
            return true;
        }
        let Some(rest) = topic.strip_prefix(self.prefix.as_str()) else {
            return false;
        };
        ["queue/", "queues/", "heartbeat/", "alarm/", "cmd/"]
            .iter()
            .any(|tree| rest.starts_with(tree))
    }

    fn reply(&mut self, publish: &Publish, fallback: Option<String>, body: Vec<u8>) {
        if let Some(to) = self.reply_to(publish, fallback) {
            self.send_reply(to, body);
        }
    }

    /// Where the answer to `publish` goes, if anywhere it may.
    fn reply_to(&self, publish: &Publish, fallback: Option<String>) -> Option<ReplyTo> {
        let props = publish.properties.as_ref();
        let topic = props.and_then(|p| p.response_topic.clone()).or(fallback)?;
        if self.reserved_reply(&topic) {
            // The owner writes with its own rights: never onto the topics
            // that steer Axion itself, whoever asks.
            tracing::warn!(
                topic,
                "reply refused: a reply topic may not be one of Axion's own (queue, queues, heartbeat, alarm, cmd)"
            );
            return None;
        }
        if !publishable(&topic) {
            // Queued, it would hold up every message behind it: the MQTT
            // client refuses it and the outbox keeps it at its head.
            tracing::warn!(
                topic,
                "reply dropped: a message cannot be published to this topic"
            );
            return None;
        }
        Some(ReplyTo {
            topic,
            correlation: props.and_then(|p| p.correlation_data.clone()),
        })
    }

    /// Sent once what was accepted so far is on disk.
    fn send_reply(&mut self, to: ReplyTo, body: Vec<u8>) {
        self.fx.after.push(After::Publish(Outgoing {
            topic: to.topic,
            payload: Bytes::from(body),
            retain: false,
            correlation: to.correlation,
        }));
    }

    fn on_enqueue(
        &mut self,
        queue: &str,
        publish: &Publish,
        now: u64,
        verdict: Option<super::tap::Verdict>,
    ) {
        let request = match serde_json::from_slice::<TaskRequest>(&publish.payload) {
            Ok(r) => r,
            Err(err) => {
                bad_body(queue, &err);
                let body = serde_json::json!({ "error": format!("invalid task request: {err}") });
                self.reply(publish, None, body.to_string().into_bytes());
                return;
            }
        };
        if request.id.as_deref() == Some("") || request.max_attempts == Some(0) {
            let body = serde_json::json!({ "error": "id must not be empty and maxAttempts must be at least 1" });
            self.reply(publish, None, body.to_string().into_bytes());
            return;
        }
        // Time-ordered ids (UUID v7) keep the store's inserts and deletes on
        // a few B-tree pages per commit instead of one random page each.
        let id = request
            .id
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        self.ensure_queue(queue);
        let duplicate = self.queues.get(queue).is_some_and(|q| q.contains(&id));
        if !duplicate {
            let Some(q) = self.queues.get_mut(queue) else {
                return;
            };
            let body = Body {
                payload: request.payload,
                reply_to: request.reply_to,
                correlation_id: request.correlation_id,
            };
            let size = body.size();
            if let Err(refused) = q.admit(size, now) {
                if let Some(verdict) = verdict {
                    // The producer's session may have given up waiting.
                    let _ = verdict.send(refused.message(queue));
                }
                // Nothing is taken: the producer hears why, at once.
                let body = serde_json::json!({
                    "error": refused.message(queue),
                    "id": id,
                    "queue": queue,
                    "limit": refused.limit.name(),
                    "depth": refused.depth,
                    "max_depth": refused.max_depth,
                    "bytes": refused.bytes,
                    "max_bytes": refused.max_bytes,
                });
                self.reply(publish, None, body.to_string().into_bytes());
                return;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            let mut task = q.new_task(seq, size, now);
            if let Some(max) = request.max_attempts {
                task.max_attempts = max;
            }
            if let Some(delay) = request.delay_ms.filter(|d| *d > 0) {
                task.not_before = now + delay;
            }
            q.enqueue(id.clone(), task, Arc::new(body), &mut self.cache, now);
            self.wake(queue);
        }
        let confirm = Enqueued {
            id,
            queue: queue.to_string(),
            duplicate,
        };
        if let Ok(body) = serde_json::to_vec(&confirm) {
            self.reply(publish, None, body);
        }
    }

    fn on_task_ref(
        &mut self,
        queue: &str,
        leaf: &str,
        mut r: TaskRef,
        now: u64,
        sender: Option<&Sender>,
    ) {
        let Some(q) = self.queues.get_mut(queue) else {
            return;
        };
        if let Some(sender) = sender {
            // Only the worker that holds a task may finish or extend it;
            // the broker, not the body, says who is asking. Any client may
            // hand a task back (`release`): a shared subscription can
            // deliver a task to a member other than the one whose credit
            // it used, and that member gives it back; a release only puts
            // the task up again, with its attempt restored. A member the
            // task was delivered to may also claim it (the broker vouches
            // for that delivery).
            let giving_back = leaf == "release" || (leaf == "fail" && r.release);
            let sender_id = sender.client_id.as_str();
            if let Some(holder) = r.id.as_deref().and_then(|id| q.holder(id)) {
                if holder != sender_id && !giving_back && !sender.received {
                    self.foreign_task_refs += 1;
                    tracing::warn!(
                        queue,
                        leaf,
                        id = r.id.as_deref().unwrap_or(""),
                        holder,
                        sender = sender_id,
                        refused_total = self.foreign_task_refs,
                        "task message from a client that does not hold the task; ignored"
                    );
                    return;
                }
            }
            r.worker = Some(sender_id.to_string());
        }
        match (leaf, r.id.as_deref()) {
            ("ack", Some(id)) => {
                q.classify_ack(id, r.worker.as_deref(), now);
                if let Some(enqueued_at) = q.ack(id, &mut self.cache) {
                    cells(&mut self.cells, &self.metrics, queue)
                        .observe_latency(now.saturating_sub(enqueued_at));
                }
            }
            ("fail", Some(id)) if r.release => q.release(id, r.worker.as_deref()),
            ("fail", Some(id)) => q.fail(
                id,
                r.reason,
                r.retry_after_ms,
                now,
                &mut self.cache,
                &mut self.fx,
            ),
            ("progress", Some(id)) => q.progress(id, r.worker.as_deref(), now),
            ("release", Some(id)) => q.release(id, r.worker.as_deref()),
            ("release", None) => {
                if let Some(worker) = r.worker.as_deref() {
                    let n = q.worker_gone(worker, now, &mut self.cache, &mut self.fx);
                    tracing::info!(queue, worker, redelivered = n, "worker released its tasks");
                }
            }
            _ => tracing::debug!(queue, leaf, "task message without an id"),
        }
        self.wake(queue);
    }

    /// A heartbeat that says `offline` (or was deleted) means that instance's
    /// tasks go to other workers now. Worker ids that match an instance:
    /// `<service>/<host>:<port>`, and the heartbeat's `worker`/`client_id`.
    fn on_heartbeat(&mut self, service: &str, instance: &str, payload: &[u8]) {
        let mut ids = vec![format!("{service}/{instance}")];
        if !payload.is_empty() {
            let Ok(hb) = serde_json::from_slice::<serde_json::Value>(payload) else {
                return;
            };
            if hb.get("status").and_then(|s| s.as_str()) != Some("offline") {
                return;
            }
            for key in ["worker", "client_id"] {
                if let Some(id) = hb.get(key).and_then(|v| v.as_str()) {
                    ids.push(id.to_string());
                }
            }
        }
        let now = now_ms();
        for q in self.queues.values_mut() {
            for id in &ids {
                let n = q.worker_gone(id, now, &mut self.cache, &mut self.fx);
                if n > 0 {
                    tracing::info!(queue = %q.name, worker = %id, redelivered = n, "worker offline; its tasks go to others");
                }
            }
            self.wake.insert(q.name.clone());
        }
    }

    fn on_command(&mut self, queue: &str, publish: &Publish) {
        let request = match serde_json::from_slice::<CommandRequest>(&publish.payload) {
            Ok(r) => r,
            Err(err) => {
                let reply = CommandReply::error(format!("invalid command: {err}"));
                let body = serde_json::to_vec(&reply).unwrap_or_default();
                self.reply(publish, None, body);
                return;
            }
        };
        let now = now_ms();
        // Tasks listed in the reply, with their seqs: their payloads are
        // filled in from their bodies.
        let mut views = Vec::new();
        let reply = match self.queues.get_mut(queue) {
            None => CommandReply::error(format!("no queue named {queue:?}")),
            Some(q) => match request.command {
                Command::Show { limit } => {
                    let (workers, tasks) = q.show(limit);
                    views = tasks;
                    CommandReply {
                        ok: true,
                        stats: Some(q.stats(now)),
                        ack_wait_ms: Some(q.ack_wait().as_millis() as u64),
                        workers,
                        ..CommandReply::default()
                    }
                }
                Command::Dead { limit } => {
                    views = q.dead_list(limit);
                    CommandReply {
                        ok: true,
                        ..CommandReply::default()
                    }
                }
                Command::Retry { id, all } => {
                    if id.is_none() && !all {
                        CommandReply::error("retry needs an id or all")
                    } else {
                        let n = q.retry_dead(id.as_deref(), &mut self.fx);
                        self.wake.insert(queue.to_string());
                        CommandReply {
                            ok: true,
                            count: Some(n),
                            ..CommandReply::default()
                        }
                    }
                }
                Command::Purge => {
                    let n = q.purge(&mut self.cache, &mut self.fx);
                    tracing::warn!(queue, removed = n, "queue purged");
                    CommandReply {
                        ok: true,
                        count: Some(n),
                        ..CommandReply::default()
                    }
                }
            },
        };
        let Some(to) = self.reply_to(publish, request.reply_to) else {
            return;
        };
        self.reply_with_payloads(queue, to, reply, views);
    }

    /// Answers `axion queue ls`: every queue's stats as they are now, which
    /// a reader on another node of a cluster may not see retained.
    fn on_list(&mut self, publish: &Publish) {
        // An empty body is a request with nothing to add.
        let request = if publish.payload.is_empty() {
            Ok(ListRequest::default())
        } else {
            serde_json::from_slice::<ListRequest>(&publish.payload)
        };
        let (reply, fallback) = match request {
            Ok(request) => {
                let now = now_ms();
                let mut queues: Vec<_> = self.queues.values_mut().map(|q| q.stats(now)).collect();
                queues.sort_by(|a, b| a.queue.cmp(&b.queue));
                let reply = CommandReply {
                    ok: true,
                    queues,
                    ..CommandReply::default()
                };
                (reply, request.reply_to)
            }
            Err(err) => (
                CommandReply::error(format!("invalid list request: {err}")),
                None,
            ),
        };
        let Some(to) = self.reply_to(publish, fallback) else {
            return;
        };
        let body = serde_json::to_vec(&reply).unwrap_or_default();
        self.send_reply(to, body);
    }

    /// Sends `reply` with `views` as its tasks, once their payloads are
    /// filled in: from the cache, or from the store.
    fn reply_with_payloads(
        &mut self,
        queue: &str,
        to: ReplyTo,
        mut reply: CommandReply,
        views: Vec<(u64, TaskView)>,
    ) {
        let mut bodies = Vec::with_capacity(views.len());
        let mut missing = Vec::new();
        for (seq, view) in views {
            let body = self.cache.get(seq);
            if body.is_none() {
                missing.push(seq);
            }
            bodies.push((seq, body));
            reply.tasks.push(view);
        }
        if missing.is_empty() {
            self.finish_reply(to, reply, bodies, HashMap::new());
            return;
        }
        missing.sort_unstable();
        self.start_read(Read {
            queue: queue.to_string(),
            seqs: missing,
            purpose: Purpose::Reply {
                to,
                reply: Box::new(reply),
                bodies,
            },
        });
    }

    fn finish_reply(
        &mut self,
        to: ReplyTo,
        mut reply: CommandReply,
        bodies: Vec<(u64, Option<Arc<Body>>)>,
        read: HashMap<u64, Body>,
    ) {
        for (view, (seq, cached)) in reply.tasks.iter_mut().zip(bodies) {
            let payload = match (&cached, read.get(&seq)) {
                (Some(body), _) => &body.payload,
                (None, Some(body)) => &body.payload,
                // Gone from the store since it was listed.
                (None, None) => continue,
            };
            view.payload = payload.clone();
        }
        let body = serde_json::to_vec(&reply).unwrap_or_default();
        self.send_reply(to, body);
    }

    /// Reads `read.seqs` on the blocking pool; [`Core::read_done`] gets
    /// the bodies.
    fn start_read(&mut self, read: Read) {
        let store = self.store.clone();
        let done = self.reads_tx.clone();
        tokio::task::spawn_blocking(move || {
            let result = store.read_bodies(&read.seqs);
            // The core only goes away when the owner stops.
            let _ = done.blocking_send((read, result));
        });
    }

    fn read_done(&mut self, read: Read, bodies: Vec<Option<Body>>) {
        let Read {
            queue,
            seqs,
            purpose,
        } = read;
        match purpose {
            Purpose::Dispatch(ids) => {
                let Some(q) = self.queues.get_mut(&queue) else {
                    return;
                };
                q.reading = false;
                for ((seq, id), body) in seqs.into_iter().zip(ids).zip(bodies) {
                    // Only for tasks still waiting, as they were.
                    if q.waiting_seq(&id) != Some(seq) {
                        continue;
                    }
                    match body {
                        Some(body) => self.cache.insert_read(seq, body),
                        None if !self.cache.contains(seq) => {
                            // Every body is committed with its task's first
                            // record and deleted with its last: the store
                            // lost this one. Nobody could ever run the task.
                            tracing::error!(queue, id, seq, "a waiting task's body is missing from the queue store; dead-lettering it");
                            let reason = "its body is missing from the queue store".to_string();
                            q.dead_letter(&id, reason, &mut self.cache, &mut self.fx);
                        }
                        None => {}
                    }
                }
                self.wake(&queue);
            }
            Purpose::Dead(notices) => {
                for (notice, body) in notices.iter().zip(bodies) {
                    if let Some(bytes) = notice.encode(body.as_ref()) {
                        let out = Outgoing::plain(notice.topic.clone(), bytes);
                        self.outbox.push_back(Out::Publish(out));
                    }
                }
            }
            Purpose::Reply {
                to,
                reply,
                bodies: cached,
            } => {
                let read = seqs
                    .into_iter()
                    .zip(bodies)
                    .filter_map(|(seq, body)| Some((seq, body?)))
                    .collect();
                self.finish_reply(to, *reply, cached, read);
            }
        }
    }

    /// Asks the store for the bodies the core waits on: the head of each
    /// queue in `reads` (see [`head_read`]), and dead letters to announce.
    fn read_missing(&mut self, mut reads: Vec<Read>) {
        let mut dead: HashMap<String, Vec<DeadNotice>> = HashMap::new();
        for notice in self.fx.unread_dead.drain(..) {
            dead.entry(notice.queue.clone()).or_default().push(notice);
        }
        for (queue, notices) in dead {
            reads.push(Read {
                queue,
                seqs: notices.iter().map(|n| n.stored.seq).collect(),
                purpose: Purpose::Dead(notices),
            });
        }
        for read in reads {
            self.start_read(read);
        }
    }

    fn on_tick(&mut self) {
        let now = now_ms();
        if now >= self.metrics_synced_at + SYNC_EVERY_MS {
            self.metrics_synced_at = now;
            for q in self.queues.values() {
                cells(&mut self.cells, &self.metrics, &q.name).set(q.figures());
            }
        }
        for q in self.queues.values_mut() {
            q.on_time(now, &mut self.cache, &mut self.fx);
            q.report_refusals(now, false);
            if q.has_work() {
                self.wake.insert(q.name.clone());
            }
        }
        let due: Vec<String> = self
            .queues
            .values()
            .filter(|q| {
                let last = self.last_stats.get(&q.name).copied();
                match last {
                    None => true,
                    Some(at) => {
                        let age = now.saturating_sub(at);
                        (q.changed && age >= STATS_EVERY_MS)
                            || (q.busy() && age >= STATS_REFRESH_MS)
                    }
                }
            })
            .map(|q| q.name.clone())
            .collect();
        for name in due {
            self.publish_stats(&name, now);
        }
    }

    fn publish_stats(&mut self, name: &str, now: u64) {
        let Some(q) = self.queues.get_mut(name) else {
            return;
        };
        let stats = q.stats(now);
        q.changed = false;
        let topic = q.stats_topic();
        if let Ok(body) = serde_json::to_vec(&stats) {
            let out = Outgoing {
                topic,
                payload: Bytes::from(body),
                retain: true,
                correlation: None,
            };
            self.outbox.push_back(Out::Publish(out));
        }
        self.last_stats.insert(name.to_string(), now);
    }

    fn publish_all_stats(&mut self) {
        let now = now_ms();
        let names: Vec<String> = self.queues.keys().cloned().collect();
        for name in names {
            self.publish_stats(&name, now);
        }
    }

    /// Called after every event: deliver, commit, publish.
    fn settle(&mut self) {
        let now = now_ms();
        let mut reads = Vec::new();
        let all_directed = self.all_directed();
        if self.outbox.len() < OUTBOX_HIGH {
            let window = (self.cfg.cache_bytes / 4).max(1);
            let wake: Vec<String> = self.wake.drain().collect();
            for name in wake {
                if let Some(q) = self.queues.get_mut(&name) {
                    q.dispatch(
                        now,
                        DISPATCH_BUDGET,
                        all_directed,
                        &mut self.cache,
                        &mut self.fx,
                    );
                    reads.extend(head_read(q, &self.cache, window));
                    if q.has_work() {
                        self.wake.insert(name);
                    }
                }
            }
        }
        self.read_missing(reads);
        for out in self.fx.now.drain(..) {
            self.outbox.push_back(Out::Publish(out));
        }
        if !self.writer_busy {
            self.start_commit(now, false);
        }
        // Bodies read for this round's deliveries were used; the cache
        // goes back within its bound.
        self.cache.trim();
        self.flush_outbox();
    }

    /// Hands the store thread everything that changed since the last
    /// commit. With nothing to write, what waited for a commit goes at
    /// once: each task it confirms is on disk already, or was finished
    /// before it got there.
    ///
    /// Only new or changed task records start a commit at once. Deletes of
    /// finished tasks ride along with them, or go alone after
    /// [`DELETE_LINGER_MS`]: at a moderate rate acks then cost no commit of
    /// their own, and a crash in between only runs a finished task again.
    /// The totals alone are written at most once a second, or with `all`
    /// (at shutdown): they are figures, not promises.
    fn start_commit(&mut self, now: u64, all: bool) {
        let mut ops = std::mem::take(&mut self.fx.ops);
        let urgent = all || !ops.is_empty() || self.queues.values().any(Queue::has_puts);
        let deletes = self.queues.values().any(Queue::has_deletes);
        let linger_over = match self.deletes_since {
            Some(since) => now >= since + DELETE_LINGER_MS,
            None => {
                if deletes {
                    self.deletes_since = Some(now);
                }
                false
            }
        };
        if urgent || (deletes && linger_over) {
            for q in self.queues.values_mut() {
                q.take_ops(&mut ops);
            }
            self.cache.take_writes(&mut ops);
            self.deletes_since = None;
        }
        if !ops.is_empty() || all || now >= self.counters_written_at + COUNTERS_EVERY_MS {
            for q in self.queues.values_mut() {
                q.take_counters(&mut ops);
            }
            self.counters_written_at = now;
        }
        if ops.is_empty() {
            let after = std::mem::take(&mut self.fx.after);
            self.run_after(after);
            return;
        }
        let Some(tx) = &self.writer_tx else {
            self.fx.ops = ops;
            return;
        };
        match tx.send(ops) {
            Ok(()) => {
                self.writer_busy = true;
                self.committing = std::mem::take(&mut self.fx.after);
            }
            Err(err) => {
                tracing::error!("queue store thread is gone");
                self.fx.ops = err.0;
            }
        }
    }

    fn committed(&mut self) {
        self.writer_busy = false;
        self.cache.committed();
        let after = std::mem::take(&mut self.committing);
        self.run_after(after);
    }

    fn run_after(&mut self, after: Vec<After>) {
        for item in after {
            match item {
                After::Publish(out) => self.outbox.push_back(Out::Publish(out)),
                After::Ack(publish) => self.outbox.push_back(Out::Ack(publish)),
            }
        }
    }

    async fn drain_store(&mut self, done_rx: &mut mpsc::Receiver<Result<(), StoreError>>) {
        // The commit under way, then one with everything since.
        for last in [false, true] {
            if self.writer_busy {
                match done_rx.recv().await {
                    Some(Ok(())) => self.committed(),
                    Some(Err(err)) => {
                        tracing::error!(error = %err, "final queue store commit failed");
                        return;
                    }
                    None => return,
                }
            }
            if !last {
                self.start_commit(now_ms(), true);
            }
        }
    }

    fn flush_outbox(&mut self) {
        while let Some(out) = self.outbox.pop_front() {
            if let Some(out) = self.send(out) {
                self.outbox.push_front(out);
                break;
            }
        }
    }

    /// Hands one message to the outlet or the MQTT client without waiting;
    /// gives it back if neither has room.
    fn send(&mut self, out: Out) -> Option<Out> {
        let outgoing = match (out, self.outlet.is_some()) {
            (Out::Ack(publish), _) => {
                return self
                    .client
                    .try_ack(&publish)
                    .err()
                    .map(|_| Out::Ack(publish));
            }
            (Out::Publish(o), true) => return self.inject(injected(o)),
            (Out::Injected(i), true) => return self.inject(i),
            (Out::Publish(o), false) => o,
            (Out::Injected(i), false) => outgoing(i),
        };
        let o = &outgoing;
        let sent = match &o.correlation {
            Some(corr) => {
                let properties = PublishProperties {
                    correlation_data: Some(corr.clone()),
                    ..PublishProperties::default()
                };
                self.client.try_publish_with_properties(
                    o.topic.clone(),
                    QoS::AtLeastOnce,
                    o.retain,
                    o.payload.clone(),
                    properties,
                )
            }
            None => self.client.try_publish(
                o.topic.clone(),
                QoS::AtLeastOnce,
                o.retain,
                o.payload.clone(),
            ),
        };
        sent.err().map(|_| Out::Publish(outgoing))
    }

    /// [`Core::send`] through the outlet.
    fn inject(&mut self, publish: Injected) -> Option<Out> {
        let Some(outlet) = &self.outlet else {
            return Some(Out::Injected(publish));
        };
        match outlet.try_send(publish) {
            Ok(()) => None,
            Err(Refused::Full(publish)) => Some(Out::Injected(publish)),
            Err(Refused::Closed(publish)) => {
                // The embedded broker has stopped; the MQTT client reports
                // that connection's fate from here on.
                tracing::warn!("the broker's outlet closed; publishing over MQTT");
                self.outlet = None;
                Some(Out::Injected(publish))
            }
        }
    }
}

/// The read of the bodies next in line in `q`, when a worker waits on them
/// and none is under way: about `window` bytes.
fn head_read(q: &mut Queue, cache: &Cache, window: u64) -> Option<Read> {
    if q.reading || !q.waits_for_bodies(cache) {
        return None;
    }
    let (seqs, ids): (Vec<u64>, Vec<String>) =
        q.unread_head(cache, window, READ_BATCH).into_iter().unzip();
    if seqs.is_empty() {
        return None;
    }
    q.reading = true;
    Some(Read {
        queue: q.name.clone(),
        seqs,
        purpose: Purpose::Dispatch(ids),
    })
}

/// What the outlet carries for an owner publish (always QoS 1).
fn injected(o: Outgoing) -> Injected {
    let properties = o.correlation.map(|corr| {
        Box::new(rumqttd::protocol::PublishProperties {
            correlation_data: Some(corr),
            ..Default::default()
        })
    });
    Injected {
        topic: Bytes::from(o.topic),
        payload: o.payload,
        retain: o.retain,
        properties,
    }
}

/// Back from the outlet's form, for the MQTT client.
fn outgoing(i: Injected) -> Outgoing {
    Outgoing {
        topic: String::from_utf8_lossy(&i.topic).into_owned(),
        payload: i.payload,
        retain: i.retain,
        correlation: i.properties.and_then(|p| p.correlation_data),
    }
}

/// True for a topic name a PUBLISH may carry (MQTT 4.7.3): the reply
/// topics clients name come unchecked.
fn publishable(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= usize::from(u16::MAX) && !topic.contains(['+', '#', '\0'])
}

fn bad_body(topic: &str, err: &serde_json::Error) {
    tracing::warn!(topic, error = %err, "ignoring a queue message with an invalid body");
}
