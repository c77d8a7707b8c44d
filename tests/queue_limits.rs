//! What a backlog costs `axion serve` and where it stops: queued task
//! bodies wait on disk, so memory holds indexes and a bounded cache however
//! long the queue (before and after a `kill -9`); a queue at its depth
//! limit refuses the next enqueue with a reason the producer sees (MQTT 5
//! reply topic, the bridge's `{"error"}`), keeps what it accepted, and
//! counts the refusals in its stats and in `axion queue ls`.
//! Real processes: `axion serve`, rumqttc producers and workers, Python
//! `websockets` for the legacy WebSocket client.

mod common;

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::mqtt::{recv, recv_none, V5};
use common::{axion_bin, Serve};
use rumqttc::v5::mqttbytes::v5::{PubAckReason, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{json, Value};

const PKG: &str = "ql";

/// The owner's default body cache (`--queue-cache-bytes`).
const CACHE_BYTES: u64 = 32 * 1024 * 1024;
/// What the process may grow by beyond the cache: indexes, redb's page
/// cache, the broker's buffers and the allocator's slack.
const OVERHEAD_BYTES: u64 = 64 * 1024 * 1024;

const TASKS: usize = 1500;
const PAD: usize = 100_000;

/// `VmRSS` of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Waits until the owner answers commands (it replies "no queue" for an
/// unknown queue, which proves it has loaded its store and is subscribed).
async fn wait_owner(port: u16) {
    let url = axion_wire::BrokerUrls::parse(&format!("mqtt://127.0.0.1:{port}")).expect("url");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        use axion_queues::ops::{OpsClient, OpsError};
        use axion_wire::queue::Command as Op;
        let mut ops = OpsClient::connect(&url, PKG, Duration::from_millis(500))
            .await
            .expect("connect");
        match ops.command("probe", Op::Show { limit: 1 }).await {
            Ok(_) | Err(OpsError::Refused(_)) => return,
            Err(e) if std::time::Instant::now() > deadline => {
                panic!("queue owner never answered: {e}")
            }
            Err(_) => {}
        }
    }
}

/// An MQTT 5 producer that names a reply topic, as `bridge/QUEUE-CONTRACT.md`
/// has producers do.
struct Producer {
    client: V5,
    reply_topic: String,
}

impl Producer {
    async fn connect(port: u16, id: &str) -> Producer {
        let mut client = V5::connect(port, id).await;
        let reply_topic = format!("axion/{PKG}/reply/{id}");
        client.subscribe(&reply_topic, 1).await;
        Producer {
            client,
            reply_topic,
        }
    }

    async fn send(&self, queue: &str, request: &Value) {
        let props = PublishProperties {
            response_topic: Some(self.reply_topic.clone()),
            correlation_data: Some(Bytes::from(request["id"].to_string())),
            ..PublishProperties::default()
        };
        self.client
            .client
            .publish_with_properties(
                format!("axion/{PKG}/queue/{queue}/enqueue"),
                QoS::AtLeastOnce,
                false,
                request.to_string(),
                props,
            )
            .await
            .expect("publish");
    }

    /// The next PUBACK the producer gets.
    async fn puback(&mut self) -> rumqttc::v5::mqttbytes::v5::PubAck {
        loop {
            let packet = tokio::time::timeout(Duration::from_secs(10), self.client.packets.recv())
                .await
                .expect("a PUBACK within 10 s")
                .expect("producer connected");
            if let rumqttc::v5::mqttbytes::v5::Packet::PubAck(ack) = packet {
                return ack;
            }
        }
    }

    async fn reply(&mut self) -> Value {
        let msg = recv(&mut self.client.rx, 60).await;
        assert_eq!(msg.topic, self.reply_topic);
        serde_json::from_slice(&msg.payload).expect("reply JSON")
    }

    /// Enqueues `requests` with up to `window` awaiting their answer; the
    /// answers, in order (the owner answers in the order it receives).
    async fn enqueue_all(&mut self, queue: &str, requests: &[Value], window: usize) -> Vec<Value> {
        let mut answers = Vec::with_capacity(requests.len());
        let mut sent = 0;
        while answers.len() < requests.len() {
            while sent < requests.len() && sent - answers.len() < window {
                self.send(queue, &requests[sent]).await;
                sent += 1;
            }
            answers.push(self.reply().await);
        }
        answers
    }
}

/// A worker on `queue`'s shared group with `credits`, acking what it
/// gets and asking for one more each time.
struct Worker {
    client: V5,
    queue: String,
}

impl Worker {
    async fn start(port: u16, id: &str, queue: &str, credits: u32) -> Worker {
        let mut client = V5::connect(port, id).await;
        client
            .subscribe(
                &format!("$share/{PKG}.{queue}/axion/{PKG}/queue/{queue}/tasks"),
                1,
            )
            .await;
        let w = Worker {
            client,
            queue: queue.into(),
        };
        w.ready(credits).await;
        w
    }

    async fn publish(&self, leaf: &str, body: Value) {
        self.client
            .publish(
                &format!("axion/{PKG}/queue/{}/{leaf}", self.queue),
                body.to_string().as_bytes(),
                1,
                false,
            )
            .await;
    }

    async fn ready(&self, credits: u32) {
        self.publish("ready", json!({ "worker": "ignored", "credits": credits }))
            .await;
    }

    /// The next task, acked, with one more credit announced.
    async fn take(&mut self) -> Value {
        let msg = recv(&mut self.client.rx, 60).await;
        let task: Value = serde_json::from_slice(&msg.payload).expect("task JSON");
        self.publish("ack", json!({ "id": task["id"] })).await;
        self.ready(1).await;
        task
    }
}

/// The pad of task `i`: 100 000 bytes that only task `i` has.
fn pad(i: usize) -> String {
    let block = format!(
        "{i:06}-{:010}|",
        (i as u64).wrapping_mul(2_654_435_761) % 10_000_000_000
    );
    block.repeat(PAD / block.len() + 1)[..PAD].to_string()
}

/// 1 500 tasks of 100 KB with no worker raise the process's RSS by no more
/// than the body cache and a fixed overhead, and so does loading them after
/// a `kill -9`; a worker then gets every one, in order, intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_waits_on_disk_not_in_memory_and_is_delivered_whole_after_kill_9() {
    let args = ["--package", PKG];
    let mut serve = Serve::start_with(&args, &[]);
    wait_owner(serve.mqtt_port).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss(serve.proc.pid());

    let requests: Vec<Value> = (0..TASKS)
        .map(|i| json!({ "id": format!("t{i:05}"), "payload": { "n": i, "pad": pad(i) } }))
        .collect();
    let mut producer = Producer::connect(serve.mqtt_port, "backlog-producer").await;
    let answers = producer.enqueue_all("backlog", &requests, 32).await;
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(answer["id"], format!("t{i:05}"), "{answer}");
        assert!(answer.get("error").is_none(), "{answer}");
    }
    drop(producer);
    // Freed pages go back to the system after a short delay.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let queued = rss(serve.proc.pid());
    let bound = CACHE_BYTES + OVERHEAD_BYTES;
    println!(
        "RSS: {:.1} MiB at start, {:.1} MiB with {TASKS} × {PAD} B queued (+{:.1} MiB; bound +{:.1} MiB)",
        mib(before),
        mib(queued),
        mib(queued.saturating_sub(before)),
        mib(bound)
    );
    assert!(
        queued.saturating_sub(before) <= bound,
        "RSS grew by {:.1} MiB with {:.1} MiB of payload queued",
        mib(queued.saturating_sub(before)),
        mib((TASKS * PAD) as u64)
    );

    serve.proc.signal(9);
    serve.proc.wait_exit(Duration::from_secs(10));
    serve.restart(&args, &[]);
    wait_owner(serve.mqtt_port).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let restarted = rss(serve.proc.pid());
    println!(
        "RSS after kill -9 and restart, before any worker: {:.1} MiB (+{:.1} MiB over the first start)",
        mib(restarted),
        mib(restarted.saturating_sub(before))
    );
    assert!(
        restarted.saturating_sub(before) <= bound,
        "after a restart RSS is {:.1} MiB over a fresh start",
        mib(restarted.saturating_sub(before))
    );

    let started = std::time::Instant::now();
    let mut worker = Worker::start(serve.mqtt_port, "backlog-worker", "backlog", 32).await;
    for i in 0..TASKS {
        let task = worker.take().await;
        assert_eq!(task["id"], format!("t{i:05}"), "out of order");
        assert_eq!(task["payload"]["n"], i);
        assert!(
            task["payload"]["pad"].as_str() == Some(pad(i).as_str()),
            "task {i}'s payload is not the one enqueued"
        );
    }
    let took = started.elapsed();
    recv_none(&mut worker.client.rx, 500).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "delivered in {took:?}; RSS after: {:.1} MiB",
        mib(rss(serve.proc.pid()))
    );
}

/// The retained stats of `queue` once `check` holds for them.
async fn stats_when(port: u16, queue: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = V5::connect(port, "stats-reader").await;
        c.subscribe(&format!("axion/{PKG}/queue/{queue}/stats"), 1)
            .await;
        let msg = recv(&mut c.rx, 10).await;
        let stats: Value = serde_json::from_slice(&msg.payload).expect("stats JSON");
        if check(&stats) {
            return stats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stats of {queue} never matched: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The `refused=` counts of the "queue full" lines of `queue` in `serve`'s
/// log, once they add up to `total` (an episode's line is written when the
/// queue has room again, or a few seconds after its first refusal).
async fn logged_refusals(serve: &Serve, queue: &str, total: u64) -> Vec<u64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = common::serve_log(serve);
        let counts: Vec<u64> = log
            .lines()
            .filter(|l| l.contains("queue full") && l.contains(&format!("queue={queue} ")))
            .map(|l| {
                let n = l.split("refused=").nth(1).expect("a refused= field");
                n.split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("a count")
            })
            .collect();
        if counts.iter().sum::<u64>() >= total {
            return counts;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "log lines for {queue} add up to {counts:?}, not {total}; log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const WS_ENQUEUE: &str = r#"
import asyncio, json, sys, websockets

async def main(url):
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"action": "enqueue", "queue": "small", "task": {"from": "ws"}}))
        print(await asyncio.wait_for(ws.recv(), 20))

asyncio.run(main(sys.argv[1]))
"#;

/// A queue at its depth limit refuses the next enqueue, with the reason on
/// the producer's reply topic and as the bridge's `{"error"}`; it keeps the
/// tasks it had, a worker gets exactly those, and the refusals show in the
/// stats, in `axion queue ls` and once in the log. A queue with a higher
/// limit of its own takes more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_with_a_reason_and_keeps_what_it_has() {
    let serve = Serve::start_with(
        &[
            "--package",
            PKG,
            "--max-queue-depth",
            "10",
            "--queue-limit",
            "big=25",
        ],
        &[],
    );
    wait_owner(serve.mqtt_port).await;
    let mut producer = Producer::connect(serve.mqtt_port, "limit-producer").await;

    let small: Vec<Value> = (0..10)
        .map(|i| json!({ "id": format!("s{i}"), "payload": { "n": i } }))
        .collect();
    let answers = producer.enqueue_all("small", &small, 1).await;
    for answer in &answers {
        assert!(answer.get("error").is_none(), "{answer}");
    }
    for _ in 0..10 {
        let ack = producer.puback().await;
        assert_eq!(ack.reason, PubAckReason::Success, "{ack:?}");
    }

    // The very first enqueue past the limit: an MQTT 5 producer hears it
    // in its PUBACK (0x97, with the reason) and on its reply topic.
    producer
        .send("small", &json!({ "id": "s10", "payload": { "n": 10 } }))
        .await;
    let ack = producer.puback().await;
    assert_eq!(ack.reason, PubAckReason::QuotaExceeded, "{ack:?}");
    let reason = ack
        .properties
        .and_then(|p| p.reason_string)
        .unwrap_or_default();
    assert!(reason.contains("depth limit is 10"), "{reason}");
    let refused = producer.reply().await;
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("small") && error.contains("depth limit is 10"),
        "{refused}"
    );
    assert_eq!(
        (
            &refused["id"],
            &refused["limit"],
            &refused["depth"],
            &refused["max_depth"]
        ),
        (&json!("s10"), &json!("depth"), &json!(10), &json!(10)),
        "{refused}"
    );
    // And so does the next one.
    producer
        .send("small", &json!({ "id": "s10b", "payload": { "n": 10 } }))
        .await;
    assert_eq!(producer.puback().await.reason, PubAckReason::QuotaExceeded);
    let again = producer.reply().await;
    assert!(
        again["error"].as_str().is_some_and(|e| e.contains("small")),
        "{again}"
    );

    // The legacy WebSocket client hears the refusal as an error.
    let out = Command::new("python3")
        .args([
            "-c",
            WS_ENQUEUE,
            &format!("ws://127.0.0.1:{}", serve.ws_port),
        ])
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ws: Value = serde_json::from_slice(&out.stdout).expect("a JSON frame");
    let ws_error = ws["error"].as_str().unwrap_or_default();
    assert!(ws_error.contains("depth limit is 10"), "{ws}");

    // Its own limit lets `big` take 25; a burst past it is refused.
    let big: Vec<Value> = (0..35)
        .map(|i| json!({ "id": format!("b{i}"), "payload": i }))
        .collect();
    let answers = producer.enqueue_all("big", &big, 8).await;
    assert!(answers[..25].iter().all(|a| a.get("error").is_none()));
    for answer in &answers[25..] {
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains("depth limit is 25"), "{answer}");
    }

    let stats = stats_when(serve.mqtt_port, "small", |s| s["refused_total"] == 3).await;
    assert_eq!(stats["depth"], 10, "{stats}");
    stats_when(serve.mqtt_port, "big", |s| s["refused_total"] == 10).await;

    let out = Command::new(axion_bin())
        .args([
            "queue",
            "--mqtt",
            &format!("mqtt://127.0.0.1:{}", serve.mqtt_port),
        ])
        .args(["--package", PKG, "ls"])
        .output()
        .expect("run axion queue ls");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let column = header
        .iter()
        .position(|h| *h == "REFUSED")
        .unwrap_or_else(|| panic!("no REFUSED column:\n{table}"));
    let refused_of = |queue: &str| -> String {
        table
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cols| cols.first() == Some(&queue))
            .and_then(|cols| cols.get(column).map(|c| c.to_string()))
            .unwrap_or_else(|| panic!("no row for {queue}:\n{table}"))
    };
    assert_eq!(
        (refused_of("small"), refused_of("big")),
        ("3".into(), "10".into()),
        "{table}"
    );

    // What `small` accepted is all there: a worker gets exactly those 10.
    let mut worker = Worker::start(serve.mqtt_port, "limit-worker", "small", 20).await;
    let mut got: Vec<String> = Vec::new();
    for _ in 0..10 {
        let task = worker.take().await;
        got.push(task["id"].as_str().unwrap_or_default().to_string());
    }
    let want: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
    assert_eq!(got, want);
    recv_none(&mut worker.client.rx, 500).await;

    // One log line per episode with its count, not one per refusal.
    if std::env::var_os("AXION_TEST_LOG").is_none() {
        assert_eq!(logged_refusals(&serve, "big", 10).await, [10]);
        let small = logged_refusals(&serve, "small", 3).await;
        assert_eq!(small.iter().sum::<u64>(), 3, "{small:?}");
        assert!(small.len() <= 2, "one line per episode: {small:?}");
    }
    // Room again: the next enqueue is taken.
    let again = producer
        .enqueue_all("small", &[json!({ "id": "s11", "payload": 11 })], 1)
        .await;
    assert!(again[0].get("error").is_none(), "{}", again[0]);
}

/// `axion queue <args> --json` against `serve`, parsed.
fn cli_json(serve: &Serve, args: &[&str]) -> Value {
    let out = Command::new(axion_bin())
        .args([
            "queue",
            "--mqtt",
            &format!("mqtt://127.0.0.1:{}", serve.mqtt_port),
        ])
        .args(["--package", PKG, "--json"])
        .args(args)
        .output()
        .expect("run axion queue");
    assert!(
        out.status.success(),
        "axion queue {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// With no room for bodies at all, every body the owner needs is read back
/// from disk: deliveries (in order), the dead-letter notice, and the tasks
/// `axion queue show` and `dead` list all carry their payloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_cache_every_body_is_read_back_from_disk() {
    let serve = Serve::start_with(&["--package", PKG, "--queue-cache-bytes", "0"], &[]);
    wait_owner(serve.mqtt_port).await;
    let mut producer = Producer::connect(serve.mqtt_port, "nocache-producer").await;
    let work: Vec<Value> = (0..20)
        .map(|i| json!({ "id": format!("w{i:02}"), "payload": { "n": i } }))
        .collect();
    let answers = producer.enqueue_all("work", &work, 4).await;
    assert!(answers.iter().all(|a| a.get("error").is_none()));

    let shown = cli_json(&serve, &["show", "work", "--limit", "20"]);
    let payloads: Vec<Value> = shown["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| t["payload"]["n"].clone())
        .collect();
    assert_eq!(payloads, (0..20).map(|i| json!(i)).collect::<Vec<_>>());

    let mut worker = Worker::start(serve.mqtt_port, "nocache-worker", "work", 3).await;
    for i in 0..20 {
        let task = worker.take().await;
        assert_eq!(
            (&task["id"], &task["payload"]["n"]),
            (&json!(format!("w{i:02}")), &json!(i))
        );
    }

    let mut watcher = V5::connect(serve.mqtt_port, "nocache-dead-watch").await;
    watcher
        .subscribe(&format!("axion/{PKG}/queue/poison/dead"), 1)
        .await;
    let poison = json!({ "id": "p", "payload": { "bad": true }, "maxAttempts": 1 });
    producer.enqueue_all("poison", &[poison], 1).await;
    let mut victim = Worker::start(serve.mqtt_port, "nocache-victim", "poison", 1).await;
    let msg = recv(&mut victim.client.rx, 10).await;
    let task: Value = serde_json::from_slice(&msg.payload).expect("task JSON");
    assert_eq!(task["payload"], json!({ "bad": true }));
    victim
        .publish("fail", json!({ "id": "p", "reason": "boom" }))
        .await;
    let dead: Value =
        serde_json::from_slice(&recv(&mut watcher.rx, 10).await.payload).expect("JSON");
    assert_eq!(
        (&dead["id"], &dead["reason"]),
        (&json!("p"), &json!("boom"))
    );
    assert_eq!(dead["payload"], json!({ "bad": true }), "{dead}");

    let listed = cli_json(&serve, &["dead", "poison"]);
    assert_eq!(listed[0]["payload"], json!({ "bad": true }), "{listed}");
    cli_json(&serve, &["retry", "poison", "p"]);
    victim.ready(1).await;
    let again: Value =
        serde_json::from_slice(&recv(&mut victim.client.rx, 10).await.payload).expect("JSON");
    assert_eq!(
        (&again["id"], &again["payload"]),
        (&json!("p"), &json!({ "bad": true }))
    );
}
