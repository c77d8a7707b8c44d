//! The fleet view page of `axion serve` in a real headless Chromium: it
//! connects back over MQTT over WebSocket, shows an instance within a
//! second of its heartbeat, and marks it offline when the process is
//! killed (its will). Real processes: `axion serve`, `axion heartbeat`,
//! Chromium driven by playwright-core (`tests/clients/web_view.mjs`).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{axion_bin, spawn_axion, Serve};

#[test]
fn the_page_shows_an_instance_within_a_second_and_marks_it_offline_when_killed() {
    let serve = Serve::start();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/web_view.mjs");
    let mut page = Command::new("node")
        .arg(&script)
        .arg(format!("http://127.0.0.1:{}/", serve.ws_port))
        .arg("web-demo")
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
    let next = |what: &str| {
        lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("the page did not report {what}"))
    };
    assert_eq!(next("its connection"), "connected");
    // The instance starts only once the page is up: what it shows is live.
    let sleeper = Command::new("sleep").arg("600").spawn().expect("sleep");
    let mut cmd = Command::new(axion_bin());
    cmd.args(["heartbeat", "--service", "web-demo", "--port", "4242"])
        .args(["--pid", &sleeper.id().to_string()])
        .args(["--mqtt", &serve.mqtt_url()]);
    let sidecar = spawn_axion("axion heartbeat", &mut cmd);
    let seen = next("the instance");
    let lag: f64 = seen
        .strip_prefix("seen ")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected: {seen}"));
    assert!(lag < 1.0, "shown {lag:.3} s after its heartbeat");
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
    let mut sleeper = sleeper;
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}
