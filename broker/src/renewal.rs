//! Router renewal: how filter and topic memory comes back.
//!
//! rumqttd's router never frees a filter's log or its cache of which
//! filters a topic matches, and it cannot be told to forget either. So when
//! enough of what the router holds is dead (filters no session holds any
//! more, or many distinct topics published), the front end moves every
//! session to a fresh router and retires the old one
//! ([`RouterHandle::retire`]), which frees all of it.
//!
//! The move loses nothing and reorders nothing:
//! 1. **Pause.** Flow control admits no publish and sessions forward no
//!    (un)subscribe; acknowledgements still flow. Each session sends the old
//!    router a PINGREQ behind everything it forwarded: its PINGRESP proves
//!    the router has appended all of it.
//! 2. **Drain.** One marker publish per live filter that may hold
//!    something goes into the old router behind all of that. Every reading
//!    position (a session's filter, or a shared group's) yields exactly one
//!    copy of each marker matching its filter, after everything before it,
//!    so once the sessions have counted every copy expected (and their
//!    clients acknowledged what is in flight), nothing is left in the old
//!    router. A filter that no topic published into this router matches
//!    holds nothing and needs no marker ([`Published`]): under subscription
//!    churn most filters are such, and each marker costs the router a match
//!    against every filter it ever had. Markers are never delivered to
//!    clients.
//! 3. **Switch.** The new router becomes current; each session links to it
//!    under its id and subscribes its filters again at their QoS; each kept
//!    session without a connection is created there with its filters.
//! 4. **Resume** publishing, then retire the old router.
//!
//! If a step cannot finish (a client not reading, a kept session still
//! owed messages by the old router), the renewal is abandoned before the
//! switch, everything goes on as before, and it is tried again later.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttd::protocol::{Packet, PublishProperties, QoS};
use tokio::sync::{watch, Notify, RwLock};
use tracing::{debug, info, warn};

use crate::marks::Mark;
use crate::names;
use crate::router::{self, RouterHandle};
use crate::server::Shared;

/// Longest each step of a pause may wait for sessions before the renewal
/// is abandoned (publishers wait meanwhile).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the broker checks whether its router should be renewed.
const CHECK_EVERY: Duration = Duration::from_millis(500);

/// Where a renewal is; sessions follow it (see [`crate::session`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Idle,
    /// Round `n` paused publishing: send the barrier.
    Pause(u64),
    /// The new router is current: link to it.
    Switch,
}

/// One connected session as a renewal sees it.
#[derive(Default)]
pub struct LiveState {
    pub client_id: String,
    /// Router generation its link belongs to.
    pub epoch: u64,
    /// The round whose barrier it passed, with its filters at that time.
    pub barrier: Option<(u64, Vec<String>)>,
    /// Nothing between it and its client that the router waits for.
    pub idle: bool,
    /// The connection ended; `Some(kept)` tells whether the router keeps
    /// its session.
    pub finishing: Option<bool>,
    /// Marker copies its own (not shared) filters yield in the round being
    /// drained, and how many of them it received.
    pub own_expected: u64,
    pub own_copies: u64,
}

pub type Live = Arc<Mutex<LiveState>>;

pub struct Renewal {
    phase: watch::Sender<Phase>,
    /// Held for reading while a session links or forwards its last packets,
    /// for writing by a renewal: neither happens in the middle of the other.
    pub gate: RwLock<()>,
    live: Mutex<HashMap<u64, Live>>,
    /// Woken whenever a session's [`LiveState`] changes or a marker arrives.
    changed: Notify,
    /// Marker copies of shared groups' filters received in the current
    /// round (a group's copy goes to one member of it).
    copies: AtomicU64,
    round: AtomicU64,
    /// Renewals completed, and renewals abandoned or put off.
    pub renewals: AtomicU64,
    pub deferred: AtomicU64,
    /// How long the last renewal paused publishing, in milliseconds.
    pub last_pause_ms: AtomicU64,
    /// A probe of the router's responsiveness is under way.
    probing: Arc<AtomicBool>,
    /// Topics published into the current router.
    published: Mutex<Published>,
}

impl Default for Renewal {
    fn default() -> Self {
        Self {
            phase: watch::channel(Phase::Idle).0,
            gate: RwLock::new(()),
            live: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            copies: AtomicU64::new(0),
            round: AtomicU64::new(0),
            renewals: AtomicU64::new(0),
            deferred: AtomicU64::new(0),
            last_pause_ms: AtomicU64::new(0),
            probing: Arc::new(AtomicBool::new(false)),
            published: Mutex::new(Published::default()),
        }
    }
}

impl Renewal {
    /// Registers a connected session (call it holding [`Renewal::gate`]).
    pub fn register(
        &self,
        generation: u64,
        epoch: u64,
        client_id: &str,
    ) -> (Live, watch::Receiver<Phase>) {
        let live = Live::new(Mutex::new(LiveState {
            client_id: client_id.to_string(),
            epoch,
            ..Default::default()
        }));
        self.lock_live().insert(generation, live.clone());
        (live, self.phase.subscribe())
    }

    /// Follows the phases of renewals (the drainers of away sessions do).
    pub fn phases(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    pub fn deregister(&self, generation: u64) {
        self.lock_live().remove(&generation);
    }

    /// Changes what a renewal knows of a session, and wakes the renewal.
    pub fn update(&self, live: &Live, change: impl FnOnce(&mut LiveState)) {
        change(&mut live.lock().unwrap_or_else(|p| p.into_inner()));
        self.changed.notify_waiters();
    }

    /// Session `live` received a marker of `round` (an abandoned round's
    /// markers may still arrive later: they do not count). Its own
    /// filters' copies are counted first, the rest as its shared groups'.
    pub fn marker_copy(&self, live: &Live, round: u64) {
        if round != self.round.load(Ordering::Relaxed) {
            return;
        }
        {
            let mut s = live.lock().unwrap_or_else(|p| p.into_inner());
            if s.own_copies < s.own_expected {
                s.own_copies += 1;
            } else {
                self.copies.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.changed.notify_waiters();
    }

    /// Notes that `topic` (router form) goes into the router of `epoch`:
    /// call it before the publish is handed to the router. Past
    /// `max_topics` distinct topics it stops keeping them, and every filter
    /// is drained with a marker.
    pub fn published(&self, epoch: u64, topic: &[u8], max_topics: usize) {
        let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        if epoch > published.epoch {
            published.reset(epoch);
        }
        if epoch == published.epoch {
            published.insert(topic, max_topics);
        }
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_connected(&self, generation: u64) -> bool {
        self.lock_live().contains_key(&generation)
    }

    /// The state of every session still serving a client.
    fn serving(&self) -> Vec<Live> {
        self.lock_live()
            .values()
            .filter(|l| {
                l.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .finishing
                    .is_none()
            })
            .cloned()
            .collect()
    }

    /// True if `done` holds for every serving session.
    fn all_serving(&self, done: &impl Fn(&LiveState) -> bool) -> bool {
        self.serving()
            .iter()
            .all(|l| done(&l.lock().unwrap_or_else(|p| p.into_inner())))
    }

    /// True if some session whose router keeps it is ending right now.
    fn kept_finishing(&self) -> bool {
        self.lock_live()
            .values()
            .any(|l| l.lock().unwrap_or_else(|p| p.into_inner()).finishing == Some(true))
    }

    /// Waits until `ready` holds, woken by sessions' updates; false at the
    /// timeout.
    async fn wait_until(&self, ready: impl Fn() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if ready() {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return ready();
            }
        }
    }
}

/// Waits until `done` holds for every serving session; at the timeout,
/// logs those it waited for in vain.
async fn wait_all(renewal: &Renewal, done: impl Fn(&LiveState) -> bool) -> bool {
    if renewal.wait_until(|| renewal.all_serving(&done)).await {
        return true;
    }
    let late: Vec<String> = renewal
        .serving()
        .iter()
        .filter_map(|l| {
            let s = l.lock().unwrap_or_else(|p| p.into_inner());
            (!done(&s)).then(|| s.client_id.clone())
        })
        .collect();
    info!(?late, "sessions a router renewal waited for in vain");
    false
}

/// The distinct topics published into one router, by level, so that a
/// renewal can tell the filters whose logs may hold something from those
/// that hold nothing. What a session forwards is noted before it reaches
/// the router, and the barrier of a renewal comes after it, so by the time
/// the drain asks, every topic in the router's logs is here.
#[derive(Default)]
pub struct Published {
    /// Router generation these topics went into.
    epoch: u64,
    /// Node 0 is the root; each node's children by level, and whether a
    /// topic ends there.
    children: Vec<HashMap<Box<str>, usize>>,
    ends: Vec<bool>,
    topics: usize,
    /// More distinct topics than it keeps: every filter may hold something.
    overflow: bool,
}

impl Published {
    fn reset(&mut self, epoch: u64) {
        *self = Published {
            epoch,
            ..Default::default()
        };
    }

    fn insert(&mut self, topic: &[u8], max_topics: usize) {
        if self.overflow {
            return;
        }
        if self.children.is_empty() {
            self.children.push(HashMap::new());
            self.ends.push(false);
        }
        let topic = String::from_utf8_lossy(topic);
        let mut node = 0;
        for level in topic.split('/') {
            node = match self.children[node].get(level) {
                Some(&child) => child,
                None => {
                    let child = self.children.len();
                    self.children.push(HashMap::new());
                    self.ends.push(false);
                    self.children[node].insert(level.into(), child);
                    child
                }
            };
        }
        if !self.ends[node] {
            self.ends[node] = true;
            self.topics += 1;
            if self.topics > max_topics {
                let epoch = self.epoch;
                self.reset(epoch);
                self.overflow = true;
            }
        }
    }

    /// False only if no topic published into this router matches
    /// router-form `filter`, so its log is empty. (It may say true for a
    /// filter the router would not match, which only costs a marker.)
    fn may_hold(&self, filter: &str) -> bool {
        if self.overflow {
            return true;
        }
        if self.children.is_empty() {
            return false;
        }
        let levels: Vec<&str> = filter.split('/').collect();
        self.reaches(0, &levels)
    }

    fn reaches(&self, node: usize, levels: &[&str]) -> bool {
        match levels.split_first() {
            None => self.ends[node],
            // "a/#" matches "a" and everything under it; a node exists
            // only on the way to some topic.
            Some((&"#", _)) => self.ends[node] || !self.children[node].is_empty(),
            Some((&"+", rest)) => self.children[node]
                .values()
                .any(|&child| self.reaches(child, rest)),
            Some((level, rest)) => self.children[node]
                .get(*level)
                .is_some_and(|&child| self.reaches(child, rest)),
        }
    }
}

/// A topic the router-form `filter` matches.
fn marker_topic(filter: &str) -> String {
    filter
        .split('/')
        .map(|level| {
            if level == "+" || level == "#" {
                "m"
            } else {
                level
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The marker topics of a round, by level, so that counting the copies a
/// wildcard filter yields visits only the markers it may match instead of
/// all of them (with thousands of live filters, all against all took most
/// of a renewal's pause).
#[derive(Default)]
struct Markers {
    /// Node 0 is the root; each node's children by level.
    children: Vec<HashMap<String, usize>>,
    /// Markers that end at each node.
    ends: Vec<Vec<usize>>,
    topics: Vec<String>,
}

impl Markers {
    fn new(topics: HashSet<String>) -> Self {
        let mut index = Markers {
            children: vec![HashMap::new()],
            ends: vec![Vec::new()],
            topics: Vec::new(),
        };
        for topic in topics {
            let mut node = 0;
            for level in topic.split('/') {
                node = match index.children[node].get(level) {
                    Some(&child) => child,
                    None => {
                        let child = index.children.len();
                        index.children.push(HashMap::new());
                        index.ends.push(Vec::new());
                        index.children[node].insert(level.to_string(), child);
                        child
                    }
                };
            }
            index.ends[node].push(index.topics.len());
            index.topics.push(topic);
        }
        index
    }

    fn contains(&self, topic: &str) -> bool {
        let mut node = 0;
        for level in topic.split('/') {
            match self.children[node].get(level) {
                Some(&child) => node = child,
                None => return false,
            }
        }
        !self.ends[node].is_empty()
    }

    /// Marker copies one reading position of router-form `filter` yields:
    /// the markers the router matches to it.
    fn copies_for(&self, filter: &str) -> u64 {
        if !filter.contains(['+', '#']) {
            return u64::from(self.contains(filter));
        }
        let levels: Vec<&str> = filter.split('/').collect();
        let mut candidates = Vec::new();
        self.walk(0, &levels, &mut candidates);
        // The walk follows the levels; the router's own rule decides the
        // rest (topics starting with `$`, say).
        candidates
            .into_iter()
            .filter(|&t| rumqttd::protocol::matches(&self.topics[t], filter))
            .count() as u64
    }

    fn walk(&self, node: usize, levels: &[&str], out: &mut Vec<usize>) {
        match levels.split_first() {
            None => out.extend_from_slice(&self.ends[node]),
            // "a/#" matches "a" and everything under it.
            Some((&"#", _)) => self.subtree(node, out),
            Some((&"+", rest)) => {
                for &child in self.children[node].values() {
                    self.walk(child, rest, out);
                }
            }
            Some((level, rest)) => {
                if let Some(&child) = self.children[node].get(*level) {
                    self.walk(child, rest, out);
                }
            }
        }
    }

    fn subtree(&self, node: usize, out: &mut Vec<usize>) {
        out.extend_from_slice(&self.ends[node]);
        for &child in self.children[node].values() {
            self.subtree(child, out);
        }
    }
}

/// Checks now and then whether the router holds enough that is dead to be
/// worth renewing, and renews it.
pub async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = CHECK_EVERY;
    let mut put_off = false;
    let mut quiet = Quiet::default();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        if !due(&shared, &mut quiet, Instant::now()).await {
            backoff = CHECK_EVERY;
            continue;
        }
        match renew(&shared).await {
            Ok(()) => {
                backoff = CHECK_EVERY;
                put_off = false;
            }
            Err(PutOff::NotReady(why)) => {
                // Cheap to check again soon: nothing was paused.
                if !put_off {
                    shared.renewal.deferred.fetch_add(1, Ordering::Relaxed);
                    info!(why, "router renewal put off");
                }
                put_off = true;
                backoff = CHECK_EVERY;
            }
            Err(PutOff::Interrupted(why)) => {
                // Over in a moment: try again soon, without backing off.
                shared.renewal.deferred.fetch_add(1, Ordering::Relaxed);
                debug!(why, "router renewal interrupted");
                backoff = CHECK_EVERY;
            }
            Err(PutOff::Abandoned(why)) => {
                // Publishers waited for nothing: wait longer before again.
                shared.renewal.deferred.fetch_add(1, Ordering::Relaxed);
                backoff = (backoff * 2).min(Duration::from_secs(10));
                warn!(
                    why,
                    retry_in_ms = backoff.as_millis() as u64,
                    "router renewal abandoned"
                );
            }
        }
    }
}

/// Why a renewal did not happen.
#[derive(Debug)]
pub enum PutOff {
    /// Nothing was touched; it may be tried again soon.
    NotReady(&'static str),
    /// Publishing was paused and resumed with the old router kept.
    Abandoned(&'static str),
    /// As `Abandoned`, for a state that passes in a moment (a kept session
    /// ending): under kept-session churn a backoff would starve renewals
    /// while dead filters fill the router.
    Interrupted(&'static str),
}

async fn due(shared: &Shared, quiet: &mut Quiet, now: Instant) -> bool {
    if shared.flow.matched_topics() >= shared.config.max_topics {
        return true;
    }
    let max = shared.config.max_filters.max(1);
    let created = shared.created_filters();
    let settled = quiet.settled(created, now);
    // Cheap first: counting the live filters walks every session.
    if !settled && created * 10 < max {
        return false;
    }
    let live = shared.lifetimes.all_filters().await.len();
    let dead = created.saturating_sub(live);
    debug!(created, live, dead, max, settled, "router filters");
    worth_renewing(created, dead, max, settled)
}

/// How long no new filter must come before the dead ones are worth a
/// renewal of their own: under churn the router is renewed by the share of
/// dead filters, and once the churn stops what is left is freed too,
/// instead of holding its memory until the next churn.
const SETTLE: Duration = Duration::from_secs(5);

/// Whether the router has taken no new filter for [`SETTLE`]. Asked once
/// per settled stretch: a renewal (or finding nothing dead) starts the
/// wait again, so an idle broker does not walk its sessions every check.
#[derive(Debug, Default)]
struct Quiet {
    created: usize,
    since: Option<Instant>,
}

impl Quiet {
    fn settled(&mut self, created: usize, now: Instant) -> bool {
        let since = *self.since.get_or_insert(now);
        if created != self.created {
            self.created = created;
            self.since = Some(now);
            return false;
        }
        if now.duration_since(since) < SETTLE {
            return false;
        }
        self.since = Some(now);
        true
    }
}

/// The renewal policy: a quarter of `--max-filters` dead (under churn a
/// renewal every few seconds, each a pause of publishers), 1% dead once the
/// router is nearly full (so new filters are not refused), or 0.5% dead
/// once no new filter has come for a while (`settled`; a pause of the
/// publishers is not worth a few filters' memory).
fn worth_renewing(created: usize, dead: usize, max: usize, settled: bool) -> bool {
    dead * 4 >= max
        || (created * 10 >= max * 9 && dead * 100 >= max)
        || (settled && dead * 200 >= max)
}

/// Moves every session to a new router and retires the old one.
pub async fn renew(shared: &Arc<Shared>) -> Result<(), PutOff> {
    let renewal = &shared.renewal;
    let gate = renewal.gate.write().await;
    let connected = |g| renewal.is_connected(g);
    if !shared.lifetimes.offline_drained(shared, connected).await {
        return Err(PutOff::NotReady(
            "a kept session without a connection is still owed messages",
        ));
    }
    if renewal.kept_finishing() {
        // It waits for the gate this renewal holds: let it finish first.
        return Err(PutOff::NotReady("a kept session is ending"));
    }
    if !responsive(shared).await {
        return Err(PutOff::NotReady("the router is busy"));
    }
    let config = shared.config.clone();
    let new = tokio::task::spawn_blocking(move || RouterHandle::spawn(&config))
        .await
        .map_err(|_| PutOff::NotReady("could not start a router"))?;
    let new = Arc::new(new);
    let round = renewal.round.fetch_add(1, Ordering::Relaxed) + 1;
    renewal.copies.store(0, Ordering::Relaxed);
    let paused = Instant::now();
    shared.flow.pause(true);
    renewal.phase.send_replace(Phase::Pause(round));
    let steps = match drain(shared, round).await {
        Ok(steps) => steps,
        Err(why) => {
            shared.flow.pause(false);
            renewal.phase.send_replace(Phase::Idle);
            tokio::spawn(retire(new));
            return Err(why);
        }
    };
    let drained = paused.elapsed();

    // Commit: from here on the old router is left for good.
    let old = shared.replace_router(new);
    let epoch = shared.router_epoch().0;
    renewal
        .published
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .reset(epoch);
    let offline = shared.lifetimes.migrate_offline(shared, connected).await;
    renewal.phase.send_replace(Phase::Switch);
    if !wait_all(renewal, |s| s.epoch == epoch).await {
        warn!("some sessions did not move to the new router in time; they will be disconnected");
    }
    let kept = shared.lifetimes.all_filters().await;
    let filters = kept.len();
    shared.reset_created_filters(kept);
    shared.flow.resync();
    shared.flow.pause(false);
    renewal.phase.send_replace(Phase::Idle);
    drop(gate);
    let paused = paused.elapsed();
    renewal
        .last_pause_ms
        .store(paused.as_millis() as u64, Ordering::Relaxed);
    renewal.renewals.fetch_add(1, Ordering::Relaxed);
    info!(
        sessions = renewal.lock_live().len(),
        offline_sessions = offline,
        filters,
        markers = steps.markers,
        paused_ms = paused.as_millis() as u64,
        barrier_ms = steps.barrier.as_millis() as u64,
        drain_ms = (drained - steps.barrier).as_millis() as u64,
        switch_ms = (paused - drained).as_millis() as u64,
        "router renewed: sessions moved to a fresh router"
    );
    retire(old).await;
    Ok(())
}

/// Ends a router no session uses any more.
async fn retire(router: Arc<RouterHandle>) {
    if let Err(err) = router.retire().await {
        warn!(%err, "a router could not be retired; its memory stays");
    }
}

/// True if the router answers a connect at once. A router still working
/// through a backlog (thousands of unsubscribes, say) would keep sessions
/// from reaching the barrier while publishers wait for nothing.
async fn responsive(shared: &Arc<Shared>) -> bool {
    let renewal = &shared.renewal;
    if renewal.probing.swap(true, Ordering::SeqCst) {
        // The last probe is still waiting for the router.
        return false;
    }
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let id = format!(
        "axion-renewal-probe-{}",
        renewal.round.load(Ordering::Relaxed)
    );
    let (router, probing) = (shared.router(), renewal.probing.clone());
    tokio::spawn(async move {
        let _ = router.visit(id, true, Vec::new()).await;
        probing.store(false, Ordering::SeqCst);
        let _ = done_tx.send(());
    });
    tokio::time::timeout(Duration::from_millis(100), done)
        .await
        .is_ok()
}

/// What the drain took, for the renewal's log line.
struct Drained {
    /// From the pause until every session passed the barrier.
    barrier: Duration,
    /// Marker publishes sent into the old router.
    markers: usize,
}

/// Steps 1 and 2: barrier, markers, wait until every copy is counted.
async fn drain(shared: &Arc<Shared>, round: u64) -> Result<Drained, PutOff> {
    let renewal = &shared.renewal;
    let started = Instant::now();
    let passed = |s: &LiveState| s.barrier.as_ref().is_some_and(|(r, _)| *r == round);
    if !wait_all(renewal, passed).await {
        return Err(PutOff::Abandoned(
            "a session did not reach the barrier in time",
        ));
    }
    let barrier = started.elapsed();
    if renewal.kept_finishing() {
        return Err(PutOff::Interrupted("a kept session is ending"));
    }
    // What each reading position must yield: each session's own filters,
    // counted by that session (so one that leaves meanwhile is simply no
    // longer waited for), and the shared groups', counted together.
    let serving = renewal.serving();
    let mut own: Vec<Vec<String>> = Vec::new();
    let mut groups: HashSet<String> = HashSet::new();
    for live in &serving {
        let state = live.lock().unwrap_or_else(|p| p.into_inner());
        let mut mine = Vec::new();
        for path in state.barrier.iter().flat_map(|(_, f)| f) {
            if names::share_group(path).is_some() {
                groups.insert(path.clone());
            } else {
                mine.push(path.clone());
            }
        }
        own.push(mine);
    }
    let dirty: HashSet<String> = {
        let published = renewal.published.lock().unwrap_or_else(|p| p.into_inner());
        own.iter()
            .flatten()
            .chain(groups.iter())
            .map(|p| names::split_share(p).1)
            .filter(|f| published.may_hold(f))
            .map(str::to_string)
            .collect()
    };
    let (markers, own_expected, group_expected) = tokio::task::spawn_blocking(move || {
        let markers = Markers::new(dirty.iter().map(|f| marker_topic(f)).collect());
        let mut cache: HashMap<String, u64> = HashMap::new();
        let mut count = |f: &str| {
            *cache
                .entry(f.to_string())
                .or_insert_with(|| markers.copies_for(f))
        };
        let own_expected: Vec<u64> = own
            .iter()
            .map(|mine| mine.iter().map(|p| count(names::split_share(p).1)).sum())
            .collect();
        let group_expected: u64 = groups.iter().map(|p| count(names::split_share(p).1)).sum();
        (markers.topics, own_expected, group_expected)
    })
    .await
    .map_err(|_| PutOff::Abandoned("counting markers failed"))?;
    for (live, expected) in serving.iter().zip(own_expected) {
        renewal.update(live, |s| {
            s.own_expected = expected;
            s.own_copies = 0;
        });
    }
    let sent = markers.len();
    publish_markers(shared, round, markers)
        .await
        .map_err(PutOff::Abandoned)?;
    // Drainers of away sessions count no markers: they are done once
    // they have read everything admitted before the pause.
    let drained = || {
        renewal.copies.load(Ordering::Relaxed) >= group_expected
            && renewal.all_serving(&|s| s.idle && s.own_copies >= s.own_expected)
            && shared.offline.caught_up(shared)
    };
    if !renewal.wait_until(drained).await {
        let copies = renewal.copies.load(Ordering::Relaxed);
        debug!(copies, group_expected, "old router not drained in time");
        return Err(PutOff::Abandoned("the old router was not drained in time"));
    }
    Ok(Drained {
        barrier,
        markers: sent,
    })
}

async fn publish_markers(
    shared: &Arc<Shared>,
    round: u64,
    markers: Vec<String>,
) -> Result<(), &'static str> {
    if markers.is_empty() {
        return Ok(());
    }
    let props = Mark {
        marker: Some(round),
        ..Default::default()
    }
    .attach(Option::<PublishProperties>::None);
    let packets = markers
        .into_iter()
        .map(|topic| {
            let publish = crate::session::make_publish(
                Bytes::from(topic),
                Bytes::new(),
                QoS::AtMostOnce,
                false,
                0,
            );
            Packet::Publish(publish, props.clone())
        })
        .collect();
    shared
        .router()
        .visit(format!("axion-renewal-{round}"), true, packets)
        .await
        .map_err(|_| "markers not sent")
}

/// Creates a kept session on the current router under `router_id`, with
/// `filters` at their QoS, and leaves it there without a connection.
pub async fn create_kept(
    shared: &Shared,
    router_id: &str,
    filters: Vec<(String, QoS)>,
) -> Result<(), router::LinkFailed> {
    let subscribe = (!filters.is_empty()).then(|| router::subscribe(1, filters));
    shared
        .router()
        .visit(
            router_id.to_string(),
            false,
            subscribe.into_iter().collect(),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_router_is_renewed_by_its_share_of_dead_filters_or_once_filters_settle() {
        // Under churn: a quarter of the bound dead.
        assert!(!worth_renewing(3000, 2499, 10_000, false));
        assert!(worth_renewing(3000, 2500, 10_000, false));
        // Nearly full: 1% dead is enough, so new filters find room.
        assert!(!worth_renewing(9000, 99, 10_000, false));
        assert!(worth_renewing(9000, 100, 10_000, false));
        // Settled: 0.5% dead is enough, a handful is not.
        assert!(worth_renewing(80, 50, 10_000, true));
        assert!(!worth_renewing(80, 49, 10_000, true));
        assert!(!worth_renewing(80, 50, 10_000, false));
    }

    #[test]
    fn filters_settle_after_a_quiet_stretch_and_are_asked_about_once_per_stretch() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut quiet = Quiet::default();
        assert!(!quiet.settled(10, at(0)));
        // A new filter starts the wait again.
        assert!(!quiet.settled(11, at(4_000)));
        assert!(!quiet.settled(11, at(8_999)));
        assert!(quiet.settled(11, at(9_000)));
        // Asked: the next answer is one stretch away.
        assert!(!quiet.settled(11, at(9_500)));
        assert!(quiet.settled(11, at(14_000)));
        // A renewal leaves fewer filters: that is a change too.
        assert!(!quiet.settled(3, at(14_500)));
        assert!(quiet.settled(3, at(19_500)));
    }

    #[test]
    fn a_marker_topic_matches_its_filter_and_counts_once_per_position() {
        for f in ["a/b", "a/+", "a/#", "#", "+/x/#", "+"] {
            assert!(rumqttd::protocol::matches(&marker_topic(f), f), "{f}");
        }
        let markers = Markers::new(["a/b", "a/m", "m"].iter().map(|s| s.to_string()).collect());
        assert_eq!(markers.copies_for("a/b"), 1);
        assert_eq!(markers.copies_for("a/+"), 2);
        assert_eq!(markers.copies_for("#"), 3);
        assert_eq!(markers.copies_for("a/#"), 2);
        assert_eq!(markers.copies_for("+/+"), 2);
        assert_eq!(markers.copies_for("+"), 1);
        assert_eq!(markers.copies_for("x"), 0);
        assert_eq!(markers.copies_for("a/b/c"), 0);
    }

    #[test]
    fn the_marker_index_counts_what_the_router_matches() {
        let topics = [
            "a", "a/b", "a/b/c", "a/m", "m/b", "b//c", "$sys/m", "m", "a/b/c/d", "x/y",
        ];
        let markers = Markers::new(topics.iter().map(|s| s.to_string()).collect());
        for filter in [
            "#", "+", "+/+", "a/#", "a/+/c", "+/b/#", "b/+/c", "+/m", "$sys/+", "a/b/c/#", "x/+",
            "a/b", "m",
        ] {
            let expected = topics
                .iter()
                .filter(|t| rumqttd::protocol::matches(t, filter))
                .count() as u64;
            assert_eq!(markers.copies_for(filter), expected, "{filter}");
        }
    }
}
