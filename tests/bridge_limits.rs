//! One WebSocket client's frame can never drop the MQTT connection the
//! bridge shares between all its clients: a frame that would make an MQTT
//! packet over the broker's maximum, or a property over its two-byte
//! length, gets an error reply naming the limit, and nothing reaches MQTT.
//! Real processes: `axion serve`, Python `websockets`, rumqttc.

mod common;

use std::process::Command;

use common::mqtt::{recv, V5};
use common::Serve;

const SCRIPT: &str = r#"
import asyncio, json, sys, websockets

async def main(url):
    out = {}
    async with websockets.connect(url, max_size=None) as bad, websockets.connect(url) as pub:
        frame_limit = 1024 * 1024
        envelope = json.dumps({"action": "enqueue", "queue": "q", "task": ""})
        task = "x" * (frame_limit - len(envelope) - 8)
        await bad.send(json.dumps({"action": "enqueue", "queue": "q", "task": task}))
        out["enqueue"] = json.loads(await bad.recv())
        for name, size in [("corr600k", 600000), ("corr70k", 70000)]:
            msg = {"type": "hurt", "payload": 1, "correlationId": "c" * size}
            await bad.send(json.dumps({"action": "publish", "message": msg}))
            out[name] = json.loads(await bad.recv())
        # Under the frame limit, but the correlationId travels twice (in the
        # envelope and as Correlation Data): over the broker's maximum.
        msg = {"type": "hurt", "payload": "p" * (frame_limit - 40000 - 300), "correlationId": "c" * 40000}
        await bad.send(json.dumps({"action": "publish", "message": msg}))
        out["publish"] = json.loads(await bad.recv())
        # The healthy publisher's events still go out over MQTT.
        for i in range(20):
            await pub.send(json.dumps({"action": "publish", "message": {"type": "healthy", "payload": i}}))
        # An error reply would come back at once; none must.
        try:
            out["healthy_reply"] = json.loads(await asyncio.wait_for(pub.recv(), 1))
        except asyncio.TimeoutError:
            out["healthy_reply"] = None
    print(json.dumps(out))

asyncio.run(main(sys.argv[1]))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frames_get_an_error_and_the_shared_mqtt_connection_stays_up() {
    let serve = Serve::start();
    let mut mqtt = V5::connect(serve.mqtt_port, "healthy-reader").await;
    mqtt.subscribe("axion/default/event/healthy", 1).await;
    mqtt.subscribe("axion/default/event/hurt", 1).await;

    let out = Command::new("python3")
        .args(["-c", SCRIPT, &format!("ws://127.0.0.1:{}", serve.ws_port)])
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    for (case, needle) in [
        ("enqueue", "too large for MQTT"),
        ("corr600k", "correlationId too long"),
        ("corr70k", "correlationId too long"),
        ("publish", "too large for MQTT"),
    ] {
        let error = got[case]["error"].as_str().unwrap_or_default();
        assert!(error.contains(needle), "{case}: {}", got[case]);
    }
    assert!(got["healthy_reply"].is_null(), "{}", got["healthy_reply"]);

    // Every healthy event arrived over MQTT, none of the refused ones did.
    for i in 0..20 {
        let m = recv(&mut mqtt.rx, 10).await;
        assert_eq!(m.topic, "axion/default/event/healthy");
        let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("envelope");
        assert_eq!(v["payload"], i);
    }
    common::mqtt::recv_none(&mut mqtt.rx, 300).await;

    // The bridge connected to MQTT once and never again.
    let stats = reqwest_stats(serve.ws_port);
    assert_eq!(stats["mqtt_connects"], 1, "{stats}");
    assert_eq!(stats["oversize_refused"], 4, "{stats}");
}

/// `GET /stats` of the bridge, over a plain socket.
fn reqwest_stats(port: u16) -> serde_json::Value {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let body = text.split("\r\n\r\n").nth(1).expect("body");
    serde_json::from_str(body).expect("stats JSON")
}

/// A raw WebSocket connection (no library: nothing answers pings for it).
fn raw_ws(port: u16) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .expect("upgrade request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("upgrade response");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    s
}

/// A short masked text frame (mask 0: the payload goes as it is).
fn text_frame(text: &str) -> Vec<u8> {
    assert!(text.len() < 126);
    let mut f = vec![0x81, 0x80 | text.len() as u8, 0, 0, 0, 0];
    f.extend_from_slice(text.as_bytes());
    f
}

/// A peer that sends nothing for two ping periods is dropped; one that
/// keeps sending frames is not, even though it never answers a ping.
#[test]
fn silent_peers_are_dropped_after_two_ping_periods_and_talking_ones_are_not() {
    use std::io::Write;
    use std::time::{Duration, Instant};
    let serve = Serve::start_with(&["--ws-ping-secs", "1"], &[]);
    let stats = || -> serde_json::Value {
        let (_, body) = common::http_get(serve.ws_port, "/stats").expect("GET /stats");
        serde_json::from_str(&body).expect("stats JSON")
    };
    let silent = raw_ws(serve.ws_port);
    let mut talking = raw_ws(serve.ws_port);
    let started = Instant::now();
    let heartbeat = text_frame(r#"{"action":"heartbeat"}"#);
    while stats()["dead_peers"] == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the silent peer was never dropped: {}",
            stats()
        );
        talking.write_all(&heartbeat).expect("heartbeat");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Two periods at least, three at most (with slack for a busy machine).
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
    for _ in 0..15 {
        talking.write_all(&heartbeat).expect("heartbeat");
        std::thread::sleep(Duration::from_millis(200));
    }
    let now = stats();
    assert_eq!(now["dead_peers"], 1, "{now}");
    assert_eq!(now["clients"], 1, "{now}");
    drop(silent);
}
