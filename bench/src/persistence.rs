//! `axion-bench --persistence`: broker state across restarts, Axion
//! (`axion serve`, retained messages in `<data-dir>/broker.redb`) beside
//! Mosquitto with `persistence true`, in one run.
//!
//! Per broker and round, on fresh data directories:
//! 1. N retained QoS 1 messages (distinct topics, 64 B) from one publisher
//!    with up to 100 in flight: rate until the last PUBACK, broker CPU;
//! 2. a clean stop (SIGTERM, wait for the exit) and a start on the same
//!    directory: time from the spawn until a fresh QoS 0 subscriber to the
//!    bench's prefix has every retained message back, and how many came;
//!    then a fresh QoS 1 subscriber (every message acknowledged) the same;
//! 3. the size of the store file after the messages were acknowledged,
//!    after the clean stop, and after the restart;
//! 4. on a new directory, N more retained QoS 1 messages, every PUBACK in,
//!    then `kill -9`, a start again, and how many come back.
//!
//! With `--sessions S`, on another fresh directory: S MQTT 3.1.1 clients
//! with clean_session=0, each subscribed to its own filter, disconnect; a
//! clean stop and a start; the time until all S have reconnected, how many
//! were told session_present=1, and to how many a message published to
//! their filter after the reconnect is still delivered (no new SUBSCRIBE).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{axion_serve, cpu_secs, free_port, nodelay, spawn_mosquitto, Args};

/// Payload of every retained message.
const PAYLOAD: usize = 64;
/// A count that stops growing for this long is final.
const QUIET: Duration = Duration::from_secs(3);
/// Topic prefix of the retained messages and session filters.
const PREFIX: &str = "pbench";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Who {
    Axion,
    Mosquitto,
}

impl Who {
    fn name(self) -> &'static str {
        match self {
            Who::Axion => "axion",
            Who::Mosquitto => "mosquitto",
        }
    }

    /// The file that holds the broker's persistent state.
    fn store(self, data: &Path) -> PathBuf {
        match self {
            Who::Axion => data.join("broker.redb"),
            Who::Mosquitto => data.join("mosquitto.db"),
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

/// Starts `who` on `data` (created beforehand) without waiting for it.
fn spawn(who: Who, args: &Args, data: &Path, conf_dir: &Path) -> anyhow::Result<Running> {
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
            spawn_mosquitto(&conf_dir.join("m.conf"), port, &extra)?
        }
        // Its default keeps 100 000 retained topics (its own records among
        // them); the bench's N must all fit.
        Who::Axion => axion_serve(&args.axion, port, data)?
            .arg("--max-retained")
            .arg((args.retained + 10_000).max(100_000).to_string())
            .spawn()
            .with_context(|| format!("spawn {} (cargo build --release)", args.axion.display()))?,
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

fn client(port: u16, name: &str) -> anyhow::Result<(AsyncClient, rumqttc::EventLoop)> {
    let mut opts = MqttOptions::new(format!("{name}-{}", free_port()?), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    eventloop.network_options = nodelay();
    Ok((client, eventloop))
}

/// `n` retained QoS 1 messages to `PREFIX/<tag>/<i>`, up to 100 in flight;
/// the seconds until the last PUBACK.
async fn publish_retained(port: u16, tag: &str, n: u64) -> anyhow::Result<f64> {
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
    let mut body = vec![0u8; PAYLOAD];
    for i in 0..n {
        body[..8].copy_from_slice(&i.to_be_bytes());
        publisher
            .publish(
                format!("{PREFIX}/{tag}/{i}"),
                QoS::AtLeastOnce,
                true,
                body.clone(),
            )
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
    let broker = spawn(who, args, &data, tmp.path())?;
    listening(&broker).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu0 = cpu_secs(broker.pid());
    let secs = publish_retained(broker.port, "r", n).await?;
    r.cpu = cpu_secs(broker.pid()) - cpu0;
    r.rate = n as f64 / secs;
    r.store_acked = file_len(&who.store(&data));

    // 2. Clean stop, start on the same directory, everything back to a
    // QoS 0 subscriber (what the broker restored, whatever the QoS).
    r.stop_secs = broker.stop().await?;
    r.store_stopped = file_len(&who.store(&data));
    let broker = spawn(who, args, &data, tmp.path())?;
    r.listening_secs = listening(&broker).await?;
    let back = collect_retained(broker.port, "r", n, QoS::AtMostOnce).await?;
    if back.stalled {
        bail!("{}: no SUBACK after the restart", who.name());
    }
    r.back = back.count;
    r.back_secs = back.last.duration_since(broker.spawned).as_secs_f64();
    r.store_restarted = file_len(&who.store(&data));
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
    let broker = spawn(who, args, &data, tmp.path())?;
    listening(&broker).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish_retained(broker.port, "k", n).await?;
    broker.kill9()?;
    let broker = spawn(who, args, &data, tmp.path())?;
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
async fn set_up_session(port: u16, i: u64) -> anyhow::Result<()> {
    let (mut stream, _) = connect_persistent(port, &session_id(i)).await?;
    let mut body = 1u16.to_be_bytes().to_vec();
    put_str(&mut body, &session_filter(i));
    body.push(1);
    stream.write_all(&packet(0x82, &body)).await?;
    let (header, ack) = read_packet(&mut stream).await?;
    if header != 0x90 || ack.get(2) != Some(&1) {
        bail!("session {i}: SUBACK {header:#x} {ack:?}");
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
    let broker = spawn(who, args, &data, tmp.path())?;
    listening(&broker).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    let port = broker.port;
    // 50 being set up at a time.
    for chunk in (0..s).collect::<Vec<_>>().chunks(50) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|&i| tokio::spawn(set_up_session(port, i)))
            .collect();
        for t in tasks {
            t.await??;
        }
    }
    r.setup_secs = start.elapsed().as_secs_f64();
    r.stop_secs = broker.stop().await?;

    let broker = spawn(who, args, &data, tmp.path())?;
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

/// The brokers in round `round`'s order (alternating which goes first).
fn order(round: usize) -> [Who; 2] {
    if round.is_multiple_of(2) {
        [Who::Axion, Who::Mosquitto]
    } else {
        [Who::Mosquitto, Who::Axion]
    }
}

/// One row of the table: what is measured, then Axion's and Mosquitto's
/// medians.
type Row = (String, [String; 2]);

/// Each broker's rounds, Axion's first.
fn by_broker<R: Copy>(results: &[(Who, R)]) -> [Vec<R>; 2] {
    [Who::Axion, Who::Mosquitto].map(|who| {
        results
            .iter()
            .filter(|(w, _)| *w == who)
            .map(|(_, r)| *r)
            .collect()
    })
}

fn retained_rows(n: u64, results: &[(Who, RetainedRound)]) -> Vec<Row> {
    let brokers = by_broker(results);
    let row = |what: String, cell: &dyn Fn(&[RetainedRound]) -> String| -> Row {
        (what, [cell(&brokers[0]), cell(&brokers[1])])
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

fn sessions_rows(s: u64, results: &[(Who, SessionsRound)]) -> Vec<Row> {
    let brokers = by_broker(results);
    let row = |what: String, cell: &dyn Fn(&[SessionsRound]) -> String| -> Row {
        (what, [cell(&brokers[0]), cell(&brokers[1])])
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
            for who in order(round) {
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
        rows.extend(retained_rows(n, &results));
    }
    if let Some(s) = args.sessions.filter(|&s| s > 0) {
        let mut results: Vec<(Who, SessionsRound)> = Vec::new();
        for round in 0..rounds {
            for who in order(round) {
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
        rows.extend(sessions_rows(s, &results));
    }
    let of_rounds = if rounds > 1 {
        format!(" (median of {rounds} rounds)")
    } else {
        String::new()
    };
    println!("| measured{of_rounds} | axion | mosquitto (persistence true) |");
    println!("|---|---|---|");
    for (what, [a, m]) in rows {
        println!("| {what} | {a} | {m} |");
    }
    Ok(())
}
