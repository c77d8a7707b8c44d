//! End-to-end tests of the legacy WebSocket bridge (`axion bridge`) with the
//! seeds' own clients, unchanged: `brokerClient.js` (Node `ws`) and
//! `broker_client.py` (Python `websockets`), driven by the small scripts in
//! `tests/clients/`, with paho-mqtt on the MQTT side.
//!
//! The MQTT broker is a parameter: `AXION_BRIDGE_TEST_BROKER=serve` runs
//! the bridge against `axion serve`; the default is Mosquitto, the "any
//! external broker" case.

mod common;

use common::{axion_bin, free_port, Mosquitto, Proc, Serve};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

enum Broker {
    Mosquitto(Mosquitto),
    Serve(Serve),
}

impl Broker {
    /// `package` matters to `axion serve`, whose queue owner serves one.
    fn start(package: &str) -> Self {
        match std::env::var("AXION_BRIDGE_TEST_BROKER").as_deref() {
            Ok("serve") => Broker::Serve(Serve::start_with(&["--package", package], &[])),
            _ => Broker::Mosquitto(Mosquitto::start()),
        }
    }

    fn port(&self) -> u16 {
        match self {
            Broker::Mosquitto(m) => m.port,
            Broker::Serve(s) => s.mqtt_port,
        }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port())
    }
}

struct BridgeProc {
    proc: Proc,
    port: u16,
    package: String,
}

impl BridgeProc {
    fn start(broker: &Broker, package: &str, extra: &[&str]) -> Self {
        let port = free_port();
        let package = package.to_string();
        let child = Command::new(axion_bin())
            .arg("bridge")
            .arg("--mqtt")
            .arg(broker.url())
            .arg("--ws-listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--package")
            .arg(&package)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("AXION_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if std::env::var("AXION_TEST_LOG").is_ok() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("spawn axion bridge");
        let bridge = BridgeProc {
            proc: Proc {
                child,
                name: "axion bridge".into(),
            },
            port,
            package,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_get(port, "/health/ready").map(|(s, _)| s) != Some(200) {
            assert!(Instant::now() < deadline, "bridge not ready within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        bridge
    }

    fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    fn stats(&self) -> serde_json::Value {
        let (_, body) = http_get(self.port, "/stats").expect("GET /stats");
        serde_json::from_str(&body).expect("stats JSON")
    }

    /// Peak resident memory of the bridge process, in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid()))
            .expect("read /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM")
    }
}

/// A tiny HTTP/1.1 GET: status code and body.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
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

fn node(scenario: &str, bridge: &BridgeProc, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["js_driver.js".to_string(), scenario.into(), bridge.ws_url()];
    a.extend(args.iter().map(|s| s.to_string()));
    run_driver("node", &a, Duration::from_secs(90))
}

fn python(scenario: &str, bridge: &BridgeProc, broker: &Broker) -> serde_json::Value {
    let a = vec![
        "py_driver.py".to_string(),
        scenario.into(),
        bridge.ws_url(),
        "127.0.0.1".into(),
        broker.port().to_string(),
        bridge.package.clone(),
    ];
    run_driver("python3", &a, Duration::from_secs(60))
}

#[test]
fn js_client_pubsub_order_unsubscribe_replies_and_wildcards() {
    let package = format!("t{}", free_port());
    let broker = Broker::start(&package);
    let bridge = BridgeProc::start(&broker, &package, &[]);
    let out = node("pubsub", &bridge, &["1000"]);
    assert_eq!(out["delivered"], 1000, "{out}");
    // The legacy broker sent a publisher its own events when subscribed.
    assert_eq!(out["own"], 1000, "{out}");
    assert_eq!(out["reply"]["payload"]["answer"], 42);
}

#[test]
fn python_client_to_and_from_plain_mqtt() {
    let package = format!("t{}", free_port());
    let broker = Broker::start(&package);
    let bridge = BridgeProc::start(&broker, &package, &[]);
    let out = python("mqtt", &bridge, &broker);
    assert_eq!(out["ordered"], 300, "{out}");
}

#[test]
fn malformed_frames_get_errors_and_the_connection_keeps_working() {
    let package = format!("t{}", free_port());
    let broker = Broker::start(&package);
    let bridge = BridgeProc::start(&broker, &package, &[]);
    let out = python("bad", &bridge, &broker);
    assert_eq!(out["after"]["payload"], "still here", "{out}");
    let stats = bridge.stats();
    assert!(
        stats["bad_frames"].as_u64().unwrap_or(0) >= out["frames"].as_u64().unwrap_or(u64::MAX)
    );
    assert_eq!(stats["mqtt_connected"], true);
}

#[test]
fn slow_consumer_is_dropped_while_a_healthy_one_gets_every_event() {
    let package = format!("t{}", free_port());
    let broker = Broker::start(&package);
    let bridge = BridgeProc::start(&broker, &package, &["--ws-client-queue-frames", "2048"]);
    let before = bridge.peak_rss_kib();
    let out = node("slow", &bridge, &["20000", "1024"]);
    assert_eq!(out["delivered"], 20000, "{out}");
    let stats = bridge.stats();
    assert!(stats["slow_consumers"].as_u64() >= Some(1), "{stats}");
    let after = bridge.peak_rss_kib();
    eprintln!(
        "slow-consumer flood: 20000 x 1 KiB in {} s; bridge peak RSS {before} KiB before, {after} KiB after",
        out["secs"]
    );
    // 20 MB went through; a bounded bridge holds a small part of it.
    assert!(after < 150 * 1024, "bridge peak RSS {after} KiB");
}

#[test]
fn health_endpoints_follow_the_mqtt_connection() {
    let package = format!("t{}", free_port());
    let broker = Broker::start(&package);
    let bridge = BridgeProc::start(&broker, &package, &[]);
    assert_eq!(
        http_get(bridge.port, "/health/live").map(|r| r.0),
        Some(200)
    );
    assert_eq!(
        http_get(bridge.port, "/health/ready").map(|r| r.0),
        Some(200)
    );
    drop(broker);
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(bridge.port, "/health/ready").map(|r| r.0) != Some(503) {
        assert!(
            Instant::now() < deadline,
            "ready did not turn 503 without a broker"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        http_get(bridge.port, "/health/live").map(|r| r.0),
        Some(200)
    );
}

#[test]
fn task_actions_through_the_queue_owner() {
    let package = format!("t{}", free_port());
    let broker = Broker::start(&package);
    let data = tempfile::tempdir().expect("tempdir");
    let bridge = BridgeProc::start(&broker, &package, &[]);
    // `axion serve` owns queues itself; with Mosquitto run the owner alone.
    let _owner = match &broker {
        Broker::Mosquitto(_) => Some(Proc {
            child: Command::new(axion_bin())
                .args([
                    "queues",
                    "--mqtt",
                    &broker.url(),
                    "--package",
                    &bridge.package,
                ])
                .arg("--data-dir")
                .arg(data.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn axion queues"),
            name: "axion queues".into(),
        }),
        Broker::Serve(_) => None,
    };
    let out = node("tasks", &bridge, &["jobs.test"]);
    assert_eq!(
        out["confirmations"].as_array().map(Vec::len),
        Some(2),
        "{out}"
    );
    assert_eq!(out["confirmations"][0]["queue"], "jobs.test");
}
