//! Authentication, ACLs and TLS of `axion serve`, end to end: real
//! processes, real clients (rumqttc, mosquitto_sub, paho), a real auth file
//! whose hashes come from `axion passwd`.

mod common;

use common::auth::{hash_line, token_lines};
use common::tls::make_certs;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mqtt::{recv, recv_none, V4, V5};
use common::{axion_bin, Serve};
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};

const PASSWORD: &str = "correct horse";

/// An auth file with: `svc` (publishes anything under axion/p, subscribes
/// axion/p), `reader` (subscribes axion/p and heartbeats), `admin`
/// (superuser); `test/nosubscribe` refused to everyone.
struct AuthFixture {
    dir: tempfile::TempDir,
    token: String,
}

impl AuthFixture {
    fn new() -> Self {
        let pw = hash_line(PASSWORD);
        let (token, tokens) = token_lines("reader");
        let text = format!(
            r#"
deny_subscribe = ["test/nosubscribe"]

[roles.service]
publish = ["axion/p/#", "test/#"]
subscribe = ["axion/p/#", "test/#"]
axion_components = true

[roles.reader]
subscribe = ["axion/p/#", "axion/+/heartbeat/#", "axion/default/event/sec/#"]
publish = ["axion/p/event/#", "axion/default/event/sec/#"]

[roles.admin]
superuser = true

[users.svc]
{pw}
roles = ["service"]

[users.reader]
{pw}
{tokens}
roles = ["reader"]

[users.admin]
{pw}
roles = ["admin"]
"#
        );
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("auth.toml"), text).expect("write auth file");
        AuthFixture { dir, token }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("auth.toml")
    }

    fn serve(&self) -> Serve {
        let path = self.path();
        Serve::start_with(&["--auth-file", path.to_str().expect("utf-8 path")], &[])
    }
}

fn v5_opts(port: u16, id: &str, user: &str) -> rumqttc::v5::MqttOptions {
    let mut opts = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(Some(4 * 1024 * 1024));
    opts.set_credentials(user, PASSWORD);
    opts
}

async fn v5_as(port: u16, id: &str, user: &str) -> V5 {
    V5::connect_with(v5_opts(port, id, user))
        .await
        .unwrap_or_else(|e| panic!("{user} could not connect: {e:?}"))
}

/// The next SUBACK's codes (other packets skipped).
async fn next_suback(c: &mut V5) -> Vec<SubscribeReasonCode> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, c.packets.recv()).await {
            Ok(Some(Packet::SubAck(s))) => return s.return_codes,
            Ok(Some(_)) => {}
            _ => panic!("no SUBACK within 5 s"),
        }
    }
}

/// The next PUBACK's reason (other packets skipped).
async fn next_puback(c: &mut V5) -> PubAckReason {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, c.packets.recv()).await {
            Ok(Some(Packet::PubAck(p))) => return p.reason,
            Ok(Some(_)) => {}
            _ => panic!("no PUBACK within 5 s"),
        }
    }
}

#[tokio::test]
async fn wrong_or_missing_credentials_get_the_right_connack() {
    let fx = AuthFixture::new();
    let serve = fx.serve();
    let port = serve.mqtt_port;

    let mut opts = rumqttc::MqttOptions::new("v4-bad", "127.0.0.1", port);
    opts.set_credentials("svc", "wrong");
    match V4::connect_with(opts).await {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, rumqttc::ConnectReturnCode::BadUserNamePassword)
        }
        other => panic!("3.1.1 wrong password: {:?}", other.err()),
    }
    let opts = rumqttc::MqttOptions::new("v4-anon", "127.0.0.1", port);
    match V4::connect_with(opts).await {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, rumqttc::ConnectReturnCode::NotAuthorized)
        }
        other => panic!("3.1.1 no credentials: {:?}", other.err()),
    }

    let mut opts = v5_opts(port, "v5-bad", "svc");
    opts.set_credentials("svc", "wrong");
    match V5::connect_with(opts).await {
        Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(
                code,
                rumqttc::v5::mqttbytes::v5::ConnectReturnCode::BadUserNamePassword
            )
        }
        other => panic!("5 wrong password: {:?}", other.err().map(|e| e.to_string())),
    }
    let opts = rumqttc::v5::MqttOptions::new("v5-anon", "127.0.0.1", port);
    match V5::connect_with(opts).await {
        Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(
                code,
                rumqttc::v5::mqttbytes::v5::ConnectReturnCode::NotAuthorized
            )
        }
        other => panic!("5 no credentials: {:?}", other.err().map(|e| e.to_string())),
    }

    // The right password gets in.
    let ok = v5_as(port, "v5-good", "svc").await;
    ok.publish("axion/p/event/x", b"{}", 1, false).await;
}

#[tokio::test]
async fn a_heartbeat_can_only_be_written_by_its_own_instance() {
    let fx = AuthFixture::new();
    let serve = fx.serve();
    let port = serve.mqtt_port;
    let topic = "axion/p/heartbeat/report/h1:8080";

    let owner = v5_as(port, "axion-hb-report-h1-8080", "svc").await;
    owner.publish(topic, b"{\"status\":\"ok\"}", 1, true).await;

    let mut intruder = v5_as(port, "intruder", "svc").await;
    intruder
        .publish(topic, b"{\"status\":\"forged\"}", 1, true)
        .await;
    assert_eq!(
        next_puback(&mut intruder).await,
        PubAckReason::NotAuthorized
    );
    intruder.publish(topic, b"", 1, true).await;
    assert_eq!(
        next_puback(&mut intruder).await,
        PubAckReason::NotAuthorized
    );
    // Its own events still go through.
    intruder.publish("axion/p/event/x", b"{}", 1, false).await;
    assert_eq!(next_puback(&mut intruder).await, PubAckReason::Success);

    // A 3.1.1 intruder, and a will aimed at the heartbeat, fare no better.
    let mut opts = rumqttc::MqttOptions::new("intruder-v4", "127.0.0.1", port);
    opts.set_credentials("svc", PASSWORD);
    let v4 = V4::connect_with(opts).await.expect("v4 connect");
    v4.publish(topic, b"", 0, true).await;
    v4.publish(topic, b"{\"status\":\"forged\"}", 1, true).await;
    let mut opts = v5_opts(port, "will-forger", "svc");
    opts.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
        topic,
        "",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        true,
        None,
    ));
    assert!(
        V5::connect_with(opts).await.is_err(),
        "a will on another instance's heartbeat must be refused"
    );

    // A late subscriber still sees the owner's record.
    let mut late = v5_as(port, "late", "reader").await;
    late.subscribe(topic, 1).await;
    let got = recv(&mut late.rx, 5).await;
    assert_eq!(got.payload, b"{\"status\":\"ok\"}");
    assert!(got.retain);
    recv_none(&mut late.rx, 300).await;
}

#[tokio::test]
async fn a_subscriber_gets_nothing_from_a_package_it_has_no_rights_to() {
    let fx = AuthFixture::new();
    let serve = fx.serve();
    let port = serve.mqtt_port;

    let mut reader = v5_as(port, "reader-1", "reader").await;
    reader
        .client
        .subscribe("axion/other-pkg/#", common::mqtt::qos_v5(1))
        .await
        .expect("subscribe");
    assert_eq!(
        next_suback(&mut reader).await,
        vec![SubscribeReasonCode::NotAuthorized]
    );
    reader
        .client
        .subscribe("#", common::mqtt::qos_v5(1))
        .await
        .expect("subscribe");
    assert_eq!(
        next_suback(&mut reader).await,
        vec![SubscribeReasonCode::NotAuthorized]
    );
    reader
        .client
        .subscribe("axion/p/#", common::mqtt::qos_v5(1))
        .await
        .expect("subscribe");
    assert_eq!(
        next_suback(&mut reader).await,
        vec![SubscribeReasonCode::Success(
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce
        )]
    );
    // `$share` needs a rule that names it.
    reader
        .client
        .subscribe("$share/g/axion/p/queue/q/tasks", common::mqtt::qos_v5(1))
        .await
        .expect("subscribe");
    assert_eq!(
        next_suback(&mut reader).await,
        vec![SubscribeReasonCode::NotAuthorized]
    );

    let admin = v5_as(port, "admin-1", "admin").await;
    admin
        .publish("axion/other-pkg/event/secret", b"s", 1, false)
        .await;
    admin.publish("axion/p/event/open", b"o", 1, false).await;
    let got = recv(&mut reader.rx, 5).await;
    assert_eq!(got.topic, "axion/p/event/open");
    recv_none(&mut reader.rx, 300).await;
}

/// paho's `test_subscribe_failure`: a configured topic refuses subscription
/// (SUBACK 0x80 in 3.1.1) while the rest of the SUBSCRIBE succeeds.
#[tokio::test]
async fn configured_forbidden_topic_fails_subscription_for_paho() {
    let fx = AuthFixture::new();
    let serve = fx.serve();
    let script = format!(
        r#"
import sys, threading
import paho.mqtt.client as mqtt
done = threading.Event()
granted = []
def on_connect(c, u, f, rc, props=None):
    c.subscribe([("test/nosubscribe", 0), ("test/allowed", 1)])
def on_subscribe(c, u, mid, codes, props=None):
    granted.extend(int(getattr(x, "value", x)) for x in codes)
    done.set()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, "paho-subfail", protocol=mqtt.MQTTv311)
c.username_pw_set("svc", "{PASSWORD}")
c.on_connect = on_connect
c.on_subscribe = on_subscribe
c.connect("127.0.0.1", {port})
c.loop_start()
ok = done.wait(10)
c.loop_stop()
print(granted)
sys.exit(0 if ok else 1)
"#,
        port = serve.mqtt_port
    );
    let out = python(&script);
    assert_eq!(out.trim(), "[128, 1]");
}

fn python(script: &str) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[tokio::test]
async fn serve_own_components_keep_working_with_auth_on() {
    let fx = AuthFixture::new();
    let serve = fx.serve();
    let mut reader = v5_as(serve.mqtt_port, "hb-watcher", "reader").await;
    reader.subscribe("axion/+/heartbeat/#", 1).await;
    // The bridge publishes its own heartbeat too; wait for the broker's.
    let got = loop {
        let got = recv(&mut reader.rx, 10).await;
        if got.topic.starts_with("axion/default/heartbeat/broker/") {
            break got;
        }
    };
    let body: serde_json::Value = serde_json::from_slice(&got.payload).expect("heartbeat JSON");
    assert_eq!(body["status"], "online", "{body}");
}

#[test]
fn serve_refuses_a_public_listener_without_an_auth_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(axion_bin())
        .arg("serve")
        .args(["--mqtt-listen", "0.0.0.0:0", "--ws-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("run axion serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without --auth-file"), "{err}");
}

#[tokio::test]
async fn tls_works_with_mosquitto_sub_and_paho() {
    let fx = AuthFixture::new();
    let (ca, cert, key) = make_certs(fx.dir.path());
    let auth = fx.path();
    let serve = Serve::start_with(
        &[
            "--auth-file",
            auth.to_str().expect("utf-8"),
            "--mqtts-listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().expect("utf-8"),
            "--tls-key",
            key.to_str().expect("utf-8"),
        ],
        &[],
    );
    let tls_port = serve.port(axion_wire::ports::MQTTS);

    // mosquitto_sub over TLS waits for one message, published by paho over TLS.
    let mut sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &tls_port.to_string()])
        .args(["--cafile", ca.to_str().expect("utf-8")])
        .args(["-u", "svc", "-P", PASSWORD, "-i", "tls-sub"])
        .args(["-t", "axion/p/event/tls", "-C", "1", "-W", "10", "-q", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mosquitto_sub");
    // Publish until the subscriber has it (it may still be connecting).
    let script = format!(
        r#"
import ssl, time
import paho.mqtt.client as mqtt
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, "tls-pub", protocol=mqtt.MQTTv5)
c.tls_set(ca_certs="{ca}")
c.username_pw_set("svc", "{PASSWORD}")
c.connect("127.0.0.1", {tls_port})
c.loop_start()
info = c.publish("axion/p/event/tls", b"over tls", qos=1)
info.wait_for_publish(10)
print("published" if info.is_published() else "not published")
c.loop_stop()
"#,
        ca = ca.display()
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = python(&script);
        assert_eq!(out.trim(), "published");
        if sub.try_wait().expect("try_wait").is_some() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = sub.wait_with_output().expect("mosquitto_sub output");
    assert!(
        out.status.success(),
        "mosquitto_sub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "over tls");

    // The plain port is still there, and a client that does not trust the CA is refused.
    let _plain = v5_as(serve.mqtt_port, "plain", "svc").await;
    let status = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &tls_port.to_string()])
        .args(["--cafile", cert.to_str().expect("utf-8")])
        .args(["-u", "svc", "-P", PASSWORD, "-t", "x", "-C", "1", "-W", "3"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run mosquitto_sub");
    assert!(!status.success(), "an untrusted CA must fail the handshake");
}

/// The bridge with auth on: no token or a bad one is refused (401 on the
/// upgrade, or `{"error":"unauthorized"}` and close for a first frame that
/// is not a valid auth frame); a token works as its user, within its ACL.
#[test]
fn bridge_requires_a_token_and_applies_the_acl() {
    let fx = AuthFixture::new();
    let serve = fx.serve();
    let script = format!(
        r#"
import asyncio, json, sys, time
import websockets

URL = "ws://127.0.0.1:{ws}"
TOKEN = "{token}"

def fail(why):
    print("FAIL:", why, file=sys.stderr)
    sys.exit(1)

async def main():
    # No token: the first frame is refused and the connection closed.
    ws = await websockets.connect(URL)
    await ws.send(json.dumps({{"action": "subscribe", "topic": "sec.test"}}))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
    if reply != {{"error": "unauthorized"}}:
        fail(f"no token: {{reply}}")
    try:
        await asyncio.wait_for(ws.recv(), 5)
        fail("no token: connection stayed open")
    except websockets.ConnectionClosed:
        pass
    # A bad token in the query string: HTTP 401.
    try:
        await websockets.connect(URL + "/?token=reader.wrong")
        fail("bad token accepted")
    except websockets.InvalidStatus as e:
        if e.response.status_code != 401:
            fail(f"bad token: status {{e.response.status_code}}")
    # Good token in the query string; good token as a first frame.
    sub = await websockets.connect(URL + "/?token=" + TOKEN)
    await sub.send(json.dumps({{"action": "subscribe", "topic": "sec.test"}}))
    pub = await websockets.connect(URL)
    await pub.send(json.dumps({{"action": "auth", "token": TOKEN}}))
    # Outside the ACL: refused with an error, connection lives on.
    await pub.send(json.dumps({{"action": "publish", "message": {{"type": "other.thing"}}}}))
    reply = json.loads(await asyncio.wait_for(pub.recv(), 5))
    if "not authorized" not in reply.get("error", ""):
        fail(f"denied publish: {{reply}}")
    await sub.send(json.dumps({{"action": "subscribe", "topic": "forbidden.zone"}}))
    reply = json.loads(await asyncio.wait_for(sub.recv(), 5))
    if "not authorized" not in reply.get("error", ""):
        fail(f"denied subscribe: {{reply}}")
    end = time.monotonic() + 10
    while time.monotonic() < end:
        await pub.send(json.dumps({{"action": "publish", "message": {{"type": "sec.test", "data": 1}}}}))
        try:
            got = json.loads(await asyncio.wait_for(sub.recv(), 0.3))
        except asyncio.TimeoutError:
            continue
        if got.get("event", {{}}).get("type") == "sec.test":
            print("ok")
            return
        fail(f"unexpected frame {{got}}")
    fail("event never arrived")

asyncio.run(main())
"#,
        ws = serve.ws_port,
        token = fx.token
    );
    assert_eq!(python(&script).trim(), "ok");
}

/// The bridge over TLS (`--ws-tls-cert/--ws-tls-key`): raw `websockets`
/// and the unchanged legacy `broker_client.py` (trusting the test CA
/// through `SSL_CERT_FILE`) exchange events over `wss://`, `/health` answers
/// over https, a client that does not trust the CA and a plain `ws://`
/// client are refused, and SIGTERM closes an open wss client and exits 0.
#[test]
fn bridge_serves_wss_to_clients_that_trust_the_ca() {
    use std::io::{BufRead, BufReader};

    let fx = AuthFixture::new();
    let (ca, cert, key) = make_certs(fx.dir.path());
    let auth = fx.path();
    let mut serve = Serve::start_with(
        &[
            "--auth-file",
            auth.to_str().expect("utf-8"),
            "--ws-tls-cert",
            cert.to_str().expect("utf-8"),
            "--ws-tls-key",
            key.to_str().expect("utf-8"),
        ],
        &[],
    );
    let script = format!(
        r#"
import asyncio, json, ssl, sys, time, urllib.request
import websockets
from broker_client import BrokerClient

URL = "wss://127.0.0.1:{ws}/?token={token}"
CA = "{ca}"

def fail(why):
    print("FAIL:", why, file=sys.stderr)
    sys.exit(1)

async def until(got, send):
    end = time.monotonic() + 10
    while time.monotonic() < end:
        await send()
        try:
            return await asyncio.wait_for(asyncio.shield(got), 0.3)
        except asyncio.TimeoutError:
            pass
    fail("event never arrived")

async def main():
    trusted = ssl.create_default_context(cafile=CA)
    live = json.load(urllib.request.urlopen("https://127.0.0.1:{ws}/health/live", context=trusted, timeout=5))
    if live.get("status") != "live":
        fail(f"health over https: {{live}}")

    # No trust in the test CA: the TLS handshake fails.
    try:
        await asyncio.wait_for(websockets.connect(URL, ssl=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)), 5)
        fail("a client without the CA was accepted")
    except ssl.SSLCertVerificationError:
        pass
    # Plain ws:// on the TLS port gets no WebSocket.
    try:
        await asyncio.wait_for(websockets.connect(URL.replace("wss://", "ws://")), 5)
        fail("plain ws accepted on the wss port")
    except (websockets.InvalidHandshake, OSError):
        pass

    # Raw websockets -> legacy client (default SSL context, SSL_CERT_FILE).
    raw = await websockets.connect(URL, ssl=trusted)
    legacy = BrokerClient(URL)
    await legacy.connect()
    got = asyncio.get_running_loop().create_future()
    async def on_event(event):
        if not got.done():
            got.set_result(event)
    await legacy.subscribe("sec.wss", on_event)
    event = await until(got, lambda: raw.send(json.dumps({{"action": "publish", "message": {{"type": "sec.wss", "data": 1}}}})))
    if event.get("type") != "sec.wss":
        fail(f"legacy got {{event}}")

    # Legacy client -> raw websockets.
    await raw.send(json.dumps({{"action": "subscribe", "topic": "sec.back"}}))
    back = asyncio.ensure_future(raw.recv())
    frame = json.loads(await until(back, lambda: legacy.publish("sec.back", {{"n": 2}})))
    if frame.get("event", {{}}).get("type") != "sec.back":
        fail(f"raw got {{frame}}")

    print("ready", flush=True)
    try:
        await asyncio.wait_for(raw.wait_closed(), 10)
    except asyncio.TimeoutError:
        fail("the bridge did not close the wss connection at shutdown")
    print("closed", flush=True)

asyncio.run(main())
"#,
        ws = serve.ws_port,
        token = fx.token,
        ca = ca.display(),
    );
    let clients = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients");
    let mut py = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .env("PYTHONPATH", &clients)
        .env("SSL_CERT_FILE", &ca)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    let mut lines = BufReader::new(py.stdout.take().expect("stdout")).lines();
    let first = lines.next().and_then(Result::ok);
    if first.as_deref() != Some("ready") {
        let out = py.wait_with_output().expect("python output");
        panic!(
            "wss client: {first:?}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    serve.proc.signal(15);
    assert_eq!(serve.proc.wait_exit(Duration::from_secs(10)), Some(0));
    let last = lines.next().and_then(Result::ok);
    let out = py.wait_with_output().expect("python output");
    assert!(
        out.status.success() && last.as_deref() == Some("closed"),
        "after SIGTERM: {last:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The standalone `axion bridge` in front of Mosquitto with `--auth-file`
/// and `--ws-tls-cert/--ws-tls-key`: readiness over https, a bad token gets
/// 401, a good one works over wss within its user's ACL; SIGTERM exits 0.
#[test]
fn standalone_bridge_takes_an_auth_file_and_serves_wss() {
    let fx = AuthFixture::new();
    let (ca, cert, key) = make_certs(fx.dir.path());
    let broker = common::Mosquitto::start();
    let mut bridge = common::spawn_listening(
        "axion bridge",
        Command::new(axion_bin())
            .args(["bridge", "--mqtt", &broker.mqtt_url()])
            .args(["--ws-listen", "127.0.0.1:0"])
            .arg("--auth-file")
            .arg(fx.path())
            .env("AXION_WS_TLS_CERT", &cert)
            .env("AXION_WS_TLS_KEY", &key),
    );
    let ws_port = bridge.port(axion_wire::ports::WS);
    let script = format!(
        r#"
import asyncio, json, ssl, sys, time, urllib.error, urllib.request
import websockets

BASE = "127.0.0.1:{ws}"
CTX = ssl.create_default_context(cafile="{ca}")

def fail(why):
    print("FAIL:", why, file=sys.stderr)
    sys.exit(1)

def ready():
    try:
        return urllib.request.urlopen(f"https://{{BASE}}/health/ready", context=CTX, timeout=2).status == 200
    except (urllib.error.URLError, OSError):
        return False

async def main():
    end = time.monotonic() + 15
    while not ready():
        if time.monotonic() > end:
            fail("never ready over https")
        await asyncio.sleep(0.05)
    try:
        await websockets.connect(f"wss://{{BASE}}/?token=reader.wrong", ssl=CTX)
        fail("bad token accepted")
    except websockets.InvalidStatus as e:
        if e.response.status_code != 401:
            fail(f"bad token: status {{e.response.status_code}}")
    url = f"wss://{{BASE}}/?token={token}"
    sub = await websockets.connect(url, ssl=CTX)
    pub = await websockets.connect(url, ssl=CTX)
    await sub.send(json.dumps({{"action": "subscribe", "topic": "forbidden.zone"}}))
    reply = json.loads(await asyncio.wait_for(sub.recv(), 5))
    if "not authorized" not in reply.get("error", ""):
        fail(f"denied subscribe: {{reply}}")
    await sub.send(json.dumps({{"action": "subscribe", "topic": "sec.alone"}}))
    end = time.monotonic() + 10
    while time.monotonic() < end:
        await pub.send(json.dumps({{"action": "publish", "message": {{"type": "sec.alone"}}}}))
        try:
            got = json.loads(await asyncio.wait_for(sub.recv(), 0.3))
        except asyncio.TimeoutError:
            continue
        if got.get("event", {{}}).get("type") == "sec.alone":
            print("ok")
            return
        fail(f"unexpected frame {{got}}")
    fail("event never arrived")

asyncio.run(main())
"#,
        ws = ws_port,
        ca = ca.display(),
        token = fx.token,
    );
    assert_eq!(python(&script).trim(), "ok");
    bridge.proc.signal(15);
    assert_eq!(bridge.proc.wait_exit(Duration::from_secs(10)), Some(0));
}
