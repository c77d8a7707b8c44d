//! The durable-queue load (`axion-bench --queues`), against a queue owner
//! already running: `axion serve`, or `axion queues` beside any broker.
//!
//! Three phases on one producer and one worker, both on [`Batched`]
//! connections:
//!
//! 1. durable enqueue, no worker: `n` tasks of ~100 B, at most
//!    [`WINDOW`] awaiting their on-disk confirmation (JetStream's publish
//!    window in the comparison);
//! 2. end to end, enqueue → deliver → ack, with one worker holding up to
//!    [`BenchWorker::CREDITS`] credits (JetStream's pull batch);
//! 3. `n / 2` tasks at a fixed [`PACED_RATE`] per second, same worker: the
//!    latency where nothing saturates.
//!
//! Each phase checks what it measures: every enqueue confirmed, every task
//! delivered, every ack counted by the owner (`axion queue show`'s
//! `acked_total`); a missing one is an error, not a figure.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axion_queues::ops::{OpsClient, OpsError};
use axion_wire::queue::{Command, Ready, TaskRef};
use axion_wire::{topics, BrokerUrls, MqttUrl};
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use tokio::sync::{mpsc, Semaphore};

use crate::batched::{Batched, Conn, Publisher};
use crate::cpu_secs_of;

/// Enqueues awaiting their confirmation at most.
pub const WINDOW: usize = 256;
/// Tasks per second in the paced phase (the reference rate of the
/// durable-queue comparisons).
pub const PACED_RATE: u32 = 2000;

/// One phase's figures.
#[derive(Clone, Copy, Debug)]
pub struct Phase {
    pub tasks: usize,
    /// From the first enqueue to the last confirmation (phase 1) or the
    /// last first delivery (phases 2 and 3).
    pub secs: f64,
    /// Enqueue → delivery p50 and p99 in ms; none in phase 1.
    pub latency_ms: Option<(f64, f64)>,
    /// CPU seconds the server's processes spent over the phase.
    pub server_cpu: f64,
}

impl Phase {
    pub fn rate(&self) -> f64 {
        self.tasks as f64 / self.secs
    }

    /// Server CPU seconds per 1 000 tasks.
    pub fn cpu_per_1k(&self) -> f64 {
        self.server_cpu / (self.tasks as f64 / 1000.0)
    }
}

/// What one run of the load measured.
#[derive(Clone, Copy, Debug)]
pub struct Figures {
    pub enqueue: Phase,
    pub end_to_end: Phase,
    pub paced: Phase,
    /// Tasks delivered more than once in phase 2 (QoS 1 allows it; the
    /// figures count distinct tasks); none where it is not counted.
    pub duplicates: Option<usize>,
    /// When the owner had counted every ack of phase 2, from its start.
    pub acks_counted_secs: Option<f64>,
}

/// Waits until the owner of `package` answers commands (it replies "no
/// queue" for an unknown queue, which proves it is subscribed).
pub async fn wait_owner(url: &MqttUrl, package: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let attempt = async {
            let mut c = OpsClient::connect(
                &BrokerUrls::from(url.clone()),
                package,
                Duration::from_millis(400),
            )
            .await?;
            c.command("probe", Command::Show { limit: 1 }).await
        };
        match attempt.await {
            Ok(_) | Err(OpsError::Refused(_)) => return Ok(()),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => bail!("the queue owner never answered: {e}"),
        }
    }
}

/// Runs the three phases with `n` tasks against the owner of `package`
/// at `url`; `pids` are the server's processes, whose CPU is measured.
pub async fn run(url: &MqttUrl, package: &str, pids: &[u32], n: usize) -> anyhow::Result<Figures> {
    // A pipelined producer: each task carries its enqueue time on a clock
    // the worker shares; a confirmation frees a place in the window.
    let (producer, _producer_conn, mut confirmed) = Producer::connect(url, package).await?;
    let clock = producer.clock;

    // 1. Durable enqueue, no worker.
    let cpu0 = cpu_secs_of(pids);
    let start = Instant::now();
    tokio::spawn(producer.enqueue_all("bench-enq", n, 0));
    let mut last = start;
    for k in 0..n {
        match tokio::time::timeout(Duration::from_secs(20), confirmed.recv()).await {
            Ok(Some(())) => last = Instant::now(),
            _ => bail!("only {k} of {n} enqueues confirmed (none for 20 s)"),
        }
    }
    let enqueue = Phase {
        tasks: n,
        secs: (last - start).as_secs_f64(),
        latency_ms: None,
        server_cpu: cpu_secs_of(pids) - cpu0,
    };

    // 2. End to end with one worker: enqueue → deliver → ack.
    let mut worker = BenchWorker::start(url, package, "bench-e2e", "bench-worker", false).await?;
    let cpu0 = cpu_secs_of(pids);
    let start = Instant::now();
    tokio::spawn(producer.enqueue_all("bench-e2e", n, 0));
    let (mut latencies, duplicates) = worker.work(n, clock).await?;
    let secs = start.elapsed().as_secs_f64();
    let mut ops = OpsClient::connect(
        &BrokerUrls::from(url.clone()),
        package,
        Duration::from_secs(5),
    )
    .await?;
    wait_acked(&mut ops, "bench-e2e", n).await?;
    let acks_counted_secs = start.elapsed().as_secs_f64();
    // Up to here: the acks still on their way at the last delivery are
    // part of the work.
    let end_to_end = Phase {
        tasks: n,
        secs,
        latency_ms: Some(percentiles_ms(&mut latencies)),
        server_cpu: cpu_secs_of(pids) - cpu0,
    };
    while confirmed.try_recv().is_ok() {}

    // 3. Latency at a fixed rate, same worker.
    let paced = n / 2;
    let cpu0 = cpu_secs_of(pids);
    let start = Instant::now();
    tokio::spawn(producer.enqueue_all("bench-e2e", paced, PACED_RATE));
    let (mut latencies, _) = worker.work(paced, clock).await?;
    let paced = Phase {
        tasks: paced,
        secs: start.elapsed().as_secs_f64(),
        latency_ms: Some(percentiles_ms(&mut latencies)),
        server_cpu: cpu_secs_of(pids) - cpu0,
    };
    while confirmed.try_recv().is_ok() {}
    Ok(Figures {
        enqueue,
        end_to_end,
        paced,
        duplicates: Some(duplicates),
        acks_counted_secs: Some(acks_counted_secs),
    })
}

/// The producer's side of the load, shared by the phases' sending tasks.
#[derive(Clone)]
struct Producer {
    publisher: Publisher,
    window: Arc<Semaphore>,
    reply: String,
    package: String,
    clock: Instant,
}

impl Producer {
    /// Connects the producer to `url` and subscribes to its reply topic.
    /// Each confirmation frees a place in the window and is passed on to
    /// the receiver returned beside the connection (dropped: ignored).
    async fn connect(
        url: &MqttUrl,
        package: &str,
    ) -> anyhow::Result<(Self, Conn, mpsc::UnboundedReceiver<()>)> {
        let mut producer = Batched::connect(url, "bench-producer").await?;
        let reply = format!("axion/{package}/reply/bench-producer");
        producer.subscribe(&reply).await?;
        let Batched {
            publisher,
            incoming: mut replies,
            conn,
            ..
        } = producer;
        let window = Arc::new(Semaphore::new(WINDOW));
        let (confirmed_tx, confirmed) = mpsc::unbounded_channel();
        let permits = window.clone();
        tokio::spawn(async move {
            while replies.recv().await.is_some() {
                permits.add_permits(1);
                let _ = confirmed_tx.send(());
            }
        });
        let producer = Producer {
            publisher,
            window,
            reply,
            package: package.to_string(),
            clock: Instant::now(),
        };
        Ok((producer, conn, confirmed))
    }

    /// Enqueues `n` tasks to `queue`; `rate` 0: as fast as confirmations
    /// allow, else paced on the clock.
    fn enqueue_all(
        &self,
        queue: &'static str,
        n: usize,
        rate: u32,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let this = self.clone();
        async move {
            // The topic is built once and shared by every publish.
            let topic = Bytes::from(topics::queue(&this.package, queue, "enqueue"));
            let props = PublishProperties {
                response_topic: Some(this.reply.clone()),
                ..Default::default()
            };
            let pad = "x".repeat(60);
            let start = tokio::time::Instant::now();
            for i in 0..n {
                pace(start, i, rate).await;
                if let Ok(permit) = this.window.acquire().await {
                    permit.forget();
                }
                let t = this.clock.elapsed().as_micros() as u64;
                let body = format!(r#"{{"payload":{{"i":{i},"t":{t},"pad":"{pad}"}}}}"#);
                this.publisher
                    .publish(topic.clone(), body.into(), Some(props.clone()));
            }
        }
    }
}

/// What a load reads of a task: the enqueue time its payload carries (µs
/// on the run's clock).
#[derive(serde::Deserialize)]
pub struct Stamped {
    pub payload: Stamp,
}

#[derive(serde::Deserialize)]
pub struct Stamp {
    pub t: u64,
}

/// A task as the worker reads it.
#[derive(serde::Deserialize)]
struct BenchTask<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    payload: Stamp,
}

/// The load's worker on a [`Batched`] connection: it keeps every task it
/// gets (on its queue's shared subscription, or its own topic by directed
/// delivery), acks each one as it comes and announces [`Self::TOP_UP`]
/// credits at a time, [`Self::CREDITS`] at most outstanding.
struct BenchWorker {
    client: Batched,
    id: String,
    ack_topic: Bytes,
    ready_topic: Bytes,
    directed: bool,
    /// Credit used since it was last announced.
    used: u32,
}

impl BenchWorker {
    const CREDITS: u32 = 256;
    const TOP_UP: u32 = 64;

    async fn start(
        url: &MqttUrl,
        package: &str,
        queue: &str,
        id: &str,
        directed: bool,
    ) -> anyhow::Result<BenchWorker> {
        let id = id.to_string();
        let mut client = Batched::connect(url, &id).await?;
        let tasks = if directed {
            topics::queue_tasks_directed(package, queue, &id)
        } else {
            topics::queue_tasks_shared(package, queue)
        };
        client.subscribe(&tasks).await?;
        client.subscribe(&topics::announce(package)).await?;
        let leaf = |leaf: &str| Bytes::from(topics::queue(package, queue, leaf));
        let w = BenchWorker {
            client,
            id,
            ack_topic: leaf("ack"),
            ready_topic: leaf("ready"),
            directed,
            used: 0,
        };
        w.ready(Ready::more(&w.id, Self::CREDITS))?;
        Ok(w)
    }

    fn ready(&self, ready: Ready) -> anyhow::Result<()> {
        let body = serde_json::to_vec(&ready.directed(self.directed))?;
        self.client
            .publisher
            .publish(self.ready_topic.clone(), body.into(), None);
        Ok(())
    }

    /// Acks a task and tops up credit; the task's id and enqueue time, or
    /// none for the owner's announce (answered with fresh credit).
    fn take(
        &mut self,
        p: &rumqttc::v5::mqttbytes::v5::Publish,
    ) -> anyhow::Result<Option<(String, u64)>> {
        if p.topic.ends_with(b"/cmd/announce") {
            self.ready(Ready::exactly(&self.id, Self::CREDITS - self.used))?;
            return Ok(None);
        }
        let task: BenchTask = serde_json::from_slice(&p.payload).context("task JSON")?;
        let ack = serde_json::to_vec(&TaskRef::task(task.id.as_ref()).with_worker(&self.id))?;
        self.client
            .publisher
            .publish(self.ack_topic.clone(), ack.into(), None);
        self.used += 1;
        if self.used == Self::TOP_UP {
            self.ready(Ready::more(&self.id, Self::TOP_UP))?;
            self.used = 0;
        }
        Ok(Some((task.id.into_owned(), task.payload.t)))
    }

    /// Works until `n` distinct tasks are done; returns each one's enqueue
    /// to delivery latency (µs) and how many came twice (rumqttd's shared
    /// groups now and then hand a member a task again, as QoS 1 allows).
    async fn work(&mut self, n: usize, clock: Instant) -> anyhow::Result<(Vec<u64>, usize)> {
        let mut latencies = Vec::with_capacity(n);
        let mut seen = HashSet::with_capacity(n);
        let mut duplicates = 0;
        while seen.len() < n {
            let p = tokio::time::timeout(Duration::from_secs(60), self.client.incoming.recv())
                .await
                .with_context(|| format!("{} of {n} tasks, then none for 60 s", seen.len()))?
                .context("the worker's connection closed")?;
            let Some((id, t)) = self.take(&p)? else {
                continue;
            };
            if seen.insert(id) {
                latencies.push((clock.elapsed().as_micros() as u64).saturating_sub(t));
            } else {
                duplicates += 1;
            }
        }
        Ok((latencies, duplicates))
    }

    /// Works until the connection closes or `done` is dropped, sending
    /// each task's id and enqueue time to `done`.
    async fn serve(mut self, done: mpsc::UnboundedSender<(String, u64)>) -> anyhow::Result<()> {
        while let Some(p) = self.client.incoming.recv().await {
            if let Some(task) = self.take(&p)? {
                if done.send(task).is_err() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// Where each party of [`spread`] connects: a clustered broker's nodes
/// may differ for each.
pub struct Spread<'a> {
    /// The producer's node.
    pub producer: &'a MqttUrl,
    /// One worker per entry, on that node.
    pub workers: &'a [MqttUrl],
    /// Workers take their tasks on their own topics (a broker without
    /// shared subscriptions) rather than the shared one.
    pub directed: bool,
}

/// End to end (enqueue → deliver → ack) with `n` tasks from one producer
/// shared by several workers, each on its own node of a clustered broker
/// if it is one: the figures of phase 2 of [`run`], the workers together.
/// The owner of `package` must be answering (see [`wait_owner`]); `pids`
/// are the server's processes, whose CPU is measured. Every task must be
/// delivered and every ack counted by the owner.
pub async fn spread(
    spread: Spread<'_>,
    package: &str,
    pids: &[u32],
    n: usize,
) -> anyhow::Result<(Phase, usize)> {
    const QUEUE: &str = "bench-spread";
    let (producer, _producer_conn, _) = Producer::connect(spread.producer, package).await?;
    let clock = producer.clock;
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let mut workers = tokio::task::JoinSet::new();
    for (i, url) in spread.workers.iter().enumerate() {
        let id = format!("bench-worker-{i}");
        let worker = BenchWorker::start(url, package, QUEUE, &id, spread.directed).await?;
        workers.spawn(worker.serve(done_tx.clone()));
    }
    drop(done_tx);
    let cpu0 = cpu_secs_of(pids);
    let start = Instant::now();
    tokio::spawn(producer.enqueue_all(QUEUE, n, 0));
    let mut seen = HashSet::with_capacity(n);
    let mut latencies = Vec::with_capacity(n);
    let mut duplicates = 0;
    while seen.len() < n {
        let (id, t) = tokio::time::timeout(Duration::from_secs(60), done.recv())
            .await
            .with_context(|| format!("{} of {n} tasks, then none for 60 s", seen.len()))?
            .context("every worker's connection closed")?;
        if seen.insert(id) {
            latencies.push((clock.elapsed().as_micros() as u64).saturating_sub(t));
        } else {
            duplicates += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let mut ops = OpsClient::connect(
        &BrokerUrls::from(spread.producer.clone()),
        package,
        Duration::from_secs(5),
    )
    .await?;
    wait_acked(&mut ops, QUEUE, n).await?;
    ops.disconnect().await;
    let phase = Phase {
        tasks: n,
        secs,
        latency_ms: Some(percentiles_ms(&mut latencies)),
        server_cpu: cpu_secs_of(pids) - cpu0,
    };
    workers.abort_all();
    Ok((phase, duplicates))
}

/// Waits until the `i`-th of a run paced at `rate` per second (from
/// `start`) is due; `rate` 0 does not wait.
/// Waits (30 s at most) until the owner has counted `n` acks on `queue`:
/// a run ends when the owner knows every task done, not when the last
/// delivery arrived.
async fn wait_acked(ops: &mut OpsClient, queue: &str, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = ops
            .command(queue, Command::Show { limit: 1 })
            .await?
            .stats
            .context("no stats in the owner's reply")?;
        if stats.acked_total >= n as u64 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the owner counted {} of {n} acks", stats.acked_total);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn pace(start: tokio::time::Instant, i: usize, rate: u32) {
    if rate > 0 {
        tokio::time::sleep_until(
            start + Duration::from_micros(i as u64 * 1_000_000 / u64::from(rate)),
        )
        .await;
    }
}

/// p50 and p99 of latencies in microseconds, as milliseconds.
pub fn percentiles_ms(micros: &mut [u64]) -> (f64, f64) {
    micros.sort_unstable();
    let at = |q: f64| {
        let i = ((micros.len() as f64 * q) as usize).min(micros.len().saturating_sub(1));
        micros.get(i).copied().unwrap_or_default() as f64 / 1000.0
    };
    (at(0.50), at(0.99))
}
