//! The legacy heartbeat service, answered by Axion: its clients keep
//! working unchanged and show up in the heartbeat mesh.
//!
//! The legacy service took `POST /heartbeat` with `{pid, name}` (and the
//! enriched `connected`, `queue`, `inflight`, `last_progress_ts`,
//! `avg_job_ms`), the same JSON over a WebSocket at `/heartbeat`, and
//! listed what it knew at `GET /heartbeats`; behind the legacy proxy the
//! client's default URL is `/heartbeat/heartbeat`, so both paths are
//! served. The Python service template's `heartbeat` events, which reach
//! the bridge as legacy `publish` frames, are handed here too.
//!
//! Each process becomes a retained record in the mesh,
//! `axion/<pkg>/heartbeat/<name>/<host>:<pid>`, filled from what it sent
//! and from `/proc` (cpu, memory, start time, and the start ticks that let
//! the reaper prove it is still the same process). When the pid goes away
//! the record turns `offline`/`exited` within a check interval. A process
//! that falls silent keeps its last record, which ages into `stale` for
//! readers and into `no_heartbeat` for the reaper.
//!
//! A process is local when its request came over loopback: only then is
//! its pid looked up in this machine's `/proc`. A remote one is recorded
//! under its peer address, with what it sent and nothing the reaper could
//! act on.

use crate::limits::InstanceLimits;
use crate::link::Link;
use axion_client::process::{self, CpuSampler, ProcessIdentity};
use axion_wire::schema::now_unix;
use axion_wire::{topics, BrokerUrls, Heartbeat, Status};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{Extensions, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A process's interval until a second beat shows the real one: the
/// shortest, so that the reaper's silence bound is `HEARTBEAT_TIMEOUT`
/// itself and not three guessed intervals.
const DEFAULT_INTERVAL_SECS: u64 = 1;
/// Largest request body or WebSocket frame taken: a beat is a few hundred bytes.
const MAX_BODY: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct LegacyConfig {
    /// The broker's nodes; every connection fails over between them.
    pub mqtt: BrokerUrls,
    pub package: String,
    /// Defaults to this machine's hostname.
    pub hostname: Option<String>,
    pub limits: InstanceLimits,
    /// An instance that beat within this long counts against its
    /// service's limit (the legacy `HEARTBEAT_TIMEOUT`).
    pub heartbeat_timeout: Duration,
    /// How often pids are checked for having exited.
    pub check_interval: Duration,
    /// Message expiry of every record (`HEARTBEAT_GHOST_SECS`).
    pub ghost_after: Duration,
    /// Take beats from this host only (over loopback). Set when
    /// authentication is on: the legacy API has no login, and a process on
    /// the same host is the only one whose pid means something here.
    pub local_only: bool,
}

impl LegacyConfig {
    pub fn new(mqtt: impl Into<BrokerUrls>, package: impl Into<String>) -> Self {
        Self {
            mqtt: mqtt.into(),
            package: package.into(),
            hostname: None,
            limits: InstanceLimits::default(),
            heartbeat_timeout: Duration::from_millis(10_000),
            check_interval: Duration::from_secs(1),
            ghost_after: Duration::from_secs(axion_wire::schema::DEFAULT_GHOST_SECS),
            local_only: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LegacyError {
    #[error(transparent)]
    Topic(#[from] axion_wire::TopicError),
    #[error(transparent)]
    Heartbeat(#[from] axion_client::HeartbeatError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving the legacy heartbeat service: {0}")]
    Serve(std::io::Error),
}

/// Where a beat came from, for the record's `source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Http,
    WebSocket,
    /// A `heartbeat` event published over the bridge.
    BridgeEvent,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Http => "legacy-http",
            Source::WebSocket => "legacy-ws",
            Source::BridgeEvent => "legacy-event",
        }
    }
}

/// Counters, shown on `GET /heartbeats/stats` and logged.
#[derive(Debug, Default)]
pub struct Counters {
    pub beats: AtomicU64,
    pub bad_beats: AtomicU64,
    pub refused_at_limit: AtomicU64,
    pub exited: AtomicU64,
}

/// One process the service has heard from.
#[derive(Debug)]
struct Tracked {
    name: String,
    pid: u32,
    host: String,
    /// Heard over loopback: its pid is one of this machine's.
    local: bool,
    /// Set for local processes: who the pid was when first heard.
    identity: Option<ProcessIdentity>,
    cpu: Option<CpuSampler>,
    boot_id: String,
    seq: u64,
    started: Instant,
    started_at: Option<f64>,
    last_beat: Instant,
    last_ms: u64,
    interval_secs: u64,
    connected: bool,
    queue_depth: u64,
    inflight: u64,
    last_progress_ts: Option<f64>,
    avg_job_ms: Option<f64>,
    cpu_percent: f64,
    memory: u64,
    net: (u64, u64),
    status: Status,
    reason: Option<String>,
    killed_at: Option<u64>,
    source: Source,
}

impl Tracked {
    /// A process heard for the first time.
    fn new(
        beat: &Beat,
        host: &str,
        local: bool,
        identity: Option<ProcessIdentity>,
        source: Source,
    ) -> Self {
        let now = Instant::now();
        Self {
            name: beat.name.clone(),
            pid: beat.pid,
            host: host.to_string(),
            local,
            identity,
            cpu: identity.map(CpuSampler::new),
            // New at every start of the process, as the schema asks.
            boot_id: match identity {
                Some(i) => format!("legacy-{}-{}", i.pid, i.start_ticks),
                None => format!("legacy-{}-{}", beat.pid, uuid::Uuid::new_v4().simple()),
            },
            seq: 0,
            started: now,
            started_at: identity.and_then(|i| process::started_at_unix(i.start_ticks)),
            last_beat: now,
            last_ms: (now_unix() * 1000.0) as u64,
            interval_secs: DEFAULT_INTERVAL_SECS,
            connected: beat.connected.unwrap_or(true),
            queue_depth: 0,
            inflight: 0,
            last_progress_ts: None,
            avg_job_ms: None,
            cpu_percent: 0.0,
            memory: 0,
            net: (0, 0),
            status: Status::Online,
            reason: None,
            killed_at: None,
            source,
        }
    }

    fn topic(&self, package: &str) -> String {
        topics::heartbeat(package, &self.name, &format!("{}:{}", self.host, self.pid))
    }

    fn record(&self, package: &str, host_boot_id: Option<&str>) -> Heartbeat {
        let mut extras = Map::new();
        extras.insert("source".into(), self.source.as_str().into());
        Heartbeat {
            service: self.name.clone(),
            instance_id: format!("{}:{}", self.host, self.pid),
            hostname: self.host.clone(),
            port: self.pid,
            package: package.to_string(),
            pid: self.pid,
            uptime_seconds: match self.started_at {
                Some(at) => (now_unix() - at).max(0.0) as u64,
                None => self.started.elapsed().as_secs(),
            },
            timestamp: self.last_ms as f64 / 1000.0,
            status: self.status,
            reason: self.reason.clone(),
            boot_id: self.boot_id.clone(),
            seq: self.seq,
            interval_secs: self.interval_secs,
            connected: self.connected,
            queue_depth: self.queue_depth,
            inflight: self.inflight,
            last_progress_ts: self.last_progress_ts,
            avg_job_ms: self.avg_job_ms,
            cpu_percent: self.identity.map(|_| self.cpu_percent),
            memory_bytes: self.identity.map(|_| self.memory),
            started_at: self.started_at,
            proc_start_ticks: self.identity.map(|i| i.start_ticks),
            host_boot_id: self.identity.and(host_boot_id.map(str::to_string)),
            extras,
        }
    }

    /// The legacy service's document for this process.
    fn document(&self, session_id: &str) -> Value {
        let mut doc = json!({
            "_id": format!("{}:{}", self.host, self.pid),
            "pid": self.pid,
            "name": self.name,
            "last": self.last_ms,
            "sessionId": session_id,
            "cpu": self.cpu_percent,
            "memory": self.memory,
            "netRx": self.net.0,
            "netTx": self.net.1,
            "status": self.status,
        });
        if let Some(at) = self.killed_at {
            doc["killedAt"] = at.into();
        }
        if let Some(reason) = &self.reason {
            doc["reason"] = reason.as_str().into();
        }
        doc
    }

    fn sample(&mut self) {
        let Some(identity) = self.identity else {
            return;
        };
        if let Some(cpu) = self.cpu.as_mut().and_then(CpuSampler::sample) {
            self.cpu_percent = cpu;
        }
        self.memory = process::rss_bytes(identity.pid).unwrap_or(self.memory);
        self.net = process::net_bytes(identity.pid).unwrap_or(self.net);
    }
}

/// What a beat carries, parsed leniently as the legacy service did
/// (`parseInt(pid)`).
#[derive(Debug, Clone, PartialEq)]
pub struct Beat {
    pub pid: u32,
    pub name: String,
    pub connected: Option<bool>,
    pub queue: Option<u64>,
    pub inflight: Option<u64>,
    /// Unix seconds.
    pub last_progress_ts: Option<f64>,
    pub avg_job_ms: Option<f64>,
}

/// Why a beat was refused: the HTTP status and the legacy error text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub error: String,
}

impl Refusal {
    fn bad(error: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            error: error.into(),
        }
    }

    fn body(&self) -> Value {
        json!({ "error": self.error })
    }
}

/// `parseInt` of the legacy service: a number, or the leading digits of a string.
fn parse_pid(v: Option<&Value>) -> Option<u32> {
    let n = match v? {
        Value::Number(n) => n.as_f64()?.trunc(),
        Value::String(s) => {
            let digits: String = s
                .trim_start()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse::<f64>().ok()?
        }
        _ => return None,
    };
    (n >= 1.0 && n <= i32::MAX as f64).then_some(n as u32)
}

fn count(v: Option<&Value>) -> Option<u64> {
    v.and_then(Value::as_f64)
        .filter(|n| n.is_finite() && *n >= 0.0)
        .map(|n| n as u64)
}

impl Beat {
    /// Reads a beat; the error is the legacy service's reply.
    pub fn parse(body: &Value) -> Result<Self, Refusal> {
        let pid = parse_pid(body.get("pid"));
        let name = body
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty());
        let (Some(pid), Some(name)) = (pid, name) else {
            return Err(Refusal::bad("pid and name required"));
        };
        topics::validate_level("name", name).map_err(|e| Refusal::bad(e.to_string()))?;
        let last_progress_ts = body
            .get("last_progress_ts")
            .and_then(Value::as_f64)
            .filter(|t| t.is_finite() && *t > 0.0)
            // Unix milliseconds (the legacy clients' Date.now()) or seconds.
            .map(|t| if t > 1e11 { t / 1000.0 } else { t });
        Ok(Self {
            pid,
            name: name.to_string(),
            connected: body.get("connected").and_then(Value::as_bool),
            queue: count(body.get("queue").or_else(|| body.get("queue_depth"))),
            inflight: count(body.get("inflight")),
            last_progress_ts,
            avg_job_ms: body
                .get("avg_job_ms")
                .and_then(Value::as_f64)
                .filter(|n| n.is_finite()),
        })
    }
}

struct Inner {
    /// By `(host, pid)`.
    tracked: HashMap<(String, u32), Tracked>,
}

/// The legacy heartbeat service: shared by its HTTP routes, the bridge's
/// event hook and the pid checker.
pub struct LegacyHeartbeats {
    config: LegacyConfig,
    host: String,
    host_boot_id: Option<String>,
    session_id: String,
    ghost_secs: u32,
    inner: Mutex<Inner>,
    link: Link,
    pub counters: Counters,
}

impl std::fmt::Debug for LegacyHeartbeats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LegacyHeartbeats")
            .field("package", &self.config.package)
            .field("host", &self.host)
            .field("tracked", &self.lock().tracked.len())
            .finish()
    }
}

impl LegacyHeartbeats {
    /// Starts the service's MQTT connection and its pid checker (which
    /// stops with `stop`). Must run inside tokio.
    pub fn start(config: LegacyConfig, stop: CancellationToken) -> Result<Arc<Self>, LegacyError> {
        topics::validate_level("package", &config.package)?;
        let host = match &config.hostname {
            Some(h) => h.clone(),
            None => axion_client::publisher::local_hostname()?,
        };
        topics::validate_level("host", &host)?;
        let link = Link::start(&config.mqtt, "axion-legacy-hb");
        let this = Arc::new(Self {
            ghost_secs: u32::try_from(config.ghost_after.as_secs()).unwrap_or(u32::MAX),
            host,
            host_boot_id: process::host_boot_id(),
            session_id: uuid::Uuid::new_v4().to_string(),
            inner: Mutex::new(Inner {
                tracked: HashMap::new(),
            }),
            link,
            counters: Counters::default(),
            config,
        });
        tokio::spawn(this.clone().check_loop(stop));
        Ok(this)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a beat from a process reached from `peer`; the reply body on
    /// success, the legacy refusal otherwise.
    pub fn accept(
        &self,
        beat: Beat,
        peer: Option<IpAddr>,
        source: Source,
    ) -> Result<Value, Refusal> {
        let local = peer.is_none_or(|ip| ip.is_loopback());
        if !local && self.config.local_only {
            self.counters.bad_beats.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal {
                status: StatusCode::FORBIDDEN,
                error: "heartbeats are taken from this host only while authentication is on".into(),
            });
        }
        let host = if local {
            self.host.clone()
        } else {
            // A topic level: IPv6 colons are fine, nothing else can appear.
            peer.map(|ip| ip.to_string()).unwrap_or_default()
        };
        let identity = if local {
            process::identity(beat.pid)
        } else {
            None
        };
        let key = (host.clone(), beat.pid);
        let now = Instant::now();
        let now_ms = (now_unix() * 1000.0) as u64;
        let mut inner = self.lock();
        // The same pid, but another process (or one that was marked gone):
        // a new instance.
        let reborn = inner.tracked.get(&key).is_some_and(|t| {
            t.name != beat.name || (local && t.identity != identity) || t.status == Status::Offline
        });
        if reborn {
            inner.tracked.remove(&key);
        }
        if !inner.tracked.contains_key(&key) {
            if let Some(limit) = self.config.limits.get(&beat.name) {
                let live = inner
                    .tracked
                    .values()
                    .filter(|t| {
                        t.name == beat.name
                            && t.status != Status::Offline
                            && t.last_beat.elapsed() <= self.config.heartbeat_timeout
                    })
                    .count();
                if live >= limit {
                    drop(inner);
                    return Err(self.refuse_at_limit(&beat, &host, identity, limit, source));
                }
            }
            tracing::info!(
                name = beat.name,
                pid = beat.pid,
                host,
                source = source.as_str(),
                "legacy process heard for the first time"
            );
            let t = Tracked::new(&beat, &host, local, identity, source);
            inner.tracked.insert(key.clone(), t);
        }
        let Some(t) = inner.tracked.get_mut(&key) else {
            return Err(Refusal::bad("internal: beat lost"));
        };
        if t.seq > 0 {
            let gap = now.duration_since(t.last_beat).as_secs_f64();
            t.interval_secs = (gap.ceil() as u64).clamp(1, 3600);
        }
        t.seq += 1;
        t.last_beat = now;
        t.last_ms = now_ms;
        t.source = source;
        if let Some(c) = beat.connected {
            t.connected = c;
        }
        if let Some(q) = beat.queue {
            t.queue_depth = q;
        }
        if let Some(i) = beat.inflight {
            t.inflight = i;
        }
        if beat.last_progress_ts.is_some() {
            t.last_progress_ts = beat.last_progress_ts;
        }
        if beat.avg_job_ms.is_some() {
            t.avg_job_ms = beat.avg_job_ms;
        }
        t.sample();
        let reply = json!({
            "status": "ok",
            "pid": t.pid,
            "name": t.name,
            "cpu": t.cpu_percent,
            "memory": t.memory,
            "netRx": t.net.0,
            "netTx": t.net.1,
        });
        let (topic, payload) = self.encode(t);
        drop(inner);
        self.counters.beats.fetch_add(1, Ordering::Relaxed);
        self.link
            .publish_retained(&topic, payload, Some(self.ghost_secs));
        Ok(reply)
    }

    fn encode(&self, t: &Tracked) -> (String, Vec<u8>) {
        let record = t.record(&self.config.package, self.host_boot_id.as_deref());
        (
            t.topic(&self.config.package),
            serde_json::to_vec(&record).unwrap_or_default(),
        )
    }

    /// Refuses one instance too many, as the legacy service did (409), and
    /// says so on the mesh: the refused process gets an offline record
    /// with the reason.
    fn refuse_at_limit(
        &self,
        beat: &Beat,
        host: &str,
        identity: Option<ProcessIdentity>,
        limit: usize,
        source: Source,
    ) -> Refusal {
        let n = self
            .counters
            .refused_at_limit
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        tracing::warn!(
            name = beat.name,
            pid = beat.pid,
            limit,
            refused_total = n,
            "instance limit reached; refusing a legacy process"
        );
        let mut t = Tracked::new(beat, host, identity.is_some(), identity, source);
        t.cpu = None;
        t.seq = 1;
        t.status = Status::Offline;
        t.reason = Some("refused:instance_limit".into());
        t.sample();
        let (topic, payload) = self.encode(&t);
        self.link
            .publish_retained(&topic, payload, Some(self.ghost_secs));
        Refusal {
            status: StatusCode::CONFLICT,
            error: format!("instance limit exceeded for {}", beat.name),
        }
    }

    /// A beat in a request body or frame: parse, then accept.
    pub fn accept_json(
        &self,
        body: &Value,
        peer: Option<IpAddr>,
        source: Source,
    ) -> Result<Value, Refusal> {
        let beat = Beat::parse(body).inspect_err(|_| {
            self.counters.bad_beats.fetch_add(1, Ordering::Relaxed);
        })?;
        self.accept(beat, peer, source)
    }

    /// `GET /heartbeats`: the legacy documents, oldest first.
    pub fn documents(&self) -> Vec<Value> {
        let inner = self.lock();
        let mut tracked: Vec<&Tracked> = inner.tracked.values().collect();
        tracked.sort_by_key(|t| (t.started, t.pid));
        tracked
            .iter()
            .map(|t| t.document(&self.session_id))
            .collect()
    }

    /// Every check interval: marks pids that exited, forgets long-gone
    /// ones, and republishes everything after a reconnect (a restarted
    /// broker may have lost the retained records).
    async fn check_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut connects = self.link.connects();
        loop {
            let republish_all = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => false,
                changed = connects.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    true
                }
            };
            let mut out = Vec::new();
            {
                let mut inner = self.lock();
                let ghost = Duration::from_secs(u64::from(self.ghost_secs));
                inner
                    .tracked
                    .retain(|_, t| t.status != Status::Offline || t.last_beat.elapsed() < ghost);
                for t in inner.tracked.values_mut() {
                    // A local pid that never ran here is gone as well.
                    let gone = t.status != Status::Offline
                        && t.local
                        && t.identity.is_none_or(|i| !process::is_running(i));
                    if gone {
                        t.status = Status::Offline;
                        t.reason = Some("exited".into());
                        t.killed_at = Some((now_unix() * 1000.0) as u64);
                        t.seq += 1;
                        self.counters.exited.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(name = t.name, pid = t.pid, "legacy process exited");
                        // The record says when it was last heard from; its
                        // state is what changed now.
                        t.last_ms = (now_unix() * 1000.0) as u64;
                    }
                    if gone || republish_all {
                        out.push(self.encode(t));
                    }
                }
            }
            for (topic, payload) in out {
                self.link
                    .publish_retained(&topic, payload, Some(self.ghost_secs));
            }
        }
    }

    /// Disconnects the service's MQTT connection.
    pub async fn stop(&self) {
        self.link.stop().await;
    }
}

/// The client's address, when the server recorded it.
fn peer_of(extensions: &Extensions) -> Option<IpAddr> {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
}

/// The legacy service's routes: merge them into another router (the
/// bridge's), or serve them alone with [`serve`].
pub fn routes(service: Arc<LegacyHeartbeats>) -> Router {
    Router::new()
        .route("/heartbeat", post(post_beat).get(ws_beat))
        .route("/heartbeat/heartbeat", post(post_beat).get(ws_beat))
        .route("/heartbeats", get(list))
        .route("/heartbeat/heartbeats", get(list))
        .with_state(service)
}

fn reply(result: Result<Value, Refusal>) -> Response {
    match result {
        Ok(body) => Json(body).into_response(),
        Err(refusal) => (refusal.status, Json(refusal.body())).into_response(),
    }
}

async fn post_beat(
    State(s): State<Arc<LegacyHeartbeats>>,
    extensions: Extensions,
    body: Bytes,
) -> Response {
    if body.len() > MAX_BODY {
        s.counters.bad_beats.fetch_add(1, Ordering::Relaxed);
        return reply(Err(Refusal::bad(format!(
            "body too large: {} bytes (limit {MAX_BODY})",
            body.len()
        ))));
    }
    let parsed: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            s.counters.bad_beats.fetch_add(1, Ordering::Relaxed);
            return reply(Err(Refusal::bad(format!("invalid json: {e}"))));
        }
    };
    reply(s.accept_json(&parsed, peer_of(&extensions), Source::Http))
}

async fn ws_beat(
    State(s): State<Arc<LegacyHeartbeats>>,
    extensions: Extensions,
    ws: WebSocketUpgrade,
) -> Response {
    let peer = peer_of(&extensions);
    ws.max_message_size(MAX_BODY)
        .on_upgrade(move |socket| ws_connection(socket, s, peer))
}

async fn ws_connection(mut socket: WebSocket, s: Arc<LegacyHeartbeats>, peer: Option<IpAddr>) {
    while let Some(Ok(msg)) = socket.recv().await {
        let body = match msg {
            Message::Text(text) => match serde_json::from_str::<Value>(text.as_str()) {
                Ok(v) => match s.accept_json(&v, peer, Source::WebSocket) {
                    Ok(body) => body,
                    Err(refusal) => refusal.body(),
                },
                Err(_) => {
                    s.counters.bad_beats.fetch_add(1, Ordering::Relaxed);
                    json!({ "error": "invalid json" })
                }
            },
            Message::Binary(_) => json!({ "error": "invalid json" }),
            Message::Close(_) => return,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        if socket
            .send(Message::Text(body.to_string().into()))
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn list(State(s): State<Arc<LegacyHeartbeats>>) -> Json<Vec<Value>> {
    Json(s.documents())
}

/// Serves the legacy routes alone on `addr` (`--legacy-heartbeat-listen`)
/// until `stop` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    service: Arc<LegacyHeartbeats>,
    stop: CancellationToken,
) -> Result<SocketAddr, LegacyError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| LegacyError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| LegacyError::Bind { addr, source })?;
    tracing::info!(listen = %local, "legacy heartbeat service up");
    let app = routes(service).into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
        {
            tracing::error!(%error, "legacy heartbeat listener failed");
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_beats_as_leniently_as_the_legacy_service() {
        let b = Beat::parse(&json!({"pid": "4242", "name": "embed"})).unwrap();
        assert_eq!((b.pid, b.name.as_str()), (4242, "embed"));
        assert_eq!(
            Beat::parse(&json!({"pid": 12.9, "name": "x"})).unwrap().pid,
            12
        );
        let enriched = Beat::parse(&json!({"pid": 7, "name": "embeddings", "connected": false,
            "queue": 42, "inflight": 8, "last_progress_ts": 1_724_612_345_678u64, "avg_job_ms": 37}))
        .unwrap();
        assert_eq!(enriched.connected, Some(false));
        assert_eq!(enriched.queue, Some(42));
        assert_eq!(enriched.inflight, Some(8));
        assert_eq!(enriched.last_progress_ts, Some(1_724_612_345.678));
        assert_eq!(enriched.avg_job_ms, Some(37.0));
        for bad in [
            json!({}),
            json!({"pid": 1}),
            json!({"name": "x"}),
            json!({"pid": "abc", "name": "x"}),
            json!({"pid": 0, "name": "x"}),
            json!({"pid": -5, "name": "x"}),
            json!({"pid": 5, "name": ""}),
            json!({"pid": 5, "name": 3}),
        ] {
            assert_eq!(
                Beat::parse(&bad).unwrap_err(),
                Refusal::bad("pid and name required"),
                "{bad}"
            );
        }
        let slash = Beat::parse(&json!({"pid": 5, "name": "a/b"})).unwrap_err();
        assert_eq!(slash.status, StatusCode::BAD_REQUEST);
        assert!(slash.error.contains("a/b"), "{}", slash.error);
    }
}
