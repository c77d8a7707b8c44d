//! The service's MQTT side: one connection, the queue protocol of
//! `bridge/QUEUE-CONTRACT.md`, admission control, and the SIGTERM drain.
//!
//! Two tasks share the work, because rumqttc only moves requests while its
//! event loop is polled: the *poller* only polls and forwards what arrives,
//! and the *dispatcher* owns every decision and never awaits the client
//! (`try_*` calls, and an outbox for whatever does not fit yet), so neither
//! can wait on the other. Handlers run as their own tokio tasks and report
//! back on a channel sized by `MAX_INFLIGHT`, the most that can run at once.
//!
//! Credit follows free capacity: each queue is told it may send as many
//! tasks as there are free handler slots (`MAX_INFLIGHT` minus running minus
//! waiting), and a task that another shared-group member's credit brought is
//! claimed only into a free slot, otherwise released at once, so a busy
//! instance never sits on work another could do.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, PublishProperties, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event as MqttEvent, EventLoop};
use rumqttc::Outgoing;
use serde_json::{json, Value};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::beacon::Beacon;
use super::limits::Limits;
use super::message::{into_task, parse_event, Event, ReplyTarget, Task};
use super::vitals::Vitals;
use super::{EventHandler, HandlerResult, RuntimeError, TaskHandler};
use axion_client::connection::{
    lasting_refusal, lasting_subscribe_refusal, options_v5, Failover, Reconnect,
};
use axion_wire::queue::{Ready, TaskRecord, TaskRef};
use axion_wire::{topics, BrokerUrls};

/// rumqttc request channel; the dispatcher's outbox absorbs the rest.
const REQUEST_CAPACITY: usize = 1024;
/// Poller → dispatcher.
const INBOUND_CAPACITY: usize = 256;
/// Task payloads (embedding batches) easily pass rumqttc's 10 KiB default.
const MAX_PACKET: u32 = 16 << 20;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Short, so a broker back within `DISCONNECT_KILL_MS` is found in time.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
const TICK: Duration = Duration::from_millis(20);
/// How long the final releases and acks may take to leave.
const FINAL_FLUSH: Duration = Duration::from_secs(2);
/// How long the clean stop waits for the `offline`/`stopped` PUBACK.
const FINAL_HEARTBEAT_WAIT: Duration = Duration::from_secs(5);
/// `retry_after_ms` bounds and the guess before any job has finished.
const RETRY_AFTER_MIN_MS: f64 = 50.0;
const RETRY_AFTER_MAX_MS: f64 = 60_000.0;
const RETRY_AFTER_UNKNOWN_MS: f64 = 250.0;
/// Weight of the newest job in the duration average behind `retry_after_ms`.
const AVG_WEIGHT: f64 = 0.2;

/// Everything the dispatcher needs to know about the service.
pub(crate) struct Plan {
    pub service: String,
    pub package: String,
    pub client_id: String,
    pub mqtt: BrokerUrls,
    pub queues: Vec<(String, TaskHandler)>,
    /// (event type as given, its MQTT filter, handler)
    pub events: Vec<(String, String, EventHandler)>,
    pub limits: Limits,
    /// Take tasks on this worker's own topic on every node (see
    /// `Service::directed_delivery`); otherwise only on a node without
    /// shared subscriptions.
    pub directed: bool,
}

enum Inbound {
    /// Connected to a node; `shared`: it offers shared subscriptions (its
    /// CONNACK did not say `SharedSubscriptionAvailable = 0`).
    Connected {
        shared: bool,
    },
    Disconnected,
    Publish(Box<rumqttc::v5::mqttbytes::v5::Publish>),
}

enum Outcome {
    Finished(HandlerResult),
    Panicked(String),
    Cancelled,
}

struct Done {
    seq: u64,
    outcome: Outcome,
    took: Duration,
}

enum Job {
    Task(Task, TaskHandler),
    Event(Event, EventHandler, Option<ReplyTarget>),
}

struct Running {
    abort: AbortHandle,
    task: Option<(String, String)>,
    reply: Option<ReplyTarget>,
}

struct Held {
    queue: String,
    progress_sent: Instant,
}

enum Out {
    Publish {
        topic: String,
        body: Bytes,
        props: Option<PublishProperties>,
        /// Credit announcements are stale after a reconnect (a `reset`
        /// follows) and are dropped then.
        credit: bool,
    },
    Subscribe(Vec<Filter>),
}

/// Runs the service until SIGTERM/SIGINT, then drains; returns exit code 0.
/// (The watchdog ends the process on its own for codes 70 and 71.)
pub(crate) async fn run(
    plan: Plan,
    vitals: Arc<Vitals>,
    beacon: Beacon,
) -> Result<i32, RuntimeError> {
    let mut sigterm = signal(SignalKind::terminate()).map_err(RuntimeError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(RuntimeError::Signal)?;

    let failover = Failover::new(plan.mqtt.clone(), Reconnect::new(BACKOFF_MIN, BACKOFF_MAX));
    let mut opts = options_v5(failover.current(), &plan.client_id);
    opts.set_clean_start(true);
    opts.set_max_packet_size(Some(MAX_PACKET));
    let (client, eventloop) = AsyncClient::new(opts, REQUEST_CAPACITY);
    let (in_tx, mut in_rx) = mpsc::channel(INBOUND_CAPACITY);
    let mut poller = tokio::spawn(poll_loop(eventloop, failover, vitals.clone(), in_tx));
    let (done_tx, mut done_rx) = mpsc::channel(plan.limits.max_inflight + 16);

    tracing::info!(
        service = %plan.service,
        package = %plan.package,
        worker = %plan.client_id,
        broker = %plan.mqtt,
        queues = ?plan.queues.iter().map(|(q, _)| q.as_str()).collect::<Vec<_>>(),
        events = ?plan.events.iter().map(|(t, _, _)| t.as_str()).collect::<Vec<_>>(),
        max_inflight = plan.limits.max_inflight,
        max_queue = plan.limits.max_queue,
        "service starting"
    );
    let mut core = Core::new(plan, client.clone(), vitals, beacon.clone(), done_tx);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = sigterm.recv() => core.begin_drain("SIGTERM"),
            _ = sigint.recv() => core.begin_drain("SIGINT"),
            done = done_rx.recv() => {
                if let Some(done) = done {
                    core.on_done(done);
                }
            }
            inbound = in_rx.recv() => match inbound {
                Some(inbound) => core.on_inbound(inbound),
                // The poller ends on its own only when the broker refuses
                // this service for good (a clean DISCONNECT is sent by this
                // loop only after it leaves).
                None => {
                    return Err(match (&mut poller).await {
                        Ok(Some(why)) => RuntimeError::Refused(why),
                        _ => RuntimeError::PollerGone,
                    })
                }
            },
            _ = tick.tick() => core.on_tick(),
        }
        if let Some(deadline) = core.drain_deadline {
            if core.running.is_empty() {
                tracing::info!("drain complete: every running handler finished");
                break;
            }
            if Instant::now() >= deadline {
                core.abandon_running();
                break;
            }
        }
        core.flush();
    }

    // Let the acks, results and releases leave before DISCONNECT.
    let flush_deadline = Instant::now() + FINAL_FLUSH;
    loop {
        core.flush();
        if core.outbox.is_empty() || !core.connected || Instant::now() > flush_deadline {
            break;
        }
        tokio::time::sleep(TICK).await;
    }
    if !core.outbox.is_empty() {
        tracing::warn!(
            left = core.outbox.len(),
            "stopping with messages not sent; held tasks come back through the heartbeat or the ack wait"
        );
    }
    if let Err(err) = client.try_disconnect() {
        tracing::warn!(error = %err, "could not send DISCONNECT");
    }
    if tokio::time::timeout(FINAL_FLUSH, poller).await.is_err() {
        tracing::warn!("MQTT connection did not close in time");
    }
    let stopped =
        tokio::task::spawn_blocking(move || beacon.stop_blocking("stopped", FINAL_HEARTBEAT_WAIT))
            .await
            .unwrap_or(false);
    tracing::info!(final_heartbeat = stopped, "service stopped");
    Ok(0)
}

/// Polls the connection, passing what arrives to the service loop, until
/// the service loop is gone or sends DISCONNECT (`None`), or the broker
/// refuses this service in a way retrying will not change (`Some(why)`).
/// A lost node is left for the next one at once; the watchdog's clock
/// runs only while no node is connected.
async fn poll_loop(
    mut eventloop: EventLoop,
    mut failover: Failover,
    vitals: Arc<Vitals>,
    tx: mpsc::Sender<Inbound>,
) -> Option<String> {
    // Lasting refusals in a row, from whichever node (see
    // `lasting_refusal`): a refusing node is left for the next, and the
    // service gives up only when every node refuses.
    let mut refusals = 0u32;
    let give_up_after = failover.refusals_before_giving_up();
    loop {
        match eventloop.poll().await {
            Ok(MqttEvent::Incoming(Packet::ConnAck(ack))) => {
                failover.connected();
                vitals.set_connected(true);
                let shared = ack
                    .properties
                    .as_ref()
                    .and_then(|p| p.shared_subscription_available)
                    != Some(0);
                tracing::info!(broker = %failover.current(), shared_subscriptions = shared, "connected to the broker");
                if tx.send(Inbound::Connected { shared }).await.is_err() {
                    return None;
                }
            }
            Ok(MqttEvent::Incoming(Packet::SubAck(ack))) => {
                let refused: Vec<_> = ack
                    .return_codes
                    .iter()
                    .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                    .collect();
                if refused.is_empty() {
                    refusals = 0;
                    vitals.set_subscribed();
                } else if refused.iter().any(|c| lasting_subscribe_refusal(c)) {
                    // No retry makes the broker allow or support it: a
                    // service that cannot take its work must not look alive.
                    return Some(format!(
                        "the broker refused a subscription this service needs: {refused:?}"
                    ));
                } else {
                    tracing::error!(codes = ?refused, "the broker refused a subscription; this service will not receive that work");
                }
            }
            Ok(MqttEvent::Incoming(Packet::Publish(publish))) => {
                if tx.send(Inbound::Publish(Box::new(publish))).await.is_err() {
                    return None;
                }
            }
            Ok(MqttEvent::Outgoing(Outgoing::Disconnect)) => return None,
            Ok(_) => {}
            Err(err) => {
                if tx.is_closed() {
                    return None;
                }
                match lasting_refusal(&err) {
                    Some(why) => {
                        refusals += 1;
                        tracing::warn!(broker = %failover.current(), %why, refusals, of = give_up_after, "the broker refused this service");
                        if refusals >= give_up_after {
                            return Some(why);
                        }
                    }
                    None => refusals = 0,
                }
                let broker = failover.current().to_string();
                let wait = failover.after_failure(&mut eventloop, &err);
                if vitals.connected() {
                    vitals.set_connected(false);
                    tracing::warn!(broker, error = %err, "lost the broker; reconnecting");
                    if tx.send(Inbound::Disconnected).await.is_err() {
                        return None;
                    }
                } else {
                    tracing::debug!(error = %err, retry_in = ?wait, "broker still unreachable");
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

struct Core {
    plan: Plan,
    client: AsyncClient,
    vitals: Arc<Vitals>,
    beacon: Beacon,
    done_tx: mpsc::Sender<Done>,
    connected: bool,
    drain_deadline: Option<Instant>,
    /// `axion/<pkg>/queue/<q>/tasks` and `…/tasks/<worker>` → queue name.
    task_topics: HashMap<String, String>,
    /// Tasks come on this worker's own topic (directed delivery) rather
    /// than through the shared subscription, on the node connected now.
    directed: bool,
    handlers: HashMap<String, TaskHandler>,
    announce_topic: String,
    waiting: VecDeque<Job>,
    running: HashMap<u64, Running>,
    next_seq: u64,
    /// Tasks this instance holds (waiting or running), by id.
    held: HashMap<String, Held>,
    /// Credit announced to each queue and not yet used, as far as we know.
    outstanding: HashMap<String, u32>,
    outbox: VecDeque<Out>,
    outbox_cap: usize,
    avg_job_ms: Option<f64>,
    refusing: bool,
    last_progress_check: Instant,
}

impl Core {
    fn new(
        plan: Plan,
        client: AsyncClient,
        vitals: Arc<Vitals>,
        beacon: Beacon,
        done_tx: mpsc::Sender<Done>,
    ) -> Self {
        let task_topics = plan
            .queues
            .iter()
            .flat_map(|(q, _)| {
                [
                    (topics::queue(&plan.package, q, "tasks"), q.clone()),
                    (
                        topics::queue_tasks_directed(&plan.package, q, &plan.client_id),
                        q.clone(),
                    ),
                ]
            })
            .collect();
        let handlers = plan.queues.iter().cloned().collect();
        let outstanding = plan.queues.iter().map(|(q, _)| (q.clone(), 0)).collect();
        let outbox_cap = 4 * (plan.limits.max_queue + plan.limits.max_inflight) + 1024;
        let directed = plan.directed;
        Self {
            announce_topic: topics::announce(&plan.package),
            plan,
            client,
            vitals,
            beacon,
            done_tx,
            connected: false,
            drain_deadline: None,
            directed,
            task_topics,
            handlers,
            waiting: VecDeque::new(),
            running: HashMap::new(),
            next_seq: 0,
            held: HashMap::new(),
            outstanding,
            outbox: VecDeque::new(),
            outbox_cap,
            avg_job_ms: None,
            refusing: false,
            last_progress_check: Instant::now(),
        }
    }

    fn draining(&self) -> bool {
        self.drain_deadline.is_some()
    }

    fn limits(&self) -> &Limits {
        &self.plan.limits
    }

    /// Handler slots neither running nor promised to a waiting job.
    fn free_slots(&self) -> usize {
        self.limits()
            .max_inflight
            .saturating_sub(self.running.len() + self.waiting.len())
    }

    fn on_inbound(&mut self, inbound: Inbound) {
        match inbound {
            Inbound::Connected { shared } => {
                self.connected = true;
                let directed = self.plan.directed || !shared;
                if directed != self.directed {
                    tracing::info!(
                        directed_delivery = directed,
                        shared_subscriptions = shared,
                        "task delivery changes with this node: tasks come on {}",
                        if directed {
                            "this worker's own topic"
                        } else {
                            "the shared subscription"
                        }
                    );
                }
                self.directed = directed;
                // A clean session: subscriptions first, then fresh credit.
                self.outbox.retain(|o| {
                    !matches!(o, Out::Publish { credit: true, .. } | Out::Subscribe(_))
                });
                self.outbox.push_front(Out::Subscribe(self.filters()));
                self.reannounce();
            }
            Inbound::Disconnected => self.connected = false,
            Inbound::Publish(publish) => self.on_publish(publish),
        }
    }

    fn filters(&self) -> Vec<Filter> {
        let mut filters: Vec<Filter> = self
            .plan
            .queues
            .iter()
            .map(|(q, _)| {
                let filter = if self.directed {
                    topics::queue_tasks_directed(&self.plan.package, q, &self.plan.client_id)
                } else {
                    topics::queue_tasks_shared(&self.plan.package, q)
                };
                Filter::new(filter, QoS::AtLeastOnce)
            })
            .collect();
        filters.extend(
            self.plan
                .events
                .iter()
                .map(|(_, f, _)| Filter::new(f.clone(), QoS::AtLeastOnce)),
        );
        filters.push(Filter::new(self.announce_topic.clone(), QoS::AtLeastOnce));
        filters
    }

    fn on_publish(&mut self, publish: Box<rumqttc::v5::mqttbytes::v5::Publish>) {
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return;
        };
        if topic == self.announce_topic {
            // The queue owner restarted and lost our credit.
            self.reannounce();
            return;
        }
        if let Some(queue) = self.task_topics.get(topic).cloned() {
            match serde_json::from_slice::<TaskRecord>(&publish.payload) {
                Ok(task) => self.on_task(&queue, task),
                Err(err) => {
                    tracing::warn!(queue = %queue, error = %err, "task record unreadable; ignored (the ack wait brings it back)")
                }
            }
            return;
        }
        let Some((_, _, handler)) = self
            .plan
            .events
            .iter()
            .find(|(_, filter, _)| rumqttc::v5::mqttbytes::matches(topic, filter))
        else {
            return;
        };
        let handler = handler.clone();
        let props = publish.properties.as_ref();
        let response_topic = props.and_then(|p| p.response_topic.clone());
        let corr_data = props.and_then(|p| p.correlation_data.clone());
        let event = parse_event(
            &self.plan.package,
            topic,
            &publish.payload,
            response_topic,
            corr_data.as_ref(),
            self.vitals.clone(),
        );
        let reply = ReplyTarget::resolve(
            &self.plan.package,
            event.reply_to.as_deref(),
            event.correlation_id.clone(),
            corr_data,
        );
        let full = self.running.len() >= self.limits().max_inflight
            && self.waiting.len() >= self.limits().max_queue;
        if self.draining() || full {
            if !self.refusing {
                self.refusing = true;
                tracing::warn!(
                    running = self.running.len(),
                    waiting = self.waiting.len(),
                    draining = self.draining(),
                    "refusing requests: at the admission limit"
                );
            }
            self.refuse(reply.as_ref(), &event.event_type);
            return;
        }
        self.refusing = false;
        self.waiting.push_back(Job::Event(event, handler, reply));
        self.after_change();
    }

    /// Answers `overloaded` at once, so the caller retries elsewhere or
    /// later instead of hanging.
    fn refuse(&mut self, reply: Option<&ReplyTarget>, event_type: &str) {
        let Some(reply) = reply else {
            tracing::debug!(
                event_type,
                "event dropped: overloaded and no replyTo to tell"
            );
            return;
        };
        if self.outbox.len() >= self.outbox_cap {
            tracing::warn!(
                event_type,
                "overload reply dropped: the broker is not taking our messages fast enough"
            );
            return;
        }
        let body = json!({"overloaded": true, "retry_after_ms": self.retry_after_ms()});
        self.reply(reply, body);
    }

    /// A guess at when a slot frees: the average job times the rounds of
    /// work ahead.
    fn retry_after_ms(&self) -> u64 {
        let rounds = (self.waiting.len() / self.limits().max_inflight + 1) as f64;
        let ms = self.avg_job_ms.unwrap_or(RETRY_AFTER_UNKNOWN_MS) * rounds;
        ms.clamp(RETRY_AFTER_MIN_MS, RETRY_AFTER_MAX_MS) as u64
    }

    fn on_task(&mut self, queue: &str, wire: TaskRecord) {
        let me = self.plan.client_id.as_str();
        let addressed_to_me = wire.worker.as_deref().is_none_or(|w| w == me);
        if addressed_to_me {
            if let Some(o) = self.outstanding.get_mut(queue) {
                *o = o.saturating_sub(1);
            }
        }
        if self.held.contains_key(wire.id.as_ref()) {
            // Delivered again (ack wait ran out while it waited here): keep
            // the one copy, and make sure the owner files it under us.
            if !addressed_to_me {
                self.claim(queue, &wire.id);
            }
            self.after_change();
            return;
        }
        let handler = self.handlers.get(queue).cloned();
        let take = match (&handler, self.draining()) {
            (None, _) | (_, true) => false,
            (Some(_), false) => addressed_to_me || self.free_slots() > 0,
        };
        let (Some(handler), true) = (handler, take) else {
            self.task_message(
                queue,
                "release",
                TaskRef::task(wire.id.as_ref()).with_worker(me),
            );
            self.after_change();
            return;
        };
        if !addressed_to_me {
            self.claim(queue, &wire.id);
            if let Some(o) = self.outstanding.get_mut(queue) {
                *o = o.saturating_sub(1);
            }
        }
        self.held.insert(
            wire.id.to_string(),
            Held {
                queue: queue.to_string(),
                progress_sent: Instant::now(),
            },
        );
        let task = into_task(wire, queue, self.vitals.clone());
        self.waiting.push_back(Job::Task(task, handler));
        self.after_change();
    }

    fn claim(&mut self, queue: &str, id: &str) {
        let me = self.plan.client_id.clone();
        self.task_message(queue, "progress", TaskRef::task(id).with_worker(me));
    }

    /// Starts waiting jobs into free slots, tops up credit, updates vitals.
    fn after_change(&mut self) {
        while self.running.len() < self.limits().max_inflight {
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            self.start(job);
        }
        self.top_up();
        self.vitals.set_load(self.running.len(), self.waiting.len());
    }

    fn start(&mut self, job: Job) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let (future, task, reply) = match job {
            Job::Task(task, handler) => {
                let reply = ReplyTarget::resolve(
                    &self.plan.package,
                    task.reply_to.as_deref(),
                    task.correlation_id.clone(),
                    None,
                );
                let ids = (task.id.clone(), task.queue.clone());
                (handler(task), Some(ids), reply)
            }
            Job::Event(event, handler, reply) => (handler(event), None, reply),
        };
        let inner = tokio::spawn(future);
        let abort = inner.abort_handle();
        let done = self.done_tx.clone();
        let started = Instant::now();
        tokio::spawn(async move {
            let outcome = match inner.await {
                Ok(result) => Outcome::Finished(result),
                Err(err) if err.is_cancelled() => Outcome::Cancelled,
                Err(err) => Outcome::Panicked(err.to_string()),
            };
            let took = started.elapsed();
            if done.send(Done { seq, outcome, took }).await.is_err() {
                tracing::debug!(seq, "handler finished after the service stopped");
            }
        });
        self.running.insert(seq, Running { abort, task, reply });
    }

    fn on_done(&mut self, done: Done) {
        let Some(run) = self.running.remove(&done.seq) else {
            return;
        };
        if !matches!(done.outcome, Outcome::Cancelled) {
            self.vitals.progress();
            self.beacon.job(done.took);
            let ms = done.took.as_secs_f64() * 1000.0;
            self.avg_job_ms = Some(match self.avg_job_ms {
                Some(avg) => avg + AVG_WEIGHT * (ms - avg),
                None => ms,
            });
        }
        match (run.task, done.outcome) {
            (Some((id, queue)), outcome) => {
                if self.held.remove(&id).is_none() {
                    // Already handed back by the drain.
                    self.after_change();
                    return;
                }
                match outcome {
                    Outcome::Finished(Ok(result)) => {
                        // Named, so the owner can tell an ack of a task
                        // handed to another worker (a broker's copy).
                        let me = self.plan.client_id.as_str();
                        self.task_message(
                            &queue,
                            "ack",
                            TaskRef::task(id.as_str()).with_worker(me),
                        );
                        if let Some(reply) = &run.reply {
                            self.reply(reply, result);
                        }
                    }
                    Outcome::Finished(Err(reason)) => {
                        tracing::info!(queue = %queue, id = %id, reason = %reason, "task failed; the queue retries it");
                        self.task_message(
                            &queue,
                            "fail",
                            TaskRef::task(id.as_str()).with_reason(reason),
                        );
                    }
                    Outcome::Panicked(msg) => {
                        tracing::error!(queue = %queue, id = %id, panic = %msg, "task handler panicked");
                        let reason = format!("handler panicked: {msg}");
                        self.task_message(
                            &queue,
                            "fail",
                            TaskRef::task(id.as_str()).with_reason(reason),
                        );
                    }
                    Outcome::Cancelled => {
                        self.task_message(&queue, "release", TaskRef::task(id.as_str()));
                    }
                }
            }
            (None, outcome) => {
                if let Some(reply) = &run.reply {
                    let body = match outcome {
                        Outcome::Finished(Ok(result)) => Some(result),
                        Outcome::Finished(Err(reason)) => Some(json!({"error": reason})),
                        Outcome::Panicked(msg) => {
                            tracing::error!(panic = %msg, "event handler panicked");
                            Some(json!({"error": "handler panicked"}))
                        }
                        Outcome::Cancelled => None,
                    };
                    if let Some(body) = body {
                        self.reply(reply, body);
                    }
                }
            }
        }
        self.after_change();
    }

    fn on_tick(&mut self) {
        let every = self.limits().ack_wait / 3;
        if self.last_progress_check.elapsed() < every.min(Duration::from_millis(250)) {
            return;
        }
        self.last_progress_check = Instant::now();
        // Long tasks keep their ack wait alive, whether running or waiting.
        let due: Vec<(String, String)> = self
            .held
            .iter_mut()
            .filter(|(_, h)| h.progress_sent.elapsed() >= every)
            .map(|(id, h)| {
                h.progress_sent = Instant::now();
                (id.clone(), h.queue.clone())
            })
            .collect();
        for (id, queue) in due {
            self.task_message(&queue, "progress", TaskRef::task(id));
        }
    }

    /// Gives each queue credit up to the free slots (additive `ready`).
    fn top_up(&mut self) {
        if !self.connected || self.draining() {
            return;
        }
        let free = self.free_slots() as u32;
        let me = self.plan.client_id.clone();
        let queues: Vec<String> = self.plan.queues.iter().map(|(q, _)| q.clone()).collect();
        for q in queues {
            let have = self.outstanding.get(&q).copied().unwrap_or(0);
            if have < free {
                self.credit(&q, Ready::more(me.as_str(), free - have));
                self.outstanding.insert(q, free);
            }
        }
    }

    /// Sets each queue's credit to the free slots (`reset`): on connect and
    /// when the owner asks after its restart.
    fn reannounce(&mut self) {
        let free = if self.draining() {
            0
        } else {
            self.free_slots() as u32
        };
        let me = self.plan.client_id.clone();
        let queues: Vec<String> = self.plan.queues.iter().map(|(q, _)| q.clone()).collect();
        for q in queues {
            self.credit(&q, Ready::exactly(me.as_str(), free));
            self.outstanding.insert(q, free);
        }
    }

    fn credit(&mut self, queue: &str, body: Ready) {
        let body = body.directed(self.directed);
        self.outbox.push_back(Out::Publish {
            topic: topics::queue(&self.plan.package, queue, "ready"),
            body: encode(&body),
            props: None,
            credit: true,
        });
    }

    fn task_message(&mut self, queue: &str, leaf: &str, body: TaskRef) {
        self.outbox.push_back(Out::Publish {
            topic: topics::queue(&self.plan.package, queue, leaf),
            body: encode(&body),
            props: None,
            credit: false,
        });
    }

    fn reply(&mut self, target: &ReplyTarget, payload: Value) {
        let props = target.correlation_data.clone().map(|c| PublishProperties {
            correlation_data: Some(c),
            payload_format_indicator: Some(1),
            content_type: Some("application/json".into()),
            ..Default::default()
        });
        self.outbox.push_back(Out::Publish {
            topic: target.topic.clone(),
            body: Bytes::from(target.envelope(&self.plan.service, payload)),
            props,
            credit: false,
        });
    }

    /// Hands everything to rumqttc that fits; the rest waits for the next
    /// tick. Nothing goes while disconnected: a clean session would drop it.
    fn flush(&mut self) {
        while self.connected {
            let Some(out) = self.outbox.pop_front() else {
                return;
            };
            let sent = match &out {
                Out::Publish {
                    topic, body, props, ..
                } => match props {
                    Some(p) => self.client.try_publish_with_properties(
                        topic.as_str(),
                        QoS::AtLeastOnce,
                        false,
                        body.clone(),
                        p.clone(),
                    ),
                    None => self.client.try_publish(
                        topic.as_str(),
                        QoS::AtLeastOnce,
                        false,
                        body.clone(),
                    ),
                },
                Out::Subscribe(filters) => self.client.try_subscribe_many(filters.clone()),
            };
            if sent.is_err() {
                self.outbox.push_front(out);
                return;
            }
        }
    }

    /// SIGTERM/SIGINT: no more credit, `draining` heartbeat, waiting work
    /// handed back or refused, running handlers get `DRAIN_MS`.
    fn begin_drain(&mut self, why: &str) {
        if self.draining() {
            // A second signal is an operator who does not want to wait.
            tracing::warn!(
                signal = why,
                "second signal: handing running tasks back now"
            );
            self.drain_deadline = Some(Instant::now());
            return;
        }
        let drain = self.limits().drain;
        tracing::info!(
            signal = why,
            running = self.running.len(),
            waiting = self.waiting.len(),
            drain_ms = drain.as_millis() as u64,
            "draining"
        );
        self.drain_deadline = Some(Instant::now() + drain);
        self.vitals.set_draining();
        self.beacon.draining();
        self.reannounce();
        let me = self.plan.client_id.clone();
        for job in std::mem::take(&mut self.waiting) {
            match job {
                Job::Task(task, _) => {
                    self.held.remove(&task.id);
                    self.task_message(
                        &task.queue,
                        "release",
                        TaskRef::task(task.id.as_str()).with_worker(me.as_str()),
                    );
                }
                Job::Event(event, _, reply) => self.refuse(reply.as_ref(), &event.event_type),
            }
        }
        self.vitals.set_load(self.running.len(), self.waiting.len());
    }

    /// `DRAIN_MS` is up: stop the handlers still running and hand their
    /// tasks back (not counted as an attempt).
    fn abandon_running(&mut self) {
        tracing::warn!(
            running = self.running.len(),
            "drain time is up; handing unfinished tasks back"
        );
        let me = self.plan.client_id.clone();
        for (_, run) in std::mem::take(&mut self.running) {
            run.abort.abort();
            if let Some((id, queue)) = run.task {
                self.held.remove(&id);
                self.task_message(
                    &queue,
                    "release",
                    TaskRef::task(id).with_worker(me.as_str()),
                );
            } else if let Some(reply) = &run.reply {
                self.refuse(Some(reply), &reply.event_type.clone());
            }
        }
        self.vitals.set_load(0, 0);
    }
}

/// A queue message's body. These messages hold only strings, numbers and
/// flags, which always encode.
fn encode(message: &impl serde::Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(message).unwrap_or_default())
}
