//! One queue's in-memory state and its rules (JetStream-style work queue):
//! which tasks wait, which are in flight and with whom, the credit each
//! worker announced, and what each worker message does to them.
//!
//! It performs no I/O. Every change it makes is described as [`Effects`]
//! (MQTT messages the owner publishes) or noted as a task whose record
//! changed, which [`Queue::take_ops`] turns into store operations when the
//! owner starts its next group commit. Keeping the rules free of I/O keeps
//! them easy to follow and to test.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use bytes::Bytes;
use serde_json::value::RawValue;

use super::proto::{Stats, TaskRecord, TaskView, WorkerView};
use super::store::{Counters, Op, StoredTask};

/// No worker may hold more announced credit than this; a runaway producer
/// of `ready` messages must not overflow anything.
const MAX_CREDITS: u32 = 100_000;

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
}

pub struct Queue {
    pub name: String,
    topic_prefix: String,
    limits: Limits,
    tasks: HashMap<String, Task>,
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
    counters: Counters,
    counters_dirty: bool,
    /// Tasks whose record changed since the last batch was taken: their
    /// current state is encoded once per commit, however often it changed.
    /// In id order: time-ordered ids (UUID v7) then fill B-tree pages one
    /// after another.
    dirty: BTreeSet<String>,
    /// Tasks that ended (acked, dead-lettered, purged) while on disk.
    gone: Vec<String>,
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

impl Queue {
    pub fn new(package: &str, name: &str, limits: Limits, counters: Counters) -> Self {
        Self {
            name: name.to_string(),
            topic_prefix: format!("axion/{package}/queue/{name}/"),
            limits,
            tasks: HashMap::new(),
            ready: BTreeMap::new(),
            delayed: BTreeMap::new(),
            inflight: BTreeMap::new(),
            dead: HashMap::new(),
            dead_order: BTreeMap::new(),
            credits: HashMap::new(),
            counters,
            counters_dirty: false,
            dirty: BTreeSet::new(),
            gone: Vec::new(),
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

    /// Notes that a task left the queue: its record goes, if it has one.
    fn forget(&mut self, id: &str, task: &Task) {
        self.dirty.remove(id);
        if task.on_disk {
            self.gone.push(id.to_string());
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
    /// for the group commit about to start.
    pub fn take_ops(&mut self, ops: &mut Vec<Op>) {
        // Deletes first: an id that ended and was enqueued again since is
        // put back by its Put (the store keeps the last op on a key).
        for id in self.gone.drain(..) {
            ops.push(Op::Delete {
                queue: self.name.clone(),
                id,
            });
        }
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

    /// Accepts a new task, deliverable at once (or at its `not_before`).
    /// Its producer's confirmation waits for the commit; delivery does not,
    /// so a slow commit holds up no worker, and a task delivered and acked
    /// before the next commit starts never reaches the disk at all.
    pub fn enqueue(&mut self, id: String, stored: StoredTask, now: u64) {
        self.touch(&id);
        self.counters.enqueued += 1;
        self.counters_dirty = true;
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

    /// Adds (or with `reset`, sets) a worker's credit.
    pub fn ready(&mut self, worker: &str, credits: u32, reset: bool) {
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

    /// Delivers waiting tasks while workers have credit, at most `budget`.
    /// The worker with the most free credit gets the next task, so load goes
    /// where there is room.
    pub fn dispatch(&mut self, now: u64, mut budget: usize, fx: &mut Effects) -> usize {
        let mut sent = 0;
        while budget > 0 {
            let Some((&seq, _)) = self.ready.first_key_value() else {
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
            let tasks_topic = self.topic("tasks");
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
            let record = TaskRecord {
                id: &id,
                queue: &self.name,
                payload: &task.stored.payload,
                created_at: task.stored.created_at,
                attempts: task.stored.attempts,
                reply_to: task.stored.reply_to.as_deref(),
                correlation_id: task.stored.correlation_id.as_deref(),
                worker: Some(&worker),
                reason: None,
            };
            if let Ok(body) = serde_json::to_vec(&record) {
                fx.now.push(Outgoing::plain(tasks_topic, body));
            }
            self.touch(&id);
            self.changed = true;
            sent += 1;
            budget -= 1;
        }
        sent
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

    pub fn ack(&mut self, id: &str) {
        let Some(task) = self.tasks.remove(id) else {
            tracing::debug!(queue = %self.name, id, "ack for an unknown task");
            return;
        };
        self.unindex(task.stored.seq, task.stored.not_before, &task.state);
        self.forget(id, &task);
        self.counters.acked += 1;
        self.counters_dirty = true;
        self.changed = true;
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
        fx: &mut Effects,
    ) {
        if self.inflight_worker(id).is_none() {
            tracing::debug!(queue = %self.name, id, "fail for a task not in flight");
            return;
        }
        self.counters.failed += 1;
        self.counters_dirty = true;
        let reason = reason.unwrap_or_else(|| "failed".to_string());
        self.retry_or_dead(id, reason, retry_after, true, now, fx);
    }

    /// After a failed delivery: dead letter once attempts are used up,
    /// otherwise wait (backoff) or go straight back to the queue.
    fn retry_or_dead(
        &mut self,
        id: &str,
        reason: String,
        retry_after: Option<u64>,
        backoff: bool,
        now: u64,
        fx: &mut Effects,
    ) {
        let Some(task) = self.tasks.get(id) else {
            return;
        };
        if task.stored.attempts >= task.stored.max_attempts {
            self.dead_letter(id, reason, fx);
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

    fn dead_letter(&mut self, id: &str, reason: String, fx: &mut Effects) {
        let Some(mut task) = self.tasks.remove(id) else {
            return;
        };
        self.unindex(task.stored.seq, task.stored.not_before, &task.state);
        task.stored.reason = Some(reason);
        task.stored.worker = None;
        tracing::warn!(queue = %self.name, id, attempts = task.stored.attempts, reason = ?task.stored.reason, "task dead-lettered");
        let record = TaskRecord {
            id,
            queue: &self.name,
            payload: &task.stored.payload,
            created_at: task.stored.created_at,
            attempts: task.stored.attempts,
            reply_to: task.stored.reply_to.as_deref(),
            correlation_id: task.stored.correlation_id.as_deref(),
            worker: None,
            reason: task.stored.reason.as_deref(),
        };
        if let Ok(body) = serde_json::to_vec(&record) {
            fx.now.push(Outgoing::plain(self.topic("dead"), body));
        }
        self.forget(id, &task);
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
    pub fn worker_gone(&mut self, worker: &str, now: u64, fx: &mut Effects) -> usize {
        self.credits.remove(worker);
        let held: Vec<String> = self
            .inflight
            .values()
            .filter(|id| self.inflight_worker(id).as_deref() == Some(worker))
            .cloned()
            .collect();
        for id in &held {
            self.counters.failed += 1;
            self.counters_dirty = true;
            self.retry_or_dead(id, format!("worker {worker} lost"), None, false, now, fx);
        }
        self.changed = true;
        held.len()
    }

    /// Delayed tasks whose time came, and in-flight tasks whose ack wait ran out.
    pub fn on_time(&mut self, now: u64, fx: &mut Effects) {
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
            self.retry_or_dead(&id, "ack wait expired".into(), None, false, now, fx);
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
            oldest_age_ms: oldest.map_or(0, |c| now.saturating_sub(c)),
            timestamp: now,
            enqueue_rate: (enqueue_rate * 10.0).round() / 10.0,
            ack_rate: (ack_rate * 10.0).round() / 10.0,
            credits: self.credits.values().map(|c| (*c).max(0) as u64).sum(),
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

    fn view(id: &str, stored: &StoredTask, state: &str) -> TaskView {
        TaskView {
            id: id.to_string(),
            state: state.to_string(),
            attempts: stored.attempts,
            max_attempts: stored.max_attempts,
            created_at: stored.created_at,
            worker: stored.worker.clone(),
            reason: stored.reason.clone(),
            not_before: (stored.not_before > 0).then_some(stored.not_before),
            payload: stored.payload.clone(),
        }
    }

    pub fn show(&self, limit: usize) -> (Vec<WorkerView>, Vec<TaskView>) {
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

    pub fn dead_list(&self, limit: usize) -> Vec<TaskView> {
        self.dead_order
            .values()
            .filter_map(|id| self.dead.get(id).map(|s| Self::view(id, s, "dead")))
            .take(limit)
            .collect()
    }

    /// Dead letters back to the queue with a fresh attempt count. A dead
    /// letter whose id is live again (re-enqueued since) is left alone.
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
    pub fn purge(&mut self, fx: &mut Effects) -> u64 {
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
                self.forget(&id, &task);
                removed += 1;
            }
        }
        for id in std::mem::take(&mut self.dead).into_keys() {
            fx.ops.push(Op::DeleteDead {
                queue: self.name.clone(),
                id,
            });
            removed += 1;
        }
        self.dead_order.clear();
        self.changed = true;
        removed
    }

    pub fn new_task(&self, payload: Box<RawValue>, seq: u64, now: u64) -> StoredTask {
        StoredTask {
            seq,
            payload,
            created_at: now,
            attempts: 0,
            max_attempts: self.limits.default_max_attempts,
            reply_to: None,
            correlation_id: None,
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
        }
    }

    fn queue_with(n: u64) -> (Queue, Effects) {
        let mut q = Queue::new("p", "q", limits(), Counters::default());
        let fx = Effects::default();
        for i in 0..n {
            let payload = RawValue::from_string(i.to_string()).unwrap();
            let task = q.new_task(payload, i, 0);
            q.enqueue(format!("t{i}"), task, 0);
        }
        (q, fx)
    }

    #[test]
    fn nothing_goes_out_without_credit() {
        let (mut q, mut fx) = queue_with(3);
        assert_eq!(q.dispatch(0, 100, &mut fx), 0);
        q.ready("w", 2, false);
        assert_eq!(q.dispatch(0, 100, &mut fx), 2);
        assert_eq!(q.stats(0).depth, 1);
        assert_eq!(q.stats(0).inflight, 2);
    }

    #[test]
    fn fail_retries_then_dead_letters() {
        let (mut q, mut fx) = queue_with(1);
        q.ready("w", 5, false);
        q.dispatch(0, 10, &mut fx);
        q.fail("t0", Some("boom".into()), None, 0, &mut fx);
        assert_eq!(q.stats(0).depth, 1, "backing off");
        q.on_time(100_000, &mut fx);
        q.dispatch(100_000, 10, &mut fx);
        q.fail("t0", Some("boom".into()), None, 100_000, &mut fx);
        let s = q.stats(100_000);
        assert_eq!((s.depth, s.inflight, s.dead), (0, 0, 1));
        assert_eq!(q.dead_list(10)[0].reason.as_deref(), Some("boom"));
        assert_eq!(q.retry_dead(None, &mut fx), 1);
        assert_eq!(q.stats(100_000).depth, 1);
    }

    #[test]
    fn release_by_other_member_restores_credit_and_attempts() {
        let (mut q, mut fx) = queue_with(1);
        q.ready("w", 1, false);
        q.dispatch(0, 10, &mut fx);
        q.release("t0", Some("x"));
        assert_eq!(q.stats(0).credits, 1);
        q.dispatch(0, 10, &mut fx);
        let (_, tasks) = q.show(10);
        assert_eq!(tasks[0].attempts, 1);
    }

    /// Keys the store would write, in order.
    fn taken(q: &mut Queue) -> Vec<String> {
        let mut ops = Vec::new();
        q.take_ops(&mut ops);
        ops.iter()
            .map(|op| match op {
                Op::Put { id, .. } => format!("put {id}"),
                Op::Delete { id, .. } => format!("delete {id}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_task_finished_before_the_commit_never_reaches_the_store() {
        let (mut q, mut fx) = queue_with(2);
        q.ready("w", 2, false);
        q.dispatch(0, 10, &mut fx);
        q.ack("t0");
        assert_eq!(taken(&mut q), ["put t1"], "t0 was done before any commit");
        assert!(taken(&mut q).is_empty(), "nothing changed since");
        q.ack("t1");
        assert_eq!(taken(&mut q), ["delete t1"]);
        // The same id again, after its first life reached the disk.
        let (mut q, _) = queue_with(1);
        assert_eq!(taken(&mut q), ["put t0"]);
        q.ack("t0");
        let again = q.new_task(RawValue::from_string("1".into()).unwrap(), 9, 0);
        q.enqueue("t0".into(), again, 0);
        assert_eq!(taken(&mut q), ["delete t0", "put t0"], "the put wins");
    }

    #[test]
    fn lost_worker_tasks_go_back_at_once() {
        let (mut q, mut fx) = queue_with(2);
        q.ready("w", 2, false);
        q.dispatch(0, 10, &mut fx);
        assert_eq!(q.worker_gone("w", 1, &mut fx), 2);
        let s = q.stats(1);
        assert_eq!((s.depth, s.inflight, s.credits), (2, 0, 0));
    }
}
