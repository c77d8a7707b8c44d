//! `axion-bench --soak`: resident memory and open file descriptors of
//! `axion serve` and of Mosquitto through a long run of mixed churn.
//!
//! Both brokers run at the same time, each driven by its own copy of the
//! same load from one single-threaded load generator, so both see the same
//! rates over the same minutes. Per broker, at once:
//! - **churners**: clean sessions that connect, subscribe to distinct
//!   throwaway filters, publish QoS 0 and 1 to them, unsubscribe half and
//!   disconnect, over and over;
//! - **kept sessions**: MQTT 3.1.1 clean_session=0 clients from a pool of
//!   ids that connect, subscribe at QoS 1, take what they were owed and
//!   leave, while a publisher sends QoS 1 messages to them; now and then one
//!   connects with clean_session=1 instead, which ends the session;
//! - **retained**: retained messages set and cleared over a fixed set of
//!   topics;
//! - **steady**: one subscriber and one publisher exchanging QoS 1
//!   messages all along.
//!
//! Every `--soak-sample-secs` the broker's VmRSS (`/proc/<pid>/status`) and
//! open descriptors (`/proc/<pid>/fd`) are printed side by side.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

use super::{axion_serve, free_port, nodelay, rss_mib, spawn_mosquitto, Args};

/// Churners per broker.
const CHURNERS: u64 = 4;
/// Distinct filters each churner connection subscribes to.
const CHURN_FILTERS: u64 = 20;
/// Ids of kept sessions per broker.
const KEPT_IDS: u64 = 50;
/// Every this many kept-session visits, the visit ends the session.
const KEPT_END_EVERY: u64 = 10;
/// Retained topics set and cleared.
const RETAINED_TOPICS: u64 = 500;
/// Mosquitto queues at most this many QoS 1 messages per away session.
const MOSQUITTO_MAX_QUEUED: u64 = 1_000;

/// What the load did to one broker, for the summary line.
#[derive(Default)]
struct Counts {
    connects: AtomicU64,
    filters: AtomicU64,
    publishes: AtomicU64,
    steady: AtomicU64,
    errors: AtomicU64,
}

struct Running {
    name: &'static str,
    child: std::process::Child,
    port: u16,
    counts: Arc<Counts>,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn start(name: &'static str, args: &Args) -> anyhow::Result<Running> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let child = if name == "axion" {
        axion_serve(&args.axion, port, dir.path())?
            .spawn()
            .with_context(|| format!("spawn {}", args.axion.display()))?
    } else {
        spawn_mosquitto(
            &dir.path().join("m.conf"),
            port,
            MOSQUITTO_MAX_QUEUED,
            "persistence false\n",
        )?
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "{name} did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Running {
        name,
        child,
        port,
        counts: Arc::default(),
        _dir: dir,
    })
}

/// One connection: the client, and the packets it receives.
pub(crate) struct Conn {
    pub(crate) client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Packet>,
}

impl Conn {
    pub(crate) async fn open(port: u16, id: &str, clean: bool) -> anyhow::Result<(Conn, bool)> {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(clean);
        opts.set_inflight(100);
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        eventloop.network_options = nodelay();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            // The task ends with the connection: a disconnect, or an error.
            while let Ok(event) = eventloop.poll().await {
                if let Event::Incoming(p) = event {
                    if tx.send(p).is_err() {
                        return;
                    }
                }
            }
        });
        let mut conn = Conn { client, rx };
        let present = match conn.next(|p| matches!(p, Packet::ConnAck(_))).await? {
            Packet::ConnAck(ack) => ack.session_present,
            _ => false,
        };
        Ok((conn, present))
    }

    /// The next packet `want` accepts (others are dropped).
    pub(crate) async fn next(&mut self, want: impl Fn(&Packet) -> bool) -> anyhow::Result<Packet> {
        tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(p) = self.rx.recv().await {
                if want(&p) {
                    return Ok(p);
                }
            }
            anyhow::bail!("connection closed")
        })
        .await
        .context("no answer within 30 s")?
    }

    async fn acks(&mut self, n: u64, want: impl Fn(&Packet) -> bool) -> anyhow::Result<()> {
        for _ in 0..n {
            self.next(&want).await?;
        }
        Ok(())
    }

    pub(crate) async fn close(self) {
        let _ = self.client.disconnect().await;
    }
}

/// A clean session's visit: subscribe, publish, unsubscribe half, leave.
async fn churn_once(port: u16, worker: u64, visit: u64, counts: &Counts) -> anyhow::Result<()> {
    let (mut conn, _) = Conn::open(port, &format!("soak-churn-{worker}"), true)
        .await
        .context("CONNACK")?;
    counts.connects.fetch_add(1, Ordering::Relaxed);
    let filter = |i: u64| format!("soak/churn/{worker}/{visit}/{i}/+");
    for i in 0..CHURN_FILTERS {
        conn.client.subscribe(filter(i), QoS::AtLeastOnce).await?;
    }
    conn.acks(CHURN_FILTERS, |p| matches!(p, Packet::SubAck(_)))
        .await
        .context("SUBACK")?;
    counts.filters.fetch_add(CHURN_FILTERS, Ordering::Relaxed);
    for i in 0..CHURN_FILTERS {
        let topic = format!("soak/churn/{worker}/{visit}/{i}/x");
        let qos = if i % 2 == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        conn.client
            .publish(topic, qos, false, vec![7u8; 64])
            .await?;
    }
    conn.acks(CHURN_FILTERS / 2, |p| matches!(p, Packet::PubAck(_)))
        .await
        .context("PUBACK")?;
    counts.publishes.fetch_add(CHURN_FILTERS, Ordering::Relaxed);
    for i in 0..CHURN_FILTERS / 2 {
        conn.client.unsubscribe(filter(i)).await?;
    }
    conn.acks(CHURN_FILTERS / 2, |p| matches!(p, Packet::UnsubAck(_)))
        .await
        .context("UNSUBACK")?;
    conn.close().await;
    Ok(())
}

/// A kept session's visit: take what it was owed for a moment, leave; or,
/// every [`KEPT_END_EVERY`] visits, end the session with a clean connect.
async fn kept_once(port: u16, visit: u64, counts: &Counts) -> anyhow::Result<()> {
    let k = visit % KEPT_IDS;
    let end = visit % KEPT_END_EVERY == KEPT_END_EVERY - 1;
    let (mut conn, _) = Conn::open(port, &format!("soak-kept-{k}"), end)
        .await
        .context("kept CONNACK")?;
    counts.connects.fetch_add(1, Ordering::Relaxed);
    if !end {
        conn.client
            .subscribe(format!("soak/kept/{k}/#"), QoS::AtLeastOnce)
            .await?;
        conn.next(|p| matches!(p, Packet::SubAck(_)))
            .await
            .context("kept SUBACK")?;
        // Whatever arrives meanwhile is acknowledged by the client.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    conn.close().await;
    Ok(())
}

/// Runs `visit` in a loop with a pause between visits until `stop`.
async fn repeat<F, Fut>(
    name: &'static str,
    every: Duration,
    stop: Instant,
    counts: Arc<Counts>,
    mut visit: F,
) -> anyhow::Result<()>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut n = 0;
    while Instant::now() < stop {
        if let Err(err) = visit(n).await {
            // A broker that cannot be reached is worth a line; the soak goes on.
            if counts.errors.fetch_add(1, Ordering::Relaxed) < 10 {
                eprintln!("  soak, {name}: {err:#}");
            }
        }
        n += 1;
        tokio::time::sleep(every).await;
    }
    Ok(())
}

/// QoS 1 messages to the kept sessions' topics and retained messages set
/// and cleared, from one connection.
async fn publisher(port: u16, stop: Instant, counts: Arc<Counts>) -> anyhow::Result<()> {
    let (mut conn, _) = Conn::open(port, "soak-publisher", true).await?;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut n: u64 = 0;
    while Instant::now() < stop {
        tick.tick().await;
        let k = n % KEPT_IDS;
        conn.client
            .publish(
                format!("soak/kept/{k}/m"),
                QoS::AtLeastOnce,
                false,
                vec![1u8; 256],
            )
            .await?;
        let topic = format!("soak/retained/{}", n % RETAINED_TOPICS);
        // Every fifth retained publish clears its topic.
        let body = if n % 5 == 4 {
            Vec::new()
        } else {
            vec![2u8; 128]
        };
        conn.client
            .publish(topic, QoS::AtLeastOnce, true, body)
            .await?;
        conn.acks(2, |p| matches!(p, Packet::PubAck(_))).await?;
        counts.publishes.fetch_add(2, Ordering::Relaxed);
        n += 1;
    }
    conn.close().await;
    Ok(())
}

/// One subscriber and one publisher exchanging QoS 1 messages.
async fn steady(port: u16, stop: Instant, counts: Arc<Counts>) -> anyhow::Result<()> {
    let (mut sub, _) = Conn::open(port, "soak-steady-sub", true).await?;
    sub.client
        .subscribe("soak/steady", QoS::AtLeastOnce)
        .await?;
    sub.next(|p| matches!(p, Packet::SubAck(_))).await?;
    let (mut publisher, _) = Conn::open(port, "soak-steady-pub", true).await?;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while Instant::now() < stop {
        tick.tick().await;
        publisher
            .client
            .publish("soak/steady", QoS::AtLeastOnce, false, vec![3u8; 64])
            .await?;
        publisher.next(|p| matches!(p, Packet::PubAck(_))).await?;
        sub.next(|p| matches!(p, Packet::Publish(_))).await?;
        counts.steady.fetch_add(1, Ordering::Relaxed);
    }
    sub.close().await;
    publisher.close().await;
    Ok(())
}

/// The whole load against one broker until `stop`.
async fn load(
    name: &'static str,
    port: u16,
    stop: Instant,
    counts: Arc<Counts>,
) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..CHURNERS {
        let c = counts.clone();
        tasks.spawn(repeat(
            name,
            Duration::from_millis(100),
            stop,
            counts.clone(),
            move |visit| {
                let c = c.clone();
                async move { churn_once(port, worker, visit, &c).await }
            },
        ));
    }
    for lane in 0..2u64 {
        let c = counts.clone();
        tasks.spawn(repeat(
            name,
            Duration::from_millis(50),
            stop,
            counts.clone(),
            move |visit| {
                let c = c.clone();
                // Two lanes take alternate ids' visits.
                async move { kept_once(port, visit * 2 + lane, &c).await }
            },
        ));
    }
    tasks.spawn(publisher(port, stop, counts.clone()));
    tasks.spawn(steady(port, stop, counts.clone()));
    while let Some(done) = tasks.join_next().await {
        // A part that stopped early is reported; the rest goes on.
        if let Err(err) = done? {
            counts.errors.fetch_add(1, Ordering::Relaxed);
            eprintln!("  soak, {name}: a load part stopped: {err:#}");
        }
    }
    Ok(())
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let brokers = [start("axion", args)?, start("mosquitto", args)?];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let minutes = args.soak_minutes;
    let sample = Duration::from_secs(args.soak_sample_secs.max(1));
    let begun = Instant::now();
    let stop = begun + Duration::from_secs(minutes * 60);
    println!(
        "Soak: {minutes} min of mixed churn against both brokers at once, the same load each."
    );
    println!("| minute | axion RSS MiB | axion fds | mosquitto RSS MiB | mosquitto fds |");
    println!("|---|---|---|---|---|");
    let row = |at: Duration| {
        let [a, m] = &brokers;
        let (ap, mp) = (a.child.id(), m.child.id());
        println!(
            "| {:.1} | {:.1} | {} | {:.1} | {} |",
            at.as_secs_f64() / 60.0,
            rss_mib(ap),
            open_fds(ap),
            rss_mib(mp),
            open_fds(mp)
        );
    };
    row(Duration::ZERO);
    rt.block_on(async {
        let mut loads = tokio::task::JoinSet::new();
        for b in &brokers {
            loads.spawn(load(b.name, b.port, stop, b.counts.clone()));
        }
        let mut next = begun + sample;
        while next <= stop {
            tokio::time::sleep_until(next.into()).await;
            row(begun.elapsed());
            next += sample;
        }
        while let Some(done) = loads.join_next().await {
            done??;
        }
        anyhow::Ok(())
    })?;
    // Every client gone: what the brokers keep once the load has ended,
    // and once the broker has had time to free what the churn left
    // behind (a router renewal comes once no new filter has come for 5 s).
    for _ in 0..2 {
        std::thread::sleep(Duration::from_secs(10));
        row(begun.elapsed());
    }
    for b in &brokers {
        let c = &b.counts;
        println!(
            "{}: {} connects, {} filters subscribed, {} publishes, {} steady round trips, {} errors",
            b.name,
            c.connects.load(Ordering::Relaxed),
            c.filters.load(Ordering::Relaxed),
            c.publishes.load(Ordering::Relaxed),
            c.steady.load(Ordering::Relaxed),
            c.errors.load(Ordering::Relaxed),
        );
    }
    Ok(())
}
