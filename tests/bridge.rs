//! End-to-end tests of the legacy WebSocket bridge with the legacy
//! clients, unchanged: `brokerClient.js` (Node `ws`) and `broker_client.py`
//! (Python `websockets`), driven by the small scripts in `tests/clients/`,
//! with paho-mqtt on the MQTT side.
//!
//! By default the clients talk to `axion serve`, whose embedded bridge and
//! queue owner share the process with the broker: the product.
//! `AXION_BRIDGE_TEST_BROKER=mosquitto` runs every test with the standalone
//! `axion bridge --mqtt` (and `axion queues --mqtt` where tasks are needed)
//! against Mosquitto, the "any external broker" case; the `standalone_*`
//! tests always do.

mod common;

use common::spawn_axion as spawn;

use common::{axion_bin, free_port, http_get, Mosquitto, Proc, Serve};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A WebSocket bridge for one package, with the MQTT broker behind it.
struct Stack {
    ws_port: u16,
    mqtt_port: u16,
    package: String,
    kind: Kind,
}

enum Kind {
    /// `axion serve`: broker, bridge and queue owner in one process.
    Serve(Serve),
    /// `axion bridge` (and maybe `axion queues`) against Mosquitto.
    Standalone {
        bridge: Proc,
        /// Declared after `bridge` so the broker outlives it on drop.
        broker: Option<Mosquitto>,
        _owner: Option<(Proc, tempfile::TempDir)>,
    },
}

impl Stack {
    /// The default stack for a fresh package, with bridge flags `args`.
    fn start(args: &[&str]) -> Stack {
        if std::env::var("AXION_BRIDGE_TEST_BROKER").as_deref() == Ok("mosquitto") {
            Stack::standalone(args, false)
        } else {
            Stack::serve(args)
        }
    }

    fn serve(args: &[&str]) -> Stack {
        let package = format!("t{}", free_port());
        let mut all = vec!["--package", package.as_str()];
        all.extend(args);
        let serve = Serve::start_with(&all, &[]);
        wait_ready(serve.ws_port);
        Stack {
            ws_port: serve.ws_port,
            mqtt_port: serve.mqtt_port,
            package,
            kind: Kind::Serve(serve),
        }
    }

    /// `axion bridge` against a broker of the caller's on `mqtt_port`.
    fn standalone_on(mqtt_port: u16, args: &[&str]) -> Stack {
        let package = format!("t{}", free_port());
        let ws_port = free_port();
        let bridge = spawn(
            "axion bridge",
            Command::new(axion_bin())
                .args(["bridge", "--package", &package])
                .arg("--mqtt")
                .arg(format!("mqtt://127.0.0.1:{mqtt_port}"))
                .arg("--ws-listen")
                .arg(format!("127.0.0.1:{ws_port}"))
                .args(args),
        );
        wait_ready(ws_port);
        Stack {
            ws_port,
            mqtt_port,
            package,
            kind: Kind::Standalone {
                bridge,
                broker: None,
                _owner: None,
            },
        }
    }

    /// `axion bridge` against Mosquitto; `owner` adds `axion queues`.
    fn standalone(args: &[&str], owner: bool) -> Stack {
        Stack::standalone_on_mosquitto(Mosquitto::start(), args, owner)
    }

    fn standalone_on_mosquitto(broker: Mosquitto, args: &[&str], owner: bool) -> Stack {
        let package = format!("t{}", free_port());
        let url = broker.mqtt_url();
        let ws_port = free_port();
        let bridge = spawn(
            "axion bridge",
            Command::new(axion_bin())
                .args(["bridge", "--mqtt", &url, "--package", &package])
                .arg("--ws-listen")
                .arg(format!("127.0.0.1:{ws_port}"))
                .args(args),
        );
        let owner = owner.then(|| {
            let data = tempfile::tempdir().expect("tempdir");
            let proc = spawn(
                "axion queues",
                Command::new(axion_bin())
                    .args(["queues", "--mqtt", &url, "--package", &package])
                    .arg("--data-dir")
                    .arg(data.path()),
            );
            (proc, data)
        });
        wait_ready(ws_port);
        Stack {
            ws_port,
            mqtt_port: broker.port,
            package,
            kind: Kind::Standalone {
                bridge,
                broker: Some(broker),
                _owner: owner,
            },
        }
    }

    fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.ws_port)
    }

    fn stats(&self) -> serde_json::Value {
        let (_, body) = http_get(self.ws_port, "/stats").expect("GET /stats");
        serde_json::from_str(&body).expect("stats JSON")
    }

    /// Peak resident memory of the process serving WebSocket clients
    /// (with `axion serve`, the broker's memory counts too), in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let pid = match &self.kind {
            Kind::Serve(s) => s.proc.pid(),
            Kind::Standalone { bridge, .. } => bridge.pid(),
        };
        let status =
            std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM")
    }
}

/// Waits until the bridge says it is connected to its broker.
fn wait_ready(ws_port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(ws_port, "/health/ready").map(|(s, _)| s) != Some(200) {
        assert!(Instant::now() < deadline, "bridge not ready within 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// Runs a driver script to completion and returns its JSON summary line.
fn run_driver(program: &str, args: &[String], timeout: Duration) -> serde_json::Value {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(clients_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("driver output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({:?}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON summary from {program}: {stdout}"));
    serde_json::from_str(line).expect("summary JSON")
}

fn node(scenario: &str, stack: &Stack, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["js_driver.js".to_string(), scenario.into(), stack.ws_url()];
    a.extend(args.iter().map(|s| s.to_string()));
    run_driver("node", &a, Duration::from_secs(90))
}

fn python(scenario: &str, stack: &Stack) -> serde_json::Value {
    let a = vec![
        "py_driver.py".to_string(),
        scenario.into(),
        stack.ws_url(),
        "127.0.0.1".into(),
        stack.mqtt_port.to_string(),
        stack.package.clone(),
    ];
    run_driver("python3", &a, Duration::from_secs(60))
}

#[test]
fn js_client_pubsub_order_unsubscribe_replies_and_wildcards() {
    let stack = Stack::start(&[]);
    let out = node("pubsub", &stack, &["1000"]);
    assert_eq!(out["delivered"], 1000, "{out}");
    // The legacy broker sent a publisher its own events when subscribed.
    assert_eq!(out["own"], 1000, "{out}");
    assert_eq!(out["reply"]["payload"]["answer"], 42);
}

#[test]
fn python_client_to_and_from_plain_mqtt() {
    let stack = Stack::start(&[]);
    let out = python("mqtt", &stack);
    assert_eq!(out["ordered"], 300, "{out}");
}

#[test]
fn malformed_frames_get_errors_and_the_connection_keeps_working() {
    let stack = Stack::start(&[]);
    let out = python("bad", &stack);
    assert_eq!(out["after"]["payload"], "still here", "{out}");
    let stats = stack.stats();
    assert!(
        stats["bad_frames"].as_u64().unwrap_or(0) >= out["frames"].as_u64().unwrap_or(u64::MAX)
    );
    assert_eq!(stats["mqtt_connected"], true);
}

#[test]
fn slow_consumer_is_dropped_while_a_healthy_one_gets_every_event() {
    slow_consumer(Stack::start(SLOW_CONSUMER_FLAGS));
}

/// The bridge's own slow-consumer handling, against an external broker.
#[test]
fn standalone_slow_consumer_is_dropped_while_a_healthy_one_gets_every_event() {
    slow_consumer(Stack::standalone(SLOW_CONSUMER_FLAGS, false));
}

/// Small queues, and a stalled client dropped after holding its publisher
/// back for half a second.
const SLOW_CONSUMER_FLAGS: &[&str] = &[
    "--ws-client-queue-frames",
    "2048",
    "--ws-slow-consumer-ms",
    "500",
];

fn slow_consumer(stack: Stack) {
    let before = stack.peak_rss_kib();
    let out = node("slow", &stack, &["20000", "1024"]);
    assert_eq!(out["delivered"], 20000, "{out}");
    let stats = stack.stats();
    assert!(stats["slow_consumers"].as_u64() >= Some(1), "{stats}");
    let after = stack.peak_rss_kib();
    eprintln!(
        "slow-consumer flood: 20000 x 1 KiB in {} s; peak RSS {before} KiB before, {after} KiB after",
        out["secs"]
    );
    // 20 MB went through; a bounded bridge holds a small part of it.
    assert!(after < 150 * 1024, "peak RSS {after} KiB");
}

/// Readiness follows the connection to an external broker (inside
/// `axion serve` the broker cannot go away without the bridge).
#[test]
fn standalone_health_endpoints_follow_the_mqtt_connection() {
    let mut stack = Stack::standalone(&[], false);
    assert_eq!(
        http_get(stack.ws_port, "/health/live").map(|r| r.0),
        Some(200)
    );
    assert_eq!(
        http_get(stack.ws_port, "/health/ready").map(|r| r.0),
        Some(200)
    );
    if let Kind::Standalone { broker, .. } = &mut stack.kind {
        drop(broker.take());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(stack.ws_port, "/health/ready").map(|r| r.0) != Some(503) {
        assert!(
            Instant::now() < deadline,
            "ready did not turn 503 without a broker"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        http_get(stack.ws_port, "/health/live").map(|r| r.0),
        Some(200)
    );
}

#[test]
fn task_actions_through_the_queue_owner() {
    let stack = if std::env::var("AXION_BRIDGE_TEST_BROKER").as_deref() == Ok("mosquitto") {
        Stack::standalone(&[], true)
    } else {
        Stack::serve(&[])
    };
    task_actions(&stack);
}

/// `axion bridge` and `axion queues`, each on its own against Mosquitto,
/// keep the contract together.
#[test]
fn standalone_task_actions_through_axion_queues_on_mosquitto() {
    task_actions(&Stack::standalone(&[], true));
}

/// A broker may accept an enqueue and then drop it: Mosquitto drops what
/// no subscriber takes (and QoS 1 messages past a subscriber's
/// `max_queued_messages`). Here the queue owner is down while a legacy
/// producer floods 400 enqueues, so the broker drops every one; the bridge
/// publishes each again under the same id until the owner, once up,
/// confirms it, and the worker gets all 400, each once.
#[test]
fn enqueues_the_broker_dropped_are_published_again_until_confirmed() {
    let stack = Stack::standalone(&[], false);
    let Kind::Standalone { broker, .. } = &stack.kind else {
        unreachable!("a standalone stack")
    };
    let url = broker.as_ref().map(Mosquitto::mqtt_url).unwrap_or_default();
    let ws = stack.ws_url();
    let driver = std::thread::spawn(move || {
        let args: Vec<String> = ["js_driver.js", "flood", &ws, "flood.q", "400"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        run_driver("node", &args, Duration::from_secs(90))
    });
    let stats = || -> serde_json::Value {
        http_get(stack.ws_port, "/stats")
            .and_then(|(_, body)| serde_json::from_str(&body).ok())
            .unwrap_or_default()
    };
    // Every enqueue went to a broker with no owner and is published again
    // (after 3 s unconfirmed) before the owner even starts. Waiting for
    // the bridge to have read them is not enough: a publish still on its
    // way when the owner subscribes would be taken the first time.
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats()["enqueue_retries"].as_u64().unwrap_or(0) < 400 {
        assert!(
            Instant::now() < deadline,
            "the bridge did not publish the flood again: {}",
            stats()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let data = tempfile::tempdir().expect("tempdir");
    let _owner = spawn(
        "axion queues",
        Command::new(axion_bin())
            .args(["queues", "--mqtt", &url, "--package", &stack.package])
            .arg("--data-dir")
            .arg(data.path()),
    );
    let out = driver.join().expect("driver thread");
    assert_eq!(out["received"], 400, "{out}");
    assert_eq!(out["confirmed"], 400, "{out}");
    assert_eq!(out["duplicates"], 0, "{out}");
}

fn task_actions(stack: &Stack) {
    let out = node("tasks", stack, &["jobs.test"]);
    assert_eq!(
        out["confirmations"].as_array().map(Vec::len),
        Some(2),
        "{out}"
    );
    assert_eq!(out["confirmations"][0]["queue"], "jobs.test");
}

/// One of the legacy Node brokers (`tests/clients/<script>`) on a
/// free port, its per-event console logging sent to /dev/null.
struct LegacyBroker {
    proc: Proc,
    port: u16,
}

impl LegacyBroker {
    fn start(script: &str) -> LegacyBroker {
        let port = free_port();
        let child = Command::new("node")
            .arg(script)
            .env("PORT", port.to_string())
            .current_dir(clients_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn node {script}: {e}"));
        common::wait_for_port(port, Duration::from_secs(10));
        LegacyBroker {
            proc: Proc {
                child,
                name: script.into(),
            },
            port,
        }
    }
}

/// One way of carrying the benchmark's events, and the processes whose
/// CPU time is the broker's side of it.
struct Target {
    name: &'static str,
    /// Arguments of `bench.js` naming where to connect.
    args: Vec<String>,
    pids: Vec<u32>,
}

type Case<'a> = (&'a str, Vec<&'a str>, Vec<Target>);

/// A benchmark setting from the environment, or its default.
fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs every case on each of its targets `rounds` times (targets take
/// turns, starting from a different one each round) and prints one
/// Markdown row of medians per case and target.
fn run_cases(cases: &[Case], rounds: usize) {
    println!("| case | carried by | delivered | events/s | p50 ms | p99 ms | broker CPU µs/event | driver CPU µs/event |");
    println!("|---|---|---|---|---|---|---|---|");
    for (case, args, targets) in cases {
        let mut runs: Vec<Vec<serde_json::Value>> = targets.iter().map(|_| Vec::new()).collect();
        for round in 0..rounds {
            // Targets take turns, starting from a different one each round.
            for k in 0..targets.len() {
                let i = (k + round) % targets.len();
                let t = &targets[i];
                let pids: Vec<String> = t.pids.iter().map(u32::to_string).collect();
                let mut a = vec!["bench.js".to_string()];
                a.extend(t.args.iter().cloned());
                a.extend(args.iter().map(|s| s.to_string()));
                a.extend(["--pids".to_string(), pids.join(",")]);
                let out = run_driver("node", &a, Duration::from_secs(300));
                eprintln!("{case} | {} | {out}", t.name);
                runs[i].push(out);
            }
        }
        for (t, outs) in targets.iter().zip(&runs) {
            let median = |f: &dyn Fn(&serde_json::Value) -> f64| {
                let mut v: Vec<f64> = outs.iter().map(f).collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let per_event = |v: &serde_json::Value, ms: f64| {
                ms * 1000.0 / v["delivered"].as_f64().unwrap_or(1.0).max(1.0)
            };
            let delivered = median(&|v| v["delivered"].as_f64().unwrap_or(0.0));
            let expected = outs[0]["expected"].as_u64().unwrap_or(0);
            // Queue runs: tasks seen twice, and enqueues confirmed on disk.
            let extra = match outs[0]["confirmed"].as_u64() {
                Some(c) => format!(
                    " ({:.0} twice, {c} confirmed)",
                    median(&|v| v["duplicates"].as_f64().unwrap_or(0.0))
                ),
                None if outs[0]["duplicates"].is_number() && t.name.contains("legacy") => {
                    " (none confirmed)".to_string()
                }
                None => String::new(),
            };
            println!(
                "| {case} | {} | {delivered}/{expected}{extra} | {:.0} | {:.2} | {:.2} | {:.1} | {:.1} |",
                t.name,
                median(&|v| v["events_per_sec"].as_f64().unwrap_or(0.0)),
                median(&|v| v["p50_ms"].as_f64().unwrap_or(f64::NAN)),
                median(&|v| v["p99_ms"].as_f64().unwrap_or(f64::NAN)),
                median(&|v| per_event(v, v["cpu_ms"]["broker"].as_f64().unwrap_or(0.0))),
                median(&|v| per_event(
                    v,
                    v["cpu_ms"]["sender"].as_f64().unwrap_or(0.0)
                        + v["cpu_ms"]["receivers"].as_f64().unwrap_or(0.0)
                )),
            );
        }
    }
}

/// Benchmark, not a test: the legacy work-queue protocol over WebSocket
/// (`enqueue` → `{task}` → `ack` + `ready`), through Axion (durable: every
/// task committed to disk before its `enqueued` reply, inside `axion serve`
/// and as `axion bridge` + `axion queues` beside Mosquitto) and through the
/// legacy broker with the in-memory queue manager its code calls
/// (`tests/clients/legacy_queue_broker.js`; nothing on disk). One load
/// driver (`bench.js --queue`): a producer process and a worker process
/// holding `--credits` readies; tasks/s end to end flat out, and
/// enqueue-to-delivery latency at a fixed 2 000 tasks/s (the reference rate
/// of the durable-queue comparisons).
///
/// `cargo test --release --test bridge -- --ignored --nocapture bench_queue`
#[test]
#[ignore = "benchmark; run with --ignored --nocapture"]
fn bench_queue_over_websocket_vs_legacy_queue() {
    let rounds = env_usize("AXION_BENCH_ROUNDS", 3);
    let tasks = env_usize("AXION_BENCH_EVENTS", 20_000);
    let legacy = LegacyBroker::start("legacy_queue_broker.js");
    let serve = Stack::serve(&[]);
    let standalone = Stack::standalone(&[], true);
    let mut standalone_pids = Vec::new();
    if let Kind::Standalone {
        bridge,
        broker,
        _owner,
    } = &standalone.kind
    {
        standalone_pids.push(bridge.pid());
        standalone_pids.extend(_owner.iter().map(|(owner, _)| owner.pid()));
        standalone_pids.extend(broker.iter().map(|m| m.proc.pid()));
    }
    let serve_pid = match &serve.kind {
        Kind::Serve(s) => s.proc.pid(),
        Kind::Standalone { .. } => unreachable!("a serve stack"),
    };
    let targets = || {
        vec![
            Target {
                name: "axion serve (bridge, durable)",
                args: vec!["--url".into(), serve.ws_url()],
                pids: vec![serve_pid],
            },
            Target {
                name: "axion bridge + queues + Mosquitto (durable)",
                args: vec!["--url".into(), standalone.ws_url()],
                pids: standalone_pids.clone(),
            },
            Target {
                name: "legacy broker, in-memory queue",
                args: vec!["--url".into(), format!("ws://127.0.0.1:{}", legacy.port)],
                pids: vec![legacy.proc.pid()],
            },
        ]
    };
    let n = tasks.to_string();
    let cases: Vec<Case> = vec![
        (
            "tasks, max, 1 worker × 256 readies",
            vec!["--queue", "bench.q", "--events", &n, "--credits", "256"],
            targets(),
        ),
        (
            "tasks, 2 000/s, 1 worker × 256 readies",
            vec![
                "--queue",
                "bench.r",
                "--events",
                "10000",
                "--rate",
                "2000",
                "--credits",
                "256",
            ],
            targets(),
        ),
    ];
    run_cases(&cases, rounds);
}

/// Benchmark, not a test: delivered events/s flat out and latency at a
/// fixed 10k events/s, through the bridge (inside `axion serve`, and
/// `axion bridge` beside Mosquitto), the legacy Node broker, and
/// direct MQTT on the same brokers, side by side in one run with one load
/// driver (`tests/clients/bench.js`: a sender process and one process per
/// subscriber). Prints the median of `AXION_BENCH_ROUNDS` (3) runs per case,
/// targets taking turns in each round.
///
/// `cargo test --release --test bridge -- --ignored --nocapture bench_`
#[test]
#[ignore = "benchmark; run with --ignored --nocapture"]
fn bench_websocket_bridge_vs_legacy_broker_vs_direct_mqtt() {
    let rounds = env_usize("AXION_BENCH_ROUNDS", 3);
    let events = env_usize("AXION_BENCH_EVENTS", 100_000);
    let legacy = LegacyBroker::start("legacy_broker.js");
    let serve = Stack::serve(&[]);
    // Mosquitto as the MQTT broker benchmark configures it (TCP_NODELAY on:
    // its default Nagle delays a quiet stream of small messages by up to
    // 40 ms), declared before the bridge so that it outlives it.
    let mosquitto_dir = tempfile::tempdir().expect("tempdir");
    let mosquitto_port = free_port();
    let conf = mosquitto_dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {mosquitto_port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_queued_messages 0\nmax_inflight_messages 100\nset_tcp_nodelay true\n"
        ),
    )
    .expect("write mosquitto.conf");
    let mosquitto = Proc {
        child: Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto"),
        name: "mosquitto".into(),
    };
    common::wait_for_port(mosquitto_port, Duration::from_secs(10));
    let standalone = Stack::standalone_on(mosquitto_port, &[]);
    let bridge_pid = match &standalone.kind {
        Kind::Standalone { bridge, .. } => bridge.pid(),
        Kind::Serve(_) => unreachable!("a standalone stack"),
    };
    let serve_pid = match &serve.kind {
        Kind::Serve(s) => s.proc.pid(),
        Kind::Standalone { .. } => unreachable!("a serve stack"),
    };
    let ws = |stack: &Stack| vec!["--url".to_string(), stack.ws_url()];
    let mqtt = |flag: &str, stack: &Stack| {
        vec![
            flag.to_string(),
            format!("127.0.0.1:{}", stack.mqtt_port),
            "--package".into(),
            stack.package.clone(),
        ]
    };
    let legacy_target = Target {
        name: "legacy Node broker",
        args: vec!["--url".into(), format!("ws://127.0.0.1:{}", legacy.port)],
        pids: vec![legacy.proc.pid()],
    };
    let ws_to_ws = || {
        vec![
            Target {
                name: "axion serve (bridge)",
                args: ws(&serve),
                pids: vec![serve_pid],
            },
            Target {
                name: "axion bridge + Mosquitto",
                args: ws(&standalone),
                pids: vec![bridge_pid, mosquitto.pid()],
            },
            Target {
                name: legacy_target.name,
                args: legacy_target.args.clone(),
                pids: legacy_target.pids.clone(),
            },
            Target {
                name: "direct MQTT, axion serve",
                args: mqtt("--mqtt", &serve),
                pids: vec![serve_pid],
            },
            Target {
                name: "direct MQTT, Mosquitto",
                args: mqtt("--mqtt", &standalone),
                pids: vec![mosquitto.pid()],
            },
        ]
    };
    let mqtt_to_ws = || {
        vec![
            Target {
                name: "axion serve (bridge)",
                args: [ws(&serve), mqtt("--send-mqtt", &serve)].concat(),
                pids: vec![serve_pid],
            },
            Target {
                name: "axion bridge + Mosquitto",
                args: [ws(&standalone), mqtt("--send-mqtt", &standalone)].concat(),
                pids: vec![bridge_pid, mosquitto.pid()],
            },
        ]
    };
    let n = events.to_string();
    let half = (events / 2).to_string();
    let cases: Vec<Case> = vec![
        (
            "WS → WS, max, 1 subscriber",
            vec!["--events", &n, "--receivers", "1"],
            ws_to_ws(),
        ),
        (
            "WS → WS, max, 4 subscribers",
            vec!["--events", &half, "--receivers", "4"],
            ws_to_ws(),
        ),
        (
            "WS → WS, 10k events/s, 1 subscriber",
            vec!["--events", "30000", "--rate", "10000", "--receivers", "1"],
            ws_to_ws(),
        ),
        (
            "MQTT → WS, max, 1 subscriber",
            vec!["--events", &n, "--receivers", "1"],
            mqtt_to_ws(),
        ),
        (
            "MQTT → WS, 10k events/s, 1 subscriber",
            vec!["--events", "30000", "--rate", "10000", "--receivers", "1"],
            mqtt_to_ws(),
        ),
    ];

    run_cases(&cases, rounds);
}

/// RFC 6455 §5.5.1: a client's Close frame is answered with one, so a
/// clean disconnect is seen as 1000 by the client, not 1006 (no close
/// frame received). Python `websockets` reports what came back.
#[test]
fn a_clients_close_frame_is_answered() {
    let serve = Serve::start();
    let script = format!(
        r#"
import asyncio, websockets
async def main():
    ws = await websockets.connect("ws://127.0.0.1:{}/")
    await ws.close()
    print(ws.close_code)
asyncio.run(main())
"#,
        serve.ws_port
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3 with websockets (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1000");
}
