//! `axion-bench --bridge` and `--bridge-queue`: the legacy WebSocket
//! protocol through Axion's bridge beside the legacy Node broker, in one
//! run, with one load driver for every target
//! (`<clients>/bench.js`, Node + `ws`: a coordinator forking a sender
//! process and one process per subscriber, so a driver process that
//! saturates its core shows in its own CPU figure).
//!
//! `--bridge`: events (the legacy `publish`) flat out and at a fixed
//! 10k events/s, through `axion serve`'s bridge, `axion bridge` beside
//! Mosquitto, the legacy broker (`legacy_broker.js`), and direct MQTT on
//! the same brokers; then MQTT → WebSocket through each bridge. With
//! `--baseline`, that build's `axion serve` is one more target in the
//! same rounds.
//!
//! `--bridge-queue`: the legacy work-queue protocol (`enqueue` → `{task}`
//! → `ack` + `ready`) through `axion serve` (durable), `axion bridge` +
//! `axion queues` beside Mosquitto (durable) and the legacy broker with
//! its in-memory queue (`legacy_queue_broker.js`: nothing on disk, nothing
//! confirmed); tasks/s flat out and latency at 2 000 tasks/s.
//!
//! Servers start once; in each round the targets take turns, a different
//! one first each round, and the table gives the median of each figure.
//! Broker CPU is utime + stime from /proc of every process on the broker
//! side, per delivered event and as deliveries per broker CPU-second; a
//! second table gives the latter over the legacy broker's in the same
//! case.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use super::{axion_serve_on, free_port, spawn_mosquitto, wait_listening, Args};

/// The package the bridges serve.
const PACKAGE: &str = "bench";

/// Processes killed on drop, the last started first.
struct Procs(Vec<(Child, &'static str)>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (child, _) in self.0.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Procs {
    fn pid(&self, name: &str) -> Vec<u32> {
        self.0
            .iter()
            .filter(|(_, n)| *n == name)
            .map(|(c, _)| c.id())
            .collect()
    }
}

/// A WebSocket bridge with the MQTT broker behind it.
struct Stack {
    ws_port: u16,
    mqtt_port: u16,
    procs: Procs,
    dir: tempfile::TempDir,
}

impl Stack {
    /// `axion serve` of `bin`: broker, bridge and queue owner in one process.
    fn serve(bin: &Path) -> anyhow::Result<Stack> {
        let dir = tempfile::tempdir()?;
        let (mqtt_port, ws_port) = (free_port()?, free_port()?);
        let child = axion_serve_on(bin, mqtt_port, ws_port, dir.path())?
            .args(["--package", PACKAGE])
            .spawn()
            .with_context(|| format!("spawn {} (cargo build --release)", bin.display()))?;
        let stack = Stack {
            ws_port,
            mqtt_port,
            procs: Procs(vec![(child, "serve")]),
            dir,
        };
        wait_ready(ws_port)?;
        Ok(stack)
    }

    /// `axion bridge` beside a Mosquitto of its own that keeps up to
    /// `max_queued` messages per client (0: no limit); `owner` adds
    /// `axion queues`.
    fn standalone(args: &Args, max_queued: u64, owner: bool) -> anyhow::Result<Stack> {
        let dir = tempfile::tempdir()?;
        let (mqtt_port, ws_port) = (free_port()?, free_port()?);
        let conf = dir.path().join("mosquitto.conf");
        let mosquitto = spawn_mosquitto(&conf, mqtt_port, max_queued, "persistence false\n")?;
        let mut stack = Stack {
            ws_port,
            mqtt_port,
            procs: Procs(vec![(mosquitto, "mosquitto")]),
            dir,
        };
        wait_listening(mqtt_port, "mosquitto")?;
        let url = format!("mqtt://127.0.0.1:{mqtt_port}");
        let bridge = axion(&args.axion, "bridge", &url)
            .arg("--ws-listen")
            .arg(format!("127.0.0.1:{ws_port}"))
            .spawn()
            .with_context(|| format!("spawn {} bridge", args.axion.display()))?;
        stack.procs.0.push((bridge, "bridge"));
        if owner {
            let queues = axion(&args.axion, "queues", &url)
                .arg("--data-dir")
                .arg(stack.dir.path().join("queues"))
                .spawn()
                .with_context(|| format!("spawn {} queues", args.axion.display()))?;
            stack.procs.0.push((queues, "queues"));
        }
        wait_ready(ws_port)?;
        Ok(stack)
    }

    fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.ws_port)
    }

    /// `bench.js` arguments for MQTT clients of this stack's broker.
    fn mqtt(&self, flag: &str) -> Vec<String> {
        vec![
            flag.to_string(),
            format!("127.0.0.1:{}", self.mqtt_port),
            "--package".into(),
            PACKAGE.into(),
        ]
    }
}

/// `axion <sub> --mqtt <url> --package bench`, quiet.
fn axion(bin: &Path, sub: &str, url: &str) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args([sub, "--mqtt", url, "--package", PACKAGE])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// Waits until the bridge on `ws_port` says it is connected to its broker.
fn wait_ready(ws_port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_status(ws_port, "/health/ready") != Some(200) {
        if Instant::now() > deadline {
            bail!("the bridge on {ws_port} was not ready within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The status code of an HTTP/1.1 GET.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

/// One of the legacy Node brokers (`<clients>/<script>`) on a free port,
/// its per-event console logging sent to /dev/null.
fn legacy_broker(clients: &Path, script: &'static str) -> anyhow::Result<(Procs, u16)> {
    let port = free_port()?;
    let child = Command::new("node")
        .arg(script)
        .env("PORT", port.to_string())
        .current_dir(clients)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("spawn node {script} in {}", clients.display()))?;
    let procs = Procs(vec![(child, script)]);
    wait_listening(port, script)?;
    Ok((procs, port))
}

/// One way of carrying the benchmark's events, and the processes whose
/// CPU time is the broker's side of it.
struct Target {
    name: &'static str,
    /// Arguments of `bench.js` naming where to connect.
    args: Vec<String>,
    pids: Vec<u32>,
}

/// (case, `bench.js` arguments, targets)
type Case = (&'static str, Vec<String>, Vec<Target>);

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

pub fn run_events(args: &Args) -> anyhow::Result<()> {
    let clients = clients_dir(args)?;
    let (legacy, legacy_port) = legacy_broker(&clients, "legacy_broker.js")?;
    let serve = Stack::serve(&args.axion)?;
    let baseline = args.baseline.as_deref().map(Stack::serve).transpose()?;
    // Mosquitto as the MQTT broker benchmark configures it: TCP_NODELAY
    // on (its default Nagle delays a quiet stream of small messages by up
    // to 40 ms) and no limit on queued messages.
    let standalone = Stack::standalone(args, 0, false)?;
    let serve_pid = serve.procs.pid("serve");
    let bridge_pid = standalone.procs.pid("bridge");
    let mosquitto_pid = standalone.procs.pid("mosquitto");
    let legacy_target = || Target {
        name: "legacy Node broker",
        args: vec!["--url".into(), format!("ws://127.0.0.1:{legacy_port}")],
        pids: legacy.pid("legacy_broker.js"),
    };
    let ws = |stack: &Stack| vec!["--url".to_string(), stack.ws_url()];
    let baseline_target = |args: &dyn Fn(&Stack) -> Vec<String>| {
        baseline.as_ref().map(|b| Target {
            name: "axion serve (bridge), --baseline build",
            args: args(b),
            pids: b.procs.pid("serve"),
        })
    };
    let ws_to_ws = || {
        let mut targets = vec![Target {
            name: "axion serve (bridge)",
            args: ws(&serve),
            pids: serve_pid.clone(),
        }];
        targets.extend(baseline_target(&ws));
        targets.extend([
            Target {
                name: "axion bridge + Mosquitto",
                args: ws(&standalone),
                pids: [bridge_pid.clone(), mosquitto_pid.clone()].concat(),
            },
            legacy_target(),
            Target {
                name: "direct MQTT, axion serve",
                args: serve.mqtt("--mqtt"),
                pids: serve_pid.clone(),
            },
            Target {
                name: "direct MQTT, Mosquitto",
                args: standalone.mqtt("--mqtt"),
                pids: mosquitto_pid.clone(),
            },
        ]);
        targets
    };
    let mqtt_to_ws = || {
        let through = |stack: &Stack| [ws(stack), stack.mqtt("--send-mqtt")].concat();
        let mut targets = vec![Target {
            name: "axion serve (bridge)",
            args: through(&serve),
            pids: serve_pid.clone(),
        }];
        targets.extend(baseline_target(&through));
        targets.push(Target {
            name: "axion bridge + Mosquitto",
            args: through(&standalone),
            pids: [bridge_pid.clone(), mosquitto_pid.clone()].concat(),
        });
        targets
    };
    let n = args.events.to_string();
    let half = (args.events / 2).to_string();
    let cases: Vec<Case> = vec![
        (
            "WS → WS, max, 1 subscriber",
            strings(&["--events", &n, "--receivers", "1"]),
            ws_to_ws(),
        ),
        (
            "WS → WS, max, 4 subscribers",
            strings(&["--events", &half, "--receivers", "4"]),
            ws_to_ws(),
        ),
        (
            "WS → WS, max, 2 publishers × 2 subscribers",
            strings(&["--events", &n, "--senders", "2", "--receivers", "2"]),
            ws_to_ws(),
        ),
        (
            "WS → WS, 10k events/s, 1 subscriber",
            strings(&["--events", "30000", "--rate", "10000", "--receivers", "1"]),
            ws_to_ws(),
        ),
        (
            "WS → WS, 10k events/s, 2 publishers × 2 subscribers",
            strings(&[
                "--events",
                "30000",
                "--rate",
                "10000",
                "--senders",
                "2",
                "--receivers",
                "2",
            ]),
            ws_to_ws(),
        ),
        (
            "MQTT → WS, max, 1 subscriber",
            strings(&["--events", &n, "--receivers", "1"]),
            mqtt_to_ws(),
        ),
        (
            "MQTT → WS, 10k events/s, 1 subscriber",
            strings(&["--events", "30000", "--rate", "10000", "--receivers", "1"]),
            mqtt_to_ws(),
        ),
    ];
    run_cases(&clients, &chosen(cases, args), args.rounds)
}

/// The cases `--case` names (all without it).
fn chosen(cases: Vec<Case>, args: &Args) -> Vec<Case> {
    match &args.case {
        Some(text) => cases
            .into_iter()
            .filter(|c| c.0.contains(text.as_str()))
            .collect(),
        None => cases,
    }
}

pub fn run_queue(args: &Args) -> anyhow::Result<()> {
    let clients = clients_dir(args)?;
    let (legacy, legacy_port) = legacy_broker(&clients, "legacy_queue_broker.js")?;
    let serve = Stack::serve(&args.axion)?;
    // Mosquitto's default queue per client (1 000): the bridge publishes
    // an enqueue the broker dropped again until the owner confirms it.
    let standalone = Stack::standalone(args, 1000, true)?;
    let targets = || {
        vec![
            Target {
                name: "axion serve (bridge, durable)",
                args: vec!["--url".into(), serve.ws_url()],
                pids: serve.procs.pid("serve"),
            },
            Target {
                name: "axion bridge + queues + Mosquitto (durable)",
                args: vec!["--url".into(), standalone.ws_url()],
                pids: [
                    standalone.procs.pid("bridge"),
                    standalone.procs.pid("queues"),
                    standalone.procs.pid("mosquitto"),
                ]
                .concat(),
            },
            Target {
                name: "legacy broker, in-memory queue",
                args: vec!["--url".into(), format!("ws://127.0.0.1:{legacy_port}")],
                pids: legacy.pid("legacy_queue_broker.js"),
            },
        ]
    };
    let n = args.tasks.to_string();
    let paced = (args.tasks / 2).to_string();
    let cases: Vec<Case> = vec![
        (
            "tasks, max, 1 worker × 256 readies",
            strings(&["--queue", "bench.q", "--events", &n, "--credits", "256"]),
            targets(),
        ),
        (
            "tasks, 2 000/s, 1 worker × 256 readies",
            strings(&[
                "--queue",
                "bench.r",
                "--events",
                &paced,
                "--rate",
                "2000",
                "--credits",
                "256",
            ]),
            targets(),
        ),
    ];
    run_cases(&clients, &chosen(cases, args), args.rounds)
}

/// The directory of `bench.js` and the legacy brokers, with their Node
/// packages installed (`scripts/setup.sh`).
fn clients_dir(args: &Args) -> anyhow::Result<PathBuf> {
    let dir = &args.clients;
    if !dir.join("bench.js").is_file() {
        bail!(
            "no bench.js in {} (run from the repository's root, or --clients)",
            dir.display()
        );
    }
    Ok(dir.clone())
}

/// Runs a driver script to completion and returns its JSON summary line.
fn run_driver(clients: &Path, args: &[String], timeout: Duration) -> anyhow::Result<Value> {
    let mut child = Command::new("node")
        .args(args)
        .current_dir(clients)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn node")?;
    let deadline = Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "node {args:?} failed ({:?}):\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("no JSON summary from node {args:?}: {stdout}"))?;
    Ok(serde_json::from_str(line)?)
}

/// Runs every case on each of its targets `rounds` times (targets take
/// turns, starting from a different one each round) and prints one
/// Markdown row of medians per case and target, then each target's
/// deliveries per broker CPU-second over the legacy broker's.
fn run_cases(clients: &Path, cases: &[Case], rounds: usize) -> anyhow::Result<()> {
    println!("| case | carried by | delivered | events/s | p50 ms | p99 ms | broker CPU µs/event | deliveries per broker CPU-s | driver CPU µs/event |");
    println!("|---|---|---|---|---|---|---|---|---|");
    // (case, target, deliveries per broker CPU-second)
    let mut per_cpu: Vec<(&str, &str, f64)> = Vec::new();
    for (case, args, targets) in cases {
        let mut runs: Vec<Vec<Value>> = targets.iter().map(|_| Vec::new()).collect();
        for round in 0..rounds {
            for k in 0..targets.len() {
                let i = (k + round) % targets.len();
                let t = &targets[i];
                let pids: Vec<String> = t.pids.iter().map(u32::to_string).collect();
                let mut a = vec!["bench.js".to_string()];
                a.extend(t.args.iter().cloned());
                a.extend(args.iter().cloned());
                a.extend(["--pids".to_string(), pids.join(",")]);
                let out = run_driver(clients, &a, Duration::from_secs(300))
                    .with_context(|| format!("{case}, {}", t.name))?;
                eprintln!("  {case} round {} | {} | {out}", round + 1, t.name);
                runs[i].push(out);
            }
        }
        for (t, outs) in targets.iter().zip(&runs) {
            let median = |f: &dyn Fn(&Value) -> f64| {
                let mut v: Vec<f64> = outs.iter().map(f).collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let broker_ms = |v: &Value| v["cpu_ms"]["broker"].as_f64().unwrap_or(0.0);
            let per_event =
                |v: &Value, ms: f64| ms * 1000.0 / v["delivered"].as_f64().unwrap_or(1.0).max(1.0);
            let delivered = median(&|v| v["delivered"].as_f64().unwrap_or(0.0));
            let expected = outs[0]["expected"].as_u64().unwrap_or(0);
            // Queue runs: tasks seen twice, and enqueues confirmed on disk
            // (the driver reports `duplicates` for event runs too).
            let queue_run = args.iter().any(|a| a == "--queue");
            let extra = match outs[0]["confirmed"].as_u64() {
                Some(c) => format!(
                    " ({:.0} twice, {c} confirmed)",
                    median(&|v| v["duplicates"].as_f64().unwrap_or(0.0))
                ),
                None if queue_run => " (none confirmed)".to_string(),
                None => String::new(),
            };
            let deliveries_per_cpu_sec = median(&|v| {
                v["delivered"].as_f64().unwrap_or(0.0) * 1000.0 / broker_ms(v).max(1.0)
            });
            per_cpu.push((case, t.name, deliveries_per_cpu_sec));
            println!(
                "| {case} | {} | {delivered}/{expected}{extra} | {:.0} | {:.2} | {:.2} | {:.1} | {:.0} | {:.1} |",
                t.name,
                median(&|v| v["events_per_sec"].as_f64().unwrap_or(0.0)),
                median(&|v| v["p50_ms"].as_f64().unwrap_or(f64::NAN)),
                median(&|v| v["p99_ms"].as_f64().unwrap_or(f64::NAN)),
                median(&|v| per_event(v, broker_ms(v))),
                deliveries_per_cpu_sec,
                median(&|v| per_event(
                    v,
                    v["cpu_ms"]["sender"].as_f64().unwrap_or(0.0)
                        + v["cpu_ms"]["receivers"].as_f64().unwrap_or(0.0)
                )),
            );
        }
    }
    let legacy = |case: &str| {
        per_cpu
            .iter()
            .find(|(c, t, _)| *c == case && t.starts_with("legacy"))
            .map(|(_, _, v)| *v)
    };
    let ratios: Vec<_> = per_cpu
        .iter()
        .filter(|(_, t, _)| !t.starts_with("legacy"))
        .filter_map(|(c, t, v)| legacy(c).map(|l| (c, t, v / l.max(1.0))))
        .collect();
    if !ratios.is_empty() {
        println!();
        println!("| case | carried by | deliveries per broker CPU-s ÷ legacy Node broker's |");
        println!("|---|---|---|");
        for (case, target, ratio) in ratios {
            println!("| {case} | {target} | {ratio:.2}× |");
        }
    }
    Ok(())
}
