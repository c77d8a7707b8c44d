//! Shared plumbing for the end-to-end tests: ports, temp dirs, and real
//! processes (`axion serve`, Mosquitto) that are killed when the test ends.
//!
//! An Axion process under test listens on port 0 and says which port it
//! got in its ports file (`--ports-file`, `AXION_PORTS_FILE`): the port is
//! the kernel's pick at the bind itself, so no parallel test can take it
//! in between ([`wait_ports`], [`Serve`], [`spawn_listening`]).
#![allow(dead_code)]

pub mod auth;
pub mod mqtt;
pub mod raw;
pub mod tls;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

pub use axion_wire::ports::Ports;

/// A port nobody listens on right now, for a listener whose port must be
/// known before its process starts: Mosquitto (it cannot report a port it
/// picked), a process coming back on the port it had before a kill, a
/// peer configured to connect to a port nobody listens on yet. Another
/// test can take the port between this call and the bind, so an Axion
/// process that only has to listen somewhere binds port 0 and reports its
/// ports file instead.
pub fn port_known_in_advance() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Numbers distinct within this test binary, for [`instance_port`] and
/// [`unique_name`]; they start high so they read as ports.
static NEXT_ID: AtomicU16 = AtomicU16::new(20_000);

/// A port number that only names an instance (the sidecar's `--port`, a
/// record's port slot): nothing listens on it, so it only has to differ
/// from the other instances' in this test binary.
pub fn instance_port() -> u16 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// `prefix` followed by a number no other call in this test binary gets
/// (a package, a client id).
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}{}", instance_port())
}

/// How long a process may take to bind its listeners and write its ports
/// file: a debug build starting on a 2-core machine busy with other tests.
const PORTS_WAIT: Duration = Duration::from_secs(30);

/// Waits for the ports file at `path` (written whole once every listener
/// of `proc` is bound) and reads it. Panics, quoting `log` (the process's
/// stderr, when kept), if `proc` exits first or after [`PORTS_WAIT`].
pub fn wait_ports(proc: &mut Proc, path: &Path, log: Option<&Path>) -> Ports {
    let deadline = Instant::now() + PORTS_WAIT;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return Ports::parse(&text)
                .unwrap_or_else(|err| panic!("{}: ports file {text:?}: {err}", proc.name));
        }
        let why = match proc.child.try_wait().expect("try_wait") {
            Some(status) => format!("exited ({status}) before writing its ports file"),
            None if Instant::now() > deadline => {
                format!("wrote no ports file within {PORTS_WAIT:?}")
            }
            None => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let stderr = match log {
            _ if std::env::var_os("AXION_TEST_LOG").is_some() => {
                "(on the terminal: AXION_TEST_LOG is set)".to_string()
            }
            Some(log) => strip_ansi(&std::fs::read_to_string(log).unwrap_or_default()),
            None => "(not kept)".to_string(),
        };
        panic!("{} {why}; its stderr:\n{stderr}", proc.name);
    }
}

/// An Axion process that listens, with its ports file and its stderr in a
/// directory of its own.
pub struct Listening {
    pub proc: Proc,
    pub ports: Ports,
    /// Holds the ports file and `stderr.log`.
    pub dir: tempfile::TempDir,
}

impl Listening {
    /// The port listener `name` (`axion_wire::ports`: `ws`, `health`, …)
    /// is bound to.
    pub fn port(&self, name: &str) -> u16 {
        port_of(&self.ports, name, &self.proc.name)
    }
}

fn port_of(ports: &Ports, name: &str, who: &str) -> u16 {
    ports
        .get(name)
        .unwrap_or_else(|| panic!("{who} reports no {name} listener: {ports:?}"))
        .port()
}

/// Spawns an Axion command that listens (the caller gives its listen
/// addresses port 0) with `AXION_PORTS_FILE` set, and returns once every
/// listener is bound. The environment variable rather than the flag, so it
/// works after a `--` too (`axion work … -- CMD`), and for a service on the
/// runtime.
pub fn spawn_listening(name: &str, cmd: &mut Command) -> Listening {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports_file = dir.path().join("ports");
    let log = dir.path().join("stderr.log");
    cmd.env("AXION_PORTS_FILE", &ports_file);
    let mut proc = spawn_axion_logged(name, cmd, Some(&log));
    let ports = wait_ports(&mut proc, &ports_file, Some(&log));
    Listening { proc, ports, dir }
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

/// `axion serve` on ports of its own picking (port 0, read back from its
/// ports file) with its own data directory.
pub struct Serve {
    pub proc: Proc,
    pub mqtt_port: u16,
    pub ws_port: u16,
    /// Every listener it reported (`mqtts`, `legacy-heartbeat` when asked).
    pub ports: Ports,
    pub data_dir: tempfile::TempDir,
}

impl Serve {
    pub fn start() -> Self {
        Self::start_with(&[], &[])
    }

    /// Starts `axion serve` with extra CLI args and env vars, and returns
    /// once every listener is bound (its ports file is written last of its
    /// start-up). Other listen flags in `args` may give port 0 too; see
    /// [`Serve::port`].
    pub fn start_with(args: &[&str], envs: &[(&str, &str)]) -> Self {
        let data_dir = tempfile::tempdir().expect("tempdir");
        let (proc, ports) = spawn_serve(data_dir.path(), (0, 0), args, envs);
        Serve {
            proc,
            mqtt_port: port_of(&ports, axion_wire::ports::MQTT, "axion serve"),
            ws_port: port_of(&ports, axion_wire::ports::WS, "axion serve"),
            ports,
            data_dir,
        }
    }

    /// The port listener `name` (`axion_wire::ports`) is bound to.
    pub fn port(&self, name: &str) -> u16 {
        port_of(&self.ports, name, "axion serve")
    }

    pub fn mqtt_url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.mqtt_port)
    }

    /// Restarts on the same MQTT and WebSocket ports and data directory
    /// (after a kill): the test's clients reconnect to where the broker
    /// was, so these two ports are known before the new process starts, as
    /// with [`port_known_in_advance`], and another test may take one
    /// between the kill and the bind. Listeners in `args` may move.
    pub fn restart(&mut self, args: &[&str], envs: &[(&str, &str)]) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        let (proc, ports) = spawn_serve(
            self.data_dir.path(),
            (self.mqtt_port, self.ws_port),
            args,
            envs,
        );
        self.proc = proc;
        self.ports = ports;
    }
}

/// Spawns `axion serve` on `127.0.0.1` at `(mqtt, ws)` (0: any free port)
/// and waits for its ports file.
fn spawn_serve(
    data_dir: &Path,
    (mqtt_port, ws_port): (u16, u16),
    args: &[&str],
    envs: &[(&str, &str)],
) -> (Proc, Ports) {
    let ports_file = data_dir.join("serve.ports");
    let log = data_dir.join("serve.log");
    // Gone before the start, so the wait below cannot read a killed run's.
    let _ = std::fs::remove_file(&ports_file);
    let mut cmd = Command::new(axion_bin());
    cmd.arg("serve")
        .arg("--mqtt-listen")
        .arg(format!("127.0.0.1:{mqtt_port}"))
        .arg("--ws-listen")
        .arg(format!("127.0.0.1:{ws_port}"))
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--ports-file")
        .arg(&ports_file)
        .args(args)
        .envs(envs.iter().copied());
    let mut proc = spawn_axion_logged("axion serve", &mut cmd, Some(&log));
    let ports = wait_ports(&mut proc, &ports_file, Some(&log));
    (proc, ports)
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
    try_spawn_mosquitto_with("mosquitto", port, dir, "")
        .unwrap_or_else(|| panic!("mosquitto exited before listening on {port}"))
}

/// [`spawn_mosquitto`] named `name` (its config file too), with `extra`
/// lines of configuration (a bridge connection, say).
pub fn spawn_mosquitto_with(name: &str, port: u16, dir: &Path, extra: &str) -> Proc {
    try_spawn_mosquitto_with(name, port, dir, extra)
        .unwrap_or_else(|| panic!("{name} exited before listening on {port}"))
}

/// Mosquitto named `name` on `port` with `extra` configuration lines, or
/// `None` if it exits before listening (the port was taken).
fn try_spawn_mosquitto_with(name: &str, port: u16, dir: &Path, extra: &str) -> Option<Proc> {
    let conf = dir.join(format!("{name}.conf"));
    std::fs::write(
        &conf,
        // TCP_NODELAY as a latency-minded deployment sets it (Mosquitto
        // leaves Nagle on by default, which adds ~40 ms to small messages
        // written back to back).
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages 100\nset_tcp_nodelay true\n{extra}"),
    )
    .expect("write mosquitto.conf");
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mosquitto (scripts/setup.sh installs it)");
    let mut proc = Proc {
        child,
        name: name.into(),
    };
    listens_while_running(&mut proc, port, Duration::from_secs(10)).then_some(proc)
}

/// Mosquitto from apt on a free port: the reference broker, and the
/// "any external MQTT 5 broker" that standalone components must work with.
/// It cannot report a port it picked, so its port is chosen in advance
/// ([`port_known_in_advance`]), and it is started again on another one if
/// that port was taken before it bound it.
pub struct Mosquitto {
    pub proc: Proc,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        for _ in 0..3 {
            let port = port_known_in_advance();
            if let Some(proc) = try_spawn_mosquitto_with("mosquitto", port, dir.path(), "") {
                return Mosquitto {
                    proc,
                    port,
                    _dir: dir,
                };
            }
        }
        panic!("mosquitto exited before listening, three times");
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
    monitor_json_settled(url, 200, extra)
}

/// [`monitor_json`], waiting `settle_ms` for records and answers (on a
/// cluster, answers to the monitor's announce cross the nodes).
pub fn monitor_json_settled(url: &str, settle_ms: u64, extra: &[&str]) -> Vec<serde_json::Value> {
    let settle = settle_ms.to_string();
    let out = Command::new(axion_bin())
        .args([
            "monitor",
            "--mqtt",
            url,
            "--once",
            "--json",
            "--settle-ms",
            &settle,
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
/// sequences; empty while the tests' log goes to the terminal
/// (`AXION_TEST_LOG`).
pub fn serve_log(serve: &Serve) -> String {
    strip_ansi(
        &std::fs::read_to_string(serve.data_dir.path().join("serve.log")).unwrap_or_default(),
    )
}

/// `text` without ANSI colour sequences (`ESC [ … m`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('\x1b') {
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        rest = rest.find('m').map_or("", |end| &rest[end + 1..]);
    }
    out.push_str(rest);
    out
}

/// `axion queues` serving `package` on `mqtt` (one URL or several), its
/// store in `dir`.
pub fn spawn_queue_owner(mqtt: &str, package: &str, dir: &Path, extra: &[&str]) -> Proc {
    spawn_axion(
        "axion queues",
        Command::new(axion_bin())
            .args(["queues", "--mqtt", mqtt, "--package", package, "--data-dir"])
            .arg(dir)
            .args(extra),
    )
}

/// `axion work` on `package`'s `queue` whose command appends a line to a
/// file named for each task it runs in `done`: a file with two lines is a
/// task run twice.
pub fn spawn_counting_worker(
    mqtt: &str,
    package: &str,
    queue: &str,
    done: &Path,
    extra: &[&str],
) -> Listening {
    spawn_listening(
        "axion work",
        Command::new(axion_bin())
            .args([
                "work",
                "--mqtt",
                mqtt,
                "--package",
                package,
                "--queue",
                queue,
            ])
            .args(["--health-listen", "127.0.0.1:0"])
            .args(extra)
            .arg("--")
            .args([
                "sh",
                "-c",
                "cat > /dev/null; echo run >> \"$DONE/$AXION_TASK_ID\"; echo ok",
            ])
            .env("DONE", done),
    )
}
