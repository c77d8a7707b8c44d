//! `axion-bench --cluster`: durable tasks end to end on a clustered broker
//! that is not Axion, beside one `axion serve`, the same load on each in
//! one run.
//!
//! The load is [`axion_bench::queue_load::spread`]: `--tasks` tasks from
//! one producer keeping 256 enqueues awaiting their on-disk confirmation,
//! done by two workers holding up to 256 credits each, every task
//! delivered and every ack counted by the owner.
//!
//! - `axion serve`: broker and owner in one process; producer and both
//!   workers on it, tasks through the shared subscription.
//! - two ejabberd nodes clustered ([`axion_bench::ejabberd`]): `axion
//!   queues` on node A, one worker on each node by directed delivery
//!   (ejabberd has no shared subscriptions), the producer on node B. Server
//!   CPU is both Erlang VMs plus the owner.
//!
//! Each round takes fresh servers, a different target first each round;
//! the table gives medians (min – max over the rounds).

use std::process::{Child, Command, Stdio};

use anyhow::Context;
use axion_bench::ejabberd::Cluster;
use axion_bench::queue_load::{self, Phase, Spread};
use axion_wire::MqttUrl;

use super::queues::{median, spread};
use super::{axion_serve, free_port, wait_listening, Args};

/// The package both targets run their queue in.
const PACKAGE: &str = "bench";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    Serve,
    Ejabberd,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Serve => "axion serve (owner inside, shared subscription)",
            Target::Ejabberd => "2 ejabberd nodes + axion queues (directed delivery)",
        }
    }
}

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let n = args.tasks;
    let targets = [Target::Serve, Target::Ejabberd];
    let mut results: Vec<Vec<(Phase, usize)>> = vec![Vec::new(); targets.len()];
    for round in 0..args.rounds {
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let target = targets[i];
            let figures = run_target(&rt, args, target, n)
                .with_context(|| format!("{} in round {}", target.name(), round + 1))?;
            eprintln!(
                "round {}: {}: {:.0} tasks/s, p50/p99 {:?} ms, server CPU {:.2} s, {} delivered twice",
                round + 1,
                target.name(),
                figures.0.rate(),
                figures.0.latency_ms,
                figures.0.server_cpu,
                figures.1
            );
            results[i].push(figures);
        }
    }
    print_table(&targets, &results, n);
    Ok(())
}

fn run_target(
    rt: &tokio::runtime::Runtime,
    args: &Args,
    target: Target,
    n: usize,
) -> anyhow::Result<(Phase, usize)> {
    let dir = tempfile::tempdir()?;
    match target {
        Target::Serve => {
            let port = free_port()?;
            let serve = Killed(
                axion_serve(&args.axion, port, dir.path())?
                    .args(["--package", PACKAGE])
                    .spawn()
                    .with_context(|| {
                        format!("spawn {} (cargo build --release)", args.axion.display())
                    })?,
            );
            wait_listening(port, "axion serve")?;
            let url = MqttUrl::parse(&format!("mqtt://127.0.0.1:{port}"))?;
            rt.block_on(async {
                queue_load::wait_owner(&url, PACKAGE).await?;
                let workers = [url.clone(), url.clone()];
                let load = Spread {
                    producer: &url,
                    workers: &workers,
                    directed: false,
                };
                queue_load::spread(load, PACKAGE, &[serve.0.id()], n).await
            })
        }
        Target::Ejabberd => {
            let cluster = Cluster::start(2)?;
            let raw = cluster.urls();
            let urls = raw
                .iter()
                .map(|u| MqttUrl::parse(u))
                .collect::<Result<Vec<_>, _>>()?;
            let (a, b) = (&urls[0], &urls[1]);
            let owner = Killed(
                Command::new(&args.axion)
                    .args(["queues", "--package", PACKAGE, "--mqtt"])
                    // The URL as written: a parsed one prints no password.
                    .arg(&raw[0])
                    .arg("--data-dir")
                    .arg(dir.path().join("queues"))
                    .env("RUST_LOG", "warn")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .with_context(|| format!("spawn {} queues", args.axion.display()))?,
            );
            let pids = [cluster.nodes[0].pid(), cluster.nodes[1].pid(), owner.0.id()];
            rt.block_on(async {
                queue_load::wait_owner(b, PACKAGE).await?;
                let workers = [a.clone(), b.clone()];
                let load = Spread {
                    producer: b,
                    workers: &workers,
                    directed: true,
                };
                queue_load::spread(load, PACKAGE, &pids, n).await
            })
        }
    }
}

fn print_table(targets: &[Target], results: &[Vec<(Phase, usize)>], n: usize) {
    let header: Vec<&str> = targets.iter().map(|t| t.name()).collect();
    println!(
        "| {n} tasks of ~100 B, 2 workers | {} |",
        header.join(" | ")
    );
    println!("|---|{}", "---|".repeat(targets.len()));
    type Cell = fn(&(Phase, usize)) -> f64;
    let row = |label: &str, cell: Cell, decimals: usize| {
        let cells: Vec<String> = results
            .iter()
            .map(|runs| spread(runs.iter().map(cell).collect(), decimals))
            .collect();
        println!("| {label} | {} |", cells.join(" | "));
    };
    row("end to end tasks/s", |f| f.0.rate(), 0);
    let cells: Vec<String> = results
        .iter()
        .map(|runs| {
            let (p50, p99): (Vec<f64>, Vec<f64>) = runs
                .iter()
                .map(|f| f.0.latency_ms.unwrap_or((f64::NAN, f64::NAN)))
                .unzip();
            format!("{:.2} / {:.2}", median(p50), median(p99))
        })
        .collect();
    println!(
        "| enqueue → delivery p50 / p99 ms | {} |",
        cells.join(" | ")
    );
    row("server CPU s per 1 000 tasks", |f| f.0.cpu_per_1k(), 3);
    row("tasks delivered twice", |f| f.1 as f64, 0);
}
