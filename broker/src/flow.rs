//! Flow control: publishers wait for slow subscribers instead of rumqttd
//! silently skipping what they missed.
//!
//! The router acknowledges a publish as soon as it is appended to the
//! subscription filter's in-memory log and never slows the publisher; a
//! subscriber that falls more than the log's size behind loses the
//! overwritten part, even at QoS 1. The front end therefore counts, per
//! filter, the bytes appended (topic + payload, as the router counts them)
//! and, per consumer, the bytes delivered. A publish to a filter whose
//! slowest consumer is more than the high-water mark behind waits (its
//! publisher's socket is not read meanwhile, so TCP pushes back). A consumer
//! that stays behind longer than the slow-consumer timeout is the one that
//! pays: it is disconnected, counted and logged, and the others go on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

/// One subscription's (or one shared group's) reading position.
#[derive(Debug)]
pub struct Consumer {
    pub client_id: String,
    delivered: AtomicU64,
    /// Set when this consumer must be disconnected for being too slow.
    pub kicked: AtomicBool,
    /// The owning session's wake-up for a kick.
    kick: Arc<Notify>,
    behind_since: Mutex<Option<Instant>>,
    /// How long it may hold publishers back before it is cut off, in ms
    /// (0: the broker's slow-consumer timeout).
    patience_ms: AtomicU64,
}

impl Consumer {
    pub fn delivered(&self, bytes: u64) {
        self.delivered.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Cuts it off sooner than the broker's slow-consumer timeout: a kept
    /// session whose backlog has somewhere to go (its queue on disk) need
    /// not hold anyone back for long.
    pub fn set_patience(&self, patience: Duration) {
        self.patience_ms.store(
            u64::try_from(patience.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
            Ordering::Relaxed,
        );
    }

    fn patience(&self, default: Duration) -> Duration {
        match self.patience_ms.load(Ordering::Relaxed) {
            0 => default,
            ms => Duration::from_millis(ms),
        }
    }
}

#[derive(Debug, Default)]
struct FilterFlow {
    appended: AtomicU64,
    consumers: Mutex<Vec<Arc<Consumer>>>,
}

impl FilterFlow {
    /// Bytes the slowest consumer is behind, and that consumer. One
    /// already cut off no longer holds anybody back (a connected one is on
    /// its way out; a kept session with no connection stays cut off until
    /// it resumes or expires).
    fn slowest(&self) -> Option<(u64, Arc<Consumer>)> {
        let consumers = self.consumers.lock().unwrap_or_else(|p| p.into_inner());
        consumers
            .iter()
            .filter(|c| !c.kicked.load(Ordering::Relaxed))
            .map(|c| (self.lag_of(c), c.clone()))
            .max_by_key(|(lag, _)| *lag)
    }

    /// Bytes appended that `consumer` has not read yet.
    fn lag_of(&self, consumer: &Consumer) -> u64 {
        self.appended
            .load(Ordering::Relaxed)
            .saturating_sub(consumer.delivered.load(Ordering::Relaxed))
    }
}

pub struct Flow {
    high_water: u64,
    slow_timeout: Duration,
    filters: Mutex<HashMap<String, Arc<FilterFlow>>>,
    cache: crate::topic_cache::TopicCache<Arc<FilterFlow>>,
    /// The same answers for [`Flow::read_by_others`], kept apart: asking
    /// about a topic must not count it among the router's (`matched`),
    /// since a topic nobody else reads never reaches the router.
    asked: crate::topic_cache::TopicCache<Arc<FilterFlow>>,
    groups: Mutex<HashMap<String, Arc<Consumer>>>,
    waiting: AtomicUsize,
    progress: Notify,
    pub slow_consumers_disconnected: AtomicU64,
    /// Set while a router renewal has publishing paused.
    paused: AtomicBool,
    /// Hashes of the distinct topics matching some filter since the
    /// router started: the router caches each of them forever.
    matched: Mutex<std::collections::HashSet<u64>>,
    topic_hasher: std::hash::RandomState,
}

impl Flow {
    pub fn new(high_water: u64, slow_timeout: Duration) -> Self {
        Self {
            high_water,
            slow_timeout,
            filters: Mutex::new(HashMap::new()),
            cache: Default::default(),
            asked: Default::default(),
            groups: Mutex::new(HashMap::new()),
            waiting: AtomicUsize::new(0),
            progress: Notify::new(),
            slow_consumers_disconnected: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            matched: Mutex::new(std::collections::HashSet::new()),
            topic_hasher: std::hash::RandomState::new(),
        }
    }

    /// Stops (or resumes) admitting publishes, for a router renewal.
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        if !paused {
            self.progress.notify_waiters();
        }
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Waits until publishing is not paused ([`Flow::pause`] wakes it).
    pub async fn unpaused(&self) {
        loop {
            let resumed = self.progress.notified();
            tokio::pin!(resumed);
            resumed.as_mut().enable();
            if !self.is_paused() {
                return;
            }
            resumed.await;
        }
    }

    /// After a renewal drained the old router, every consumer has read
    /// everything: positions start level in the new one, and so does the
    /// count of cached topics.
    pub fn resync(&self) {
        let filters = self.filters.lock().unwrap_or_else(|p| p.into_inner());
        for flow in filters.values() {
            let appended = flow.appended.load(Ordering::Relaxed);
            for c in flow
                .consumers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
            {
                c.delivered.store(appended, Ordering::Relaxed);
            }
        }
        drop(filters);
        *self.matched.lock().unwrap_or_else(|p| p.into_inner()) = Default::default();
    }

    /// Distinct topics the current router has cached.
    pub fn matched_topics(&self) -> usize {
        self.matched.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Bytes `consumer` of router-form `filter` has yet to read.
    pub fn lag(&self, filter: &str, consumer: &Consumer) -> u64 {
        let filters = self.filters.lock().unwrap_or_else(|p| p.into_inner());
        filters.get(filter).map_or(0, |flow| flow.lag_of(consumer))
    }

    /// Registers a consumer of router-form `filter` (without `$share/<g>/`),
    /// starting at the log's tail. Members of a shared group share one.
    pub fn subscribe(
        &self,
        filter: &str,
        group: Option<&str>,
        client_id: &str,
        kick: Arc<Notify>,
    ) -> Arc<Consumer> {
        // The filter's entry stays locked until the consumer is in it, so
        // that the last consumer leaving meanwhile cannot drop it.
        let mut filters = self.filters.lock().unwrap_or_else(|p| p.into_inner());
        let is_new = !filters.contains_key(filter);
        let flow = filters.entry(filter.to_string()).or_default().clone();
        if is_new {
            // A new filter may match cached topics.
            self.cache.clear();
            self.asked.clear();
        }
        let new_consumer = || {
            Arc::new(Consumer {
                client_id: client_id.to_string(),
                delivered: AtomicU64::new(flow.appended.load(Ordering::Relaxed)),
                kicked: AtomicBool::new(false),
                kick: kick.clone(),
                behind_since: Mutex::new(None),
                patience_ms: AtomicU64::new(0),
            })
        };
        let consumer = match group {
            Some(g) => {
                let key = format!("{g}/{filter}");
                let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
                groups.entry(key).or_insert_with(new_consumer).clone()
            }
            None => new_consumer(),
        };
        let mut consumers = flow.consumers.lock().unwrap_or_else(|p| p.into_inner());
        if !consumers.iter().any(|c| Arc::ptr_eq(c, &consumer)) {
            consumers.push(consumer.clone());
        }
        drop(consumers);
        drop(filters);
        consumer
    }

    /// A consumer of `filter` (not shared) for a resumed session, at the
    /// position its previous connection left (`from`), so what the session
    /// missed while away still counts as unread.
    pub fn resume(
        &self,
        filter: &str,
        client_id: &str,
        kick: Arc<Notify>,
        from: &Consumer,
    ) -> Arc<Consumer> {
        let consumer = self.subscribe(filter, None, client_id, kick);
        consumer
            .delivered
            .store(from.delivered.load(Ordering::Relaxed), Ordering::Relaxed);
        consumer
    }

    /// Forgets a consumer of `filter`. Shared-group consumers stay while
    /// the group has members (the caller passes `last_member`).
    pub fn unsubscribe(&self, filter: &str, consumer: &Arc<Consumer>, last_member: bool) {
        let mut filters = self.filters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(flow) = filters.get(filter) {
            if last_member {
                let mut consumers = flow.consumers.lock().unwrap_or_else(|p| p.into_inner());
                consumers.retain(|c| !Arc::ptr_eq(c, consumer));
                let unread = consumers.is_empty();
                drop(consumers);
                // A filter nobody reads any more is forgotten: under
                // subscription churn the map would otherwise keep every
                // filter ever subscribed, and every publish after a new
                // filter would be matched against all of them. (A topic
                // cached with it counts into it harmlessly until a new
                // filter clears the cache.)
                if unread {
                    filters.remove(filter);
                }
            }
        }
        drop(filters);
        if last_member {
            self.groups
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|_, c| !Arc::ptr_eq(c, consumer));
        }
        self.progress.notify_waiters();
    }

    /// The flows of the filters that match `text`, from the map itself.
    fn find(&self, text: &str) -> Vec<Arc<FilterFlow>> {
        let filters = self.filters.lock().unwrap_or_else(|p| p.into_inner());
        filters
            .iter()
            .filter(|(f, _)| rumqttd::protocol::matches(text, f))
            .map(|(_, flow)| flow.clone())
            .collect()
    }

    /// Whether some subscription matching router-form `topic` belongs to
    /// a client other than `client_id`: a connected session's, a kept
    /// session's parked while it is away, or a shared group's. A consumer
    /// registers before its SUBSCRIBE reaches the router, so a client that
    /// has its SUBACK is seen here.
    pub fn read_by_others(&self, topic: &[u8], client_id: &str) -> bool {
        let flows = self.asked.get_or_find(topic, |text| self.find(text));
        flows.iter().any(|flow| {
            flow.consumers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|c| c.client_id != client_id)
        })
    }

    fn matching(&self, topic: &Bytes) -> Arc<[Arc<FilterFlow>]> {
        let mut fresh = false;
        let found = self.cache.get_or_find(topic, |text| {
            fresh = true;
            self.find(text)
        });
        if fresh && !found.is_empty() {
            use std::hash::BuildHasher;
            let hash = self.topic_hasher.hash_one(topic);
            self.matched
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(hash);
        }
        found
    }

    /// Counts the publish as appended and returns true if every filter
    /// matching `topic` has room; otherwise returns false (the caller waits
    /// with [`Flow::admit`]) and kicks consumers that stayed too slow.
    pub fn try_admit(&self, topic: &Bytes, size: u64) -> bool {
        if self.is_paused() {
            return false;
        }
        let flows = self.matching(topic);
        let mut blocked = false;
        for flow in flows.iter() {
            let Some((lag, slowest)) = flow.slowest() else {
                continue;
            };
            // A subscriber that has read everything takes a message of any
            // size the broker accepts, even one past the high-water mark:
            // there is nothing unread for it to push out of the log.
            if lag == 0 || lag + size <= self.high_water {
                *slowest
                    .behind_since
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = None;
                continue;
            }
            blocked = true;
            let since = *slowest
                .behind_since
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(Instant::now);
            if since.elapsed() >= slowest.patience(self.slow_timeout)
                && !slowest.kicked.swap(true, Ordering::Relaxed)
            {
                self.slow_consumers_disconnected
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    client_id = slowest.client_id,
                    lag_bytes = lag,
                    waited_ms = since.elapsed().as_millis() as u64,
                    total = self.slow_consumers_disconnected.load(Ordering::Relaxed),
                    "slow consumer cut off: it held publishers back past the timeout (a connected one is disconnected; a kept session without a connection loses what the router overwrites)"
                );
                slowest.kick.notify_one();
            }
        }
        if blocked {
            return false;
        }
        for flow in flows.iter() {
            flow.appended.fetch_add(size, Ordering::Relaxed);
        }
        true
    }

    /// Waits until [`Flow::try_admit`] lets the publish through.
    pub async fn admit(&self, topic: &Bytes, size: u64) {
        while !self.try_admit(topic, size) {
            self.waiting.fetch_add(1, Ordering::Relaxed);
            let _ = tokio::time::timeout(Duration::from_millis(20), self.progress.notified()).await;
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Wakes waiting publishers after consumers made progress.
    pub fn progressed(&self) {
        if self.waiting.load(Ordering::Relaxed) > 0 {
            self.progress.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn publishers_wait_for_the_slowest_consumer_and_kick_a_stuck_one() {
        let flow = Flow::new(100, Duration::from_millis(100));
        let kick = Arc::new(Notify::new());
        let consumer = flow.subscribe("a/+", None, "slow", kick.clone());
        let topic = Bytes::from("a/b");
        flow.admit(&topic, 60).await;
        // 60 + 60 > 100: the second publish waits until the consumer reads.
        let started = Instant::now();
        let admitted = flow.admit(&topic, 60);
        tokio::pin!(admitted);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut admitted)
                .await
                .is_err()
        );
        consumer.delivered(60);
        flow.progressed();
        admitted.await;
        assert!(started.elapsed() < Duration::from_millis(100));
        // A consumer that never reads is kicked after the timeout.
        consumer.delivered(60);
        flow.admit(&topic, 60).await;
        assert!(!consumer.kicked.load(Ordering::Relaxed));
        let stuck = flow.admit(&topic, 60);
        tokio::pin!(stuck);
        let kicked = kick.notified();
        tokio::pin!(kicked);
        tokio::select! {
            _ = &mut stuck => panic!("admitted past a stuck consumer"),
            _ = &mut kicked => {}
        }
        assert!(consumer.kicked.load(Ordering::Relaxed));
        flow.unsubscribe("a/+", &consumer, true);
        stuck.await;
        assert_eq!(flow.slow_consumers_disconnected.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_filter_nobody_reads_is_forgotten() {
        let flow = Flow::new(100, Duration::from_millis(100));
        let kick = Arc::new(Notify::new());
        let a = flow.subscribe("a/+", None, "a", kick.clone());
        let b = flow.subscribe("a/+", None, "b", kick.clone());
        flow.unsubscribe("a/+", &a, true);
        assert_eq!(flow.filters.lock().unwrap().len(), 1, "b still reads it");
        flow.unsubscribe("a/+", &b, true);
        assert!(flow.filters.lock().unwrap().is_empty());
        // Subscribed again, it counts from scratch.
        let c = flow.subscribe("a/+", None, "c", kick);
        assert!(flow.try_admit(&Bytes::from("a/b"), 60));
        assert_eq!(flow.lag("a/+", &c), 60);
    }

    #[test]
    fn only_other_clients_count_as_readers() {
        let flow = Flow::new(100, Duration::from_millis(100));
        let kick = Arc::new(Notify::new());
        let topic = b"a/b".as_slice();
        assert!(!flow.read_by_others(topic, "me"));
        let mine = flow.subscribe("a/+", None, "me", kick.clone());
        assert!(!flow.read_by_others(topic, "me"));
        assert!(flow.read_by_others(topic, "someone"));
        // Asked again with the answer cached: a new reader of the same
        // filter, then of a new one, is seen at once.
        let theirs = flow.subscribe("a/+", None, "them", kick.clone());
        assert!(flow.read_by_others(topic, "me"));
        flow.unsubscribe("a/+", &theirs, true);
        assert!(!flow.read_by_others(topic, "me"));
        let _all = flow.subscribe("#", Some("g"), "them", kick);
        assert!(flow.read_by_others(topic, "me"));
        // Asking records nothing as seen by the router.
        assert_eq!(flow.matched_topics(), 0);
        flow.unsubscribe("a/+", &mine, true);
    }

    #[tokio::test]
    async fn topics_without_consumers_never_wait() {
        let flow = Flow::new(10, Duration::from_millis(10));
        let _c = flow.subscribe("x/#", None, "c", Arc::new(Notify::new()));
        tokio::time::timeout(
            Duration::from_secs(1),
            flow.admit(&Bytes::from("y/z"), 1_000),
        )
        .await
        .expect("a topic nobody reads is admitted at once");
    }
}
