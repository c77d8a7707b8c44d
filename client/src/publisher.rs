//! The retained heartbeat every Axion process publishes, started in one call.
//!
//! `HeartbeatPublisher::start` opens a dedicated MQTT 5 connection (so the
//! heartbeat keeps telling the truth about the process even when the
//! service's own connection is busy or gone) and publishes the docs/DESIGN.md
//! record, retained, to `axion/<pkg>/heartbeat/<service>/<host>:<port>`:
//! every interval, at once on every CONNACK (the embedded broker forgets
//! retained messages when it restarts), at once when anyone publishes to
//! `axion/<pkg>/cmd/announce` or the fleet-wide `axion/cmd/announce` (a
//! reader on another node of a clustered broker, where this record may not
//! be retained), and at once when someone else's record lands
//! on this instance's topic (the late will of an earlier run, or a janitor's
//! clear), so the retained record is this run's within a second.
//!
//! Its MQTT will is the same record with `status: offline, reason: lost` and
//! this run's `boot_id`, so a crash shows at once. Every record carries MQTT 5
//! message expiry (`HEARTBEAT_GHOST_SECS`) so a dead instance's record does
//! not stay retained forever on brokers that honour expiry for retained
//! messages; `janitor` covers brokers that do not.

use crate::connection::{options_v5, Failover, Reconnect};
use crate::HeartbeatError;
use axion_wire::schema::{now_unix, Heartbeat, Status, DEFAULT_GHOST_SECS, DEFAULT_INTERVAL_SECS};
use axion_wire::{ids, topics, BrokerUrls};
use rumqttc::v5::mqttbytes::v5::{LastWill, LastWillProperties, Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use rumqttc::Outgoing;
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::sleep_until;

/// Keep-alive of the heartbeat connection: the broker fires the will of a
/// hung (SIGSTOPped, partitioned) instance after 1.5 × this, 7.5 s. A killed
/// process's socket is closed by its kernel, so its will fires at once.
/// 5 s is the smallest keep-alive rumqttc's v5 client accepts.
pub const HEARTBEAT_KEEP_ALIVE: Duration = Duration::from_secs(5);

/// Announces and corrections are answered at most this often, so a flood of
/// announces (or two processes fighting over one topic) costs little.
const MIN_REPUBLISH_GAP: Duration = Duration::from_millis(500);
/// How long `stop` waits for the broker to acknowledge the offline record.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `stop` waits for the DISCONNECT to reach the socket after the
/// offline record was acknowledged (the connection is known to be up).
const DISCONNECT_FLUSH: Duration = Duration::from_secs(2);
/// Weight of the newest job in `avg_job_ms`, an exponential moving average,
/// so a service that slows down shows it within a few jobs.
const AVG_JOB_WEIGHT: f64 = 0.2;

/// What a process says about itself when it starts its heartbeat.
#[derive(Debug, Clone)]
pub struct HeartbeatConfig {
    /// The broker's nodes; the publisher fails over between them.
    pub mqtt: BrokerUrls,
    pub package: String,
    pub service: String,
    /// Defaults to this machine's hostname.
    pub host: Option<String>,
    /// The listening port; `None` puts the pid in the port slot.
    pub port: Option<u16>,
    /// The pid to report; defaults to this process (the sidecar reports the
    /// process it watches).
    pub pid: Option<u32>,
    pub interval: Duration,
    /// MQTT 5 message expiry of every record: how long a dead instance's
    /// record stays retained.
    pub ghost_after: Duration,
    /// Caller fields merged into every record at top level.
    pub extras: Map<String, Value>,
}

impl HeartbeatConfig {
    /// A config with the docs/DESIGN.md defaults, overridden by
    /// `HEARTBEAT_INTERVAL_SECS` and `HEARTBEAT_GHOST_SECS` when set.
    pub fn new(
        mqtt: impl Into<BrokerUrls>,
        package: impl Into<String>,
        service: impl Into<String>,
    ) -> Result<Self, HeartbeatError> {
        Ok(Self {
            mqtt: mqtt.into(),
            package: package.into(),
            service: service.into(),
            host: None,
            port: None,
            pid: None,
            interval: env_secs("HEARTBEAT_INTERVAL_SECS", DEFAULT_INTERVAL_SECS)?,
            ghost_after: env_secs("HEARTBEAT_GHOST_SECS", DEFAULT_GHOST_SECS)?,
            extras: Map::new(),
        })
    }

    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }
}

/// Reads a whole number of seconds from the environment, `default` when unset.
pub fn env_secs(name: &'static str, default: u64) -> Result<Duration, HeartbeatError> {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => value
            .trim()
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| HeartbeatError::Env { name, value }),
        _ => Ok(Duration::from_secs(default)),
    }
}

/// This machine's hostname, as the heartbeat reports it.
pub fn local_hostname() -> Result<String, HeartbeatError> {
    hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .map_err(HeartbeatError::Hostname)
}

/// Entry point: `HeartbeatPublisher::start(config)`.
pub struct HeartbeatPublisher;

impl HeartbeatPublisher {
    /// Starts publishing and returns at once; the first record goes out as
    /// soon as the broker accepts the connection. Must be called inside a
    /// tokio runtime.
    pub fn start(config: HeartbeatConfig) -> Result<HeartbeatHandle, HeartbeatError> {
        let mqtt = config.mqtt.clone();
        let shared = Arc::new(Shared::new(config)?);
        let failover = Failover::new(mqtt.clone(), Reconnect::default());
        let mut opts = options_v5(failover.current(), &shared.id.client_id);
        opts.set_keep_alive(HEARTBEAT_KEEP_ALIVE);
        opts.set_clean_start(true);
        opts.set_max_packet_size(Some(1 << 20));
        opts.set_last_will(shared.will());
        let (client, eventloop) = AsyncClient::new(opts, 64);
        let (internal_tx, internal_rx) = mpsc::channel(64);
        let (command_tx, command_rx) = mpsc::channel(16);
        tracing::info!(topic = %shared.id.topic, boot_id = %shared.id.boot_id, broker = %mqtt, "heartbeat starting");
        let poller = tokio::spawn(poll_loop(shared.clone(), eventloop, failover, internal_tx));
        let ticker = tokio::spawn(tick_loop(shared.clone(), client, internal_rx, command_rx));
        Ok(HeartbeatHandle {
            shared,
            commands: command_tx,
            tasks: [poller, ticker],
        })
    }
}

struct Identity {
    package: String,
    service: String,
    hostname: String,
    port_slot: u32,
    instance_id: String,
    topic: String,
    announce_topic: String,
    client_id: String,
    pid: u32,
    boot_id: String,
    started: Instant,
    interval: Duration,
    ghost_secs: u32,
    /// Who the reported pid is, so a reaper can act on this record.
    process: Option<crate::process::ProcessIdentity>,
    started_at: Option<f64>,
    host_boot_id: Option<String>,
}

/// The fields the service updates between beats.
struct Live {
    connected: bool,
    queue_depth: u64,
    inflight: u64,
    last_progress_ts: Option<f64>,
    avg_job_ms: Option<f64>,
    status: Status,
    extras: Map<String, Value>,
    cpu: Option<crate::process::CpuSampler>,
}

struct Shared {
    id: Identity,
    live: Mutex<Live>,
    seq: AtomicU64,
    /// State of the heartbeat's own connection.
    mqtt_connected: AtomicBool,
    /// Set by `stop`: the poller fires it once the offline record is acked.
    stop_ack: Mutex<Option<oneshot::Sender<()>>>,
}

impl Shared {
    /// This run's identity and live record, from `config`; no I/O beyond
    /// reading `/proc` for the process's identity.
    fn new(config: HeartbeatConfig) -> Result<Self, HeartbeatError> {
        topics::validate_level("package", &config.package)?;
        topics::validate_level("service", &config.service)?;
        let hostname = match config.host.clone() {
            Some(h) => h,
            None => local_hostname()?,
        };
        topics::validate_level("host", &hostname)?;
        let pid = config.pid.unwrap_or_else(std::process::id);
        let port_slot = config.port.map(u32::from).unwrap_or(pid);
        let instance_id = format!("{hostname}:{port_slot}");
        let process = crate::process::identity(pid);
        let identity = Identity {
            topic: topics::heartbeat(&config.package, &config.service, &instance_id),
            announce_topic: topics::announce(&config.package),
            client_id: ids::heartbeat_client(&config.service, &hostname, port_slot),
            package: config.package,
            service: config.service,
            hostname,
            port_slot,
            instance_id,
            pid,
            boot_id: uuid::Uuid::new_v4().to_string(),
            started: Instant::now(),
            interval: config.interval.max(Duration::from_secs(1)),
            ghost_secs: u32::try_from(config.ghost_after.as_secs()).unwrap_or(u32::MAX),
            started_at: process.and_then(|p| crate::process::started_at_unix(p.start_ticks)),
            host_boot_id: process.and(crate::process::host_boot_id()),
            process,
        };
        Ok(Shared {
            id: identity,
            live: Mutex::new(Live {
                connected: true,
                queue_depth: 0,
                inflight: 0,
                last_progress_ts: None,
                avg_job_ms: None,
                status: Status::Online,
                extras: config.extras,
                cpu: process.map(crate::process::CpuSampler::new),
            }),
            seq: AtomicU64::new(0),
            mqtt_connected: AtomicBool::new(false),
            stop_ack: Mutex::new(None),
        })
    }

    // A poisoned lock only means another thread panicked mid-update of a few
    // counters; the values are still usable.
    fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, status: Status, reason: Option<&str>, seq: u64) -> Heartbeat {
        let mut live = self.live();
        let cpu_percent = live.cpu.as_mut().and_then(|c| c.sample());
        Heartbeat {
            service: self.id.service.clone(),
            instance_id: self.id.instance_id.clone(),
            hostname: self.id.hostname.clone(),
            port: self.id.port_slot,
            package: self.id.package.clone(),
            pid: self.id.pid,
            uptime_seconds: self.id.started.elapsed().as_secs(),
            timestamp: now_unix(),
            status,
            reason: reason.map(str::to_string),
            boot_id: self.id.boot_id.clone(),
            seq,
            interval_secs: self.id.interval.as_secs(),
            connected: live.connected,
            queue_depth: live.queue_depth,
            inflight: live.inflight,
            last_progress_ts: live.last_progress_ts,
            avg_job_ms: live.avg_job_ms,
            cpu_percent,
            memory_bytes: self
                .id
                .process
                .and_then(|p| crate::process::rss_bytes(p.pid)),
            started_at: self.id.started_at,
            proc_start_ticks: self.id.process.map(|p| p.start_ticks),
            host_boot_id: self.id.host_boot_id.clone(),
            extras: live.extras.clone(),
        }
    }

    fn payload(&self, status: Status, reason: Option<&str>) -> Vec<u8> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        // A struct of strings, numbers and a JSON map always serializes.
        serde_json::to_vec(&self.record(status, reason, seq)).unwrap_or_default()
    }

    /// The will for the next connection: this run's record as `lost`, with
    /// the time of the connection attempt.
    fn will(&self) -> LastWill {
        let seq = self.seq.load(Ordering::Relaxed);
        let payload = serde_json::to_vec(&self.record(Status::Offline, Some("lost"), seq))
            .unwrap_or_default();
        LastWill::new(
            self.id.topic.clone(),
            payload,
            QoS::AtLeastOnce,
            true,
            Some(LastWillProperties {
                delay_interval: None,
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(self.id.ghost_secs),
                content_type: Some("application/json".into()),
                response_topic: None,
                correlation_data: None,
                user_properties: Vec::new(),
            }),
        )
    }

    fn properties(&self) -> PublishProperties {
        PublishProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(self.id.ghost_secs),
            content_type: Some("application/json".into()),
            ..Default::default()
        }
    }

    /// Whether a record seen on our own topic must be replaced by ours.
    fn needs_correction(&self, payload: &[u8]) -> bool {
        match Heartbeat::from_payload(payload) {
            None => true,
            Some(Ok(hb)) => hb.boot_id != self.id.boot_id || hb.status == Status::Offline,
            Some(Err(_)) => true,
        }
    }
}

/// Messages from the task that polls the connection to the task that publishes.
enum Internal {
    Connected,
    Republish,
}

enum Command {
    PublishNow,
    Draining,
    Stop {
        reason: String,
        done: oneshot::Sender<Result<(), HeartbeatError>>,
    },
}

/// The live side of a running heartbeat. Setters are cheap (a short lock,
/// no I/O); the values go out with the next record. Dropping the handle
/// without `stop` drops the connection, which the broker reports through
/// the will as `lost`.
pub struct HeartbeatHandle {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    tasks: [JoinHandle<()>; 2],
}

impl HeartbeatHandle {
    pub fn topic(&self) -> &str {
        &self.shared.id.topic
    }

    pub fn boot_id(&self) -> &str {
        &self.shared.id.boot_id
    }

    pub fn client_id(&self) -> &str {
        &self.shared.id.client_id
    }

    /// Whether the heartbeat's own connection is up right now.
    pub fn is_publishing(&self) -> bool {
        self.shared.mqtt_connected.load(Ordering::Relaxed)
    }

    /// The service's own broker connection state (`connected` in the record).
    pub fn set_connected(&self, connected: bool) {
        self.shared.live().connected = connected;
    }

    pub fn set_queue_depth(&self, depth: u64) {
        self.shared.live().queue_depth = depth;
    }

    pub fn set_inflight(&self, inflight: u64) {
        self.shared.live().inflight = inflight;
    }

    /// Marks progress on a long job without finishing it.
    pub fn record_progress(&self) {
        self.shared.live().last_progress_ts = Some(now_unix());
    }

    /// A job finished after `took`: updates `avg_job_ms` and `last_progress_ts`.
    pub fn record_job(&self, took: Duration) {
        let ms = took.as_secs_f64() * 1000.0;
        let mut live = self.shared.live();
        live.avg_job_ms = Some(match live.avg_job_ms {
            Some(avg) => avg + AVG_JOB_WEIGHT * (ms - avg),
            None => ms,
        });
        live.last_progress_ts = Some(now_unix());
    }

    pub fn set_extra(&self, key: impl Into<String>, value: Value) {
        self.shared.live().extras.insert(key.into(), value);
    }

    /// Publishes the current record now instead of at the next interval.
    pub fn publish_now(&self) {
        if self.commands.try_send(Command::PublishNow).is_err() {
            tracing::debug!(topic = %self.shared.id.topic, "publish_now skipped: heartbeat busy or stopped");
        }
    }

    /// Switches to `draining` and publishes it at once.
    pub async fn set_draining(&self) -> Result<(), HeartbeatError> {
        self.shared.live().status = Status::Draining;
        self.commands
            .send(Command::Draining)
            .await
            .map_err(|_| HeartbeatError::Stopped)
    }

    /// Publishes `offline` with `reason` (`stopped` for a clean stop),
    /// waits for the broker's PUBACK, then disconnects cleanly; returns once
    /// the DISCONNECT is written, so the caller may exit at once.
    pub async fn stop(mut self, reason: &str) -> Result<(), HeartbeatError> {
        let (done, result) = oneshot::channel();
        self.commands
            .send(Command::Stop {
                reason: reason.to_string(),
                done,
            })
            .await
            .map_err(|_| HeartbeatError::Stopped)?;
        result.await.map_err(|_| HeartbeatError::Stopped)??;
        // The DISCONNECT is only queued so far. Returning now would drop
        // the handle, abort the poller before it writes the packet, and the
        // broker would publish the will (`lost`) over our `stopped` record;
        // a process exiting right after `stop` would do the same. The
        // poller returns once the DISCONNECT is flushed.
        let poller = &mut self.tasks[0];
        if tokio::time::timeout(DISCONNECT_FLUSH, poller)
            .await
            .is_err()
        {
            tracing::warn!(topic = %self.shared.id.topic, "DISCONNECT not flushed in time; the broker may publish the will");
        }
        Ok(())
    }
}

impl Drop for HeartbeatHandle {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn poll_loop(
    shared: Arc<Shared>,
    mut eventloop: EventLoop,
    mut failover: Failover,
    internal: mpsc::Sender<Internal>,
) {
    let topic = shared.id.topic.clone();
    let announce = shared.id.announce_topic.clone();
    // Set once the marker request that follows the offline record went out.
    let mut stop_flushed = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                failover.connected();
                shared.mqtt_connected.store(true, Ordering::Relaxed);
                tracing::debug!(topic = %topic, broker = %failover.current(), code = ?ack.code, "heartbeat connected");
                send_internal(&internal, Internal::Connected, &topic);
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let stopping = lock(&shared.stop_ack).is_some();
                if stopping {
                    continue;
                }
                if publish.topic == announce.as_bytes()
                    || publish.topic == topics::ANNOUNCE_FLEET.as_bytes()
                {
                    send_internal(&internal, Internal::Republish, &topic);
                } else if publish.topic == topic.as_bytes()
                    && shared.needs_correction(&publish.payload)
                {
                    tracing::debug!(topic = %topic, "foreign record on own topic, republishing");
                    send_internal(&internal, Internal::Republish, &topic);
                }
            }
            Ok(Event::Outgoing(Outgoing::Unsubscribe(_))) => {
                stop_flushed = lock(&shared.stop_ack).is_some();
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                shared.mqtt_connected.store(false, Ordering::Relaxed);
                tracing::debug!(topic = %topic, "heartbeat disconnected cleanly");
                return;
            }
            Ok(_) => {}
            Err(err) => {
                shared.mqtt_connected.store(false, Ordering::Relaxed);
                if internal.is_closed() {
                    return;
                }
                let wait = failover.after_failure(&mut eventloop, &err);
                tracing::warn!(topic = %topic, error = %err, retry_in = ?wait, "heartbeat connection lost");
                tokio::time::sleep(wait).await;
                eventloop.options.set_last_will(shared.will());
            }
        }
        if stop_flushed && eventloop.state.inflight() == 0 {
            if let Some(ack) = lock(&shared.stop_ack).take() {
                let _ = ack.send(());
            }
            stop_flushed = false;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn send_internal(tx: &mpsc::Sender<Internal>, msg: Internal, topic: &str) {
    if let Err(err) = tx.try_send(msg) {
        tracing::warn!(topic = %topic, error = %err, "heartbeat publisher lagging; request dropped");
    }
}

async fn tick_loop(
    shared: Arc<Shared>,
    client: AsyncClient,
    mut internal: mpsc::Receiver<Internal>,
    mut commands: mpsc::Receiver<Command>,
) {
    let topic = shared.id.topic.clone();
    let interval = shared.id.interval;
    let mut next_tick = tokio::time::Instant::now() + interval;
    // The tokio clock (the same as std's outside tests), so the gap is
    // measured on the clock the deferral below sleeps on.
    let mut last_publish = tokio::time::Instant::now() - MIN_REPUBLISH_GAP;
    let mut deferred: Option<tokio::time::Instant> = None;
    loop {
        let publish = tokio::select! {
            _ = sleep_until(next_tick) => {
                next_tick = tokio::time::Instant::now() + interval;
                shared.mqtt_connected.load(Ordering::Relaxed)
            }
            _ = sleep_until(deferred.unwrap_or(next_tick)), if deferred.is_some() => {
                deferred = None;
                true
            }
            msg = internal.recv() => match msg {
                Some(Internal::Connected) => {
                    // Clean start: the broker remembers no subscription.
                    for filter in [shared.id.announce_topic.as_str(), topics::ANNOUNCE_FLEET, topic.as_str()] {
                        if let Err(err) = client.subscribe(filter, QoS::AtLeastOnce).await {
                            tracing::warn!(topic = %topic, filter = %filter, error = %err, "heartbeat subscribe failed");
                        }
                    }
                    true
                }
                Some(Internal::Republish) => {
                    let since = last_publish.elapsed();
                    if since >= MIN_REPUBLISH_GAP {
                        true
                    } else {
                        let at = tokio::time::Instant::now() + (MIN_REPUBLISH_GAP - since);
                        deferred = Some(deferred.map_or(at, |d| d.min(at)));
                        false
                    }
                }
                None => return,
            },
            cmd = commands.recv() => match cmd {
                Some(Command::PublishNow) | Some(Command::Draining) => true,
                Some(Command::Stop { reason, done }) => {
                    let result = stop_sequence(&shared, &client, &reason).await;
                    let _ = done.send(result);
                    return;
                }
                None => return,
            },
        };
        if publish {
            let status = shared.live().status;
            let payload = shared.payload(status, None);
            match client
                .publish_with_properties(
                    topic.as_str(),
                    QoS::AtLeastOnce,
                    true,
                    payload,
                    shared.properties(),
                )
                .await
            {
                Ok(()) => last_publish = tokio::time::Instant::now(),
                Err(err) => {
                    tracing::warn!(topic = %topic, error = %err, "heartbeat publish failed")
                }
            }
        }
    }
}

async fn stop_sequence(
    shared: &Shared,
    client: &AsyncClient,
    reason: &str,
) -> Result<(), HeartbeatError> {
    let topic = &shared.id.topic;
    let (ack_tx, ack_rx) = oneshot::channel();
    *lock(&shared.stop_ack) = Some(ack_tx);
    shared.live().status = Status::Offline;
    let payload = shared.payload(Status::Offline, Some(reason));
    client
        .publish_with_properties(
            topic.as_str(),
            QoS::AtLeastOnce,
            true,
            payload,
            shared.properties(),
        )
        .await?;
    // Requests go out in order: once this marker is written, so is the
    // offline record, and the poller then waits for its PUBACK.
    client
        .unsubscribe(shared.id.announce_topic.as_str())
        .await?;
    let acked = tokio::time::timeout(STOP_TIMEOUT, ack_rx).await;
    client.disconnect().await?;
    match acked {
        Ok(Ok(())) => {
            tracing::info!(topic = %topic, reason, "heartbeat stopped");
            Ok(())
        }
        _ => {
            tracing::warn!(topic = %topic, reason, "offline record not acknowledged before disconnect");
            Err(HeartbeatError::StopTimeout(STOP_TIMEOUT))
        }
    }
}

#[cfg(test)]
mod tests {
    //! The publishing schedule on tokio's paused clock: what would take
    //! minutes of real time (15 s intervals) runs at once, and each record's
    //! time is exact.

    use super::*;
    use rumqttc::v5::Request;
    use tokio::time::Instant as Clock;

    const INTERVAL: Duration = Duration::from_secs(15);

    /// A running `tick_loop` whose MQTT requests land in `requests`.
    struct Ticker {
        shared: Arc<Shared>,
        requests: flume::Receiver<Request>,
        internal: mpsc::Sender<Internal>,
        _commands: mpsc::Sender<Command>,
        started: Clock,
    }

    impl Ticker {
        fn start() -> Self {
            let mut config = HeartbeatConfig {
                mqtt: BrokerUrls::parse("mqtt://127.0.0.1:1").unwrap(),
                package: "p".into(),
                service: "s".into(),
                host: Some("h".into()),
                port: Some(1),
                pid: None,
                interval: INTERVAL,
                ghost_after: Duration::from_secs(3600),
                extras: Map::new(),
            };
            config.extras.insert("test".into(), Value::Bool(true));
            let shared = Arc::new(Shared::new(config).unwrap());
            shared.mqtt_connected.store(true, Ordering::Relaxed);
            let (tx, requests) = flume::bounded(64);
            let (internal, internal_rx) = mpsc::channel(64);
            let (commands, command_rx) = mpsc::channel(16);
            tokio::spawn(tick_loop(
                shared.clone(),
                AsyncClient::from_senders(tx),
                internal_rx,
                command_rx,
            ));
            Self {
                shared,
                requests,
                internal,
                _commands: commands,
                started: Clock::now(),
            }
        }

        /// When (since the start) the next record goes out; subscriptions
        /// on the way are skipped.
        async fn next_record(&self) -> Duration {
            loop {
                match self.requests.recv_async().await.expect("tick_loop ended") {
                    Request::Publish(p) => {
                        assert!(p.retain, "records are retained");
                        return self.started.elapsed();
                    }
                    Request::Subscribe(_) => {}
                    other => panic!("unexpected request {other:?}"),
                }
            }
        }

        /// Whether a record goes out within `within`.
        async fn record_within(&self, within: Duration) -> bool {
            tokio::time::timeout(within, self.next_record())
                .await
                .is_ok()
        }

        async fn say(&self, msg: Internal) {
            self.internal.send(msg).await.unwrap();
        }
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_goes_out_every_interval_while_the_connection_is_up() {
        let t = Ticker::start();
        for n in 1..=3 {
            assert_eq!(t.next_record().await, INTERVAL * n);
        }
        // Down: four ticks pass without a record (the will speaks for it).
        t.shared.mqtt_connected.store(false, Ordering::Relaxed);
        assert!(!t.record_within(INTERVAL * 4 + secs(1.0)).await);
        // Back (at 106 s): a record at once, then the next tick as before.
        let back = t.started.elapsed();
        assert_eq!(back, secs(106.0));
        t.shared.mqtt_connected.store(true, Ordering::Relaxed);
        t.say(Internal::Connected).await;
        assert_eq!(t.next_record().await, back);
        assert_eq!(t.next_record().await, INTERVAL * 8);
    }

    #[tokio::test(start_paused = true)]
    async fn announces_are_answered_at_once_but_at_most_every_half_second() {
        let t = Ticker::start();
        t.say(Internal::Connected).await;
        assert_eq!(t.next_record().await, Duration::ZERO);
        // Three announces right after a record: one answer, when the gap
        // since that record has passed.
        for _ in 0..3 {
            t.say(Internal::Republish).await;
        }
        assert_eq!(t.next_record().await, MIN_REPUBLISH_GAP);
        assert!(!t.record_within(secs(1.0)).await, "one answer for three");
        // Long after the last record: answered at once.
        let now = t.started.elapsed();
        t.say(Internal::Republish).await;
        assert_eq!(t.next_record().await, now);
    }
}
