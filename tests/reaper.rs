//! The legacy heartbeat service inside `axion serve`, and its reaper, end to
//! end with real processes: the user's `HeartbeatClient` (unchanged, Node
//! `fetch`), the Python service template over the bridge, raw HTTP and
//! WebSocket beats, and `reap_target.js` services that block, lose their
//! broker or stop making progress. What the tests read is what an operator
//! reads: retained records on `axion/<pkg>/heartbeat/...` (through a live
//! subscriber, for timings) and `axion monitor --once --json`.
//!
//! The reaper only signals a process whose pid, start time, hostname and
//! kernel boot id all match its record: `forged_records_*` proves that it
//! kills what matches and nothing else (a reused pid, another host, pid 1).

mod common;

use common::wait_until;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::mqtt::V4;
use common::{axion_bin, Proc, Serve};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// This machine, as the server sees it

/// What `gethostname` returns, as the server puts it in records.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("read /proc/sys/kernel/hostname")
        .trim()
        .to_string()
}

fn host_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .expect("read boot_id")
        .trim()
        .to_string()
}

/// Field 22 of `/proc/<pid>/stat` (start time in clock ticks since boot).
/// Field 2 (the command in parentheses) may hold spaces and parentheses:
/// fields are counted after the last `)`.
fn proc_start_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    let rest = &stat[stat.rfind(')').expect("')' in stat") + 1..];
    // `rest` starts at field 3 (state): field 22 is the 20th word.
    rest.split_whitespace()
        .nth(19)
        .expect("field 22 in stat")
        .parse()
        .expect("start ticks are a number")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn topic(service: &str, pid: u32) -> String {
    format!("axion/default/heartbeat/{service}/{}:{pid}", hostname())
}

fn alarm_topic(service: &str) -> String {
    format!("axion/default/alarm/{service}")
}

// ---------------------------------------------------------------------------
// Child processes

fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// A `sleep 300`: a live process whose pid a test posts or forges records for.
fn sleeper() -> Proc {
    let child = Command::new("sleep")
        .arg("300")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sleep");
    Proc {
        child,
        name: "sleep 300".into(),
    }
}

fn alive(p: &mut Proc) -> bool {
    matches!(p.child.try_wait(), Ok(None))
}

/// A Node or Python client with its stdout as timestamped lines and its
/// stderr kept for failure messages. Killed (SIGKILL) on drop.
struct Client {
    proc: Proc,
    lines: mpsc::Receiver<(Instant, String)>,
    stderr: Arc<Mutex<String>>,
    exited_at: Option<(Instant, u64)>,
}

impl Client {
    fn spawn(program: &str, args: &[&str], envs: &[(&str, &str)]) -> Client {
        let mut child = Command::new(program)
            .args(args)
            .envs(envs.iter().copied())
            .current_dir(clients_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program} {args:?}: {e}"));
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let keep = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let mut s = keep.lock().unwrap();
                if s.len() < 20_000 {
                    s.push_str(&line);
                    s.push('\n');
                }
            }
        });
        Client {
            proc: Proc {
                child,
                name: format!("{program} {}", args.join(" ")),
            },
            lines,
            stderr,
            exited_at: None,
        }
    }

    fn node(args: &[&str]) -> Client {
        Client::spawn("node", args, &[])
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The first stdout line starting with `prefix` (the rest after it,
    /// trimmed) and when it was read. Panics on timeout or exit.
    fn wait_line(&mut self, prefix: &str, timeout: Duration) -> (Instant, String) {
        let deadline = Instant::now() + timeout;
        loop {
            match self.lines.recv_timeout(Duration::from_millis(50)) {
                Ok((at, line)) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return (at, rest.trim().to_string());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!(
                        "{} closed stdout before printing {prefix:?}; stderr:\n{}",
                        self.proc.name,
                        self.stderr()
                    )
                }
            }
            if let Ok(Some(status)) = self.proc.child.try_wait() {
                // Lines already read still count.
                if let Ok((at, line)) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return (at, rest.trim().to_string());
                    }
                }
                panic!(
                    "{} exited ({status}) before printing {prefix:?}; stderr:\n{}",
                    self.proc.name,
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} printed no {prefix:?} within {timeout:?}; stderr:\n{}",
                self.proc.name,
                self.stderr()
            );
        }
    }

    /// Notes the exit (time, wall-clock ms) the first time it is seen.
    fn poll_exit(&mut self) -> Option<(Instant, u64)> {
        if self.exited_at.is_none() {
            if let Ok(Some(_)) = self.proc.child.try_wait() {
                self.exited_at = Some((Instant::now(), now_ms()));
            }
        }
        self.exited_at
    }

    fn running(&mut self) -> bool {
        self.poll_exit().is_none()
    }

    fn kill9(&mut self) {
        self.proc.signal(9);
        self.proc.wait_exit(Duration::from_secs(5));
    }
}

/// The legacy HeartbeatClient (unchanged) under `legacy_heartbeat_client.js`.
fn heartbeat_client(url: &str, name: &str, interval_ms: u64) -> Client {
    Client::node(&[
        "legacy_heartbeat_client.js",
        url,
        name,
        &interval_ms.to_string(),
    ])
}

// ---------------------------------------------------------------------------
// The server

fn serve(args: &[&str], envs: &[(&str, &str)]) -> Serve {
    let s = Serve::start_with(args, envs);
    wait_ready(&s);
    s
}

/// The bridge (and with it the legacy heartbeat routes) answers.
fn wait_ready(s: &Serve) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while http(s.ws_port, "GET", "/health/ready", None).map(|r| r.0) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "bridge not ready within 20 s; serve log:\n{}",
            common::serve_log(s)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `axion monitor --once --json` against `s`'s broker.
fn monitor_json(s: &Serve) -> Vec<Value> {
    common::monitor_json(&s.mqtt_url(), &[])
}

/// `axion monitor --once` (the text table) against `s`'s broker.
fn monitor_text(s: &Serve) -> String {
    let out = Command::new(axion_bin())
        .args(["monitor", "--mqtt", &s.mqtt_url(), "--once"])
        .args(["--settle-ms", "200"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run axion monitor");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn row(rows: &[Value], topic: &str) -> Option<Value> {
    rows.iter().find(|r| r["topic"] == topic).cloned()
}

// ---------------------------------------------------------------------------
// Every record and alarm, as a live subscriber sees them

type Seen = Arc<Mutex<HashMap<String, Vec<(Instant, Vec<u8>)>>>>;

struct Mesh {
    rt: tokio::runtime::Runtime,
    client: Option<V4>,
    seen: Seen,
}

impl Mesh {
    fn start(s: &Serve) -> Mesh {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let seen: Seen = Arc::default();
        let port = s.mqtt_port;
        let client = rt.block_on(async {
            let mut c = V4::connect(port, &common::unique_name("reaper-test-")).await;
            let (_tx, dummy) = tokio::sync::mpsc::unbounded_channel();
            let mut rx = std::mem::replace(&mut c.rx, dummy);
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Some(m) = rx.recv().await {
                    seen.lock()
                        .unwrap()
                        .entry(m.topic)
                        .or_default()
                        .push((Instant::now(), m.payload));
                }
            });
            c.subscribe("axion/+/heartbeat/+/+", 1).await;
            c.subscribe("axion/+/alarm/+", 1).await;
            c
        });
        Mesh {
            rt,
            client: Some(client),
            seen,
        }
    }

    /// The last payload on `topic` (empty: cleared), if any arrived.
    fn last_raw(&self, topic: &str) -> Option<(Instant, Vec<u8>)> {
        self.seen.lock().unwrap().get(topic)?.last().cloned()
    }

    /// The last record on `topic`, unless none arrived or it was cleared.
    fn last(&self, topic: &str) -> Option<Value> {
        let (_, p) = self.last_raw(topic)?;
        if p.is_empty() {
            return None;
        }
        serde_json::from_slice(&p).ok()
    }

    /// Every record seen on `topic`, oldest first (cleared ones as `Null`).
    fn history(&self, topic: &str) -> Vec<(Instant, Value)> {
        self.seen
            .lock()
            .unwrap()
            .get(topic)
            .map(|v| {
                v.iter()
                    .map(|(at, p)| (*at, serde_json::from_slice(p).unwrap_or(Value::Null)))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn status_of(&self, topic: &str) -> Option<(String, String)> {
        let r = self.last(topic)?;
        Some((
            r["status"].as_str().unwrap_or("").to_string(),
            r["reason"].as_str().unwrap_or("").to_string(),
        ))
    }

    /// Waits until the last record on `topic` has `status` (and `reason`,
    /// if given); returns it.
    fn wait_status(
        &self,
        topic: &str,
        status: &str,
        reason: Option<&str>,
        timeout: Duration,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.last(topic) {
                if r["status"] == status && reason.is_none_or(|want| r["reason"] == want) {
                    return r;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{topic} did not reach status {status} reason {reason:?} within {timeout:?}; \
                 records seen: {:?}",
                self.history(topic)
                    .into_iter()
                    .map(|(_, v)| v)
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn publish_retained(&self, topic: &str, payload: &Value) {
        let c = self.client.as_ref().unwrap();
        self.rt
            .block_on(c.publish(topic, payload.to_string().as_bytes(), 1, true));
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let c = self.client.take();
        self.rt.block_on(async move { drop(c) });
    }
}

// ---------------------------------------------------------------------------
// HTTP/1.1 and WebSocket, by hand (the server is the thing under test)

/// One request on a fresh connection (`Connection: close`): status and body.
fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> Option<(u16, String)> {
    let mut h = Http::new(port);
    h.close = true;
    h.request(method, path, body).ok()
}

/// An HTTP/1.1 client that keeps its connection open between requests
/// unless the server said `Connection: close`.
struct Http {
    port: u16,
    conn: Option<BufReader<TcpStream>>,
    close: bool,
    /// Connections opened so far (1 if every request reused the first).
    connections: usize,
}

impl Http {
    fn new(port: u16) -> Http {
        Http {
            port,
            conn: None,
            close: false,
            connections: 0,
        }
    }

    fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> std::io::Result<(u16, String)> {
        if self.conn.is_none() {
            let s = TcpStream::connect(("127.0.0.1", self.port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            self.conn = Some(BufReader::new(s));
            self.connections += 1;
        }
        let r = self.conn.as_mut().unwrap();
        let body = body.unwrap_or("");
        let conn_hdr = if self.close { "close" } else { "keep-alive" };
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: {conn_hdr}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.port,
            body.len()
        );
        r.get_mut().write_all(req.as_bytes())?;
        let mut status_line = String::new();
        if r.read_line(&mut status_line)? == 0 {
            self.conn = None;
            return Err(std::io::Error::other("connection closed before a response"));
        }
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
        let mut length = None;
        let mut chunked = false;
        let mut server_closes = false;
        loop {
            let mut line = String::new();
            r.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (k, v) = line.split_once(':').unwrap_or((line, ""));
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
            match k.as_str() {
                "content-length" => length = v.parse::<usize>().ok(),
                "transfer-encoding" if v.contains("chunked") => chunked = true,
                "connection" if v.contains("close") => server_closes = true,
                _ => {}
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                r.read_line(&mut size)?;
                let n = usize::from_str_radix(size.trim().split(';').next().unwrap(), 16)
                    .map_err(std::io::Error::other)?;
                let mut chunk = vec![0; n + 2];
                r.read_exact(&mut chunk)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = length {
            body.resize(n, 0);
            r.read_exact(&mut body)?;
        } else {
            r.read_to_end(&mut body)?;
            server_closes = true;
        }
        if server_closes || self.close {
            self.conn = None;
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

fn post(port: u16, path: &str, body: &Value) -> (u16, Value) {
    let (status, text) = http(port, "POST", path, Some(&body.to_string()))
        .unwrap_or_else(|| panic!("POST {path} on port {port} got no response"));
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("POST {path}: reply {text:?} is not JSON: {e}"));
    (status, v)
}

/// A WebSocket client connection (text frames only), by hand.
struct Ws(TcpStream);

impl Ws {
    fn connect(port: u16, path: &str) -> Ws {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect for WebSocket");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).expect("WebSocket handshake reply");
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "WebSocket upgrade at {path} refused: {head}"
        );
        Ws(s)
    }

    fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        let mut f = vec![0x80 | opcode];
        let n = payload.len();
        if n < 126 {
            f.push(0x80 | n as u8);
        } else if n < 65536 {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
        let mask = [0x12, 0x34, 0x56, 0x78];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.0.write_all(&f).expect("send WebSocket frame");
    }

    fn send(&mut self, text: &str) {
        self.send_frame(0x1, text.as_bytes());
    }

    /// The next text frame (pings are answered, other frames skipped).
    fn recv(&mut self) -> String {
        loop {
            let mut h = [0u8; 2];
            self.0.read_exact(&mut h).expect("WebSocket frame header");
            let opcode = h[0] & 0x0f;
            let masked = h[1] & 0x80 != 0;
            let mut n = (h[1] & 0x7f) as usize;
            if n == 126 {
                let mut l = [0u8; 2];
                self.0.read_exact(&mut l).unwrap();
                n = u16::from_be_bytes(l) as usize;
            } else if n == 127 {
                let mut l = [0u8; 8];
                self.0.read_exact(&mut l).unwrap();
                n = u64::from_be_bytes(l) as usize;
            }
            let mut mask = [0u8; 4];
            if masked {
                self.0.read_exact(&mut mask).unwrap();
            }
            let mut p = vec![0u8; n];
            self.0.read_exact(&mut p).expect("WebSocket frame payload");
            if masked {
                for (i, b) in p.iter_mut().enumerate() {
                    *b ^= mask[i % 4];
                }
            }
            match opcode {
                0x1 => return String::from_utf8(p).expect("UTF-8 text frame"),
                0x8 => panic!("server closed the WebSocket: {p:?}"),
                0x9 => self.send_frame(0xA, &p),
                _ => {}
            }
        }
    }

    fn call(&mut self, text: &str) -> Value {
        self.send(text);
        let reply = self.recv();
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?} not JSON: {e}"))
    }
}

/// The legacy service's reply to a good beat.
fn assert_ok_reply(v: &Value, pid: u32, name: &str) {
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["pid"], pid, "{v}");
    assert_eq!(v["name"], name, "{v}");
    for k in ["cpu", "memory", "netRx", "netTx"] {
        assert!(v[k].is_number(), "reply lacks numeric {k}: {v}");
    }
}

/// What every legacy record carries, beyond status.
fn assert_legacy_record(r: &Value, service: &str, pid: u32) {
    let host = hostname();
    assert_eq!(r["service"], service, "{r}");
    assert_eq!(r["pid"], pid, "{r}");
    assert_eq!(r["port"], pid, "{r}");
    assert_eq!(r["hostname"], host.as_str(), "{r}");
    assert_eq!(r["instance_id"], format!("{host}:{pid}"), "{r}");
    assert_eq!(r["package"], "default", "{r}");
    // The exact source is checked in
    // `legacy_heartbeat_client_and_python_template_appear_online_then_exited`.
    assert!(
        r["source"].as_str().unwrap_or("").starts_with("legacy"),
        "{r}"
    );
    assert_eq!(r["host_boot_id"], host_boot_id().as_str(), "{r}");
    assert!(r["timestamp"].is_number(), "{r}");
    assert!(r["boot_id"].is_string(), "{r}");
    assert!(r["seq"].is_number(), "{r}");
    assert!(r["interval_secs"].as_u64().unwrap_or(0) >= 1, "{r}");
    assert!(r["started_at"].is_number(), "{r}");
    assert!(r["proc_start_ticks"].is_number(), "{r}");
    if std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert_eq!(r["proc_start_ticks"], proc_start_ticks(pid), "{r}");
    }
}

// ---------------------------------------------------------------------------
// (a) The user's clients, unchanged, show up in the mesh and go offline

#[test]
fn legacy_heartbeat_client_and_python_template_appear_online_then_exited() {
    let s = serve(&[], &[]);
    let mesh = Mesh::start(&s);
    let ws = s.ws_port;
    const INTERVAL_MS: u64 = 500;
    let mut posted_long = heartbeat_client(
        &format!("http://127.0.0.1:{ws}/heartbeat/heartbeat"),
        "hb-long-path",
        INTERVAL_MS,
    );
    let mut posted_short = heartbeat_client(
        &format!("http://127.0.0.1:{ws}/heartbeat"),
        "hb-short-path",
        INTERVAL_MS,
    );
    let broker_url = format!("ws://127.0.0.1:{ws}");
    let mut py = Client::spawn(
        "python3",
        &["-u", "service_template.py", "py-template"],
        &[
            ("BROKER_URL", broker_url.as_str()),
            ("HEARTBEAT_INTERVAL", "0.5"),
        ],
    );

    // The HeartbeatClient's first beat goes out one interval after start().
    let (ready_long, reply) = posted_long.wait_line("ready", Duration::from_secs(15));
    assert_ok_reply(
        &serde_json::from_str(&reply).unwrap(),
        posted_long.pid(),
        "hb-long-path",
    );
    let (ready_short, reply) = posted_short.wait_line("ready", Duration::from_secs(15));
    assert_ok_reply(
        &serde_json::from_str(&reply).unwrap(),
        posted_short.pid(),
        "hb-short-path",
    );
    // The template publishes its first heartbeat right after connecting.
    let (ready_py, _) = py.wait_line("[py-template] connected", Duration::from_secs(20));

    let clients = [
        ("hb-long-path", posted_long.pid(), ready_long),
        ("hb-short-path", posted_short.pid(), ready_short),
        ("py-template", py.pid(), ready_py),
    ];
    // Online in `axion monitor --once --json` within one interval + slack.
    let slack = Duration::from_millis(INTERVAL_MS) + Duration::from_secs(4);
    for (name, pid, since) in clients {
        let t = topic(name, pid);
        let r = wait_until(
            slack.saturating_sub(since.elapsed()) + Duration::from_millis(1),
            &format!("{name} online in the monitor"),
            || row(&monitor_json(&s), &t).filter(|r| r["state"] == "online"),
        );
        eprintln!(
            "{name} online in the monitor {:?} after its first beat",
            since.elapsed()
        );
        assert_eq!(r["status"], "online", "{r}");
        assert_legacy_record(&r, name, pid);
        assert_eq!(r["connected"], true, "{r}");
        // Beats every 0.5 s: the observed gap rounds up to 1 s.
        let live = mesh.wait_status(&t, "online", None, Duration::from_secs(5));
        assert_legacy_record(&live, name, pid);
    }
    let r = mesh.last(&topic("hb-long-path", clients[0].1)).unwrap();
    assert_eq!(r["interval_secs"], 1, "{r}");
    // Every legacy record says how it came: over HTTP, or as the Python
    // template's heartbeat event through the bridge.
    let sources: Vec<(&str, Value)> = clients
        .iter()
        .map(|(name, pid, _)| {
            (
                *name,
                mesh.last(&topic(name, *pid)).unwrap()["source"].clone(),
            )
        })
        .collect();
    assert!(
        sources
            .iter()
            .map(|(_, s)| s.as_str().unwrap_or(""))
            .collect::<Vec<_>>()
            == ["legacy-http", "legacy-http", "legacy-event"],
        "records' sources: {sources:?}"
    );

    // Killed: offline, reason `exited`, within ~1-2 s.
    for c in [&mut posted_long, &mut posted_short, &mut py] {
        let pid = c.pid();
        let name = clients.iter().find(|x| x.1 == pid).unwrap().0;
        c.kill9();
        let killed = Instant::now();
        let r = mesh.wait_status(
            &topic(name, pid),
            "offline",
            Some("exited"),
            Duration::from_secs(4),
        );
        eprintln!("{name} offline/exited {:?} after kill -9", killed.elapsed());
        assert_legacy_record(&r, name, pid);
    }
    let rows = monitor_json(&s);
    for (name, pid, _) in clients {
        let r = row(&rows, &topic(name, pid)).expect("the monitor still lists it");
        assert_eq!(r["state"], "offline", "{r}");
        assert_eq!(r["reason"], "exited", "{r}");
    }
}

// ---------------------------------------------------------------------------
// (b) The WebSocket form, on a listener of its own and on the bridge port

#[test]
fn websocket_heartbeats_on_a_separate_legacy_listener_and_the_bridge_port() {
    let s = serve(&["--legacy-heartbeat-listen", "127.0.0.1:0"], &[]);
    let lport = s.port(axion_wire::ports::LEGACY_HEARTBEAT);
    let mesh = Mesh::start(&s);
    let target = sleeper();
    let pid = target.pid();

    for (port, path) in [
        (lport, "/heartbeat"),
        (lport, "/heartbeat/heartbeat"),
        (s.ws_port, "/heartbeat"),
        (s.ws_port, "/heartbeat/heartbeat"),
    ] {
        let name = format!("wsbeat-{port}-{}", path.len());
        let mut ws = Ws::connect(port, path);
        let beat = json!({"pid": pid, "name": name}).to_string();
        assert_ok_reply(&ws.call(&beat), pid, &name);
        assert_eq!(
            ws.call("this is not json"),
            json!({"error": "invalid json"}),
            "{port}{path}"
        );
        // The connection survives a bad frame.
        assert_ok_reply(&ws.call(&beat), pid, &name);
        let r = mesh.wait_status(&topic(&name, pid), "online", None, Duration::from_secs(5));
        assert_legacy_record(&r, &name, pid);
    }

    // The separate listener serves the HTTP routes too.
    let (status, v) = post(
        lport,
        "/heartbeat",
        &json!({"pid": pid, "name": "httpbeat"}),
    );
    assert_eq!(status, 200, "{v}");
    assert_ok_reply(&v, pid, "httpbeat");
    let (status, body) = http(lport, "GET", "/heartbeats", None).expect("GET /heartbeats");
    assert_eq!(status, 200, "{body}");
    let list: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert!(
        list.iter().any(|e| e["pid"] == pid),
        "GET /heartbeats on the separate listener lists pid {pid}: {body}"
    );
}

// ---------------------------------------------------------------------------
// (c) GET /heartbeats and bad requests

#[test]
fn get_heartbeats_lists_beats_and_bad_posts_get_400_without_harm() {
    let s = serve(&[], &[]);
    let a = sleeper();
    let b = sleeper();
    let before = now_ms();
    let (status, v) = post(
        s.ws_port,
        "/heartbeat",
        &json!({"pid": a.pid(), "name": "listed-a"}),
    );
    assert_eq!(status, 200, "{v}");
    assert_ok_reply(&v, a.pid(), "listed-a");
    let (status, v) = post(
        s.ws_port,
        "/heartbeat/heartbeat",
        &json!({"pid": b.pid(), "name": "listed-b", "connected": true, "queue": 2,
                "inflight": 1, "last_progress_ts": now_unix(), "avg_job_ms": 5}),
    );
    assert_eq!(status, 200, "{v}");
    assert_ok_reply(&v, b.pid(), "listed-b");

    let (status, body) = http(s.ws_port, "GET", "/heartbeats", None).expect("GET /heartbeats");
    assert_eq!(status, 200, "{body}");
    let list: Vec<Value> = serde_json::from_str(&body).expect("a JSON array");
    for (pid, name) in [(a.pid(), "listed-a"), (b.pid(), "listed-b")] {
        let e = list
            .iter()
            .find(|e| e["pid"] == pid)
            .unwrap_or_else(|| panic!("pid {pid} missing from {body}"));
        assert_eq!(e["name"], name, "{e}");
        for k in ["_id", "sessionId"] {
            assert!(!e[k].is_null(), "{k} missing: {e}");
        }
        for k in ["cpu", "memory", "netRx", "netTx"] {
            assert!(e[k].is_number(), "{k} not a number: {e}");
        }
        let last = e["last"].as_f64().expect("last in ms");
        assert!(
            last + 1000.0 >= before as f64 && last <= (now_ms() + 1000) as f64,
            "last {last} is ms around now ({before}): {e}"
        );
    }

    // Bad requests, on one connection that keeps working.
    let mut h = Http::new(s.ws_port);
    let (status, text) = h.request("POST", "/heartbeat", Some("{}")).unwrap();
    assert_eq!(status, 400, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"], "pid and name required");
    let (status, text) = h
        .request("POST", "/heartbeat", Some(r#"{"pid": 1234}"#))
        .unwrap();
    assert_eq!(status, 400, "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["error"],
        "pid and name required"
    );
    let (status, text) = h
        .request("POST", "/heartbeat/heartbeat", Some("pid=1&name=x"))
        .unwrap();
    assert_eq!(status, 400, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let err = v["error"].as_str().unwrap_or_default();
    assert!(err.starts_with("invalid json"), "{v}");
    let good = json!({"pid": a.pid(), "name": "listed-a"}).to_string();
    let (status, text) = h.request("POST", "/heartbeat", Some(&good)).unwrap();
    assert_eq!(status, 200, "{text}");
    let (status, _) = h.request("GET", "/heartbeats", None).unwrap();
    assert_eq!(status, 200);
    eprintln!(
        "five requests, two of them bad, took {} connection(s)",
        h.connections
    );
    // A beat for a pid that does not exist is taken, and its record says exited.
    let mesh = Mesh::start(&s);
    let gone = {
        let mut p = sleeper();
        let pid = p.pid();
        p.signal(9);
        p.wait_exit(Duration::from_secs(5));
        pid
    };
    let (status, v) = post(
        s.ws_port,
        "/heartbeat",
        &json!({"pid": gone, "name": "gone"}),
    );
    assert_eq!(status, 200, "{v}");
    mesh.wait_status(
        &topic("gone", gone),
        "offline",
        Some("exited"),
        Duration::from_secs(5),
    );
}

// ---------------------------------------------------------------------------
// (d) The reaper kills what is blocked, disconnected or stalled, not the healthy

const REAP_ENVS: &[(&str, &str)] = &[
    ("HEARTBEAT_TIMEOUT", "3000"),
    ("DISCONNECT_KILL_MS", "3000"),
    ("LIVENESS_MAX_STALL_MS", "3000"),
    ("CHECK_INTERVAL", "250"),
    ("REAP_GRACE_MS", "1000"),
];

#[test]
fn the_reaper_kills_blocked_disconnected_and_stalled_services_and_spares_the_healthy() {
    let s = serve(&["--reap"], REAP_ENVS);
    let mesh = Mesh::start(&s);
    let url = format!("http://127.0.0.1:{}/heartbeat", s.ws_port);
    const BOUND_MS: u64 = 3000;
    const SLACK_MS: u64 = 6000;

    let modes = [
        ("blocked", "killed:no_heartbeat"),
        ("disconnected", "killed:broker_disconnected"),
        ("stalled", "killed:no_progress"),
        ("healthy", ""),
    ];
    let mut targets: Vec<(&str, &str, Client)> = modes
        .iter()
        .map(|(mode, reason)| {
            let name = format!("reap-{mode}");
            let c = Client::node(&["reap_target.js", mode, &url, &name, "500"]);
            (*mode, *reason, c)
        })
        .collect();

    // When each one's trigger started (wall-clock ms, the clock the server
    // stamps records with): blocked from its last beat, the others from
    // their first beat (the stalled one's last_progress_ts is that moment).
    let mut trigger_ms = HashMap::new();
    for (mode, _, c) in targets.iter_mut() {
        let (_, ready) = c.wait_line("ready", Duration::from_secs(15));
        let ready: Value = serde_json::from_str(&ready).unwrap();
        let from = match *mode {
            "blocked" => {
                let (_, b) = c.wait_line("blocking", Duration::from_secs(10));
                let b: Value = serde_json::from_str(&b).unwrap();
                b["last_sent_ms"].as_u64().unwrap()
            }
            "stalled" => ready["progress_ts"].as_u64().unwrap(),
            _ => ready["first_sent_ms"].as_u64().unwrap(),
        };
        trigger_ms.insert(*mode, from);
    }
    for (mode, _, c) in targets.iter() {
        let r = mesh.wait_status(
            &topic(&format!("reap-{mode}"), c.pid()),
            "online",
            None,
            Duration::from_secs(5),
        );
        assert_legacy_record(&r, &format!("reap-{mode}"), c.pid());
    }

    let latest = trigger_ms.values().max().copied().unwrap();
    let deadline_ms = latest + BOUND_MS + SLACK_MS;
    loop {
        let mut pending = false;
        for (mode, _, c) in targets.iter_mut() {
            if *mode != "healthy" && c.running() {
                pending = true;
            }
        }
        if !pending || now_ms() > deadline_ms {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    for (mode, reason, c) in targets.iter_mut() {
        let name = format!("reap-{mode}");
        let t = topic(&name, c.pid());
        if *mode == "healthy" {
            assert!(
                c.running(),
                "the healthy service was killed; record: {:?}; serve log:\n{}",
                mesh.last(&t),
                common::serve_log(&s)
            );
            continue;
        }
        let from = trigger_ms[*mode];
        let Some((_, exit_ms)) = c.poll_exit() else {
            panic!(
                "{name} still runs {} ms after its trigger (bound {BOUND_MS} ms + {SLACK_MS} ms); \
                 record: {:?}; serve log:\n{}",
                now_ms() - from,
                mesh.last(&t),
                common::serve_log(&s)
            );
        };
        let took = exit_ms.saturating_sub(from);
        eprintln!("{name} exited {took} ms after its trigger (bound {BOUND_MS} ms)");
        assert!(
            took + 100 >= BOUND_MS,
            "{name} was killed {took} ms after its trigger, before the {BOUND_MS} ms bound"
        );
        assert!(took <= BOUND_MS + SLACK_MS, "{name} took {took} ms");
        let r = mesh.wait_status(&t, "offline", Some(reason), Duration::from_secs(5));
        assert_legacy_record(&r, &name, c.pid());
    }

    // The end state, a moment later (a late `exited` must not overwrite the
    // kill reason), in the monitor.
    std::thread::sleep(Duration::from_millis(1500));
    let rows = monitor_json(&s);
    for (mode, reason, c) in targets.iter_mut() {
        let t = topic(&format!("reap-{mode}"), c.pid());
        let r = row(&rows, &t).unwrap_or_else(|| panic!("{t} missing from the monitor"));
        if *mode == "healthy" {
            assert!(c.running(), "the healthy service still runs at the end");
            assert_eq!(r["state"], "online", "{r}");
            assert_eq!(r["status"], "online", "{r}");
        } else {
            assert_eq!(r["state"], "offline", "{r}");
            assert_eq!(r["reason"], *reason, "{r}");
        }
    }

    // The legacy list notes the kills (`killedAt`); informational.
    if let Some((200, body)) = http(s.ws_port, "GET", "/heartbeats", None) {
        let list: Vec<Value> = serde_json::from_str(&body).unwrap_or_default();
        for (mode, _, c) in targets.iter() {
            let e = list.iter().find(|e| e["pid"] == c.pid());
            eprintln!(
                "GET /heartbeats {mode}: killedAt = {:?}",
                e.map(|e| e["killedAt"].clone())
            );
        }
    }
}

// ---------------------------------------------------------------------------
// (e) Forged records: only the exact process is ever signalled

#[test]
fn forged_records_kill_only_the_process_they_exactly_name() {
    let s = serve(&["--reap"], REAP_ENVS);
    let mesh = Mesh::start(&s);
    let host = hostname();
    let boot = host_boot_id();
    let mut right = sleeper();
    let mut reused = sleeper();
    let mut elsewhere = sleeper();

    let record = |service: &str, host: &str, pid: u32, ticks: u64| {
        json!({
            "service": service, "instance_id": format!("{host}:{pid}"), "hostname": host,
            "port": pid, "pid": pid, "package": "default", "uptime_seconds": 100,
            "timestamp": now_unix() - 60.0, "status": "online", "boot_id": format!("forged-{pid}"),
            "seq": 7, "interval_secs": 1, "connected": true, "queue_depth": 0, "inflight": 0,
            "proc_start_ticks": ticks, "host_boot_id": boot,
        })
    };
    let t_right = format!("axion/default/heartbeat/forged1/{host}:{}", right.pid());
    let t_reused = format!("axion/default/heartbeat/forged2/{host}:{}", reused.pid());
    let t_elsewhere = format!(
        "axion/default/heartbeat/forged3/otherhost:{}",
        elsewhere.pid()
    );
    let t_init = format!("axion/default/heartbeat/forged4/{host}:1");
    // The pid-1 and other-host records are exact in every other respect, so
    // only those two rules keep the reaper off them.
    mesh.publish_retained(
        &t_reused,
        &record(
            "forged2",
            &host,
            reused.pid(),
            proc_start_ticks(reused.pid()) + 1,
        ),
    );
    mesh.publish_retained(
        &t_elsewhere,
        &record(
            "forged3",
            "otherhost",
            elsewhere.pid(),
            proc_start_ticks(elsewhere.pid()),
        ),
    );
    mesh.publish_retained(&t_init, &record("forged4", &host, 1, proc_start_ticks(1)));
    mesh.publish_retained(
        &t_right,
        &record("forged1", &host, right.pid(), proc_start_ticks(right.pid())),
    );
    let published = Instant::now();

    // The exact one dies (so this test can fail), within a few checks.
    let died = wait_until(
        Duration::from_secs(6),
        "the exactly named sleep to be killed",
        || right.child.try_wait().unwrap().map(|_| Instant::now()),
    );
    eprintln!("forged1 killed {:?} after its record", died - published);
    mesh.wait_status(
        &t_right,
        "offline",
        Some("killed:no_heartbeat"),
        Duration::from_secs(5),
    );

    // Two more check intervals (and then some): nothing else is touched.
    std::thread::sleep(Duration::from_millis(2 * 250 + 1000));
    assert!(
        alive(&mut reused),
        "a sleep whose start time differs from the record (a reused pid) was killed"
    );
    assert!(
        alive(&mut elsewhere),
        "a record of another host killed a local pid"
    );
    for t in [&t_reused, &t_elsewhere, &t_init] {
        for (_, r) in mesh.history(t) {
            let reason = r["reason"].as_str().unwrap_or("");
            assert!(
                !reason.starts_with("killed:"),
                "{t} was acted on: {r}; serve log:\n{}",
                common::serve_log(&s)
            );
        }
    }
}

// ---------------------------------------------------------------------------
// (f) A death loop raises a retained alarm, which clears when it calms down

/// Starts and `kill -9`s the HeartbeatClient runner `n` times, each once
/// the mesh shows it online; returns when the last one was spawned (its
/// process start, which the server may take from `/proc`, is later).
fn death_loop(s: &Serve, mesh: &Mesh, name: &str, n: usize) -> Instant {
    let url = format!("http://127.0.0.1:{}/heartbeat/heartbeat", s.ws_port);
    let mut last_start = Instant::now();
    for i in 0..n {
        last_start = Instant::now();
        let mut c = heartbeat_client(&url, name, 200);
        c.wait_line("ready", Duration::from_secs(15));
        mesh.wait_status(
            &topic(name, c.pid()),
            "online",
            None,
            Duration::from_secs(5),
        );
        c.kill9();
        eprintln!("{name}: start {} of {n} killed", i + 1);
    }
    last_start
}

#[test]
fn a_death_loop_raises_a_restart_alarm_shown_by_the_monitor() {
    let s = serve(
        &["--reap"],
        &[
            ("RESTART_ALARM_COUNT", "5"),
            ("RESTART_ALARM_WINDOW_SECS", "600"),
            ("ALARM_QUIET_SECS", "600"),
        ],
    );
    let mesh = Mesh::start(&s);
    let name = "crashy";
    let t = alarm_topic(name);
    death_loop(&s, &mesh, name, 5);
    // Five starts are four restarts: no alarm yet.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        mesh.last(&t).is_none(),
        "an alarm after 4 restarts (limit 5): {:?}",
        mesh.last(&t)
    );
    death_loop(&s, &mesh, name, 2);

    let alarm = wait_until(Duration::from_secs(5), "the restart alarm", || {
        mesh.last(&t)
    });
    eprintln!("alarm: {alarm}");
    assert_eq!(alarm["kind"], "restart_loop", "{alarm}");
    assert_eq!(alarm["service"], name, "{alarm}");
    assert_eq!(alarm["package"], "default", "{alarm}");
    assert_eq!(alarm["host"], hostname().as_str(), "{alarm}");
    assert!(alarm["restarts"].as_u64().unwrap_or(0) >= 6, "{alarm}");
    assert_eq!(alarm["window_secs"], 600, "{alarm}");
    assert!(alarm["hint"].is_string(), "{alarm}");

    // Retained: a reader that comes later sees it, on the service's rows.
    let rows = monitor_json(&s);
    let mine: Vec<&Value> = rows.iter().filter(|r| r["service"] == name).collect();
    assert!(!mine.is_empty(), "the monitor lists {name}");
    for r in &mine {
        assert_eq!(r["alarm"]["kind"], "restart_loop", "{r}");
    }
    assert!(
        rows.iter()
            .filter(|r| r["service"] != name)
            .all(|r| r.get("alarm").is_none_or(Value::is_null)),
        "only {name}'s rows carry the alarm"
    );
    let text = monitor_text(&s);
    assert!(
        text.lines()
            .any(|l| l.contains("ALARM") && l.contains(name)),
        "the text monitor shows the alarm:\n{text}"
    );
}

#[test]
fn a_restart_alarm_clears_after_the_quiet_period() {
    const QUIET_SECS: u64 = 3;
    let s = serve(
        &["--reap"],
        &[
            ("RESTART_ALARM_COUNT", "5"),
            ("RESTART_ALARM_WINDOW_SECS", "600"),
            ("ALARM_QUIET_SECS", "3"),
            ("CHECK_INTERVAL", "250"),
        ],
    );
    let mesh = Mesh::start(&s);
    let name = "flappy";
    let t = alarm_topic(name);
    let last_start = death_loop(&s, &mesh, name, 7);
    let alarm = wait_until(Duration::from_secs(3), "the restart alarm", || {
        mesh.last(&t)
    });
    assert!(alarm["restarts"].as_u64().unwrap_or(0) >= 6, "{alarm}");

    // Cleared: an empty retained payload, not before the quiet period.
    let cleared = wait_until(
        Duration::from_secs(QUIET_SECS + 6),
        "the alarm to clear",
        || match mesh.last_raw(&t) {
            Some((at, p)) if p.is_empty() => Some(at),
            _ => None,
        },
    );
    let quiet_for = cleared - last_start;
    eprintln!("alarm cleared {quiet_for:?} after the last start");
    // A start time read from /proc is the boot time (`btime`, whole seconds)
    // plus the start ticks: up to a second early. Hence the tolerance.
    assert!(
        quiet_for + Duration::from_millis(1100) >= Duration::from_secs(QUIET_SECS),
        "cleared after {quiet_for:?}, before the {QUIET_SECS} s quiet period"
    );
    // It stays cleared: no new start, no new alarm (several checks later).
    std::thread::sleep(Duration::from_millis(1500));
    let after: Vec<Value> = mesh
        .history(&t)
        .into_iter()
        .filter(|(at, _)| *at > cleared)
        .map(|(_, v)| v)
        .collect();
    assert!(
        after.iter().all(Value::is_null),
        "the alarm came back after it cleared, with no new start: {after:?}"
    );
    let rows = monitor_json(&s);
    for r in rows.iter().filter(|r| r["service"] == name) {
        assert!(r.get("alarm").is_none_or(Value::is_null), "{r}");
    }
    let text = monitor_text(&s);
    assert!(
        !text
            .lines()
            .any(|l| l.contains("ALARM") && l.contains(name)),
        "the text monitor still shows the cleared alarm:\n{text}"
    );
}

// ---------------------------------------------------------------------------
// (g) Instance limits, from flags, env and PM2 ecosystem files

/// Posts a beat for `pid` as `name`; returns the status and reply.
fn beat(s: &Serve, name: &str, pid: u32) -> (u16, Value) {
    post(s.ws_port, "/heartbeat", &json!({"pid": pid, "name": name}))
}

fn assert_refused(s: &Serve, mesh: &Mesh, name: &str, pid: u32) {
    let (status, v) = beat(s, name, pid);
    assert_eq!(status, 409, "{v}");
    assert_eq!(
        v["error"],
        format!("instance limit exceeded for {name}"),
        "{v}"
    );
    mesh.wait_status(
        &topic(name, pid),
        "offline",
        Some("refused:instance_limit"),
        Duration::from_secs(5),
    );
}

#[test]
fn max_instances_refuses_one_live_pid_too_many() {
    let dir = tempfile::tempdir().unwrap();
    let eco = dir.path().join("ecosystem.config.json");
    std::fs::write(&eco, r#"{"apps":[{"name":"eco","instances":2}]}"#).unwrap();
    let s = serve(
        &[
            "--max-instances",
            "lim=1",
            "--ecosystem",
            eco.to_str().unwrap(),
        ],
        &[],
    );
    let mesh = Mesh::start(&s);

    let mut first = sleeper();
    let second = sleeper();
    let (status, v) = beat(&s, "lim", first.pid());
    assert_eq!(status, 200, "{v}");
    assert_ok_reply(&v, first.pid(), "lim");
    assert_refused(&s, &mesh, "lim", second.pid());
    // The first keeps its place.
    let (status, v) = beat(&s, "lim", first.pid());
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        mesh.status_of(&topic("lim", first.pid())).unwrap().0,
        "online"
    );
    let rows = monitor_json(&s);
    let r = row(&rows, &topic("lim", second.pid())).expect("the refused one is listed");
    assert_eq!(r["state"], "offline", "{r}");
    assert_eq!(r["reason"], "refused:instance_limit", "{r}");
    // Once the first is gone, the second is a live pid within the limit.
    let first_pid = first.pid();
    first.signal(9);
    first.wait_exit(Duration::from_secs(5));
    mesh.wait_status(
        &topic("lim", first_pid),
        "offline",
        Some("exited"),
        Duration::from_secs(5),
    );
    let (status, v) = beat(&s, "lim", second.pid());
    assert_eq!(status, 200, "after the first exited: {v}");

    // The ecosystem file: two `eco` instances, not three.
    let e: Vec<Proc> = (0..3).map(|_| sleeper()).collect();
    for p in &e[..2] {
        let (status, v) = beat(&s, "eco", p.pid());
        assert_eq!(status, 200, "{v}");
    }
    assert_refused(&s, &mesh, "eco", e[2].pid());
    // A service without a limit is never refused.
    for p in &e {
        let (status, v) = beat(&s, "free", p.pid());
        assert_eq!(status, 200, "{v}");
    }
}

#[test]
fn instance_limits_from_env_and_a_js_ecosystem_file() {
    let dir = tempfile::tempdir().unwrap();
    let eco = dir.path().join("ecosystem.config.js");
    std::fs::write(
        &eco,
        "module.exports = {\n  apps: [\n    { name: \"ecojs\", script: \"main.js\", instances: 1 },\n  ],\n};\n",
    )
    .unwrap();
    let s = serve(
        &[],
        &[
            ("ECOSYSTEM_CONFIG", eco.to_str().unwrap()),
            ("AXION_MAX_INSTANCES", "envlim=1,other=3"),
        ],
    );
    let mesh = Mesh::start(&s);
    let a = sleeper();
    let b = sleeper();
    for name in ["ecojs", "envlim"] {
        let (status, v) = beat(&s, name, a.pid());
        assert_eq!(status, 200, "{name}: {v}");
        assert_refused(&s, &mesh, name, b.pid());
    }
}
