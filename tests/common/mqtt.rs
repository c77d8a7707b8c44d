//! rumqttc clients for tests: connect, wait for CONNACK, and collect
//! incoming publishes on a channel while the event loop runs in the background.
#![allow(dead_code)]

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::timeout;

/// A message as a test sees it, whatever the protocol version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
}

pub struct V4 {
    pub client: rumqttc::AsyncClient,
    pub rx: mpsc::UnboundedReceiver<Msg>,
    /// The CONNACK's session present flag.
    pub session_present: bool,
    /// SUBACKs received so far, so `subscribe` can wait for its own.
    subacks: tokio::sync::watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for V4 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl V4 {
    pub async fn connect(port: u16, id: &str) -> V4 {
        let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        V4::connect_with(opts).await.expect("v4 connect")
    }

    /// Connects with `opts`; `Err` carries the connection error (e.g. a refusal).
    pub async fn connect_with(opts: rumqttc::MqttOptions) -> Result<V4, rumqttc::ConnectionError> {
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 1000);
        let session_present = loop {
            match timeout(Duration::from_secs(10), eventloop.poll())
                .await
                .expect("CONNACK within 10 s")
            {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => {
                    break ack.session_present
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let (suback_tx, subacks) = tokio::sync::watch::channel(0u64);
        let task = tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                match event {
                    rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                        let _ = tx.send(Msg {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            qos: p.qos as u8,
                            retain: p.retain,
                        });
                    }
                    rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => {
                        suback_tx.send_modify(|n| *n += 1);
                    }
                    _ => {}
                }
            }
        });
        Ok(V4 {
            client,
            rx,
            session_present,
            subacks,
            task,
        })
    }

    /// Subscribes and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str, qos: u8) {
        let before = *self.subacks.borrow_and_update();
        self.client
            .subscribe(filter, qos_v4(qos))
            .await
            .expect("subscribe");
        wait_suback(&mut self.subacks, before).await;
    }

    pub async fn publish(&self, topic: &str, payload: &[u8], qos: u8, retain: bool) {
        self.client
            .publish(topic, qos_v4(qos), retain, payload.to_vec())
            .await
            .expect("publish");
    }

    /// Returns once everything this client published before has been
    /// routed: a probe on a topic of its own comes back after it (per-client
    /// order). For a client without other subscriptions: what arrives before
    /// the probe is dropped.
    pub async fn round_trip(&mut self) {
        let topic = probe_topic();
        self.subscribe(&topic, 1).await;
        self.publish(&topic, b"probe", 1, false).await;
        while recv(&mut self.rx, 10).await.topic != topic {}
    }

    /// Drops the TCP connection without DISCONNECT (as a crash would).
    pub fn kill(self) {
        self.task.abort();
    }

    /// Sends DISCONNECT and returns once the broker has closed the
    /// connection (its session has ended).
    pub async fn leave(mut self) {
        self.client.disconnect().await.expect("disconnect");
        closed_by_broker(&mut self.task).await;
    }
}

pub struct V5 {
    pub client: rumqttc::v5::AsyncClient,
    pub rx: mpsc::UnboundedReceiver<Msg>,
    /// Every packet the client received, for tests of protocol details.
    pub packets: mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Packet>,
    /// The error that ended the event loop, if it ended.
    pub ended: tokio::sync::oneshot::Receiver<String>,
    /// The broker's CONNACK.
    pub connack: rumqttc::v5::mqttbytes::v5::ConnAck,
    subacks: tokio::sync::watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for V5 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl V5 {
    /// Drops the connection without DISCONNECT and returns once the socket
    /// is closed. A plain drop only asks the client's task to stop: a task
    /// running at that moment goes on reading, and may take (and PUBACK) a
    /// message meant for the session it left behind.
    pub async fn kill(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }

    /// Sends DISCONNECT and returns once the broker has closed the
    /// connection (its session has ended).
    pub async fn leave(mut self) {
        self.client.disconnect().await.expect("disconnect");
        closed_by_broker(&mut self.task).await;
    }

    pub async fn connect(port: u16, id: &str) -> V5 {
        let mut opts = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(Some(4 * 1024 * 1024));
        V5::connect_with(opts).await.expect("v5 connect")
    }

    pub async fn connect_with(
        opts: rumqttc::v5::MqttOptions,
    ) -> Result<V5, rumqttc::v5::ConnectionError> {
        use rumqttc::v5::{mqttbytes::v5::Packet, Event};
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 1000);
        let connack = loop {
            match timeout(Duration::from_secs(10), eventloop.poll())
                .await
                .expect("CONNACK within 10 s")
            {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => break ack,
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let (ptx, packets) = mpsc::unbounded_channel();
        let (etx, ended) = tokio::sync::oneshot::channel();
        let (suback_tx, subacks) = tokio::sync::watch::channel(0u64);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(packet)) => {
                        if let Packet::SubAck(_) = &packet {
                            suback_tx.send_modify(|n| *n += 1);
                        }
                        if let Packet::Publish(p) = &packet {
                            let _ = tx.send(Msg {
                                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                                payload: p.payload.to_vec(),
                                qos: p.qos as u8,
                                retain: p.retain,
                            });
                        }
                        let _ = ptx.send(packet);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = etx.send(format!("{e:?}"));
                        return;
                    }
                }
            }
        });
        Ok(V5 {
            client,
            rx,
            packets,
            ended,
            connack,
            subacks,
            task,
        })
    }

    /// Subscribes and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str, qos: u8) {
        let before = *self.subacks.borrow_and_update();
        self.client
            .subscribe(filter, qos_v5(qos))
            .await
            .expect("subscribe");
        wait_suback(&mut self.subacks, before).await;
    }

    /// Subscribes with every MQTT 5 option of `filter` and waits for the SUBACK.
    pub async fn subscribe_filter(&mut self, filter: rumqttc::v5::mqttbytes::v5::Filter) {
        let before = *self.subacks.borrow_and_update();
        self.client
            .subscribe_many([filter])
            .await
            .expect("subscribe");
        wait_suback(&mut self.subacks, before).await;
    }

    pub async fn publish(&self, topic: &str, payload: &[u8], qos: u8, retain: bool) {
        self.client
            .publish(topic, qos_v5(qos), retain, payload.to_vec())
            .await
            .expect("publish");
    }
}

/// Waits until more than `before` SUBACKs have arrived.
async fn wait_suback(subacks: &mut tokio::sync::watch::Receiver<u64>, before: u64) {
    timeout(Duration::from_secs(10), subacks.wait_for(|n| *n > before))
        .await
        .expect("SUBACK within 10 s")
        .expect("client event loop running");
}

fn probe_topic() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "axion-test/probe/{}/{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn qos_v4(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

pub fn qos_v5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// Receives the next message or panics after `secs`.
pub async fn recv(rx: &mut mpsc::UnboundedReceiver<Msg>, secs: u64) -> Msg {
    timeout(Duration::from_secs(secs), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no message within {secs} s"))
        .expect("client event loop ended")
}

/// Asserts nothing arrives within `ms`.
pub async fn recv_none(rx: &mut mpsc::UnboundedReceiver<Msg>, ms: u64) {
    if let Ok(Some(m)) = timeout(Duration::from_millis(ms), rx.recv()).await {
        panic!("unexpected message {m:?}");
    }
}

/// MQTT 5 will properties with only a Will Delay Interval (rumqttc's type
/// has no `Default`).
pub fn will_delay(secs: u32) -> rumqttc::v5::mqttbytes::v5::LastWillProperties {
    rumqttc::v5::mqttbytes::v5::LastWillProperties {
        delay_interval: Some(secs),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    }
}

/// A payload of `size` bytes (at least 8) starting with `i` (big-endian).
pub fn numbered(i: u64, size: usize) -> Vec<u8> {
    let mut payload = vec![b'n'; size.max(8)];
    payload[..8].copy_from_slice(&i.to_be_bytes());
    payload
}

/// The number a [`numbered`] payload starts with.
pub fn number(payload: &[u8]) -> u64 {
    u64::from_be_bytes(payload[..8].try_into().expect("8 bytes"))
}

/// `n` QoS 1 messages of 1 KiB to `topic` with up to 100 in flight; the
/// time from the first publish to the last PUBACK.
pub async fn burst(port: u16, id: &str, topic: &str, n: u64) -> Duration {
    let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    opts.set_inflight(100);
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 1000);
    loop {
        match timeout(Duration::from_secs(10), events.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("{id}: no CONNACK: {other:?}"),
        }
    }
    let started = std::time::Instant::now();
    let topic = topic.to_string();
    let publisher = tokio::spawn(async move {
        for i in 0..n {
            client
                .publish(&topic, rumqttc::QoS::AtLeastOnce, false, numbered(i, 1024))
                .await
                .expect("publish");
        }
        client
    });
    let mut acked = 0;
    while acked < n {
        match timeout(Duration::from_secs(30), events.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            other => panic!("{id}: {acked} of {n} acknowledged, then {other:?}"),
        }
    }
    let took = started.elapsed();
    let client = publisher.await.expect("publisher");
    let _ = client.disconnect().await;
    took
}

/// Waits for a client's event loop to end after its DISCONNECT.
async fn closed_by_broker(task: &mut tokio::task::JoinHandle<()>) {
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the broker closes the connection after DISCONNECT")
        .expect("event loop task");
}
