//! The embedded broker end to end: one port for MQTT 3.1.1 and 5, retained
//! messages, wills, clean shutdown, and every guard against a client that
//! would take rumqttd down. Each guard test first reproduces the trigger,
//! then proves other clients still connect and exchange messages.

mod common;

use std::time::Duration;

use common::mqtt::{recv, recv_none, V4, V5};
use common::raw::{raw_connect, raw_publish, raw_subscribe, read_reply};
use common::Serve;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A fresh v4 subscriber and v5 publisher exchange a message on a new topic.
async fn assert_broker_works(port: u16) {
    let topic = format!("check/{}", uuid_like());
    let mut sub = V4::connect(port, &format!("probe-sub-{}", uuid_like())).await;
    sub.subscribe(&topic, 1).await;
    let publisher = V5::connect(port, &format!("probe-pub-{}", uuid_like())).await;
    publisher.publish(&topic, b"still alive", 1, false).await;
    let m = recv(&mut sub.rx, 5).await;
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        (topic.as_str(), &b"still alive"[..])
    );
}

/// Subscribes a kept MQTT 5 session (expiry 300 s) to `filter` at QoS 1
/// and leaves; returns its options for the resume.
async fn leave_kept_subscriber(port: u16, id: &str, filter: &str) -> rumqttc::v5::MqttOptions {
    let mut opts = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_session_expiry_interval(Some(300));
    let mut sub = V5::connect_with(opts.clone()).await.expect("connect");
    sub.subscribe(filter, 1).await;
    sub.kill().await;
    opts.set_clean_start(false);
    opts
}

/// Publishes `count` 1 KiB QoS 1 messages to `topic`, each starting with
/// its number (8 bytes, big-endian).
async fn numbered_flood(client: rumqttc::v5::AsyncClient, topic: &'static str, count: usize) {
    for i in 0..count {
        let mut payload = vec![b'n'; 1024];
        payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
        client
            .publish(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .expect("publish");
    }
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_and_v5_clients_share_one_port_both_ways() {
    let serve = Serve::start();
    let mut v4 = V4::connect(serve.mqtt_port, "old-client").await;
    let mut v5 = V5::connect(serve.mqtt_port, "new-client").await;
    v4.subscribe("to/v4", 1).await;
    v5.subscribe("to/v5", 1).await;
    v5.publish("to/v4", b"from v5", 1, false).await;
    v4.publish("to/v5", b"from v4", 1, false).await;
    assert_eq!(recv(&mut v4.rx, 5).await.payload, b"from v5");
    assert_eq!(recv(&mut v5.rx, 5).await.payload, b"from v4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_message_reaches_a_late_wildcard_subscriber() {
    let serve = Serve::start();
    let mut publisher = V4::connect(serve.mqtt_port, "retainer").await;
    publisher.publish("site/a/temp", b"21.5", 1, true).await;
    publisher.publish("site/b/temp", b"19.0", 0, true).await;
    publisher.round_trip().await;
    let mut late = V5::connect(serve.mqtt_port, "late-dashboard").await;
    late.subscribe("site/+/temp", 1).await;
    let mut got = [recv(&mut late.rx, 5).await, recv(&mut late.rx, 5).await];
    got.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert_eq!(got[0].topic, "site/a/temp");
    assert_eq!(got[0].payload, b"21.5");
    assert!(
        got[0].retain && got[1].retain,
        "retained flag set for late subscribers"
    );
    assert_eq!(got[1].payload, b"19.0");
}

/// An MQTT 3.1.1 client `id` whose will publishes "gone" on `topic` at QoS 1.
async fn v4_with_will(port: u16, id: &str, topic: &str, retain: bool) -> V4 {
    let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    opts.set_last_will(rumqttc::LastWill::new(
        topic,
        "gone",
        rumqttc::QoS::AtLeastOnce,
        retain,
    ));
    V4::connect_with(opts).await.expect("connect with will")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_published_on_tcp_drop_and_not_on_clean_disconnect() {
    let serve = Serve::start();
    let mut watcher = V4::connect(serve.mqtt_port, "will-watcher").await;
    watcher.subscribe("wills/#", 1).await;

    let crashy = v4_with_will(serve.mqtt_port, "crashy", "wills/crashy", false).await;
    crashy.kill();
    let m = recv(&mut watcher.rx, 5).await;
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        ("wills/crashy", &b"gone"[..])
    );

    let mut opts = rumqttc::v5::MqttOptions::new("polite", "127.0.0.1", serve.mqtt_port);
    let will = rumqttc::v5::mqttbytes::v5::LastWill::new(
        "wills/polite",
        "gone",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        false,
        None,
    );
    opts.set_last_will(will);
    let polite = V5::connect_with(opts).await.expect("connect with will");
    polite.client.disconnect().await.expect("disconnect");
    recv_none(&mut watcher.rx, 700).await;
}

/// A connection taken over by a new one with its client id ends there,
/// and its will goes out (MQTT 5 3.1.3.2.2), before anything the new
/// connection publishes: a retained "gone" never overwrites the "back"
/// the new connection retains. A will whose delay is still running when
/// the client comes back is not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_taken_over_sends_its_will_before_the_new_one_speaks() {
    let serve = Serve::start();
    let mut watcher = V4::connect(serve.mqtt_port, "takeover-watcher").await;
    watcher.subscribe("takeover/#", 1).await;

    let _first = v4_with_will(serve.mqtt_port, "twin", "takeover/twin", true).await;
    let second = V4::connect(serve.mqtt_port, "twin").await;
    second.publish("takeover/twin", b"back", 1, true).await;
    let seen: Vec<Vec<u8>> = vec![
        recv(&mut watcher.rx, 5).await.payload,
        recv(&mut watcher.rx, 5).await.payload,
    ];
    assert_eq!(seen, [b"gone".to_vec(), b"back".to_vec()]);
    let mut late = V4::connect(serve.mqtt_port, "takeover-late").await;
    late.subscribe("takeover/twin", 1).await;
    assert_eq!(recv(&mut late.rx, 5).await.payload, b"back");

    let mut opts = rumqttc::v5::MqttOptions::new("twin5", "127.0.0.1", serve.mqtt_port);
    opts.set_session_expiry_interval(Some(120));
    opts.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
        "takeover/twin5",
        "gone",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        false,
        Some(common::mqtt::will_delay(60)),
    ));
    let _first = V5::connect_with(opts)
        .await
        .expect("connect with a delayed will");
    let _second = V5::connect(serve.mqtt_port, "twin5").await;
    recv_none(&mut watcher.rx, 700).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ids_with_topic_characters_work_and_break_nothing() {
    let serve = Serve::start();
    // rumqttd alone panics a listener on these ids; here they are ordinary clients.
    for id in ["sensor/kitchen", "a+b", "all#", "$weird", "100%"] {
        let mut c = V4::connect(serve.mqtt_port, id).await;
        let topic = format!("ids/{}", id.replace(['/', '+', '#', '$'], "_"));
        c.subscribe(&topic, 0).await;
        c.publish(&topic, id.as_bytes(), 0, false).await;
        assert_eq!(recv(&mut c.rx, 5).await.payload, id.as_bytes());
    }
    // Two ids that differ only in the escaped characters stay two sessions.
    let mut a = V4::connect(serve.mqtt_port, "x/y").await;
    let _b = V4::connect(serve.mqtt_port, "x%2Fy").await;
    a.subscribe("ids/same", 0).await;
    a.publish("ids/same", b"a still connected", 0, false).await;
    assert_eq!(recv(&mut a.rx, 5).await.payload, b"a still connected");
    assert_broker_works(serve.mqtt_port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_get_a_connack_refusal() {
    // Axion's own components (queue owner, bridge, heartbeats) may hold
    // some of the connections too, so only the total is certain.
    let max = 12;
    let serve = Serve::start_with(&["--max-connections", &max.to_string()], &[]);
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..max + 2 {
        let opts = rumqttc::MqttOptions::new(format!("crowd-{i}"), "127.0.0.1", serve.mqtt_port);
        match V4::connect_with(opts).await {
            Ok(c) => held.push(c),
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                assert_eq!(code, rumqttc::ConnectReturnCode::ServiceUnavailable);
                refused += 1;
            }
            Err(other) => panic!("expected a CONNACK refusal, got {other:?}"),
        }
    }
    assert!(
        held.len() <= max,
        "{} connections held past a limit of {max}",
        held.len()
    );
    assert!(refused >= 2, "refusals past the limit (refused {refused})");
    // MQTT 5 clients get the v5 reason code.
    let mut stream = TcpStream::connect(("127.0.0.1", serve.mqtt_port))
        .await
        .unwrap();
    stream
        .write_all(&raw_connect(5, "one-too-many", 30))
        .await
        .unwrap();
    let reply = read_reply(&mut stream, 3000).await;
    assert_eq!(
        reply.first(),
        Some(&0x20),
        "a CONNACK, not a dropped socket: {reply:?}"
    );
    assert_eq!(
        reply.get(3),
        Some(&0x89),
        "reason 0x89 server busy: {reply:?}"
    );
    drop(stream);
    // Room frees up when clients leave (their sessions close a moment
    // later): three connections at once, kept for the checks below.
    held.clear();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut room = Vec::new();
    while room.len() < 3 {
        let opts =
            rumqttc::MqttOptions::new(format!("room-{}", room.len()), "127.0.0.1", serve.mqtt_port);
        match V4::connect_with(opts).await {
            Ok(c) => room.push(c),
            Err(rumqttc::ConnectionError::ConnectionRefused(_))
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("no room after clients left: {e:?}"),
        }
    }
    let (publisher, mut sub, mut watcher) = (
        room.pop().unwrap(),
        room.pop().unwrap(),
        room.pop().unwrap(),
    );
    // The listener still works.
    sub.subscribe("room/check", 1).await;
    publisher
        .publish("room/check", b"still alive", 1, false)
        .await;
    assert_eq!(recv(&mut sub.rx, 5).await.payload, b"still alive");
    // The refusals are counted where an operator looks: the broker's
    // heartbeat record (`mosquitto_sub -t 'axion/+/heartbeat/broker/#'`).
    watcher.subscribe("axion/+/heartbeat/broker/#", 0).await;
    wait_counter(&mut watcher, "refused_at_limit", |n| n > refused as u64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_shared_member_dropping_with_unacked_qos1_leaves_the_router_alive() {
    let serve = Serve::start();
    let mut opts = rumqttc::MqttOptions::new("lonely-worker", "127.0.0.1", serve.mqtt_port);
    opts.set_clean_session(false);
    opts.set_manual_acks(true);
    // The will tells the test when the broker has dealt with the drop.
    opts.set_last_will(rumqttc::LastWill::new(
        "wills/lonely-worker",
        "gone",
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    let mut worker = V4::connect_with(opts).await.expect("persistent worker");
    worker.subscribe("$share/jobs/work/items", 1).await;
    let mut producer = V4::connect(serve.mqtt_port, "producer").await;
    producer.subscribe("wills/#", 1).await;
    for i in 0..5 {
        producer
            .publish("work/items", format!("job {i}").as_bytes(), 1, false)
            .await;
    }
    // rumqttd panics when such a member drops with QoS 1 in flight, a race
    // no front end can close: the subscription is granted QoS 0 instead.
    let m = recv(&mut worker.rx, 5).await;
    assert_eq!(
        m.qos, 0,
        "persistent $share subscriptions are granted QoS 0"
    );
    worker.kill();
    assert_eq!(recv(&mut producer.rx, 5).await.topic, "wills/lonely-worker");
    assert_broker_works(serve.mqtt_port).await;
    // The same persistent client comes back and can work again.
    let mut opts = rumqttc::MqttOptions::new("lonely-worker", "127.0.0.1", serve.mqtt_port);
    opts.set_clean_session(false);
    let mut worker = V4::connect_with(opts).await.expect("reconnect");
    worker.subscribe("$share/jobs/work/items", 1).await;
    producer.publish("work/items", b"after", 1, false).await;
    let m = recv(&mut worker.rx, 5).await;
    assert!(m.topic == "work/items");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_zero_is_accepted() {
    let serve = Serve::start();
    let mut opts = rumqttc::MqttOptions::new("no-keepalive", "127.0.0.1", serve.mqtt_port);
    opts.set_keep_alive(Duration::ZERO);
    let mut c = V4::connect_with(opts)
        .await
        .expect("keep-alive 0 gets a CONNACK");
    c.subscribe("ka/zero", 0).await;
    c.publish("ka/zero", b"ok", 0, false).await;
    assert_eq!(recv(&mut c.rx, 5).await.payload, b"ok");
    // Raw MQTT 5 too: CONNACK success (reason 0).
    let mut stream = TcpStream::connect(("127.0.0.1", serve.mqtt_port))
        .await
        .unwrap();
    stream
        .write_all(&raw_connect(5, "raw-ka0", 0))
        .await
        .unwrap();
    let reply = read_reply(&mut stream, 3000).await;
    assert_eq!(
        (reply.first(), reply.get(3)),
        (Some(&0x20), Some(&0x00)),
        "{reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_packets_are_refused_with_a_reason() {
    let serve = Serve::start_with(&["--max-packet-size", "1024"], &[]);
    // An oversize CONNECT from an MQTT 5 client: CONNACK 0x95 packet too large.
    let mut stream = TcpStream::connect(("127.0.0.1", serve.mqtt_port))
        .await
        .unwrap();
    stream
        .write_all(&raw_connect(5, &"x".repeat(2000), 30))
        .await
        .unwrap();
    let reply = read_reply(&mut stream, 3000).await;
    assert_eq!(
        (reply.first(), reply.get(3)),
        (Some(&0x20), Some(&0x95)),
        "{reply:?}"
    );

    // An oversize PUBLISH after a good CONNECT: DISCONNECT 0x95 for MQTT 5.
    let mut stream = TcpStream::connect(("127.0.0.1", serve.mqtt_port))
        .await
        .unwrap();
    stream
        .write_all(&raw_connect(5, "big-v5", 30))
        .await
        .unwrap();
    let connack = read_reply(&mut stream, 3000).await;
    assert_eq!(connack.first(), Some(&0x20));
    stream
        .write_all(&raw_publish(5, "big", &[7u8; 4096]))
        .await
        .unwrap();
    let reply = read_reply(&mut stream, 3000).await;
    assert_eq!(
        (reply.first(), reply.get(2)),
        (Some(&0xe0), Some(&0x95)),
        "{reply:?}"
    );

    // MQTT 3.1.1 has no reason codes: the connection is closed.
    let mut stream = TcpStream::connect(("127.0.0.1", serve.mqtt_port))
        .await
        .unwrap();
    stream
        .write_all(&raw_connect(4, "big-v4", 30))
        .await
        .unwrap();
    assert_eq!(read_reply(&mut stream, 3000).await, vec![0x20, 2, 0, 0]);
    stream
        .write_all(&raw_publish(4, "big", &[7u8; 4096]))
        .await
        .unwrap();
    assert!(read_reply(&mut stream, 3000).await.is_empty(), "closed");

    assert_broker_works(serve.mqtt_port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_ascii_topics_work_with_wildcard_subscribers() {
    let serve = Serve::start();
    let mut all = V4::connect(serve.mqtt_port, "watch-all").await;
    all.subscribe("#", 0).await;
    let mut exact = V5::connect(serve.mqtt_port, "watch-exact").await;
    exact.subscribe("é/+", 1).await;
    let publisher = V4::connect(serve.mqtt_port, "unicode-pub").await;
    // rumqttd alone panics its router on this publish.
    publisher.publish("é/x", b"accent", 1, false).await;
    let m = recv(&mut exact.rx, 5).await;
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        ("é/x", &b"accent"[..])
    );
    // `#` also sees Axion's own traffic (heartbeats, announces): find ours.
    loop {
        let m = recv(&mut all.rx, 5).await;
        if m.topic == "é/x" {
            assert_eq!(m.payload, b"accent");
            break;
        }
    }
    assert_broker_works(serve.mqtt_port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_close_only_their_own_connection() {
    let serve = Serve::start();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("PUBLISH with QoS 3", vec![0x36, 5, 0, 1, b'a', 0, 1]),
        (
            "SUBSCRIBE with wrong flags",
            vec![0x80, 6, 0, 1, 0, 1, b'a', 0],
        ),
        ("wildcard in topic name", raw_publish(4, "a/+", b"x")),
        ("second CONNECT", raw_connect(4, "again", 30)),
        ("empty SUBSCRIBE filter", vec![0x82, 5, 0, 1, 0, 0, 0]),
        ("NUL in topic", raw_publish(4, "a\0b", b"x")),
        ("UNSUBSCRIBE without filters", vec![0xa2, 2, 0, 1]),
    ];
    for (what, bytes) in cases {
        let mut stream = TcpStream::connect(("127.0.0.1", serve.mqtt_port))
            .await
            .unwrap();
        stream
            .write_all(&raw_connect(4, "malformed", 30))
            .await
            .unwrap();
        assert_eq!(
            read_reply(&mut stream, 3000).await,
            vec![0x20, 2, 0, 0],
            "{what}: CONNACK"
        );
        stream.write_all(&bytes).await.unwrap();
        assert!(
            read_reply(&mut stream, 3000).await.is_empty(),
            "{what}: connection closed"
        );
    }
    assert_broker_works(serve.mqtt_port).await;
}

#[test]
fn sigterm_stops_serve_with_exit_code_zero() {
    let mut serve = Serve::start();
    serve.proc.signal(15);
    assert_eq!(serve.proc.wait_exit(Duration::from_secs(10)), Some(0));
    let mut serve = Serve::start();
    serve.proc.signal(2);
    assert_eq!(serve.proc.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn mosquitto_sub_shows_the_retained_broker_heartbeat() {
    let serve = Serve::start();
    // What an operator types; -W bounds the wait since `#` never ends.
    let out = std::process::Command::new("mosquitto_sub")
        .args([
            "-p",
            &serve.mqtt_port.to_string(),
            "-t",
            "axion/#",
            "-v",
            "-W",
            "2",
        ])
        .output()
        .expect("run mosquitto_sub (scripts/setup.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    let topic = format!(
        "axion/default/heartbeat/broker/{}:{}",
        hostname(),
        serve.mqtt_port
    );
    let body = text
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{topic} ")))
        .unwrap_or_else(|| panic!("no {topic} line in:\n{text}"));
    let record: serde_json::Value = serde_json::from_str(body).expect("heartbeat JSON");
    assert_eq!(record["service"], "broker");
    assert_eq!(record["status"], "online");
    assert_eq!(record["port"], serve.mqtt_port);
    assert_eq!(record["pid"], serve.proc.pid());
    for field in [
        "boot_id",
        "seq",
        "timestamp",
        "uptime_seconds",
        "interval_secs",
        "hostname",
        "instance_id",
    ] {
        assert!(!record[field].is_null(), "{field} in {record}");
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_retained_message_reaches_a_qos1_wildcard_subscriber() {
    let serve = Serve::start();
    let publisher = V5::connect(serve.mqtt_port, "fleet-of-500").await;
    for i in 0..500 {
        publisher
            .publish(
                &format!("fleet/node{i}/state"),
                format!("{i}").as_bytes(),
                1,
                true,
            )
            .await;
    }
    // The last one is acknowledged only after the 499 before it are routed.
    let mut probe = V5::connect(serve.mqtt_port, "fleet-probe").await;
    probe.subscribe("fleet/node499/state", 1).await;
    recv(&mut probe.rx, 10).await;
    // rumqttd alone sends a QoS 1 subscriber the first 100 and drops the rest.
    let mut dashboard = V5::connect(serve.mqtt_port, "fleet-dashboard").await;
    dashboard.subscribe("fleet/+/state", 1).await;
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 500 {
        let m = recv(&mut dashboard.rx, 10).await;
        assert!(m.retain, "retained flag on {}", m.topic);
        seen.insert(m.topic);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_qos_is_the_minimum_of_publish_and_subscription() {
    let serve = Serve::start();
    let mut sub1 = V5::connect(serve.mqtt_port, "qos1-sub").await;
    sub1.subscribe("qos/t", 1).await;
    let mut sub0 = V4::connect(serve.mqtt_port, "qos0-sub").await;
    sub0.subscribe("qos/t", 0).await;
    let publisher = V4::connect(serve.mqtt_port, "qos-pub").await;
    publisher.publish("qos/t", b"at most once", 0, false).await;
    assert_eq!(
        recv(&mut sub1.rx, 5).await.qos,
        0,
        "QoS 0 publish to a QoS 1 subscription"
    );
    assert_eq!(recv(&mut sub0.rx, 5).await.qos, 0);
    publisher.publish("qos/t", b"at least once", 1, false).await;
    assert_eq!(recv(&mut sub1.rx, 5).await.qos, 1);
    assert_eq!(
        recv(&mut sub0.rx, 5).await.qos,
        0,
        "QoS 1 publish to a QoS 0 subscription"
    );
    // The QoS 1 subscriber keeps working after the router's copies were acked for it.
    for i in 0..150 {
        publisher
            .publish("qos/t", format!("{i}").as_bytes(), i % 2, false)
            .await;
    }
    for _ in 0..150 {
        recv(&mut sub1.rx, 5).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_store_fixes_rumqttd_retained_defects() {
    use rumqttc::v5::mqttbytes::v5::{Filter, RetainForwardRule};
    let serve = Serve::start();
    let mut publisher = V4::connect(serve.mqtt_port, "retain-pub").await;
    publisher.publish("keep/me", b"kept", 1, true).await;
    // rumqttd clears a retained message on any empty publish, retained or not.
    publisher.publish("keep/me", b"", 1, false).await;
    publisher.round_trip().await;
    let mut late = V4::connect(serve.mqtt_port, "retain-late").await;
    late.subscribe("keep/#", 1).await;
    let m = recv(&mut late.rx, 5).await;
    assert_eq!((m.payload.as_slice(), m.retain), (&b"kept"[..], true));
    // Live delivery carries retain=0 (MQTT-3.3.1-9).
    publisher.publish("keep/me", b"live", 1, true).await;
    let m = recv(&mut late.rx, 5).await;
    assert_eq!((m.payload.as_slice(), m.retain), (&b"live"[..], false));
    // MQTT 5 retain handling 2: no retained messages at subscribe.
    let mut rh2 = V5::connect(serve.mqtt_port, "retain-never").await;
    let mut filter = Filter::new("keep/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce);
    filter.retain_forward_rule = RetainForwardRule::Never;
    rh2.client.subscribe_many([filter]).await.unwrap();
    recv_none(&mut rh2.rx, 500).await;
    // An empty retained publish clears it.
    publisher.publish("keep/me", b"", 1, true).await;
    publisher.round_trip().await;
    let mut after = V4::connect(serve.mqtt_port, "retain-after").await;
    after.subscribe("keep/#", 1).await;
    recv_none(&mut after.rx, 500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_in_any_order_are_accepted() {
    use rumqttc::{Event, Packet};
    let serve = Serve::start();
    let mut opts = rumqttc::MqttOptions::new("reverse-acker", "127.0.0.1", serve.mqtt_port);
    opts.set_manual_acks(true);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 100);
    client
        .subscribe("order/t", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let publisher = V4::connect(serve.mqtt_port, "order-pub").await;
    let mut held = Vec::new();
    let mut subscribed = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while held.len() < 3 {
        let event = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .expect("messages in time");
        match event.expect("connection stays up") {
            Event::Incoming(Packet::SubAck(_)) if !subscribed => {
                subscribed = true;
                for i in 0..3 {
                    publisher
                        .publish("order/t", format!("m{i}").as_bytes(), 1, false)
                        .await;
                }
            }
            Event::Incoming(Packet::Publish(p)) => held.push(p),
            _ => {}
        }
    }
    // rumqttd alone disconnects a client that acknowledges m2 before m0.
    for p in held.iter().rev() {
        client.ack(p).await.unwrap();
    }
    publisher.publish("order/t", b"after", 1, false).await;
    loop {
        let event = tokio::time::timeout_at(deadline + Duration::from_secs(5), eventloop.poll())
            .await
            .expect("in time");
        if let Event::Incoming(Packet::Publish(p)) =
            event.expect("still connected after out-of-order acks")
        {
            assert_eq!(&p.payload[..], b"after");
            client.ack(&p).await.unwrap();
            break;
        }
    }
}

/// rumqttd 0.20 forwards a `$share` member the same message again when
/// its channel to the member fills. A member that answers every message
/// with a QoS 1 publish of its own, as a queue worker acks (the router's
/// acks share that channel), gets each of 20 000 messages exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_member_that_answers_every_message_gets_each_once() {
    const COUNT: usize = 20_000;
    let serve = Serve::start();
    let mut member = V5::connect(serve.mqtt_port, "share-member").await;
    member.subscribe("$share/workers/load/t", 1).await;
    let publisher = V5::connect(serve.mqtt_port, "share-publisher").await;
    tokio::spawn(numbered_flood(publisher.client.clone(), "load/t", COUNT));
    let mut seen = vec![false; COUNT];
    let (mut got, mut twice) = (0, 0);
    while got < COUNT {
        let m = recv(&mut member.rx, 30).await;
        let i = u64::from_be_bytes(m.payload[..8].try_into().expect("numbered")) as usize;
        if std::mem::replace(&mut seen[i], true) {
            twice += 1;
        } else {
            got += 1;
        }
        member.publish("load/acks", b"done", 1, false).await;
    }
    recv_none(&mut member.rx, 500).await;
    assert_eq!(twice, 0, "messages delivered twice");
}

/// `mosquitto_sub` through a Unix socket: the first message on `topic`.
fn mosquitto_sub_unix(sock: &std::path::Path, topic: &str) -> String {
    let out = std::process::Command::new("mosquitto_sub")
        .arg("--unix")
        .arg(sock)
        .args(["-t", topic, "-C", "1", "-W", "5"])
        .output()
        .expect("run mosquitto_sub");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `axion serve` also listens on `<data-dir>/mqtt.sock` (its own queue
/// owner, bridge and heartbeat use it): operators' `mosquitto_sub --unix`
/// and TCP clients see each other's messages; a socket left by `kill -9`
/// is replaced on restart, a live one is never taken over, and a clean
/// stop removes it.
#[test]
fn the_unix_socket_carries_mqtt_both_ways_and_is_never_stolen() {
    use std::process::Command;
    let mut serve = Serve::start();
    let sock = serve.data_dir.path().join("mqtt.sock");
    let port = serve.mqtt_port.to_string();
    let pub_tcp = |topic: &str, msg: &str| {
        let ok = Command::new("mosquitto_pub")
            .args(["-p", &port, "-t", topic, "-m", msg, "-r", "-q", "1"])
            .status()
            .expect("mosquitto_pub");
        assert!(ok.success());
    };
    pub_tcp("unix/from-tcp", "over tcp");
    assert_eq!(mosquitto_sub_unix(&sock, "unix/from-tcp"), "over tcp");
    let ok = Command::new("mosquitto_pub")
        .arg("--unix")
        .arg(&sock)
        .args([
            "-t",
            "unix/from-socket",
            "-m",
            "over the socket",
            "-r",
            "-q",
            "1",
        ])
        .status()
        .expect("mosquitto_pub --unix");
    assert!(ok.success());
    let out = Command::new("mosquitto_sub")
        .args(["-p", &port, "-t", "unix/from-socket", "-C", "1", "-W", "5"])
        .output()
        .expect("mosquitto_sub");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "over the socket"
    );

    // A second broker told to use the live socket stops with the reason.
    let other = tempfile::tempdir().expect("tempdir");
    let second = Command::new(common::axion_bin())
        .arg("serve")
        .args(["--mqtt-listen", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(other.path())
        .arg("--mqtt-unix")
        .arg(&sock)
        .output()
        .expect("run a second axion serve");
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("mqtt.sock") && err.contains("another process is listening"),
        "{err}"
    );
    assert_eq!(mosquitto_sub_unix(&sock, "unix/from-tcp"), "over tcp");

    // kill -9 leaves the socket file behind; the next broker replaces it
    // (on other ports: a killed broker's port may be taken meanwhile).
    serve.proc.signal(9);
    serve.proc.wait_exit(Duration::from_secs(5));
    assert!(sock.exists());
    let sock_arg = sock.to_string_lossy().into_owned();
    let mut next = Serve::start_with(&["--mqtt-unix", &sock_arg], &[]);
    let ok = Command::new("mosquitto_pub")
        .args([
            "-p",
            &next.mqtt_port.to_string(),
            "-t",
            "unix/after-restart",
        ])
        .args(["-m", "back", "-r", "-q", "1"])
        .status()
        .expect("mosquitto_pub");
    assert!(ok.success());
    assert_eq!(mosquitto_sub_unix(&sock, "unix/after-restart"), "back");

    next.proc.signal(15);
    assert_eq!(next.proc.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!sock.exists(), "a clean stop removes the socket");
}

#[test]
fn a_qos1_burst_from_mosquitto_pub_reaches_mosquitto_sub_in_full() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    const COUNT: usize = 20_000;
    let serve = Serve::start();
    let port = serve.mqtt_port.to_string();
    let mut sub = Command::new("mosquitto_sub")
        .args(["-p", &port, "-t", "burst/t", "-q", "1", "-i", "burst-sub"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    let mut lines = BufReader::new(sub.stdout.take().expect("stdout")).lines();
    // Wait for the subscription by publishing probes until one comes through.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let probe_port = port.clone();
    let prober = std::thread::spawn(move || {
        for _ in 0..100 {
            let _ = Command::new("mosquitto_pub")
                .args(["-p", &probe_port, "-t", "burst/t", "-q", "1", "-m", "probe"])
                .status();
            if ready_rx.recv_timeout(Duration::from_millis(100)).is_ok() {
                return;
            }
        }
    });
    loop {
        let line = lines.next().expect("mosquitto_sub output").expect("line");
        if line == "probe" {
            let _ = ready_tx.send(());
            break;
        }
    }
    prober.join().expect("prober");
    // Read the subscriber's output while publishing: a reader that stops
    // reading would (rightly) hold the publisher back.
    let reader = std::thread::spawn(move || {
        let mut seen = vec![false; COUNT];
        let mut got = 0;
        while got < COUNT {
            let Some(Ok(line)) = lines.next() else { break };
            if line == "probe" {
                continue;
            }
            let i: usize = line[..8].parse().expect("numbered line");
            if !seen[i] {
                seen[i] = true;
                got += 1;
            }
        }
        got
    });
    let mut publisher = Command::new("mosquitto_pub")
        .args(["-p", &port, "-t", "burst/t", "-q", "1", "-l"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub");
    {
        let mut stdin = publisher.stdin.take().expect("stdin");
        for i in 0..COUNT {
            // 1 KiB per message: a number, then padding.
            writeln!(stdin, "{i:08}{}", "x".repeat(1016)).expect("write to mosquitto_pub");
        }
    }
    assert!(publisher.wait().expect("mosquitto_pub exit").success());
    let got = reader.join().expect("reader");
    let _ = sub.kill();
    let _ = sub.wait();
    assert_eq!(got, COUNT, "every message of the burst delivered");
}

/// Packets a client sends right behind its CONNECT (one segment, as
/// paho does when it subscribes before the CONNACK) are served at once, not
/// when the client next sends something: that wait lost the subscription
/// of a client that closed before its keep-alive, and with it what was
/// published for its session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_right_behind_connect_are_served_at_once() {
    let serve = Serve::start();
    let mut c = TcpStream::connect(("127.0.0.1", serve.mqtt_port))
        .await
        .unwrap();
    let mut both = raw_connect(4, "pipelined", 60);
    both.extend(raw_subscribe(4, "pipe/t", 1));
    c.write_all(&both).await.unwrap();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while got.len() < 9 && tokio::time::Instant::now() < deadline {
        got.extend(read_reply(&mut c, 500).await);
    }
    assert_eq!(
        got,
        [0x20, 2, 0, 0, 0x90, 3, 0, 1, 1],
        "CONNACK, then the SUBACK without waiting for more bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_is_disconnected_and_a_healthy_one_gets_everything() {
    const COUNT: usize = 4_000;
    // 4 000 KiB is past its 1 MiB buffer.
    let serve = Serve::start_with(&["--max-subscriber-buffer-bytes", "1048576"], &[]);
    // A raw client that subscribes and then never reads its socket.
    let mut stuck = TcpStream::connect(("127.0.0.1", serve.mqtt_port))
        .await
        .unwrap();
    stuck
        .write_all(&raw_connect(4, "never-reads", 0))
        .await
        .unwrap();
    assert_eq!(read_reply(&mut stuck, 3000).await, vec![0x20, 2, 0, 0]);
    stuck
        .write_all(&raw_subscribe(4, "slow/t", 1))
        .await
        .unwrap();
    assert_eq!(read_reply(&mut stuck, 3000).await, vec![0x90, 3, 0, 1, 1]);

    let mut healthy = V5::connect(serve.mqtt_port, "healthy-reader").await;
    healthy.subscribe("slow/t", 1).await;
    let publisher = V5::connect(serve.mqtt_port, "fast-publisher").await;
    let payload = vec![b'p'; 1024];
    let sender = tokio::spawn(async move {
        for _ in 0..COUNT {
            publisher.publish("slow/t", &payload, 1, false).await;
        }
        publisher
    });
    for i in 0..COUNT {
        let m = tokio::time::timeout(Duration::from_secs(20), healthy.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("healthy subscriber stalled after {i} messages"))
            .expect("healthy subscriber connected");
        assert_eq!(m.payload.len(), 1024);
    }
    let _publisher = sender.await.unwrap();
    // The stuck client was disconnected: draining its socket ends in EOF.
    let mut buf = vec![0u8; 64 * 1024];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stuck.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the client that never read was disconnected"
    );
}

/// A kept session with no connection is a subscriber too: publishers wait
/// for it as for a slow reader (the router would otherwise overwrite what
/// it has not read: 2 MiB into a 1 MiB log), and when it resumes it reads
/// the whole flood, in order, while the publisher goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_session_away_during_a_flood_gets_all_of_it_on_resume() {
    use rumqttc::v5::mqttbytes::v5::Packet;
    const COUNT: usize = 2_000;
    let serve = Serve::start_with(&["--slow-consumer-timeout-ms", "60000"], &[]);
    let o = leave_kept_subscriber(serve.mqtt_port, "away-sub", "away/t").await;

    let mut publisher = V5::connect(serve.mqtt_port, "away-pub").await;
    let client = publisher.client.clone();
    let sender = tokio::spawn(numbered_flood(client, "away/t", COUNT));
    // Resume once the flood is past the log's high-water mark or over.
    let mut acked = 0;
    let mut deadline = None;
    while acked < COUNT {
        let wait = deadline.map_or(Duration::from_secs(20), |d: tokio::time::Instant| {
            d.saturating_duration_since(tokio::time::Instant::now())
        });
        match tokio::time::timeout(wait, publisher.packets.recv()).await {
            Ok(Some(Packet::PubAck(_))) => acked += 1,
            Ok(Some(_)) => {}
            Ok(None) => panic!("publisher disconnected"),
            Err(_) => break,
        }
        if acked == 400 {
            deadline = Some(tokio::time::Instant::now() + Duration::from_millis(500));
        }
    }
    let mut sub = V5::connect_with(o).await.expect("resume");
    assert!(sub.connack.session_present);
    for i in 0..COUNT {
        let m = tokio::time::timeout(Duration::from_secs(20), sub.rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("only {i} of {COUNT} (publisher acked {acked} before the resume)")
            })
            .expect("connected");
        assert_eq!(
            u64::from_be_bytes(m.payload[..8].try_into().unwrap()),
            i as u64,
            "in order, none skipped (publisher acked {acked} before the resume)"
        );
    }
    sender.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_flooding_its_own_subscription_is_not_deadlocked_by_flow_control() {
    const COUNT: usize = 4_000;
    // The bridge's shape: one connection publishes a flood and is also the
    // subscriber of those topics. Its acks and deliveries must keep flowing
    // while its publishes wait for it.
    let serve = Serve::start_with(&["--slow-consumer-timeout-ms", "2000"], &[]);
    let mut both = V5::connect(serve.mqtt_port, "self-subscriber").await;
    both.subscribe("loop/t", 1).await;
    let client = both.client.clone();
    let sender = tokio::spawn(numbered_flood(client, "loop/t", COUNT));
    for i in 0..COUNT {
        let m = tokio::time::timeout(Duration::from_secs(20), both.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("stalled after {i} of its own messages"))
            .expect("still connected");
        assert_eq!(
            u64::from_be_bytes(m.payload[..8].try_into().unwrap()),
            i as u64,
            "in order"
        );
    }
    sender.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_connects_are_closed_without_connack() {
    let serve = Serve::start();
    let with_flags = |flags: u8| {
        let mut p = raw_connect(4, "flags", 30);
        p[9] = flags;
        p
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("reserved connect flag", with_flags(0x03)),
        ("will QoS without a will", with_flags(0x0a)),
        ("password without user name (3.1.1)", with_flags(0x42)),
        ("NUL in the client id", raw_connect(4, "a\0b", 30)),
    ];
    for (what, bytes) in cases {
        let mut stream = TcpStream::connect(("127.0.0.1", serve.mqtt_port))
            .await
            .unwrap();
        stream.write_all(&bytes).await.unwrap();
        assert!(
            read_reply(&mut stream, 3000).await.is_empty(),
            "{what}: closed without CONNACK"
        );
    }
    assert_broker_works(serve.mqtt_port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_the_clients_maximum_packet_size_are_not_sent() {
    let serve = Serve::start();
    let mut opts = rumqttc::v5::MqttOptions::new("small-reader", "127.0.0.1", serve.mqtt_port);
    opts.set_max_packet_size(Some(200));
    let mut small = V5::connect_with(opts).await.expect("connect");
    small.subscribe("size/#", 1).await;
    let publisher = V4::connect(serve.mqtt_port, "size-pub").await;
    for qos in [0, 1] {
        publisher.publish("size/t", &[b'x'; 1000], qos, false).await;
        publisher.publish("size/t", b"fits", qos, false).await;
    }
    // Only the small ones arrive, and the connection stays up (the router's
    // QoS 1 copy of the big one was acknowledged for it).
    for _ in 0..2 {
        assert_eq!(recv(&mut small.rx, 5).await.payload, b"fits");
    }
    for i in 0..150 {
        publisher.publish("size/t", &[b'x'; 1000], 1, false).await;
        publisher
            .publish("size/t", format!("{i}").as_bytes(), 1, false)
            .await;
    }
    for i in 0..150 {
        assert_eq!(
            recv(&mut small.rx, 5).await.payload,
            format!("{i}").as_bytes()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_receive_maximum_bounds_unacknowledged_deliveries() {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{mqttbytes::QoS, Event};
    let serve = Serve::start();
    let mut opts = rumqttc::v5::MqttOptions::new("window-2", "127.0.0.1", serve.mqtt_port);
    opts.set_receive_maximum(Some(2));
    opts.set_manual_acks(true);
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 100);
    client
        .subscribe("window/t", QoS::AtLeastOnce)
        .await
        .unwrap();
    let publisher = V4::connect(serve.mqtt_port, "window-pub").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut held = Vec::new();
    loop {
        let event = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .expect("in time")
            .expect("connected");
        match event {
            Event::Incoming(Packet::SubAck(_)) => {
                for i in 0..5 {
                    publisher
                        .publish("window/t", format!("m{i}").as_bytes(), 1, false)
                        .await;
                }
            }
            Event::Incoming(Packet::Publish(p)) => held.push(p),
            _ => {}
        }
        if held.len() == 2 {
            break;
        }
    }
    // Nothing more arrives while the two are unacknowledged.
    let quiet = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = eventloop.poll().await {
                return p;
            }
        }
    })
    .await;
    assert!(
        quiet.is_err(),
        "a third message arrived past receive maximum 2: {quiet:?}"
    );
    for p in held.drain(..) {
        client.ack(&p).await.unwrap();
    }
    let mut rest = Vec::new();
    while rest.len() < 3 {
        let event = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .expect("in time")
            .expect("connected");
        if let Event::Incoming(Packet::Publish(p)) = event {
            client.ack(&p).await.unwrap();
            rest.push(String::from_utf8_lossy(&p.payload).into_owned());
        }
    }
    assert_eq!(rest, ["m2", "m3", "m4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_local_subscriptions_do_not_echo_a_clients_own_messages() {
    use rumqttc::v5::mqttbytes::v5::Filter;
    use rumqttc::v5::mqttbytes::QoS;
    let serve = Serve::start();
    let mut me = V5::connect(serve.mqtt_port, "no-local-me").await;
    let mut filter = Filter::new("chat/room", QoS::AtLeastOnce);
    filter.nolocal = true;
    me.client.subscribe_many([filter]).await.unwrap();
    let mut other = V5::connect(serve.mqtt_port, "no-local-other").await;
    other.subscribe("chat/room", 1).await;
    me.publish("chat/room", b"from me", 1, false).await;
    other.publish("chat/room", b"from other", 1, false).await;
    let m = recv(&mut me.rx, 5).await;
    assert_eq!(m.payload, b"from other", "own message not echoed");
    // Two publishers: no order between them, both arrive.
    let mut got = [
        recv(&mut other.rx, 5).await.payload,
        recv(&mut other.rx, 5).await.payload,
    ];
    got.sort();
    assert_eq!(got, [b"from me".to_vec(), b"from other".to_vec()]);
    recv_none(&mut me.rx, 300).await;
    // The origin marker never reaches clients.
    while let Ok(packet) = other.packets.try_recv() {
        if let rumqttc::v5::mqttbytes::v5::Packet::Publish(p) = packet {
            let props = p.properties.unwrap_or_default();
            assert!(
                props
                    .user_properties
                    .iter()
                    .all(|(k, _)| !k.starts_with("axion-")),
                "{props:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos1_message_redelivered_to_a_resumed_session_carries_dup() {
    use common::raw::{raw_connect_flags, read_packet};
    let serve = Serve::start();
    let port = serve.mqtt_port;
    let connect = raw_connect_flags(4, "dup-sub", 30, 0x00);
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(&connect).await.expect("write");
    assert_eq!(read_packet(&mut s, 5_000).await.expect("CONNACK").0, 0x20);
    s.write_all(&raw_subscribe(4, "dup/t", 1))
        .await
        .expect("write");
    assert_eq!(read_packet(&mut s, 5_000).await.expect("SUBACK").0, 0x90);

    let publisher = V4::connect(port, "dup-pub").await;
    publisher.publish("dup/t", b"once", 1, false).await;
    let (byte1, first) = read_packet(&mut s, 5_000).await.expect("delivery");
    assert_eq!(byte1, 0x32, "first delivery: QoS 1, no DUP");
    // Leave without acknowledging it, then resume the session.
    drop(s);
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(&connect).await.expect("write");
    let (_, connack) = read_packet(&mut s, 5_000).await.expect("CONNACK");
    assert_eq!(connack[0], 1, "session present");
    let (byte1, again) = read_packet(&mut s, 5_000).await.expect("redelivery");
    assert_eq!(byte1, 0x3A, "redelivery: QoS 1 with DUP");
    // Topic and payload; the packet id is the queue's own (the message
    // waited on disk, where the first connection's id has no meaning).
    let without_pkid = |p: &[u8]| {
        let topic_end = 2 + usize::from(u16::from_be_bytes([p[0], p[1]]));
        [&p[..topic_end], &p[topic_end + 2..]].concat()
    };
    assert_eq!(
        without_pkid(&again),
        without_pkid(&first),
        "same topic and payload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_groups_with_one_name_on_different_filters_stay_apart() {
    let serve = Serve::start();
    let port = serve.mqtt_port;
    // MQTT names a shared subscription by group and filter together.
    let mut a = V4::connect(port, "share-a").await;
    a.subscribe("$share/g/share/a", 1).await;
    let mut b = V4::connect(port, "share-b").await;
    b.subscribe("$share/g/share/b", 1).await;
    let publisher = V4::connect(port, "share-pub").await;
    for i in 0..50 {
        publisher
            .publish("share/a", format!("a{i}").as_bytes(), 1, false)
            .await;
        publisher
            .publish("share/b", format!("b{i}").as_bytes(), 1, false)
            .await;
    }
    for i in 0..50 {
        assert_eq!(
            recv(&mut a.rx, 5).await.payload,
            format!("a{i}").into_bytes()
        );
        assert_eq!(
            recv(&mut b.rx, 5).await.payload,
            format!("b{i}").into_bytes()
        );
    }
    recv_none(&mut a.rx, 300).await;
    recv_none(&mut b.rx, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axions_own_clients_keep_slots_past_the_connection_limit() {
    let max = 12;
    let serve = Serve::start_with(&["--max-connections", &max.to_string()], &[]);
    let mut held = Vec::new();
    loop {
        let opts = rumqttc::MqttOptions::new(
            format!("flood-{}", held.len()),
            "127.0.0.1",
            serve.mqtt_port,
        );
        match V4::connect_with(opts).await {
            Ok(c) => held.push(c),
            Err(rumqttc::ConnectionError::ConnectionRefused(_)) => break,
            Err(other) => panic!("expected a CONNACK refusal, got {other:?}"),
        }
        assert!(held.len() <= max, "the limit never bit");
    }
    // A flood has taken every slot; a restarted part of Axion still gets in.
    let own = rumqttc::MqttOptions::new("axion-queues-probe", "127.0.0.1", serve.mqtt_port);
    let mut own = V4::connect_with(own)
        .await
        .expect("Axion's own client connects past the limit");
    own.round_trip().await;
}

/// A client watching the broker's heartbeat record (its counters).
async fn counter_watcher(port: u16) -> V4 {
    let mut watcher = V4::connect(port, &format!("counter-{}", uuid_like())).await;
    watcher.subscribe("axion/+/heartbeat/broker/#", 0).await;
    watcher
}

/// Reads the broker's counters off its heartbeat record until `done` holds.
async fn wait_counter(watcher: &mut V4, name: &str, done: impl Fn(u64) -> bool) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let value = counter(&recv(&mut watcher.rx, 20).await, name);
        if done(value) {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never reached the expected value (last {value})"
        );
    }
}

/// One counter of a broker heartbeat record.
fn counter(record: &common::mqtt::Msg, name: &str) -> u64 {
    let record: serde_json::Value = serde_json::from_slice(&record.payload).unwrap_or_default();
    record["broker"][name].as_u64().unwrap_or(0)
}

/// Filters come and go (each a new one, as a bridge or a dashboard makes
/// them): rumqttd never frees a filter, so the broker moves every session
/// to a fresh router now and then. Meanwhile a QoS 1 stream reaches a kept
/// session, a wildcard subscriber and a shared group without a gap, a
/// duplicate or a reordering, and a kept session away during the renewals
/// finds its subscription on return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_that_come_and_go_renew_the_router_and_lose_nothing() {
    let serve = Serve::start_with(&["--max-filters", "60"], &[]);
    let port = serve.mqtt_port;
    let away_opts = leave_kept_subscriber(port, "renew-away", "renew/away").await;

    let mut kept_opts = rumqttc::v5::MqttOptions::new("renew-kept", "127.0.0.1", port);
    kept_opts.set_session_expiry_interval(Some(300));
    kept_opts.set_clean_start(false);
    let mut kept = V5::connect_with(kept_opts.clone()).await.expect("connect");
    kept.subscribe("renew/stream", 1).await;
    let mut wild = V4::connect(port, "renew-wild").await;
    wild.subscribe("renew/+", 1).await;
    let mut members = Vec::new();
    for i in 0..2 {
        let mut m = V5::connect(port, &format!("renew-member-{i}")).await;
        m.subscribe("$share/renew/renew/stream", 1).await;
        members.push(m);
    }

    let publisher = V5::connect(port, "renew-pub").await;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let sender = tokio::spawn(async move {
        let mut n: u64 = 0;
        while !*stop_rx.borrow_and_update() {
            publisher
                .publish("renew/stream", &n.to_be_bytes(), 1, false)
                .await;
            n += 1;
            if n.is_multiple_of(50) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        // Kept: what it has queued but not sent yet still goes out.
        (n, publisher)
    });

    let mut watcher = counter_watcher(port).await;
    // Filter churn, each one new, used and dropped, until the broker's
    // record shows two renewals.
    let mut churner = V5::connect(port, "renew-churner").await;
    let mut renewals = 0;
    let mut churned = 0;
    while renewals < 2 {
        assert!(
            churned < 5_000,
            "no two renewals after {churned} filters came and went"
        );
        let f = format!("renew/tmp/{churned}");
        churner.subscribe(&f, 0).await;
        churner.client.unsubscribe(f).await.expect("unsubscribe");
        churned += 1;
        while let Ok(record) = watcher.rx.try_recv() {
            renewals = renewals.max(counter(&record, "router_renewals"));
        }
    }
    stop_tx.send(true).unwrap();
    let (sent, _publisher) = sender.await.unwrap();
    assert!(sent > 100, "the stream ran through the renewals ({sent})");

    // The wildcard subscriber got 0..sent, in order, exactly once.
    for i in 0..sent {
        let m = tokio::time::timeout(Duration::from_secs(10), wild.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("wildcard: only {i} of {sent} after {renewals} renewals"))
            .unwrap_or_else(|| panic!("wildcard: disconnected\n{}", common::serve_log(&serve)));
        assert_eq!(
            u64::from_be_bytes(m.payload[..8].try_into().unwrap()),
            i,
            "wildcard: in order, none lost or repeated"
        );
    }
    recv_none(&mut wild.rx, 200).await;
    // So did the kept session. On a machine short of CPU it may fall a
    // log behind and be cut off (kept sessions hold publishers back for
    // 100 ms at most); then it resumes, as a client would, and finds the
    // rest in its queue. What it had been sent unacknowledged may come
    // again after the resume, as QoS 1 allows; nothing may be missing.
    let mut next = 0;
    let mut resumed = 0;
    while next < sent {
        let got = tokio::time::timeout(Duration::from_secs(10), kept.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("kept: only {next} of {sent} after {renewals} renewals"));
        let Some(m) = got else {
            resumed += 1;
            assert!(
                resumed <= 3,
                "kept: cut off again and again\n{}",
                common::serve_log(&serve)
            );
            kept = V5::connect_with(kept_opts.clone()).await.expect("resume");
            assert!(
                kept.connack.session_present,
                "kept: its session survived the cut"
            );
            continue;
        };
        let i = u64::from_be_bytes(m.payload[..8].try_into().unwrap());
        if resumed > 0 && i < next {
            continue;
        }
        assert_eq!(i, next, "kept: in order, none lost or repeated");
        next += 1;
    }
    recv_none(&mut kept.rx, 200).await;
    let mut shared: Vec<u64> = Vec::new();
    let (first, second) = members.split_at_mut(1);
    let (a, b) = (&mut first[0].rx, &mut second[0].rx);
    while shared.len() < sent as usize {
        let msg = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::select! {
                Some(m) = a.recv() => m,
                Some(m) = b.recv() => m,
            }
        })
        .await
        .unwrap_or_else(|_| panic!("shared group: only {} of {sent}", shared.len()));
        shared.push(u64::from_be_bytes(msg.payload[..8].try_into().unwrap()));
    }
    recv_none(a, 200).await;
    recv_none(b, 200).await;
    shared.sort_unstable();
    assert_eq!(
        shared,
        (0..sent).collect::<Vec<_>>(),
        "the shared group got each message once"
    );

    // The kept session that was away resumes on the new router.
    let mut away = V5::connect_with(away_opts).await.expect("resume");
    assert!(away.connack.session_present, "kept across renewals");
    let p = V5::connect(port, "renew-pub-2").await;
    p.publish("renew/away", b"welcome back", 1, false).await;
    assert_eq!(recv(&mut away.rx, 5).await.payload, b"welcome back");
    // New filters are taken again.
    churner.subscribe("renew/after", 1).await;
    p.publish("renew/after", b"fresh", 1, false).await;
    assert_eq!(recv(&mut churner.rx, 5).await.payload, b"fresh");
    // Each retired router ended in its expected panic, which the binary's
    // panic hook keeps out of the log (src/panics.rs).
    let log = common::serve_log(&serve);
    assert!(
        !log.contains("panicked"),
        "a retired router's panic reached the log:\n{log}"
    );
}

/// What a burst of clients left behind is freed once the churn stops,
/// though far fewer filters are dead than make a renewal under churn (a
/// quarter of `--max-filters`): the router is renewed once no new filter
/// has come for a few seconds, and clients carry on across it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_filters_are_freed_once_the_churn_stops() {
    let serve = Serve::start_with(&["--max-filters", "1000"], &[]);
    let port = serve.mqtt_port;
    let mut live = V5::connect(port, "settle-live").await;
    live.subscribe("settle/live", 1).await;
    let mut watcher = counter_watcher(port).await;
    let before = wait_counter(&mut watcher, "router_renewals", |_| true).await;
    let mut churner = V5::connect(port, "settle-churner").await;
    for i in 0..20 {
        churner.subscribe(&format!("settle/tmp/{i}/+"), 0).await;
    }
    // Gone without a word: its 20 filters are dead, 2% of the bound.
    drop(churner);
    wait_counter(&mut watcher, "router_renewals", |n| n > before).await;
    live.publish("settle/live", b"still here", 1, false).await;
    assert_eq!(recv(&mut live.rx, 5).await.payload, b"still here");
}

/// A kept session away while it is owed messages does not hold a renewal
/// back: what it is owed waits in its queue on disk, the router is renewed
/// all the same, what is published to it meanwhile is queued too, and the
/// session resumes with every message, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_away_session_owed_messages_does_not_hold_a_renewal_back() {
    let serve = Serve::start_with(&["--max-filters", "40"], &[]);
    let port = serve.mqtt_port;
    let opts = leave_kept_subscriber(port, "owed-away", "owed/away").await;
    let publisher = V5::connect(port, "owed-pub").await;
    for i in 0u64..5 {
        publisher
            .publish("owed/away", &i.to_be_bytes(), 1, false)
            .await;
    }
    let mut watcher = counter_watcher(port).await;
    let mut churner = V5::connect(port, "owed-churner").await;
    for i in 0..60 {
        let f = format!("owed/tmp/{i}");
        churner.subscribe(&f, 0).await;
        churner.client.unsubscribe(f).await.expect("unsubscribe");
    }
    wait_counter(&mut watcher, "router_renewals", |n| n >= 1).await;
    for i in 5u64..8 {
        publisher
            .publish("owed/away", &i.to_be_bytes(), 1, false)
            .await;
    }
    let mut away = V5::connect_with(opts).await.expect("resume");
    for i in 0u64..8 {
        let m = recv(&mut away.rx, 5).await;
        assert_eq!(m.payload, i.to_be_bytes());
    }
    publisher.publish("owed/away", b"after", 1, false).await;
    assert_eq!(recv(&mut away.rx, 5).await.payload, b"after");
}
