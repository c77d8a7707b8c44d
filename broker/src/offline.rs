//! What a kept session is owed, on disk: a queue per session, bounded,
//! so that a QoS 1/2 publish the broker acknowledged reaches every kept
//! session it matched across a clean stop and `kill -9`.
//!
//! rumqttd keeps a persistent session's messages only in its in-memory
//! filter logs. That loses them on a restart, makes every publisher to an
//! away session's topics wait for it (flow control keeps the router from
//! overwriting what it has not read), and keeps a router renewal waiting
//! for as long as the session is owed anything. So with a data directory
//! the front end keeps what each kept session is owed itself.
//!
//! **Capture**, by the publisher's session: a QoS 1/2 publish matching a
//! kept session's filters is written to its queue before the router sees
//! it, and the publisher's PUBACK waits for the commit (see
//! `Session::outgoing`). What happens next depends on the session:
//! - **Connected**: the entry is a journal entry. The router delivers the
//!   message as usual; the session finds the entry by content and deletes
//!   it when its client acknowledges the delivery. A `kill -9` in between
//!   leaves it in the queue. The entry is held in memory for a moment
//!   first ([`JOURNAL_GRACE`]): a client that acknowledges within it has
//!   the message, so the entry is never written, and the publisher's
//!   PUBACK waits for that acknowledgement instead of a commit. Only what
//!   a client is slow to take costs a write.
//! - **Away**: the entry is the message, waiting. A **drainer**, a link the
//!   front end holds to the router under the session's id, reads what the
//!   router still had for the session when it left (what the connection
//!   left unacknowledged or never read, unless journaled) and its
//!   shared-subscription turns, writes those, and skips the router's copies
//!   of what is on disk already (an [`Overlap`] count by content). It
//!   acknowledges everything at once: nobody waits for an away session.
//!   Drainer and capture write in two ranges of sequence numbers, so the
//!   queue stays in publish order.
//!
//! When the client comes back the drainer stops and the session reads its
//! queue from disk a batch at a time, as its client takes it (after a sync,
//! so nothing captured is missing); capture keeps queueing behind what it
//! reads until it has read it all, and only then is it live again (a long
//! queue costs neither memory nor the subscriber's buffer, and nothing live
//! overtakes it). The router's copies of what was captured are skipped the
//! same way as by the drainer. A message is deleted when the client
//! acknowledges it. Past `max_messages` or
//! `max_bytes`, new messages for an away session are dropped: counted per
//! session and in total, logged once per episode, and never waited for (a
//! connected session still gets them live, unjournaled).

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttd::local::LinkTx;
use rumqttd::protocol::{Packet, PublishProperties};
use rumqttd::Notification;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::disk::{BrokerDisk, Commit, QueueSummary, QueuedFlags, QueuedMessage};
use crate::expiry::SharedSubscriptions;
use crate::marks::Mark;
use crate::names;
use crate::renewal::Phase;
use crate::router;
use crate::server::Shared;

/// Sequence numbers the drainer may use before capture's range begins;
/// one offline period never writes that many.
const DRAIN_RANGE: u64 = 1 << 40;

/// How long a captured message waits for its router copy before its
/// overlap entry is forgotten (the copy comes within milliseconds; one that
/// never comes must not hide a later message with the same content).
const OVERLAP_TTL: Duration = Duration::from_secs(30);

/// How long a connected session's journal entry waits in memory for its
/// client's acknowledgement before it is written. A write and its fsync
/// take about a millisecond here; a client reading at full speed
/// acknowledges well within this, so its messages never touch the disk,
/// while a slow one delays its publishers by at most this plus a commit.
const JOURNAL_GRACE: Duration = Duration::from_millis(10);

/// Held entries due within this of each other are written together (one
/// wake-up of the writer task per tick under steady traffic, not one per
/// message).
const JOURNAL_TICK: Duration = Duration::from_millis(2);

/// A session whose client let a held entry's grace pass without
/// acknowledging anything in that time is written to at once for this
/// long: holding only helps a client that keeps up, and a publisher beside
/// one that has stopped would wait out every grace. (A client that is
/// reading, only behind, keeps its entries held.)
const JOURNAL_HOLD_OFF: Duration = Duration::from_secs(1);

/// Bytes of journal entries held in memory at most; past it new ones are
/// written at once.
const JOURNAL_HELD_MAX: u64 = 8 << 20;

/// Router copies still to come of messages capture wrote, by content.
#[derive(Debug, Default)]
pub struct Overlap {
    counts: HashMap<u64, (u32, Instant)>,
}

impl Overlap {
    fn add(&mut self, hash: u64, copies: u32) {
        let entry = self.counts.entry(hash).or_insert((0, Instant::now()));
        entry.0 += copies;
        entry.1 = Instant::now();
        if self.counts.len() > 4096 {
            self.counts.retain(|_, (_, at)| at.elapsed() < OVERLAP_TTL);
        }
    }

    /// True (and counted off) if a copy of this content was expected.
    pub fn take(&mut self, hash: u64) -> bool {
        let Some((n, at)) = self.counts.get_mut(&hash) else {
            return false;
        };
        let fresh = at.elapsed() < OVERLAP_TTL;
        *n -= 1;
        if *n == 0 || !fresh {
            self.counts.remove(&hash);
        }
        fresh
    }
}

/// What capture does for a kept session.
/// What a kept session does with a router delivery (see
/// [`Offline::live_copy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveCopy {
    /// A copy of a message it gets (or got) from its queue.
    Skip,
    /// Deliver it; the journal entry (sequence, bytes) to delete once its
    /// client acknowledges it.
    Deliver(Option<(u64, u64)>),
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Nothing: no connection of it since the start, or forgotten.
    #[default]
    Off,
    /// Connected: each message is journaled (on disk until the client
    /// acknowledges its live delivery), so `kill -9` loses none of them.
    Online,
    /// Away: each message is queued, and the drainer reads the router.
    Away,
    /// Back, reading its queue: each message is still queued (behind what
    /// it is reading) until it has read it all.
    Replaying,
}

#[derive(Debug, Default)]
struct QueueState {
    mode: Mode,
    /// Its filters are in the capture index.
    indexed: bool,
    messages: u64,
    bytes: u64,
    last_seq: u64,
    next_drain: u64,
    next_capture: u64,
    overlap: Overlap,
    /// Messages journaled while connected whose live delivery has not come
    /// yet: content hash → (sequence, bytes), oldest first.
    journal: HashMap<u64, VecDeque<(u64, u64)>>,
    /// Journaled messages still on disk: sequence → content hash. Their
    /// router copies are not the drainer's to write.
    pending: HashMap<u64, u64>,
    /// Queued messages the client was sent and did not acknowledge: DUP
    /// when they are sent again.
    sent: HashSet<u64>,
    /// Journal entries not written yet (see [`JOURNAL_GRACE`]), by
    /// sequence.
    held: HashMap<u64, Held>,
    /// No entry is held before this (see [`JOURNAL_HOLD_OFF`]).
    hold_off_until: Option<Instant>,
    /// When its client last acknowledged a journaled message.
    last_ack: Option<Instant>,
    /// Messages dropped at the bound, ever, and whether the current
    /// episode was logged.
    dropped: u64,
    dropping: bool,
}

/// A journal entry held in memory: its value, and what the publisher's
/// acknowledgement waits for (sent on the client's acknowledgement, or by
/// the disk writer once it is written).
#[derive(Debug)]
struct Held {
    value: Vec<u8>,
    done: oneshot::Sender<()>,
}

/// One kept session's queue.
pub struct Queue {
    pub router_id: String,
    state: Mutex<QueueState>,
    /// What tells whether its drainer has read all the router holds for
    /// the session, while one runs.
    probe: Mutex<Option<Probe>>,
}

struct Probe {
    /// Router deliveries the last connection left unacknowledged that have
    /// not come back to the drainer yet.
    resend: Arc<AtomicUsize>,
    subs: SharedSubscriptions,
}

impl Probe {
    /// Nothing unread on its filters (as far as flow control can tell) and
    /// nothing the last connection left unacknowledged still to come.
    fn caught_up(&self, shared: &Shared) -> bool {
        let subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
        let resend = self.resend.load(Ordering::Relaxed);
        let behind: Vec<&str> = subs
            .parked
            .iter()
            .filter(|(path, c)| shared.flow.lag(names::split_share(path).1, c) > 0)
            .map(|(path, _)| path.as_str())
            .collect();
        if resend > 0 || !behind.is_empty() {
            debug!(
                resend,
                ?behind,
                "a drainer has not read all the router holds"
            );
        }
        resend == 0 && behind.is_empty()
    }
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Messages waiting, and messages dropped at the bound so far.
    pub fn counts(&self) -> (u64, u64) {
        let s = self.lock();
        (s.messages, s.dropped)
    }
}

/// A queue's interest in one filter.
#[derive(Clone)]
struct Entry {
    queue: Arc<Queue>,
    qos: u8,
    rap: bool,
}

/// A queue a topic matches: its best QoS, retain-as-published, and how
/// many copies the router delivers it (one per matching filter).
#[derive(Clone)]
struct Hit {
    queue: Arc<Queue>,
    qos: u8,
    rap: bool,
    copies: u32,
}

/// Every kept session's queue, and which filters capture watches.
pub struct Offline {
    max_messages: u64,
    max_bytes: u64,
    queues: Mutex<HashMap<String, Arc<Queue>>>,
    /// Router-form filter (not shared) → queues of away sessions.
    index: Mutex<HashMap<String, Vec<Entry>>>,
    cache: crate::topic_cache::TopicCache<Hit>,
    /// Queues in the index: capture costs nothing while it is zero.
    capturing: AtomicUsize,
    /// Seeded from the OS's randomness at start: which contents collide
    /// must not be guessable from outside, or a publisher could hide
    /// another's message from an away session.
    hasher: foldhash::fast::FixedState,
    /// Held journal entries, oldest first: when held, whose, which.
    held: Mutex<VecDeque<(Instant, Arc<Queue>, u64)>>,
    held_bytes: AtomicU64,
    /// Wakes [`write_held`] when the first entry is held.
    held_wake: Arc<tokio::sync::Notify>,
    /// Messages dropped at a queue's bound, in total.
    pub dropped_total: AtomicU64,
    /// Router deliveries drainers have read, in total (a clean stop
    /// watches it move).
    pub drained_total: AtomicU64,
}

impl Offline {
    pub fn new(max_messages: u64, max_bytes: u64, found: HashMap<String, QueueSummary>) -> Self {
        let queues = found
            .into_iter()
            .map(|(id, q)| {
                let queue = Arc::new(Queue {
                    router_id: id.clone(),
                    state: Mutex::new(QueueState {
                        messages: q.messages,
                        bytes: q.bytes,
                        last_seq: q.last_seq,
                        ..Default::default()
                    }),
                    probe: Mutex::new(None),
                });
                (id, queue)
            })
            .collect();
        Self {
            max_messages,
            max_bytes,
            queues: Mutex::new(queues),
            index: Mutex::new(HashMap::new()),
            cache: Default::default(),
            capturing: AtomicUsize::new(0),
            hasher: foldhash::fast::FixedState::with_seed(uuid::Uuid::new_v4().as_u64_pair().0),
            held: Mutex::new(VecDeque::new()),
            held_bytes: AtomicU64::new(0),
            held_wake: Arc::new(tokio::sync::Notify::new()),
            dropped_total: AtomicU64::new(0),
            drained_total: AtomicU64::new(0),
        }
    }

    /// Hands every held journal entry of `s` to the disk writer (its
    /// session is away now, or the broker stops).
    fn write_held_of(&self, disk: &BrokerDisk, router_id: &str, s: &mut QueueState) {
        for (seq, held) in s.held.drain() {
            self.held_bytes
                .fetch_sub(held.value.len() as u64, Ordering::Relaxed);
            disk.put_queued_then(router_id, seq, held.value, held.done);
        }
    }

    /// Hands every held journal entry to the disk writer (a clean stop).
    pub fn write_all_held(&self, disk: &BrokerDisk) {
        let queues: Vec<Arc<Queue>> = {
            let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            queues.values().cloned().collect()
        };
        for queue in queues {
            let mut s = queue.lock();
            self.write_held_of(disk, &queue.router_id, &mut s);
        }
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Holds a connected session's journal entry in memory; the receiver
    /// resolves when its client acknowledges it or once it is written.
    fn hold(&self, queue: &Arc<Queue>, s: &mut QueueState, seq: u64, value: Vec<u8>) -> Commit {
        let (done, commit) = oneshot::channel();
        self.held_bytes
            .fetch_add(value.len() as u64, Ordering::Relaxed);
        s.held.insert(seq, Held { value, done });
        let first = {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            held.push_back((Instant::now(), queue.clone(), seq));
            held.len() == 1
        };
        if first {
            self.held_wake.notify_one();
        }
        commit
    }

    /// Messages waiting for sessions that are not connected (a connected
    /// session's journal entries are in flight to its client, not waiting).
    pub fn waiting(&self) -> u64 {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues
            .values()
            .map(|q| {
                let s = q.lock();
                if s.mode == Mode::Online {
                    0
                } else {
                    s.messages
                }
            })
            .sum()
    }

    /// True once every drainer has read all the router holds for its
    /// session (a renewal and a clean stop wait for it).
    pub fn caught_up(&self, shared: &Shared) -> bool {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues.values().all(|q| {
            q.probe
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .is_none_or(|p| p.caught_up(shared))
        })
    }

    /// The sessions whose queue dropped messages (client id, how many),
    /// most first, at most `n`.
    pub fn drops(&self, n: usize) -> Vec<(String, u64)> {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let mut drops: Vec<(String, u64)> = queues
            .values()
            .filter_map(|q| {
                let dropped = q.lock().dropped;
                (dropped > 0).then(|| (names::client_id_of(&q.router_id), dropped))
            })
            .collect();
        drops.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        drops.truncate(n);
        drops
    }

    /// The queue of `router_id`, if it has one.
    pub fn queue(&self, router_id: &str) -> Option<Arc<Queue>> {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues.get(router_id).cloned()
    }

    /// What [`Overlap`] counts a message by.
    pub fn hash(&self, topic: &[u8], payload: &[u8]) -> u64 {
        self.hasher.hash_one((topic, payload))
    }

    fn queue_for(&self, router_id: &str) -> Arc<Queue> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues
            .entry(router_id.to_string())
            .or_insert_with(|| {
                Arc::new(Queue {
                    router_id: router_id.to_string(),
                    state: Mutex::new(QueueState::default()),
                    probe: Mutex::new(None),
                })
            })
            .clone()
    }

    /// Makes `filters` (router form, with QoS and retain-as-published) the
    /// ones capture watches for `queue` (none: it leaves the index).
    fn set_index(&self, queue: &Arc<Queue>, s: &mut QueueState, filters: &[(String, u8, bool)]) {
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        if s.indexed {
            index.retain(|_, entries| {
                entries.retain(|e| !Arc::ptr_eq(&e.queue, queue));
                !entries.is_empty()
            });
        }
        let mut any = false;
        for (path, qos, rap) in filters {
            if names::share_group(path).is_some() {
                // The router picks one member per message; the drainer
                // takes an away session's turns.
                continue;
            }
            any = true;
            index.entry(path.clone()).or_default().push(Entry {
                queue: queue.clone(),
                qos: *qos,
                rap: *rap,
            });
        }
        drop(index);
        match (s.indexed, any) {
            (false, true) => {
                self.capturing.fetch_add(1, Ordering::SeqCst);
            }
            (true, false) => {
                self.capturing.fetch_sub(1, Ordering::SeqCst);
            }
            _ => {}
        }
        s.indexed = any;
        self.cache.clear();
    }

    /// The kept session `router_id` is connected with these subscriptions
    /// (called again whenever they change): what is published to it is
    /// journaled until its client acknowledges it.
    pub fn online(&self, router_id: &str, filters: &[(String, u8, bool)]) {
        let queue = self.queue_for(router_id);
        let mut s = queue.lock();
        if s.mode == Mode::Off {
            s.mode = Mode::Online;
            s.next_capture = s.last_seq + 1;
        }
        if matches!(s.mode, Mode::Online | Mode::Replaying) {
            self.set_index(&queue, &mut s, filters);
        }
    }

    /// The session `router_id` is away from now on: capture and the
    /// drainer write to its queue. `filters` are router-form paths with
    /// their QoS and retain-as-published.
    pub fn park(
        &self,
        disk: Option<&BrokerDisk>,
        router_id: &str,
        filters: &[(String, u8, bool)],
    ) -> Arc<Queue> {
        let queue = self.queue_for(router_id);
        let mut s = queue.lock();
        if s.mode == Mode::Away {
            return queue.clone();
        }
        s.mode = Mode::Away;
        s.next_drain = s.last_seq + 1;
        s.next_capture = s.last_seq + 1 + DRAIN_RANGE;
        // What was journaled is on disk already: the router's copies of it
        // (sent again, or never read) are skipped by the drainer.
        let pending: Vec<u64> = s.pending.values().copied().collect();
        for hash in pending {
            s.overlap.add(hash, 1);
        }
        if let Some(disk) = disk {
            self.write_held_of(disk, router_id, &mut s);
        }
        s.journal.clear();
        s.pending.clear();
        self.set_index(&queue, &mut s, filters);
        drop(s);
        queue
    }

    /// The session is back (its drainer, if it had one, has stopped): true
    /// if it is to read its queue ([`Offline::next_replay`]) before it
    /// takes anything live: it was away, or restored from disk with
    /// messages waiting. A session taken over while connected reads none:
    /// what its journal holds comes back from the router.
    pub fn unpark(&self, router_id: &str) -> bool {
        let Some(queue) = self.queue(router_id) else {
            return false;
        };
        let mut s = queue.lock();
        let back = match s.mode {
            Mode::Away | Mode::Replaying => true,
            Mode::Off => s.messages > 0,
            Mode::Online => false,
        };
        if back {
            s.mode = Mode::Replaying;
            s.dropping = false;
        }
        back
    }

    /// The next `limit` messages of a returning session's queue from
    /// sequence `from`, once everything written to it is on disk; empty
    /// once it has read them all, and from then on what is published to it
    /// is delivered live (and journaled). Messages past their expiry are
    /// left out (and deleted).
    pub async fn next_replay(
        &self,
        disk: &Arc<BrokerDisk>,
        router_id: &str,
        mut from: u64,
        limit: usize,
    ) -> Vec<QueuedMessage> {
        let Some(queue) = self.queue(router_id) else {
            return Vec::new();
        };
        loop {
            let upto = {
                let mut s = queue.lock();
                if s.mode != Mode::Replaying {
                    return Vec::new();
                }
                if s.last_seq < from || s.messages == 0 {
                    // Nothing left to read: live from here on.
                    s.mode = Mode::Online;
                    return Vec::new();
                }
                s.last_seq
            };
            let _ = disk.sync().await;
            let (reader, id) = (disk.clone(), router_id.to_string());
            let loaded =
                tokio::task::spawn_blocking(move || reader.load_queue(&id, from, upto, limit))
                    .await;
            let messages = match loaded {
                Ok(Ok(m)) => m,
                Ok(Err(err)) => {
                    warn!(client = router_id, %err, "the queue of a returning session could not be read; the rest waits for its next connection");
                    queue.lock().mode = Mode::Online;
                    return Vec::new();
                }
                Err(err) => {
                    warn!(client = router_id, %err, "reading a queue failed");
                    queue.lock().mode = Mode::Online;
                    return Vec::new();
                }
            };
            if messages.is_empty() {
                let mut s = queue.lock();
                if s.last_seq == upto {
                    // Read all that was written before the lock: live
                    // from here on, with nothing queued behind.
                    s.mode = Mode::Online;
                    return Vec::new();
                }
                // Queued meanwhile: read that too.
                drop(s);
                continue;
            }
            let (live, expired): (Vec<_>, Vec<_>) = messages.into_iter().partition(|m| {
                m.properties
                    .as_ref()
                    .and_then(|p| p.message_expiry_interval)
                    .is_none_or(|secs| m.age < Duration::from_secs(u64::from(secs)))
            });
            for m in &expired {
                self.delivered(disk, router_id, m.seq, m.size);
            }
            if live.is_empty() {
                // All expired: read on from after them.
                from = expired.iter().map(|m| m.seq).max().unwrap_or(from) + 1;
                continue;
            }
            let mut live = live;
            let s = queue.lock();
            for m in &mut live {
                m.dup |= s.sent.contains(&m.seq);
            }
            return live;
        }
    }

    /// What to do with the router's delivery of this content to the kept
    /// session `router_id`: skip it (a copy of what it gets from its
    /// queue), or deliver it, with its journal entry if it has one.
    pub fn live_copy(&self, router_id: &str, hash: u64) -> LiveCopy {
        let Some(queue) = self.queue(router_id) else {
            return LiveCopy::Deliver(None);
        };
        let mut s = queue.lock();
        if s.overlap.take(hash) {
            return LiveCopy::Skip;
        }
        if s.mode != Mode::Online {
            return LiveCopy::Deliver(None);
        }
        let Some(entries) = s.journal.get_mut(&hash) else {
            return LiveCopy::Deliver(None);
        };
        let entry = entries.pop_front();
        if entries.is_empty() {
            s.journal.remove(&hash);
        }
        LiveCopy::Deliver(entry)
    }

    /// The session ended for good: its queue goes, on disk too.
    pub fn forget(&self, disk: &BrokerDisk, router_id: &str) {
        let gone = self
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(router_id);
        if let Some(queue) = gone {
            let mut s = queue.lock();
            s.mode = Mode::Off;
            // Nobody is owed these any more: their publishers go on.
            for (_, held) in s.held.drain() {
                self.held_bytes
                    .fetch_sub(held.value.len() as u64, Ordering::Relaxed);
            }
            self.set_index(&queue, &mut s, &[]);
            drop(s);
            drop(disk.delete_queue(router_id));
        }
    }

    /// The client of `router_id` left without acknowledging these queued
    /// messages: they carry DUP when sent again.
    pub fn mark_sent(&self, router_id: &str, seqs: impl IntoIterator<Item = u64>) {
        if let Some(queue) = self.queue(router_id) {
            queue.lock().sent.extend(seqs);
        }
    }

    /// The client acknowledged message `seq` of its queue.
    pub fn delivered(&self, disk: &BrokerDisk, router_id: &str, seq: u64, size: u64) {
        if let Some(queue) = self.queue(router_id) {
            let mut s = queue.lock();
            s.messages = s.messages.saturating_sub(1);
            s.bytes = s.bytes.saturating_sub(size);
            s.pending.remove(&seq);
            s.sent.remove(&seq);
            s.last_ack = Some(Instant::now());
            if let Some(held) = s.held.remove(&seq) {
                // Acknowledged before it was written: it never will be.
                self.held_bytes
                    .fetch_sub(held.value.len() as u64, Ordering::Relaxed);
                let _ = held.done.send(());
                return;
            }
        }
        drop(disk.delete_queued(router_id, seq));
    }

    fn matching(&self, topic: &Bytes) -> Arc<[Hit]> {
        self.cache.get_or_find(topic, |text| {
            let mut hits: Vec<Hit> = Vec::new();
            let index = self.index.lock().unwrap_or_else(|p| p.into_inner());
            for (filter, entries) in index.iter() {
                if !rumqttd::protocol::matches(text, filter) {
                    continue;
                }
                for e in entries {
                    match hits.iter_mut().find(|h| Arc::ptr_eq(&h.queue, &e.queue)) {
                        Some(h) => {
                            h.qos = h.qos.max(e.qos);
                            h.rap |= e.rap;
                            h.copies += 1;
                        }
                        None => hits.push(Hit {
                            queue: e.queue.clone(),
                            qos: e.qos,
                            rap: e.rap,
                            copies: 1,
                        }),
                    }
                }
            }
            hits
        })
    }

    /// Writes a QoS 1/2 publish (router-form topic, the client's
    /// properties) to the queue of every away session it matches; the
    /// publisher's acknowledgement waits for the commits returned.
    pub fn capture(
        &self,
        disk: &BrokerDisk,
        topic: &Bytes,
        payload: &Bytes,
        qos: u8,
        retain: bool,
        props: Option<&PublishProperties>,
    ) -> Vec<Commit> {
        if self.capturing.load(Ordering::SeqCst) == 0 {
            return Vec::new();
        }
        let hits = self.matching(topic);
        if hits.is_empty() {
            return Vec::new();
        }
        let hash = self.hash(topic, payload);
        let mut commits = Vec::new();
        for hit in hits.iter() {
            let mut s = hit.queue.lock();
            let away = match s.mode {
                Mode::Off => continue,
                Mode::Online => false,
                Mode::Away | Mode::Replaying => true,
            };
            if away {
                // Whatever happens to it here, the router's copies are not
                // this queue's to write.
                s.overlap.add(hash, hit.copies);
            }
            let qos = qos.min(hit.qos);
            if qos == 0 {
                continue;
            }
            // A full queue costs a publisher no copy of its message. A
            // connected session still gets it live, only not journaled.
            if !self.room(&s, (topic.len() + payload.len()) as u64) {
                if away {
                    self.drop_one(&hit.queue.router_id, &mut s);
                }
                continue;
            }
            let flags = QueuedFlags {
                qos,
                retain: retain && hit.rap,
                dup: false,
            };
            let value = crate::disk::encode_queued(topic, payload, flags, props);
            let size = value.len() as u64;
            let fits = if away {
                self.admit(&hit.queue.router_id, &mut s, size)
            } else if self.room(&s, size) {
                s.messages += 1;
                s.bytes += size;
                true
            } else {
                false
            };
            if fits {
                let seq = s.next_capture;
                s.next_capture += 1;
                s.last_seq = s.last_seq.max(seq);
                if !away {
                    s.journal.entry(hash).or_default().push_back((seq, size));
                    s.pending.insert(seq, hash);
                }
                let hold = !away
                    && self.held_bytes.load(Ordering::Relaxed) + size <= JOURNAL_HELD_MAX
                    && s.hold_off_until.is_none_or(|t| Instant::now() >= t);
                if hold {
                    commits.push(self.hold(&hit.queue, &mut s, seq, value));
                } else {
                    // Under the queue's lock: a returning session's sync
                    // comes after this write.
                    commits.push(disk.put_queued(&hit.queue.router_id, seq, value));
                }
            }
        }
        commits
    }

    /// True if a message of `size` fits in the queue.
    fn room(&self, s: &QueueState, size: u64) -> bool {
        s.messages < self.max_messages && s.bytes + size <= self.max_bytes
    }

    /// Counts a message dropped at the bound; the first of an episode is
    /// logged.
    fn drop_one(&self, router_id: &str, s: &mut QueueState) {
        s.dropped += 1;
        let total = self.dropped_total.fetch_add(1, Ordering::Relaxed) + 1;
        if !s.dropping {
            s.dropping = true;
            warn!(
                client = router_id,
                messages = s.messages,
                bytes = s.bytes,
                max_messages = self.max_messages,
                max_bytes = self.max_bytes,
                dropped = s.dropped,
                dropped_total = total,
                "an away session's queue is full: new messages for it are dropped until it comes back"
            );
        }
    }

    /// Counts a message of `size` into the queue, or drops it at the
    /// bound (false).
    fn admit(&self, router_id: &str, s: &mut QueueState, size: u64) -> bool {
        if !self.room(s, size) {
            self.drop_one(router_id, s);
            return false;
        }
        s.messages += 1;
        s.bytes += size;
        true
    }

    /// The drainer read a router delivery for `queue`, at the QoS the
    /// router sent it; `rap` tells whether one of the session's filters
    /// matching it has retain-as-published, `dup` whether the last
    /// connection was sent it.
    fn drained(
        &self,
        disk: &BrokerDisk,
        queue: &Queue,
        publish: &rumqttd::protocol::Publish,
        mut props: Option<PublishProperties>,
        QueuedFlags {
            qos: router_qos,
            retain: rap,
            dup,
        }: QueuedFlags,
    ) {
        let mark = Mark::take(&mut props);
        if mark.marker.is_some() {
            return;
        }
        let hash = self.hash(&publish.topic, &publish.payload);
        let mut s = queue.lock();
        if s.overlap.take(hash) || s.mode != Mode::Away {
            return;
        }
        let qos = router_qos.min(mark.qos.unwrap_or(2));
        if qos == 0 {
            return;
        }
        let flags = QueuedFlags {
            qos,
            retain: mark.retain && rap,
            dup,
        };
        let value =
            crate::disk::encode_queued(&publish.topic, &publish.payload, flags, props.as_ref());
        if self.admit(&queue.router_id, &mut s, value.len() as u64) {
            let seq = s.next_drain;
            s.next_drain += 1;
            s.last_seq = s.last_seq.max(seq);
            drop(disk.put_queued(&queue.router_id, seq, value));
        }
    }
}

/// Writes held journal entries whose grace has passed (see
/// [`JOURNAL_GRACE`]), until the broker is gone.
pub async fn write_held(shared: std::sync::Weak<Shared>) {
    let wake = match shared.upgrade() {
        Some(s) => s.offline.held_wake.clone(),
        None => return,
    };
    loop {
        let oldest = match shared.upgrade() {
            Some(s) => s
                .offline
                .held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .front()
                .map(|(at, ..)| *at),
            None => return,
        };
        let Some(oldest) = oldest else {
            wake.notified().await;
            continue;
        };
        tokio::time::sleep_until((oldest + JOURNAL_GRACE).into()).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let Some(disk) = shared.disk.as_ref() else {
            return;
        };
        let offline = &shared.offline;
        let due_before = (Instant::now() + JOURNAL_TICK)
            .checked_sub(JOURNAL_GRACE)
            .unwrap_or(oldest);
        let due: Vec<(Arc<Queue>, u64)> = {
            let mut held = offline.held.lock().unwrap_or_else(|p| p.into_inner());
            let mut due = Vec::new();
            while held.front().is_some_and(|(at, ..)| *at <= due_before) {
                if let Some((_, queue, seq)) = held.pop_front() {
                    due.push((queue, seq));
                }
            }
            due
        };
        for (queue, seq) in due {
            let mut s = queue.lock();
            // Gone already if its client acknowledged it.
            if let Some(held) = s.held.remove(&seq) {
                if s.last_ack.is_none_or(|at| at.elapsed() > JOURNAL_GRACE) {
                    s.hold_off_until = Some(Instant::now() + JOURNAL_HOLD_OFF);
                }
                offline
                    .held_bytes
                    .fetch_sub(held.value.len() as u64, Ordering::Relaxed);
                disk.put_queued_then(&queue.router_id, seq, held.value, held.done);
            }
        }
    }
}

/// A running drainer; [`Drainer::stop`] ends it once what it read is
/// handed to the disk writer and its link is closed.
pub struct Drainer {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    queue: Arc<Queue>,
}

impl Drainer {
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
        *self.queue.probe.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Starts the drainer of the away session `router_id` (its queue is
/// parked); `unacknowledged` is what its last connection left
/// unacknowledged, which the router sends again first.
pub fn spawn_drainer(
    shared: Arc<Shared>,
    queue: Arc<Queue>,
    subs: SharedSubscriptions,
    unacknowledged: usize,
) -> Drainer {
    let (stop, stopped) = oneshot::channel();
    let resend = Arc::new(AtomicUsize::new(unacknowledged));
    *queue.probe.lock().unwrap_or_else(|p| p.into_inner()) = Some(Probe {
        resend: resend.clone(),
        subs: subs.clone(),
    });
    let task = tokio::spawn(drain(shared, queue.clone(), subs, resend, stopped));
    Drainer {
        stop: Some(stop),
        task,
        queue,
    }
}

/// Why a drainer's link ended.
enum LinkEnd {
    Stop,
    /// The router was renewed: link to the new one.
    Moved,
    Lost,
}

async fn drain(
    shared: Arc<Shared>,
    queue: Arc<Queue>,
    subs: SharedSubscriptions,
    resend: Arc<AtomicUsize>,
    mut stopped: oneshot::Receiver<()>,
) {
    let Some(disk) = shared.disk.clone() else {
        return;
    };
    let mut phases = shared.renewal.phases();
    loop {
        let (epoch, router) = shared.router_epoch();
        let (mut tx, mut rx, _) = match router.link(queue.router_id.clone(), false).await {
            Ok(link) => link,
            Err(err) => {
                warn!(client = queue.router_id, %err, "an away session's drainer could not link to the router; its messages wait in the router");
                return;
            }
        };
        debug!(client = queue.router_id, epoch, "drainer linked");
        let end = loop {
            tokio::select! {
                _ = &mut stopped => break LinkEnd::Stop,
                Ok(()) = phases.changed() => {
                    let phase = *phases.borrow_and_update();
                    if phase == Phase::Switch && shared.router_epoch().0 != epoch {
                        break LinkEnd::Moved;
                    }
                }
                next = rx.next() => match next {
                    Ok(Some(first)) => {
                        let mut acks = Vec::new();
                        let mut wake = false;
                        let mut next = Some(first);
                        while let Some(n) = next.take() {
                            wake |= matches!(n, Notification::Unschedule);
                            handle(&shared, &disk, &queue, &subs, &resend, n, &mut acks);
                            next = match crate::session::now_or_never(rx.next()).await {
                                Some(Ok(Some(n))) => Some(n),
                                _ => None,
                            };
                        }
                        // Publishers waiting for this session's lag go on.
                        shared.flow.progressed();
                        if send_all(&mut tx, acks).await.is_err() {
                            break LinkEnd::Lost;
                        }
                        // The router stops sending to a link whose buffer
                        // filled until it says it is ready again.
                        if wake && rx.wake().await.is_err() {
                            break LinkEnd::Lost;
                        }
                    }
                    Ok(None) => {}
                    Err(_) => break LinkEnd::Lost,
                },
            }
        };
        match end {
            LinkEnd::Stop => {
                let _ = tx.send(router::disconnect()).await;
                return;
            }
            LinkEnd::Moved => {
                // The old router is retired; the renewal created the
                // session on the new one.
                let _ = tx.send(router::disconnect()).await;
                continue;
            }
            LinkEnd::Lost if shared.router_epoch().0 != epoch => continue,
            LinkEnd::Lost => {
                info!(
                    client = queue.router_id,
                    "an away session's drainer lost its link"
                );
                return;
            }
        }
    }
}

async fn send_all(tx: &mut LinkTx, mut packets: Vec<Packet>) -> Result<(), ()> {
    let Some(last) = packets.pop() else {
        return Ok(());
    };
    tx.buffer().extend(packets);
    tx.send(last).await.map(|_| ()).map_err(|_| ())
}

fn handle(
    shared: &Shared,
    disk: &BrokerDisk,
    queue: &Queue,
    subs: &SharedSubscriptions,
    resend: &AtomicUsize,
    notification: Notification,
    acks: &mut Vec<Packet>,
) {
    match notification {
        Notification::Forward(forward) => {
            shared.offline.drained_total.fetch_add(1, Ordering::Relaxed);
            let publish = forward.publish;
            let (qos, pkid) = router::qos_pkid(&publish);
            let size = (publish.topic.len() + publish.payload.len()) as u64;
            let rap = {
                let subs = subs.lock().unwrap_or_else(|p| p.into_inner());
                let topic = std::str::from_utf8(&publish.topic).unwrap_or("");
                for (path, consumer) in &subs.parked {
                    if rumqttd::protocol::matches(topic, names::split_share(path).1) {
                        consumer.delivered(size);
                    }
                }
                subs.rap
                    .iter()
                    .any(|f| rumqttd::protocol::matches(topic, names::split_share(f).1))
            };
            // The router sends what the last connection left
            // unacknowledged first.
            let dup = qos > 0
                && resend
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok();
            let how = QueuedFlags {
                qos,
                retain: rap,
                dup,
            };
            shared
                .offline
                .drained(disk, queue, &publish, forward.properties, how);
            match qos {
                1 => acks.push(router::puback(pkid)),
                2 => acks.push(router::pubrec(pkid)),
                _ => {}
            }
        }
        Notification::DeviceAck(ack) => {
            if let Packet::PubRel(rel, _) = Packet::from(ack) {
                acks.push(router::pubcomp(rel.pkid));
            }
        }
        _ => {}
    }
}
