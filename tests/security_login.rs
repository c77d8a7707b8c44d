//! Password guessing against `axion serve --auth-file`, end to end: how long
//! a failed login takes does not tell whether its user exists, and failed
//! logins from one address are refused during a backoff, unchecked, on
//! MQTT and the WebSocket bridge alike (one budget per address).
//!
//! The limits are given through their environment variables rather than
//! flags, so a build without the limit still starts and these tests fail on
//! what it does, not on an unknown flag.

mod common;

use common::auth::{hash_line, token_lines};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mqtt::{recv, V4, V5};
use common::raw::{mqtt_str, read_packet, varint};
use common::Serve;
use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as V5Code;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PASSWORD: &str = "correct horse";

/// Five failures, then a backoff of `backoff_ms` that does not grow.
fn limits(backoff_ms: &'static str) -> [(&'static str, &'static str); 3] {
    [
        ("AXION_LOGIN_MAX_FAILURES", "5"),
        ("AXION_LOGIN_BACKOFF_MS", backoff_ms),
        ("AXION_LOGIN_MAX_BACKOFF_SECS", "10"),
    ]
}

/// MQTT 5 CONNACK reasons.
const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
const BANNED: u8 = 0x8A;
const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;

/// Users: `svc` (a password, no token), `reader` (a bridge token, no
/// password) and `admin` (a password; superuser, reads the counters).
struct Fixture {
    dir: tempfile::TempDir,
    token: String,
}

impl Fixture {
    fn new() -> Self {
        let pw = hash_line(PASSWORD);
        let (token, tokens) = token_lines("reader");
        let text = format!(
            r#"
[roles.service]
publish = ["axion/p/#"]
subscribe = ["axion/p/#", "axion/default/event/#"]

[roles.admin]
superuser = true

[users.svc]
{pw}
roles = ["service"]

[users.reader]
{tokens}
roles = ["service"]

[users.admin]
{pw}
roles = ["admin"]
"#
        );
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("auth.toml"), text).expect("write auth file");
        Fixture { dir, token }
    }

    fn serve(&self, envs: &[(&str, &str)]) -> Serve {
        let path = self.dir.path().join("auth.toml");
        Serve::start_with(&["--auth-file", path.to_str().expect("utf-8")], envs)
    }
}

/// An MQTT 5 CONNECT with a user name and password.
fn connect_packet(client_id: &str, user: &str, password: &str) -> Vec<u8> {
    let mut body = Vec::new();
    mqtt_str(b"MQTT", &mut body);
    body.push(5);
    body.push(0xC2); // user name, password, clean start
    body.extend_from_slice(&30u16.to_be_bytes());
    body.push(0); // no properties
    mqtt_str(client_id.as_bytes(), &mut body);
    mqtt_str(user.as_bytes(), &mut body);
    mqtt_str(password.as_bytes(), &mut body);
    let mut packet = vec![0x10];
    varint(body.len(), &mut packet);
    packet.extend(body);
    packet
}

/// An MQTT 5 login over a connected socket: the time from CONNECT to
/// CONNACK, and the CONNACK's reason code.
async fn mqtt_login(port: u16, user: &str, password: &str) -> (Duration, u8) {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let packet = connect_packet("login-probe", user, password);
    let start = Instant::now();
    stream.write_all(&packet).await.expect("send CONNECT");
    let (byte1, body) = read_packet(&mut stream, 10_000)
        .await
        .expect("a CONNACK, not a close");
    let took = start.elapsed();
    assert_eq!(byte1, 0x20, "not a CONNACK");
    (took, body[1])
}

/// A WebSocket upgrade to the bridge with `?token=`: the time to the
/// response's head, its status and its Retry-After.
async fn ws_login(port: u16, token: &str) -> (Duration, u16, Option<u64>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the bridge");
    stream.set_nodelay(true).expect("nodelay");
    let request = format!(
        "GET /?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let start = Instant::now();
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send upgrade");
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("a response within 10 s")
            .expect("read the response");
        assert!(n > 0, "the bridge closed without a response");
        head.extend_from_slice(&buf[..n]);
    }
    let took = start.elapsed();
    let head = String::from_utf8_lossy(&head).to_lowercase();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let retry_after = head
        .lines()
        .find_map(|l| l.strip_prefix("retry-after:"))
        .and_then(|v| v.trim().parse().ok());
    (took, status, retry_after)
}

/// Median times of interleaved failed logins, one series per probe (after
/// two warm-up rounds: threads, allocator).
async fn interleaved_medians<F, Fut>(probes: [&str; 3], login: F) -> [Duration; 3]
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Duration>,
{
    let mut series: [Vec<Duration>; 3] = Default::default();
    for round in 0..ROUNDS + 2 {
        for (i, probe) in probes.iter().enumerate() {
            // A new unknown name each time, as an enumeration would try.
            let took = login(probe.replace("{round}", &round.to_string())).await;
            if round >= 2 {
                series[i].push(took);
            }
        }
    }
    series.map(|mut s| {
        s.sort();
        s[s.len() / 2]
    })
}

const ROUNDS: usize = 15;

/// `other` and `wrong` within a factor of two of each other.
fn indistinguishable(what: &str, other: Duration, wrong: Duration) {
    let ratio = other.as_secs_f64() / wrong.as_secs_f64();
    assert!(
        (0.5..=2.0).contains(&ratio),
        "{what}: {other:?} vs {wrong:?} (medians of {ROUNDS}): ratio {ratio:.2}"
    );
}

// Whether a user name exists must not show in how long its failed login
// takes: an unknown user, and one without a password (or token), cost one
// argon2 check as a wrong password does. The two tests below assert no
// speed but indistinguishability: medians of interleaved samples within a
// factor of two of each other, a margin CI noise does not cross (a check
// that skips argon2 is ~50 times faster). Interleaving spreads any load
// from other tests over every series alike.

#[tokio::test]
async fn a_failed_mqtt_login_takes_as_long_whether_or_not_the_user_exists() {
    let fx = Fixture::new();
    // A limit these failures never reach: only timing is under test.
    let serve = fx.serve(&[("AXION_LOGIN_MAX_FAILURES", "100000")]);
    let port = serve.mqtt_port;
    let [unknown, wrong, no_password] =
        interleaved_medians(["nobody-{round}", "svc", "reader"], |user| async move {
            let (took, code) = mqtt_login(port, &user, "guess").await;
            assert_eq!(code, BAD_USER_NAME_OR_PASSWORD, "{user}");
            took
        })
        .await;
    println!("MQTT medians: unknown {unknown:?}, wrong {wrong:?}, no password {no_password:?}");
    indistinguishable("unknown user vs wrong password", unknown, wrong);
    indistinguishable(
        "user without password vs wrong password",
        no_password,
        wrong,
    );
}

#[tokio::test]
async fn a_failed_bridge_token_takes_as_long_whether_or_not_the_user_exists() {
    let fx = Fixture::new();
    let serve = fx.serve(&[("AXION_LOGIN_MAX_FAILURES", "100000")]);
    let port = serve.ws_port;
    let [unknown, wrong, no_token] = interleaved_medians(
        ["nobody{round}.guess", "reader.guess", "svc.guess"],
        |token| async move {
            let (took, status, _) = ws_login(port, &token).await;
            assert_eq!(status, 401, "{token}");
            took
        },
    )
    .await;
    println!("bridge medians: unknown {unknown:?}, wrong {wrong:?}, no token {no_token:?}");
    indistinguishable("unknown user vs wrong token", unknown, wrong);
    indistinguishable("user without token vs wrong token", no_token, wrong);
}

fn v5_opts(port: u16, id: &str, user: &str, password: &str) -> rumqttc::v5::MqttOptions {
    let mut opts = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_credentials(user, password);
    opts
}

/// The CONNACK refusal an MQTT 5 login gets (`None`: it got in).
async fn v5_refusal(port: u16, user: &str, password: &str) -> Option<V5Code> {
    match V5::connect_with(v5_opts(port, "guesser", user, password)).await {
        Ok(_) => None,
        Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => Some(code),
        Err(other) => panic!("{user}: {other}"),
    }
}

/// Waits for the broker's heartbeat record to show `done` for its counters
/// (refused after a check, throttled before one); returns them.
async fn wait_counters(port: u16, done: impl Fn(u64, u64) -> bool) -> (u64, u64) {
    let mut watcher = V5::connect_with(v5_opts(port, "counters", "admin", PASSWORD))
        .await
        .expect("admin connects");
    watcher.subscribe("axion/+/heartbeat/broker/#", 1).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let record = recv(&mut watcher.rx, 20).await;
        let record: serde_json::Value = serde_json::from_slice(&record.payload).unwrap_or_default();
        let get = |name: &str| record["broker"][name].as_u64().unwrap_or(0);
        let counters = (get("auth_refused_connects"), get("auth_throttled_logins"));
        if done(counters.0, counters.1) {
            return counters;
        }
        assert!(
            Instant::now() < deadline,
            "counters never got there: last {record}"
        );
    }
}

/// Five wrong passwords, then every login from the address — the right
/// password too, on either protocol version — is refused unchecked until
/// the backoff ends; then the right password gets in, and the count starts
/// over. The broker's counters show the checks and the refusals apart.
#[tokio::test]
async fn after_too_many_failures_an_address_is_refused_until_its_backoff_ends() {
    let fx = Fixture::new();
    let serve = fx.serve(&limits("2000"));
    let port = serve.mqtt_port;

    for _ in 0..5 {
        assert_eq!(
            v5_refusal(port, "svc", "wrong").await,
            Some(V5Code::BadUserNamePassword)
        );
    }
    // The fifth failure started the backoff before its CONNACK was sent.
    let backoff_ends = Instant::now() + Duration::from_millis(2000);

    for _ in 0..20 {
        assert_eq!(
            v5_refusal(port, "svc", "wrong").await,
            Some(V5Code::Banned),
            "a login during the backoff must be refused unchecked"
        );
    }
    assert_eq!(
        v5_refusal(port, "svc", PASSWORD).await,
        Some(V5Code::Banned),
        "even the right password waits for the backoff"
    );
    let mut v4 = rumqttc::MqttOptions::new("guesser-v4", "127.0.0.1", port);
    v4.set_credentials("svc", PASSWORD);
    match V4::connect_with(v4).await {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, rumqttc::ConnectReturnCode::NotAuthorized)
        }
        other => panic!("3.1.1 during the backoff: {:?}", other.err()),
    }
    assert!(
        Instant::now() < backoff_ends,
        "the refusals took longer than the backoff: they cannot show it"
    );

    tokio::time::sleep_until((backoff_ends + Duration::from_millis(100)).into()).await;
    assert_eq!(v5_refusal(port, "svc", PASSWORD).await, None);
    // The success reset the count: four more failures are checked again.
    for _ in 0..4 {
        assert_eq!(
            v5_refusal(port, "svc", "wrong").await,
            Some(V5Code::BadUserNamePassword)
        );
    }

    // 9 checked failures; 22 refused without a check (so without argon2).
    let (refused, throttled) = wait_counters(port, |r, t| r >= 9 && t >= 22).await;
    assert_eq!((refused, throttled), (9, 22));
}

/// Parallel CONNECTs from one address get no more password checks than its
/// limit: the checks still running count against it, so a burst cannot
/// reach argon2 before the first failure is recorded.
#[tokio::test]
async fn a_parallel_burst_gets_no_more_checks_than_the_limit() {
    let fx = Fixture::new();
    let serve = fx.serve(&limits("5000"));
    let port = serve.mqtt_port;

    let burst: Vec<_> = (0..30)
        .map(|_| tokio::spawn(async move { mqtt_login(port, "svc", "wrong").await.1 }))
        .collect();
    let mut codes = Vec::new();
    for login in burst {
        codes.push(login.await.expect("login task"));
    }
    let checked = codes
        .iter()
        .filter(|&&c| c == BAD_USER_NAME_OR_PASSWORD)
        .count();
    assert!(
        (1..=5).contains(&checked),
        "{checked} of 30 parallel logins were checked (limit 5): {codes:x?}"
    );
    assert!(
        codes
            .iter()
            .all(|&c| [BAD_USER_NAME_OR_PASSWORD, BANNED, CONNECTION_RATE_EXCEEDED].contains(&c)),
        "{codes:x?}"
    );
}

/// The bridge's bearer tokens share the limit: after five wrong tokens,
/// the upgrade gets 429 with Retry-After (the right token too), a first
/// `auth` frame gets the same refusal, and so does an MQTT login from the
/// address; once the backoff ends the right token gets its WebSocket.
#[tokio::test]
async fn wrong_bridge_tokens_put_the_address_in_backoff_too() {
    let fx = Fixture::new();
    let serve = fx.serve(&limits("3000"));
    let ws = serve.ws_port;

    for _ in 0..5 {
        assert_eq!(ws_login(ws, "reader.wrong").await.1, 401);
    }
    let backoff_ends = Instant::now() + Duration::from_millis(3000);
    for _ in 0..10 {
        let (_, status, retry_after) = ws_login(ws, "reader.wrong").await;
        assert_eq!(
            status, 429,
            "a token during the backoff must be refused unchecked"
        );
        assert!(
            retry_after.is_some_and(|s| (1..=3).contains(&s)),
            "Retry-After: {retry_after:?}"
        );
    }
    assert_eq!(ws_login(ws, &fx.token).await.1, 429);
    assert_eq!(
        v5_refusal(serve.mqtt_port, "svc", PASSWORD).await,
        Some(V5Code::Banned),
        "MQTT and the bridge share one budget per address"
    );
    let script = format!(
        r#"
import asyncio, json
import websockets

async def main():
    ws = await websockets.connect("ws://127.0.0.1:{ws}")
    await ws.send(json.dumps({{"action": "auth", "token": "{token}"}}))
    print(json.loads(await asyncio.wait_for(ws.recv(), 5)).get("error"))

asyncio.run(main())
"#,
        token = fx.token
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .expect("run python3");
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(
        reply.starts_with("too many failed logins from this address"),
        "first-frame auth during the backoff: {reply}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        Instant::now() < backoff_ends,
        "the refusals took longer than the backoff: they cannot show it"
    );

    tokio::time::sleep_until((backoff_ends + Duration::from_millis(100)).into()).await;
    assert_eq!(ws_login(ws, &fx.token).await.1, 101);
    let (refused, throttled) = wait_counters(serve.mqtt_port, |r, t| r >= 5 && t >= 13).await;
    assert_eq!((refused, throttled), (5, 13));
}
