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

use common::{axion_bin, http_get, unique_name, Listening, Mosquitto, Proc, Serve};
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
        bridge: Listening,
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

    /// The default stack with a queue owner (`axion queues` beside a
    /// standalone bridge).
    fn with_owner() -> Stack {
        if std::env::var("AXION_BRIDGE_TEST_BROKER").as_deref() == Ok("mosquitto") {
            Stack::standalone(&[], true)
        } else {
            Stack::serve(&[])
        }
    }

    fn serve(args: &[&str]) -> Stack {
        let package = unique_name("t");
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

    /// `axion bridge` against Mosquitto; `owner` adds `axion queues`.
    fn standalone(args: &[&str], owner: bool) -> Stack {
        Stack::standalone_on_mosquitto(Mosquitto::start(), args, owner)
    }

    fn standalone_on_mosquitto(broker: Mosquitto, args: &[&str], owner: bool) -> Stack {
        let package = unique_name("t");
        let url = broker.mqtt_url();
        let bridge = common::spawn_listening(
            "axion bridge",
            Command::new(axion_bin())
                .args(["bridge", "--mqtt", &url, "--package", &package])
                .args(["--ws-listen", "127.0.0.1:0"])
                .args(args),
        );
        let ws_port = bridge.port(axion_wire::ports::WS);
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
            Kind::Standalone { bridge, .. } => bridge.proc.pid(),
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

/// Events only WebSocket clients read stay in `axion serve`'s process; an
/// MQTT subscriber of any kind gets the first event after its SUBACK, and
/// a kept session away still has events published for it.
#[test]
fn events_nobody_reads_on_mqtt_stay_with_the_bridge_until_somebody_does() {
    let stack = Stack::start(&[]);
    let out = python("local", &stack);
    assert_eq!(
        out["heard"],
        serde_json::json!(["exact", "wildcard", "shared"]),
        "{out}"
    );
    assert!(out["published_for_away"].as_u64() >= Some(1), "{out}");
    let (published, kept) = (&out["alone"]["published"], &out["alone"]["kept"]);
    match stack.kind {
        Kind::Serve(_) => {
            assert_eq!(published, 0, "{out}");
            assert!(kept.as_u64() >= Some(50), "{out}");
            assert_eq!(out["again"], true, "{out}");
        }
        // A broker the bridge cannot see into gets every event.
        Kind::Standalone { .. } => {
            assert!(published.as_u64() >= Some(50), "{out}");
            assert_eq!(kept, 0, "{out}");
        }
    }
}

/// The bridge's MQTT session ends (another client takes its id over, the
/// one way a broker ends a healthy session): the bridge connects again,
/// subscribes again, and a WebSocket subscription made before still gets
/// MQTT events.
#[test]
fn the_bridge_connects_again_and_resubscribes_after_its_mqtt_session_ends() {
    use common::mqtt::{recv, V5};
    use std::io::{BufRead, BufReader, Write};
    let stack = Stack::start(&[]);
    let mut driver = Command::new("python3")
        .args(["py_driver.py", "resubscribe", &stack.ws_url(), "127.0.0.1"])
        .arg(stack.mqtt_port.to_string())
        .arg(&stack.package)
        .current_dir(clients_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    let mut lines = BufReader::new(driver.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("read");
    assert!(first.contains("ready"), "{first}");

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        // The bridge's client id is the worker id of its heartbeat.
        let mut reader = V5::connect(stack.mqtt_port, "heartbeat-reader").await;
        let filter = format!("axion/{}/heartbeat/bridge/+", stack.package);
        reader.subscribe(&filter, 0).await;
        let record: serde_json::Value =
            serde_json::from_slice(&recv(&mut reader.rx, 10).await.payload).expect("JSON");
        let id = record["worker"].as_str().expect("worker id").to_string();
        let connects = stack.stats()["mqtt_connects"].as_u64().unwrap_or(0);
        let thief = V5::connect(stack.mqtt_port, &id).await;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let stats = stack.stats();
            if stats["mqtt_connects"].as_u64() > Some(connects) && stats["mqtt_connected"] == true {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the bridge did not connect again: {stats}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        thief.kill().await;
    });
    driver
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("write");
    let status = driver.wait().expect("wait");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(status.success(), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("\"ok\"")), "{rest:?}");
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
    task_actions(&Stack::with_owner());
}

/// The first pull on a queue subscribes the bridge to its tasks and says
/// ready in the same breath: the task waiting there comes at once. (In
/// `axion serve` the ready reaches the queue owner through the broker's
/// tap; it must not overtake the subscription on its way to the router.)
#[test]
fn the_first_pull_on_a_queue_gets_its_waiting_task_at_once() {
    let stack = Stack::with_owner();
    let out = python("first_pulls", &stack);
    assert_eq!(out["rounds"], 20, "{out}");
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
