//! Durable queues end to end with rumqttc workers speaking
//! `bridge/QUEUE-CONTRACT.md` and the `axion queue` CLI.
//!
//! The owner runs where the product runs it: inside `axion serve`, beside
//! the embedded broker (the default). `AXION_QUEUES_TEST_BROKER=mosquitto`
//! runs every test with the standalone owner (`axion queues --mqtt`)
//! against Mosquitto instead, and the `standalone_*` tests always do.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axion_client::connection::options_v5;
use axion_queues::ops::{OpsClient, OpsError};
use axion_wire::queue::{Command as OpsCommand, TaskRequest};
use axion_wire::{BrokerUrls, MqttUrl};
use common::{axion_bin, Mosquitto, Proc, Serve};
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::{json, Value};
use tokio::sync::mpsc;

const PKG: &str = "qt";

fn spawn_owner(url: &str, dir: &Path, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(axion_bin());
    cmd.args(["queues", "--mqtt", url, "--package", PKG, "--data-dir"])
        .arg(dir)
        .args(extra);
    common::spawn_axion("axion queues", &mut cmd)
}

/// A broker with a queue owner for [`PKG`].
enum Setup {
    /// `axion serve --package qt`: broker and owner in one process.
    Serve { serve: Serve, args: Vec<String> },
    /// `axion queues --mqtt <mosquitto>`: the owner alone against an
    /// external broker.
    Standalone {
        broker: Mosquitto,
        owner: Proc,
        dir: tempfile::TempDir,
        args: Vec<String>,
    },
}

impl Setup {
    /// The default setup, with owner flags `args` (e.g. `--ack-wait-ms`).
    async fn start(args: &[&str]) -> Setup {
        if std::env::var("AXION_QUEUES_TEST_BROKER").as_deref() == Ok("mosquitto") {
            Setup::standalone(args).await
        } else {
            Setup::serve(args).await
        }
    }

    async fn serve(args: &[&str]) -> Setup {
        let args: Vec<String> = ["--package", PKG]
            .iter()
            .chain(args)
            .map(|a| a.to_string())
            .collect();
        let serve = Serve::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
        let setup = Setup::Serve { serve, args };
        wait_owner(&setup.url()).await;
        setup
    }

    async fn standalone(args: &[&str]) -> Setup {
        let broker = Mosquitto::start();
        let dir = tempfile::tempdir().expect("tempdir");
        let owner = spawn_owner(&broker.mqtt_url(), dir.path(), args);
        let setup = Setup::Standalone {
            broker,
            owner,
            dir,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        wait_owner(&setup.url()).await;
        setup
    }

    fn url(&self) -> String {
        match self {
            Setup::Serve { serve, .. } => serve.mqtt_url(),
            Setup::Standalone { broker, .. } => broker.mqtt_url(),
        }
    }

    /// The process the owner runs in.
    fn owner_pid(&self) -> u32 {
        match self {
            Setup::Serve { serve, .. } => serve.proc.pid(),
            Setup::Standalone { owner, .. } => owner.pid(),
        }
    }

    /// Stops the owner with `signal` (9: a crash; 15: as an operator
    /// would, and it drains) and starts it again on the same data
    /// directory. Inside `axion serve` that takes the broker down with it,
    /// so every client connection drops too.
    async fn restart_owner(&mut self, signal: i32) {
        let stopped = |proc: &mut common::Proc| {
            proc.signal(signal);
            let code = proc.wait_exit(Duration::from_secs(15));
            if signal != 9 {
                assert_eq!(code, Some(0), "the owner did not stop cleanly");
            }
        };
        match self {
            Setup::Serve { serve, args } => {
                stopped(&mut serve.proc);
                serve.restart(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
            }
            Setup::Standalone {
                broker,
                owner,
                dir,
                args,
            } => {
                stopped(owner);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                *owner = spawn_owner(&broker.mqtt_url(), dir.path(), &args);
            }
        }
        wait_owner(&self.url()).await;
    }

    async fn kill_9_owner_and_restart(&mut self) {
        self.restart_owner(9).await;
    }

    async fn stop_and_restart(&mut self) {
        self.restart_owner(15).await;
    }
}

async fn ops(url: &str) -> OpsClient {
    let url = BrokerUrls::parse(url).expect("url");
    OpsClient::connect(&url, PKG, Duration::from_secs(5))
        .await
        .expect("ops client")
}

/// Waits until the owner answers commands (it replies "no queue" for an
/// unknown queue, which proves it is subscribed).
async fn wait_owner(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let parsed = BrokerUrls::parse(url).expect("url");
    loop {
        let mut c = OpsClient::connect(&parsed, PKG, Duration::from_millis(400))
            .await
            .expect("connect");
        match c.command("probe", OpsCommand::Show { limit: 1 }).await {
            Ok(_) | Err(OpsError::Refused(_)) => return,
            Err(_) if Instant::now() < deadline => continue,
            Err(e) => panic!("queue owner never answered: {e}"),
        }
    }
}

async fn enqueue(c: &mut OpsClient, queue: &str, body: Value) -> axion_wire::queue::Enqueued {
    let req: TaskRequest = serde_json::from_value(body).expect("task request");
    c.enqueue(queue, &req).await.expect("enqueue confirmed")
}

/// A worker following the contract: announces credit, claims or releases
/// tasks addressed to another member, answers the owner's announce.
struct Worker {
    id: String,
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<(String, Value)>,
    queue: String,
    subacks: mpsc::UnboundedReceiver<()>,
    /// The connection; aborting it drops the socket without DISCONNECT.
    conn: tokio::task::JoinHandle<()>,
    /// Credit announced and not yet used by a received task.
    free: u32,
}

impl Worker {
    async fn start(url: &str, id: &str, queue: &str, credits: u32, will: bool) -> Worker {
        let url = MqttUrl::parse(url).expect("url");
        let mut opts: MqttOptions = options_v5(&url, id);
        if will {
            opts.set_last_will(LastWill {
                topic: format!("axion/{PKG}/queue/{queue}/release").into(),
                message: json!({ "worker": id }).to_string().into(),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: None,
            });
        }
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        let (tx, rx) = mpsc::unbounded_channel();
        let (sub_tx, mut sub_rx) = mpsc::unbounded_channel();
        let conn = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let topic = String::from_utf8_lossy(&p.topic).into_owned();
                        let body = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        if tx.send((topic, body)).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        client
            .subscribe(
                format!("$share/{PKG}.{queue}/axion/{PKG}/queue/{queue}/tasks"),
                QoS::AtLeastOnce,
            )
            .await
            .expect("subscribe");
        client
            .subscribe(format!("axion/{PKG}/cmd/announce"), QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        for _ in 0..2 {
            tokio::time::timeout(Duration::from_secs(5), sub_rx.recv())
                .await
                .expect("suback");
        }
        let mut w = Worker {
            id: id.into(),
            client,
            rx,
            queue: queue.into(),
            subacks: sub_rx,
            conn,
            free: 0,
        };
        if credits > 0 {
            w.ready(credits).await;
        }
        w
    }

    /// Subscribes to one more filter and waits for the SUBACK.
    async fn subscribe(&mut self, filter: String) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        tokio::time::timeout(Duration::from_secs(5), self.subacks.recv())
            .await
            .expect("suback");
    }

    async fn publish(&self, leaf: &str, body: Value) {
        self.client
            .publish(
                format!("axion/{PKG}/queue/{}/{leaf}", self.queue),
                QoS::AtLeastOnce,
                false,
                body.to_string(),
            )
            .await
            .expect("publish");
    }

    async fn ready(&mut self, n: u32) {
        self.free += n;
        self.publish("ready", json!({ "worker": self.id, "credits": n }))
            .await;
    }

    /// Next task this worker keeps (claims or releases per the contract).
    async fn next_task(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (topic, task) = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .ok()??;
            if topic.ends_with("/cmd/announce") {
                let free = self.free;
                self.publish(
                    "ready",
                    json!({ "worker": self.id, "credits": free, "reset": true }),
                )
                .await;
                continue;
            }
            let id = task["id"].as_str().unwrap_or_default().to_string();
            if task["worker"] == self.id.as_str() || self.free > 0 {
                if task["worker"] != self.id.as_str() {
                    self.publish("progress", json!({ "id": id, "worker": self.id }))
                        .await;
                }
                self.free = self.free.saturating_sub(1);
                return Some(task);
            }
            self.publish("release", json!({ "id": id, "worker": self.id }))
                .await;
        }
    }

    async fn ack(&self, task: &Value) {
        self.publish("ack", json!({ "id": task["id"] })).await;
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

async fn show(c: &mut OpsClient, queue: &str) -> axion_wire::queue::Stats {
    c.command(queue, OpsCommand::Show { limit: 100 })
        .await
        .expect("show")
        .stats
        .expect("stats")
}

fn cli(url: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(axion_bin())
        .args(["queue", "--mqtt", url, "--package", PKG])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run axion queue");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `axion queue …` with its status, stdout and stderr.
fn cli_output(url: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(axion_bin())
        .args(["queue", "--mqtt", url, "--package", PKG])
        .args(args)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .output()
        .expect("run axion queue");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What the owner's answer and the retained record must agree on (rates
/// and the timestamp move between the two).
fn counts(stats: &axion_wire::queue::Stats) -> [u64; 7] {
    [
        stats.depth,
        stats.inflight,
        stats.dead,
        stats.bytes,
        stats.enqueued_total,
        stats.acked_total,
        stats.stray_acks_total,
    ]
}

/// `axion queue ls` asks the owner, which answers at once with what its
/// retained records say once they are published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_ls_gets_every_queue_from_the_owner() {
    let setup = Setup::start(&[]).await;
    let url = setup.url();
    let mut c = ops(&url).await;
    for (queue, n) in [("ls-a", 3), ("ls-b", 5)] {
        for i in 0..n {
            enqueue(&mut c, queue, json!({ "payload": { "n": i } })).await;
        }
    }
    let (ok, out, err) = cli_output(&url, &["ls", "--json"]);
    assert!(ok, "{err}");
    assert!(!err.contains("no queue owner answered"), "{err}");
    let listed: Vec<axion_wire::queue::Stats> = serde_json::from_str(&out).expect("ls json");
    let depths: Vec<(&str, u64)> = listed.iter().map(|s| (s.queue.as_str(), s.depth)).collect();
    assert_eq!(depths, [("ls-a", 3), ("ls-b", 5)], "{out}");

    let answer = c.list(Duration::from_secs(5)).await.expect("owner's list");
    let deadline = Instant::now() + Duration::from_secs(10);
    let retained = loop {
        let all = c
            .all_stats(Duration::from_millis(300))
            .await
            .expect("retained");
        if all.len() == answer.len() && all.iter().zip(&answer).all(|(r, a)| counts(r) == counts(a))
        {
            break all;
        }
        assert!(
            Instant::now() < deadline,
            "retained {all:?} never matched the owner's {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let names: Vec<&str> = retained.iter().map(|s| s.queue.as_str()).collect();
    assert_eq!(names, ["ls-a", "ls-b"]);
}

/// With no owner to answer, `axion queue ls` shows the retained stats and
/// says on stderr that it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_queue_ls_without_an_owner_reads_the_retained_stats() {
    let mut setup = Setup::standalone(&[]).await;
    let url = setup.url();
    let mut c = ops(&url).await;
    for i in 0..4 {
        enqueue(&mut c, "orphan", json!({ "payload": { "n": i } })).await;
    }
    // The retained record catches up within its refresh interval; the
    // owner's own answer, which would say 4 at once, is not waited for.
    // Only a listing that says it came from the retained stats counts: an
    // owner quick enough can still answer within no wait at all.
    common::wait_until(Duration::from_secs(10), "retained depth 4", || {
        let (_, out, err) = cli_output(&url, &["ls", "--json", "--owner-wait-ms", "0"]);
        let v: Value = serde_json::from_str(&out).ok()?;
        (v[0]["depth"] == 4 && err.contains("no queue owner answered")).then_some(())
    });
    let Setup::Standalone { owner, .. } = &mut setup else {
        unreachable!("a standalone setup")
    };
    // A crash: the retained stats stay on the broker, nobody answers.
    owner.signal(9);
    owner.wait_exit(Duration::from_secs(10));
    let (ok, out, err) = cli_output(&url, &["ls", "--json", "--owner-wait-ms", "300"]);
    assert!(ok, "{err}");
    assert!(err.contains("no queue owner answered"), "{err}");
    let v: Value = serde_json::from_str(&out).expect("ls json");
    assert_eq!(
        (v[0]["queue"].as_str(), v[0]["depth"].as_u64()),
        (Some("orphan"), Some(4)),
        "{out}"
    );
}

/// An operator's `mosquitto_sub` sees a task's whole life on the queue
/// topics: the enqueue, the worker's credit, the delivery and the ack
/// (inside `axion serve` the owner takes its copy of the inbound ones
/// straight from the sessions; the router still carries them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_sees_enqueue_ready_task_and_ack() {
    use std::io::{BufRead, BufReader};
    let setup = Setup::start(&[]).await;
    let url = setup.url();
    let port = MqttUrl::parse(&url).expect("url").port.to_string();
    let mut sub = Command::new("mosquitto_sub")
        .args(["-p", &port, "-t", &format!("axion/{PKG}/queue/vis/+"), "-v"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    let (line_tx, mut lines) = mpsc::unbounded_channel();
    let stdout = sub.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line_tx.send(line).is_err() {
                return;
            }
        }
    });
    // Subscribed once a probe comes through.
    let producer = Producer::start(&url, "vis-producer", 16).await;
    let probe = format!("axion/{PKG}/queue/vis/probe");
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    'probing: loop {
        assert!(
            tokio::time::Instant::now() < give_up,
            "mosquitto_sub never subscribed"
        );
        producer
            .sender
            .client
            .publish(&probe, QoS::AtLeastOnce, false, "{}")
            .await
            .expect("probe");
        let until = tokio::time::Instant::now() + Duration::from_millis(200);
        while let Ok(Some(line)) = tokio::time::timeout_at(until, lines.recv()).await {
            if line.starts_with(&probe) {
                break 'probing;
            }
        }
    }
    let mut worker = Worker::start(&url, "vis-worker", "vis", 1, false).await;
    producer.enqueue("vis", "seen-1").await;
    let task = worker
        .next_task(Duration::from_secs(10))
        .await
        .expect("task");
    worker.ack(&task).await;
    let mut missing: HashSet<&str> = ["enqueue", "ready", "tasks", "ack"].into();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !missing.is_empty() {
        let line = tokio::time::timeout_at(deadline, lines.recv())
            .await
            .unwrap_or_else(|_| panic!("mosquitto_sub never showed {missing:?}"))
            .expect("mosquitto_sub output");
        let (topic, body) = line.split_once(' ').unwrap_or((&line, ""));
        let leaf = topic.rsplit('/').next().unwrap_or_default();
        if leaf == "ready" || body.contains("seen-1") {
            missing.remove(leaf);
        }
    }
    let _ = sub.kill();
    let _ = sub.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_piles_up_then_drains_within_credit() {
    piles_up_then_drains(Setup::start(&[]).await).await;
}

/// `axion queues` on its own keeps the same promises on an external broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_owner_on_mosquitto_piles_up_then_drains_within_credit() {
    piles_up_then_drains(Setup::standalone(&[]).await).await;
}

async fn piles_up_then_drains(setup: Setup) {
    let url = setup.url();
    let mut c = ops(&url).await;
    let mut ids = HashSet::new();
    for i in 0..20 {
        ids.insert(
            enqueue(&mut c, "pile", json!({ "payload": { "n": i } }))
                .await
                .id,
        );
    }
    let stats = show(&mut c, "pile").await;
    assert_eq!(
        (stats.depth, stats.inflight),
        (20, 0),
        "tasks wait for a worker"
    );

    // Three credits: exactly three tasks come, and no fourth while unacked.
    let mut w = Worker::start(&url, "w-pile", "pile", 3, false).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            w.next_task(Duration::from_secs(5))
                .await
                .expect("task within credit"),
        );
    }
    assert!(
        w.next_task(Duration::from_millis(600)).await.is_none(),
        "no task beyond credit"
    );
    assert_eq!(show(&mut c, "pile").await.inflight, 3);

    let mut got: HashSet<String> = HashSet::new();
    for t in held {
        got.insert(t["id"].as_str().expect("id").to_string());
        w.ack(&t).await;
        w.ready(1).await;
    }
    while got.len() < 20 {
        let t = w.next_task(Duration::from_secs(5)).await.expect("drains");
        assert!(
            got.insert(t["id"].as_str().expect("id").to_string()),
            "delivered once"
        );
        w.ack(&t).await;
        w.ready(1).await;
    }
    assert_eq!(got, ids);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = show(&mut c, "pile").await;
        if s.acked_total == 20 {
            assert_eq!((s.depth, s.inflight), (0, 0));
            break;
        }
        assert!(Instant::now() < deadline, "acks not counted: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The retained stats say the same to anyone (the CLI here).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (ok, out) = cli(&url, &["ls", "--json"]);
        assert!(ok);
        let v: Value = serde_json::from_str(&out).expect("ls json");
        if v[0]["acked_total"] == 20 {
            assert_eq!(v[0]["queue"], "pile");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "retained stats never caught up: {out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_split_fifty_tasks_exactly_once() {
    let setup = Setup::start(&[]).await;
    let url = setup.url();
    let mut c = ops(&url).await;
    for i in 0..50 {
        enqueue(
            &mut c,
            "split",
            json!({ "payload": i, "id": format!("t{i}") }),
        )
        .await;
    }
    let mut handles = Vec::new();
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, String)>();
    for name in ["w-a", "w-b"] {
        let url = url.clone();
        let tx = tx.clone();
        handles.push(tokio::spawn(async move {
            let mut w = Worker::start(&url, name, "split", 2, false).await;
            while let Some(t) = w.next_task(Duration::from_secs(2)).await {
                let _ = tx.send((name.to_string(), t["id"].as_str().unwrap_or("").to_string()));
                tokio::time::sleep(Duration::from_millis(5)).await;
                w.ack(&t).await;
                w.ready(1).await;
            }
        }));
    }
    drop(tx);
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut per_worker: HashMap<String, usize> = HashMap::new();
    while let Some((w, id)) = rx.recv().await {
        *seen.entry(id).or_default() += 1;
        *per_worker.entry(w).or_default() += 1;
    }
    assert_eq!(seen.len(), 50, "every task delivered");
    assert!(
        seen.values().all(|n| *n == 1),
        "each exactly once: {seen:?}"
    );
    assert!(
        per_worker.values().all(|n| *n >= 10),
        "both worked: {per_worker:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_owner_loses_nothing_and_redelivers_in_flight() {
    let mut setup = Setup::start(&["--ack-wait-ms", "1000"]).await;
    let url = setup.url();
    let mut c = ops(&url).await;
    let mut ids = HashSet::new();
    for i in 0..30 {
        ids.insert(enqueue(&mut c, "crash", json!({ "payload": i })).await.id);
    }
    // A worker takes five and never acks them.
    let mut w1 = Worker::start(&url, "w-crash-1", "crash", 5, false).await;
    for _ in 0..5 {
        w1.next_task(Duration::from_secs(5))
            .await
            .expect("in flight");
    }
    // Deliveries go out before their in-flight mark is committed (a crash
    // in between only means an earlier redelivery); command replies wait
    // for the commit, so once this answer is in, the five are on disk.
    assert_eq!(show(&mut c, "crash").await.inflight, 5);
    setup.kill_9_owner_and_restart().await;
    drop(w1);
    let mut c = ops(&url).await;
    let s = show(&mut c, "crash").await;
    assert_eq!(
        s.depth + s.inflight,
        30,
        "all 30 still there after kill -9: {s:?}"
    );
    assert_eq!(s.inflight, 5, "in-flight tasks remembered");

    let mut w2 = Worker::start(&url, "w-crash-2", "crash", 10, false).await;
    let mut got = HashSet::new();
    while got.len() < 30 {
        let t = w2
            .next_task(Duration::from_secs(5))
            .await
            .expect("all delivered again");
        got.insert(t["id"].as_str().expect("id").to_string());
        w2.ack(&t).await;
        w2.ready(1).await;
    }
    assert_eq!(got, ids);
}

/// Acks and totals reach the disk lazily (an ack's delete rides with the
/// next write, totals alone go once a second); a stop must still leave
/// nothing behind: no acked task comes back, no count is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_right_after_acks_keeps_them_and_the_totals() {
    let mut setup = Setup::start(&[]).await;
    let url = setup.url();
    let mut c = ops(&url).await;
    let mut ids = HashSet::new();
    for i in 0..8 {
        ids.insert(enqueue(&mut c, "stop", json!({ "payload": i })).await.id);
    }
    let mut w = Worker::start(&url, "w-stop", "stop", 5, false).await;
    for _ in 0..5 {
        let t = w.next_task(Duration::from_secs(5)).await.expect("task");
        assert!(ids.remove(t["id"].as_str().expect("id")));
        w.ack(&t).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while show(&mut c, "stop").await.acked_total < 5 {
        assert!(Instant::now() < deadline, "acks not counted");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(w);
    drop(c);
    setup.stop_and_restart().await;

    let mut c = ops(&url).await;
    let s = show(&mut c, "stop").await;
    assert_eq!(
        (s.depth, s.inflight, s.enqueued_total, s.acked_total),
        (3, 0, 8, 5),
        "after the restart: {s:?}"
    );
    let mut w = Worker::start(&url, "w-stop-2", "stop", 10, false).await;
    let mut got = HashSet::new();
    while let Some(t) = w.next_task(Duration::from_millis(1500)).await {
        got.insert(t["id"].as_str().expect("id").to_string());
        w.ack(&t).await;
    }
    assert_eq!(got, ids, "only the three never acked come back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_task_comes_back_after_ack_wait_and_progress_extends_it() {
    let setup = Setup::start(&["--queue-ack-wait", "slow=600"]).await;
    let url = setup.url();
    let mut c = ops(&url).await;
    enqueue(&mut c, "slow", json!({ "payload": "x", "id": "only" })).await;
    let mut w = Worker::start(&url, "w-slow", "slow", 5, false).await;
    let first = w.next_task(Duration::from_secs(5)).await.expect("task");
    assert_eq!(first["attempts"], 1);
    // Progress every 300 ms keeps it for 1.2 s, twice the ack wait.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1200) {
        w.publish("progress", json!({ "id": "only" })).await;
        assert!(
            w.next_task(Duration::from_millis(300)).await.is_none(),
            "redelivered despite progress"
        );
    }
    let again = w
        .next_task(Duration::from_secs(3))
        .await
        .expect("redelivered after ack wait");
    assert_eq!(again["id"], "only");
    assert_eq!(again["attempts"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_retries_with_backoff_then_dead_letters_and_cli_retries() {
    let setup = Setup::start(&["--retry-backoff-ms", "200"]).await;
    let url = setup.url();
    let mut c = ops(&url).await;
    let mut watcher = Worker::start(&url, "dead-watch", "other", 0, false).await;
    watcher
        .subscribe(format!("axion/{PKG}/queue/poison/dead"))
        .await;
    enqueue(
        &mut c,
        "poison",
        json!({ "payload": {"bad": true}, "id": "p1", "maxAttempts": 3 }),
    )
    .await;
    let mut w = Worker::start(&url, "w-poison", "poison", 1, false).await;
    let mut last_fail = None::<Instant>;
    for attempt in 1..=3 {
        let t = w.next_task(Duration::from_secs(5)).await.expect("delivery");
        assert_eq!(t["attempts"], attempt);
        if let Some(at) = last_fail {
            // Backoff: attempt n waits at least half of 200 ms × 2^(n-2).
            let min = Duration::from_millis(100 << (attempt - 2));
            assert!(
                at.elapsed() >= min,
                "attempt {attempt} came after {:?}",
                at.elapsed()
            );
        }
        w.publish(
            "fail",
            json!({ "id": "p1", "reason": format!("boom {attempt}") }),
        )
        .await;
        last_fail = Some(Instant::now());
        w.ready(1).await;
    }
    let (topic, dead) = tokio::time::timeout(Duration::from_secs(5), watcher.rx.recv())
        .await
        .expect("dead letter published")
        .expect("open");
    assert!(topic.ends_with("/poison/dead"));
    assert_eq!(dead["id"], "p1");
    assert_eq!(dead["reason"], "boom 3");
    assert!(
        w.next_task(Duration::from_millis(500)).await.is_none(),
        "dead task not delivered"
    );

    let (ok, out) = cli(&url, &["dead", "poison", "--json"]);
    assert!(ok, "{out}");
    let listed: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(listed[0]["id"], "p1");
    assert_eq!(listed[0]["reason"], "boom 3");

    let (ok, out) = cli(&url, &["retry", "poison", "p1"]);
    assert!(ok, "{out}");
    let t = w
        .next_task(Duration::from_secs(5))
        .await
        .expect("retried task delivered");
    assert_eq!(
        (t["id"].as_str(), t["attempts"].as_i64()),
        (Some("p1"), Some(1))
    );
    w.ack(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_id_is_enqueued_once_and_delay_is_honoured() {
    let setup = Setup::start(&[]).await;
    let url = setup.url();
    let mut c = ops(&url).await;
    let a = enqueue(&mut c, "misc", json!({ "payload": 1, "id": "same" })).await;
    let b = enqueue(&mut c, "misc", json!({ "payload": 2, "id": "same" })).await;
    assert!(!a.duplicate && b.duplicate);
    let t0 = Instant::now();
    enqueue(
        &mut c,
        "misc",
        json!({ "payload": 3, "id": "later", "delayMs": 800 }),
    )
    .await;
    assert_eq!(show(&mut c, "misc").await.depth, 2);

    let mut w = Worker::start(&url, "w-misc", "misc", 5, false).await;
    let first = w.next_task(Duration::from_secs(5)).await.expect("task");
    assert_eq!(
        (first["id"].as_str(), first["payload"].as_i64()),
        (Some("same"), Some(1))
    );
    w.ack(&first).await;
    let later = w
        .next_task(Duration::from_secs(5))
        .await
        .expect("delayed task");
    assert_eq!(later["id"], "later");
    assert!(
        t0.elapsed() >= Duration::from_millis(800),
        "delivered after {:?}",
        t0.elapsed()
    );
    assert!(
        w.next_task(Duration::from_millis(400)).await.is_none(),
        "duplicate never delivered"
    );

    // Purge empties the queue (CLI, no prompt with --yes).
    enqueue(&mut c, "misc", json!({ "payload": 4 })).await;
    enqueue(&mut c, "misc", json!({ "payload": 5, "delayMs": 60000 })).await;
    let (ok, out) = cli(&url, &["purge", "misc", "--yes", "--json"]);
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(&out).expect("json");
    assert!(v["purged"].as_u64() >= Some(1));
    let s = show(&mut c, "misc").await;
    assert_eq!(s.depth, 0);
}

/// A Response Topic no message can be published to (a wildcard) holds up
/// nothing: the task is still enqueued, and what the owner sends after
/// the refused reply (answers, confirmations) still goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_topic_with_a_wildcard_holds_up_nothing() {
    let setup = Setup::start(&[]).await;
    let url = setup.url();
    let opts = options_v5(&MqttUrl::parse(&url).expect("url"), "wild-replies");
    let (client, mut events) = AsyncClient::new(opts, 16);
    let conn = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    for (i, reply) in ["replies/+/x", "replies/#"].into_iter().enumerate() {
        let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
            response_topic: Some(reply.to_string()),
            ..Default::default()
        };
        client
            .publish_with_properties(
                format!("axion/{PKG}/queue/wild/enqueue"),
                QoS::AtLeastOnce,
                false,
                json!({ "id": format!("wild-{i}"), "payload": i }).to_string(),
                props,
            )
            .await
            .expect("publish");
    }
    let mut c = ops(&url).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // The owner knows the queue only once the first enqueue reached it.
        match c.command("wild", OpsCommand::Show { limit: 100 }).await {
            Ok(reply) if reply.stats.as_ref().is_some_and(|s| s.depth >= 2) => break,
            Ok(_) | Err(OpsError::Refused(_)) => {}
            Err(err) => panic!("show: {err:?}"),
        }
        assert!(Instant::now() < deadline, "the two enqueues never counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let good = enqueue(&mut c, "wild", json!({ "id": "good", "payload": 2 })).await;
    assert!(!good.duplicate);
    assert_eq!(show(&mut c, "wild").await.depth, 3);
    conn.abort();
}

/// `worker` gets task `id` within the contract's bound for a dead worker's
/// task reaching another worker: 2 s from `start`.
async fn expect_moved_to(worker: &mut Worker, id: &str, start: Instant) -> Value {
    let task = worker
        .next_task(Duration::from_secs(4))
        .await
        .expect("task moved to a live worker");
    assert_eq!(task["id"], id);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_worker_tasks_reach_another_worker_at_once() {
    let setup = Setup::start(&[]).await; // 30 s ack wait
    let url = setup.url();
    let mut c = ops(&url).await;
    enqueue(&mut c, "lost", json!({ "payload": "x", "id": "held" })).await;
    let mut w1 = Worker::start(&url, "w-lost-1", "lost", 1, true).await;
    let t = w1.next_task(Duration::from_secs(5)).await.expect("task");
    assert_eq!(t["id"], "held");
    let mut w2 = Worker::start(&url, "w-lost-2", "lost", 1, false).await;
    // w1's connection drops without DISCONNECT: the broker sends its will.
    let start = Instant::now();
    drop(w1);
    expect_moved_to(&mut w2, "held", start).await;
}

/// Inside `axion serve` the broker knows which tasks a worker's connection
/// never acknowledged receiving: when that connection drops they go back
/// to the owner at once, will or no will, heartbeat or none (otherwise
/// they wait for the ack wait). This is also what closes the race where
/// the owner re-delivers a dead worker's task and the broker hands it to
/// that worker's connection before it has noticed the drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_a_dropped_connection_never_acknowledged_goes_to_another_worker_at_once() {
    let setup = Setup::serve(&[]).await; // 30 s ack wait
    let url = setup.url();
    let mut c = ops(&url).await;
    enqueue(
        &mut c,
        "unacked",
        json!({ "payload": "x", "id": "on-the-wire" }),
    )
    .await;

    // A worker whose client has not acknowledged the delivery (QoS 1
    // PUBACK) when its connection drops: it never got the task. No will,
    // no heartbeat.
    let mut opts = options_v5(&MqttUrl::parse(&url).expect("url"), "w-unacked");
    opts.set_manual_acks(true);
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    client
        .subscribe(
            format!("$share/{PKG}.unacked/axion/{PKG}/queue/unacked/tasks"),
            QoS::AtLeastOnce,
        )
        .await
        .expect("subscribe");
    let received = tokio::time::timeout(Duration::from_secs(5), async {
        let mut announced = false;
        loop {
            match eventloop.poll().await.expect("connection") {
                Event::Incoming(Packet::SubAck(_)) if !announced => {
                    announced = true;
                    client
                        .publish(
                            format!("axion/{PKG}/queue/unacked/ready"),
                            QoS::AtLeastOnce,
                            false,
                            json!({ "worker": "w-unacked", "credits": 1 }).to_string(),
                        )
                        .await
                        .expect("ready");
                }
                Event::Incoming(Packet::Publish(p)) => return p,
                _ => {}
            }
        }
    })
    .await
    .expect("the task reached the first worker");
    let task: Value = serde_json::from_slice(&received.payload).expect("task json");
    assert_eq!(task["id"], "on-the-wire");

    let mut w2 = Worker::start(&url, "w-acking", "unacked", 1, false).await;
    let start = Instant::now();
    drop(eventloop);
    drop(client);
    let t = expect_moved_to(&mut w2, "on-the-wire", start).await;
    assert_eq!(t["attempts"], 1, "the undelivered try does not count");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_heartbeat_goes_offline_loses_its_tasks_to_another() {
    let setup = Setup::start(&[]).await; // 30 s ack wait
    let url = setup.url();
    let mut c = ops(&url).await;
    enqueue(&mut c, "hb", json!({ "payload": "x", "id": "held-hb" })).await;
    let mut w1 = Worker::start(&url, "w-hb-1", "hb", 1, false).await;
    let t = w1.next_task(Duration::from_secs(5)).await.expect("task");
    assert_eq!(t["id"], "held-hb");
    let mut w2 = Worker::start(&url, "w-hb-2", "hb", 1, false).await;
    // The worker's process publishes heartbeats; its connection's will
    // turns the retained record offline when the process dies.
    let mut opts = options_v5(&MqttUrl::parse(&url).expect("url"), "w-hb-1-heartbeat");
    let hb_topic = format!("axion/{PKG}/heartbeat/worker-svc/127.0.0.1:9");
    opts.set_last_will(LastWill {
        topic: hb_topic.clone().into(),
        message: json!({ "status": "offline", "worker": "w-hb-1" })
            .to_string()
            .into(),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: None,
    });
    let (hb, mut hb_loop) = AsyncClient::new(opts, 16);
    hb.publish(
        hb_topic,
        QoS::AtLeastOnce,
        true,
        json!({ "status": "online", "worker": "w-hb-1" }).to_string(),
    )
    .await
    .expect("publish");
    // Connected (so the will is registered) once the broker acks it.
    tokio::time::timeout(Duration::from_secs(5), async {
        while !matches!(hb_loop.poll().await, Ok(Event::Incoming(Packet::PubAck(_)))) {}
    })
    .await
    .expect("heartbeat acknowledged");
    let hb_conn = tokio::spawn(async move { while hb_loop.poll().await.is_ok() {} });
    // The process dies: worker and heartbeat connections drop at once, and
    // the worker announced no release will.
    // (The worker's connection first: a task the owner sends again while
    // the broker still counts a dead member in the group can go to it.)
    let start = Instant::now();
    drop(w1);
    hb_conn.abort();
    expect_moved_to(&mut w2, "held-hb", start).await;
}

/// A producer that keeps up to `window` enqueues awaiting their on-disk
/// confirmation (MQTT 5 Response Topic), as a real producer pipelines.
struct Producer {
    sender: Enqueuer,
    confirmed: mpsc::UnboundedReceiver<String>,
    conn: tokio::task::JoinHandle<()>,
}

/// The sending half of a [`Producer`], for a task of its own.
#[derive(Clone)]
struct Enqueuer {
    client: AsyncClient,
    window: std::sync::Arc<tokio::sync::Semaphore>,
    reply: String,
}

impl Producer {
    async fn start(url: &str, id: &str, window: usize) -> Producer {
        let opts = options_v5(&MqttUrl::parse(url).expect("url"), id);
        let (client, mut events) = AsyncClient::new(opts, 4096);
        let (tx, confirmed) = mpsc::unbounded_channel();
        let (sub_tx, mut sub_rx) = mpsc::unbounded_channel();
        let window = std::sync::Arc::new(tokio::sync::Semaphore::new(window));
        let permits = window.clone();
        let conn = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        permits.add_permits(1);
                        let body: Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                        let id = body["id"].as_str().unwrap_or_default().to_string();
                        if tx.send(id).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        let reply = format!("axion/{PKG}/reply/{id}");
        client
            .subscribe(reply.clone(), QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        tokio::time::timeout(Duration::from_secs(5), sub_rx.recv())
            .await
            .expect("suback");
        Producer {
            sender: Enqueuer {
                client,
                window,
                reply,
            },
            confirmed,
            conn,
        }
    }

    async fn enqueue(&self, queue: &str, id: &str) {
        self.sender.enqueue(queue, id).await;
    }
}

impl Enqueuer {
    /// Enqueues a ~100 B task with this id once the window has room.
    async fn enqueue(&self, queue: &str, id: &str) {
        if let Ok(permit) = self.window.acquire().await {
            permit.forget();
        }
        let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
            response_topic: Some(self.reply.clone()),
            ..Default::default()
        };
        let body = json!({ "id": id, "payload": { "pad": "x".repeat(60) } }).to_string();
        // Fails once the broker is gone; the caller notices by the
        // confirmations that stop.
        let _ = self
            .client
            .publish_with_properties(
                format!("axion/{PKG}/queue/{queue}/enqueue"),
                QoS::AtLeastOnce,
                false,
                body,
                props,
            )
            .await;
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// Runs `worker` until the test aborts it: take a task, count its
/// delivery, ack it, announce one more credit.
fn spawn_acking_worker(
    mut worker: Worker,
    deliveries: std::sync::Arc<std::sync::Mutex<HashMap<String, u32>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(task) = worker.next_task(Duration::from_secs(60)).await {
            let id = task["id"].as_str().unwrap_or_default().to_string();
            *deliveries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(id)
                .or_default() += 1;
            worker.ack(&task).await;
            worker.ready(1).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_amid_10000_tasks_loses_no_confirmed_task() {
    const N: usize = 10_000;
    const CREDITS: u32 = 32;
    let mut setup = Setup::start(&["--ack-wait-ms", "1000"]).await;
    let url = setup.url();
    // Deliveries before the kill and after it, kept apart: a task in both
    // came again because of the kill.
    let deliveries = std::sync::Arc::new(std::sync::Mutex::new(HashMap::<String, u32>::new()));
    let after = std::sync::Arc::new(std::sync::Mutex::new(HashMap::<String, u32>::new()));
    let delivered = |d: &std::sync::Arc<std::sync::Mutex<HashMap<String, u32>>>| {
        d.lock().unwrap_or_else(|p| p.into_inner()).len()
    };
    let mut workers = Vec::new();
    for w in 0..2 {
        let worker = Worker::start(&url, &format!("w-k9-{w}"), "k9", CREDITS, false).await;
        workers.push(spawn_acking_worker(worker, deliveries.clone()));
    }
    // Enqueue in the background; kill -9 once about half is done.
    let mut producer = Producer::start(&url, "p-k9", 256).await;
    let sender = {
        let enqueuer = producer.sender.clone();
        tokio::spawn(async move {
            for i in 0..N {
                enqueuer.enqueue("k9", &format!("t-{i}")).await;
            }
        })
    };
    let mut confirmed = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while delivered(&deliveries) < N / 2 {
        assert!(Instant::now() < deadline, "half the tasks not done in 30 s");
        let next = tokio::time::timeout(Duration::from_millis(20), producer.confirmed.recv());
        if let Ok(id) = next.await {
            confirmed.insert(id.expect("producer running"));
        }
    }
    let before_crash = delivered(&deliveries);
    let mut c = ops(&url).await;
    let inflight = show(&mut c, "k9").await.inflight;
    setup.kill_9_owner_and_restart().await;
    // Deliveries between that count and the kill were in flight too.
    let inflight = inflight + (delivered(&deliveries) - before_crash) as u64;
    sender.abort();
    while let Ok(id) = producer.confirmed.try_recv() {
        confirmed.insert(id);
    }
    for w in workers.drain(..) {
        w.abort();
    }
    println!(
        "kill -9 after {before_crash} deliveries and {} confirmed enqueues, {inflight} in flight",
        confirmed.len()
    );

    // Back up: the producer sends what it has no confirmation for (the id
    // makes a task that did reach the disk count once), workers drain all.
    for w in 0..2 {
        let worker = Worker::start(&url, &format!("w-k9-after-{w}"), "k9", CREDITS, false).await;
        workers.push(spawn_acking_worker(worker, after.clone()));
    }
    let mut producer = Producer::start(&url, "p-k9-after", 256).await;
    let missing: Vec<String> = (0..N)
        .map(|i| format!("t-{i}"))
        .filter(|id| !confirmed.contains(id))
        .collect();
    for id in &missing {
        producer.enqueue("k9", id).await;
    }
    for _ in 0..missing.len() {
        let id = tokio::time::timeout(Duration::from_secs(20), producer.confirmed.recv())
            .await
            .expect("every enqueue confirmed after the restart")
            .expect("producer running");
        confirmed.insert(id);
    }
    assert_eq!(confirmed.len(), N);
    let before = deliveries.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let all_delivered = || {
        let after = after.lock().unwrap_or_else(|p| p.into_inner());
        confirmed
            .iter()
            .filter(|id| !before.contains_key(*id) && !after.contains_key(*id))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while all_delivered() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} confirmed tasks never delivered after the restart",
            all_delivered()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for w in workers {
        w.abort();
    }
    let after = after.lock().unwrap_or_else(|p| p.into_inner());
    let again = before.keys().filter(|id| after.contains_key(*id)).count();
    let twice_in_a_run = before
        .values()
        .chain(after.values())
        .filter(|n| **n > 1)
        .count();
    println!(
        "{N} tasks, all delivered; {again} again after the kill, {twice_in_a_run} twice within one run (rumqttd's shared group)"
    );
    // What comes again after the kill is what was delivered and not yet
    // acked on disk: in flight at the kill, plus acks the workers had sent
    // that were still in the broker (at most their credit each).
    assert!(
        again as u64 <= inflight + 2 * u64::from(CREDITS),
        "{again} delivered again, {inflight} in flight at the kill"
    );
}

/// One worker at 1 s a task, one at 10 ms, each with one slot: the fast
/// one must end up with nearly all the work, and the run close to the fast
/// worker's time alone (a shared group hands tasks round robin, so every
/// task addressed to a busy member must come back at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_worker_does_the_work_a_slow_one_cannot() {
    const N: usize = 100;
    // Short, so that a task held by a worker that dies comes back quickly.
    let setup = Setup::start(&["--ack-wait-ms", "1500"]).await;
    let url = setup.url();
    let mut c = ops(&url).await;
    let producer = Producer::start(&url, "p-fair", 256).await;
    let done = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let counts: Vec<std::sync::Arc<std::sync::atomic::AtomicUsize>> = (0..2)
        .map(|_| std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)))
        .collect();
    let finished = std::sync::Arc::new(std::sync::Mutex::new(HashSet::<String>::new()));
    let mut tasks = Vec::new();
    for (i, work) in [Duration::from_secs(1), Duration::from_millis(10)]
        .into_iter()
        .enumerate()
    {
        let mut w = Worker::start(&url, &format!("w-fair-{i}"), "fair", 1, false).await;
        let (count, done, finished) = (counts[i].clone(), done.clone(), finished.clone());
        // The handler works on one task at a time while the worker keeps
        // reading, so a task it has no room for goes back at once.
        let (work_tx, mut work_rx) = mpsc::unbounded_channel::<Value>();
        let (finished_tx, mut finished_rx) = mpsc::unbounded_channel::<Value>();
        tasks.push(tokio::spawn(async move {
            while let Some(task) = work_rx.recv().await {
                tokio::time::sleep(work).await; // the handler's work
                if finished_tx.send(task).is_err() {
                    return;
                }
            }
        }));
        tasks.push(tokio::spawn(async move {
            enum Event {
                Task(Option<Value>),
                Finished(Option<Value>),
            }
            loop {
                let event = tokio::select! {
                    biased;
                    f = finished_rx.recv() => Event::Finished(f),
                    t = w.next_task(Duration::from_secs(30)) => Event::Task(t),
                };
                match event {
                    Event::Finished(Some(task)) => {
                        w.ack(&task).await;
                        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let id = task["id"].as_str().unwrap_or_default().to_string();
                        // A task rumqttd's shared group delivered twice counts once.
                        if finished
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(id)
                        {
                            done.add_permits(1);
                        }
                        w.ready(1).await;
                    }
                    Event::Task(Some(task)) => {
                        if work_tx.send(task).is_err() {
                            return;
                        }
                    }
                    Event::Finished(None) | Event::Task(None) => return,
                }
            }
        }));
    }
    let start = Instant::now();
    for i in 0..N {
        producer.enqueue("fair", &format!("f-{i}")).await;
    }
    let all = tokio::time::timeout(Duration::from_secs(30), done.acquire_many(N as u32)).await;
    let (slow, fast) = (
        counts[0].load(std::sync::atomic::Ordering::Relaxed),
        counts[1].load(std::sync::atomic::Ordering::Relaxed),
    );
    assert!(
        all.is_ok(),
        "not done within 30 s: fast {fast}, slow {slow}, {:?}",
        show(&mut c, "fair").await
    );
    let took = start.elapsed();
    for t in tasks {
        t.abort();
    }
    println!("fast worker {fast}, slow worker {slow}, {took:?}");
    assert!(fast >= 90, "the 10 ms worker did {fast} of {N}");
    // Ideal: the fast worker alone, 100 × 10 ms; the slow one's last task
    // may add its 1 s.
    assert!(
        took < Duration::from_secs(5),
        "took {took:?}, ideal about 1-2 s"
    );
}

/// The load of `axion-bench --queues` (`axion_bench::queue_load`) at a
/// small scale, so that its client and its checks (every enqueue
/// confirmed, every task delivered, every ack counted by the owner) keep
/// working between benchmark runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmark_load_has_every_task_confirmed_delivered_and_acked() {
    const N: usize = 400;
    let setup = Setup::start(&[]).await;
    let url = MqttUrl::parse(&setup.url()).expect("url");
    let figures = axion_bench::queue_load::run(&url, PKG, &[setup.owner_pid()], N)
        .await
        .expect("the load ran through");
    assert_eq!(figures.enqueue.tasks, N);
    assert_eq!(figures.end_to_end.tasks, N);
    assert_eq!(figures.paced.tasks, N / 2);
    println!("{figures:?}");
}
