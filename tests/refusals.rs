//! A broker that refuses what a service needs ends it with exit 78 and the
//! broker's reason after a few backed-off tries: it neither reconnects
//! forever nor stays up looking alive while it cannot take its work.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::auth::hash_line;
use common::Serve;

const PASSWORD: &str = "s3cret-pass";

/// `axion serve` with an auth file where `worker` may publish and read the
/// package's events but not its queues' tasks.
fn serve_with_auth() -> (Serve, tempfile::TempDir) {
    let pw = hash_line(PASSWORD);
    let text = format!(
        r#"
[roles.events_only]
publish = ["axion/p/#"]
subscribe = ["axion/p/event/#", "axion/p/heartbeat/#"]
axion_components = true

[users.worker]
{pw}
roles = ["events_only"]
"#
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("auth.toml");
    std::fs::write(&path, text).expect("write auth file");
    let serve = Serve::start_with(&["--auth-file", path.to_str().expect("utf-8 path")], &[]);
    (serve, dir)
}

/// Runs `axion work` for queue `jobs` of package `p` as `user:password`
/// until it exits (at most 30 s), with warnings on stderr.
fn run_work(serve: &Serve, user: &str, password: &str) -> (Output, Duration) {
    let url = format!("mqtt://{user}:{password}@127.0.0.1:{}", serve.mqtt_port);
    let mut child = Command::new(common::axion_bin())
        .args(["work", "--package", "p", "--queue", "jobs", "--mqtt", &url])
        .args(["--", "true"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn axion work");
    let started = Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!(
                "axion work still running after 30 s against a broker that refuses it; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed();
    (child.wait_with_output().expect("wait"), took)
}

#[test]
fn a_refused_login_ends_the_worker_with_78_after_a_few_backed_off_tries() {
    let (serve, _auth) = serve_with_auth();
    let (out, took) = run_work(&serve, "worker", "not-the-password");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "stderr:\n{stderr}");
    assert!(
        stderr.contains("BadUserNamePassword") && stderr.contains("giving up"),
        "names the broker's reason: {stderr}"
    );
    // Three tries with a doubling wait between them (100 then 200 ms):
    // not a storm, and well before the 10 s "broker unreachable" exit (70).
    let tries = stderr.matches("the broker refused this service").count();
    assert_eq!(tries, 3, "{stderr}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(8),
        "took {took:?}"
    );
}

#[test]
fn a_refused_queue_subscription_ends_the_worker_with_78_naming_it() {
    let (serve, _auth) = serve_with_auth();
    let (out, took) = run_work(&serve, "worker", PASSWORD);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "stderr:\n{stderr}");
    assert!(
        stderr.contains("refused a subscription this service needs")
            && stderr.contains("NotAuthorized"),
        "names the refusal: {stderr}"
    );
    assert!(took < Duration::from_secs(8), "took {took:?}");
}
