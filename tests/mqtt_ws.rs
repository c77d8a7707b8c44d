//! MQTT 3.1.1 and 5 over WebSocket on `axion serve`'s WebSocket port
//! (`ws://…/mqtt`, `wss://…/mqtt` with TLS), end to end with real clients
//! as real processes: MQTT.js and paho-mqtt over WebSocket
//! (`tests/clients/mqtt_ws_driver.{js,py}`), Mosquitto's clients over TCP
//! on the other side. The WebSocket clients go through the broker's own
//! front end, so logins, ACLs and the connection limit hold as on TCP:
//! several tests run the same driver over both transports and compare.
//! Hand-made frames check the framing and how bad input is closed, and
//! `axion bridge` alone (no broker) refuses `/mqtt`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::auth::hash_line;
use common::{axion_bin, wait_until, Mosquitto, Serve};
use serde_json::{json, Value};

const PASSWORD: &str = "ws horse battery";
/// Messages per flow.
const COUNT: usize = 20;
const WAIT: Duration = Duration::from_secs(30);

fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// A child process whose stdout lines arrive on a channel, and whose
/// stderr is kept for failure messages; killed on drop.
struct Lines {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    rx: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    seen: Vec<String>,
}

impl Lines {
    fn spawn(name: &str, cmd: &mut Command) -> Lines {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().expect("stderr");
        let kept = stderr.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            kept.lock().unwrap().push_str(&text);
        });
        Lines {
            name: name.to_string(),
            stdin: child.stdin.take(),
            child,
            rx,
            stderr,
            seen: Vec::new(),
        }
    }

    fn report(&self) -> String {
        format!(
            "{}: stdout so far:\n{}\nstderr:\n{}",
            self.name,
            self.seen.join("\n"),
            self.stderr.lock().unwrap()
        )
    }

    /// The first line (from now) `pred` accepts; panics if the process
    /// ends or `WAIT` passes first.
    fn wait_for(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("no {what} within {WAIT:?}; {}", self.report())
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // Let the stderr thread finish before quoting it.
                    let status = self.child.wait();
                    std::thread::sleep(Duration::from_millis(50));
                    panic!("{what}: ended first ({status:?}); {}", self.report())
                }
            }
        }
    }

    /// The next JSON line whose `event` is `event`.
    fn event(&mut self, event: &str) -> Value {
        let line = self.wait_for(&format!("event {event:?}"), |l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| v["event"] == event)
        });
        serde_json::from_str(&line).expect("JSON")
    }

    /// Waits for the process to exit, which must be with success.
    fn exits_ok(mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                std::thread::sleep(Duration::from_millis(50));
                assert!(status.success(), "exit {status:?}; {}", self.report());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "did not exit within {WAIT:?}; {}",
                self.report()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which client, over which transport.
#[derive(Clone, Debug)]
enum Client {
    /// MQTT.js at `url` (`ws://…/mqtt`, `wss://…/mqtt` or `mqtt://…`).
    MqttJs(String),
    /// paho-mqtt at `url` (same forms).
    Paho(String),
    /// mosquitto_sub / mosquitto_pub over TCP on this port.
    Mosquitto(u16),
}

/// One end of a flow: a client, an MQTT version, maybe a login, and for
/// `wss://` the CA to trust.
#[derive(Clone, Debug)]
struct End {
    client: Client,
    version: u8,
    login: Option<(String, String)>,
    ca: Option<PathBuf>,
}

fn end(client: Client, version: u8) -> End {
    End {
        client,
        version,
        login: None,
        ca: None,
    }
}

impl End {
    fn logged_in_as(mut self, user: &str, password: &str) -> End {
        self.login = Some((user.into(), password.into()));
        self
    }

    fn trusting(mut self, ca: &Path) -> End {
        self.ca = Some(ca.to_path_buf());
        self
    }

    fn driver(&self, mut cfg: Value) -> Lines {
        cfg["version"] = json!(self.version);
        if let Some((user, password)) = &self.login {
            cfg["username"] = json!(user);
            cfg["password"] = json!(password);
        }
        let (program, script, url) = match &self.client {
            Client::MqttJs(url) => ("node", "mqtt_ws_driver.js", url),
            Client::Paho(url) => ("python3", "mqtt_ws_driver.py", url),
            Client::Mosquitto(_) => unreachable!("mosquitto is not a driver"),
        };
        cfg["url"] = json!(url);
        let mut cmd = Command::new(program);
        if let Some(ca) = &self.ca {
            // paho reads it from the settings, Node from its environment.
            cfg["ca"] = json!(ca);
            cmd.env("NODE_EXTRA_CA_CERTS", ca);
        }
        cmd.arg(script)
            .arg(cfg.to_string())
            .current_dir(clients_dir());
        Lines::spawn(&format!("{program} {script} {}", cfg["mode"]), &mut cmd)
    }

    fn mosquitto_args(&self, cmd: &mut Command, port: u16) {
        cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
        cmd.args([
            "-V",
            if self.version == 5 {
                "mqttv5"
            } else {
                "mqttv311"
            },
        ]);
        if let Some((user, password)) = &self.login {
            cmd.args(["-u", user, "-P", password]);
        }
    }

    /// Subscribes to `topic` at `qos`; returns once the SUBACK is in.
    fn subscribe(&self, topic: &str, qos: u8, count: usize) -> Subscriber {
        match self.client {
            Client::Mosquitto(port) => {
                // Line-buffered: its stdout is a pipe, and the SUBACK line
                // is what the test waits for.
                let mut cmd = Command::new("stdbuf");
                cmd.args(["-oL", "mosquitto_sub"]);
                self.mosquitto_args(&mut cmd, port);
                cmd.args(["-t", topic, "-q", &qos.to_string()])
                    .args(["-C", &count.to_string(), "-W", "60", "-d"])
                    .args(["-F", "MSG %q %p"]);
                let mut lines = Lines::spawn("mosquitto_sub", &mut cmd);
                lines.wait_for("SUBACK", |l| l.contains("received SUBACK"));
                Subscriber {
                    lines,
                    mosquitto: true,
                }
            }
            _ => {
                let mut lines = self.driver(json!({
                    "mode": "sub", "topic": topic, "qos": qos, "count": count,
                }));
                lines.event("subscribed");
                Subscriber {
                    lines,
                    mosquitto: false,
                }
            }
        }
    }

    /// Publishes `msg-0` … `msg-<count-1>` to `topic` at `qos`, each
    /// acknowledged as its QoS asks, and disconnects.
    fn publish(&self, topic: &str, qos: u8, count: usize) {
        match self.client {
            Client::Mosquitto(port) => {
                let mut cmd = Command::new("mosquitto_pub");
                self.mosquitto_args(&mut cmd, port);
                cmd.args(["-t", topic, "-q", &qos.to_string(), "-l"]);
                let mut lines = Lines::spawn("mosquitto_pub", &mut cmd);
                let mut stdin = lines.stdin.take().expect("stdin");
                for i in 0..count {
                    writeln!(stdin, "msg-{i}").expect("write to mosquitto_pub");
                }
                drop(stdin);
                lines.exits_ok();
            }
            _ => {
                let mut lines = self.driver(json!({
                    "mode": "pub", "topic": topic, "qos": qos, "count": count,
                }));
                lines.event("done");
                lines.exits_ok();
            }
        }
    }

    /// One connection: the CONNACK's code (0 when accepted).
    fn connack(&self) -> i64 {
        let mut lines = self.driver(json!({ "mode": "connect" }));
        let line = lines.wait_for("a CONNACK", |l| {
            serde_json::from_str::<Value>(l)
                .is_ok_and(|v| v["event"] == "connack" || v["event"] == "refused")
        });
        let v: Value = serde_json::from_str(&line).expect("JSON");
        lines.exits_ok();
        v["code"].as_i64().expect("numeric code")
    }
}

struct Subscriber {
    lines: Lines,
    mosquitto: bool,
}

impl Subscriber {
    /// What it received, (payload, QoS) in order, once it has `count`.
    fn messages(mut self) -> Vec<(String, u8)> {
        let got = if self.mosquitto {
            let mut got = Vec::new();
            for line in self.lines.seen.clone() {
                got.extend(parse_mosquitto(&line));
            }
            while got.len() < COUNT {
                let line = self.lines.wait_for("a message", |l| l.starts_with("MSG "));
                got.extend(parse_mosquitto(&line));
            }
            got
        } else {
            let done = self.lines.event("done");
            serde_json::from_value::<Vec<(String, u8)>>(done["messages"].clone()).expect("messages")
        };
        self.lines.exits_ok();
        got
    }
}

fn parse_mosquitto(line: &str) -> Option<(String, u8)> {
    let rest = line.strip_prefix("MSG ")?;
    let (qos, payload) = rest.split_once(' ')?;
    Some((payload.to_string(), qos.parse().ok()?))
}

fn expected(qos: u8) -> Vec<(String, u8)> {
    (0..COUNT).map(|i| (format!("msg-{i}"), qos)).collect()
}

/// `publisher` sends to `subscriber`, subscribed first, at `qos`: every
/// message arrives, in order, at that QoS.
fn flow(subscriber: &End, publisher: &End, topic: &str, qos: u8) {
    let started = Instant::now();
    let sub = subscriber.subscribe(topic, qos, COUNT);
    publisher.publish(topic, qos, COUNT);
    let got = sub.messages();
    assert_eq!(
        got,
        expected(qos),
        "{publisher:?} -> {subscriber:?} at QoS {qos}"
    );
    eprintln!(
        "{:?} -> {:?}, QoS {qos}: {COUNT} messages in {:?}",
        publisher.client,
        subscriber.client,
        started.elapsed()
    );
}

fn ws_url(serve: &Serve) -> String {
    format!("ws://127.0.0.1:{}/mqtt", serve.ws_port)
}

fn tcp_url(serve: &Serve) -> String {
    format!("mqtt://127.0.0.1:{}", serve.mqtt_port)
}

/// An auth file: `alice` may publish and subscribe under `test/`, and
/// nothing else.
fn auth_file(dir: &Path) -> PathBuf {
    let text = format!(
        r#"
[roles.tester]
publish = ["test/#"]
subscribe = ["test/#"]

[users.alice]
{}
roles = ["tester"]
"#,
        hash_line(PASSWORD)
    );
    let path = dir.join("auth.toml");
    std::fs::write(&path, text).expect("write the auth file");
    path
}

fn serve_with_auth(dir: &Path, extra: &[&str]) -> Serve {
    let path = auth_file(dir);
    let mut args = vec!["--auth-file", path.to_str().expect("utf-8")];
    args.extend(extra);
    Serve::start_with(&args, &[])
}

#[test]
fn mqtt_js_over_websocket_and_mosquitto_over_tcp_at_qos_0_1_2() {
    let serve = Serve::start();
    let tcp = Client::Mosquitto(serve.mqtt_port);
    let js = Client::MqttJs(ws_url(&serve));
    for qos in 0..=2 {
        flow(
            &end(tcp.clone(), 5),
            &end(js.clone(), 5),
            &format!("test/js/{qos}/up"),
            qos,
        );
        flow(
            &end(js.clone(), 4),
            &end(tcp.clone(), 4),
            &format!("test/js/{qos}/down"),
            qos,
        );
    }
}

#[test]
fn paho_over_websocket_and_mosquitto_over_tcp_at_qos_0_1_2() {
    let serve = Serve::start();
    let tcp = Client::Mosquitto(serve.mqtt_port);
    let paho = Client::Paho(ws_url(&serve));
    for qos in 0..=2 {
        flow(
            &end(tcp.clone(), 5),
            &end(paho.clone(), 4),
            &format!("test/paho/{qos}/up"),
            qos,
        );
        flow(
            &end(paho.clone(), 5),
            &end(tcp.clone(), 5),
            &format!("test/paho/{qos}/down"),
            qos,
        );
    }
}

#[test]
fn with_an_auth_file_websocket_clients_log_in_and_flow_at_qos_0_1_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let serve = serve_with_auth(dir.path(), &[]);
    let tcp = end(Client::Mosquitto(serve.mqtt_port), 5).logged_in_as("alice", PASSWORD);
    let js = end(Client::MqttJs(ws_url(&serve)), 5).logged_in_as("alice", PASSWORD);
    let paho = end(Client::Paho(ws_url(&serve)), 4).logged_in_as("alice", PASSWORD);
    for qos in 0..=2 {
        flow(&tcp, &js, &format!("test/auth/{qos}/js"), qos);
        flow(&paho, &tcp, &format!("test/auth/{qos}/paho"), qos);
    }
}

#[test]
fn a_wrong_password_over_websocket_gets_the_connack_it_gets_over_tcp() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Eight failed logins from one address: not what this test is about.
    let serve = serve_with_auth(dir.path(), &["--login-max-failures", "100"]);
    let (ws, tcp) = (ws_url(&serve), tcp_url(&serve));
    for version in [4, 5] {
        let codes = |client: fn(String) -> Client| {
            let over = |url: &str| {
                end(client(url.to_string()), version)
                    .logged_in_as("alice", "wrong")
                    .connack()
            };
            (over(&ws), over(&tcp))
        };
        let (js_ws, js_tcp) = codes(Client::MqttJs);
        let (paho_ws, paho_tcp) = codes(Client::Paho);
        // 3.1.1: 4, bad user name or password; 5: 0x86.
        let want = if version == 5 { 0x86 } else { 4 };
        assert_eq!(
            (js_ws, js_tcp),
            (want, want),
            "MQTT.js v{version}: (ws, tcp)"
        );
        assert_eq!(paho_ws, paho_tcp, "paho v{version}: (ws, tcp)");
        assert_ne!(paho_ws, 0, "paho v{version} was let in");
        // The right password is let in over WebSocket.
        let right = end(Client::MqttJs(ws.clone()), version).logged_in_as("alice", PASSWORD);
        assert_eq!(right.connack(), 0, "MQTT.js v{version}, right password");
    }
    // No credentials at all: not authorized, as over TCP.
    let anonymous = |url: &str| end(Client::MqttJs(url.to_string()), 5).connack();
    assert_eq!((anonymous(&ws), anonymous(&tcp)), (0x87, 0x87));
}

#[test]
fn acl_denials_apply_over_websocket_as_over_tcp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let serve = serve_with_auth(dir.path(), &[]);
    let (ws, tcp) = (ws_url(&serve), tcp_url(&serve));
    let acl = |url: &str, version: u8, topic: &str| {
        let mut lines = end(Client::MqttJs(url.to_string()), version)
            .logged_in_as("alice", PASSWORD)
            .driver(json!({ "mode": "acl", "topic": topic }));
        let v = lines.event("acl");
        lines.exits_ok();
        (v["suback"].as_i64().unwrap(), v["puback"].as_i64().unwrap())
    };
    for version in [4, 5] {
        // 3.1.1 has no PUBACK reason: the broker drops the publish and
        // acknowledges it; SUBACK says 0x80.
        let denied = if version == 5 {
            (0x87, 0x87)
        } else {
            (0x80, 0)
        };
        let over_ws = acl(&ws, version, "secret/x");
        let over_tcp = acl(&tcp, version, "secret/x");
        assert_eq!(over_ws, denied, "v{version} over WebSocket");
        assert_eq!(over_tcp, denied, "v{version} over TCP");
        assert_eq!(
            acl(&ws, version, "test/allowed"),
            (1, 0),
            "v{version} allowed"
        );
    }
}

#[test]
fn websocket_clients_count_against_the_connection_limit() {
    let max = 12;
    let serve = Serve::start_with(&["--max-connections", &max.to_string()], &[]);
    let (ws, tcp) = (ws_url(&serve), tcp_url(&serve));
    let mut holder =
        end(Client::MqttJs(ws.clone()), 4).driver(json!({ "mode": "hold", "n": max + 4 }));
    let held = holder.event("held");
    let accepted = held["held"].as_u64().unwrap() as usize;
    let refused: Vec<i64> = serde_json::from_value(held["refused"].clone()).unwrap();
    assert!(accepted <= max, "{accepted} held past a limit of {max}");
    assert!(refused.len() >= 4, "refusals past the limit: {held}");
    // 3.1.1: 3, server unavailable.
    assert!(refused.iter().all(|&c| c == 3), "refusal codes {refused:?}");
    // The WebSocket clients hold the broker's slots: TCP is refused too
    // (MQTT 5: 0x89, server busy) …
    assert_eq!(end(Client::MqttJs(tcp.clone()), 5).connack(), 0x89);
    // … until they leave.
    holder.exits_ok();
    wait_until(
        Duration::from_secs(10),
        "a slot after the WebSocket clients left",
        || (end(Client::MqttJs(tcp.clone()), 5).connack() == 0).then_some(()),
    );
}

#[test]
fn frames_carry_the_byte_stream_and_bad_input_is_closed_cleanly() {
    let serve = Serve::start();
    // Default --max-packet-size 1 MiB: messages up to 2 MiB are read.
    let mut raw = end(Client::Paho(ws_url(&serve)), 4).driver(json!({
        "mode": "raw", "oversize": 3 * 1024 * 1024,
    }));
    let line = raw.wait_for("the raw checks", |l| l.starts_with('{'));
    raw.exits_ok();
    let got: Value = serde_json::from_str(&line).expect("JSON");
    assert_eq!(got["subprotocol"], "mqtt", "{got}");
    // CONNACK (accepted) and PINGRESP: the CONNECT spanned two frames, and
    // the second frame also held the PINGREQ.
    assert_eq!(got["replies"], "20020000d000", "{got}");
    let binary_only = json!([1003, "MQTT over WebSocket takes binary frames only"]);
    assert_eq!(got["text"], binary_only, "{got}");
    assert_eq!(got["text_after_connect"], binary_only, "{got}");
    // Not MQTT: a close frame, not a reset.
    assert_eq!(got["garbage"][0], 1000, "{got}");
    assert_eq!(
        got["oversize"],
        json!([1009, "message over the size limit"]),
        "{got}"
    );
    // A client that asks for no subprotocol is served all the same.
    assert_eq!(got["no_subprotocol"], Value::Null, "{got}");
    assert_eq!(got["no_subprotocol_connack"], "20020000", "{got}");
    // And the broker is none the worse.
    assert_eq!(end(Client::MqttJs(ws_url(&serve)), 5).connack(), 0);
}

#[test]
fn wss_carries_mqtt_when_tls_is_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = common::tls::make_certs(dir.path());
    let serve = Serve::start_with(
        &[
            "--ws-tls-cert",
            cert.to_str().expect("utf-8"),
            "--ws-tls-key",
            key.to_str().expect("utf-8"),
        ],
        &[],
    );
    let wss = format!("wss://127.0.0.1:{}/mqtt", serve.ws_port);
    let paho = end(Client::Paho(wss.clone()), 5).trusting(&ca);
    let js = end(Client::MqttJs(wss), 4).trusting(&ca);
    let tcp = end(Client::Mosquitto(serve.mqtt_port), 5);
    flow(&paho, &js, "test/wss/in", 1);
    flow(&tcp, &paho, "test/wss/out", 2);
}

#[test]
fn sigterm_ends_websocket_sessions_and_serve_exits_0() {
    let mut serve = Serve::start();
    let mut client = end(Client::MqttJs(ws_url(&serve)), 5).driver(json!({ "mode": "wait_close" }));
    client.event("connected");
    serve.proc.signal(15);
    let closed = client.event("closed");
    // MQTT 5 DISCONNECT 0x8B, server shutting down, as a TCP client gets.
    assert_eq!(closed["reason"], 0x8b, "{closed}");
    client.exits_ok();
    assert_eq!(serve.proc.wait_exit(Duration::from_secs(15)), Some(0));
}

/// A WebSocket upgrade request for `path`: the status code and body.
fn upgrade(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: mqtt\r\n\r\n"
    )
    .unwrap();
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    // A 101 keeps the connection open; a refusal's body is short.
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        text.extend_from_slice(&buf[..n]);
        let t = String::from_utf8_lossy(&text);
        if t.starts_with("HTTP/1.1 101") && t.contains("\r\n\r\n") {
            break;
        }
        if let Some((head, body)) = t.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok());
            if len.is_some_and(|len| body.len() >= len) {
                break;
            }
        }
    }
    let t = String::from_utf8_lossy(&text).to_string();
    let status = t
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = t
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

#[test]
fn axion_bridge_alone_refuses_mqtt_over_websocket_and_keeps_the_legacy_protocol() {
    let broker = Mosquitto::start();
    let bridge = common::spawn_listening(
        "axion bridge",
        Command::new(axion_bin())
            .args(["bridge", "--mqtt", &broker.mqtt_url()])
            .args(["--ws-listen", "127.0.0.1:0"])
            .args(["--package", &common::unique_name("t")]),
    );
    let ws_port = bridge.port(axion_wire::ports::WS);
    let (status, body) = upgrade(ws_port, "/mqtt");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("axion serve"), "the refusal says why: {body}");
    // Any other path is the legacy JSON protocol, as before.
    assert_eq!(upgrade(ws_port, "/").0, 101);
}
