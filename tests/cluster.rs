//! A fleet on clustered MQTT brokers that are not Axion: two ejabberd
//! nodes clustered together (no shared subscriptions, so the queue owner
//! delivers each task on its worker's own topic), and two Mosquitto
//! brokers bridged to each other. Every task must be done once, or the
//! owner must count the extra runs; the monitor on one node must see the
//! instances connected to the other; legacy WebSocket events must cross
//! the nodes through the bridge; killing a node moves everyone to the one
//! left, and the monitor there sees them all back online.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axion_bench::ejabberd::Cluster;
use common::{axion_bin, Proc};
use serde_json::Value;

const PKG: &str = "cl";
const QUEUE: &str = "jobs";

fn spawn_owner(mqtt: &str, dir: &Path, extra: &[&str]) -> Proc {
    common::spawn_queue_owner(mqtt, PKG, dir, extra)
}

fn spawn_work(mqtt: &str, done: &Path, extra: &[&str]) -> common::Listening {
    common::spawn_counting_worker(mqtt, PKG, QUEUE, done, extra)
}

/// `axion queue enqueue` of each id in turn, each retried until the owner
/// confirms it on disk (a confirmed task must never be lost).
fn produce(mqtt: String, ids: Vec<String>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for id in ids {
            common::wait_until(Duration::from_secs(30), "the enqueue confirmed", || {
                let out = Command::new(axion_bin())
                    .args(["queue", "--mqtt", &mqtt, "--package", PKG, "enqueue", QUEUE])
                    .args(["--payload", "{\"n\":1}", "--id", &id])
                    .env("RUST_LOG", "error")
                    .stdout(Stdio::null())
                    .output()
                    .expect("run axion queue enqueue");
                out.status.success().then_some(())
            });
        }
    })
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:03}")).collect()
}

/// How often each task ran, once every id in `ids` ran at least once.
fn wait_all_done(done: &Path, ids: &[String], within: Duration) -> Vec<(String, usize)> {
    common::wait_until(within, "every task done", || {
        ids.iter()
            .map(|id| {
                let runs = std::fs::read_to_string(done.join(id)).ok()?.lines().count();
                Some((id.clone(), runs))
            })
            .collect::<Option<Vec<_>>>()
    })
}

/// The queue's stats as the owner's retained record says on `mqtt`.
fn stats(mqtt: &str) -> Option<Value> {
    let out = Command::new(axion_bin())
        .args(["queue", "--mqtt", mqtt, "--package", PKG, "ls", "--json"])
        .env("RUST_LOG", "error")
        .output()
        .expect("run axion queue ls");
    let all: Vec<Value> = serde_json::from_slice(&out.stdout).ok()?;
    all.into_iter().find(|s| s["queue"] == QUEUE)
}

/// `axion bridge` for the package on the nodes `mqtt`, once it says it is
/// connected to one of them.
fn spawn_bridge(mqtt: &str) -> common::Listening {
    let bridge = common::spawn_listening(
        "axion bridge",
        Command::new(axion_bin())
            .args(["bridge", "--mqtt", mqtt, "--package", PKG])
            .args(["--ws-listen", "127.0.0.1:0"]),
    );
    let port = bridge.port(axion_wire::ports::WS);
    common::wait_until(Duration::from_secs(20), "the bridge ready", || {
        (common::http_get(port, "/health/ready").map(|(s, _)| s) == Some(200)).then_some(())
    });
    bridge
}

/// `js_driver.js cluster`: legacy WebSocket clients (`brokerClient.js`) on
/// the bridge at `ws_port` and an MQTT.js client on the node `mqtt`; its
/// JSON summary.
fn ws_events_cross(ws_port: u16, mqtt: &str) -> Value {
    let out = Command::new("node")
        .arg("js_driver.js")
        .arg("cluster")
        .arg(format!("ws://127.0.0.1:{ws_port}"))
        .args([mqtt, PKG])
        .current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients"))
        .output()
        .expect("run node (scripts/setup.sh installs it; npm ci in tests/)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "js_driver.js cluster failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().rev().find(|l| l.starts_with('{'));
    serde_json::from_str(line.unwrap_or_default()).expect("the driver's JSON summary")
}

/// Services online in `axion monitor --once` on `mqtt`, as
/// `service/instance` ids.
fn online(mqtt: &str) -> Vec<String> {
    let mut rows: Vec<String> = online_rows(mqtt).iter().map(instance).collect();
    rows.sort();
    rows
}

/// The rows of `axion monitor --once --json` on `mqtt` whose state is
/// online.
fn online_rows(mqtt: &str) -> Vec<Value> {
    common::monitor_json_settled(mqtt, 1000, &["--package", PKG])
        .into_iter()
        .filter(|r| r["state"] == "online")
        .collect()
}

/// A monitor row's `service/instance` id.
fn instance(row: &Value) -> String {
    format!(
        "{}/{}",
        row["service"].as_str().unwrap_or(""),
        row["instance_id"].as_str().unwrap_or("")
    )
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

#[test]
fn ejabberd_cluster_runs_each_task_once_and_survives_losing_a_node() {
    let started = Instant::now();
    let cluster = Cluster::start(2).expect("ejabberd cluster");
    let [a, b] = [cluster.urls()[0].clone(), cluster.urls()[1].clone()];
    let (ab, ba) = (format!("{a},{b}"), format!("{b},{a}"));
    let store = tempfile::tempdir().expect("tempdir");
    let done = tempfile::tempdir().expect("tempdir");
    // The owner on node A; a worker on each node. Nothing is told about
    // shared subscriptions: ejabberd's CONNACK says it has none.
    let _owner = spawn_owner(&ab, store.path(), &["--ack-wait-ms", "5000"]);
    let mut on_a = spawn_work(&ab, done.path(), &[]);
    let mut on_b = spawn_work(&ba, done.path(), &[]);
    let mut bridge = spawn_bridge(&ba);
    eprintln!("cluster and fleet up after {:?}", started.elapsed());

    // Producers on both nodes.
    let first: Vec<String> = ids("a", 15).into_iter().chain(ids("b", 15)).collect();
    let p1 = produce(ab.clone(), first[..15].to_vec());
    let p2 = produce(ba.clone(), first[15..].to_vec());
    p1.join().expect("producer on A");
    p2.join().expect("producer on B");
    let runs = wait_all_done(done.path(), &first, Duration::from_secs(30));
    let twice: Vec<_> = runs.iter().filter(|(_, n)| *n != 1).collect();
    assert!(twice.is_empty(), "tasks not run exactly once: {twice:?}");

    // The monitor on node B sees the owner, both workers and the bridge,
    // wherever they are connected.
    let expected = 4;
    let seen = common::wait_until(
        Duration::from_secs(10),
        "every instance on B's monitor",
        || {
            let rows = online(&b);
            (rows.len() >= expected).then_some(rows)
        },
    );
    eprintln!("monitor on B: {seen:?}");
    assert!(
        seen.iter().filter(|r| r.starts_with("work-jobs/")).count() == 2,
        "{seen:?}"
    );
    assert!(seen.iter().any(|r| r.starts_with("queues/")), "{seen:?}");
    assert!(seen.iter().any(|r| r.starts_with("bridge/")), "{seen:?}");
    // Node A's monitor lists the same fleet.
    let monitor_a = common::wait_until(
        Duration::from_secs(10),
        "every instance on A's monitor",
        || {
            let rows = online(&a);
            (rows.len() >= expected).then_some(rows)
        },
    );
    assert_eq!(monitor_a, seen, "both nodes' monitors list the same fleet");

    // Legacy WebSocket clients on the bridge (connected to B) and an MQTT
    // client on A: an event crosses the nodes each way.
    let crossed = ws_events_cross(bridge.port(axion_wire::ports::WS), &a);
    assert_eq!(crossed["ping"]["source"], "mqtt", "{crossed}");
    assert_eq!(crossed["pong"]["type"], "cl.pong", "{crossed}");

    // Each instance as the monitor saw it before the kill, by its boot
    // (a restarted process would have a new one).
    let before: Vec<(String, Value)> = online_rows(&b)
        .iter()
        .map(|r| (instance(r), r["boot_id"].clone()))
        .collect();
    assert_eq!(before.len(), expected, "{before:?}");

    // Node A dies: everyone moves to B, and what producers get confirmed
    // from now on is done as well.
    cluster.nodes[0].signal(9).expect("kill node A");
    let killed = Instant::now();
    let killed_at = unix_now();
    let second: Vec<String> = ids("c", 10).into_iter().chain(ids("d", 10)).collect();
    let p1 = produce(ab.clone(), second[..10].to_vec());
    let p2 = produce(ba.clone(), second[10..].to_vec());
    // Meanwhile the monitor on B sees every instance online again, each
    // the same process with a record published after the kill: those that
    // were on A have failed over to B (A's records died with it).
    let back = common::wait_until(
        Duration::from_secs(15),
        "every instance online again on B's monitor",
        || {
            let rows = online_rows(&b);
            let fresh = |(id, boot): &(String, Value)| {
                rows.iter().any(|r| {
                    instance(r) == *id
                        && r["boot_id"] == *boot
                        && r["timestamp"].as_f64().is_some_and(|t| t > killed_at)
                })
            };
            before.iter().all(fresh).then_some(rows)
        },
    );
    eprintln!(
        "every instance online on B {:?} after the kill: {:?}",
        killed.elapsed(),
        back.iter().map(instance).collect::<Vec<_>>()
    );
    p1.join().expect("producer on A then B");
    p2.join().expect("producer on B");
    let runs = wait_all_done(done.path(), &second, Duration::from_secs(30));
    eprintln!("after the kill, every task done in {:?}", killed.elapsed());
    let twice: Vec<_> = runs.iter().filter(|(_, n)| *n != 1).collect();
    assert!(twice.is_empty(), "tasks not run exactly once: {twice:?}");
    for (what, work) in [
        ("the worker on A", &mut on_a),
        ("the worker on B", &mut on_b),
        ("the bridge", &mut bridge),
    ] {
        assert!(
            work.proc.child.try_wait().expect("try_wait").is_none(),
            "{what} exited; node B log: {}",
            cluster.nodes[1].log()
        );
    }
    let stats = common::wait_until(Duration::from_secs(10), "the queue's stats on B", || {
        stats(&b).filter(|s| s["acked_total"] == 50)
    });
    assert_eq!(stats["stray_acks_total"], 0, "{stats}");
    eprintln!("whole test {:?}", started.elapsed());
}

/// `axion queue ls --json` on `mqtt`, waiting `owner_wait_ms` for the
/// owner's answer: the listed queues and what it said on stderr.
fn ls(mqtt: &str, owner_wait_ms: &str) -> (Vec<Value>, String) {
    let out = Command::new(axion_bin())
        .args(["queue", "--mqtt", mqtt, "--package", PKG, "ls", "--json"])
        .args(["--owner-wait-ms", owner_wait_ms])
        .env("RUST_LOG", "error")
        .output()
        .expect("run axion queue ls");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "axion queue ls failed: {err}");
    (serde_json::from_slice(&out.stdout).expect("ls json"), err)
}

/// ejabberd keeps a retained message on the node it was published to, so
/// the owner's retained stats on node B are not there for a reader on
/// node A; `axion queue ls` on A gets them from the owner itself.
#[test]
fn queue_ls_on_one_node_gets_the_stats_of_an_owner_on_the_other() {
    let cluster = Cluster::start(2).expect("ejabberd cluster");
    let [a, b] = [cluster.urls()[0].clone(), cluster.urls()[1].clone()];
    let store = tempfile::tempdir().expect("tempdir");
    let _owner = spawn_owner(&b, store.path(), &[]);
    let queued = ids("q", 4);
    produce(b.clone(), queued).join().expect("producer on B");
    // The owner's retained record on B says so within its refresh
    // interval; A never gets it.
    common::wait_until(Duration::from_secs(10), "retained stats on B", || {
        let (listed, _) = ls(&b, "0");
        listed
            .iter()
            .any(|s| s["queue"] == QUEUE && s["depth"] == 4)
            .then_some(())
    });
    let (retained_on_a, err) = ls(&a, "0");
    assert!(err.contains("no queue owner answered"), "{err}");
    assert!(
        retained_on_a.iter().all(|s| s["queue"] != QUEUE),
        "node A holds the retained stats after all, so this test proves nothing: {retained_on_a:?}"
    );

    let (listed, err) = ls(&a, "5000");
    assert!(!err.contains("no queue owner answered"), "{err}");
    let jobs = listed.iter().find(|s| s["queue"] == QUEUE);
    assert_eq!(
        jobs.map(|s| (s["depth"].clone(), s["enqueued_total"].clone())),
        Some((Value::from(4), Value::from(4))),
        "{listed:?}"
    );
}

/// Two Mosquitto brokers bridged to each other (`axion/#` both ways, over
/// MQTT 5 so Response Topics cross), as (A, B).
fn bridged_mosquittos(dir: &Path) -> (Proc, u16, Proc, u16) {
    let start = |name: &str, port: u16, extra: &str| {
        common::spawn_mosquitto_with(&format!("mosquitto {name}"), port, dir, extra)
    };
    let (pa, pb) = (
        common::port_known_in_advance(),
        common::port_known_in_advance(),
    );
    let a = start("a", pa, "");
    let b = start(
        "b",
        pb,
        &format!(
            "connection to-a\naddress 127.0.0.1:{pa}\nbridge_protocol_version mqttv50\n\
             topic axion/# both 1\ncleansession true\ntry_private true\n"
        ),
    );
    (a, pa, b, pb)
}

/// Owner on A, a worker on each broker (taking tasks as `worker_flags`
/// say), producers on both: how often each task ran, and the owner's stats
/// once every task is acked.
fn run_on_bridged_pair(worker_flags: &[&str]) -> (Vec<(String, usize)>, Value) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ma, pa, _mb, pb) = bridged_mosquittos(dir.path());
    let (a, b) = (
        format!("mqtt://127.0.0.1:{pa}"),
        format!("mqtt://127.0.0.1:{pb}"),
    );
    let store = tempfile::tempdir().expect("tempdir");
    let done = tempfile::tempdir().expect("tempdir");
    let _owner = spawn_owner(&a, store.path(), &["--ack-wait-ms", "5000"]);
    let _on_a = spawn_work(&a, done.path(), worker_flags);
    let _on_b = spawn_work(&b, done.path(), worker_flags);
    let all: Vec<String> = ids("a", 15).into_iter().chain(ids("b", 15)).collect();
    let p1 = produce(a.clone(), all[..15].to_vec());
    let p2 = produce(b.clone(), all[15..].to_vec());
    p1.join().expect("producer on A");
    p2.join().expect("producer on B");
    let runs = wait_all_done(done.path(), &all, Duration::from_secs(30));
    let settled = common::wait_until(Duration::from_secs(20), "every task acked", || {
        stats(&a).filter(|s| s["acked_total"] == 30 && s["inflight"] == 0 && s["depth"] == 0)
    });
    // Late copies finish too before the runs are counted again.
    std::thread::sleep(Duration::from_millis(500));
    let runs = runs
        .into_iter()
        .map(|(id, _)| {
            let n = std::fs::read_to_string(done.path().join(&id))
                .map(|t| t.lines().count())
                .unwrap_or(0);
            (id, n)
        })
        .collect();
    (runs, stats(&a).unwrap_or(settled))
}

#[test]
fn bridged_mosquittos_with_directed_delivery_run_each_task_once() {
    let (runs, stats) = run_on_bridged_pair(&["--directed-delivery"]);
    let twice: Vec<_> = runs.iter().filter(|(_, n)| *n != 1).collect();
    assert!(twice.is_empty(), "tasks not run exactly once: {twice:?}");
    assert_eq!(stats["stray_acks_total"], 0, "{stats}");
}

#[test]
fn bridged_mosquittos_with_shared_subscriptions_count_every_extra_run() {
    // Each broker's shared group gets its own copy of every task: the
    // owner must say so, never stay silent.
    let (runs, stats) = run_on_bridged_pair(&[]);
    let extra: usize = runs.iter().map(|(_, n)| n.saturating_sub(1)).sum();
    eprintln!("extra runs: {extra}, owner's stats: {stats}");
    let stray = stats["stray_acks_total"].as_u64().unwrap_or(0);
    if extra > 0 {
        assert!(stray > 0, "{extra} extra runs, none counted: {stats}");
    } else {
        assert_eq!(stray, 0, "{stats}");
    }
}
