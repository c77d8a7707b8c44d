//! The retained-heartbeat mesh end to end, with real processes and real
//! clients: the `axion heartbeat` sidecar publishes, `axion monitor --once
//! --json` and paho-mqtt (the legacy Python way) read, and kills, signals,
//! announces, forged stale records and late wills are thrown at it.
//!
//! The broker is one parameter: `axion serve` (the product) by default,
//! Mosquitto (any external MQTT 5 broker) with `AXION_HB_BROKER=mosquitto`.
//! `axion serve` runs in its own package ([`SERVE_PACKAGE`]) so that its own
//! heartbeats (broker, bridge) stay out of the `default` package the
//! instances under test live in.

mod common;

use common::wait_until;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axion_client::fleet::{FleetWatcher, State, WatchOptions};
use axion_wire::schema::now_unix;
use axion_wire::{BrokerUrls, MqttUrl};
use common::{axion_bin, instance_port, Mosquitto, Proc, Serve};
use serde_json::{json, Value};

enum Guard {
    Mosquitto(#[allow(dead_code)] Mosquitto),
    Serve(#[allow(dead_code)] Serve),
    /// A broker the test runs itself.
    Own,
}

struct Broker {
    _guard: Guard,
    url: String,
    port: u16,
}

/// Package of `axion serve`'s own records; the tests' instances use `default`.
const SERVE_PACKAGE: &str = "hbserve";

fn use_mosquitto() -> bool {
    std::env::var("AXION_HB_BROKER").as_deref() == Ok("mosquitto")
}

fn serve() -> Serve {
    Serve::start_with(&["--package", SERVE_PACKAGE], &[])
}

fn broker() -> Broker {
    if use_mosquitto() {
        let m = Mosquitto::start();
        Broker {
            url: m.mqtt_url(),
            port: m.port,
            _guard: Guard::Mosquitto(m),
        }
    } else {
        let s = serve();
        Broker {
            url: s.mqtt_url(),
            port: s.mqtt_port,
            _guard: Guard::Serve(s),
        }
    }
}

const HOST: &str = "testhost";

fn topic(service: &str, port: u16) -> String {
    format!("axion/default/heartbeat/{service}/{HOST}:{port}")
}

/// `axion heartbeat` for `service` on `port` with a 2 s interval unless
/// `envs` says otherwise.
fn sidecar(b: &Broker, service: &str, port: u16, args: &[&str], envs: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(axion_bin());
    cmd.args([
        "heartbeat",
        "--mqtt",
        &b.url,
        "--service",
        service,
        "--hostname",
        HOST,
    ])
    .args(["--port", &port.to_string()])
    .args(args)
    .env("HEARTBEAT_INTERVAL_SECS", "2")
    .envs(envs.iter().copied());
    common::spawn_axion(&format!("axion heartbeat {service}"), &mut cmd)
}

/// `axion monitor --once --json`: the table a script would read.
fn monitor_once(b: &Broker, extra: &[&str]) -> Vec<Value> {
    common::monitor_json(&b.url, extra)
}

fn row(rows: &[Value], topic: &str) -> Option<Value> {
    rows.iter().find(|r| r["topic"] == topic).cloned()
}

/// A live reader (the library the dashboard uses) for precise timings.
struct Watcher {
    rt: tokio::runtime::Runtime,
    w: Option<FleetWatcher>,
}

impl Watcher {
    fn start(b: &Broker) -> Watcher {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let url = BrokerUrls::parse(&b.url).unwrap();
        let w = {
            let _g = rt.enter();
            FleetWatcher::start(&url, WatchOptions::default()).unwrap()
        };
        rt.block_on(w.wait_subscribed(Duration::from_secs(5)))
            .unwrap();
        Watcher { rt, w: Some(w) }
    }

    fn record(&self, topic: &str) -> Option<(State, Value)> {
        let views = self.w.as_ref()?.views(now_unix());
        let v = views.into_iter().find(|v| v.topic == topic)?;
        Some((v.state, serde_json::to_value(&v).unwrap()))
    }

    /// Waits for `topic` to reach `state`, returns the record and the time it took.
    fn wait_state(&self, topic: &str, state: State, timeout: Duration) -> (Value, Duration) {
        let start = Instant::now();
        let v = wait_until(timeout, &format!("{topic} {state:?}"), || {
            match self.record(topic) {
                Some((s, v)) if s == state => Some(v),
                _ => None,
            }
        });
        (v, start.elapsed())
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(w) = self.w.take() {
            self.rt.block_on(w.stop());
        }
    }
}

fn python() -> &'static str {
    "python3"
}

fn paho_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/heartbeat_paho.py")
}

fn mosquitto_pub(b: &Broker, topic: &str, payload: &str, retain: bool) {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &b.port.to_string(),
        "-q",
        "1",
        "-t",
        topic,
        "-m",
        payload,
    ]);
    if retain {
        cmd.arg("-r");
    }
    assert!(cmd.status().expect("run mosquitto_pub").success());
}

#[test]
fn a_dashboard_and_paho_joining_two_seconds_late_see_the_record_at_once() {
    let b = broker();
    let port = instance_port();
    let _sc = sidecar(
        &b,
        "report",
        port,
        &["--extra", "model=bge", "--extra", "gpus=2"],
        &[],
    );
    std::thread::sleep(Duration::from_secs(2));

    let start = Instant::now();
    let rows = monitor_once(&b, &[]);
    let took = start.elapsed();
    let r = row(&rows, &topic("report", port)).expect("the dashboard lists the sidecar");
    eprintln!("monitor --once --json took {took:?}");
    assert_eq!(r["state"], "online");
    assert_eq!(r["status"], "online");
    assert_eq!(r["service"], "report");
    assert_eq!(r["instance_id"], format!("{HOST}:{port}"));
    assert_eq!(r["port"], port);
    assert_eq!(r["model"], "bge");
    assert_eq!(r["gpus"], 2);
    assert_eq!(r["interval_secs"], 2);
    assert!(r["seq"].as_u64().unwrap() >= 1);
    assert!(r["age_secs"].as_f64().unwrap() < 3.0);
    assert_eq!(r["boot_id"].as_str().unwrap().len(), 36);
    for field in [
        "hostname",
        "package",
        "pid",
        "uptime_seconds",
        "timestamp",
        "connected",
        "queue_depth",
        "inflight",
    ] {
        assert!(r.get(field).is_some(), "missing {field}");
    }

    let out = Command::new(python())
        .arg(paho_script())
        .args([
            "sub",
            "127.0.0.1",
            &b.port.to_string(),
            "axion/default/heartbeat/+/+",
            "1",
        ])
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "paho got nothing: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value =
        serde_json::from_slice(out.stdout.split(|c| *c == b'\n').next().unwrap()).unwrap();
    assert_eq!(seen["_topic"], topic("report", port));
    assert_eq!(
        seen["_retain"], true,
        "a late subscriber gets the retained record"
    );
    assert_eq!(seen["boot_id"], r["boot_id"]);
}

#[test]
fn a_legacy_python_publisher_appears_in_the_monitor() {
    let b = broker();
    let port = instance_port();
    let mut child = Command::new(python())
        .arg(paho_script())
        .args([
            "pub",
            "127.0.0.1",
            &b.port.to_string(),
            "default",
            "webhook",
            &port.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let _py = Proc {
        child,
        name: "paho publisher".into(),
    };
    assert_eq!(line.trim(), "ready");
    let rows = monitor_once(&b, &["--service", "webhook"]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let r = &rows[0];
    assert_eq!(r["state"], "online");
    assert_eq!(r["lang"], "python");
    assert_eq!(r["port"], port);
    assert!(r["topic"].as_str().unwrap().ends_with(&format!(":{port}")));
}

#[test]
fn kill_9_turns_offline_lost_through_the_will_at_once() {
    let b = broker();
    let port = instance_port();
    let t = topic("worker", port);
    let w = Watcher::start(&b);
    let sc = sidecar(&b, "worker", port, &[], &[]);
    let (online, _) = w.wait_state(&t, State::Online, Duration::from_secs(5));
    sc.signal(9);
    let (offline, took) = w.wait_state(&t, State::Offline, Duration::from_secs(5));
    eprintln!("kill -9 -> offline seen after {took:?}");
    assert_eq!(offline["reason"], "lost");
    assert_eq!(offline["boot_id"], online["boot_id"]);
    assert!(took < Duration::from_secs(2), "{took:?}");
    let r = row(&monitor_once(&b, &[]), &t).unwrap();
    assert_eq!(
        (r["state"].as_str(), r["reason"].as_str()),
        (Some("offline"), Some("lost"))
    );
}

#[test]
fn sigstop_turns_offline_lost_within_one_and_a_half_keep_alives() {
    let b = broker();
    let port = instance_port();
    let t = topic("hung", port);
    let w = Watcher::start(&b);
    let sc = sidecar(&b, "hung", port, &[], &[("HEARTBEAT_INTERVAL_SECS", "60")]);
    w.wait_state(&t, State::Online, Duration::from_secs(5));
    sc.signal(19);
    let (offline, took) = w.wait_state(&t, State::Offline, Duration::from_secs(12));
    sc.signal(18);
    eprintln!("SIGSTOP -> offline seen after {took:?}");
    assert_eq!(offline["reason"], "lost");
    // Keep-alive 5 s: the broker owes the will after 7.5 s of silence;
    // Mosquitto's keep-alive sweep adds a few seconds. The goal is 15 s.
    assert!(took <= Duration::from_secs(15), "took {took:?}");
}

#[test]
fn sigterm_publishes_offline_stopped_and_exits_zero() {
    let b = broker();
    let port = instance_port();
    let t = topic("api", port);
    let w = Watcher::start(&b);
    let mut sc = sidecar(&b, "api", port, &[], &[]);
    let (online, _) = w.wait_state(&t, State::Online, Duration::from_secs(5));
    sc.signal(15);
    let (offline, took) = w.wait_state(&t, State::Offline, Duration::from_secs(3));
    eprintln!("SIGTERM -> offline seen after {took:?}");
    assert_eq!(sc.wait_exit(Duration::from_secs(5)), Some(0));
    assert_eq!(offline["reason"], "stopped");
    assert_eq!(offline["boot_id"], online["boot_id"]);
    let r = row(&monitor_once(&b, &[]), &t).unwrap();
    assert_eq!(r["reason"], "stopped", "the clean stop suppressed the will");
}

#[test]
fn a_watched_pid_that_exits_is_marked_offline_exited() {
    let b = broker();
    let port = instance_port();
    let t = topic("script", port);
    let mut sleeper = Command::new("sleep")
        .arg("1.5")
        .spawn()
        .expect("spawn sleep");
    let pid = sleeper.id().to_string();
    let w = Watcher::start(&b);
    let mut sc = sidecar(&b, "script", port, &["--pid", &pid], &[]);
    let (online, _) = w.wait_state(&t, State::Online, Duration::from_secs(5));
    assert_eq!(
        online["pid"].to_string(),
        pid,
        "the record reports the watched pid"
    );
    // The sleeper stays a zombie (unreaped) until the end: the sidecar must
    // still see it as gone.
    assert_eq!(sc.wait_exit(Duration::from_secs(6)), Some(0));
    let r = row(&monitor_once(&b, &[]), &t).unwrap();
    assert_eq!(
        (r["state"].as_str(), r["reason"].as_str()),
        (Some("offline"), Some("exited"))
    );
    sleeper.wait().unwrap();
}

#[test]
fn an_announce_makes_every_instance_republish_at_once() {
    let b = broker();
    let port = instance_port();
    let t = topic("idle", port);
    let w = Watcher::start(&b);
    let _sc = sidecar(&b, "idle", port, &[], &[("HEARTBEAT_INTERVAL_SECS", "60")]);
    let (first, _) = w.wait_state(&t, State::Online, Duration::from_secs(5));
    let seq = first["seq"].as_u64().unwrap();
    let start = Instant::now();
    mosquitto_pub(&b, "axion/default/cmd/announce", "{}", false);
    wait_until(Duration::from_secs(2), "a republished record", || {
        w.record(&t).filter(|(_, v)| v["seq"].as_u64() > Some(seq))
    });
    eprintln!("announce -> republish after {:?}", start.elapsed());
}

#[test]
fn an_old_timestamp_shows_stale_whatever_the_status_says() {
    let b = broker();
    let t = "axion/legacy/heartbeat/report/oldhost:9400";
    let old = now_unix() - 100.0;
    let record = json!({"service": "report", "instance_id": "oldhost:9400", "hostname": "oldhost",
        "port": 9400, "package": "legacy", "pid": 1, "uptime_seconds": 5, "timestamp": old,
        "status": "online"});
    mosquitto_pub(&b, t, &record.to_string(), true);
    let rows = monitor_once(&b, &["--package", "legacy"]);
    let r = row(&rows, t).expect("listed");
    assert_eq!(r["state"], "stale");
    assert!(r["age_secs"].as_f64().unwrap() >= 100.0);
    // The threshold is a flag.
    let r = row(&monitor_once(&b, &["--stale-secs", "1000"]), t).unwrap();
    assert_eq!(r["state"], "online");
}

#[test]
fn restarts_are_not_overwritten_by_an_earlier_runs_will() {
    let b = broker();
    let port = instance_port();
    let t = topic("flappy", port);
    let w = Watcher::start(&b);
    let mut sc = sidecar(
        &b,
        "flappy",
        port,
        &[],
        &[("HEARTBEAT_INTERVAL_SECS", "60")],
    );
    let (mut current, _) = w.wait_state(&t, State::Online, Duration::from_secs(5));
    for round in 0..3 {
        sc.signal(9);
        let _ = sc.wait_exit(Duration::from_secs(5));
        sc = sidecar(
            &b,
            "flappy",
            port,
            &[],
            &[("HEARTBEAT_INTERVAL_SECS", "60")],
        );
        let boot = current["boot_id"].clone();
        current = wait_until(Duration::from_secs(5), "the new run online", || {
            w.record(&t)
                .filter(|(s, v)| *s == State::Online && v["boot_id"] != boot)
                .map(|(_, v)| v)
        });
        // A dashboard starting now sees the new run, not a will.
        let r = row(&monitor_once(&b, &[]), &t).unwrap();
        assert_eq!(
            (r["state"].as_str(), &r["boot_id"]),
            (Some("online"), &current["boot_id"]),
            "round {round}"
        );
    }

    // A late will of an earlier run (older boot, older timestamp) lands on
    // the retained topic after the new run is online.
    let mut late = current.clone();
    late["boot_id"] = json!("an-earlier-run");
    late["status"] = json!("offline");
    late["reason"] = json!("lost");
    late["timestamp"] = json!(current["timestamp"].as_f64().unwrap() - 30.0);
    mosquitto_pub(&b, &t, &late.to_string(), true);
    // The live reader drops it; the instance re-asserts its retained record.
    let start = Instant::now();
    wait_until(
        Duration::from_secs(3),
        "the instance to re-assert its record",
        || {
            let r = row(&monitor_once(&b, &[]), &t)?;
            (r["state"] == "online" && r["boot_id"] == current["boot_id"]).then_some(())
        },
    );
    eprintln!(
        "late will corrected on the broker after {:?}",
        start.elapsed()
    );
    let (s, v) = w.record(&t).unwrap();
    assert_eq!((s, &v["boot_id"]), (State::Online, &current["boot_id"]));
}

/// A broker that can be killed and started again on the same port.
enum Restartable {
    Serve(Serve),
    Mosquitto {
        proc: Proc,
        dir: tempfile::TempDir,
        port: u16,
    },
}

impl Restartable {
    fn start() -> Restartable {
        if use_mosquitto() {
            let dir = tempfile::tempdir().unwrap();
            let port = common::port_known_in_advance();
            Restartable::Mosquitto {
                proc: common::spawn_mosquitto(port, dir.path()),
                dir,
                port,
            }
        } else {
            Restartable::Serve(serve())
        }
    }

    fn port(&self) -> u16 {
        match self {
            Restartable::Serve(s) => s.mqtt_port,
            Restartable::Mosquitto { port, .. } => *port,
        }
    }

    /// `kill -9`, then the same broker on the same port.
    fn kill_9_and_restart(&mut self) {
        match self {
            Restartable::Serve(s) => s.restart(&["--package", SERVE_PACKAGE], &[]),
            Restartable::Mosquitto { proc, dir, port } => {
                proc.signal(9);
                let _ = proc.wait_exit(Duration::from_secs(5));
                *proc = common::spawn_mosquitto(*port, dir.path());
            }
        }
    }
}

#[test]
fn after_a_broker_restart_every_record_is_back_within_one_reconnect() {
    let mut broker = Restartable::start();
    let port = broker.port();
    let b = Broker {
        _guard: Guard::Own,
        url: format!("mqtt://127.0.0.1:{port}"),
        port,
    };
    let ports: Vec<u16> = (0..3).map(|_| instance_port()).collect();
    let _scs: Vec<Proc> = ports
        .iter()
        .map(|p| sidecar(&b, "fleet", *p, &[], &[("HEARTBEAT_INTERVAL_SECS", "60")]))
        .collect();
    // Set-up, not what is measured: on two cores busy with the other tests
    // three sidecars and the broker took over 5 s to start once.
    wait_until(Duration::from_secs(15), "three online", || {
        (monitor_once(&b, &["--service", "fleet"])
            .iter()
            .filter(|r| r["state"] == "online")
            .count()
            == 3)
            .then_some(())
    });
    broker.kill_9_and_restart();
    let start = Instant::now();
    // The restarted broker has no retained records until the instances reconnect.
    wait_until(Duration::from_secs(8), "three online again", || {
        (monitor_once(&b, &["--service", "fleet"])
            .iter()
            .filter(|r| r["state"] == "online")
            .count()
            == 3)
            .then_some(())
    });
    eprintln!(
        "all records back {:?} after the broker restart",
        start.elapsed()
    );
}

#[test]
fn ghosts_expire_on_a_broker_that_honours_message_expiry() {
    let b = broker();
    let port = instance_port();
    let t = topic("ghost", port);
    let w = Watcher::start(&b);
    let sc = sidecar(&b, "ghost", port, &[], &[("HEARTBEAT_GHOST_SECS", "2")]);
    w.wait_state(&t, State::Online, Duration::from_secs(5));
    sc.signal(9);
    w.wait_state(&t, State::Offline, Duration::from_secs(5));
    let start = Instant::now();
    wait_until(
        Duration::from_secs(6),
        "the expired record to vanish",
        || row(&monitor_once(&b, &[]), &t).is_none().then_some(()),
    );
    eprintln!("ghost gone {:?} after the will", start.elapsed());
}

#[test]
fn the_janitor_clears_records_older_than_the_ghost_time() {
    let b = broker();
    let t = "axion/default/heartbeat/old/gone:1";
    let record = json!({"service": "old", "instance_id": "gone:1", "hostname": "gone", "port": 1,
        "timestamp": now_unix() - 10.0, "status": "offline", "reason": "lost", "boot_id": "x"});
    // No message expiry: only the janitor can remove it.
    mosquitto_pub(&b, t, &record.to_string(), true);
    let live = topic("alive", instance_port());
    let _sc = sidecar(
        &b,
        "alive",
        live.rsplit(':').next().unwrap().parse().unwrap(),
        &[],
        &[("HEARTBEAT_INTERVAL_SECS", "1")],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let janitor = {
        let _g = rt.enter();
        axion_client::spawn_janitor(&BrokerUrls::parse(&b.url).unwrap(), Duration::from_secs(2))
    };
    let start = Instant::now();
    wait_until(
        Duration::from_secs(6),
        "the janitor to clear the ghost",
        || row(&monitor_once(&b, &[]), t).is_none().then_some(()),
    );
    eprintln!("janitor cleared the ghost after {:?}", start.elapsed());
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "not before the ghost time"
    );
    assert!(
        row(&monitor_once(&b, &[]), &live).is_some(),
        "a live instance is never cleared"
    );
    janitor.abort();
}

#[test]
fn ten_thousand_instances_are_all_listed_online() {
    let b = broker();
    let n = 10_000;
    let rt = tokio::runtime::Runtime::new().unwrap();
    // One connection publishes 10,000 distinct retained records: the broker
    // and the dashboard see what 10,000 instances would leave behind.
    rt.block_on(async {
        let mut opts = rumqttc::v5::MqttOptions::new("hb-scale", "127.0.0.1", b.port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_outgoing_inflight_upper_limit(100);
        let (client, mut el) = rumqttc::v5::AsyncClient::new(opts, 1000);
        let poll = tokio::spawn(async move {
            let mut acked = 0;
            while acked < n {
                if let rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::PubAck(_)) = el.poll().await.expect("poll") {
                    acked += 1;
                }
            }
        });
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        for i in 0..n {
            let record = json!({"service": "sim", "instance_id": format!("sim:{i}"), "hostname": "sim",
                "port": i, "package": "scale", "pid": i, "uptime_seconds": 1, "timestamp": now,
                "status": "online", "boot_id": format!("boot-{i}"), "seq": 1});
            client
                .publish(format!("axion/scale/heartbeat/sim/sim:{i}"), rumqttc::v5::mqttbytes::QoS::AtLeastOnce, true, record.to_string())
                .await
                .unwrap();
        }
        tokio::time::timeout(Duration::from_secs(60), poll).await.unwrap().unwrap();
    });
    let start = Instant::now();
    let rows = monitor_once(&b, &["--package", "scale"]);
    let took = start.elapsed();
    eprintln!(
        "monitor --once --json listed {} instances in {took:?}",
        rows.len()
    );
    assert_eq!(rows.len(), n);
    assert!(rows.iter().all(|r| r["state"] == "online"));
    // How long it took is printed, not asserted (a loaded CI machine is
    // no measure); BENCHMARKS.md records it from a release build.
}

/// `axion monitor --once` lists each Axion broker's counters under the
/// table, read from the `"broker"` object of its heartbeat record; and
/// `axion serve`'s bridge says it is connected within seconds of start,
/// not one heartbeat interval (15 s) later.
#[test]
fn monitor_once_shows_serve_connected_with_its_broker_counters() {
    if use_mosquitto() {
        return;
    }
    let s = serve();
    let monitor = |extra: &[&str]| {
        let out = Command::new(axion_bin())
            .args(["monitor", "--once", "--mqtt", &s.mqtt_url()])
            .args(["--package", SERVE_PACKAGE, "--settle-ms", "200"])
            .args(extra)
            .output()
            .expect("run axion monitor");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let line = wait_until(Duration::from_secs(8), "the broker's counters", || {
        monitor(&[])
            .lines()
            .find(|l| l.starts_with("broker ") && l.contains(&format!(":{}: ", s.mqtt_port)))
            .map(str::to_string)
    });
    for counter in [
        "sessions ",
        "refused at limit 0",
        "slow consumers cut off 0",
        "router renewals 0",
    ] {
        assert!(line.contains(counter), "{counter:?} missing from {line:?}");
    }
    wait_until(
        Duration::from_secs(5),
        "the bridge's record to say connected",
        || {
            let rows: Vec<Value> = serde_json::from_str(&monitor(&["--json"])).ok()?;
            rows.iter()
                .any(|r| r["service"] == "bridge" && r["connected"] == true)
                .then_some(())
        },
    );
}

#[test]
fn the_dashboard_renders_in_a_terminal_sorts_and_quits_on_q() {
    let b = broker();
    let port = instance_port();
    let _sc = sidecar(&b, "tui-demo", port, &[], &[]);
    let socket = format!("axion-hb-test-{}-{port}", std::process::id());
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(["-L", &socket])
            .args(args)
            .output()
            .expect("run tmux (apt-get install tmux)")
    };
    let cmdline = format!(
        "{} monitor --mqtt {} --package default",
        axion_bin().display(),
        b.url
    );
    assert!(tmux(&[
        "new-session",
        "-d",
        "-s",
        "mon",
        "-x",
        "180",
        "-y",
        "30",
        &cmdline
    ])
    .status
    .success());
    let screen =
        || String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", "mon"]).stdout).into_owned();
    let shown = wait_until(Duration::from_secs(8), "the instance on screen", || {
        let s = screen();
        (s.contains("tui-demo") && s.contains(&format!("{HOST}:{port}")) && s.contains("online"))
            .then_some(s)
    });
    assert!(shown.contains("1 online"), "header counts:\n{shown}");
    assert!(shown.contains("sort: instance"), "{shown}");
    tmux(&["send-keys", "-t", "mon", "s"]);
    wait_until(Duration::from_secs(3), "the sort to change", || {
        screen().contains("sort: state").then_some(())
    });
    tmux(&["send-keys", "-t", "mon", "q"]);
    wait_until(Duration::from_secs(3), "the dashboard to quit", || {
        (!tmux(&["has-session", "-t", "mon"]).status.success()).then_some(())
    });
    let _ = tmux(&["kill-server"]);
}

#[test]
fn the_rust_publisher_reports_live_fields_draining_and_a_clean_stop() {
    use axion_client::{HeartbeatConfig, HeartbeatPublisher};
    let b = broker();
    let port = instance_port();
    let t = topic("embedder", port);
    let w = Watcher::start(&b);
    let mut config =
        HeartbeatConfig::new(MqttUrl::parse(&b.url).unwrap(), "default", "embedder").unwrap();
    config.host = Some(HOST.into());
    config.port = Some(port);
    config.interval = Duration::from_secs(60);
    config.extras.insert("model".into(), json!("bge-small"));
    let hb = {
        let _g = w.rt.enter();
        HeartbeatPublisher::start(config).unwrap()
    };
    assert_eq!(hb.topic(), t);
    let (first, _) = w.wait_state(&t, State::Online, Duration::from_secs(5));
    assert_eq!(first["queue_depth"], 0);
    assert_eq!(first["pid"], std::process::id());

    hb.set_queue_depth(7);
    hb.set_inflight(2);
    hb.set_connected(false);
    hb.record_job(Duration::from_millis(40));
    hb.publish_now();
    let live = wait_until(Duration::from_secs(3), "the live fields", || {
        w.record(&t)
            .map(|(_, v)| v)
            .filter(|v| v["queue_depth"] == 7)
    });
    assert_eq!(live["inflight"], 2);
    assert_eq!(live["connected"], false);
    assert_eq!(live["avg_job_ms"], 40.0);
    assert!(live["last_progress_ts"].as_f64().unwrap() > now_unix() - 5.0);
    assert_eq!(live["model"], "bge-small");
    assert_eq!(live["boot_id"], first["boot_id"]);

    w.rt.block_on(hb.set_draining()).unwrap();
    w.wait_state(&t, State::Draining, Duration::from_secs(3));
    w.rt.block_on(hb.stop("stopped"))
        .expect("offline record acknowledged");
    let (offline, _) = w.wait_state(&t, State::Offline, Duration::from_secs(3));
    assert_eq!(offline["reason"], "stopped");
    assert!(offline["seq"].as_u64() > live["seq"].as_u64());
}

/// `stop` returns only once the DISCONNECT is on the wire, so a process
/// that exits right after it never has its will (`lost`) replace `stopped`.
#[test]
fn a_process_exiting_right_after_stop_leaves_stopped_not_lost() {
    use axion_client::{HeartbeatConfig, HeartbeatPublisher};
    let b = broker();
    let url = MqttUrl::parse(&b.url).unwrap();
    let port = instance_port();
    // Each round is a whole process life: the runtime goes away the moment
    // `stop` returns, as it does when `main` returns.
    let topics: Vec<String> = (0..10)
        .map(|i| {
            let service = format!("quick{i}");
            let mut config = HeartbeatConfig::new(url.clone(), "default", &service).unwrap();
            config.host = Some(HOST.into());
            config.port = Some(port);
            config.interval = Duration::from_secs(60);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let hb = HeartbeatPublisher::start(config).unwrap();
                let deadline = Instant::now() + Duration::from_secs(5);
                while !hb.is_publishing() {
                    assert!(Instant::now() < deadline, "{service} never connected");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                hb.stop("stopped")
                    .await
                    .expect("offline record acknowledged");
            });
            drop(rt);
            topic(&service, port)
        })
        .collect();
    // A will would have been published as soon as the broker saw a socket
    // close without DISCONNECT, before this monitor connects.
    let rows = monitor_once(&b, &["--package", "default"]);
    for t in &topics {
        let r = row(&rows, t).unwrap_or_else(|| panic!("{t} listed"));
        assert_eq!(
            (r["state"].as_str(), r["reason"].as_str()),
            (Some("offline"), Some("stopped")),
            "{t}"
        );
    }
}
