//! Shared plumbing for the end-to-end tests: free ports, temp dirs, and real
//! processes (`axion serve`, Mosquitto) that are killed when the test ends.
#![allow(dead_code)]

pub mod auth;
pub mod mqtt;
pub mod raw;
pub mod tls;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Waits until something accepts TCP on `port`, or panics after `timeout`.
pub fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listened on 127.0.0.1:{port} within {timeout:?}");
}

/// Waits until `port` accepts TCP: `Err` with the exit status if `proc`
/// exits first, `Err(None)` after `timeout`.
pub fn wait_listening(
    proc: &mut Proc,
    port: u16,
    timeout: Duration,
) -> Result<(), Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            return Err(Some(status));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(None)
}

/// True once `port` accepts TCP; false if `proc` exits first. Panics
/// after `timeout`.
pub fn listens_while_running(proc: &mut Proc, port: u16, timeout: Duration) -> bool {
    match wait_listening(proc, port, timeout) {
        Ok(()) => true,
        Err(Some(_)) => false,
        Err(None) => panic!("nothing listened on 127.0.0.1:{port} within {timeout:?}"),
    }
}

/// A tiny HTTP/1.1 GET: status code and body. A `/metrics` answer must be
/// in the Prometheus text format, whichever test asks for it.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    if path == "/metrics" {
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "not the Prometheus text format: {head}"
        );
    }
    Some((status, body.to_string()))
}

pub fn axion_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_axion"))
}

/// A child process killed (SIGKILL) on drop unless it already exited.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by number (15 = SIGTERM, 9 = SIGKILL, 2 = SIGINT).
    pub fn signal(&self, sig: i32) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {} failed", self.name);
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                panic!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `axion serve` on free ports with its own data directory.
pub struct Serve {
    pub proc: Proc,
    pub mqtt_port: u16,
    pub ws_port: u16,
    pub data_dir: tempfile::TempDir,
}

impl Serve {
    pub fn start() -> Self {
        Self::start_with(&[], &[])
    }

    /// Starts `axion serve` with extra CLI args and env vars, and waits
    /// until its MQTT port accepts connections.
    /// A free port can be taken (by another test's client, say) before
    /// `serve` binds it; `serve` then exits, and it is started again on
    /// other ports.
    pub fn start_with(args: &[&str], envs: &[(&str, &str)]) -> Self {
        let data_dir = tempfile::tempdir().expect("tempdir");
        for _ in 0..3 {
            let mqtt_port = free_port();
            let ws_port = free_port();
            let mut proc = spawn_serve(data_dir.path(), mqtt_port, ws_port, args, envs);
            // `serve` binds MQTT before the bridge: it is ready once both
            // listen, and a taken WebSocket port makes it exit after MQTT
            // already accepted (a client then sees a reset).
            if listens_while_running(&mut proc, mqtt_port, Duration::from_secs(20))
                && listens_while_running(&mut proc, ws_port, Duration::from_secs(20))
            {
                return Serve {
                    proc,
                    mqtt_port,
                    ws_port,
                    data_dir,
                };
            }
        }
        panic!("axion serve exited before listening, three times");
    }

    pub fn mqtt_url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.mqtt_port)
    }

    /// Restarts on the same ports and data directory (after a kill).
    pub fn restart(&mut self, args: &[&str], envs: &[(&str, &str)]) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        self.proc = spawn_serve(
            self.data_dir.path(),
            self.mqtt_port,
            self.ws_port,
            args,
            envs,
        );
        let ready = wait_listening(&mut self.proc, self.mqtt_port, Duration::from_secs(20))
            .and_then(|()| wait_listening(&mut self.proc, self.ws_port, Duration::from_secs(20)));
        if let Err(exited) = ready {
            let log = std::fs::read_to_string(self.data_dir.path().join("serve.log"));
            panic!(
                "axion serve did not come back on port {} (exit: {exited:?}); its log:\n{}",
                self.mqtt_port,
                log.unwrap_or_default()
            );
        }
    }
}

fn spawn_serve(
    data_dir: &Path,
    mqtt_port: u16,
    ws_port: u16,
    args: &[&str],
    envs: &[(&str, &str)],
) -> Proc {
    let mut cmd = Command::new(axion_bin());
    cmd.arg("serve")
        .arg("--mqtt-listen")
        .arg(format!("127.0.0.1:{mqtt_port}"))
        .arg("--ws-listen")
        .arg(format!("127.0.0.1:{ws_port}"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .envs(envs.iter().copied());
    spawn_axion_logged("axion serve", &mut cmd, Some(&data_dir.join("serve.log")))
}

/// Spawns an Axion command with the tests' conventions: quiet unless
/// `AXION_TEST_LOG` is set (then its value is `RUST_LOG` and stderr shows).
pub fn spawn_axion(name: &str, cmd: &mut Command) -> Proc {
    spawn_axion_logged(name, cmd, None)
}

/// [`spawn_axion`], with warnings and errors appended to `log` (when
/// `AXION_TEST_LOG` is not set), for a failure to quote.
fn spawn_axion_logged(name: &str, cmd: &mut Command, log: Option<&Path>) -> Proc {
    let level = std::env::var("AXION_TEST_LOG").ok();
    let stderr = match (&level, log) {
        (Some(_), _) => Stdio::inherit(),
        (None, Some(path)) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null()),
        (None, None) => Stdio::null(),
    };
    let child = cmd
        .env("RUST_LOG", level.unwrap_or_else(|| "warn".into()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    Proc {
        child,
        name: name.into(),
    }
}

/// Mosquitto on `port` with its config in `dir`; returns once it listens.
/// Tests that restart "the broker" call this again with the same port.
pub fn spawn_mosquitto(port: u16, dir: &Path) -> Proc {
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        // TCP_NODELAY as a latency-minded deployment sets it (Mosquitto
        // leaves Nagle on by default, which adds ~40 ms to small messages
        // written back to back).
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages 100\nset_tcp_nodelay true\n"),
    )
    .expect("write mosquitto.conf");
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mosquitto (scripts/setup.sh installs it)");
    wait_for_port(port, Duration::from_secs(10));
    Proc {
        child,
        name: "mosquitto".into(),
    }
}

/// Mosquitto from apt on a free port: the reference broker, and the
/// "any external MQTT 5 broker" that standalone components must work with.
pub struct Mosquitto {
    pub proc: Proc,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let proc = spawn_mosquitto(port, dir.path());
        Mosquitto {
            proc,
            port,
            _dir: dir,
        }
    }

    pub fn mqtt_url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `axion monitor --once --json` against the broker at `url` (plus `extra`
/// flags): the table a script would read.
pub fn monitor_json(url: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(axion_bin())
        .args([
            "monitor",
            "--mqtt",
            url,
            "--once",
            "--json",
            "--settle-ms",
            "200",
        ])
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run axion monitor");
    assert!(
        out.status.success(),
        "monitor failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("monitor prints a JSON array")
}

/// The log of `serve` (its warnings and errors), without ANSI colour
/// sequences (`ESC [ … m`); empty while the tests' log goes to the
/// terminal (`AXION_TEST_LOG`).
pub fn serve_log(serve: &Serve) -> String {
    let log = std::fs::read_to_string(serve.data_dir.path().join("serve.log")).unwrap_or_default();
    let mut out = String::with_capacity(log.len());
    let mut rest = log.as_str();
    while let Some(start) = rest.find('\x1b') {
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        rest = rest.find('m').map_or("", |end| &rest[end + 1..]);
    }
    out.push_str(rest);
    out
}
