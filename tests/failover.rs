//! Components given several broker URLs (`--mqtt A,B`) fail over between
//! them: two independent `axion serve` stand in for the nodes of a
//! clustered broker, node A is killed with SIGKILL, and the queue owner, a
//! worker, a producer, the heartbeat and `axion monitor` carry on on B.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{axion_bin, Proc, Serve};
use serde_json::Value;

const PKG: &str = "fo";
const QUEUE: &str = "jobs";

/// Both nodes; their own queue owners serve another package, so the one
/// under test is the standalone `axion queues`.
fn two_nodes() -> (Serve, Serve) {
    (Serve::start(), Serve::start())
}

fn urls(first: &Serve, second: &Serve) -> String {
    format!("{},{}", first.mqtt_url(), second.mqtt_url())
}

fn spawn_owner(mqtt: &str, dir: &Path) -> Proc {
    common::spawn_queue_owner(mqtt, PKG, dir, &[])
}

fn spawn_work(mqtt: &str, done: &Path, extra: &[&str]) -> common::Listening {
    common::spawn_counting_worker(mqtt, PKG, QUEUE, done, extra)
}

/// `axion queue enqueue`, which returns once the owner has the task on
/// disk; retried while the owner is not answering yet.
fn enqueue(mqtt: &str, id: &str) {
    common::wait_until(Duration::from_secs(20), "the enqueue confirmed", || {
        let out = Command::new(axion_bin())
            .args(["queue", "--mqtt", mqtt, "--package", PKG, "enqueue", QUEUE])
            .args(["--payload", "{\"n\":1}", "--id", id])
            .env("RUST_LOG", "warn")
            .output()
            .expect("run axion queue enqueue");
        out.status.success().then_some(())
    });
}

fn wait_done(done: &Path, id: &str, within: Duration) {
    common::wait_until(within, &format!("task {id} done"), || {
        done.join(id).exists().then_some(())
    });
}

/// The `axion work` instance's heartbeat row, as `axion monitor` on
/// `mqtt` shows it.
fn work_row(mqtt: &str) -> Option<Value> {
    let prefix = format!("axion/{PKG}/heartbeat/work-{QUEUE}/");
    common::monitor_json(mqtt, &["--package", PKG])
        .into_iter()
        .find(|r| r["topic"].as_str().is_some_and(|t| t.starts_with(&prefix)))
}

#[test]
fn the_owner_a_worker_and_a_producer_carry_on_on_the_second_node() {
    let (a, b) = two_nodes();
    let both = urls(&a, &b);
    let store = tempfile::tempdir().expect("tempdir");
    let done = tempfile::tempdir().expect("tempdir");
    let _owner = spawn_owner(&both, store.path());
    let mut work = spawn_work(&both, done.path(), &[]);

    enqueue(&both, "before");
    wait_done(done.path(), "before", Duration::from_secs(20));
    assert!(
        work_row(&a.mqtt_url()).is_some(),
        "the worker beats on the first node while it is up"
    );

    a.proc.signal(9);
    let killed = Instant::now();
    // The producer's first URL is dead now: it moves on as well.
    enqueue(&both, "after");
    wait_done(done.path(), "after", Duration::from_secs(20));
    eprintln!(
        "task enqueued and done on B {:?} after A was killed",
        killed.elapsed()
    );

    let row = common::wait_until(Duration::from_secs(10), "the worker's record on B", || {
        work_row(&b.mqtt_url()).filter(|r| r["status"] == "online")
    });
    assert_eq!(row["state"], "online", "{row}");
    assert!(
        work.proc.child.try_wait().expect("try_wait").is_none(),
        "axion work still runs"
    );
}

#[test]
fn the_monitor_reads_the_fleet_past_a_dead_first_node() {
    let (dead, live) = two_nodes();
    let done = tempfile::tempdir().expect("tempdir");
    let _work = spawn_work(&live.mqtt_url(), done.path(), &[]);
    let dead_first = urls(&dead, &live);
    drop(dead);
    let row = common::wait_until(Duration::from_secs(10), "the worker in the monitor", || {
        work_row(&dead_first)
    });
    assert_eq!(row["status"], "online", "{row}");
}

/// Exit 70 counts the time no node is reachable: a service whose first
/// node dies keeps running on the second well past `--disconnect-kill-ms`,
/// and exits 70 only once both are gone.
#[test]
fn a_service_exits_70_only_when_no_node_is_left() {
    let (a, mut b) = two_nodes();
    let both = urls(&a, &b);
    let done = tempfile::tempdir().expect("tempdir");
    let mut work = spawn_work(&both, done.path(), &["--disconnect-kill-ms", "1500"]);
    common::wait_until(Duration::from_secs(10), "the worker on A", || {
        work_row(&a.mqtt_url())
    });

    a.proc.signal(9);
    common::wait_until(Duration::from_secs(10), "the worker on B", || {
        work_row(&b.mqtt_url()).filter(|r| r["status"] == "online")
    });
    // Three times the limit since A died, the service still runs.
    let since_kill = Instant::now();
    while since_kill.elapsed() < Duration::from_millis(4500) {
        assert_eq!(
            work.proc
                .child
                .try_wait()
                .expect("try_wait")
                .map(|s| s.code()),
            None,
            "axion work exited while B was up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    b.proc.signal(9);
    let _ = b.proc.child.wait();
    let killed = Instant::now();
    let code = work.proc.wait_exit(Duration::from_secs(15));
    eprintln!(
        "both nodes down -> exit {code:?} after {:?}",
        killed.elapsed()
    );
    assert_eq!(code, Some(70), "exit code with no node reachable");
}
