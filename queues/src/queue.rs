//! One queue's in-memory state and its rules (JetStream-style work queue):
//! which tasks wait, which are in flight and with whom, the credit each
//! worker announced, and what each worker message does to them.
//!
//! It holds each task's record, not its body: bodies live in the store and
//! pass through the owner's bounded [`Cache`]. A task is delivered only
//! once its body is in the cache; when the head of the queue is not, the
//! owner reads it (see [`Queue::unread_head`]) and dispatch waits for it,
//! so delivery order holds.
//!
//! It performs no I/O. Every change it makes is described as [`Effects`]
//! (MQTT messages the owner publishes) or noted as a task whose record
//! changed, which [`Queue::take_ops`] turns into store operations when the
//! owner starts its next group commit. Keeping the rules free of I/O keeps
//! them easy to follow and to test.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::value::RawValue;

use super::cache::Cache;
use super::store::{Body, Counters, Op, StoredTask};
use axion_wire::queue::{Stats, TaskRecord, TaskView, WorkerView};

/// No worker may hold more announced credit than this; a runaway producer
/// of `ready` messages must not overflow anything.
const MAX_CREDITS: u32 = 100_000;

/// How long a refusal episode gathers refusals before its one log line is
/// written (sooner if the queue has room again): a producer that floods a
/// full queue must not flood the log, and an operator should hear of it
/// soon.
const REPORT_REFUSALS_AFTER_MS: u64 = 5_000;

/// Ids of the latest acked tasks a queue remembers, so a second ack of one
/// is told from an ack of a task the owner never knew.
const RECENT_ACKS: usize = 16_384;

/// Stray acks are logged at most once per this long, with how many came
/// since the last line: a bridge loop that duplicates every task must not
/// flood the log.
const STRAY_LOG_EVERY_MS: u64 = 5_000;

/// An MQTT message the owner must publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
    /// MQTT 5 Correlation Data to echo on a reply.
    pub correlation: Option<Bytes>,
}

impl Outgoing {
    pub fn plain(topic: String, payload: Vec<u8>) -> Self {
        Self {
            topic,
            payload: Bytes::from(payload),
            retain: false,
            correlation: None,
        }
    }
}

/// What to do once the current changes are on disk.
#[derive(Debug)]
pub enum After {
    Publish(Outgoing),
    /// PUBACK an incoming publish (manual acks, in receive order).
    Ack(rumqttc::v5::mqttbytes::v5::Publish),
}

/// A dead letter whose notice on `…/dead` waits for its body to be read.
#[derive(Debug)]
pub struct DeadNotice {
    pub queue: String,
    pub topic: String,
    pub id: String,
    pub stored: StoredTask,
}

impl DeadNotice {
    /// The notice, with the body read (`None`: gone from the store since,
    /// the payload is then `null`).
    pub fn encode(&self, body: Option<&Body>) -> Option<Vec<u8>> {
        record(
            &self.id,
            &self.queue,
            &self.stored,
            body,
            None,
            self.stored.reason.as_deref(),
        )
    }
}

/// Side effects collected while handling messages.
#[derive(Debug, Default)]
pub struct Effects {
    /// Dead-letter changes for the next group commit (task records are
    /// taken from the queues when it starts, see [`Queue::take_ops`]).
    pub ops: Vec<Op>,
    /// Released after that commit, in order.
    pub after: Vec<After>,
    /// Published right away (deliveries, dead letters, stats): they report
    /// state that is either already durable or allowed to be lost in a crash
    /// (a task delivered before its first commit was not yet confirmed to
    /// its producer).
    pub now: Vec<Outgoing>,
    /// Dead letters to announce once their bodies are read.
    pub unread_dead: Vec<DeadNotice>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Ready,
    Delayed,
    Inflight { worker: String, deadline: u64 },
}

#[derive(Debug)]
struct Task {
    stored: StoredTask,
    state: State,
    /// Its record is in the store (or in the commit under way). A task that
    /// ends before its first commit never costs the store anything.
    on_disk: bool,
}

/// Settings that apply to one queue.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub ack_wait: Duration,
    pub default_max_attempts: u32,
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// Live tasks (waiting or in flight) past which enqueues are refused;
    /// 0: no limit.
    pub max_depth: u64,
    /// Bytes of live tasks' bodies past which enqueues are refused; 0: no
    /// limit.
    pub max_bytes: u64,
}

/// Which limit refused an enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Depth,
    Bytes,
}

impl Full {
    pub fn name(self) -> &'static str {
        match self {
            Full::Depth => "depth",
            Full::Bytes => "bytes",
        }
    }
}

/// An enqueue refused at a limit, with the figures that explain it.
#[derive(Debug, Clone, Copy)]
pub struct Refusal {
    pub limit: Full,
    /// Live tasks (waiting or in flight).
    pub depth: u64,
    pub max_depth: u64,
    /// Bytes of their bodies.
    pub bytes: u64,
    pub max_bytes: u64,
    /// The refused task's body.
    pub size: u64,
}

impl Refusal {
    pub fn message(&self, queue: &str) -> String {
        match self.limit {
            Full::Depth => format!(
                "queue {queue:?} is full: {} tasks queued or in flight, its depth limit is {}; enqueue refused",
                self.depth, self.max_depth
            ),
            Full::Bytes => format!(
                "queue {queue:?} is full: its tasks hold {} bytes and this one {} more, its byte limit is {}; enqueue refused",
                self.bytes, self.size, self.max_bytes
            ),
        }
    }
}

/// Enqueues refused in the episode under way.
#[derive(Debug)]
struct Refusing {
    since: u64,
    refused: u64,
    first: Refusal,
}

/// What an ack was, as far as the owner can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// From the worker the task was handed to (or from a worker that did
    /// not say who it is).
    Expected,
    /// From another worker than the one the task was handed to: the task
    /// ran there too.
    Foreign,
    /// For a task acked before: it ran twice.
    Repeated,
    /// For a task the owner does not know (purged, or acked before the
    /// owner's last restart).
    Unknown,
}

pub struct Queue {
    pub name: String,
    package: String,
    topic_prefix: String,
    limits: Limits,
    tasks: HashMap<String, Task>,
    /// Bytes of the live tasks' bodies.
    bytes: u64,
    /// seq → id, delivery order.
    ready: BTreeMap<u64, String>,
    /// (not before, seq) → id.
    delayed: BTreeMap<(u64, u64), String>,
    /// (deadline, seq) → id.
    inflight: BTreeMap<(u64, u64), String>,
    dead: HashMap<String, StoredTask>,
    dead_order: BTreeMap<u64, String>,
    /// Free credit per worker. It may go below zero: a worker that claims
    /// a task addressed to another (see `progress`) used a slot the owner
    /// may already have spent on a delivery still on its way; the debt is
    /// paid by the worker's next `ready`, so credit never inflates.
    credits: HashMap<String, i64>,
    /// Workers that take their tasks on their own topic (their `ready`
    /// asked for directed delivery).
    directed: HashSet<String>,
    /// The latest acked ids, oldest first, and the same as a set.
    recent_acks: VecDeque<String>,
    recent_ack_set: HashSet<String>,
    /// Stray acks not logged yet, and when the last line was written (ms).
    strays_unlogged: u64,
    strays_logged_at: Option<u64>,
    counters: Counters,
    counters_dirty: bool,
    /// Tasks whose record changed since the last batch was taken: their
    /// current state is encoded once per commit, however often it changed.
    /// In id order: time-ordered ids (UUID v7) then fill B-tree pages one
    /// after another.
    dirty: BTreeSet<String>,
    /// Deletes of the records and bodies of tasks that ended.
    gone: Vec<Op>,
    refusing: Option<Refusing>,
    /// Bodies at the head of the queue are being read for it.
    pub reading: bool,
    /// Something visible in stats changed since they were last published.
    pub changed: bool,
    last_stats: Option<(u64, Counters)>,
}

fn encode(task: &StoredTask) -> Option<Vec<u8>> {
    match serde_json::to_vec(task) {
        Ok(bytes) => Some(bytes),
        Err(err) => {
            tracing::error!(error = %err, "cannot encode a task for the store");
            None
        }
    }
}

/// A task record (`…/tasks`, `…/dead`); a body gone from the store has a
/// `null` payload.
fn record(
    id: &str,
    queue: &str,
    stored: &StoredTask,
    body: Option<&Body>,
    worker: Option<&str>,
    reason: Option<&str>,
) -> Option<Vec<u8>> {
    let record = TaskRecord {
        id: id.into(),
        queue: Some(queue.into()),
        payload: body.map_or(RawValue::NULL, |b| &b.payload),
        created_at: stored.created_at,
        attempts: stored.attempts,
        reply_to: body.and_then(|b| b.reply_to.as_deref()).map(Into::into),
        correlation_id: body
            .and_then(|b| b.correlation_id.as_deref())
            .map(Into::into),
        worker: worker.map(Into::into),
        reason: reason.map(Into::into),
    };
    serde_json::to_vec(&record).ok()
}

impl Queue {
    pub fn new(package: &str, name: &str, limits: Limits, counters: Counters) -> Self {
        Self {
            name: name.to_string(),
            package: package.to_string(),
            topic_prefix: format!("axion/{package}/queue/{name}/"),
            limits,
            tasks: HashMap::new(),
            bytes: 0,
            ready: BTreeMap::new(),
            delayed: BTreeMap::new(),
            inflight: BTreeMap::new(),
            dead: HashMap::new(),
            dead_order: BTreeMap::new(),
            credits: HashMap::new(),
            directed: HashSet::new(),
            recent_acks: VecDeque::new(),
            recent_ack_set: HashSet::new(),
            strays_unlogged: 0,
            strays_logged_at: None,
            counters,
            counters_dirty: false,
            dirty: BTreeSet::new(),
            gone: Vec::new(),
            refusing: None,
            reading: false,
            changed: true,
            last_stats: None,
        }
    }

    pub fn ack_wait(&self) -> Duration {
        self.limits.ack_wait
    }

    fn topic(&self, leaf: &str) -> String {
        format!("{}{leaf}", self.topic_prefix)
    }

    /// Notes that a task's record changed and must be written.
    fn touch(&mut self, id: &str) {
        if !self.dirty.contains(id) {
            self.dirty.insert(id.to_string());
        }
    }

    /// Notes that a task left the queue: its record goes, if it has one,
    /// and so does its body unless it stays for a dead letter.
    fn forget(&mut self, id: &str, task: &Task, cache: &mut Cache, keep_body: bool) {
        self.dirty.remove(id);
        self.bytes = self.bytes.saturating_sub(task.stored.size);
        if task.on_disk {
            self.gone.push(Op::Delete {
                queue: self.name.clone(),
                id: id.to_string(),
            });
        }
        if keep_body {
            cache.retire(task.stored.seq);
        } else if cache.forget(task.stored.seq) {
            self.gone.push(Op::DeleteBody {
                seq: task.stored.seq,
            });
        }
    }

    /// A task record waits to be written: someone may wait on its commit.
    pub fn has_puts(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Finished tasks wait to be deleted from the store.
    pub fn has_deletes(&self) -> bool {
        !self.gone.is_empty()
    }

    /// The store operations that bring the disk up to date with this queue,
    /// for the group commit about to start. (Bodies not on disk yet are
    /// the cache's to write, see [`Cache::take_writes`].)
    pub fn take_ops(&mut self, ops: &mut Vec<Op>) {
        // Deletes first: an id that ended and was enqueued again since is
        // put back by its Put (the store keeps the last op on a key).
        ops.append(&mut self.gone);
        for id in std::mem::take(&mut self.dirty) {
            let Some(task) = self.tasks.get_mut(&id) else {
                continue;
            };
            if let Some(bytes) = encode(&task.stored) {
                task.on_disk = true;
                ops.push(Op::Put {
                    queue: self.name.clone(),
                    id,
                    bytes,
                });
            }
        }
    }

    /// A task found on disk at start. In-flight tasks stay with their worker
    /// for a fresh ack wait: it may still be working on them.
    pub fn restore(&mut self, id: String, stored: StoredTask, now: u64) {
        let state = match &stored.worker {
            Some(worker) => State::Inflight {
                worker: worker.clone(),
                deadline: now + self.limits.ack_wait.as_millis() as u64,
            },
            None => waiting(&stored, now),
        };
        self.index(&id, stored.seq, stored.not_before, &state);
        self.bytes += stored.size;
        self.tasks.insert(
            id,
            Task {
                stored,
                state,
                on_disk: true,
            },
        );
    }

    pub fn restore_dead(&mut self, id: String, stored: StoredTask) {
        self.dead_order.insert(stored.seq, id.clone());
        self.dead.insert(id, stored);
    }

    fn index(&mut self, id: &str, seq: u64, not_before: u64, state: &State) {
        match state {
            State::Ready => {
                self.ready.insert(seq, id.to_string());
            }
            State::Delayed => {
                self.delayed.insert((not_before, seq), id.to_string());
            }
            State::Inflight { deadline, .. } => {
                self.inflight.insert((*deadline, seq), id.to_string());
            }
        }
    }

    fn unindex(&mut self, seq: u64, not_before: u64, state: &State) {
        match state {
            State::Ready => {
                self.ready.remove(&seq);
            }
            State::Delayed => {
                self.delayed.remove(&(not_before, seq));
            }
            State::Inflight { deadline, .. } => {
                self.inflight.remove(&(*deadline, seq));
            }
        }
    }

    fn set_state(&mut self, id: &str, state: State) {
        let Some(task) = self.tasks.get_mut(id) else {
            return;
        };
        let (seq, not_before) = (task.stored.seq, task.stored.not_before);
        let old = std::mem::replace(&mut task.state, state.clone());
        self.unindex(seq, not_before, &old);
        self.index(id, seq, not_before, &state);
        self.changed = true;
    }

    pub fn contains(&self, id: &str) -> bool {
        self.tasks.contains_key(id)
    }

    /// The seq of live task `id`, if it is not in flight.
    pub fn waiting_seq(&self, id: &str) -> Option<u64> {
        self.tasks
            .get(id)
            .filter(|t| !matches!(t.state, State::Inflight { .. }))
            .map(|t| t.stored.seq)
    }

    /// Whether the queue is below both its limits.
    pub fn has_room(&self) -> bool {
        let (max_depth, max_bytes) = (self.limits.max_depth, self.limits.max_bytes);
        (max_depth == 0 || (self.tasks.len() as u64) < max_depth)
            && (max_bytes == 0 || self.bytes < max_bytes)
    }

    /// Whether a new task of `size` bytes fits under the queue's limits.
    /// A refusal is counted, and logged with its episode (see
    /// [`Queue::report_refusals`]).
    pub fn admit(&mut self, size: u64, now: u64) -> Result<(), Refusal> {
        let (max_depth, max_bytes) = (self.limits.max_depth, self.limits.max_bytes);
        let depth = self.tasks.len() as u64;
        let limit = if max_depth > 0 && depth >= max_depth {
            Full::Depth
        } else if max_bytes > 0 && self.bytes.saturating_add(size) > max_bytes {
            Full::Bytes
        } else {
            return Ok(());
        };
        let refusal = Refusal {
            limit,
            depth,
            max_depth,
            bytes: self.bytes,
            max_bytes,
            size,
        };
        self.counters.refused += 1;
        self.counters_dirty = true;
        self.changed = true;
        match &mut self.refusing {
            Some(episode) => episode.refused += 1,
            None => {
                self.refusing = Some(Refusing {
                    since: now,
                    refused: 1,
                    first: refusal,
                })
            }
        }
        Err(refusal)
    }

    /// Ends the refusal episode under way with one log line that counts
    /// it, once the queue has room again, [`REPORT_REFUSALS_AFTER_MS`]
    /// after its first refusal, or at once with `now_anyway` (the owner
    /// stops). A queue that stays full gets at most one line per period.
    pub fn report_refusals(&mut self, now: u64, now_anyway: bool) {
        let Some(episode) = &self.refusing else {
            return;
        };
        let (max_depth, max_bytes) = (self.limits.max_depth, self.limits.max_bytes);
        let depth = self.tasks.len() as u64;
        let room = self.has_room();
        let due = now >= episode.since + REPORT_REFUSALS_AFTER_MS;
        if !(room || due || now_anyway) {
            return;
        }
        let first = episode.first;
        tracing::warn!(
            queue = %self.name,
            refused = episode.refused,
            limit = first.limit.name(),
            depth,
            max_depth,
            bytes = self.bytes,
            max_bytes,
            room,
            "queue full: enqueues refused"
        );
        self.refusing = None;
    }

    /// Accepts a new task, deliverable at once (or at its `not_before`).
    /// Its body stays in the cache until it is on disk. Its producer's
    /// confirmation waits for the commit; delivery does not, so a slow
    /// commit holds up no worker, and a task delivered and acked before
    /// the next commit starts never reaches the disk at all.
    pub fn enqueue(
        &mut self,
        id: String,
        stored: StoredTask,
        body: Arc<Body>,
        cache: &mut Cache,
        now: u64,
    ) {
        self.touch(&id);
        self.counters.enqueued += 1;
        self.counters_dirty = true;
        cache.insert_new(stored.seq, body);
        self.bytes += stored.size;
        let state = waiting(&stored, now);
        self.index(&id, stored.seq, stored.not_before, &state);
        self.tasks.insert(
            id,
            Task {
                stored,
                state,
                on_disk: false,
            },
        );
        self.changed = true;
    }

    /// Adds (or with `reset`, sets) a worker's credit; `directed`: its
    /// tasks go on its own topic from now on (each `ready` says which).
    pub fn ready(&mut self, worker: &str, credits: u32, reset: bool, directed: bool) {
        if directed {
            if !self.directed.contains(worker) {
                self.directed.insert(worker.to_string());
            }
        } else {
            self.directed.remove(worker);
        }
        let credits = i64::from(credits.min(MAX_CREDITS));
        let entry = self.credits.entry(worker.to_string()).or_insert(0);
        *entry = if reset {
            credits
        } else {
            (*entry + credits).min(i64::from(MAX_CREDITS))
        };
        self.changed = true;
    }

    pub fn has_work(&self) -> bool {
        !self.ready.is_empty() && self.credits.values().any(|c| *c > 0)
    }

    /// Delivers waiting tasks while workers have credit, at most `budget`,
    /// and stops at the first whose body is not in the cache (see
    /// [`Queue::unread_head`]). The worker with the most free credit gets
    /// the next task, so load goes where there is room. A worker that asked
    /// for directed delivery, or every worker with `all_directed`, gets its
    /// task on its own topic; the others on the shared one.
    pub fn dispatch(
        &mut self,
        now: u64,
        mut budget: usize,
        all_directed: bool,
        cache: &mut Cache,
        fx: &mut Effects,
    ) -> usize {
        let mut sent = 0;
        while budget > 0 {
            let Some((&seq, _)) = self.ready.first_key_value() else {
                break;
            };
            let Some(body) = cache.get(seq) else {
                break;
            };
            let Some((worker, credit)) = self
                .credits
                .iter_mut()
                .filter(|(_, c)| **c > 0)
                .max_by_key(|(_, c)| **c)
            else {
                break;
            };
            *credit -= 1;
            let worker = worker.clone();
            let Some(id) = self.ready.remove(&seq) else {
                break;
            };
            let deadline = now + self.limits.ack_wait.as_millis() as u64;
            let tasks_topic = if all_directed || self.directed.contains(&worker) {
                axion_wire::topics::queue_tasks_directed(&self.package, &self.name, &worker)
            } else {
                self.topic("tasks")
            };
            let Some(task) = self.tasks.get_mut(&id) else {
                continue;
            };
            task.stored.attempts += 1;
            task.stored.worker = Some(worker.clone());
            task.state = State::Inflight {
                worker: worker.clone(),
                deadline,
            };
            self.inflight.insert((deadline, seq), id.clone());
            if let Some(body) = record(
                &id,
                &self.name,
                &task.stored,
                Some(&body),
                Some(&worker),
                None,
            ) {
                fx.now.push(Outgoing::plain(tasks_topic, body));
            }
            cache.delivered(seq);
            self.touch(&id);
            self.changed = true;
            sent += 1;
            budget -= 1;
        }
        sent
    }

    /// Dispatch waits for bodies: a worker has credit and the head of the
    /// queue is not in the cache.
    pub fn waits_for_bodies(&self, cache: &Cache) -> bool {
        self.has_work()
            && self
                .ready
                .first_key_value()
                .is_some_and(|(seq, _)| !cache.contains(*seq))
    }

    /// The waiting tasks next in line whose bodies are not in the cache,
    /// in order: at most `max_count` of them and about `max_bytes` (one at
    /// least, however large).
    pub fn unread_head(
        &self,
        cache: &Cache,
        max_bytes: u64,
        max_count: usize,
    ) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        let mut bytes = 0u64;
        // Cached ones are skipped, a bounded number of them.
        for (seq, id) in self.ready.iter().take(max_count.saturating_mul(4)) {
            if cache.contains(*seq) {
                continue;
            }
            let size = self.tasks.get(id).map_or(0, |t| t.stored.size);
            if !out.is_empty() && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            out.push((*seq, id.clone()));
            if out.len() >= max_count {
                break;
            }
        }
        out
    }

    /// The worker a task is in flight with.
    pub fn holder(&self, id: &str) -> Option<&str> {
        match self.tasks.get(id).map(|t| &t.state) {
            Some(State::Inflight { worker, .. }) => Some(worker),
            _ => None,
        }
    }

    fn inflight_worker(&self, id: &str) -> Option<String> {
        match self.tasks.get(id).map(|t| &t.state) {
            Some(State::Inflight { worker, .. }) => Some(worker.clone()),
            _ => None,
        }
    }

    /// What an ack of `id` from `worker` (when it said) is: see
    /// [`AckKind`]. A stray one is counted and logged (at most every
    /// [`STRAY_LOG_EVERY_MS`]) here; the caller still acks it, since the
    /// work it reports was done.
    pub fn classify_ack(&mut self, id: &str, worker: Option<&str>, now: u64) -> AckKind {
        let kind = match (self.holder(id), worker) {
            (Some(holder), Some(worker)) if holder != worker => AckKind::Foreign,
            (Some(_), _) => AckKind::Expected,
            (None, _) if self.tasks.contains_key(id) => AckKind::Expected,
            (None, _) if self.recent_ack_set.contains(id) => AckKind::Repeated,
            (None, _) => AckKind::Unknown,
        };
        if matches!(kind, AckKind::Foreign | AckKind::Repeated) {
            self.counters.stray_acks += 1;
            self.counters_dirty = true;
            self.changed = true;
            self.strays_unlogged += 1;
            let due = self
                .strays_logged_at
                .is_none_or(|at| now >= at + STRAY_LOG_EVERY_MS);
            if due {
                tracing::warn!(
                    queue = %self.name,
                    id,
                    worker = worker.unwrap_or(""),
                    holder = self.holder(id).unwrap_or(""),
                    kind = if kind == AckKind::Foreign { "foreign" } else { "repeated" },
                    since_last_line = self.strays_unlogged,
                    stray_acks_total = self.counters.stray_acks,
                    "a task ran more than once: acked twice, or by a worker it was not handed to"
                );
                self.strays_unlogged = 0;
                self.strays_logged_at = Some(now);
            }
        }
        kind
    }

    /// Acks task `id`; hands back when it was first enqueued (Unix ms),
    /// for its latency, if it was known.
    pub fn ack(&mut self, id: &str, cache: &mut Cache) -> Option<u64> {
        let Some(task) = self.tasks.remove(id) else {
            tracing::debug!(queue = %self.name, id, "ack for an unknown task");
            return None;
        };
        if self.recent_acks.len() >= RECENT_ACKS {
            if let Some(old) = self.recent_acks.pop_front() {
                self.recent_ack_set.remove(&old);
            }
        }
        self.recent_ack_set.insert(id.to_string());
        self.recent_acks.push_back(id.to_string());
        self.unindex(task.stored.seq, task.stored.not_before, &task.state);
        self.forget(id, &task, cache, false);
        self.counters.acked += 1;
        self.counters_dirty = true;
        self.changed = true;
        Some(task.stored.created_at)
    }

    /// Exponential backoff with "equal jitter": half fixed, half random, so
    /// a burst of failures does not come back as one burst.
    fn backoff(&self, attempts: u32) -> u64 {
        let base = self.limits.retry_base.as_millis() as u64;
        let cap = self.limits.retry_max.as_millis() as u64;
        let full = base
            .saturating_mul(1u64 << attempts.saturating_sub(1).min(30))
            .min(cap)
            .max(1);
        full / 2 + fastrand::u64(0..=full / 2)
    }

    pub fn fail(
        &mut self,
        id: &str,
        reason: Option<String>,
        retry_after: Option<u64>,
        now: u64,
        cache: &mut Cache,
        fx: &mut Effects,
    ) {
        if self.inflight_worker(id).is_none() {
            tracing::debug!(queue = %self.name, id, "fail for a task not in flight");
            return;
        }
        self.counters.failed += 1;
        self.counters_dirty = true;
        let reason = reason.unwrap_or_else(|| "failed".to_string());
        self.retry_or_dead(id, reason, retry_after, true, now, cache, fx);
    }

    /// After a failed delivery: dead letter once attempts are used up,
    /// otherwise wait (backoff) or go straight back to the queue.
    #[allow(clippy::too_many_arguments)]
    fn retry_or_dead(
        &mut self,
        id: &str,
        reason: String,
        retry_after: Option<u64>,
        backoff: bool,
        now: u64,
        cache: &mut Cache,
        fx: &mut Effects,
    ) {
        let Some(task) = self.tasks.get(id) else {
            return;
        };
        if task.stored.attempts >= task.stored.max_attempts {
            self.dead_letter(id, reason, cache, fx);
            return;
        }
        let delay = match retry_after {
            Some(ms) => ms,
            None if backoff => self.backoff(task.stored.attempts),
            None => 0,
        };
        let (seq, old_nb, state) = (task.stored.seq, task.stored.not_before, task.state.clone());
        self.unindex(seq, old_nb, &state);
        let Some(task) = self.tasks.get_mut(id) else {
            return;
        };
        task.stored.worker = None;
        task.stored.reason = Some(reason);
        task.stored.not_before = if delay > 0 { now + delay } else { 0 };
        task.state = if delay > 0 {
            State::Delayed
        } else {
            State::Ready
        };
        let (nb, st) = (task.stored.not_before, task.state.clone());
        self.index(id, seq, nb, &st);
        self.touch(id);
        self.changed = true;
    }

    /// Moves a task to the dead letters and announces it on `…/dead`, now
    /// if its body is cached, otherwise once it is read.
    pub fn dead_letter(&mut self, id: &str, reason: String, cache: &mut Cache, fx: &mut Effects) {
        let Some(mut task) = self.tasks.remove(id) else {
            return;
        };
        self.unindex(task.stored.seq, task.stored.not_before, &task.state);
        task.stored.reason = Some(reason);
        task.stored.worker = None;
        tracing::warn!(queue = %self.name, id, attempts = task.stored.attempts, reason = ?task.stored.reason, "task dead-lettered");
        match cache.get(task.stored.seq) {
            Some(body) => {
                let reason = task.stored.reason.as_deref();
                if let Some(bytes) = record(id, &self.name, &task.stored, Some(&body), None, reason)
                {
                    fx.now.push(Outgoing::plain(self.topic("dead"), bytes));
                }
            }
            None => fx.unread_dead.push(DeadNotice {
                queue: self.name.clone(),
                topic: self.topic("dead"),
                id: id.to_string(),
                stored: task.stored.clone(),
            }),
        }
        // Its record moves from `tasks` to `dead`; its body stays.
        self.forget(id, &task, cache, true);
        if let Some(bytes) = encode(&task.stored) {
            fx.ops.push(Op::PutDead {
                queue: self.name.clone(),
                id: id.to_string(),
                bytes,
            });
        }
        self.dead_order.insert(task.stored.seq, id.to_string());
        self.dead.insert(id.to_string(), task.stored);
        self.changed = true;
    }

    /// `progress`: a fresh ack wait. When `claimer` is another member of the
    /// shared group than the addressed worker, it took the task on its own
    /// credit, so the credit moves back to the addressed worker.
    pub fn progress(&mut self, id: &str, claimer: Option<&str>, now: u64) {
        let Some(holder) = self.inflight_worker(id) else {
            return;
        };
        let new_holder = match claimer {
            Some(c) if c != holder => {
                if let Some(credit) = self.credits.get_mut(&holder) {
                    *credit = (*credit + 1).min(i64::from(MAX_CREDITS));
                }
                if let Some(credit) = self.credits.get_mut(c) {
                    *credit -= 1;
                }
                c.to_string()
            }
            _ => holder,
        };
        let deadline = now + self.limits.ack_wait.as_millis() as u64;
        self.set_state(
            id,
            State::Inflight {
                worker: new_holder.clone(),
                deadline,
            },
        );
        if let Some(task) = self.tasks.get_mut(id) {
            task.stored.worker = Some(new_holder);
        }
    }

    /// Hands a delivered task back without counting the delivery. A member
    /// that was not the addressed worker never used that worker's credit, so
    /// it is given back.
    pub fn release(&mut self, id: &str, releaser: Option<&str>) {
        let Some(holder) = self.inflight_worker(id) else {
            return;
        };
        if releaser.is_some_and(|r| r != holder) {
            if let Some(credit) = self.credits.get_mut(&holder) {
                *credit = (*credit + 1).min(i64::from(MAX_CREDITS));
            }
        }
        self.set_state(id, State::Ready);
        if let Some(task) = self.tasks.get_mut(id) {
            task.stored.attempts = task.stored.attempts.saturating_sub(1);
            task.stored.worker = None;
            task.stored.not_before = 0;
            self.touch(id);
        }
    }

    /// The worker is gone: forget its credit and deliver what it held to
    /// someone else now. Those deliveries count as attempts, since the task
    /// may be what killed the worker.
    pub fn worker_gone(
        &mut self,
        worker: &str,
        now: u64,
        cache: &mut Cache,
        fx: &mut Effects,
    ) -> usize {
        self.credits.remove(worker);
        self.directed.remove(worker);
        let held: Vec<String> = self
            .inflight
            .values()
            .filter(|id| self.inflight_worker(id).as_deref() == Some(worker))
            .cloned()
            .collect();
        for id in &held {
            self.counters.failed += 1;
            self.counters_dirty = true;
            let reason = format!("worker {worker} lost");
            self.retry_or_dead(id, reason, None, false, now, cache, fx);
        }
        self.changed = true;
        held.len()
    }

    /// Delayed tasks whose time came, and in-flight tasks whose ack wait ran out.
    pub fn on_time(&mut self, now: u64, cache: &mut Cache, fx: &mut Effects) {
        let due: Vec<String> = self
            .delayed
            .range(..(now + 1, 0))
            .map(|(_, id)| id.clone())
            .collect();
        for id in due {
            self.set_state(&id, State::Ready);
        }
        let expired: Vec<String> = self
            .inflight
            .range(..(now + 1, 0))
            .map(|(_, id)| id.clone())
            .collect();
        for id in expired {
            tracing::info!(queue = %self.name, id, "ack wait expired; delivering again");
            self.counters.failed += 1;
            self.counters_dirty = true;
            let reason = "ack wait expired".to_string();
            self.retry_or_dead(&id, reason, None, false, now, cache, fx);
        }
    }

    /// Store op for the totals if they changed.
    pub fn take_counters(&mut self, ops: &mut Vec<Op>) {
        if self.counters_dirty {
            self.counters_dirty = false;
            ops.push(Op::Counters {
                queue: self.name.clone(),
                counters: self.counters,
            });
        }
    }

    pub fn stats(&mut self, now: u64) -> Stats {
        let oldest_ready = self
            .ready
            .values()
            .next()
            .and_then(|id| self.tasks.get(id))
            .map(|t| t.stored.created_at);
        let oldest_delayed = self
            .delayed
            .values()
            .filter_map(|id| self.tasks.get(id))
            .map(|t| t.stored.created_at)
            .min();
        let oldest = match (oldest_ready, oldest_delayed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let (enqueue_rate, ack_rate) = match self.last_stats {
            Some((at, prev)) if now > at => {
                let secs = (now - at) as f64 / 1000.0;
                (
                    (self.counters.enqueued.saturating_sub(prev.enqueued)) as f64 / secs,
                    (self.counters.acked.saturating_sub(prev.acked)) as f64 / secs,
                )
            }
            _ => (0.0, 0.0),
        };
        self.last_stats = Some((now, self.counters));
        Stats {
            queue: self.name.clone(),
            depth: (self.ready.len() + self.delayed.len()) as u64,
            inflight: self.inflight.len() as u64,
            dead: self.dead.len() as u64,
            enqueued_total: self.counters.enqueued,
            acked_total: self.counters.acked,
            failed_total: self.counters.failed,
            refused_total: self.counters.refused,
            bytes: self.bytes,
            oldest_age_ms: oldest.map_or(0, |c| now.saturating_sub(c)),
            timestamp: now,
            enqueue_rate: (enqueue_rate * 10.0).round() / 10.0,
            ack_rate: (ack_rate * 10.0).round() / 10.0,
            credits: self.credits.values().map(|c| (*c).max(0) as u64).sum(),
            workers: self.credits.len() as u64,
            stray_acks_total: self.counters.stray_acks,
        }
    }

    /// What `/metrics` shows of this queue: the O(1) part of [`Queue::stats`].
    pub(crate) fn figures(&self) -> crate::metrics::Figures {
        crate::metrics::Figures {
            depth: (self.ready.len() + self.delayed.len()) as u64,
            inflight: self.inflight.len() as u64,
            dead: self.dead.len() as u64,
            bytes: self.bytes,
            enqueued: self.counters.enqueued,
            acked: self.counters.acked,
            failed: self.counters.failed,
            refused: self.counters.refused,
            workers: self.credits.len() as u64,
        }
    }

    pub fn stats_topic(&self) -> String {
        self.topic("stats")
    }

    /// Whether the retained stats still describe a moving queue (ages grow).
    pub fn busy(&self) -> bool {
        !self.tasks.is_empty()
    }

    /// A task as ops tools see it, with its seq: the owner fills in the
    /// payload from the body.
    fn view(id: &str, stored: &StoredTask, state: &str) -> (u64, TaskView) {
        let view = TaskView {
            id: id.to_string(),
            state: state.to_string(),
            attempts: stored.attempts,
            max_attempts: stored.max_attempts,
            created_at: stored.created_at,
            worker: stored.worker.clone(),
            reason: stored.reason.clone(),
            not_before: (stored.not_before > 0).then_some(stored.not_before),
            payload: RawValue::NULL.to_owned(),
        };
        (stored.seq, view)
    }

    pub fn show(&self, limit: usize) -> (Vec<WorkerView>, Vec<(u64, TaskView)>) {
        let mut workers: Vec<WorkerView> = self
            .credits
            .iter()
            .map(|(w, c)| WorkerView {
                worker: w.clone(),
                credits: u32::try_from((*c).max(0)).unwrap_or(u32::MAX),
                holding: 0,
            })
            .collect();
        let mut tasks = Vec::new();
        for id in self.inflight.values() {
            if let Some(Task {
                stored,
                state: State::Inflight { worker, .. },
                ..
            }) = self.tasks.get(id)
            {
                match workers.iter_mut().find(|w| &w.worker == worker) {
                    Some(w) => w.holding += 1,
                    None => workers.push(WorkerView {
                        worker: worker.clone(),
                        credits: 0,
                        holding: 1,
                    }),
                }
                if tasks.len() < limit {
                    tasks.push(Self::view(id, stored, "inflight"));
                }
            }
        }
        let waiting = self
            .ready
            .values()
            .map(|id| (id, "ready"))
            .chain(self.delayed.values().map(|id| (id, "delayed")));
        for (id, state) in waiting {
            if tasks.len() >= limit {
                break;
            }
            if let Some(task) = self.tasks.get(id) {
                tasks.push(Self::view(id, &task.stored, state));
            }
        }
        workers.sort_by(|a, b| a.worker.cmp(&b.worker));
        (workers, tasks)
    }

    pub fn dead_list(&self, limit: usize) -> Vec<(u64, TaskView)> {
        self.dead_order
            .values()
            .filter_map(|id| self.dead.get(id).map(|s| Self::view(id, s, "dead")))
            .take(limit)
            .collect()
    }

    /// Dead letters back to the queue with a fresh attempt count (their
    /// bodies never left the store; no limit refuses them, as they were
    /// accepted once). A dead letter whose id is live again (re-enqueued
    /// since) is left alone.
    pub fn retry_dead(&mut self, id: Option<&str>, fx: &mut Effects) -> u64 {
        let ids: Vec<String> = match id {
            Some(id) => self
                .dead
                .contains_key(id)
                .then(|| id.to_string())
                .into_iter()
                .collect(),
            None => self.dead_order.values().cloned().collect(),
        };
        let mut moved = 0;
        for id in ids {
            if self.tasks.contains_key(&id) {
                continue;
            }
            let Some(mut stored) = self.dead.remove(&id) else {
                continue;
            };
            self.dead_order.remove(&stored.seq);
            stored.attempts = 0;
            stored.not_before = 0;
            stored.worker = None;
            fx.ops.push(Op::DeleteDead {
                queue: self.name.clone(),
                id: id.clone(),
            });
            self.touch(&id);
            self.index(&id, stored.seq, 0, &State::Ready);
            self.bytes += stored.size;
            self.tasks.insert(
                id,
                Task {
                    stored,
                    state: State::Ready,
                    on_disk: false,
                },
            );
            moved += 1;
        }
        self.changed = true;
        moved
    }

    /// Drops every waiting task and dead letter; in-flight ones finish.
    pub fn purge(&mut self, cache: &mut Cache, fx: &mut Effects) -> u64 {
        let waiting: Vec<String> = self
            .ready
            .values()
            .chain(self.delayed.values())
            .cloned()
            .collect();
        let mut removed = 0;
        for id in waiting {
            if let Some(task) = self.tasks.remove(&id) {
                self.unindex(task.stored.seq, task.stored.not_before, &task.state);
                self.forget(&id, &task, cache, false);
                removed += 1;
            }
        }
        for (id, stored) in std::mem::take(&mut self.dead) {
            fx.ops.push(Op::DeleteDead {
                queue: self.name.clone(),
                id,
            });
            if cache.forget(stored.seq) {
                fx.ops.push(Op::DeleteBody { seq: stored.seq });
            }
            removed += 1;
        }
        self.dead_order.clear();
        self.changed = true;
        removed
    }

    /// The record of a new task whose body weighs `size` bytes.
    pub fn new_task(&self, seq: u64, size: u64, now: u64) -> StoredTask {
        StoredTask {
            seq,
            size,
            created_at: now,
            attempts: 0,
            max_attempts: self.limits.default_max_attempts,
            not_before: 0,
            reason: None,
            worker: None,
        }
    }
}

/// Where a task not held by any worker waits.
fn waiting(stored: &StoredTask, now: u64) -> State {
    if stored.not_before > now {
        State::Delayed
    } else {
        State::Ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            ack_wait: Duration::from_millis(1000),
            default_max_attempts: 2,
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
            max_depth: 0,
            max_bytes: 0,
        }
    }

    /// A queue, its effects, and a body cache of `cache_bytes`.
    struct Setup {
        q: Queue,
        fx: Effects,
        cache: Cache,
    }

    fn body(text: String) -> Arc<Body> {
        Arc::new(Body {
            payload: RawValue::from_string(text).unwrap(),
            reply_to: None,
            correlation_id: None,
        })
    }

    impl Setup {
        fn new(limits: Limits, cache_bytes: u64) -> Self {
            Setup {
                q: Queue::new("p", "q", limits, Counters::default()),
                fx: Effects::default(),
                cache: Cache::new(cache_bytes),
            }
        }

        fn enqueue(&mut self, id: &str, seq: u64) {
            let body = body(seq.to_string());
            let task = self.q.new_task(seq, body.size(), 0);
            self.q.enqueue(id.into(), task, body, &mut self.cache, 0);
        }

        fn dispatch(&mut self, now: u64) -> usize {
            self.q
                .dispatch(now, 100, false, &mut self.cache, &mut self.fx)
        }

        /// Keys the store would write, in order, as a commit takes them.
        fn taken(&mut self) -> Vec<String> {
            let mut ops = Vec::new();
            self.q.take_ops(&mut ops);
            self.cache.take_writes(&mut ops);
            ops.iter()
                .map(|op| match op {
                    Op::Put { id, .. } => format!("put {id}"),
                    Op::Delete { id, .. } => format!("delete {id}"),
                    Op::PutBody { seq, .. } => format!("body {seq}"),
                    Op::DeleteBody { seq } => format!("delete body {seq}"),
                    other => format!("{other:?}"),
                })
                .collect()
        }

        /// Payloads delivered so far, in order.
        fn delivered(&mut self) -> Vec<String> {
            self.fx
                .now
                .drain(..)
                .filter(|o| o.topic.ends_with("/tasks"))
                .map(|o| {
                    let v: serde_json::Value = serde_json::from_slice(&o.payload).unwrap();
                    v["payload"].to_string()
                })
                .collect()
        }
    }

    fn queue_with(n: u64) -> Setup {
        let mut s = Setup::new(limits(), 1 << 20);
        for i in 0..n {
            s.enqueue(&format!("t{i}"), i);
        }
        s
    }

    #[test]
    fn nothing_goes_out_without_credit() {
        let mut s = queue_with(3);
        assert_eq!(s.dispatch(0), 0);
        s.q.ready("w", 2, false, false);
        assert_eq!(s.dispatch(0), 2);
        assert_eq!(s.q.stats(0).depth, 1);
        assert_eq!(s.q.stats(0).inflight, 2);
    }

    #[test]
    fn a_worker_that_asks_for_directed_delivery_gets_its_tasks_on_its_own_topic() {
        let mut s = queue_with(3);
        s.q.ready("w1", 1, false, true);
        s.dispatch(0);
        s.q.ready("w2", 1, false, false);
        s.dispatch(0);
        let topics: Vec<String> = s.fx.now.drain(..).map(|o| o.topic).collect();
        assert_eq!(
            topics,
            ["axion/p/queue/q/tasks/w1", "axion/p/queue/q/tasks"]
        );
        // Every worker, whatever it asked, once the owner directs them all.
        s.q.ready("w2", 1, false, false);
        s.q.dispatch(0, 10, true, &mut s.cache, &mut s.fx);
        assert_eq!(s.fx.now[0].topic, "axion/p/queue/q/tasks/w2");
    }

    #[test]
    fn acks_twice_or_from_another_worker_are_counted_and_still_honoured() {
        let mut s = queue_with(2);
        s.q.ready("w1", 2, false, true);
        s.dispatch(0);
        assert_eq!(s.q.classify_ack("t0", Some("w1"), 0), AckKind::Expected);
        s.q.ack("t0", &mut s.cache);
        assert_eq!(s.q.classify_ack("t0", Some("w1"), 0), AckKind::Repeated);
        assert_eq!(s.q.classify_ack("t1", Some("w2"), 0), AckKind::Foreign);
        s.q.ack("t1", &mut s.cache);
        assert_eq!(s.q.classify_ack("nope", None, 0), AckKind::Unknown);
        let stats = s.q.stats(0);
        assert_eq!(
            (stats.stray_acks_total, stats.acked_total, stats.inflight),
            (2, 2, 0)
        );
    }

    #[test]
    fn fail_retries_then_dead_letters() {
        let mut s = queue_with(1);
        s.q.ready("w", 5, false, false);
        s.dispatch(0);
        let (q, cache, fx) = (&mut s.q, &mut s.cache, &mut s.fx);
        q.fail("t0", Some("boom".into()), None, 0, cache, fx);
        assert_eq!(q.stats(0).depth, 1, "backing off");
        q.on_time(100_000, cache, fx);
        q.dispatch(100_000, 10, false, cache, fx);
        q.fail("t0", Some("boom".into()), None, 100_000, cache, fx);
        let stats = q.stats(100_000);
        assert_eq!((stats.depth, stats.inflight, stats.dead), (0, 0, 1));
        assert_eq!(q.dead_list(10)[0].1.reason.as_deref(), Some("boom"));
        let dead = fx.now.iter().find(|o| o.topic.ends_with("/dead")).unwrap();
        let dead: serde_json::Value = serde_json::from_slice(&dead.payload).unwrap();
        assert_eq!(
            (dead["id"].as_str(), dead["payload"].as_i64()),
            (Some("t0"), Some(0))
        );
        assert_eq!(q.retry_dead(None, fx), 1);
        assert_eq!(q.stats(100_000).depth, 1);
    }

    #[test]
    fn release_by_other_member_restores_credit_and_attempts() {
        let mut s = queue_with(1);
        s.q.ready("w", 1, false, false);
        s.dispatch(0);
        s.q.release("t0", Some("x"));
        assert_eq!(s.q.stats(0).credits, 1);
        s.dispatch(0);
        let (_, tasks) = s.q.show(10);
        assert_eq!(tasks[0].1.attempts, 1);
    }

    #[test]
    fn a_task_finished_before_the_commit_never_reaches_the_store() {
        let mut s = queue_with(2);
        s.q.ready("w", 2, false, false);
        s.dispatch(0);
        s.q.ack("t0", &mut s.cache);
        assert_eq!(
            s.taken(),
            ["put t1", "body 1"],
            "t0 was done before any commit"
        );
        assert!(s.taken().is_empty(), "nothing changed since");
        s.q.ack("t1", &mut s.cache);
        assert_eq!(s.taken(), ["delete t1", "delete body 1"]);
        // The same id again, after its first life reached the disk.
        let mut s = queue_with(1);
        assert_eq!(s.taken(), ["put t0", "body 0"]);
        s.q.ack("t0", &mut s.cache);
        s.enqueue("t0", 9);
        assert_eq!(
            s.taken(),
            ["delete t0", "delete body 0", "put t0", "body 9"],
            "the put wins"
        );
    }

    #[test]
    fn lost_worker_tasks_go_back_at_once() {
        let mut s = queue_with(2);
        s.q.ready("w", 2, false, false);
        s.dispatch(0);
        assert_eq!(s.q.worker_gone("w", 1, &mut s.cache, &mut s.fx), 2);
        let stats = s.q.stats(1);
        assert_eq!((stats.depth, stats.inflight, stats.credits), (2, 0, 0));
    }

    /// Only bodies on disk leave the cache; dispatch stops at the first one
    /// not in it, and goes on in order once it is read back.
    #[test]
    fn dispatch_waits_for_bodies_not_in_the_cache_and_keeps_order() {
        // Bodies are "10" … "14": two bytes each; room for two.
        let mut s = Setup::new(limits(), 4);
        for seq in 10..15 {
            s.enqueue(&format!("t{seq}"), seq);
        }
        s.cache.trim();
        assert_eq!(s.cache.bytes(), 10, "none is on disk yet");
        s.taken();
        s.cache.committed();
        s.cache.trim();
        assert_eq!(s.cache.bytes(), 4);
        s.q.ready("w", 10, false, false);
        assert!(s.q.waits_for_bodies(&s.cache));
        assert_eq!(s.dispatch(0), 0, "the head is not in the cache");
        let unread = s.q.unread_head(&s.cache, 4, 10);
        let seqs: Vec<u64> = unread.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, [10, 11], "about 4 bytes, in order");
        // A body as read back from disk: its payload is its seq.
        let read_back = |seq: u64| Body {
            payload: RawValue::from_string(seq.to_string()).unwrap(),
            reply_to: None,
            correlation_id: None,
        };
        for (seq, id) in unread {
            assert_eq!(s.q.waiting_seq(&id), Some(seq));
            s.cache.insert_read(seq, read_back(seq));
        }
        assert_eq!(s.dispatch(0), 2);
        s.cache.trim();
        assert_eq!(s.dispatch(0), 0, "12 was never read back");
        let unread = s.q.unread_head(&s.cache, 100, 10);
        assert_eq!(unread.first().map(|(seq, _)| *seq), Some(12));
        for (seq, _) in unread {
            s.cache.insert_read(seq, read_back(seq));
        }
        assert_eq!(s.dispatch(0), 3);
        assert_eq!(s.delivered(), ["10", "11", "12", "13", "14"]);
        assert!(!s.q.waits_for_bodies(&s.cache));
    }

    #[test]
    fn a_dead_letter_whose_body_is_not_cached_is_announced_once_read() {
        let mut s = Setup::new(limits(), 0);
        s.enqueue("t", 1);
        s.taken();
        s.cache.committed();
        s.q.ready("w", 1, false, false);
        s.dispatch(0);
        s.cache.trim();
        s.q.dead_letter("t", "poison".into(), &mut s.cache, &mut s.fx);
        assert!(s.fx.now.iter().all(|o| !o.topic.ends_with("/dead")));
        let notice = s.fx.unread_dead.pop().expect("waits for its body");
        assert_eq!((notice.id.as_str(), notice.stored.seq), ("t", 1));
        let body = Body {
            payload: RawValue::from_string("1".into()).unwrap(),
            reply_to: None,
            correlation_id: None,
        };
        let v: serde_json::Value =
            serde_json::from_slice(&notice.encode(Some(&body)).unwrap()).unwrap();
        assert_eq!(
            (v["payload"].as_i64(), v["reason"].as_str()),
            (Some(1), Some("poison"))
        );
        // Its record moves to the dead letters, its body stays on disk.
        assert_eq!(s.taken(), ["delete t"]);
    }

    #[test]
    fn a_full_queue_refuses_counts_and_keeps_what_it_has() {
        let mut s = Setup::new(
            Limits {
                max_depth: 2,
                max_bytes: 5,
                ..limits()
            },
            100,
        );
        s.q.admit(1, 0).unwrap();
        s.enqueue("a", 1);
        s.q.admit(1, 0).unwrap();
        s.enqueue("b", 2);
        let refused = s.q.admit(1, 0).unwrap_err();
        assert_eq!(
            (refused.limit, refused.depth, refused.max_depth),
            (Full::Depth, 2, 2)
        );
        assert!(
            refused.message("q").contains("depth limit is 2"),
            "{}",
            refused.message("q")
        );
        s.q.ready("w", 1, false, false);
        s.dispatch(0);
        s.q.report_refusals(1, false);
        assert!(s.q.refusing.is_some(), "no room yet");
        s.q.ack("a", &mut s.cache);
        s.q.report_refusals(1, false);
        assert!(s.q.refusing.is_none(), "room again");
        // Bytes: "2" holds 1 of 5; a 5-byte body would pass the limit.
        let refused = s.q.admit(5, 2).unwrap_err();
        assert_eq!(
            (refused.limit, refused.bytes, refused.size),
            (Full::Bytes, 1, 5)
        );
        s.q.admit(4, 2).unwrap();
        let stats = s.q.stats(3);
        assert_eq!((stats.depth, stats.refused_total, stats.bytes), (1, 2, 1));
    }
}
