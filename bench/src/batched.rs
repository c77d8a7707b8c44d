//! A lean MQTT 5 client for the durable-queue load ([`crate::queue_load`]).
//!
//! The benchmark shares two cores with the server it measures, so what the
//! generator spends shows in the server's figures. rumqttc writes every
//! outgoing packet with a syscall of its own (its event loop flushes after
//! each request): measured with `perf`, 36% of the generator's CPU went to
//! `writev`. This client writes everything queued since its last write in
//! one syscall, as async-nats (the JetStream side's client) does. It speaks
//! only what the benchmark needs: CONNECT, SUBSCRIBE, PUBLISH at QoS 1 both
//! ways, PUBACK and PINGREQ, over TCP.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use axion_wire::MqttUrl;
use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectReturnCode, Filter, Login, Packet, PingReq, PubAck, Publish,
    PublishProperties, Subscribe,
};
use rumqttc::v5::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

/// Bytes gathered for one write at most.
const WRITE_BATCH: usize = 64 * 1024;
/// Room made in the read buffer before each read.
const READ_CHUNK: usize = 64 * 1024;
/// Sent when nothing else was for this long.
const PING_EVERY: Duration = Duration::from_secs(20);

pub struct Batched {
    pub publisher: Publisher,
    /// Publishes from the broker, PUBACKed already.
    pub incoming: mpsc::UnboundedReceiver<Publish>,
    subacks: mpsc::UnboundedReceiver<()>,
    /// Dropping it closes the connection.
    pub conn: Conn,
}

/// The connection's reading and writing tasks.
pub struct Conn([JoinHandle<()>; 2]);

impl Drop for Conn {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// The sending side of a [`Batched`] connection, for a task of its own.
#[derive(Clone)]
pub struct Publisher(mpsc::UnboundedSender<Packet>);

impl Publisher {
    /// Queues a QoS 1 publish; it goes out once the broker's Receive
    /// Maximum allows. Fails silently once the connection is gone: callers
    /// notice by the replies that stop.
    /// The topic is shared, not copied: a load generator sends the same few.
    pub fn publish(&self, topic: Bytes, payload: Bytes, properties: Option<PublishProperties>) {
        let publish = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic,
            pkid: 0,
            payload,
            properties,
        };
        let _ = self.0.send(Packet::Publish(publish));
    }
}

impl Batched {
    /// Connects with a clean start (and the URL's login, if any) and waits
    /// for the CONNACK; its Receive Maximum bounds the QoS 1 publishes in
    /// flight. TCP only.
    pub async fn connect(url: &MqttUrl, client_id: &str) -> anyhow::Result<Batched> {
        if url.unix.is_some() {
            bail!("the batched client speaks TCP only: {url}");
        }
        let stream = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .with_context(|| format!("connect to {url}"))?;
        stream.set_nodelay(true)?;
        let (mut read, mut write) = stream.into_split();
        let connect = Packet::Connect(
            Connect {
                keep_alive: 2 * PING_EVERY.as_secs() as u16,
                client_id: client_id.into(),
                clean_start: true,
                properties: None,
            },
            None,
            url.user
                .as_ref()
                .map(|u| Login::new(u, url.password.as_deref().unwrap_or(""))),
        );
        let mut buf = BytesMut::new();
        connect
            .write(&mut buf, None)
            .map_err(|e| anyhow::anyhow!("encode CONNECT: {e:?}"))?;
        write.write_all(&buf).await.context("send CONNECT")?;
        buf.clear();
        let connack = match next_packet(&mut read, &mut buf).await {
            Some(Packet::ConnAck(ack)) => ack,
            other => bail!("expected CONNACK, got {other:?}"),
        };
        if connack.code != ConnectReturnCode::Success {
            bail!("connection refused: {connack:?}");
        }
        let inflight = Arc::new(Semaphore::new(receive_maximum(&connack)));
        let (out, out_rx) = mpsc::unbounded_channel();
        let (in_tx, incoming) = mpsc::unbounded_channel();
        let (suback_tx, subacks) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_loop(write, out_rx, inflight.clone()));
        let acks = out.clone();
        let reader = tokio::spawn(async move {
            while let Some(packet) = next_packet(&mut read, &mut buf).await {
                match packet {
                    Packet::Publish(p) => {
                        if p.qos == QoS::AtLeastOnce {
                            let _ = acks.send(Packet::PubAck(PubAck::new(p.pkid, None)));
                        }
                        if in_tx.send(p).is_err() {
                            return;
                        }
                    }
                    Packet::PubAck(_) => inflight.add_permits(1),
                    Packet::SubAck(_) => {
                        let _ = suback_tx.send(());
                    }
                    _ => {}
                }
            }
        });
        Ok(Batched {
            publisher: Publisher(out),
            incoming,
            subacks,
            conn: Conn([writer, reader]),
        })
    }

    /// Subscribes at QoS 1 and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str) -> anyhow::Result<()> {
        let subscribe = Subscribe::new(Filter::new(filter, QoS::AtLeastOnce), None);
        let closed = || anyhow::anyhow!("connection closed before the SUBACK to {filter}");
        self.publisher
            .0
            .send(Packet::Subscribe(subscribe))
            .map_err(|_| closed())?;
        tokio::time::timeout(Duration::from_secs(5), self.subacks.recv())
            .await
            .with_context(|| format!("no SUBACK to {filter} within 5 s"))?
            .ok_or_else(closed)
    }
}

fn receive_maximum(connack: &ConnAck) -> usize {
    connack
        .properties
        .as_ref()
        .and_then(|p| p.receive_max)
        .map_or(usize::from(u16::MAX), usize::from)
        // Packet ids cycle through 1..=65535: with in-order PUBACKs
        // (MQTT-4.6) fewer in flight never collide.
        .min(usize::from(u16::MAX) - 1)
}

/// Reads until one whole packet is decoded; `None` once the connection
/// ends or sends garbage.
async fn next_packet(read: &mut OwnedReadHalf, buf: &mut BytesMut) -> Option<Packet> {
    loop {
        match Packet::read(buf, None) {
            Ok(packet) => return Some(packet),
            Err(CodecError::InsufficientBytes(_)) => {}
            Err(_) => return None,
        }
        buf.reserve(READ_CHUNK);
        match read.read_buf(buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// Encodes every packet waiting in `rx` into one buffer and writes it with
/// one syscall; packet ids are given here, in sending order.
async fn write_loop(
    mut write: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Packet>,
    inflight: Arc<Semaphore>,
) {
    let mut buf = BytesMut::with_capacity(WRITE_BATCH);
    let mut pkid: u16 = 0;
    loop {
        let first = match tokio::time::timeout(PING_EVERY, rx.recv()).await {
            Ok(Some(packet)) => packet,
            Ok(None) => return,
            Err(_) => Packet::PingReq(PingReq),
        };
        let mut next = Some(first);
        while let Some(mut packet) = next.take() {
            if let Packet::Subscribe(s) = &mut packet {
                pkid = pkid.checked_add(1).unwrap_or(1);
                s.pkid = pkid;
            }
            if let Packet::Publish(p) = &mut packet {
                // Out of flight slots: send what is gathered, then wait.
                let permit = match inflight.clone().try_acquire_owned() {
                    Ok(permit) => permit,
                    Err(_) => {
                        if write.write_all(&buf).await.is_err() {
                            return;
                        }
                        buf.clear();
                        match inflight.clone().acquire_owned().await {
                            Ok(permit) => permit,
                            Err(_) => return,
                        }
                    }
                };
                permit.forget();
                pkid = pkid.checked_add(1).unwrap_or(1);
                p.pkid = pkid;
            }
            if packet.write(&mut buf, None).is_err() {
                return;
            }
            if buf.len() < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if write.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
    }
}
