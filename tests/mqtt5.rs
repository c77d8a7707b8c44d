//! MQTT 5 promises the front end keeps around rumqttd's router: delivered
//! QoS 2 = min(publish, subscription) and retained QoS 2, session expiry
//! (kept, then freed), the will at the session's end, retain-as-published,
//! topic aliases both ways, and Server Keep Alive. Each test is what a
//! client would see on the wire.

mod common;

use std::time::{Duration, Instant};

use common::mqtt::{recv, recv_none, V4, V5};
use common::raw::{mqtt_str, raw_subscribe, read_packet, varint};
use common::Serve;
use rumqttc::v5::mqttbytes::v5::{Filter, LastWill, RetainForwardRule};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::MqttOptions;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn options(port: u16, id: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_subscribers_get_the_publishers_qos_and_retained_qos2_completes() {
    let serve = Serve::start();
    let port = serve.mqtt_port;
    let mut sub = V5::connect(port, "q2-sub").await;
    sub.subscribe("q2/#", 2).await;
    let publisher = V5::connect(port, "q2-pub").await;
    for qos in 0..=2 {
        publisher
            .publish("q2/live", format!("at {qos}").as_bytes(), qos, false)
            .await;
    }
    let got: Vec<u8> = [
        recv(&mut sub.rx, 5).await,
        recv(&mut sub.rx, 5).await,
        recv(&mut sub.rx, 5).await,
    ]
    .iter()
    .map(|m| m.qos)
    .collect();
    assert_eq!(
        got,
        [0, 1, 2],
        "a QoS 2 subscription gets each publish at its own QoS"
    );

    // Two retained QoS 2 messages; seeing them live means they are stored.
    publisher.publish("q2/r1", b"kept", 2, true).await;
    publisher.publish("q2/r2", b"kept too", 2, true).await;
    recv(&mut sub.rx, 5).await;
    recv(&mut sub.rx, 5).await;
    let mut late = V5::connect(port, "q2-late").await;
    late.subscribe("q2/#", 2).await;
    for _ in 0..2 {
        let m = recv(&mut late.rx, 5).await;
        assert!(m.retain && m.qos == 2, "retained QoS 2 at QoS 2: {m:?}");
    }
    // The front end's own QoS 2 flows complete, and live QoS 2 keeps flowing.
    for i in 0..150 {
        publisher
            .publish("q2/after", format!("{i}").as_bytes(), 2, false)
            .await;
    }
    for i in 0..150 {
        let m = recv(&mut late.rx, 5).await;
        assert_eq!((m.qos, m.payload), (2, format!("{i}").into_bytes()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lives_for_its_expiry_interval_and_is_then_freed() {
    let serve = Serve::start();
    let port = serve.mqtt_port;
    let mut publisher = V4::connect(port, "exp-pub").await;

    // Expiry 0 (the MQTT 5 default): nothing is kept, whatever Clean Start says.
    let mut o = options(port, "exp-zero");
    let mut c = V5::connect_with(o.clone()).await.expect("connect");
    c.subscribe("exp/zero", 1).await;
    drop(c);
    o.set_clean_start(false);
    let c = V5::connect_with(o).await.expect("reconnect");
    assert!(!c.connack.session_present, "expiry 0 keeps no session");
    drop(c);

    let mut o = options(port, "exp-one");
    o.set_session_expiry_interval(Some(1));
    let mut c = V5::connect_with(o.clone()).await.expect("connect");
    c.subscribe("exp/t", 1).await;
    c.kill().await;
    publisher.publish("exp/t", b"while away", 1, false).await;
    publisher.round_trip().await;
    o.set_clean_start(false);
    let mut c = V5::connect_with(o.clone()).await.expect("reconnect");
    assert!(
        c.connack.session_present,
        "resumed within the expiry interval"
    );
    assert_eq!(recv(&mut c.rx, 5).await.payload, b"while away");
    drop(c);

    // No event says a session expired: wait past the interval.
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    let mut c = V5::connect_with(o).await.expect("reconnect after expiry");
    assert!(!c.connack.session_present, "expired sessions are gone");
    publisher
        .publish("exp/t", b"nobody subscribed", 1, false)
        .await;
    recv_none(&mut c.rx, 500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_will_comes_at_the_sessions_end_when_that_is_before_the_will_delay() {
    let serve = Serve::start();
    let port = serve.mqtt_port;
    let mut watcher = V5::connect(port, "will-watcher").await;
    watcher.subscribe("will/t", 1).await;
    let mut o = options(port, "will-owner");
    o.set_session_expiry_interval(Some(1));
    let props = common::mqtt::will_delay(600);
    o.set_last_will(LastWill::new(
        "will/t",
        "gone",
        QoS::AtLeastOnce,
        false,
        Some(props),
    ));
    let owner = V5::connect_with(o).await.expect("connect");
    let lost = Instant::now();
    drop(owner);
    let m = recv(&mut watcher.rx, 5).await;
    assert_eq!(m.payload, b"gone");
    assert!(
        lost.elapsed() >= Duration::from_millis(900),
        "the will waited for the session's end, not sent at once ({:?})",
        lost.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_as_published_keeps_the_flag_only_where_asked() {
    let serve = Serve::start();
    let port = serve.mqtt_port;
    let mut rap = V5::connect(port, "rap-on").await;
    rap.subscribe_filter(Filter {
        path: "rap/t".into(),
        qos: QoS::AtLeastOnce,
        nolocal: false,
        preserve_retain: true,
        retain_forward_rule: RetainForwardRule::OnEverySubscribe,
    })
    .await;
    let mut plain = V5::connect(port, "rap-off").await;
    plain.subscribe("rap/t", 1).await;
    let publisher = V5::connect(port, "rap-pub").await;
    publisher.publish("rap/t", b"retained", 1, true).await;
    publisher.publish("rap/t", b"live", 1, false).await;
    let (r1, r2) = (recv(&mut rap.rx, 5).await, recv(&mut rap.rx, 5).await);
    let (p1, p2) = (recv(&mut plain.rx, 5).await, recv(&mut plain.rx, 5).await);
    assert!(r1.retain && !r2.retain, "as published: {r1:?} {r2:?}");
    assert!(!p1.retain && !p2.retain, "live deliveries: {p1:?} {p2:?}");
}

/// A v5 QoS 0 PUBLISH with a Topic Alias property.
fn publish_with_alias(topic: &str, alias: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    mqtt_str(topic.as_bytes(), &mut body);
    body.extend_from_slice(&[3, 0x23]);
    body.extend_from_slice(&alias.to_be_bytes());
    body.extend_from_slice(payload);
    let mut packet = vec![0x30];
    varint(body.len(), &mut packet);
    packet.extend(body);
    packet
}

/// Topic and Topic Alias of a v5 QoS 0 PUBLISH body, and its payload.
fn parse_publish(body: &[u8]) -> (String, Option<u16>, Vec<u8>) {
    let tlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let topic = String::from_utf8_lossy(&body[2..2 + tlen]).into_owned();
    let mut i = 2 + tlen;
    let plen = usize::from(body[i]); // short property lists only
    i += 1;
    let props = &body[i..i + plen];
    let mut alias = None;
    let mut j = 0;
    while j < props.len() {
        match props[j] {
            0x23 => {
                alias = Some(u16::from_be_bytes([props[j + 1], props[j + 2]]));
                j += 3;
            }
            other => panic!("unexpected property {other:#x}"),
        }
    }
    (topic, alias, body[i + plen..].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_aliases_work_both_ways_and_alias_zero_is_refused() {
    let serve = Serve::start();
    let mut s = TcpStream::connect(("127.0.0.1", serve.mqtt_port))
        .await
        .expect("connect");
    // CONNECT v5, clean start, Topic Alias Maximum 4.
    let mut body = Vec::new();
    mqtt_str(b"MQTT", &mut body);
    body.extend_from_slice(&[5, 0x02, 0, 30, 3, 0x22, 0, 4]);
    mqtt_str(b"alias-raw", &mut body);
    let mut connect = vec![0x10];
    varint(body.len(), &mut connect);
    connect.extend(body);
    s.write_all(&connect).await.expect("write");
    assert_eq!(read_packet(&mut s, 5_000).await.expect("CONNACK").0, 0x20);
    // SUBSCRIBE alias/# at QoS 0 (the client hears its own publishes).
    s.write_all(&raw_subscribe(5, "alias/#", 0))
        .await
        .expect("write");
    assert_eq!(read_packet(&mut s, 5_000).await.expect("SUBACK").0, 0x90);

    // Client to broker: set alias 2, then publish by alias alone.
    s.write_all(&publish_with_alias("alias/a", 2, b"one"))
        .await
        .expect("write");
    s.write_all(&publish_with_alias("", 2, b"two"))
        .await
        .expect("write");
    // Broker to client: the first delivery sets an alias, the second uses it.
    let (_, first) = read_packet(&mut s, 5_000).await.expect("first delivery");
    let (_, second) = read_packet(&mut s, 5_000).await.expect("second delivery");
    let (t1, a1, p1) = parse_publish(&first);
    let (t2, a2, p2) = parse_publish(&second);
    assert_eq!((t1.as_str(), p1.as_slice()), ("alias/a", &b"one"[..]));
    assert!(a1.is_some_and(|a| (1..=4).contains(&a)), "alias {a1:?}");
    assert_eq!((t2.as_str(), a2, p2.as_slice()), ("", a1, &b"two"[..]));

    // Alias 0 is a protocol error: DISCONNECT 0x94, then the close.
    s.write_all(&publish_with_alias("alias/b", 0, b"bad"))
        .await
        .expect("write");
    let (byte1, body) = read_packet(&mut s, 5_000).await.expect("DISCONNECT");
    assert_eq!((byte1, body[0]), (0xE0, 0x94));
    assert!(read_packet(&mut s, 5_000).await.is_none(), "closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_over_the_maximum_is_lowered_by_server_keep_alive() {
    let serve = Serve::start_with(&["--max-keep-alive-secs", "20"], &[]);
    let server_keep_alive = |id: &'static str, asked: u64| {
        let mut o = options(serve.mqtt_port, id);
        o.set_keep_alive(Duration::from_secs(asked));
        async move {
            let c = V5::connect_with(o).await.expect("connect");
            c.connack
                .properties
                .as_ref()
                .and_then(|p| p.server_keep_alive)
        }
    };
    assert_eq!(server_keep_alive("ka-long", 120).await, Some(20));
    assert_eq!(
        server_keep_alive("ka-short", 10).await,
        None,
        "a shorter keep-alive stands"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_queued_for_an_offline_session_expire_and_the_rest_arrive_with_less_time() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    let serve = Serve::start();
    let port = serve.mqtt_port;
    let mut o = options(port, "expiry-sub");
    o.set_session_expiry_interval(Some(60));
    let mut c = V5::connect_with(o.clone()).await.expect("connect");
    c.subscribe("expiry/t", 1).await;
    drop(c);
    let mut publisher = V5::connect(port, "expiry-pub").await;
    for (payload, expiry) in [("short", 1), ("long", 60)] {
        let props = PublishProperties {
            message_expiry_interval: Some(expiry),
            ..Default::default()
        };
        publisher
            .client
            .publish_with_properties("expiry/t", QoS::AtLeastOnce, false, payload, props)
            .await
            .expect("publish");
    }
    publisher.subscribe("expiry/probe", 1).await;
    publisher.publish("expiry/probe", b"sync", 1, false).await;
    recv(&mut publisher.rx, 5).await;
    // The short one's second must pass while nobody is connected.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    o.set_clean_start(false);
    let mut c = V5::connect_with(o).await.expect("reconnect");
    let m = recv(&mut c.rx, 5).await;
    assert_eq!(m.payload, b"long", "the expired message is not delivered");
    recv_none(&mut c.rx, 300).await;
    let interval = loop {
        match c.packets.recv().await.expect("packets") {
            rumqttc::v5::mqttbytes::v5::Packet::Publish(p) => {
                break p.properties.and_then(|p| p.message_expiry_interval)
            }
            _ => continue,
        }
    };
    assert!(
        interval.is_some_and(|i| (55..60).contains(&i)),
        "expiry lowered by the time waited: {interval:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_forge_the_brokers_internal_mark() {
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    let serve = Serve::start();
    let mut sub = V5::connect(serve.mqtt_port, "forge-sub").await;
    sub.subscribe("forge/t", 1).await;
    let publisher = V5::connect(serve.mqtt_port, "forge-pub").await;
    let props = PublishProperties {
        user_properties: vec![("k".into(), "v".into()), ("axion".into(), "q0;r;".into())],
        ..Default::default()
    };
    publisher
        .client
        .publish_with_properties("forge/t", QoS::AtLeastOnce, false, "x", props)
        .await
        .expect("publish");
    let p = loop {
        if let Packet::Publish(p) = sub.packets.recv().await.expect("packets") {
            break p;
        }
    };
    assert_eq!((p.qos, p.retain), (QoS::AtLeastOnce, false));
    let user = p.properties.map(|p| p.user_properties).unwrap_or_default();
    assert_eq!(user, vec![("k".to_string(), "v".to_string())]);
}

/// The router gives a resumed session its subscriptions back but not what
/// the front end adds to them: the front end keeps that beside the session,
/// so No Local, retain-as-published and UNSUBSCRIBE work after a resume as
/// before it (a resumed session used to get its own messages back and could
/// not drop a filter it held before reconnecting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_keeps_no_local_retain_as_published_and_its_filters() {
    use rumqttc::v5::mqttbytes::v5::{Packet, UnsubAckReason};
    let serve = Serve::start();
    let port = serve.mqtt_port;
    let mut o = options(port, "res-sub");
    o.set_session_expiry_interval(Some(300));
    let mut c = V5::connect_with(o.clone()).await.expect("connect");
    let mut nolocal = Filter::new("res/nl", QoS::AtLeastOnce);
    nolocal.nolocal = true;
    c.subscribe_filter(nolocal).await;
    let mut rap = Filter::new("res/rap", QoS::AtLeastOnce);
    rap.preserve_retain = true;
    rap.retain_forward_rule = RetainForwardRule::Never;
    c.subscribe_filter(rap).await;
    c.subscribe("res/un", 1).await;
    drop(c);

    o.set_clean_start(false);
    let mut c = V5::connect_with(o).await.expect("resume");
    assert!(c.connack.session_present, "the session was kept");
    let other = V5::connect(port, "res-other").await;

    c.publish("res/nl", b"own", 1, false).await;
    other.publish("res/nl", b"theirs", 1, false).await;
    assert_eq!(
        recv(&mut c.rx, 5).await.payload,
        b"theirs",
        "No Local still holds after the resume"
    );

    other.publish("res/rap", b"kept flag", 1, true).await;
    let m = recv(&mut c.rx, 5).await;
    assert_eq!(m.payload, b"kept flag");
    assert!(m.retain, "retain-as-published still holds after the resume");

    c.client.unsubscribe("res/un").await.expect("unsubscribe");
    let reasons = loop {
        match tokio::time::timeout(Duration::from_secs(5), c.packets.recv()).await {
            Ok(Some(Packet::UnsubAck(ack))) => break ack.reasons,
            Ok(Some(_)) => {}
            other => panic!("no UNSUBACK: {other:?}"),
        }
    };
    assert_eq!(reasons, [UnsubAckReason::Success]);
    other.publish("res/un", b"after", 1, false).await;
    other.publish("res/nl", b"marker", 1, false).await;
    assert_eq!(
        recv(&mut c.rx, 5).await.payload,
        b"marker",
        "nothing arrives on the filter dropped after the resume"
    );
}
