//! `axion-bench --persistence`: broker state across restarts, Axion
//! (`axion serve`, retained messages and kept sessions' queues in
//! `<data-dir>/state-log/`, kept sessions' records in `broker.redb`) beside Mosquitto with
//! `persistence true`, in one run. With `--baseline`, an earlier build of
//! axion runs beside them in the same rounds.
//!
//! Per broker and round, on fresh data directories:
//! 1. N retained QoS 1 messages (distinct topics, 64 B) from one publisher
//!    with up to 100 in flight: rate until the last PUBACK, broker CPU;
//! 2. a clean stop (SIGTERM, wait for the exit) and a start on the same
//!    directory: time from the spawn until a fresh QoS 0 subscriber to the
//!    bench's prefix has every retained message back, and how many came;
//!    then a fresh QoS 1 subscriber (every message acknowledged) the same;
//! 3. the size of the store (for Axion `broker.redb` and `state-log/`)
//!    after the messages were acknowledged,
//!    after the clean stop, and after the restart;
//! 4. on a new directory, N more retained QoS 1 messages, every PUBACK in,
//!    then `kill -9`, a start again, and how many come back.
//!
//! With `--sessions S`, on another fresh directory: S MQTT 3.1.1 clients
//! with clean_session=0, each subscribed to its own filter, disconnect; a
//! clean stop and a start; the time until all S have reconnected, how many
//! were told session_present=1, and to how many a message published to
//! their filter after the reconnect is still delivered (no new SUBSCRIBE).
//!
//! With `--queued N` (unless 0), per broker and round, each step on a fresh
//! directory, N QoS 1 messages of 1 KiB from one publisher with up to 100
//! in flight to `pbench-q/<i % 16>`, for one MQTT 3.1.1 subscriber with
//! clean_session=0 to `pbench-q/#` at QoS 1 that acknowledges each message
//! (Mosquitto queues up to N + 1000 per client):
//! 5. online, the subscriber connected: rate until the last PUBACK, time
//!    until the subscriber has all N and how many it got, broker CPU and
//!    messages per broker CPU-second;
//! 6. offline, the subscriber subscribed and disconnected: rate until the
//!    last PUBACK and broker CPU; then it reconnects: session_present, how
//!    many of the N come, and the time from the reconnect to the last one;
//! 7. as 6 up to the last PUBACK, then a clean stop and a start on the same
//!    directory before it reconnects: session_present and how many come;
//! 8. the same with `kill -9` instead of the clean stop. Mosquitto writes
//!    its store at a clean exit and every `autosave_interval` (its default,
//!    1800 s, is kept), so what it queued since the start is gone.

use std::collections::HashSet;
use std::path::Path;
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{axion_serve, cpu_secs, free_port, nodelay, spawn_mosquitto, Args};

/// Payload of every retained message.
const PAYLOAD: usize = 64;
/// A count that stops growing for this long is final.
const QUIET: Duration = Duration::from_secs(3);
/// Topic prefix of the retained messages and session filters.
const PREFIX: &str = "pbench";
/// Payload of every queued message.
const QUEUED_PAYLOAD: usize = 1024;
/// Client id of the persistent subscriber to the queued messages.
const QUEUED_ID: &str = "pbench-queued";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Who {
    Axion,
    /// The `--baseline` build of axion, run beside it in the same rounds.
    Baseline,
    Mosquitto,
}

impl Who {
    fn name(self) -> &'static str {
        match self {
            Who::Axion => "axion",
            Who::Baseline => "axion baseline",
            Who::Mosquitto => "mosquitto",
        }
    }

    /// Bytes of the broker's persistent state (for Axion its store and
    /// its kept sessions' queue log, not the queue owner's tasks).
    fn store_bytes(self, data: &Path) -> u64 {
        match self {
            Who::Axion | Who::Baseline => {
                file_len(&data.join("broker.redb"))
                    + dir_len(&data.join("state-log"))
                    // An earlier build's name for the log (a --baseline).
                    + dir_len(&data.join("kept-queues"))
            }
            Who::Mosquitto => file_len(&data.join("mosquitto.db")),
        }
    }
}

/// A broker process on a data directory it does not own.
struct Running {
    child: Child,
    port: u16,
    spawned: Instant,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for the exit; the seconds it took.
    async fn stop(mut self) -> anyhow::Result<f64> {
        let start = Instant::now();
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).context("broker pid")?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .context("SIGTERM the broker")?;
        let deadline = start + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    eprintln!("  (the broker exited with {status} after SIGTERM)");
                }
                return Ok(start.elapsed().as_secs_f64());
            }
            if Instant::now() > deadline {
                bail!("the broker did not exit within 120 s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `kill -9`, and waits for it to be gone.
    fn kill9(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

/// Starts `who` on `data` (created beforehand) without waiting for it;
/// Mosquitto queues up to `queue` QoS 1 messages per client (0: no limit).
fn spawn(
    who: Who,
    args: &Args,
    data: &Path,
    conf_dir: &Path,
    queue: u64,
) -> anyhow::Result<Running> {
    let port = free_port()?;
    let spawned = Instant::now();
    let child = match who {
        Who::Mosquitto => {
            // Started as root, Mosquitto drops to its own user: that user
            // must reach the data directory and write its file there.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(conf_dir, std::fs::Permissions::from_mode(0o711))?;
            std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o777))?;
            // The throughput bench's listener settings, plus persistence at
            // Mosquitto's default autosave interval (1800 s).
            let extra = format!(
                "persistence true\npersistence_location {}/\nautosave_interval 1800\n",
                data.display()
            );
            spawn_mosquitto(&conf_dir.join("m.conf"), port, queue, &extra)?
        }
        // Its default keeps 100 000 retained topics (its own records among
        // them); the bench's N must all fit.
        Who::Axion | Who::Baseline => {
            let bin = match (who, &args.baseline) {
                (Who::Baseline, Some(baseline)) => baseline,
                _ => &args.axion,
            };
            axion_serve(bin, port, data)?
                .arg("--max-retained")
                .arg((args.retained + 10_000).max(100_000).to_string())
                .spawn()
                .with_context(|| format!("spawn {} (cargo build --release)", bin.display()))?
        }
    };
    Ok(Running {
        child,
        port,
        spawned,
    })
}

/// Waits until `port` accepts a TCP connection; seconds since the spawn.
/// (A broker may bind before it has read its store: clients then wait in
/// the backlog. The time until the messages are back is what counts.)
async fn listening(broker: &Running) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if TcpStream::connect(("127.0.0.1", broker.port)).await.is_ok() {
            return Ok(broker.spawned.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            bail!("no listener on {} within 120 s", broker.port);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Bytes of every file under `dir` (sockets and the like count 0).
fn dir_len(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_len(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

fn client(port: u16, name: &str) -> anyhow::Result<(AsyncClient, EventLoop)> {
    Ok(client_as(MqttOptions::new(
        format!("{name}-{}", free_port()?),
        "127.0.0.1",
        port,
    )))
}

/// A client with up to 100 QoS 1 messages in flight and room for 1000
/// requests in its channel.
fn client_as(mut opts: MqttOptions) -> (AsyncClient, EventLoop) {
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    eventloop.network_options = nodelay();
    (client, eventloop)
}

/// `n` retained QoS 1 messages to `PREFIX/<tag>/<i>`, up to 100 in flight;
/// the seconds until the last PUBACK.
async fn publish_retained(port: u16, tag: &str, n: u64) -> anyhow::Result<f64> {
    publish_qos1(port, n, true, PAYLOAD, |i| format!("{PREFIX}/{tag}/{i}")).await
}

/// `n` QoS 1 messages of `payload` bytes (at least 8: the message's index
/// first), the `i`-th to `topic(i)`, up to 100 in flight; the seconds
/// until the last PUBACK.
async fn publish_qos1(
    port: u16,
    n: u64,
    retain: bool,
    payload: usize,
    topic: impl Fn(u64) -> String,
) -> anyhow::Result<f64> {
    let (publisher, mut eventloop) = client(port, "pbench-pub")?;
    let acks = Arc::new(AtomicU64::new(0));
    let seen = acks.clone();
    let (all_tx, all_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut all = Some(all_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    if seen.fetch_add(1, Ordering::Relaxed) + 1 >= n {
                        if let Some(tx) = all.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let start = Instant::now();
    let mut body = vec![0u8; payload.max(8)];
    for i in 0..n {
        body[..8].copy_from_slice(&i.to_be_bytes());
        publisher
            .publish(topic(i), QoS::AtLeastOnce, retain, body.clone())
            .await?;
    }
    let acked = tokio::time::timeout(Duration::from_secs(900), all_rx).await;
    let secs = start.elapsed().as_secs_f64();
    task.abort();
    if acked.is_err() {
        bail!(
            "only {} of {n} PUBACKs within 900 s",
            acks.load(Ordering::Relaxed)
        );
    }
    Ok(secs)
}

/// What a fresh subscriber got back.
struct Collected {
    /// Distinct retained topics received.
    count: u64,
    /// When the last one (with none, the SUBACK) arrived.
    last: Instant,
    /// When the SUBSCRIBE was handed to the client.
    subscribed: Instant,
    /// No SUBACK and no message within 30 s: the broker stalled.
    stalled: bool,
}

/// Subscribes to `PREFIX/<tag>/#` at `qos` and counts the distinct
/// retained topics that arrive, until all `n` are in or none came for
/// [`QUIET`].
async fn collect_retained(port: u16, tag: &str, n: u64, qos: QoS) -> anyhow::Result<Collected> {
    let (subscriber, mut eventloop) = client(port, "pbench-sub")?;
    let subscribed = Instant::now();
    subscriber
        .subscribe(format!("{PREFIX}/{tag}/#"), qos)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut topics: HashSet<String> = HashSet::with_capacity(n as usize);
    let mut last: Option<Instant> = None;
    let mut subacked = false;
    while (topics.len() as u64) < n && Instant::now() < deadline {
        let wait = match last {
            Some(last) if subacked => QUIET.saturating_sub(last.elapsed()),
            Some(last) => Duration::from_secs(30).saturating_sub(last.elapsed()),
            None => Duration::from_secs(30).saturating_sub(subscribed.elapsed()),
        };
        match tokio::time::timeout(wait, eventloop.poll()).await {
            Err(_) => break,
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                subacked = true;
                last.get_or_insert_with(Instant::now);
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.retain => {
                topics.insert(p.topic);
                last = Some(Instant::now());
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("subscriber: {e}"),
        }
    }
    drop(subscriber);
    Ok(Collected {
        count: topics.len() as u64,
        last: last.unwrap_or_else(Instant::now),
        subscribed,
        stalled: !subacked && topics.is_empty(),
    })
}

#[derive(Clone, Copy, Debug, Default)]
struct RetainedRound {
    rate: f64,
    cpu: f64,
    store_acked: u64,
    stop_secs: f64,
    store_stopped: u64,
    listening_secs: f64,
    back_secs: f64,
    back: u64,
    store_restarted: u64,
    dir_restarted: u64,
    /// A QoS 1 subscriber's turn after the QoS 0 one: how many, how long
    /// from its SUBSCRIBE, and whether the broker never answered.
    back_qos1: u64,
    qos1_secs: f64,
    qos1_stalled: bool,
    kill9_back: u64,
}

async fn retained_round(who: Who, args: &Args) -> anyhow::Result<RetainedRound> {
    let n = args.retained;
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data)?;
    let mut r = RetainedRound::default();

    // 1. Throughput, each message acknowledged.
    let broker = spawn(who, args, &data, tmp.path(), 0)?;
    listening(&broker).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu0 = cpu_secs(broker.pid());
    let secs = publish_retained(broker.port, "r", n).await?;
    r.cpu = cpu_secs(broker.pid()) - cpu0;
    r.rate = n as f64 / secs;
    r.store_acked = who.store_bytes(&data);

    // 2. Clean stop, start on the same directory, everything back to a
    // QoS 0 subscriber (what the broker restored, whatever the QoS).
    r.stop_secs = broker.stop().await?;
    r.store_stopped = who.store_bytes(&data);
    let broker = spawn(who, args, &data, tmp.path(), 0)?;
    r.listening_secs = listening(&broker).await?;
    let back = collect_retained(broker.port, "r", n, QoS::AtMostOnce).await?;
    if back.stalled {
        bail!("{}: no SUBACK after the restart", who.name());
    }
    r.back = back.count;
    r.back_secs = back.last.duration_since(broker.spawned).as_secs_f64();
    r.store_restarted = who.store_bytes(&data);
    r.dir_restarted = dir_len(&data);
    // Then the same to a QoS 1 subscriber (each message acknowledged).
    let back = collect_retained(broker.port, "r", n, QoS::AtLeastOnce).await?;
    r.back_qos1 = back.count;
    r.qos1_secs = back.last.duration_since(back.subscribed).as_secs_f64();
    r.qos1_stalled = back.stalled;
    // A stalled broker may not stop on SIGTERM.
    broker.kill9()?;

    // 4. kill -9 once every PUBACK is in, on a new directory.
    let data = tmp.path().join("data-kill9");
    std::fs::create_dir_all(&data)?;
    let broker = spawn(who, args, &data, tmp.path(), 0)?;
    listening(&broker).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish_retained(broker.port, "k", n).await?;
    broker.kill9()?;
    let broker = spawn(who, args, &data, tmp.path(), 0)?;
    listening(&broker).await?;
    let back = collect_retained(broker.port, "k", n, QoS::AtMostOnce).await?;
    if back.stalled {
        bail!("{}: no SUBACK after kill -9 and a start", who.name());
    }
    r.kill9_back = back.count;
    broker.stop().await?;
    Ok(r)
}

// A minimal MQTT 3.1.1 client for the sessions: a thousand of them at
// once, each a task and a socket, with the session-present bit in hand.

fn packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![header];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

async fn read_packet(stream: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let header = stream.read_u8().await?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let byte = stream.read_u8().await?;
        len |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    let mut body = vec![0; len];
    stream.read_exact(&mut body).await?;
    Ok((header, body))
}

/// CONNECT with clean_session=0; returns the stream and session_present.
async fn connect_persistent(port: u16, id: &str) -> anyhow::Result<(TcpStream, bool)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    let mut body = Vec::new();
    put_str(&mut body, "MQTT");
    body.extend_from_slice(&[4, 0x00]); // 3.1.1, clean_session=0
    body.extend_from_slice(&60u16.to_be_bytes());
    put_str(&mut body, id);
    stream.write_all(&packet(0x10, &body)).await?;
    let (header, ack) = read_packet(&mut stream).await?;
    if header != 0x20 || ack.len() != 2 || ack[1] != 0 {
        bail!("{id}: CONNACK {header:#x} {ack:?}");
    }
    Ok((stream, ack[0] & 1 == 1))
}

fn session_id(i: u64) -> String {
    format!("{PREFIX}-session-{i}")
}

fn session_filter(i: u64) -> String {
    format!("{PREFIX}/s/{i}/#")
}

/// One persistent session: CONNECT, SUBSCRIBE QoS 1, DISCONNECT.
async fn set_up_session(port: u16, id: String, filter: String) -> anyhow::Result<()> {
    let (mut stream, _) = connect_persistent(port, &id).await?;
    let mut body = 1u16.to_be_bytes().to_vec();
    put_str(&mut body, &filter);
    body.push(1);
    stream.write_all(&packet(0x82, &body)).await?;
    let (header, ack) = read_packet(&mut stream).await?;
    if header != 0x90 || ack.get(2) != Some(&1) {
        bail!("{id}: SUBACK {header:#x} {ack:?}");
    }
    stream.write_all(&packet(0xe0, &[])).await?;
    // Wait for the broker to close the socket: the DISCONNECT was handled.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    Ok(())
}

/// Reads until a PUBLISH arrives (acknowledging it) and counts it.
async fn await_publish(mut stream: TcpStream, delivered: Arc<AtomicU64>) {
    while let Ok((header, body)) = read_packet(&mut stream).await {
        if header >> 4 == 3 {
            let qos = (header >> 1) & 3;
            if qos == 1 && body.len() >= 2 {
                let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                if let Some(pkid) = body.get(2 + topic_len..4 + topic_len) {
                    let _ = stream.write_all(&packet(0x40, pkid)).await;
                }
            }
            delivered.fetch_add(1, Ordering::Relaxed);
            // Stays connected (a close would drop the session's state).
            let _ = tokio::time::timeout(Duration::from_secs(30), read_packet(&mut stream)).await;
            return;
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct SessionsRound {
    setup_secs: f64,
    stop_secs: f64,
    listening_secs: f64,
    reconnected_secs: f64,
    present: u64,
    delivered: u64,
}

async fn sessions_round(who: Who, args: &Args, s: u64) -> anyhow::Result<SessionsRound> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data)?;
    let mut r = SessionsRound::default();
    let broker = spawn(who, args, &data, tmp.path(), 0)?;
    listening(&broker).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    let port = broker.port;
    // 50 being set up at a time.
    for chunk in (0..s).collect::<Vec<_>>().chunks(50) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|&i| tokio::spawn(set_up_session(port, session_id(i), session_filter(i))))
            .collect();
        for t in tasks {
            t.await??;
        }
    }
    r.setup_secs = start.elapsed().as_secs_f64();
    r.stop_secs = broker.stop().await?;

    let broker = spawn(who, args, &data, tmp.path(), 0)?;
    r.listening_secs = listening(&broker).await?;
    let port = broker.port;
    // Up to 100 handshakes at a time: what the brokers' accept backlogs
    // take without dropping a SYN (a dropped one costs a second).
    let gate = Arc::new(tokio::sync::Semaphore::new(100));
    let tasks: Vec<_> = (0..s)
        .map(|i| {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await?;
                connect_persistent(port, &session_id(i)).await
            })
        })
        .collect();
    let mut streams = Vec::with_capacity(s as usize);
    for t in tasks {
        let (stream, present) = t.await??;
        r.present += u64::from(present);
        streams.push(stream);
    }
    r.reconnected_secs = broker.spawned.elapsed().as_secs_f64();

    // Does each kept subscription still deliver, without a new SUBSCRIBE?
    let delivered = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = streams
        .into_iter()
        .map(|stream| tokio::spawn(await_publish(stream, delivered.clone())))
        .collect();
    let (publisher, mut eventloop) = client(port, "pbench-spub")?;
    let acks = Arc::new(AtomicU64::new(0));
    let seen = acks.clone();
    let pump = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    seen.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    for i in 0..s {
        publisher
            .publish(
                format!("{PREFIX}/s/{i}/x"),
                QoS::AtLeastOnce,
                false,
                vec![0u8; PAYLOAD],
            )
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while acks.load(Ordering::Relaxed) < s && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut last = (delivered.load(Ordering::Relaxed), Instant::now());
    while last.0 < s && last.1.elapsed() < QUIET {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = delivered.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    r.delivered = delivered.load(Ordering::Relaxed);
    pump.abort();
    for reader in readers {
        reader.abort();
    }
    broker.stop().await?;
    Ok(r)
}

fn queued_topic(i: u64) -> String {
    format!("{PREFIX}-q/{}", i % 16)
}

/// The persistent subscriber ([`QUEUED_ID`], clean_session=0) on rumqttc,
/// its event loop on a task that acknowledges each message (manual acks
/// off) and counts the distinct ones.
struct Subscriber {
    client: AsyncClient,
    /// CONNACKs and SUBACKs, in order.
    acks: tokio::sync::mpsc::UnboundedReceiver<Packet>,
    /// Distinct messages received (by the index their payload starts with).
    got: Arc<AtomicU64>,
    /// When the latest new one came, in µs since `base`.
    last_us: Arc<AtomicU64>,
    base: Instant,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Subscriber {
    /// Connects as [`QUEUED_ID`] to take `n` messages.
    fn connect(port: u16, n: u64) -> Subscriber {
        let mut opts = MqttOptions::new(QUEUED_ID, "127.0.0.1", port);
        opts.set_clean_session(false);
        let (client, mut eventloop) = client_as(opts);
        let (acks_tx, acks) = tokio::sync::mpsc::unbounded_channel();
        let got = Arc::new(AtomicU64::new(0));
        let last_us = Arc::new(AtomicU64::new(0));
        let base = Instant::now();
        let (count, last) = (got.clone(), last_us.clone());
        let task = tokio::spawn(async move {
            let mut seen = vec![false; n as usize];
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(ack @ (Packet::ConnAck(_) | Packet::SubAck(_)))) => {
                        let _ = acks_tx.send(ack);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let index = p
                            .payload
                            .get(..8)
                            .and_then(|b| b.try_into().ok())
                            .map(u64::from_be_bytes);
                        if let Some(seen) = index.and_then(|i| seen.get_mut(i as usize)) {
                            if !*seen {
                                *seen = true;
                                count.fetch_add(1, Ordering::Relaxed);
                                last.store(base.elapsed().as_micros() as u64, Ordering::Relaxed);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        Subscriber {
            client,
            acks,
            got,
            last_us,
            base,
            task,
        }
    }

    /// The next CONNACK or SUBACK.
    async fn ack(&mut self) -> anyhow::Result<Packet> {
        tokio::time::timeout(Duration::from_secs(30), self.acks.recv())
            .await
            .context("no CONNACK or SUBACK within 30 s")?
            .context("the subscriber's event loop ended")
    }

    /// The CONNACK's session_present.
    async fn connected(&mut self) -> anyhow::Result<bool> {
        match self.ack().await? {
            Packet::ConnAck(ack) => Ok(ack.session_present),
            other => bail!("expected a CONNACK, got {other:?}"),
        }
    }

    /// Waits until all `n` are in or none came for [`QUIET`] (from `from`
    /// until the first); how many came, and when the last one did.
    async fn settle(&self, n: u64, from: Instant) -> (u64, Option<Instant>) {
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            let got = self.got.load(Ordering::Relaxed);
            let last = (got > 0)
                .then(|| self.base + Duration::from_micros(self.last_us.load(Ordering::Relaxed)));
            let quiet_since = last.map_or(from, |last| last.max(from));
            if got >= n || quiet_since.elapsed() >= QUIET || Instant::now() > deadline {
                return (got, last);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// One of steps 6–8: the offline publish, and what the reconnected
/// subscriber got.
#[derive(Clone, Copy, Debug, Default)]
struct Offline {
    rate: f64,
    cpu: f64,
    present: bool,
    got: u64,
    /// Reconnect → the last one (0 with none).
    secs: f64,
}

/// What happens between the offline publish and the reconnect.
#[derive(Clone, Copy, Debug)]
enum Then {
    Nothing,
    Stop,
    Kill9,
}

/// Steps 6–8: on `data`, the subscriber subscribes and disconnects, N are
/// published, `then`, and it reconnects; Mosquitto queues up to `queue`.
async fn offline(
    who: Who,
    args: &Args,
    data: &Path,
    queue: u64,
    then: Then,
) -> anyhow::Result<Offline> {
    let n = args.queued;
    let conf_dir = data.parent().context("data directory")?;
    std::fs::create_dir_all(data)?;
    let mut r = Offline::default();
    let broker = spawn(who, args, data, conf_dir, queue)?;
    listening(&broker).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    set_up_session(broker.port, QUEUED_ID.into(), format!("{PREFIX}-q/#")).await?;
    let cpu0 = cpu_secs(broker.pid());
    let secs = publish_qos1(broker.port, n, false, QUEUED_PAYLOAD, queued_topic).await?;
    r.cpu = cpu_secs(broker.pid()) - cpu0;
    r.rate = n as f64 / secs;
    let broker = match then {
        Then::Nothing => broker,
        Then::Stop => {
            broker.stop().await?;
            spawn(who, args, data, conf_dir, queue)?
        }
        Then::Kill9 => {
            broker.kill9()?;
            spawn(who, args, data, conf_dir, queue)?
        }
    };
    listening(&broker).await?;
    let reconnect = Instant::now();
    let mut subscriber = Subscriber::connect(broker.port, n);
    r.present = subscriber.connected().await?;
    let (got, last) = subscriber.settle(n, reconnect).await;
    r.got = got;
    r.secs = last.map_or(0.0, |last| last.duration_since(reconnect).as_secs_f64());
    drop(subscriber);
    broker.stop().await?;
    Ok(r)
}

#[derive(Clone, Copy, Debug, Default)]
struct QueuedRound {
    online_rate: f64,
    /// Publish start → the subscriber's last one.
    online_secs: f64,
    online_got: u64,
    online_cpu: f64,
    offline: Offline,
    stopped: Offline,
    killed: Offline,
}

async fn queued_round(who: Who, args: &Args) -> anyhow::Result<QueuedRound> {
    let n = args.queued;
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data)?;
    let mut r = QueuedRound::default();
    // Mosquitto's default, 1000 per client, would drop most of an offline
    // subscriber's N.
    let queue = n + 1000;

    // 5. Online.
    let broker = spawn(who, args, &data, tmp.path(), queue)?;
    listening(&broker).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut subscriber = Subscriber::connect(broker.port, n);
    subscriber
        .client
        .subscribe(format!("{PREFIX}-q/#"), QoS::AtLeastOnce)
        .await?;
    subscriber.connected().await?;
    subscriber.ack().await?;
    let cpu0 = cpu_secs(broker.pid());
    let start = Instant::now();
    let secs = publish_qos1(broker.port, n, false, QUEUED_PAYLOAD, queued_topic).await?;
    r.online_rate = n as f64 / secs;
    let (got, last) = subscriber.settle(n, start).await;
    r.online_cpu = cpu_secs(broker.pid()) - cpu0;
    r.online_got = got;
    r.online_secs = last.map_or(0.0, |last| last.duration_since(start).as_secs_f64());
    drop(subscriber);
    broker.stop().await?;

    // 6–8. Offline, each on a new directory.
    let dir = |name: &str| tmp.path().join(name);
    r.offline = offline(who, args, &dir("offline"), queue, Then::Nothing).await?;
    r.stopped = offline(who, args, &dir("stopped"), queue, Then::Stop).await?;
    r.killed = offline(who, args, &dir("killed"), queue, Then::Kill9).await?;
    Ok(r)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// A count's median, with the range when the rounds differ.
fn count(v: Vec<u64>, of: u64) -> String {
    let (lo, hi) = (
        v.iter().copied().min().unwrap_or(0),
        v.iter().copied().max().unwrap_or(0),
    );
    let mid = median(v.iter().map(|&x| x as f64).collect()) as u64;
    if lo == hi {
        format!("{mid}/{of}")
    } else {
        format!("{mid}/{of} ({lo}–{hi})")
    }
}

fn mib(bytes: f64) -> String {
    if bytes == 0.0 {
        "0 (no file)".into()
    } else {
        format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
    }
}

/// The brokers measured: Axion, its `--baseline` build if given, and
/// Mosquitto.
fn brokers(args: &Args) -> Vec<Who> {
    let mut who = vec![Who::Axion];
    if args.baseline.is_some() {
        who.push(Who::Baseline);
    }
    who.push(Who::Mosquitto);
    who
}

/// The brokers in round `round`'s order (alternating which goes first).
fn order(args: &Args, round: usize) -> Vec<Who> {
    let mut who = brokers(args);
    if !round.is_multiple_of(2) {
        who.reverse();
    }
    who
}

/// One row of the table: what is measured, then each broker's median.
type Row = (String, Vec<String>);

/// Each broker's rounds, in [`brokers`] order.
fn by_broker<R: Copy>(args: &Args, results: &[(Who, R)]) -> Vec<Vec<R>> {
    brokers(args)
        .into_iter()
        .map(|who| {
            results
                .iter()
                .filter(|(w, _)| *w == who)
                .map(|(_, r)| *r)
                .collect()
        })
        .collect()
}

fn retained_rows(args: &Args, n: u64, results: &[(Who, RetainedRound)]) -> Vec<Row> {
    let brokers = by_broker(args, results);
    let row = |what: String, cell: &dyn Fn(&[RetainedRound]) -> String| -> Row {
        (what, brokers.iter().map(|rs| cell(rs)).collect())
    };
    let m = |rs: &[RetainedRound], f: fn(&RetainedRound) -> f64| median(rs.iter().map(f).collect());
    vec![
        row(
            format!("{n} retained QoS 1 (64 B, distinct topics, 100 in flight): msg/s until the last PUBACK"),
            &|rs| format!("{:.0}", m(rs, |r| r.rate)),
        ),
        row("… broker CPU s".into(), &|rs| format!("{:.2}", m(rs, |r| r.cpu))),
        row("store file once every PUBACK is in".into(), &|rs| {
            mib(m(rs, |r| r.store_acked as f64))
        }),
        row("clean stop: SIGTERM → exit, s".into(), &|rs| {
            format!("{:.2}", m(rs, |r| r.stop_secs))
        }),
        row("store file after the clean stop".into(), &|rs| {
            mib(m(rs, |r| r.store_stopped as f64))
        }),
        row("restart: spawn → the port accepts TCP, s".into(), &|rs| {
            format!("{:.3}", m(rs, |r| r.listening_secs))
        }),
        row(
            "restart: spawn → a fresh QoS 0 subscriber to the prefix has all back, s".into(),
            &|rs| format!("{:.2}", m(rs, |r| r.back_secs)),
        ),
        row("… came back".into(), &|rs| {
            count(rs.iter().map(|r| r.back).collect(), n)
        }),
        row("store file after the restart".into(), &|rs| {
            mib(m(rs, |r| r.store_restarted as f64))
        }),
        row("then a fresh QoS 1 subscriber: came back".into(), &|rs| {
            let stalled = rs.iter().filter(|r| r.qos1_stalled).count();
            let got = count(rs.iter().map(|r| r.back_qos1).collect(), n);
            if stalled > 0 {
                format!("{got}, no SUBACK within 30 s in {stalled} of {} rounds", rs.len())
            } else {
                got
            }
        }),
        row("… SUBSCRIBE → last one, s".into(), &|rs| {
            if rs.iter().any(|r| r.qos1_stalled) {
                "—".into()
            } else {
                format!("{:.2}", m(rs, |r| r.qos1_secs))
            }
        }),
        row(
            "kill -9 once every PUBACK is in, then a start: came back".into(),
            &|rs| count(rs.iter().map(|r| r.kill9_back).collect(), n),
        ),
    ]
}

fn sessions_rows(args: &Args, s: u64, results: &[(Who, SessionsRound)]) -> Vec<Row> {
    let brokers = by_broker(args, results);
    let row = |what: String, cell: &dyn Fn(&[SessionsRound]) -> String| -> Row {
        (what, brokers.iter().map(|rs| cell(rs)).collect())
    };
    let m = |rs: &[SessionsRound], f: fn(&SessionsRound) -> f64| median(rs.iter().map(f).collect());
    vec![
        row(
            format!("{s} persistent sessions (3.1.1, clean_session=0, one QoS 1 filter each): set up, s"),
            &|rs| format!("{:.2}", m(rs, |r| r.setup_secs)),
        ),
        row("clean stop: SIGTERM → exit, s".into(), &|rs| {
            format!("{:.2}", m(rs, |r| r.stop_secs))
        }),
        row("restart: spawn → the port accepts TCP, s".into(), &|rs| {
            format!("{:.3}", m(rs, |r| r.listening_secs))
        }),
        row(
            format!("restart: spawn → all {s} reconnected (100 handshakes at a time), s"),
            &|rs| format!("{:.2}", m(rs, |r| r.reconnected_secs)),
        ),
        row("… CONNACK with session_present=1".into(), &|rs| {
            count(rs.iter().map(|r| r.present).collect(), s)
        }),
        row(
            "… a message to each one's filter reaches it (no new SUBSCRIBE)".into(),
            &|rs| count(rs.iter().map(|r| r.delivered).collect(), s),
        ),
    ]
}

fn queued_rows(args: &Args, n: u64, results: &[(Who, QueuedRound)]) -> Vec<Row> {
    let brokers = by_broker(args, results);
    let row = |what: String, cell: &dyn Fn(&[QueuedRound]) -> String| -> Row {
        (what, brokers.iter().map(|rs| cell(rs)).collect())
    };
    let m =
        |rs: &[QueuedRound], f: &dyn Fn(&QueuedRound) -> f64| median(rs.iter().map(f).collect());
    // session_present over the rounds: 1, 0, or in how many it was 1.
    let present = |rs: &[QueuedRound], f: fn(&QueuedRound) -> Offline| {
        let yes = rs.iter().filter(|r| f(r).present).count();
        match yes {
            0 => "0".to_string(),
            y if y == rs.len() => "1".to_string(),
            y => format!("1 in {y} of {} rounds", rs.len()),
        }
    };
    let got = |rs: &[QueuedRound], f: fn(&QueuedRound) -> Offline| {
        count(rs.iter().map(|r| f(r).got).collect(), n)
    };
    vec![
        row(
            format!("{n} QoS 1 (1 KiB, 16 topics, 100 in flight) to a connected clean_session=0 subscriber: msg/s until the last PUBACK"),
            &|rs| format!("{:.0}", m(rs, &|r| r.online_rate)),
        ),
        row("… publish start → the subscriber's last one, s".into(), &|rs| {
            format!("{:.2}", m(rs, &|r| r.online_secs))
        }),
        row("… the subscriber got".into(), &|rs| {
            count(rs.iter().map(|r| r.online_got).collect(), n)
        }),
        row("… broker CPU s".into(), &|rs| format!("{:.2}", m(rs, &|r| r.online_cpu))),
        row("… messages received per broker CPU-second".into(), &|rs| {
            format!("{:.0}", m(rs, &|r| r.online_got as f64 / r.online_cpu))
        }),
        row(
            format!("{n} QoS 1 to the subscriber offline (subscribed, disconnected): msg/s until the last PUBACK"),
            &|rs| format!("{:.0}", m(rs, &|r| r.offline.rate)),
        ),
        row("… broker CPU s".into(), &|rs| format!("{:.2}", m(rs, &|r| r.offline.cpu))),
        row("then it reconnects: session_present".into(), &|rs| {
            present(rs, |r| r.offline)
        }),
        row("… it got".into(), &|rs| got(rs, |r| r.offline)),
        row("… reconnect → the last one, s".into(), &|rs| {
            if rs.iter().all(|r| r.offline.got == 0) {
                "—".into()
            } else {
                format!("{:.2}", m(rs, &|r| r.offline.secs))
            }
        }),
        row(
            "offline, then a clean stop and a start before it reconnects: session_present".into(),
            &|rs| present(rs, |r| r.stopped),
        ),
        row("… it got".into(), &|rs| got(rs, |r| r.stopped)),
        row(
            "offline, every PUBACK in, then kill -9 and a start before it reconnects: session_present".into(),
            &|rs| present(rs, |r| r.killed),
        ),
        row("… it got".into(), &|rs| got(rs, |r| r.killed)),
    ]
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    // One thread: the load generator uses about one core.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let rounds = args.rounds.max(1);
    let n = args.retained;
    let mut rows = Vec::new();
    if n > 0 {
        let mut results: Vec<(Who, RetainedRound)> = Vec::new();
        for round in 0..rounds {
            for who in order(args, round) {
                let r = rt.block_on(retained_round(who, args))?;
                eprintln!(
                    "  retained round {} {}: {:.0} msg/s, cpu {:.2}s, store {} B acked / {} B stopped ({:.2}s) / {} B restarted (data dir {} B), listening {:.3}s, {}/{n} back in {:.2}s, QoS 1 subscriber {}/{n} in {:.2}s{}, kill -9: {}/{n} back",
                    round + 1,
                    who.name(),
                    r.rate,
                    r.cpu,
                    r.store_acked,
                    r.store_stopped,
                    r.stop_secs,
                    r.store_restarted,
                    r.dir_restarted,
                    r.listening_secs,
                    r.back,
                    r.back_secs,
                    r.back_qos1,
                    r.qos1_secs,
                    if r.qos1_stalled {
                        " (stalled: no SUBACK)"
                    } else {
                        ""
                    },
                    r.kill9_back
                );
                results.push((who, r));
            }
        }
        rows.extend(retained_rows(args, n, &results));
    }
    if let Some(s) = args.sessions.filter(|&s| s > 0) {
        let mut results: Vec<(Who, SessionsRound)> = Vec::new();
        for round in 0..rounds {
            for who in order(args, round) {
                let r = rt.block_on(sessions_round(who, args, s))?;
                eprintln!(
                    "  sessions round {} {}: set up in {:.2}s, stop {:.2}s, listening {:.3}s, all {s} reconnected after {:.2}s, session_present=1 for {}, delivered to {}",
                    round + 1,
                    who.name(),
                    r.setup_secs,
                    r.stop_secs,
                    r.listening_secs,
                    r.reconnected_secs,
                    r.present,
                    r.delivered
                );
                results.push((who, r));
            }
        }
        rows.extend(sessions_rows(args, s, &results));
    }
    if args.queued > 0 {
        let q = args.queued;
        let mut results: Vec<(Who, QueuedRound)> = Vec::new();
        for round in 0..rounds {
            for who in order(args, round) {
                let r = rt.block_on(queued_round(who, args))?;
                let offline = |o: &Offline| {
                    format!(
                        "{:.0} msg/s, cpu {:.2}s, session_present={}, {}/{q} in {:.2}s",
                        o.rate,
                        o.cpu,
                        u8::from(o.present),
                        o.got,
                        o.secs
                    )
                };
                eprintln!(
                    "  queued round {} {}: online {:.0} msg/s, {}/{q} in {:.2}s, cpu {:.2}s; offline {}; clean stop {}; kill -9 {}",
                    round + 1,
                    who.name(),
                    r.online_rate,
                    r.online_got,
                    r.online_secs,
                    r.online_cpu,
                    offline(&r.offline),
                    offline(&r.stopped),
                    offline(&r.killed)
                );
                results.push((who, r));
            }
        }
        rows.extend(queued_rows(args, q, &results));
    }
    let of_rounds = if rounds > 1 {
        format!(" (median of {rounds} rounds)")
    } else {
        String::new()
    };
    let names: Vec<&str> = brokers(args)
        .into_iter()
        .map(|who| match who {
            Who::Mosquitto => "mosquitto (persistence true)",
            who => who.name(),
        })
        .collect();
    println!("| measured{of_rounds} | {} |", names.join(" | "));
    println!("|---|{}", "---|".repeat(names.len()));
    for (what, cells) in rows {
        println!("| {what} | {} |", cells.join(" | "));
    }
    Ok(())
}
