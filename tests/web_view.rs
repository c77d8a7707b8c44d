//! The fleet view page of `axion serve` in a real headless Chromium: it
//! connects back over MQTT over WebSocket, shows an instance within a
//! second of its heartbeat, and marks it offline when the process is
//! killed (its will). With auth on it asks for a login and shows what
//! that login's ACL lets it read. Real processes: `axion serve`, `axion
//! heartbeat`, `mosquitto_pub`, Chromium driven by playwright-core
//! (`tests/clients/web_view.mjs`, `tests/clients/web_login.mjs`).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::auth::hash_line;
use common::{axion_bin, spawn_axion, Proc, Serve};

/// A driver script in `tests/clients` run by node, and the lines it
/// prints, as they come.
fn drive(script: &str, args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(script);
    let mut page = Command::new("node")
        .arg(&script)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node (scripts/setup.sh installs it, with playwright-core and chromium)");
    let (tx, lines) = mpsc::channel();
    let stdout = page.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (page, lines)
}

/// The driver's next line; on silence, its stderr says why.
fn next_line(lines: &mpsc::Receiver<String>, page: &mut Child, what: &str) -> String {
    match lines.recv_timeout(Duration::from_secs(30)) {
        Ok(line) => line,
        Err(_) => {
            let _ = page.kill();
            let mut why = String::new();
            if let Some(mut err) = page.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut err, &mut why);
            }
            panic!("the page did not report {what}: {why}")
        }
    }
}

/// `axion heartbeat` for `service`, standing for a live instance (the
/// process it watches is a `sleep`), logging in with `mqtt_url`.
fn instance(service: &str, mqtt_url: &str) -> (Proc, Child) {
    let sleeper = Command::new("sleep").arg("600").spawn().expect("sleep");
    let mut cmd = Command::new(axion_bin());
    cmd.args(["heartbeat", "--service", service, "--port", "4242"])
        .args(["--pid", &sleeper.id().to_string()])
        .args(["--mqtt", mqtt_url]);
    (spawn_axion("axion heartbeat", &mut cmd), sleeper)
}

/// The driver's `seen <lag>` line: the page showed the instance less
/// than a second after its heartbeat's timestamp.
fn shown_within_a_second(seen: &str) {
    let lag: f64 = seen
        .strip_prefix("seen ")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected: {seen}"));
    assert!(lag < 1.0, "shown {lag:.3} s after its heartbeat");
}

#[test]
fn the_page_shows_an_instance_within_a_second_and_marks_it_offline_when_killed() {
    let serve = Serve::start();
    let (mut page, lines) = drive(
        "web_view.mjs",
        &[&format!("http://127.0.0.1:{}/", serve.ws_port), "web-demo"],
    );
    let mut next = |what: &str| next_line(&lines, &mut page, what);
    assert_eq!(next("its connection"), "connected");
    // The instance starts only once the page is up: what it shows is live.
    let (sidecar, mut sleeper) = instance("web-demo", &serve.mqtt_url());
    shown_within_a_second(&next("the instance"));
    sidecar.signal(9);
    let offline = next("the instance offline");
    assert!(offline.starts_with("offline"), "{offline}");
    assert!(
        offline.contains("lost"),
        "the will's reason is shown: {offline}"
    );
    let out = page.wait_with_output().expect("node");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

const PASSWORD: &str = "fleet-view-secret";

/// `viewer` reads heartbeats and queue stats, `watcher` only queue stats;
/// `instance` is the heartbeat sidecar, `producer` enqueues.
fn auth_file(dir: &Path) -> std::path::PathBuf {
    let pw = hash_line(PASSWORD);
    let text = format!(
        r#"
[roles.fleet]
subscribe = ["axion/+/heartbeat/#", "axion/+/queue/+/stats"]

[roles.queues]
subscribe = ["axion/+/queue/+/stats"]

[roles.instance]
axion_components = true
publish = ["axion/+/heartbeat/#"]
subscribe = ["axion/+/heartbeat/#", "axion/+/cmd/announce"]

[roles.producer]
publish = ["axion/+/queue/+/enqueue"]

[users.viewer]
{pw}
roles = ["fleet"]

[users.watcher]
{pw}
roles = ["queues"]

[users.instance]
{pw}
roles = ["instance"]

[users.producer]
{pw}
roles = ["producer"]
"#
    );
    let path = dir.join("auth.toml");
    std::fs::write(&path, text).expect("write auth file");
    path
}

#[test]
fn with_auth_on_the_page_asks_for_a_login_and_shows_what_its_acl_allows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let auth = auth_file(dir.path());
    let serve = Serve::start_with(&["--auth-file", auth.to_str().expect("utf-8 path")], &[]);
    let url = |user: &str| format!("mqtt://{user}:{}@127.0.0.1:{}", PASSWORD, serve.mqtt_port);
    // A waiting task, so the queue has stats to show.
    let enqueued = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &serve.mqtt_port.to_string()])
        .args(["-u", "producer", "-P", PASSWORD, "-V", "mqttv5", "-q", "1"])
        .args(["-t", "axion/default/queue/web-jobs/enqueue"])
        .args(["-m", r#"{"payload": 1}"#])
        .status()
        .expect("mosquitto_pub");
    assert!(enqueued.success(), "the producer's enqueue was refused");

    let page_url = format!("http://127.0.0.1:{}/", serve.ws_port);
    let (mut page, lines) = drive(
        "web_login.mjs",
        &[
            &page_url, "web-auth", "web-jobs", "viewer", PASSWORD, "watcher", PASSWORD,
        ],
    );
    let mut next = |what: &str| next_line(&lines, &mut page, what);
    // No credentials and no [anonymous]: refused (0x87), so the form.
    let form = next("the login form");
    assert!(
        form.starts_with("form true ") && form.contains("Not authorized"),
        "{form}"
    );
    let refused = next("the wrong password's refusal");
    assert!(
        refused.starts_with("refused true ") && refused.contains("Bad User Name or Password"),
        "a wrong password is refused and the form stays: {refused}"
    );
    assert_eq!(next("the login"), "connected false", "the form goes");
    assert_eq!(next("the queue"), "queue 1");
    // The instance starts only once the page is logged in: what it shows
    // is live.
    let (sidecar, mut sleeper) = instance("web-auth", &url("instance"));
    shown_within_a_second(&next("the instance"));
    // The broker's own record and the instance's are retained; a login
    // that may not read heartbeats gets neither, and is told why.
    let watcher = next("the watcher's view");
    assert!(
        watcher.starts_with("watcher 0 1 ")
            && watcher.contains("not allowed to read axion/+/heartbeat/+/+"),
        "{watcher}"
    );
    assert!(!watcher.contains("queue/+/stats"), "{watcher}");
    let out = page.wait_with_output().expect("node");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(sidecar);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}
