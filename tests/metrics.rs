//! `GET /metrics` and the `$SYS/broker/…` topics, end to end: real `axion
//! serve` and `axion bridge` processes, scraped over HTTP and read by
//! Prometheus's reference parser (Python `prometheus_client`, run as a
//! subprocess: `tests/prom_parse.py`), and Mosquitto's own clients on
//! `$SYS`. Every wait is for an event (a SUBACK, a delivery, a value that
//! moved), bounded.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::mqtt::{recv, V4, V5};
use common::{axion_bin, http_get, spawn_listening, wait_until, Mosquitto, Serve};
use serde_json::{json, Value};

/// `$SYS` rounds in these tests: one a second, not Mosquitto's ten.
const SYS_EVERY: &[&str] = &["--sys-interval-secs", "1"];

/// One scrape as the reference parser read it.
struct Scrape(serde_json::Map<String, Value>);

fn scrape(port: u16) -> Scrape {
    let (status, body) = http_get(port, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    parse(&body)
}

fn parse(text: &str) -> Scrape {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/prom_parse.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3 (scripts/setup.sh installs prometheus-client)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write the scrape");
    let out = child.wait_with_output().expect("parser output");
    assert!(
        out.status.success(),
        "the Prometheus parser refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).expect("parser prints JSON") {
        Value::Object(families) => Scrape(families),
        other => panic!("not a map of families: {other}"),
    }
}

impl Scrape {
    /// The value of sample `name` whose labels include `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0.values().find_map(|family| {
            family["samples"].as_array()?.iter().find_map(|s| {
                let matches =
                    s[0] == name && labels.iter().all(|(k, v)| s[1][*k].as_str() == Some(*v));
                matches.then(|| s[2].as_f64()).flatten()
            })
        })
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name} {labels:?} in the scrape"))
    }

    fn has_family(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_with_traffic() {
    let serve = Serve::start();
    let before = scrape(serve.ws_port);
    for (name, family) in &before.0 {
        assert!(name.starts_with("axion_"), "{name}");
        assert!(
            !family["help"].as_str().unwrap_or_default().is_empty(),
            "{name} has no HELP"
        );
        assert!(
            ["counter", "gauge", "histogram"].contains(&family["type"].as_str().unwrap_or("")),
            "{name}: {}",
            family["type"]
        );
    }
    for family in [
        "axion_broker_connections",
        "axion_broker_sessions_connected",
        "axion_broker_sessions_kept",
        "axion_broker_sessions_away",
        "axion_broker_messages_received",
        "axion_broker_messages_sent",
        "axion_broker_received_bytes",
        "axion_broker_sent_bytes",
        "axion_broker_connections_refused",
        "axion_broker_subscriptions_refused",
        "axion_broker_slow_consumers_disconnected",
        "axion_broker_messages_dropped",
        "axion_broker_retained_messages",
        "axion_queue_depth",
        "axion_queue_latency_seconds",
        "axion_bridge_clients",
        "axion_bridge_frames_received",
        "axion_bridge_frames_sent",
        "axion_bridge_slow_consumers_disconnected",
    ] {
        assert!(before.has_family(family), "no {family} in the scrape");
    }
    const N: usize = 50;
    const SIZE: usize = 100;
    let mut sub = V4::connect(serve.mqtt_port, "metrics-sub").await;
    sub.subscribe("metrics/t", 1).await;
    let publisher = V4::connect(serve.mqtt_port, "metrics-pub").await;
    for _ in 0..N {
        publisher
            .publish("metrics/t", &[b'x'; SIZE], 1, false)
            .await;
    }
    for _ in 0..N {
        recv(&mut sub.rx, 10).await;
    }
    // A write is counted once it has returned, which may be just after the
    // subscriber has read it.
    let after = wait_until(Duration::from_secs(5), "the last write counted", || {
        let s = scrape(serve.ws_port);
        let sent = s.value("axion_broker_messages_sent_total", &[])
            - before.value("axion_broker_messages_sent_total", &[]);
        (sent >= N as f64).then_some(s)
    });
    let grew = |name: &str| after.value(name, &[]) - before.value(name, &[]);
    assert!(grew("axion_broker_messages_received_total") >= N as f64);
    assert!(grew("axion_broker_messages_sent_total") >= N as f64);
    assert!(grew("axion_broker_received_bytes_total") >= (N * SIZE) as f64);
    assert!(grew("axion_broker_sent_bytes_total") >= (N * SIZE) as f64);
    assert!(grew("axion_broker_packets_received_total") >= (N + 2) as f64);
    assert!(grew("axion_broker_connections_total") >= 2.0);
    assert!(after.value("axion_broker_sessions_connected", &[]) >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_metrics_move_with_enqueues_and_acks() {
    const K: usize = 5;
    let serve = Serve::start();
    let url = axion_wire::BrokerUrls::parse(&serve.mqtt_url()).expect("url");
    let mut ops = axion_queues::ops::OpsClient::connect(&url, "default", Duration::from_secs(5))
        .await
        .expect("ops client");
    for i in 0..K {
        let task: axion_wire::queue::TaskRequest =
            serde_json::from_value(json!({ "payload": { "n": i } })).expect("task");
        ops.enqueue("mq", &task).await.expect("enqueue confirmed");
    }
    let queue = [("queue", "mq")];
    let waiting = wait_until(Duration::from_secs(10), "depth 5 in /metrics", || {
        let s = scrape(serve.ws_port);
        (s.get("axion_queue_depth", &queue) == Some(K as f64)).then_some(s)
    });
    assert_eq!(
        waiting.value("axion_queue_enqueued_total", &queue),
        K as f64
    );
    assert_eq!(
        waiting.value("axion_queue_latency_seconds_count", &queue),
        0.0
    );

    let mut worker = V5::connect(serve.mqtt_port, "mq-worker").await;
    worker
        .subscribe("$share/default.mq/axion/default/queue/mq/tasks", 1)
        .await;
    let ready = json!({ "worker": "mq-worker", "credits": K });
    worker
        .publish(
            "axion/default/queue/mq/ready",
            ready.to_string().as_bytes(),
            1,
            false,
        )
        .await;
    for _ in 0..K {
        let task = recv(&mut worker.rx, 10).await;
        let task: Value = serde_json::from_slice(&task.payload).expect("task record");
        let ack = json!({ "id": task["id"] });
        worker
            .publish(
                "axion/default/queue/mq/ack",
                ack.to_string().as_bytes(),
                1,
                false,
            )
            .await;
    }
    let done = wait_until(Duration::from_secs(10), "5 acks in /metrics", || {
        let s = scrape(serve.ws_port);
        (s.get("axion_queue_acked_total", &queue) == Some(K as f64)
            && s.get("axion_queue_latency_seconds_count", &queue) == Some(K as f64))
        .then_some(s)
    });
    assert_eq!(done.value("axion_queue_depth", &queue), 0.0);
    assert_eq!(done.value("axion_queue_inflight", &queue), 0.0);
    assert_eq!(done.value("axion_queue_dead", &queue), 0.0);
    assert_eq!(done.value("axion_queue_failed_total", &queue), 0.0);
    // Every ack is in some bucket up to +Inf, and took less than 10 s.
    let inf = done.0["axion_queue_latency_seconds"]["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .find(|s| s[0] == "axion_queue_latency_seconds_bucket" && s[1]["le"] == "+Inf")
        .map(|s| s[2].as_f64())
        .expect("+Inf bucket");
    assert_eq!(inf, Some(K as f64));
    assert_eq!(
        done.value(
            "axion_queue_latency_seconds_bucket",
            &[("queue", "mq"), ("le", "10")]
        ),
        K as f64
    );
    assert!(done.value("axion_queue_latency_seconds_sum", &queue) < 10.0 * K as f64);
}

/// `mosquitto_sub` with `args`, to completion: its stdout lines.
fn mosquitto_sub(port: u16, args: &[&str]) -> (bool, Vec<String>, String) {
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run mosquitto_sub (scripts/setup.sh installs it)");
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    (
        out.status.success(),
        lines,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn mosquitto_pub(port: u16, args: &[&str]) -> (bool, String) {
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run mosquitto_pub");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn is_uptime(payload: &str) -> Option<u64> {
    payload.strip_suffix(" seconds")?.parse().ok()
}

#[test]
fn sys_topics_show_the_mosquitto_subset() {
    let serve = Serve::start_with(SYS_EVERY, &[]);
    // The first round went out before any client connected: wait for one
    // after (the retained uptime, then the next).
    let (ok, lines, err) = mosquitto_sub(
        serve.mqtt_port,
        &["-t", "$SYS/broker/uptime", "-C", "2", "-W", "10"],
    );
    assert!(ok && lines.len() == 2, "{lines:?} {err}");
    // Retain flag, topic and payload, tab-separated: some topics hold a space.
    let (ok, lines, err) = mosquitto_sub(
        serve.mqtt_port,
        &["-t", "$SYS/#", "-C", "15", "-W", "10", "-F", "%r\t%t\t%p"],
    );
    assert!(ok, "mosquitto_sub: {err}");
    let values: std::collections::HashMap<&str, (&str, &str)> = lines
        .iter()
        .filter_map(|l| {
            let mut f = l.splitn(3, '\t');
            let (retain, topic, payload) = (f.next()?, f.next()?, f.next()?);
            Some((topic, (retain, payload)))
        })
        .collect();
    let number = |topic: &str| -> u64 {
        let (_, payload) = values
            .get(topic)
            .unwrap_or_else(|| panic!("no {topic} in {lines:?}"));
        payload
            .parse()
            .unwrap_or_else(|_| panic!("{topic}: {payload:?} is not a number"))
    };
    // What a new subscriber gets at once is the retained set.
    assert!(
        values.values().all(|(retain, _)| *retain == "1"),
        "{lines:?}"
    );
    let version = values["$SYS/broker/version"].1;
    assert!(version.starts_with("axion version "), "{version}");
    let uptime = values["$SYS/broker/uptime"].1;
    assert!(is_uptime(uptime).is_some(), "{uptime}");
    // mosquitto_sub itself, and Axion's own queue owner, bridge, heartbeat.
    assert!(number("$SYS/broker/clients/connected") >= 1);
    assert!(number("$SYS/broker/messages/received") > 0);
    assert!(number("$SYS/broker/messages/sent") > 0);
    assert!(number("$SYS/broker/bytes/received") > 0);
    assert!(number("$SYS/broker/bytes/sent") > 0);
    assert!(number("$SYS/broker/publish/messages/received") > 0);
    // The heartbeats' records at least, and the $SYS topics themselves.
    assert!(number("$SYS/broker/retained messages/count") >= 15);
    assert!(number("$SYS/broker/bytes/received") >= number("$SYS/broker/messages/received") * 2);
}

/// `mosquitto_sub` kept running, its stdout lines on a channel.
struct Watcher {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
}

impl Watcher {
    fn start(port: u16, args: &[&str]) -> Watcher {
        let mut child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run mosquitto_sub");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Watcher { child, lines }
    }

    /// Lines up to and including the first that satisfies `last`.
    fn until(&self, what: &str, last: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let done = last(&line);
                    seen.push(line);
                    if done {
                        return seen;
                    }
                }
                Err(_) => panic!("no {what} within 10 s; saw {seen:?}"),
            }
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_hash_subscription_never_sees_sys_topics() {
    let serve = Serve::start_with(SYS_EVERY, &[]);
    // `-d` prints the SUBACK; messages come as their topic alone.
    let all = Watcher::start(serve.mqtt_port, &["-t", "#", "-d", "-F", "%t"]);
    all.until("the SUBACK of '#'", |l| l.contains("received SUBACK"));
    // A `$SYS` subscriber that gets the retained uptime, then a new one:
    // a round of `$SYS` values went out after '#' was subscribed.
    let (ok, lines, err) = mosquitto_sub(
        serve.mqtt_port,
        &["-t", "$SYS/broker/uptime", "-C", "2", "-W", "10"],
    );
    assert!(ok && lines.len() == 2, "{lines:?} {err}");
    let (ok, out) = mosquitto_pub(serve.mqtt_port, &["-t", "metrics/marker", "-m", "end"]);
    assert!(ok, "{out}");
    let seen = all.until("the marker on '#'", |l| l == "metrics/marker");
    let sys: Vec<&String> = seen.iter().filter(|l| l.starts_with("$SYS")).collect();
    assert!(sys.is_empty(), "'#' received {sys:?}");
    // It did get ordinary traffic (the heartbeats' retained records).
    assert!(seen.iter().any(|l| l.starts_with("axion/")), "{seen:?}");
}

#[test]
fn sys_topics_are_read_only() {
    let serve = Serve::start_with(SYS_EVERY, &[]);
    let port = serve.mqtt_port;
    // MQTT 5, QoS 1: refused with 0x87 (not authorized).
    let (_, out) = mosquitto_pub(
        port,
        &[
            "-V",
            "5",
            "-q",
            "1",
            "-d",
            "-t",
            "$SYS/broker/uptime",
            "-m",
            "forged",
        ],
    );
    assert!(out.contains("RC:135"), "{out}");
    // MQTT 3.1.1, retained, QoS 0 and 1: dropped.
    for qos in ["0", "1"] {
        let (ok, out) = mosquitto_pub(
            port,
            &["-q", qos, "-r", "-t", "$SYS/broker/uptime", "-m", "forged"],
        );
        assert!(ok, "{out}");
    }
    // A will on `$SYS` is refused with the connection.
    let (ok, out) = mosquitto_pub(
        port,
        &[
            "--will-topic",
            "$SYS/broker/uptime",
            "--will-payload",
            "forged",
            "-t",
            "metrics/x",
            "-m",
            "x",
        ],
    );
    assert!(!ok && out.to_lowercase().contains("not authori"), "{out}");
    // The retained value and the next rounds are the broker's.
    let (ok, lines, err) =
        mosquitto_sub(port, &["-t", "$SYS/broker/uptime", "-C", "3", "-W", "10"]);
    assert!(ok, "{err}");
    let uptimes: Vec<u64> = lines
        .iter()
        .map(|l| is_uptime(l).unwrap_or_else(|| panic!("{l:?} in {lines:?}")))
        .collect();
    assert_eq!(uptimes.len(), 3);
    assert!(uptimes.windows(2).all(|w| w[0] <= w[1]), "{uptimes:?}");
    assert!(uptimes[2] > uptimes[0], "{uptimes:?}");
}

#[test]
fn reading_sys_follows_the_acls() {
    let pw = common::auth::hash_line("pw");
    let text = format!(
        r##"
[roles.ops]
subscribe = ["$SYS/#"]

[roles.app]
publish = ["#"]
subscribe = ["#"]

[users.ops]
{pw}
roles = ["ops"]

[users.app]
{pw}
roles = ["app"]
"##
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("auth.toml");
    std::fs::write(&path, text).expect("write auth file");
    let mut args = vec!["--auth-file", path.to_str().expect("utf-8 path")];
    args.extend_from_slice(SYS_EVERY);
    let serve = Serve::start_with(&args, &[]);
    let port = serve.mqtt_port;

    let (ok, lines, err) = mosquitto_sub(
        port,
        &[
            "-u",
            "ops",
            "-P",
            "pw",
            "-t",
            "$SYS/broker/uptime",
            "-C",
            "1",
            "-W",
            "10",
        ],
    );
    assert!(ok, "{err}");
    assert!(is_uptime(&lines[0]).is_some(), "{lines:?}");

    // '#' does not cover `$SYS`: the subscription is refused (SUBACK
    // 0x80, which mosquitto_sub prints with `-d`).
    let (_, lines, err) = mosquitto_sub(
        port,
        &[
            "-u", "app", "-P", "pw", "-t", "$SYS/#", "-C", "1", "-W", "3", "-d",
        ],
    );
    assert!(
        lines.iter().any(|l| l.ends_with("): 128")),
        "{lines:?} {err}"
    );
    assert!(!lines.iter().any(|l| l.starts_with("$SYS")), "{lines:?}");
    assert!(err.contains("denied"), "{err}");
}

#[test]
fn the_bridge_alone_serves_its_own_metrics() {
    let mosquitto = Mosquitto::start();
    let mut cmd = Command::new(axion_bin());
    cmd.args([
        "bridge",
        "--mqtt",
        &mosquitto.mqtt_url(),
        "--ws-listen",
        "127.0.0.1:0",
    ]);
    let bridge = spawn_listening("axion bridge", &mut cmd);
    let ws_port = bridge.port(axion_wire::ports::WS);
    wait_until(Duration::from_secs(20), "the bridge ready", || {
        (http_get(ws_port, "/health/ready").map(|(s, _)| s) == Some(200)).then_some(())
    });
    let before = scrape(ws_port);
    assert!(
        !before.0.keys().any(|k| k.starts_with("axion_broker_")),
        "{:?}",
        before.0.keys()
    );
    // One legacy client: a subscription and a frame that is not JSON,
    // which gets an error frame back.
    let client = r#"
import asyncio, json, sys, websockets
async def main():
    async with websockets.connect(sys.argv[1]) as ws:
        await ws.send(json.dumps({"action": "subscribe", "topic": "metrics.test"}))
        await ws.send("not json")
        print(await ws.recv())
asyncio.run(main())
"#;
    let out = Command::new("python3")
        .args(["-c", client, &format!("ws://127.0.0.1:{ws_port}")])
        .output()
        .expect("run python3 websockets");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("error"),
        "{out:?}"
    );
    let after = wait_until(
        Duration::from_secs(10),
        "the client's frames counted",
        || {
            let s = scrape(ws_port);
            (s.value("axion_bridge_frames_sent_total", &[]) >= 1.0
                && s.value("axion_bridge_clients", &[]) == 0.0)
                .then_some(s)
        },
    );
    let grew = |name: &str| after.value(name, &[]) - before.value(name, &[]);
    assert_eq!(grew("axion_bridge_connections_total"), 1.0);
    assert_eq!(grew("axion_bridge_frames_received_total"), 2.0);
    assert_eq!(grew("axion_bridge_bad_frames_total"), 1.0);
    assert_eq!(after.value("axion_bridge_mqtt_connected", &[]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_session_keeps_its_sys_subscription_across_reconnects_and_restarts() {
    let mut serve = Serve::start_with(SYS_EVERY, &[]);
    let opts = |port: u16, clean: bool| {
        let mut o = rumqttc::v5::MqttOptions::new("sys-kept", "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_start(clean);
        o.set_session_expiry_interval(Some(300));
        o
    };
    let mut c = V5::connect_with(opts(serve.mqtt_port, true))
        .await
        .expect("connect");
    c.subscribe("$SYS/broker/uptime", 0).await;
    let first = recv(&mut c.rx, 10).await;
    assert!(
        first.retain && first.topic == "$SYS/broker/uptime",
        "{first:?}"
    );
    c.leave().await;

    // Back without subscribing: the next round reaches it, not retained.
    let mut c = V5::connect_with(opts(serve.mqtt_port, false))
        .await
        .expect("reconnect");
    assert!(c.connack.session_present);
    let live = recv(&mut c.rx, 10).await;
    assert!(
        !live.retain && live.topic == "$SYS/broker/uptime",
        "{live:?}"
    );
    c.leave().await;

    // The session's record on disk holds it too.
    serve.restart(SYS_EVERY, &[]);
    let mut c = V5::connect_with(opts(serve.mqtt_port, false))
        .await
        .expect("connect after the restart");
    assert!(c.connack.session_present);
    let live = recv(&mut c.rx, 10).await;
    assert!(
        !live.retain && live.topic == "$SYS/broker/uptime",
        "{live:?}"
    );
}
