//! End-to-end tests of the service runtime (the chaos tests the legacy fleet lacked): the
//! example embedding service and `axion work` as real processes against a
//! real `axion serve`, checked the way an operator would — exit codes and
//! their timing, replies on `replyTo`, the retained heartbeat, queue state.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::mqtt::{Msg, V5};
use common::{Proc, Serve};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

const QUEUE: &str = "embedding.generate";

/// The example service, built once per test run into the same target dir.
fn example_bin() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // <target>/<profile>/deps/runtime-… → <target>/<profile>/examples/
        let exe = std::env::current_exe().expect("test exe path");
        let profile_dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("profile dir")
            .to_path_buf();
        // `--workspace` resolves features as `cargo test --workspace` (CI)
        // did, so only the example is linked; with `-p axion-runtime`
        // tokio, rumqttc and the rest would compile a second time.
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args([
            "build",
            "-q",
            "--workspace",
            "--example",
            "embedding_worker",
        ]);
        if let Some(target) = profile_dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
        // The profile the tests were built with, named by its directory
        // (`debug` is `dev`'s), so the example lands beside them.
        match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => {}
            Some(profile) => {
                cmd.args(["--profile", profile]);
            }
        }
        let status = cmd.status().expect("run cargo build for the example");
        assert!(status.success(), "building the example failed");
        profile_dir.join("examples").join("embedding_worker")
    })
}

struct Worker {
    proc: Proc,
    health: u16,
    /// Its ports file and log.
    _dir: tempfile::TempDir,
}

impl Worker {
    /// Takes over a started service and waits until it is ready for work.
    fn ready(started: common::Listening) -> Worker {
        let health = started.port(axion_wire::ports::HEALTH);
        wait_health(health, "/health/ready", Duration::from_secs(15), |_| true);
        Worker {
            proc: started.proc,
            health,
            _dir: started.dir,
        }
    }
}

/// Starts the example service against `serve` with `envs` on top of a
/// health port, and waits until it is ready for work.
fn start_example(serve: &Serve, envs: &[(&str, &str)]) -> Worker {
    let mut cmd = Command::new(example_bin());
    cmd.env("AXION_MQTT_URL", serve.mqtt_url())
        .env("HEALTH_LISTEN", "127.0.0.1:0")
        .envs(envs.iter().copied());
    Worker::ready(common::spawn_listening("embedding_worker", &mut cmd))
}

/// `axion work` against `serve`, ready for work.
fn start_work(serve: &Serve, args: &[&str], command: &[&str]) -> Worker {
    let mut cmd = Command::new(common::axion_bin());
    cmd.arg("work")
        .arg("--mqtt")
        .arg(serve.mqtt_url())
        .args(["--health-listen", "127.0.0.1:0"])
        .args(args)
        .arg("--")
        .args(command);
    Worker::ready(common::spawn_listening("axion work", &mut cmd))
}

/// GETs a health endpoint: (status code, JSON body).
fn get(port: u16, path: &str) -> Option<(u16, Value)> {
    let (code, body) = common::http_get(port, path)?;
    Some((code, serde_json::from_str(&body).ok()?))
}

/// Polls `path` until it answers 200 and `pred` holds for its body.
fn wait_health(port: u16, path: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some((200, body)) = get(port, path) {
            if pred(&body) {
                return body;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{path} on :{port} not as expected within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the worker runs `n` handlers (its health body says so).
fn wait_inflight(w: &Worker, n: u64) {
    wait_health(w.health, "/health/live", Duration::from_secs(10), |b| {
        b["inflight"] == json!(n)
    });
}

async fn client(serve: &Serve, subs: &[&str]) -> V5 {
    let mut c = V5::connect(serve.mqtt_port, &format!("t-{}", uuid_ish())).await;
    for s in subs {
        c.subscribe(s, 1).await;
    }
    c
}

fn uuid_ish() -> String {
    format!("{}-{}", std::process::id(), common::unique_name(""))
}

async fn enqueue(c: &V5, queue: &str, body: Value) {
    c.publish(
        &format!("axion/default/queue/{queue}/enqueue"),
        body.to_string().as_bytes(),
        1,
        false,
    )
    .await;
}

async fn request(c: &V5, event_type: &str, body: Value) {
    c.publish(
        &format!("axion/default/event/{}", event_type.replace('.', "/")),
        body.to_string().as_bytes(),
        1,
        false,
    )
    .await;
}

/// Next message on `topic` (others are skipped) as JSON.
async fn next_on(rx: &mut UnboundedReceiver<Msg>, topic: &str, secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("nothing on {topic} within {secs} s"))
            .expect("client loop ended");
        if m.topic == topic && !m.payload.is_empty() {
            return serde_json::from_slice(&m.payload).expect("JSON body");
        }
    }
}

/// Reads heartbeat records of the embedding service until `pred` holds.
async fn heartbeat_until(
    rx: &mut UnboundedReceiver<Msg>,
    secs: u64,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no matching heartbeat within {secs} s"))
            .expect("client loop ended");
        if !m.topic.starts_with("axion/default/heartbeat/") || m.payload.is_empty() {
            continue;
        }
        let hb: Value = serde_json::from_slice(&m.payload).expect("heartbeat JSON");
        if pred(&hb) {
            return hb;
        }
    }
}

/// The queue owner's view of one queue (`show` over the ops topic).
async fn show(c: &mut V5, queue: &str) -> Value {
    let reply = format!("t/show/{}", uuid_ish());
    c.subscribe(&reply, 1).await;
    c.publish(
        &format!("axion/default/queue/{queue}/cmd"),
        json!({"op": "show", "replyTo": reply})
            .to_string()
            .as_bytes(),
        1,
        false,
    )
    .await;
    next_on(&mut c.rx, &reply, 5).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_service_answers_tasks_and_requests_with_live_heartbeat() {
    let serve = Serve::start();
    let w = start_example(&serve, &[("HEARTBEAT_INTERVAL_SECS", "1")]);
    let mut c = client(
        &serve,
        &[
            "axion/default/event/embedding/result",
            "axion/default/event/req/reply",
            "axion/default/heartbeat/embedding/+",
        ],
    )
    .await;
    for i in 0..5 {
        enqueue(
            &c,
            QUEUE,
            json!({"payload": {"items": ["a", format!("b{i}")]},
                   "replyTo": "embedding.result", "correlationId": format!("c{i}")}),
        )
        .await;
    }
    let mut seen = HashSet::new();
    for _ in 0..5 {
        let r = next_on(&mut c.rx, "axion/default/event/embedding/result", 10).await;
        assert_eq!(r["type"], "embedding.result");
        assert_eq!(r["source"], "embedding");
        assert_eq!(r["payload"]["embeddings"].as_array().map(Vec::len), Some(2));
        assert_eq!(r["payload"]["attempts"], 1);
        seen.insert(r["correlationId"].as_str().unwrap_or_default().to_string());
    }
    let want: HashSet<String> = (0..5).map(|i| format!("c{i}")).collect();
    assert_eq!(seen, want, "every task answered once, on its correlationId");

    request(
        &c,
        "embedding.request",
        json!({"type": "embedding.request", "payload": {"items": ["x"]},
               "replyTo": "req.reply", "correlationId": "e1"}),
    )
    .await;
    let r = next_on(&mut c.rx, "axion/default/event/req/reply", 10).await;
    assert_eq!(r["correlationId"], "e1");
    assert_eq!(r["payload"]["embeddings"].as_array().map(Vec::len), Some(1));

    let hb = heartbeat_until(&mut c.rx, 10, |hb| hb["avg_job_ms"].is_number()).await;
    assert_eq!(hb["status"], "online");
    assert_eq!(hb["connected"], true);
    assert!(hb["last_progress_ts"].is_number());
    assert!(
        hb["worker"].is_string(),
        "worker id for the queue owner: {hb}"
    );
    assert_eq!(hb["port"], w.health);
    let (code, live) = get(w.health, "/health/live").expect("live answers");
    assert_eq!((code, &live["connected"]), (200, &json!(true)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_a_queue_by_credit_each_task_done_once() {
    let serve = Serve::start();
    let envs = [("MAX_INFLIGHT", "2")];
    let _a = start_example(&serve, &envs);
    let _b = start_example(&serve, &envs);
    let mut c = client(&serve, &["axion/default/event/embedding/result"]).await;
    let n = 24;
    for i in 0..n {
        enqueue(
            &c,
            QUEUE,
            json!({"payload": {"items": [i], "delay_ms": 150}, "replyTo": "embedding.result",
                   "correlationId": i.to_string()}),
        )
        .await;
    }
    let mut done = HashSet::new();
    let mut pids = HashSet::new();
    for _ in 0..n {
        let r = next_on(&mut c.rx, "axion/default/event/embedding/result", 10).await;
        assert_eq!(
            r["payload"]["attempts"], 1,
            "no task bounced or timed out: {r}"
        );
        assert!(done.insert(r["correlationId"].clone()), "done twice: {r}");
        pids.insert(r["payload"]["pid"].clone());
    }
    assert_eq!(pids.len(), 2, "both instances took work");
    common::mqtt::recv_none(&mut c.rx, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_task_keeps_its_ack_wait_alive_with_progress() {
    let serve = Serve::start_with(&["--ack-wait-ms", "600"], &[]);
    let _w = start_example(&serve, &[("AXION_QUEUE_ACK_WAIT_MS", "600")]);
    let mut c = client(&serve, &["axion/default/event/embedding/result"]).await;
    enqueue(
        &c,
        QUEUE,
        json!({"payload": {"items": ["slow"], "delay_ms": 2000}, "replyTo": "embedding.result", "correlationId": "long"}),
    )
    .await;
    let r = next_on(&mut c.rx, "axion/default/event/embedding/result", 10).await;
    assert_eq!(r["correlationId"], "long");
    assert_eq!(
        r["payload"]["attempts"], 1,
        "a 2 s task under a 600 ms ack wait was never redelivered"
    );
    common::mqtt::recv_none(&mut c.rx, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_mid_task_exits_70_and_a_restart_drains_the_queue() {
    let mut serve = Serve::start_with(&["--ack-wait-ms", "1500"], &[]);
    let envs = [
        ("DISCONNECT_KILL_MS", "1500"),
        ("AXION_QUEUE_ACK_WAIT_MS", "1500"),
    ];
    let mut w = start_example(&serve, &envs);
    let c = client(&serve, &[]).await;
    enqueue(
        &c,
        QUEUE,
        json!({"payload": {"items": ["x"], "delay_ms": 3000}, "replyTo": "embedding.result", "correlationId": "k"}),
    )
    .await;
    wait_inflight(&w, 1);
    drop(c);

    serve.proc.signal(9);
    let killed = Instant::now();
    let code = w.proc.wait_exit(Duration::from_secs(10));
    let took = killed.elapsed();
    eprintln!("broker killed -> exit {code:?} after {took:?} (DISCONNECT_KILL_MS=1500)");
    assert_eq!(code, Some(70), "exit code for a lost broker");
    assert!(
        took <= Duration::from_millis(1500 + 1000),
        "exited {took:?} after the broker died (limit 1.5 s + 1 s)"
    );
    assert!(
        took >= Duration::from_millis(1500),
        "not before the limit: {took:?}"
    );

    // The supervisor restarts both: the durable task comes back and is done.
    serve.restart(&["--ack-wait-ms", "1500"], &[]);
    let mut c = client(&serve, &["axion/default/event/embedding/result"]).await;
    let _w = start_example(&serve, &envs);
    let r = next_on(&mut c.rx, "axion/default/event/embedding/result", 15).await;
    assert_eq!(r["correlationId"], "k");
    assert_eq!(r["payload"]["attempts"], 2);
}

async fn stuck_handler_exits_71(payload: Value) {
    let shown = payload.to_string();
    let serve = Serve::start();
    let mut w = start_example(&serve, &[("LIVENESS_MAX_STALL_MS", "1500")]);
    let mut c = client(&serve, &["axion/default/heartbeat/embedding/+"]).await;
    enqueue(&c, QUEUE, json!({"payload": payload})).await;
    let payload = shown;
    wait_inflight(&w, 1);
    let busy = Instant::now();
    let code = w.proc.wait_exit(Duration::from_secs(10));
    let took = busy.elapsed();
    eprintln!("{payload} -> exit {code:?} after {took:?} (LIVENESS_MAX_STALL_MS=1500)");
    assert_eq!(code, Some(71), "exit code for stalled work");
    assert!(
        took <= Duration::from_millis(1500 + 1000),
        "exited {took:?} after the handler got stuck (limit 1.5 s + 1 s)"
    );
    let hb = heartbeat_until(&mut c.rx, 5, |hb| hb["status"] == "offline").await;
    assert_eq!(hb["reason"], "stalled", "the reason is published: {hb}");
    assert_eq!(hb["inflight"], 1);
    // …and the operator's dashboard shows it.
    let out = Command::new(common::axion_bin())
        .args([
            "monitor",
            "--once",
            "--json",
            "--service",
            "embedding",
            "--mqtt",
        ])
        .arg(serve.mqtt_url())
        .output()
        .expect("run axion monitor");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("stalled"),
        "axion monitor shows the reason: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_that_never_returns_exits_71() {
    stuck_handler_exits_71(json!({"items": ["x"], "hang": true})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_in_a_cpu_busy_loop_exits_71() {
    stuck_handler_exits_71(json!({"items": ["x"], "spin": true})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_service_outlives_the_stall_limit_and_still_works() {
    let serve = Serve::start();
    let mut w = start_example(&serve, &[("LIVENESS_MAX_STALL_MS", "800")]);
    let mut c = client(&serve, &["axion/default/event/embedding/result"]).await;
    // The property under test is "nothing happens while idle": wait 2.5×
    // the limit and look.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(
        w.proc.child.try_wait().expect("try_wait").is_none(),
        "an idle service must not be killed as stalled"
    );
    enqueue(
        &c,
        QUEUE,
        json!({"payload": {"items": ["x"]}, "replyTo": "embedding.result", "correlationId": "after-idle"}),
    )
    .await;
    let r = next_on(&mut c.rx, "axion/default/event/embedding/result", 10).await;
    assert_eq!(r["correlationId"], "after-idle");
    assert!(w.proc.child.try_wait().expect("try_wait").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_ten_times_max_queue_gets_results_or_overloaded_at_once() {
    let serve = Serve::start();
    let (inflight, queue) = (2usize, 4usize);
    let w = start_example(
        &serve,
        &[
            ("MAX_INFLIGHT", "2"),
            ("MAX_QUEUE", "4"),
            ("EMBED_DELAY_MS", "300"),
        ],
    );
    let mut c = client(&serve, &["axion/default/event/burst/reply"]).await;
    let n = 10 * queue;
    let start = Instant::now();
    for i in 0..n {
        request(
            &c,
            "embedding.request",
            json!({"type": "embedding.request", "payload": {"items": [i]},
                   "replyTo": "burst.reply", "correlationId": i.to_string()}),
        )
        .await;
    }
    let mut answers: HashMap<String, (Value, Duration)> = HashMap::new();
    while answers.len() < n {
        let r = next_on(&mut c.rx, "axion/default/event/burst/reply", 10).await;
        let id = r["correlationId"]
            .as_str()
            .expect("correlationId")
            .to_string();
        assert!(
            answers
                .insert(id, (r["payload"].clone(), start.elapsed()))
                .is_none(),
            "one answer per request"
        );
    }
    let overloaded: Vec<_> = answers
        .values()
        .filter(|(p, _)| p["overloaded"] == true)
        .collect();
    let results = answers
        .values()
        .filter(|(p, _)| p["embeddings"].is_array())
        .count();
    let last = answers
        .values()
        .map(|(_, at)| *at)
        .max()
        .unwrap_or_default();
    eprintln!(
        "burst of {n}: {results} results, {} overloaded, all answered within {last:?}",
        overloaded.len()
    );
    assert_eq!(
        overloaded.len() + results,
        n,
        "every caller got a result or overloaded"
    );
    assert!(results >= inflight + queue, "admitted work done: {results}");
    assert!(
        !overloaded.is_empty(),
        "the burst beyond the limits was refused"
    );
    for (p, at) in &overloaded {
        assert!(p["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{p}");
        assert!(
            *at < Duration::from_millis(1500),
            "refusals come at once, not after the work: {at:?}"
        );
    }
    // Still healthy and idle afterwards.
    wait_health(w.health, "/health/ready", Duration::from_secs(5), |b| {
        b["inflight"] == 0 && b["queue_depth"] == 0
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_task_finishes_it_then_stops_cleanly() {
    let serve = Serve::start();
    let mut w = start_example(&serve, &[("DRAIN_MS", "5000")]);
    let mut c = client(
        &serve,
        &[
            "axion/default/event/embedding/result",
            "axion/default/heartbeat/embedding/+",
        ],
    )
    .await;
    enqueue(
        &c,
        QUEUE,
        json!({"payload": {"items": ["x"], "delay_ms": 1000}, "replyTo": "embedding.result", "correlationId": "t"}),
    )
    .await;
    wait_inflight(&w, 1);
    w.proc.signal(15);
    let mut order = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = |order: &Vec<String>, what: &str| order.iter().any(|o| o == what);
    while !(seen(&order, "offline") && seen(&order, "result")) {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, c.rx.recv())
            .await
            .expect("drain sequence within 10 s")
            .expect("client loop");
        let v: Value = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
        if m.topic.ends_with("/embedding/result") {
            assert_eq!(v["correlationId"], "t");
            order.push("result".to_string());
        } else if v["status"] == "draining" {
            order.push("draining".into());
        } else if v["status"] == "offline" {
            assert_eq!(v["reason"], "stopped");
            order.push("offline".into());
        }
    }
    order.dedup();
    // The records and the result travel on two connections (the
    // heartbeat's and the service's), so where the result falls between
    // them is up to the scheduler under load; the records come in order.
    let mut records: Vec<&String> = order.iter().filter(|o| *o != "result").collect();
    records.dedup();
    assert_eq!(records, ["draining", "offline"], "{order:?}");
    assert_eq!(w.proc.wait_exit(Duration::from_secs(5)), Some(0));
    let stats = show(&mut c, QUEUE).await;
    assert_eq!(stats["stats"]["acked_total"], 1, "{stats}");
    assert_eq!(stats["stats"]["depth"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_back_a_task_that_outlives_drain_ms() {
    let serve = Serve::start();
    let mut w = start_example(&serve, &[("DRAIN_MS", "300")]);
    let mut c = client(&serve, &[]).await;
    enqueue(
        &c,
        QUEUE,
        json!({"payload": {"items": ["x"], "hang": true}, "id": "stuck"}),
    )
    .await;
    wait_inflight(&w, 1);
    let t0 = Instant::now();
    w.proc.signal(15);
    assert_eq!(w.proc.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(
        t0.elapsed() < Duration::from_millis(300 + 1500),
        "{:?}",
        t0.elapsed()
    );
    let shown = show(&mut c, QUEUE).await;
    let task = shown["tasks"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["id"] == "stuck"))
        .unwrap_or_else(|| panic!("task kept by the queue: {shown}"));
    assert_eq!(task["attempts"], 0, "handed back, not counted: {task}");
    assert_ne!(task["state"], "inflight", "{task}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axion_work_runs_a_command_per_task_and_fails_on_nonzero_exit() {
    let serve = Serve::start_with(&["--retry-backoff-ms", "50"], &[]);
    let _echo = start_work(&serve, &["--queue", "echo"], &["sh", "-c", "cat"]);
    let _bad = start_work(
        &serve,
        &["--queue", "bad"],
        &["sh", "-c", "echo boom >&2; exit 3"],
    );
    let mut c = client(
        &serve,
        &[
            "axion/default/event/echo/result",
            "axion/default/queue/bad/dead",
        ],
    )
    .await;
    enqueue(
        &c,
        "echo",
        json!({"payload": {"text": "hi", "n": [1, 2]}, "replyTo": "echo.result", "correlationId": "w1"}),
    )
    .await;
    let r = next_on(&mut c.rx, "axion/default/event/echo/result", 10).await;
    assert_eq!(r["correlationId"], "w1");
    assert_eq!(r["payload"], json!({"text": "hi", "n": [1, 2]}));

    enqueue(&c, "bad", json!({"payload": 1, "maxAttempts": 2})).await;
    let dead = next_on(&mut c.rx, "axion/default/queue/bad/dead", 15).await;
    assert_eq!(
        dead["attempts"], 2,
        "failed, retried, dead-lettered: {dead}"
    );
    let reason = dead["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("exit code 3") && reason.contains("boom"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axion_work_passes_the_same_exit_code_tests() {
    let serve = Serve::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("child.pid");
    let script = format!("echo $$ > {}; exec sleep 30", pid_file.display());
    let mut stuck = start_work(
        &serve,
        &["--queue", "slow", "--liveness-max-stall-ms", "1200"],
        &["sh", "-c", &script],
    );
    let mut cat = start_work(
        &serve,
        &["--queue", "fine", "--disconnect-kill-ms", "1000"],
        &["cat"],
    );
    let c = client(&serve, &[]).await;
    enqueue(&c, "slow", json!({"payload": {}})).await;
    wait_inflight(&stuck, 1);
    let busy = Instant::now();
    assert_eq!(stuck.proc.wait_exit(Duration::from_secs(10)), Some(71));
    assert!(
        busy.elapsed() <= Duration::from_millis(1200 + 1000),
        "{:?}",
        busy.elapsed()
    );
    // The stuck command dies with its worker: no orphan keeps the task.
    let child = std::fs::read_to_string(&pid_file).expect("the command wrote its pid");
    let proc_dir = PathBuf::from(format!("/proc/{}", child.trim()));
    let deadline = Instant::now() + Duration::from_secs(3);
    while proc_dir.exists() && !is_zombie(&proc_dir) {
        assert!(
            Instant::now() < deadline,
            "command {} outlived its worker",
            child.trim()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    serve.proc.signal(9);
    let killed = Instant::now();
    assert_eq!(cat.proc.wait_exit(Duration::from_secs(10)), Some(70));
    assert!(
        killed.elapsed() <= Duration::from_millis(1000 + 1000),
        "{:?}",
        killed.elapsed()
    );
}

/// A dead process not yet reaped by its (new) parent still has a /proc entry.
fn is_zombie(proc_dir: &std::path::Path) -> bool {
    std::fs::read_to_string(proc_dir.join("stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}
