//! When a disconnected client's session ends, and freeing it then.
//!
//! rumqttd keeps a persistent session (subscriptions, reading positions,
//! unacknowledged messages) until the same client id connects again, which
//! for an abandoned id is forever. The front end decides instead: MQTT 5's
//! Session Expiry Interval, capped by `max_session_expiry`, which is also
//! the lifetime of a 3.1.1 persistent session. When it passes with no new
//! connection, the router's copy is erased the only way its public links
//! allow: connect the id with a clean session and leave at once.
//!
//! Each connection of a client id gets a generation; an ending session may
//! only schedule or perform the erase while it is still the newest, and the
//! erase runs under the same lock a new connection takes, so an erase never
//! hits a live session.
//!
//! What the router does not give back on a resumed session, the front end
//! keeps here beside it: which filters it holds with No Local and
//! retain-as-published, and, while no connection reads them, the flow
//! control positions of its filters, so publishers still wait for a kept
//! session that falls behind (and, past the slow-consumer timeout, it is
//! the one that loses, counted and logged) instead of the router silently
//! overwriting what it has not read.

use std::collections::{HashMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttd::protocol::QoS;
use tokio::sync::Mutex;
use tracing::{debug, warn};

use crate::flow::Consumer;
use crate::names;
use crate::offline::Drainer;
use crate::server::Shared;

/// A session's subscriptions as the front end needs them after a resume
/// (router-form filters, `$share/<group>/` included).
#[derive(Default)]
pub struct Subscriptions {
    pub filters: HashSet<String>,
    /// The QoS each filter was granted, to subscribe it again elsewhere.
    pub qos: HashMap<String, QoS>,
    pub nolocal: HashSet<String>,
    pub rap: HashSet<String>,
    /// Flow positions of the non-shared filters while the session is kept
    /// with no connection.
    pub parked: Vec<(String, Arc<Consumer>)>,
    /// `$SYS` filters: the front end serves them, the router never has
    /// them (see [`crate::sys`]).
    pub sys: HashMap<String, SysFilter>,
}

/// One `$SYS` subscription of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SysFilter {
    pub qos: u8,
    /// Retain-as-published.
    pub rap: bool,
}

impl Subscriptions {
    /// Each filter with the QoS it was granted.
    pub fn with_qos(&self) -> Vec<(String, QoS)> {
        self.filters
            .iter()
            .map(|f| {
                let qos = self.qos.get(f).copied().unwrap_or(QoS::AtLeastOnce);
                (f.clone(), qos)
            })
            .collect()
    }
}

impl Subscriptions {
    /// Each filter with its QoS (as a number) and retain-as-published, as
    /// [`crate::offline`] captures for them.
    pub fn for_capture(&self) -> Vec<(String, u8, bool)> {
        self.with_qos()
            .into_iter()
            .map(|(path, qos)| {
                let rap = self.rap.contains(&path);
                (path, qos as u8, rap)
            })
            .collect()
    }
}

pub type SharedSubscriptions = Arc<std::sync::Mutex<Subscriptions>>;

/// Stops flow control for flow positions (of non-shared filters) that
/// nobody will read any more.
pub fn release(shared: &Shared, positions: impl IntoIterator<Item = (String, Arc<Consumer>)>) {
    for (path, consumer) in positions {
        let (_, filter) = names::split_share(&path);
        shared.flow.unsubscribe(filter, &consumer, true);
    }
}

/// Releases what a session that will not resume had parked.
fn unpark(shared: &Shared, subs: &SharedSubscriptions) {
    let parked = std::mem::take(&mut subs.lock().unwrap_or_else(|p| p.into_inner()).parked);
    release(shared, parked);
}

/// A kept session as the data directory holds it: enough to create it on
/// the router again at start, with its owner and what is left of its
/// expiry. Written when the session connects, subscribes, unsubscribes and
/// ends; removed when it is erased.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KeptRecord {
    pub router_id: String,
    #[serde(default)]
    pub owner: Option<String>,
    /// Seconds the session outlives its connection.
    pub expiry: u32,
    /// Unix ms its last connection ended; none while connected (a crash
    /// ends it at the next start).
    #[serde(default)]
    pub ended_ms: Option<u64>,
    pub filters: Vec<KeptFilter>,
    /// `$SYS` filters (client form), kept beside the router's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sys: Vec<KeptFilter>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KeptFilter {
    /// Router form.
    pub path: String,
    pub qos: u8,
    #[serde(default)]
    pub nolocal: bool,
    #[serde(default)]
    pub rap: bool,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl KeptRecord {
    /// The record of `router_id`'s session with these subscriptions.
    pub fn new(
        router_id: &str,
        owner: Option<&str>,
        expiry: u32,
        ended: bool,
        subs: &Subscriptions,
    ) -> Self {
        let mut filters: Vec<KeptFilter> = subs
            .filters
            .iter()
            .map(|path| KeptFilter {
                path: path.clone(),
                qos: subs.qos.get(path).map_or(1, |q| *q as u8),
                nolocal: subs.nolocal.contains(path),
                rap: subs.rap.contains(path),
            })
            .collect();
        filters.sort_by(|a, b| a.path.cmp(&b.path));
        let mut sys: Vec<KeptFilter> = subs
            .sys
            .iter()
            .map(|(path, f)| KeptFilter {
                path: path.clone(),
                qos: f.qos,
                nolocal: false,
                rap: f.rap,
            })
            .collect();
        sys.sort_by(|a, b| a.path.cmp(&b.path));
        Self {
            router_id: router_id.to_string(),
            owner: owner.map(str::to_string),
            expiry,
            ended_ms: ended.then(unix_ms),
            filters,
            sys,
        }
    }

    /// Writes it (nothing without a data directory); the commit resolves
    /// once it is on disk.
    pub fn save(&self, shared: &Shared) -> Option<crate::disk::Commit> {
        // A struct of strings and numbers always serializes.
        let record = serde_json::to_vec(self).unwrap_or_default();
        shared
            .disk
            .as_ref()
            .map(|disk| disk.put_session(&self.router_id, record))
    }
}

/// Forgets a kept session on disk, with what it was owed.
pub fn forget_kept(shared: &Shared, router_id: &str) {
    if let Some(disk) = &shared.disk {
        drop(disk.delete_session(router_id));
        shared.offline.forget(disk, router_id);
    }
}

fn qos_of(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Puts the kept sessions read from disk back: each is created on the
/// router with its filters, registered here with what is left of its
/// expiry, and erased when that runs out. Expired and unreadable records
/// are dropped. Runs before the listeners accept anyone.
pub async fn restore_kept(shared: &Arc<Shared>, records: Vec<Vec<u8>>) {
    let now = unix_ms();
    let mut restored = 0;
    for raw in records {
        let record: KeptRecord = match serde_json::from_slice(&raw) {
            Ok(r) => r,
            Err(err) => {
                warn!(%err, "unreadable kept-session record dropped");
                continue;
            }
        };
        let away_ms = now.saturating_sub(record.ended_ms.unwrap_or(now));
        let left = u64::from(record.expiry).saturating_sub(away_ms / 1000);
        if left == 0 {
            forget_kept(shared, &record.router_id);
            continue;
        }
        let filters: Vec<(String, QoS)> = record
            .filters
            .iter()
            .filter(|f| shared.admit_filter(&f.path))
            .map(|f| (f.path.clone(), qos_of(f.qos)))
            .collect();
        if let Err(err) = crate::renewal::create_kept(shared, &record.router_id, filters).await {
            warn!(client = record.router_id, %err, "a kept session could not be restored");
            continue;
        }
        let mut subs = Subscriptions::default();
        for f in &record.filters {
            subs.filters.insert(f.path.clone());
            subs.qos.insert(f.path.clone(), qos_of(f.qos));
            if f.nolocal {
                subs.nolocal.insert(f.path.clone());
            }
            if f.rap {
                subs.rap.insert(f.path.clone());
            }
        }
        for f in &record.sys {
            subs.sys.insert(
                f.path.clone(),
                SysFilter {
                    qos: f.qos,
                    rap: f.rap,
                },
            );
        }
        let left = u32::try_from(left).unwrap_or(u32::MAX);
        let generation = shared
            .lifetimes
            .next_generation
            .fetch_add(1, Ordering::Relaxed);
        shared.lifetimes.newest.lock().await.insert(
            record.router_id.clone(),
            Newest {
                generation,
                kept: true,
                expiry: Arc::new(AtomicU32::new(left)),
                unacknowledged: Arc::new(AtomicUsize::new(0)),
                subscriptions: Arc::new(std::sync::Mutex::new(subs)),
                will: Arc::new(std::sync::Mutex::new(None)),
                owner: record.owner.clone(),
                drainer: None,
                away: false,
            },
        );
        shared.lifetimes.kept.fetch_add(1, Ordering::Relaxed);
        // Not awaited: the next start reads the old record just as well.
        drop(
            KeptRecord {
                expiry: left,
                ended_ms: Some(now),
                ..record.clone()
            }
            .save(shared),
        );
        tokio::spawn(session_ended(shared.clone(), record.router_id, generation));
        restored += 1;
    }
    if restored > 0 {
        tracing::info!(sessions = restored, "kept sessions restored");
    }
}

/// The newest connection of each client id whose session is live or kept.
#[derive(Default)]
pub struct Lifetimes {
    newest: Mutex<HashMap<String, Newest>>,
    /// One connection of a client id at a time between registering and
    /// linking to the router: two links made at once under one id make
    /// the router drop one of them mid-handshake.
    linking: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    next_generation: AtomicU64,
    /// Sessions erased after expiring, for logs and tests.
    pub expired: AtomicU64,
    /// Entries of `newest` that are kept, and those of them with no
    /// connection: kept current under its lock, so `/metrics` and `$SYS`
    /// read them without taking it.
    kept: AtomicUsize,
    away: AtomicUsize,
}

pub struct Newest {
    generation: u64,
    /// The router keeps this session when the connection ends.
    kept: bool,
    /// Seconds it outlives its connection; a DISCONNECT may change it.
    expiry: Arc<AtomicU32>,
    /// Deliveries the client has not acknowledged, kept current by its
    /// session: after it leaves, the router sends them first again, and
    /// they carry DUP. Shared, because the next connection may arrive
    /// before the old session notices its socket closed.
    unacknowledged: Arc<AtomicUsize>,
    subscriptions: SharedSubscriptions,
    /// The connection's will while it may still be due.
    will: WillSlot,
    /// The user whose connection made the session (`None`: anonymous, or
    /// authentication off): only that user may resume or take it over.
    owner: Option<String>,
    /// Writes what the session is owed to its queue while it is away
    /// (see [`crate::offline`]).
    drainer: Option<Drainer>,
    /// Its connection ended and the session waits for the next one
    /// (counted in `Lifetimes::away`).
    away: bool,
}

/// A connection's will, shared with the next connection of its client id:
/// whichever ends the old connection (the session finishing, or a
/// takeover) takes it, so it goes out at most once.
pub type WillSlot = Arc<std::sync::Mutex<Option<Will>>>;

/// A will as the CONNECT carried it (topic already in router form).
pub type Will = (
    rumqttd::protocol::LastWill,
    Option<rumqttd::protocol::LastWillProperties>,
);

/// The session of a connection being registered, as [`Newest`] keeps it.
pub struct Joining {
    /// The router keeps this session when the connection ends.
    pub kept: bool,
    /// Seconds the session outlives the connection.
    pub expiry: Arc<AtomicU32>,
    /// Deliveries the client has not acknowledged.
    pub unacknowledged: Arc<AtomicUsize>,
    pub will: WillSlot,
    /// The user connecting (see [`Newest::owner`]).
    pub owner: Option<String>,
}

/// A connection refused because its client id names a session (live or
/// kept) of another user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignSession {
    pub owner: Option<String>,
}

/// A will's Will Delay Interval in seconds (0 without one).
pub fn will_delay(will: &Will) -> u32 {
    will.1.as_ref().and_then(|p| p.delay_interval).unwrap_or(0)
}

/// What a new connection learns about its client id.
pub struct Resumed {
    pub generation: u64,
    /// Deliveries unacknowledged by the previous connection.
    pub unacknowledged: usize,
    /// The subscriptions of the session this connection continues (empty
    /// for a new one); the connection keeps them current.
    pub subscriptions: SharedSubscriptions,
    /// The will of a connection this one takes over, still to be decided.
    pub superseded_will: Option<Will>,
    /// The session comes back from away: its queue is to be read and
    /// sent before anything live (see [`crate::offline`]).
    pub back: bool,
}

impl Lifetimes {
    /// Registers a new connection of `router_id`, cancelling any expiry of
    /// its previous session (waits while an erase is under way). The old
    /// session is erased before the caller connects anew with `clean_start`
    /// and a session to keep, or when the old one was to end with its
    /// connection (it may not have noticed yet that its socket closed).
    pub async fn connected(
        &self,
        shared: &Arc<Shared>,
        router_id: &str,
        clean_start: bool,
        joining: Joining,
    ) -> Result<Resumed, ForeignSession> {
        let Joining {
            kept,
            expiry,
            unacknowledged,
            will,
            owner,
        } = joining;
        let mut newest = self.newest.lock().await;
        // Checked under the lock every connection of this id takes, so no
        // takeover, resume or erase happens for another user in between.
        if let Some(held) = newest.get(router_id).filter(|p| p.owner != owner) {
            return Err(ForeignSession {
                owner: held.owner.clone(),
            });
        }
        // The drainer lets go of the router's session before anything
        // else touches it.
        if let Some(drainer) = newest.get_mut(router_id).and_then(|p| p.drainer.take()) {
            drainer.stop().await;
        }
        let ends_with_connection = newest
            .get(router_id)
            .is_some_and(|p| p.kept && p.expiry.load(Ordering::Relaxed) == 0);
        if kept && (clean_start || ends_with_connection) {
            erase(shared, router_id).await;
        }
        // The router resumes a kept session for an unclean connect (one it
        // keeps, or an MQTT 5 connection without Clean Start).
        let resumes = !(clean_start || (kept && ends_with_connection));
        let previous = newest.remove(router_id);
        if let Some(p) = &previous {
            self.forgotten(p);
        }
        // A session that will not be kept replaces one that was.
        if !kept && previous.as_ref().is_some_and(|p| p.kept) {
            forget_kept(shared, router_id);
        }
        let superseded_will = previous.as_ref().and_then(|p| {
            p.will
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take()
        });
        let back = resumes
            && previous.as_ref().is_some_and(|p| p.kept)
            && shared.offline.unpark(router_id);
        let subscriptions = match previous.as_ref() {
            Some(p) if p.kept && resumes => p.subscriptions.clone(),
            Some(p) => {
                unpark(shared, &p.subscriptions);
                SharedSubscriptions::default()
            }
            None => SharedSubscriptions::default(),
        };
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        newest.insert(
            router_id.to_string(),
            Newest {
                generation,
                kept,
                expiry,
                unacknowledged,
                subscriptions: subscriptions.clone(),
                will,
                owner,
                drainer: None,
                away: false,
            },
        );
        if kept {
            self.kept.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Resumed {
            generation,
            unacknowledged: previous
                .filter(|p| p.kept)
                .map_or(0, |p| p.unacknowledged.load(Ordering::Relaxed)),
            subscriptions,
            superseded_will,
            back,
        })
    }

    /// Sessions kept beyond their connection, and those of them that have
    /// no connection now.
    pub fn kept_sessions(&self) -> (usize, usize) {
        (
            self.kept.load(Ordering::Relaxed),
            self.away.load(Ordering::Relaxed),
        )
    }

    /// Takes an entry leaving `newest` out of the counts.
    fn forgotten(&self, entry: &Newest) {
        if entry.kept {
            self.kept.fetch_sub(1, Ordering::Relaxed);
        }
        if entry.away {
            self.away.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Waits for any other connection of `router_id` to finish linking;
    /// the guard lets the next one in.
    pub async fn linking(&self, router_id: &str) -> Linking<'_> {
        let lock = self
            .linking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(router_id.to_string())
            .or_default()
            .clone();
        let guard = lock.clone().lock_owned().await;
        Linking {
            lifetimes: self,
            router_id: router_id.to_string(),
            guard: Some(guard),
            lock,
        }
    }

    /// The lock new connections take, if `generation` is still the newest
    /// connection of `router_id` (no takeover can start while it is held).
    pub async fn hold_if_newest(
        &self,
        router_id: &str,
        generation: u64,
    ) -> Option<tokio::sync::MutexGuard<'_, HashMap<String, Newest>>> {
        let newest = self.newest.lock().await;
        newest
            .get(router_id)
            .is_some_and(|e| e.generation == generation)
            .then_some(newest)
    }

    /// Every filter a connected or kept session holds.
    pub async fn all_filters(&self) -> HashSet<String> {
        let newest = self.newest.lock().await;
        let mut all = HashSet::new();
        for entry in newest.values() {
            let subs = entry
                .subscriptions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            all.extend(subs.filters.iter().cloned());
        }
        all
    }

    /// True if no kept session without a connection (`connected` tells
    /// the connected generations) is owed anything by the router: nothing
    /// unacknowledged, nothing unread on its filters.
    pub async fn offline_drained(&self, shared: &Shared, connected: impl Fn(u64) -> bool) -> bool {
        let newest = self.newest.lock().await;
        let drained = offline(&newest, connected).all(|(_, e)| {
            // An away session with a drainer is owed nothing by the
            // router: the renewal waits for its drainer to catch up.
            if e.drainer.is_some() {
                return true;
            }
            let subs = e.subscriptions.lock().unwrap_or_else(|p| p.into_inner());
            e.unacknowledged.load(Ordering::Relaxed) == 0
                && subs.parked.iter().all(|(path, c)| {
                    c.kicked.load(Ordering::Relaxed)
                        || shared.flow.lag(names::split_share(path).1, c) == 0
                })
        });
        drained
    }

    /// True once every away session has a drainer and each has read all
    /// the router holds for it: a clean stop waits for this, so what the
    /// last connections left unacknowledged is in their queues.
    pub async fn settled(&self, shared: &Shared) -> bool {
        if shared.disk.is_none() {
            return true;
        }
        let newest = self.newest.lock().await;
        newest
            .values()
            .filter(|e| e.kept && e.expiry.load(Ordering::Relaxed) > 0)
            .all(|e| e.drainer.is_some())
            && shared.offline.caught_up(shared)
    }

    /// Creates every kept session without a connection on the (new)
    /// current router, with its filters; returns how many.
    pub async fn migrate_offline(&self, shared: &Shared, connected: impl Fn(u64) -> bool) -> usize {
        let newest = self.newest.lock().await;
        let mut moved = 0;
        for (router_id, e) in offline(&newest, connected) {
            let filters = e
                .subscriptions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .with_qos();
            match crate::renewal::create_kept(shared, router_id, filters).await {
                Ok(()) => moved += 1,
                Err(err) => {
                    warn!(client = router_id, %err, "a kept session could not be moved to the new router; it is lost")
                }
            }
        }
        moved
    }

    /// Keeps the flow positions of an ended connection with its kept
    /// session; gives them back if the session is not kept or a newer
    /// connection has it (the caller then drops them).
    pub async fn park(
        &self,
        router_id: &str,
        generation: u64,
        positions: Vec<(String, Arc<Consumer>)>,
    ) -> Result<(), Vec<(String, Arc<Consumer>)>> {
        let newest = self.newest.lock().await;
        match newest.get(router_id) {
            Some(e) if e.generation == generation && e.kept => {
                e.subscriptions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .parked
                    .extend(positions);
                Ok(())
            }
            _ => Err(positions),
        }
    }
}

/// Held by a connection while it registers and links (see
/// [`Lifetimes::linking`]).
pub struct Linking<'a> {
    lifetimes: &'a Lifetimes,
    router_id: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    lock: Arc<Mutex<()>>,
}

impl Drop for Linking<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        // The map keeps no lock nobody waits for.
        let mut map = self
            .lifetimes
            .linking
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.router_id);
        }
    }
}

/// Kept sessions whose connection has ended.
fn offline(
    newest: &HashMap<String, Newest>,
    connected: impl Fn(u64) -> bool,
) -> impl Iterator<Item = (&String, &Newest)> {
    newest
        .iter()
        .filter(move |(_, e)| e.kept && !connected(e.generation))
}

/// The connection `generation` of `router_id` has ended and told the
/// router so. A session the router keeps is erased now (expiry 0) or once
/// its expiry passes without a newer connection.
pub async fn session_ended(shared: Arc<Shared>, router_id: String, generation: u64) {
    let expiry = {
        let mut newest = shared.lifetimes.newest.lock().await;
        let Some(entry) = newest.get_mut(&router_id) else {
            return;
        };
        if entry.generation != generation {
            return;
        }
        if !entry.kept {
            if let Some(gone) = newest.remove(&router_id) {
                shared.lifetimes.forgotten(&gone);
            }
            return;
        }
        let expiry = Duration::from_secs(u64::from(entry.expiry.load(Ordering::Relaxed)));
        if !expiry.is_zero() && shared.disk.is_some() && entry.drainer.is_none() {
            let filters = entry
                .subscriptions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .for_capture();
            let queue = shared
                .offline
                .park(shared.disk.as_deref(), &router_id, &filters);
            entry.drainer = Some(crate::offline::spawn_drainer(
                shared.clone(),
                queue,
                entry.subscriptions.clone(),
                entry.unacknowledged.load(Ordering::Relaxed),
            ));
        }
        if expiry.is_zero() {
            erase(&shared, &router_id).await;
            if let Some(gone) = newest.remove(&router_id) {
                shared.lifetimes.forgotten(&gone);
                unpark(&shared, &gone.subscriptions);
            }
            return;
        }
        if !entry.away {
            entry.away = true;
            shared.lifetimes.away.fetch_add(1, Ordering::Relaxed);
        }
        expiry
    };
    tokio::time::sleep(expiry).await;
    let mut newest = shared.lifetimes.newest.lock().await;
    if let Some(entry) = newest
        .get_mut(&router_id)
        .filter(|e| e.generation == generation)
    {
        if let Some(drainer) = entry.drainer.take() {
            drainer.stop().await;
        }
        erase(&shared, &router_id).await;
        if let Some(gone) = newest.remove(&router_id) {
            shared.lifetimes.forgotten(&gone);
            unpark(&shared, &gone.subscriptions);
        }
        shared.lifetimes.expired.fetch_add(1, Ordering::Relaxed);
        debug!(client = router_id, ?expiry, "session expired and freed");
    }
}

/// Drops the router's saved session of `router_id`: a clean connect takes
/// the saved state, a disconnect right after keeps nothing.
async fn erase(shared: &Arc<Shared>, router_id: &str) {
    forget_kept(shared, router_id);
    let router = shared.router();
    if let Err(err) = router.visit(router_id.to_string(), true, Vec::new()).await {
        warn!(client = router_id, %err, "could not erase an ended session");
    }
}
