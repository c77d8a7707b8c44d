//! `axion-bench --queues`: durable work queues, Axion beside NATS
//! JetStream's work-queue stream, the same load on each in one run.
//!
//! Axion runs the load of [`axion_bench::queue_load`] (durable enqueue;
//! enqueue → deliver → ack with one worker holding 256 credits; half as
//! many tasks at a fixed 2 000/s). JetStream gets the same load through
//! async-nats: a WorkQueue stream on file storage, a publisher keeping 256
//! publishes awaiting their stream ack, one durable pull consumer acking
//! each message. Twice when the server is 2.10 or later: with its default
//! sync interval (a stream ack says "in the OS's page cache") and with
//! `sync_interval: always` (an fsync per message, Axion's promise).
//!
//! Targets: `axion serve` (broker and owner in one process), the
//! `--baseline` build beside it, with `--queue-mosquitto` `axion queues`
//! beside Mosquitto (CPU of both), and JetStream when `--nats-server` runs.
//! Each takes a fresh server per round, a different target first each
//! round; the table gives medians (min – max over the rounds).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use axion_bench::queue_load::{self, pace, percentiles_ms, Figures, Phase, Stamped, PACED_RATE};
use axion_wire::MqttUrl;
use futures_util::StreamExt;

use super::{axion_serve, cpu_secs, free_port, spawn_mosquitto, wait_listening, Args};

/// The package every Axion target runs its queues in.
const PACKAGE: &str = "bench";

#[derive(Clone, Debug, PartialEq)]
enum Target {
    /// `axion serve` of this binary.
    Serve(PathBuf),
    /// The `--baseline` build's `axion serve`.
    Baseline(PathBuf),
    /// `axion queues` beside Mosquitto.
    QueuesMosquitto(PathBuf),
    /// `nats-server` with JetStream; `true`: `sync_interval: always`.
    JetStream(PathBuf, bool),
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::Serve(_) => "axion serve",
            Target::Baseline(_) => "axion serve, baseline",
            Target::QueuesMosquitto(_) => "axion queues + Mosquitto",
            Target::JetStream(_, false) => "JetStream, default sync",
            Target::JetStream(_, true) => "JetStream, sync_interval: always",
        }
    }

    fn is_axion(&self) -> bool {
        !matches!(self, Target::JetStream(..))
    }
}

/// A child process killed on drop, with what it keeps on disk.
struct Running {
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        // The owner before its broker.
        for child in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Running {
    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    // Two workers, as the load ran when it was measured for the figures
    // in BENCHMARKS.md: the producer, the worker and their connections
    // each get a thread when the server leaves one.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let n = args.tasks;
    let mut targets = vec![Target::Serve(args.axion.clone())];
    if let Some(baseline) = &args.baseline {
        targets.push(Target::Baseline(baseline.clone()));
    }
    if args.queue_mosquitto {
        targets.push(Target::QueuesMosquitto(args.axion.clone()));
    }
    targets.extend(jetstream_targets(&args.nats_server));

    let mut results: Vec<Vec<Figures>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 0..args.rounds {
        // A different target first each round, so drift hits all alike.
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let target = &targets[i];
            let figures = rt
                .block_on(run_target(target, n))
                .with_context(|| format!("{} in round {}", target.name(), round + 1))?;
            log_round(target, round, &figures);
            results[i].push(figures);
        }
    }
    print_table(&targets, &results, n);
    Ok(())
}

/// JetStream's two targets, or one before 2.10 (no `sync_interval`), or
/// none without a `nats-server` that runs.
fn jetstream_targets(bin: &Path) -> Vec<Target> {
    let version = match Command::new(bin).arg("--version").output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        _ => {
            eprintln!(
                "({} does not run: no JetStream columns; scripts/bench-setup.sh installs nats-server, --nats-server names it)",
                bin.display()
            );
            return Vec::new();
        }
    };
    eprintln!("{version}");
    // "nats-server: v2.15.1": `sync_interval` exists from 2.10 on.
    let minor: u32 = version
        .rsplit('v')
        .next()
        .and_then(|v| v.split('.').nth(1))
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    let mut targets = vec![Target::JetStream(bin.to_path_buf(), false)];
    if minor >= 10 {
        targets.push(Target::JetStream(bin.to_path_buf(), true));
    } else {
        eprintln!("(this nats-server predates `sync_interval: always`; that column is skipped)");
    }
    targets
}

/// A fresh server for `target`, and the load on it.
async fn run_target(target: &Target, n: usize) -> anyhow::Result<Figures> {
    match target {
        Target::Serve(bin) | Target::Baseline(bin) => {
            let dir = tempfile::tempdir()?;
            let port = free_port()?;
            let child = axion_serve(bin, port, dir.path())?
                .args(["--package", PACKAGE])
                .spawn()
                .with_context(|| format!("spawn {} (cargo build --release)", bin.display()))?;
            let running = Running {
                children: vec![child],
                dir,
            };
            wait_listening(port, "axion serve")?;
            axion_load(port, &running, n).await
        }
        Target::QueuesMosquitto(bin) => {
            let dir = tempfile::tempdir()?;
            let port = free_port()?;
            // Mosquitto's default queue per client (1 000), as in the tests
            // of `axion queues` beside it.
            let mosquitto = spawn_mosquitto(
                &dir.path().join("mosquitto.conf"),
                port,
                1000,
                "persistence false\n",
            )?;
            let mut running = Running {
                children: vec![mosquitto],
                dir,
            };
            wait_listening(port, "mosquitto")?;
            let owner = Command::new(bin)
                .args(["queues", "--package", PACKAGE, "--mqtt"])
                .arg(format!("mqtt://127.0.0.1:{port}"))
                .arg("--data-dir")
                .arg(running.dir.path().join("queues"))
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("spawn {} queues", bin.display()))?;
            running.children.push(owner);
            axion_load(port, &running, n).await
        }
        Target::JetStream(bin, sync_always) => jetstream(bin, n, *sync_always).await,
    }
}

async fn axion_load(port: u16, running: &Running, n: usize) -> anyhow::Result<Figures> {
    let url = MqttUrl::parse(&format!("mqtt://127.0.0.1:{port}"))?;
    queue_load::wait_owner(&url, PACKAGE).await?;
    queue_load::run(&url, PACKAGE, &running.pids(), n).await
}

/// The same load on one JetStream server.
async fn jetstream(bin: &Path, n: usize, sync_always: bool) -> anyhow::Result<Figures> {
    use async_nats::jetstream::{self, consumer, stream};
    let port = free_port()?;
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("nats.conf");
    let store = dir.path().join("js");
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: {store:?}\n{}}}\n",
            if sync_always {
                "  sync_interval: always\n"
            } else {
                ""
            }
        ),
    )?;
    let server = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("spawn {}", bin.display()))?;
    let running = Running {
        children: vec![server],
        dir,
    };
    let pid = running.children[0].id();
    wait_listening(port, "nats-server")?;
    let client = async_nats::connect(format!("127.0.0.1:{port}")).await?;
    let js = jetstream::new(client);
    let tasks = js
        .get_or_create_stream(stream::Config {
            name: "TASKS".into(),
            subjects: vec!["tasks".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("create the stream: {e}"))?;
    let clock = Instant::now();
    let publish_all = |js: jetstream::Context, n: usize, rate: u32| async move {
        let mut acks = tokio::task::JoinSet::<anyhow::Result<()>>::new();
        let start = tokio::time::Instant::now();
        for i in 0..n {
            pace(start, i, rate).await;
            if acks.len() >= queue_load::WINDOW {
                if let Some(ack) = acks.join_next().await {
                    ack??;
                }
            }
            let t = clock.elapsed().as_micros() as u64;
            let body = serde_json::json!({ "payload": { "t": t, "pad": "x".repeat(60) } });
            let ack = js
                .publish("tasks", body.to_string().into())
                .await
                .map_err(|e| anyhow::anyhow!("publish: {e}"))?;
            acks.spawn(async move {
                ack.await
                    .map(|_| ())
                    .map_err(|e| anyhow::anyhow!("stream ack: {e}"))
            });
        }
        while let Some(ack) = acks.join_next().await {
            ack??;
        }
        anyhow::Ok(())
    };

    // 1. Publish with the stream's ack, no consumer.
    let cpu0 = cpu_secs(pid);
    let start = Instant::now();
    publish_all(js.clone(), n, 0).await?;
    let enqueue = Phase {
        tasks: n,
        secs: start.elapsed().as_secs_f64(),
        latency_ms: None,
        server_cpu: cpu_secs(pid) - cpu0,
    };
    tasks
        .purge()
        .await
        .map_err(|e| anyhow::anyhow!("purge: {e}"))?;

    // 2. End to end: publish → pull → ack; 3. the same at a fixed rate.
    let worker = tasks
        .create_consumer(consumer::pull::Config {
            durable_name: Some("worker".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("create the consumer: {e}"))?;
    let mut messages = worker
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("pull: {e}"))?;
    let mut phases = Vec::new();
    for (count, rate) in [(n, 0), (n / 2, PACED_RATE)] {
        let cpu0 = cpu_secs(pid);
        let start = Instant::now();
        let publisher = tokio::spawn(publish_all(js.clone(), count, rate));
        let mut latencies = Vec::with_capacity(count);
        for k in 0..count {
            let m = tokio::time::timeout(Duration::from_secs(60), messages.next())
                .await
                .with_context(|| format!("{k} of {count} messages, then none for 60 s"))?
                .context("the consumer's stream ended")?
                .map_err(|e| anyhow::anyhow!("message: {e}"))?;
            let sent = serde_json::from_slice::<Stamped>(&m.payload)
                .map(|s| s.payload.t)
                .unwrap_or_default();
            latencies.push((clock.elapsed().as_micros() as u64).saturating_sub(sent));
            m.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
        }
        let secs = start.elapsed().as_secs_f64();
        publisher.await??;
        phases.push(Phase {
            tasks: count,
            secs,
            latency_ms: Some(percentiles_ms(&mut latencies)),
            server_cpu: cpu_secs(pid) - cpu0,
        });
    }
    Ok(Figures {
        enqueue,
        end_to_end: phases[0],
        paced: phases[1],
        duplicates: None,
        acks_counted_secs: None,
    })
}

/// One round's figures on stderr, as the run goes.
fn log_round(target: &Target, round: usize, f: &Figures) {
    let (what, to) = if target.is_axion() {
        ("durable enqueue (confirmed on disk)", "enqueue to delivery")
    } else {
        ("publish (stream ack)", "publish to delivery")
    };
    let (p50, p99) = f.end_to_end.latency_ms.unwrap_or_default();
    let (paced50, paced99) = f.paced.latency_ms.unwrap_or_default();
    let twice = match (f.duplicates, f.acks_counted_secs) {
        (Some(d), Some(acked)) => {
            format!(" ({d} delivered twice; all acks counted at {acked:.2}s)")
        }
        _ => String::new(),
    };
    eprintln!(
        "  round {} {}: {what}: {} in {:.2}s = {:.0}/s, CPU {:.3} s/1k; end to end: {:.0} tasks/s, {to} p50 {p50:.2} ms p99 {p99:.2} ms{twice}, CPU {:.3} s/1k; at {PACED_RATE}/s: p50 {paced50:.2} ms p99 {paced99:.2} ms, CPU {:.3} s/1k",
        round + 1,
        target.name(),
        f.enqueue.tasks,
        f.enqueue.secs,
        f.enqueue.rate(),
        f.enqueue.cpu_per_1k(),
        f.end_to_end.rate(),
        f.end_to_end.cpu_per_1k(),
        f.paced.cpu_per_1k(),
    );
}

/// The median of `values`, with (min – max) when there are several.
pub(crate) fn spread(mut values: Vec<f64>, decimals: usize) -> String {
    values.sort_by(f64::total_cmp);
    let median = values[values.len() / 2];
    if values.len() == 1 {
        return format!("{median:.decimals$}");
    }
    format!(
        "{median:.decimals$} ({:.decimals$} – {:.decimals$})",
        values[0],
        values[values.len() - 1]
    )
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn print_table(targets: &[Target], results: &[Vec<Figures>], n: usize) {
    let header: Vec<&str> = targets.iter().map(Target::name).collect();
    println!("| {n} tasks of ~100 B | {} |", header.join(" | "));
    println!("|---|{}", "---|".repeat(targets.len()));
    type Cell = fn(&Figures) -> f64;
    let row = |label: &str, cell: Cell, decimals: usize| {
        let cells: Vec<String> = results
            .iter()
            .map(|runs| spread(runs.iter().map(cell).collect(), decimals))
            .collect();
        println!("| {label} | {} |", cells.join(" | "));
    };
    let latency = |label: &str, phase: fn(&Figures) -> Phase| {
        let cells: Vec<String> = results
            .iter()
            .map(|runs| {
                let (p50, p99): (Vec<f64>, Vec<f64>) = runs
                    .iter()
                    .map(|f| phase(f).latency_ms.unwrap_or((f64::NAN, f64::NAN)))
                    .unzip();
                format!("{:.2} / {:.2}", median(p50), median(p99))
            })
            .collect();
        println!("| {label} | {} |", cells.join(" | "));
    };
    row("confirmed enqueues/s, no worker", |f| f.enqueue.rate(), 0);
    row(
        "server CPU s per 1 000 tasks, enqueue",
        |f| f.enqueue.cpu_per_1k(),
        3,
    );
    row("end to end tasks/s", |f| f.end_to_end.rate(), 0);
    latency("enqueue → delivery p50 / p99 ms, flat out", |f| {
        f.end_to_end
    });
    row(
        "server CPU s per 1 000 tasks, end to end",
        |f| f.end_to_end.cpu_per_1k(),
        3,
    );
    latency(
        &format!("enqueue → delivery p50 / p99 ms at {PACED_RATE}/s"),
        |f| f.paced,
    );
    row(
        &format!("server CPU s per 1 000 tasks at {PACED_RATE}/s"),
        |f| f.paced.cpu_per_1k(),
        3,
    );
    let twice: Vec<String> = results
        .iter()
        .map(|runs| {
            let counts: Vec<String> = runs
                .iter()
                .filter_map(|f| f.duplicates.map(|d| d.to_string()))
                .collect();
            if counts.is_empty() {
                "—".to_string()
            } else {
                counts.join(", ")
            }
        })
        .collect();
    println!(
        "| delivered twice (of {n}), per round | {} |",
        twice.join(" | ")
    );

    // Ratios within each round, so a slow spell of the machine hits both
    // sides of one.
    if targets.len() < 2 {
        return;
    }
    println!();
    println!(
        "| {} ÷ | confirmed enqueues/s | end to end tasks/s, per round | server CPU per task, end to end |",
        targets[0].name()
    );
    println!("|---|---|---|---|");
    for (target, runs) in targets.iter().zip(results).skip(1) {
        let ours = &results[0];
        let per_round: Vec<f64> = ours
            .iter()
            .zip(runs)
            .map(|(a, b)| a.end_to_end.rate() / b.end_to_end.rate())
            .collect();
        let enqueue = median(
            ours.iter()
                .zip(runs)
                .map(|(a, b)| a.enqueue.rate() / b.enqueue.rate())
                .collect(),
        );
        let cpu = median(
            ours.iter()
                .zip(runs)
                .map(|(a, b)| a.end_to_end.cpu_per_1k() / b.end_to_end.cpu_per_1k())
                .collect(),
        );
        let rounds: Vec<String> = per_round.iter().map(|r| format!("{r:.2}×")).collect();
        println!(
            "| {} | {enqueue:.2}× | {} | {cpu:.2}× |",
            target.name(),
            rounds.join(", ")
        );
    }
}
