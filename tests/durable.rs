//! Broker state that outlives `axion serve`: retained messages come back
//! after a clean stop and after `kill -9`, with the same data directory.
//! Real processes: `axion serve`, `mosquitto_pub`, rumqttc.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::mqtt::V5;
use common::Serve;
use rumqttc::v5::mqttbytes::v5::Packet;

/// `mosquitto_pub -r`: it exits once the broker has acknowledged (QoS 1).
fn publish_retained(port: u16, topic: &str, payload: &str, qos: u8) {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args([
        "-p",
        &port.to_string(),
        "-t",
        topic,
        "-q",
        &qos.to_string(),
        "-r",
    ]);
    if payload.is_empty() {
        cmd.arg("-n");
    } else {
        cmd.args(["-m", payload]);
    }
    let status = cmd.status().expect("run mosquitto_pub");
    assert!(status.success(), "mosquitto_pub {topic}");
}

/// Every retained message under `filter` a new subscriber gets.
async fn retained_under(port: u16, filter: &str) -> BTreeMap<String, String> {
    let mut sub = V5::connect(port, &format!("reader-{}", unique())).await;
    sub.subscribe(filter, 1).await;
    let mut got = BTreeMap::new();
    // The retained burst follows the SUBACK at once; it is over when
    // nothing more comes for a moment.
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), sub.rx.recv()).await {
        assert!(m.retain, "{} arrived without the retain flag", m.topic);
        got.insert(m.topic, String::from_utf8_lossy(&m.payload).into_owned());
    }
    got
}

/// `kill -9` once `n` PUBACKs have come to `publisher`; how many had come
/// by the kill (every one read after it was sent before it).
async fn kill_9_after_pubacks(s: &Serve, publisher: &mut V5, n: usize) -> usize {
    let mut acked = 0;
    while acked < n {
        match tokio::time::timeout(Duration::from_secs(30), publisher.packets.recv()).await {
            Ok(Some(Packet::PubAck(_))) => acked += 1,
            Ok(Some(_)) => {}
            other => panic!("no PUBACK: {other:?}"),
        }
    }
    s.proc.signal(9);
    while let Ok(p) = publisher.packets.try_recv() {
        if matches!(p, Packet::PubAck(_)) {
            acked += 1;
        }
    }
    acked
}

/// A client id no other reader of this test binary uses.
fn unique() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn retained_messages_survive_a_clean_stop_and_kill_9() {
    let mut s = Serve::start();
    let port = s.mqtt_port;
    publish_retained(port, "dev/a/state", "on", 1);
    publish_retained(port, "dev/c/state", "soon gone", 1);
    publish_retained(port, "dev/c/state", "", 1);
    publish_retained(port, "dev/é/state", "multi-byte first level", 1);

    // kill -9 right after the PUBACKs: acknowledged means on disk.
    s.proc.signal(9);
    s.restart(&[], &[]);
    let after_kill = retained_under(s.mqtt_port, "dev/+/state").await;
    assert_eq!(
        after_kill,
        map(&[
            ("dev/a/state", "on"),
            ("dev/é/state", "multi-byte first level")
        ]),
        "after kill -9"
    );

    // QoS 0 and a replacement, then a clean stop.
    publish_retained(port, "dev/b/state", "qos0", 0);
    publish_retained(port, "dev/a/state", "off", 1);
    s.proc.signal(15);
    assert_eq!(s.proc.wait_exit(Duration::from_secs(10)), Some(0));
    s.restart(&[], &[]);
    let after_stop = retained_under(s.mqtt_port, "dev/+/state").await;
    assert_eq!(
        after_stop,
        map(&[
            ("dev/a/state", "off"),
            ("dev/b/state", "qos0"),
            ("dev/é/state", "multi-byte first level")
        ]),
        "after SIGTERM"
    );
}

/// Many clients' acknowledged retained messages, `kill -9` amid a stream of
/// them: every one acknowledged before the kill is back.
#[tokio::test]
async fn every_acknowledged_retained_message_survives_kill_9_amid_publishing() {
    let mut s = Serve::start();
    let mut publisher = V5::connect(s.mqtt_port, "fleet-writer").await;
    let total = 300;
    for i in 0..total {
        publisher
            .client
            .publish(
                format!("fleet/{i}/config"),
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                true,
                format!("v{i}"),
            )
            .await
            .expect("publish");
    }
    // Kill once half of them are acknowledged.
    let acked = kill_9_after_pubacks(&s, &mut publisher, total / 2).await;
    publisher.kill().await;
    s.restart(&[], &[]);
    let back = retained_under(s.mqtt_port, "fleet/+/config").await;
    // PUBACKs come back in order: the first `acked` publishes were acknowledged.
    for i in 0..acked {
        assert_eq!(
            back.get(&format!("fleet/{i}/config")).map(String::as_str),
            Some(format!("v{i}").as_str()),
            "acknowledged retained message {i} of {acked} lost"
        );
    }
    assert!(back.len() <= total);
}

/// A retained message is acknowledged only once its commit is on disk,
/// even while the disk is busy: small retained publishes queue behind
/// 24 MB of large ones, and `kill -9` the moment the first small one is
/// acknowledged still finds every acknowledged message back.
#[tokio::test]
async fn a_retained_acknowledgement_waits_for_its_commit_behind_large_ones() {
    let (size, large, small) = (1_000_000, 24, 20);
    let mut s = Serve::start();
    let mut publisher = V5::connect(s.mqtt_port, "bulky-writer").await;
    let publish = |topic: String, payload: Vec<u8>| {
        let client = publisher.client.clone();
        async move {
            client
                .publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    true,
                    payload,
                )
                .await
                .expect("publish")
        }
    };
    for i in 0..large {
        publish(format!("bulk/{i}"), vec![b'b'; size]).await;
    }
    for i in 0..small {
        publish(format!("small/{i}"), format!("v{i}").into_bytes()).await;
    }
    // PUBACKs come in order: the large ones', then the first small one's.
    let acked = kill_9_after_pubacks(&s, &mut publisher, large + 1).await;
    publisher.kill().await;
    s.restart(&[], &[]);
    let back = retained_under(s.mqtt_port, "small/+").await;
    for i in 0..acked - large {
        assert_eq!(
            back.get(&format!("small/{i}")).map(String::as_str),
            Some(format!("v{i}").as_str()),
            "acknowledged retained message small/{i} lost ({acked} acknowledged in all)"
        );
    }
    let bulk = retained_under(s.mqtt_port, "bulk/+").await;
    assert_eq!(
        bulk.len(),
        large,
        "acknowledged large retained messages lost"
    );
}

#[tokio::test]
async fn message_expiry_keeps_counting_across_a_restart() {
    let mut s = Serve::start();
    let port = s.mqtt_port;
    let mut v5 = V5::connect(port, "expiring").await;
    let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
        message_expiry_interval: Some(2),
        ..Default::default()
    };
    v5.client
        .publish_with_properties(
            "exp/short",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            true,
            "short",
            props,
        )
        .await
        .expect("publish");
    let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
        message_expiry_interval: Some(3600),
        ..Default::default()
    };
    v5.client
        .publish_with_properties(
            "exp/long",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            true,
            "long",
            props,
        )
        .await
        .expect("publish");
    // Both are acknowledged (and so on disk) before the stop.
    let mut acks = 0;
    while acks < 2 {
        if let Some(Packet::PubAck(_)) =
            tokio::time::timeout(Duration::from_secs(10), v5.packets.recv())
                .await
                .expect("PUBACK")
        {
            acks += 1;
        }
    }
    s.proc.signal(15);
    s.proc.wait_exit(Duration::from_secs(10));
    // Down for longer than the short one's expiry.
    std::thread::sleep(Duration::from_millis(2100));
    s.restart(&[], &[]);
    assert_eq!(
        retained_under(s.mqtt_port, "exp/#").await,
        map(&[("exp/long", "long")])
    );
}

/// A kept session, left with its subscription, is sent three QoS 1
/// messages while away (each acknowledged to its publisher); then the
/// broker stops (`signal`) and comes back, and three more are published:
/// the client resumes with session_present=1 and gets all six, in order.
async fn kept_session_survives(signal: i32, v5: bool) {
    let mut s = Serve::start();
    let id = format!("kept-{signal}-{v5}");
    let resume = |port: u16| {
        let id = id.clone();
        async move {
            if v5 {
                let mut o = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
                o.set_clean_start(false);
                o.set_session_expiry_interval(Some(300));
                let c = V5::connect_with(o).await.expect("v5 connect");
                let present = c.connack.session_present;
                (Client::V5(Box::new(c)), present)
            } else {
                let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
                o.set_clean_session(false);
                let c = common::mqtt::V4::connect_with(o).await.expect("v4 connect");
                let present = c.session_present;
                (Client::V4(c), present)
            }
        }
    };
    let (client, present) = resume(s.mqtt_port).await;
    assert!(!present);
    let client = match client {
        Client::V5(mut c) => {
            c.subscribe("kept/#", 1).await;
            Client::V5(c)
        }
        Client::V4(mut c) => {
            c.subscribe("kept/#", 1).await;
            Client::V4(c)
        }
    };
    client.leave().await;

    for i in 0..3 {
        publish_retained_free(s.mqtt_port, &format!("kept/{i}"), &format!("m{i}"));
    }
    s.proc.signal(signal);
    if signal == 15 {
        assert_eq!(s.proc.wait_exit(Duration::from_secs(10)), Some(0));
    }
    s.restart(&[], &[]);
    for i in 3..6 {
        publish_retained_free(s.mqtt_port, &format!("kept/{i}"), &format!("m{i}"));
    }
    let (mut client, present) = resume(s.mqtt_port).await;
    assert!(
        present,
        "the session is back after the restart (signal {signal})"
    );
    let mut got = Vec::new();
    for _ in 0..6 {
        let m = common::mqtt::recv(client.rx(), 5).await;
        got.push(String::from_utf8_lossy(&m.payload).into_owned());
    }
    assert_eq!(got, ["m0", "m1", "m2", "m3", "m4", "m5"]);
}

enum Client {
    V4(common::mqtt::V4),
    V5(Box<V5>),
}

impl Client {
    async fn leave(self) {
        match self {
            Client::V4(c) => c.leave().await,
            Client::V5(c) => c.leave().await,
        }
    }

    fn rx(&mut self) -> &mut tokio::sync::mpsc::UnboundedReceiver<common::mqtt::Msg> {
        match self {
            Client::V4(c) => &mut c.rx,
            Client::V5(c) => &mut c.rx,
        }
    }
}

/// `mosquitto_pub -q 1` (not retained): exits once acknowledged.
fn publish_retained_free(port: u16, topic: &str, payload: &str) {
    let status = Command::new("mosquitto_pub")
        .args([
            "-p",
            &port.to_string(),
            "-t",
            topic,
            "-q",
            "1",
            "-m",
            payload,
        ])
        .status()
        .expect("run mosquitto_pub");
    assert!(status.success());
}

#[tokio::test]
async fn a_kept_3_1_1_session_survives_a_clean_stop() {
    kept_session_survives(15, false).await;
}

#[tokio::test]
async fn a_kept_mqtt5_session_survives_a_clean_stop() {
    kept_session_survives(15, true).await;
}

#[tokio::test]
async fn a_kept_mqtt5_session_survives_kill_9() {
    kept_session_survives(9, true).await;
}

#[tokio::test]
async fn a_kept_3_1_1_session_survives_kill_9() {
    kept_session_survives(9, false).await;
}

/// A subscription matching more retained QoS 1 messages than a session has
/// packet ids (64 536) gets every one of them: the ones past the ids at
/// QoS 0, instead of a broker that spins looking for a free id and never
/// answers the SUBSCRIBE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_matching_more_retained_messages_than_packet_ids_gets_them_all() {
    let total: usize = 66_000;
    let s = Serve::start_with(&["--max-retained", "200000"], &[]);
    let mut publisher = V5::connect(s.mqtt_port, "many-retained").await;
    let mut acked = 0;
    for i in 0..total {
        publisher
            .client
            .publish(
                format!("many/{i}"),
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                true,
                "x",
            )
            .await
            .expect("publish");
        // Keep the request queue short: drain PUBACKs as they come.
        while let Ok(p) = publisher.packets.try_recv() {
            if matches!(p, Packet::PubAck(_)) {
                acked += 1;
            }
        }
    }
    while acked < total {
        match tokio::time::timeout(Duration::from_secs(30), publisher.packets.recv()).await {
            Ok(Some(Packet::PubAck(_))) => acked += 1,
            Ok(Some(_)) => {}
            other => panic!("PUBACK {acked} of {total}: {other:?}"),
        }
    }
    let mut sub = V5::connect(s.mqtt_port, "many-reader").await;
    sub.subscribe("many/#", 1).await;
    let mut got = 0;
    while got < total {
        match tokio::time::timeout(Duration::from_secs(30), sub.rx.recv()).await {
            Ok(Some(_)) => got += 1,
            other => panic!("retained {got} of {total}: {other:?}"),
        }
    }
}

/// The client comes back the moment the broker is back (before the broker
/// has settled its restored sessions): its queue is read all the same.
#[tokio::test]
async fn a_session_resumed_as_the_broker_comes_back_gets_its_queue() {
    let mut s = Serve::start();
    let id = "instant-resume";
    let opts = |port: u16| {
        let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(false);
        o
    };
    let mut c = common::mqtt::V4::connect_with(opts(s.mqtt_port))
        .await
        .expect("connect");
    c.subscribe("instant/#", 1).await;
    c.leave().await;
    for round in 0..3 {
        publish_retained_free(s.mqtt_port, "instant/x", &format!("r{round}"));
        s.proc.signal(if round % 2 == 0 { 15 } else { 9 });
        s.proc.wait_exit(Duration::from_secs(10));
        s.restart(&[], &[]);
        let mut c = common::mqtt::V4::connect_with(opts(s.mqtt_port))
            .await
            .expect("resume");
        assert!(c.session_present, "round {round}");
        let m = common::mqtt::recv(&mut c.rx, 5).await;
        assert_eq!(m.payload, format!("r{round}").into_bytes(), "round {round}");
        c.leave().await;
    }
}
