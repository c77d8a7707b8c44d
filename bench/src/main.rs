//! `axion-bench`: every benchmark of Axion, each one running Axion beside
//! another system in one run and printing the figures side by side.
//!
//! The default measures Axion's broker against Mosquitto: one load
//! generator (rumqttc on a single-threaded runtime, so it uses about one
//! core and leaves the other to the broker) drives both brokers, one after
//! the other, alternating A/B for several rounds; the median of each case
//! is reported with the ratio Axion ÷ Mosquitto and each broker's CPU time,
//! read from /proc. See BENCHMARKS.md for figures.
//!
//! `--churn-secs` instead measures a healthy client's round trip while
//! others churn subscriptions: see [`churn`].
//!
//! `--soak` instead records RSS and open fds of both brokers through a
//! long run of mixed churn: see [`soak`].
//!
//! `--persistence` instead measures state across restarts (retained
//! messages, persistent sessions, QoS 1 messages queued for a session)
//! beside Mosquitto with persistence on: see [`persistence`].
//!
//! `--ws` instead measures MQTT over WebSocket beside Mosquitto's
//! WebSocket listener, with TCP in the same rounds: see [`websocket`].
//!
//! `--queues` instead measures the durable work queues beside NATS
//! JetStream: see [`queues`].
//!
//! `--cluster` instead measures durable tasks end to end on two clustered
//! ejabberd nodes beside one `axion serve`: see [`cluster`].
//!
//! `--bridge` and `--bridge-queue` instead measure the legacy WebSocket
//! protocol through the bridge beside the legacy Node broker: see
//! [`bridge`].
//!
//! `--acl` instead measures what authentication and ACL checks cost: see
//! [`acl`].

mod acl;
mod bridge;
mod churn;
mod cluster;
mod persistence;
mod queues;
mod soak;
mod websocket;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axion_bench::cpu_secs;
use clap::Parser;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// The load generator shares the cores with the servers it measures; the
/// `axion` binary allocates with the same allocator.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    about = "Benchmarks of Axion beside Mosquitto, NATS JetStream and the legacy Node broker, side by side in one run (default: MQTT throughput, latency and CPU beside Mosquitto)"
)]
struct Args {
    /// The axion binary to benchmark (build with --release).
    #[arg(long, env = "AXION_BIN", default_value = "target/release/axion")]
    axion: PathBuf,
    /// Another axion build (an earlier commit's) run beside it in the same
    /// rounds, to tell a change from run-to-run noise.
    #[arg(long, env = "AXION_BASELINE_BIN")]
    baseline: Option<PathBuf>,
    /// Rounds per case (A/B alternating); the median is reported.
    #[arg(long, env = "BENCH_ROUNDS", default_value_t = 3)]
    rounds: usize,
    /// Messages per flat-out run.
    #[arg(long, env = "BENCH_MESSAGES", default_value_t = 100_000)]
    messages: u64,
    /// Seconds per fixed-rate run.
    #[arg(long, env = "BENCH_RATE_SECS", default_value_t = 3)]
    rate_secs: u64,
    /// Payload size in bytes (at least 8: a send timestamp).
    #[arg(long, env = "BENCH_PAYLOAD", default_value_t = 64)]
    payload: usize,
    /// Instead of throughput, measure broker memory as this many distinct
    /// retained topics, then subscription filters, come and go.
    #[arg(long, env = "BENCH_TOPICS")]
    topics: Option<u64>,
    /// Distinct filters for the memory run (default: as many as --topics).
    #[arg(long, env = "BENCH_FILTERS")]
    filters: Option<u64>,
    /// Instead of throughput, measure state across restarts beside
    /// Mosquitto with `persistence true`: retained publish rate, clean
    /// restart time, store size, QoS 1 throughput to a persistent session
    /// online and offline, what survives `kill -9`.
    #[arg(long, env = "BENCH_PERSISTENCE")]
    persistence: bool,
    /// Retained messages (distinct topics, 64 B, QoS 1) for --persistence
    /// (0: none).
    #[arg(long, env = "BENCH_RETAINED", default_value_t = 100_000)]
    retained: u64,
    /// Also with --persistence: this many MQTT 3.1.1 persistent sessions
    /// (clean_session=0, one filter each) across a clean restart.
    #[arg(long, env = "BENCH_SESSIONS")]
    sessions: Option<u64>,
    /// QoS 1 messages (1 KiB) for --persistence to a clean_session=0
    /// subscriber, online, offline and across restarts (0: none).
    #[arg(long, env = "BENCH_QUEUED", default_value_t = 20_000)]
    queued: u64,
    /// Instead of throughput, measure a healthy client's QoS 1 round trip
    /// for this many seconds while clients subscribe to 100 throwaway
    /// filters each and drop, over and over (axion, the --baseline build,
    /// then Mosquitto).
    #[arg(long, env = "BENCH_CHURN_SECS")]
    churn_secs: Option<u64>,
    /// Instead of throughput, run a soak: mixed churn (clean and kept
    /// sessions coming and going, filters subscribed and dropped, QoS 0/1
    /// and retained publishes) against axion and Mosquitto at once, with
    /// each broker's RSS and open fds sampled side by side.
    #[arg(long, env = "BENCH_SOAK")]
    soak: bool,
    /// How long the --soak runs, in minutes.
    #[arg(long, env = "BENCH_SOAK_MINUTES", default_value_t = 30)]
    soak_minutes: u64,
    /// Seconds between two samples of RSS and fds in --soak.
    #[arg(long, env = "BENCH_SOAK_SAMPLE_SECS", default_value_t = 60)]
    soak_sample_secs: u64,
    /// Instead of the TCP cases, MQTT over WebSocket: Axion's `/mqtt` beside
    /// Mosquitto's `protocol websockets` listener, plain TCP on each in the
    /// same rounds (QoS 0 and 1, one publisher and one subscriber).
    #[arg(long, env = "BENCH_WS")]
    ws: bool,
    /// Instead of throughput, the durable work queues beside NATS
    /// JetStream: confirmed enqueues, enqueue → deliver → ack with one
    /// worker, latency at 2 000 tasks/s, server CPU per task.
    #[arg(long, env = "BENCH_QUEUES")]
    queues: bool,
    /// Instead of throughput, durable tasks end to end (one producer, two
    /// workers) on two clustered ejabberd nodes with `axion queues`, beside
    /// one `axion serve`.
    #[arg(long, env = "BENCH_CLUSTER")]
    cluster: bool,
    /// Tasks per flat-out run of --queues, --cluster and --bridge-queue
    /// (half as many at 2 000/s).
    #[arg(long, env = "BENCH_TASKS", default_value_t = 20_000)]
    tasks: usize,
    /// Also with --queues: `axion queues` beside Mosquitto.
    #[arg(long, env = "BENCH_QUEUE_MOSQUITTO")]
    queue_mosquitto: bool,
    /// The nats-server binary for --queues (scripts/bench-setup.sh installs
    /// one); without one that runs, JetStream is left out.
    #[arg(long, env = "NATS_SERVER", default_value = "nats-server")]
    nats_server: PathBuf,
    /// Instead of throughput, legacy WebSocket events through the bridge
    /// (in `axion serve`, and `axion bridge` beside Mosquitto) beside the
    /// legacy Node broker and direct MQTT, with the Node driver in
    /// --clients.
    #[arg(long, env = "BENCH_BRIDGE")]
    bridge: bool,
    /// Instead of throughput, the legacy work-queue protocol over
    /// WebSocket through the bridge (durable) beside the legacy broker's
    /// in-memory queue.
    #[arg(long, env = "BENCH_BRIDGE_QUEUE")]
    bridge_queue: bool,
    /// Events per flat-out run of --bridge (4 subscribers: half as many).
    #[arg(long, env = "BENCH_EVENTS", default_value_t = 100_000)]
    events: u64,
    /// Only the --bridge and --bridge-queue cases whose name contains this
    /// text (e.g. "2 publishers").
    #[arg(long, env = "BENCH_CASE")]
    case: Option<String>,
    /// Where the Node load driver (bench.js) and the legacy brokers of
    /// --bridge and --bridge-queue are, with their packages installed.
    #[arg(long, env = "BENCH_CLIENTS", default_value = "tests/clients")]
    clients: PathBuf,
    /// Instead of throughput, the cost of ACL checks: ns per check, and
    /// QoS 1 throughput with and without an auth file.
    #[arg(long, env = "BENCH_ACL")]
    acl: bool,
    /// Internal: run plain rumqttd 0.20 (its own listener, no Axion front
    /// end) on this port until killed; the bench starts itself this way.
    #[arg(long, hide = true)]
    serve_rumqttd: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Axion,
    /// The `--baseline` build of axion.
    Baseline,
    Mosquitto,
    /// rumqttd 0.20 alone: what Axion's front end is measured against.
    Rumqttd,
}

struct Broker {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Mosquitto on `port` with the listener settings every bench uses, up to
/// `max_queued` QoS 1 messages queued per client beyond the 100 in flight
/// (0: no limit), plus `extra` config lines, its config written to `conf`.
fn spawn_mosquitto(
    conf: &std::path::Path,
    port: u16,
    max_queued: u64,
    extra: &str,
) -> anyhow::Result<Child> {
    std::fs::write(
        conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\n\
             max_queued_messages {max_queued}\nmax_inflight_messages 100\nset_tcp_nodelay true\n{extra}"
        ),
    )?;
    Command::new("mosquitto")
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn mosquitto (scripts/setup.sh installs it)")
}

/// `axion serve` on `port` with its data in `data`, quiet unless
/// AXION_BENCH_LOG is set (then its value is RUST_LOG and stderr shows).
fn axion_serve(
    bin: &std::path::Path,
    port: u16,
    data: &std::path::Path,
) -> anyhow::Result<Command> {
    axion_serve_on(bin, port, free_port()?, data)
}

/// [`axion_serve`] with its WebSocket port given.
fn axion_serve_on(
    bin: &std::path::Path,
    port: u16,
    ws_port: u16,
    data: &std::path::Path,
) -> anyhow::Result<Command> {
    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--mqtt-listen", &format!("127.0.0.1:{port}")])
        .arg("--ws-listen")
        .arg(format!("127.0.0.1:{ws_port}"))
        .arg("--data-dir")
        .arg(data)
        .env(
            "RUST_LOG",
            std::env::var("AXION_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("AXION_BENCH_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
    Ok(cmd)
}

fn start(kind: Kind, args: &Args) -> anyhow::Result<Broker> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let child = match kind {
        Kind::Rumqttd => Command::new(std::env::current_exe()?)
            .arg("--serve-rumqttd")
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn the plain rumqttd broker")?,
        Kind::Mosquitto => {
            spawn_mosquitto(&dir.path().join("m.conf"), port, 0, "persistence false\n")?
        }
        Kind::Axion | Kind::Baseline => {
            let bin = match (kind, &args.baseline) {
                (Kind::Baseline, Some(path)) => path,
                _ => &args.axion,
            };
            axion_serve(bin, port, dir.path())?
                .spawn()
                .with_context(|| format!("spawn {} (cargo build --release)", bin.display()))?
        }
    };
    wait_listening(port, &format!("{kind:?}"))?;
    Ok(Broker {
        child,
        port,
        _dir: dir,
    })
}

/// Waits up to 10 s until something accepts TCP on `port`.
fn wait_listening(port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not listen on {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, Default)]
struct Outcome {
    sent: u64,
    received: u64,
    secs: f64,
    p50_ms: f64,
    p99_ms: f64,
    broker_cpu: f64,
}

impl Outcome {
    /// A round's outcome from its end-to-end latencies in nanoseconds (any
    /// order; none gives NaN percentiles).
    fn from_latencies(
        sent: u64,
        received: u64,
        secs: f64,
        mut lat: Vec<u64>,
        broker_cpu: f64,
    ) -> Self {
        lat.sort_unstable();
        let pct = |p: f64| {
            if lat.is_empty() {
                f64::NAN
            } else {
                lat[((lat.len() - 1) as f64 * p) as usize] as f64 / 1e6
            }
        };
        Outcome {
            sent,
            received,
            secs,
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
            broker_cpu,
        }
    }

    /// One round's line in the progress log.
    fn summary(&self) -> String {
        format!(
            "{}/{} in {:.2}s, p99 {:.2} ms, cpu {:.2}s",
            self.received, self.sent, self.secs, self.p99_ms, self.broker_cpu
        )
    }

    /// Its cells in a results table, after the row's labels: received/sent,
    /// msg/s, p50 and p99 ms, broker CPU s, messages per broker CPU-second.
    fn cells(&self) -> String {
        format!(
            "{}/{} | {:.0} | {:.2} | {:.2} | {:.2} | {:.0}",
            self.received,
            self.sent,
            self.rate(),
            self.p50_ms,
            self.p99_ms,
            self.broker_cpu,
            self.per_cpu_sec()
        )
    }

    fn rate(&self) -> f64 {
        self.received as f64 / self.secs
    }
    fn per_cpu_sec(&self) -> f64 {
        if self.broker_cpu > 0.0 {
            self.received as f64 / self.broker_cpu
        } else {
            f64::NAN
        }
    }
}

/// One publisher → one subscriber on a fresh topic; `rate` None = flat out.
/// `options` gives a client's connection options for its client id.
async fn run_case(
    options: impl Fn(&str) -> MqttOptions,
    qos: QoS,
    count: u64,
    rate: Option<u64>,
    payload: usize,
    publishers: usize,
    pid: u32,
) -> anyhow::Result<Outcome> {
    let topic = format!("bench/{}", free_port()?);
    let base = Instant::now();

    let mut sub_opts = options(&format!("bench-sub-{}", free_port()?));
    sub_opts.set_keep_alive(Duration::from_secs(30));
    sub_opts.set_inflight(100);
    let (sub, mut sub_loop) = AsyncClient::new(sub_opts, 1000);
    sub_loop.network_options = nodelay();
    sub.subscribe(&topic, qos).await?;
    let received = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(count as usize)));
    let lat = latencies.clone();
    let recv_count = received.clone();
    let expect = count;
    let (subacked_tx, subacked_rx) = tokio::sync::oneshot::channel::<()>();
    let sub_task = tokio::spawn(async move {
        let mut subacked = Some(subacked_tx);
        let mut done = Some(done_tx);
        loop {
            match sub_loop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = subacked.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if p.payload.len() >= 8 {
                        let sent = u64::from_be_bytes(p.payload[..8].try_into().unwrap_or([0; 8]));
                        let now = base.elapsed().as_nanos() as u64;
                        if let Ok(mut l) = lat.lock() {
                            l.push(now.saturating_sub(sent));
                        }
                    }
                    if recv_count.fetch_add(1, Ordering::Relaxed) + 1 >= expect {
                        if let Some(tx) = done.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(5), subacked_rx)
        .await
        .context("no SUBACK")??;

    let mut clients = Vec::new();
    let mut loops = Vec::new();
    for _ in 0..publishers.max(1) {
        let mut pub_opts = options(&format!("bench-pub-{}", free_port()?));
        pub_opts.set_keep_alive(Duration::from_secs(30));
        pub_opts.set_inflight(100);
        let (publisher, mut pub_loop) = AsyncClient::new(pub_opts, 1000);
        pub_loop.network_options = nodelay();
        loops.push(tokio::spawn(async move {
            loop {
                if pub_loop.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
        clients.push(publisher);
    }

    let cpu0 = cpu_secs(pid);
    let start = Instant::now();
    let per_publisher = count / clients.len() as u64;
    let per_rate = rate.map(|r| r / clients.len() as u64);
    let mut senders = Vec::new();
    for publisher in clients {
        let topic = topic.clone();
        senders.push(tokio::spawn(async move {
            let mut body = vec![0u8; payload.max(8)];
            let mut ticker = per_rate.map(|r| {
                let mut i = tokio::time::interval(Duration::from_micros(1_000_000 / r.max(1)));
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                i
            });
            for _ in 0..per_publisher {
                if let Some(t) = ticker.as_mut() {
                    t.tick().await;
                }
                let now = base.elapsed().as_nanos() as u64;
                body[..8].copy_from_slice(&now.to_be_bytes());
                publisher.publish(&topic, qos, false, body.clone()).await?;
            }
            Ok::<_, rumqttc::ClientError>(())
        }));
    }
    for sender in senders {
        sender.await??;
    }
    // QoS 0 may lose messages: wait for all, or until nothing has arrived for a second.
    let mut done_rx = done_rx;
    let mut last = received.load(Ordering::Relaxed);
    loop {
        match tokio::time::timeout(Duration::from_secs(1), &mut done_rx).await {
            Ok(_) => break,
            Err(_) => {
                let now = received.load(Ordering::Relaxed);
                if now == last {
                    break;
                }
                last = now;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let broker_cpu = cpu_secs(pid) - cpu0;
    let got = received.load(Ordering::Relaxed);
    sub_task.abort();
    for l in loops {
        l.abort();
    }
    let lat = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    Ok(Outcome::from_latencies(count, got, secs, lat, broker_cpu))
}

/// (name, QoS, messages, fixed rate, publishers, payload bytes)
type Case = (&'static str, QoS, u64, Option<u64>, usize, usize);

fn nodelay() -> rumqttc::NetworkOptions {
    let mut options = rumqttc::NetworkOptions::new();
    options.set_tcp_nodelay(true);
    options
}

fn median(mut v: Vec<Outcome>, key: impl Fn(&Outcome) -> f64) -> Outcome {
    v.sort_by(|a, b| {
        key(a)
            .partial_cmp(&key(b))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    v[v.len() / 2]
}

/// Resident memory of a process, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .unwrap_or(f64::NAN)
        / 1024.0
}

/// Topics and filters that come and go: one client, subscribed to
/// `mem/topic/#` as an operator's wildcard would be, publishes a retained
/// message to each of `topics` distinct topics, then clears them all, then
/// does the same with as many new topics (memory freed is memory reused);
/// then subscribes to `filters` distinct filters, then unsubscribes them.
/// Returns broker RSS after each of the five steps, and 10 s after the
/// last (Axion renews its router once it is idle), relative to the start.
async fn memory_case(port: u16, topics: u64, filters: u64, pid: u32) -> anyhow::Result<[f64; 6]> {
    let mut opts = MqttOptions::new(format!("bench-mem-{}", free_port()?), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let acks = Arc::new(AtomicU64::new(0));
    let seen = acks.clone();
    let (records_tx, mut records) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(
                    Packet::PubAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_),
                )) => {
                    seen.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Incoming(Packet::Publish(p)))
                    if p.topic.contains("/heartbeat/broker/") =>
                {
                    let _ = records_tx.send(String::from_utf8_lossy(&p.payload).into_owned());
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let wait_acks = |target: u64| {
        let acks = acks.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(300);
            while acks.load(Ordering::Relaxed) < target && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    client.subscribe("mem/topic/#", QoS::AtMostOnce).await?;
    wait_acks(1).await;
    let base = rss_mib(pid);
    let mut expected = 1;
    let mut steps = [0.0; 6];
    let rounds = [
        (0, vec![0u8; 64]),
        (0, Vec::new()),
        (1, vec![0u8; 64]),
        (1, Vec::new()),
    ];
    for (step, (round, payload)) in rounds.into_iter().enumerate() {
        for i in 0..topics {
            let topic = format!("mem/topic/{round}/{i}");
            client
                .publish(topic, QoS::AtLeastOnce, true, payload.clone())
                .await?;
        }
        expected += topics;
        wait_acks(expected).await;
        // The second round's step before clearing is not reported.
        if step != 2 {
            steps[step.min(2)] = rss_mib(pid) - base;
        }
    }
    for i in 0..filters {
        client
            .subscribe(format!("mem/filter/{i}/+"), QoS::AtMostOnce)
            .await?;
    }
    expected += filters;
    wait_acks(expected).await;
    steps[3] = rss_mib(pid) - base;
    for i in 0..filters {
        client.unsubscribe(format!("mem/filter/{i}/+")).await?;
    }
    expected += filters;
    wait_acks(expected).await;
    steps[4] = rss_mib(pid) - base;
    tokio::time::sleep(Duration::from_secs(10)).await;
    steps[5] = rss_mib(pid) - base;
    // Axion's broker counts its router renewals on its heartbeat record.
    client
        .subscribe("axion/+/heartbeat/broker/#", QoS::AtMostOnce)
        .await?;
    if let Ok(Some(record)) = tokio::time::timeout(Duration::from_secs(3), records.recv()).await {
        let field = |name: &str| {
            record
                .split(&format!("\"{name}\":"))
                .nth(1)
                .map(|rest| {
                    rest.chars()
                        .take_while(char::is_ascii_digit)
                        .collect::<String>()
                })
                .unwrap_or_default()
        };
        eprintln!(
            "  (router renewals: {}, the last paused publishing {} ms)",
            field("router_renewals"),
            field("router_renewal_pause_ms")
        );
    }
    task.abort();
    Ok(steps)
}

/// rumqttd 0.20 as the findings note embeds it: one v4 listener, 1 MiB × 4
/// segments per filter.
fn serve_rumqttd(port: u16) -> anyhow::Result<()> {
    use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings, Strategy};
    let listener = ServerSettings {
        name: "v4".into(),
        listen: ([127, 0, 0, 1], port).into(),
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 5_000,
            max_payload_size: 1024 * 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_000,
            max_outgoing_packet_count: 200,
            max_segment_size: 1024 * 1024,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        },
        v4: Some(std::collections::HashMap::from([(
            "1".to_string(),
            listener,
        )])),
        ..Config::default()
    };
    rumqttd::Broker::new(config).start()?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(port) = args.serve_rumqttd {
        return serve_rumqttd(port);
    }
    if args.persistence {
        return persistence::run(&args);
    }
    if args.soak {
        return soak::run(&args);
    }
    if let Some(secs) = args.churn_secs {
        return churn::run(&args, secs);
    }
    if args.ws {
        return websocket::run(&args);
    }
    if args.queues {
        return queues::run(&args);
    }
    if args.cluster {
        return cluster::run(&args);
    }
    if args.bridge {
        return bridge::run_events(&args);
    }
    if args.bridge_queue {
        return bridge::run_queue(&args);
    }
    if args.acl {
        return acl::run(&args);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if let Some(n) = args.topics {
        let f = args.filters.unwrap_or(n);
        println!(
            "| broker | RSS at start MiB | + {n} retained topics | after clearing them | after {n} more set and cleared | + {f} filters | after unsubscribing them | 10 s later |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for kind in [Kind::Axion, Kind::Mosquitto] {
            let broker = start(kind, &args)?;
            std::thread::sleep(Duration::from_millis(300));
            let pid = broker.child.id();
            let start_rss = rss_mib(pid);
            let [t, t_gone, t_again, fl, fl_gone, later] =
                rt.block_on(memory_case(broker.port, n, f, pid))?;
            println!(
                "| {kind:?} | {start_rss:.1} | {t:+.1} | {t_gone:+.1} | {t_again:+.1} | {fl:+.1} | {fl_gone:+.1} | {later:+.1} |"
            );
        }
        return Ok(());
    }
    let (n, fixed) = (args.messages, 10_000 * args.rate_secs);
    let small = args.payload;
    let cases: Vec<Case> = vec![
        ("QoS0 1→1 64 B", QoS::AtMostOnce, n, None, 1, small),
        ("QoS1 1→1 64 B", QoS::AtLeastOnce, n, None, 1, small),
        ("QoS0 4→1 64 B", QoS::AtMostOnce, n, None, 4, small),
        ("QoS1 4→1 64 B", QoS::AtLeastOnce, n, None, 4, small),
        ("QoS0 1→1 1 KiB", QoS::AtMostOnce, n / 2, None, 1, 1024),
        ("QoS1 1→1 1 KiB", QoS::AtLeastOnce, n / 2, None, 1, 1024),
        (
            "QoS0 at 10k msg/s",
            QoS::AtMostOnce,
            fixed,
            Some(10_000),
            1,
            small,
        ),
        (
            "QoS1 at 10k msg/s",
            QoS::AtLeastOnce,
            fixed,
            Some(10_000),
            1,
            small,
        ),
    ];
    println!("| case | broker | delivered | msg/s | p50 ms | p99 ms | broker CPU s | msg per broker CPU-s |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut summary = Vec::new();
    for (name, qos, count, rate, publishers, payload) in &cases {
        let mut results: Vec<(Kind, Outcome)> = Vec::new();
        for round in 0..args.rounds {
            // Alternate which broker goes first, so drift hits both alike.
            let mut order = vec![Kind::Axion, Kind::Mosquitto, Kind::Rumqttd];
            if args.baseline.is_some() {
                order.push(Kind::Baseline);
            }
            let len = order.len();
            order.rotate_left(round % len);
            for kind in order {
                let broker = start(kind, &args)?;
                let outcome = rt.block_on(run_case(
                    |id| MqttOptions::new(id, "127.0.0.1", broker.port),
                    *qos,
                    *count,
                    *rate,
                    *payload,
                    *publishers,
                    broker.child.id(),
                ))?;
                eprintln!(
                    "  {name} round {} {kind:?}: {}",
                    round + 1,
                    outcome.summary()
                );
                results.push((kind, outcome));
            }
        }
        let pick = |k: Kind| {
            let v: Vec<Outcome> = results
                .iter()
                .filter(|(kind, _)| *kind == k)
                .map(|(_, o)| *o)
                .collect();
            if rate.is_some() {
                median(v, |o| o.p99_ms)
            } else {
                median(v, |o| o.rate())
            }
        };
        let (a, m, r) = (
            pick(Kind::Axion),
            pick(Kind::Mosquitto),
            pick(Kind::Rumqttd),
        );
        let mut rows = vec![("axion", a), ("mosquitto", m), ("rumqttd alone", r)];
        if args.baseline.is_some() {
            rows.insert(1, ("axion baseline", pick(Kind::Baseline)));
        }
        for (kind, o) in rows {
            println!("| {name} | {kind} | {} |", o.cells());
        }
        let baseline = args.baseline.is_some().then(|| pick(Kind::Baseline));
        summary.push((name.to_string(), a, m, r, rate.is_some(), baseline));
    }
    println!();
    println!("| case | axion ÷ mosquitto | delivered by rumqttd alone |");
    println!("|---|---|---|");
    for (name, a, m, r, fixed, _) in &summary {
        let (a, m, r, fixed) = (*a, *m, *r, *fixed);
        let alone = format!("{}/{}", r.received, r.sent);
        if fixed {
            println!(
                "| {name} | p99 {:.2}× (lower is better), CPU per message {:.2}× | {alone} |",
                a.p99_ms / m.p99_ms,
                (a.broker_cpu / a.received as f64) / (m.broker_cpu / m.received as f64)
            );
        } else {
            println!(
                "| {name} | throughput {:.2}×, messages per broker CPU-second {:.2}× | {alone} |",
                a.rate() / m.rate(),
                a.per_cpu_sec() / m.per_cpu_sec()
            );
        }
    }
    if args.baseline.is_some() {
        println!();
        println!("| case | axion ÷ axion baseline |");
        println!("|---|---|");
        for (name, a, _, _, fixed, b) in &summary {
            let Some(b) = b else { continue };
            if *fixed {
                println!(
                    "| {name} | p99 {:.2}×, CPU per message {:.2}× |",
                    a.p99_ms / b.p99_ms,
                    (a.broker_cpu / a.received as f64) / (b.broker_cpu / b.received as f64)
                );
            } else {
                println!(
                    "| {name} | throughput {:.2}×, messages per broker CPU-second {:.2}× |",
                    a.rate() / b.rate(),
                    a.per_cpu_sec() / b.per_cpu_sec()
                );
            }
        }
    }
    Ok(())
}
