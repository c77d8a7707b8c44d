//! The bridge's MQTT connection in `axion serve`: an MQTT 5 session with
//! the broker in the same process, through an in-memory pipe.
//!
//! Over a socket, each message between the bridge and the broker beside it
//! cost a write and a read system call, a pass through rumqttc's event
//! loop (a channel of large request structs, a flush per request) and a
//! wake-up of another thread: the broker served the bridge's session on
//! the process's runtime, the bridge ran on its own thread. Here the bridge
//! hands the broker's front end one end of a `tokio::io::duplex` pipe
//! ([`LocalBroker::serve_link`]) and the session it serves runs on the
//! bridge's thread. It is the same session code as for any client
//! (handshake, login, ACLs, flow control, No Local), so every guarantee
//! holds; only the kernel and the second thread are gone.
//!
//! rumqttc runs over sockets only, hence this small client with rumqttc's
//! own packet codec. It speaks what the bridge uses: CONNECT, PUBLISH at
//! QoS 0 and 1 both ways, SUBSCRIBE (with Subscription Identifiers and No
//! Local), UNSUBSCRIBE, PINGREQ and DISCONNECT. Like rumqttc it reconnects
//! after a pause, starts each session clean, and lets no more QoS 1
//! publishes be in flight than the broker's Receive Maximum (at most 100,
//! rumqttc's default).

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode,
    Login, Packet, PingReq, PubAck,
};
use rumqttc::v5::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::mqtt::Inbox;
use crate::LocalBroker;

/// Bytes the pipe holds each way before a writer waits.
const PIPE_BYTES: usize = 256 * 1024;
/// Encoded bytes gathered for the pipe before requests are left waiting in
/// their channel (which then holds back whoever sends them).
const OUT_HIGH: usize = 64 * 1024;
/// Room made in the read buffer before each read.
const READ_CHUNK: usize = 64 * 1024;
/// Keep-alive asked for in CONNECT; a PINGREQ goes every half of it.
const KEEP_ALIVE_SECS: u16 = 60;
/// QoS 1 publishes in flight at most, as rumqttc's default.
const MAX_INFLIGHT: usize = 100;
/// Pings no more often than this, whatever keep-alive the broker asks.
const MIN_PING: Duration = Duration::from_millis(100);
/// How long the broker may take to answer CONNECT.
const CONNACK_WAIT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The link is gone: the bridge is stopping.
#[derive(Debug, thiserror::Error)]
#[error("the in-process MQTT link is closed")]
pub struct LinkClosed;

/// The sending side: packets for the link's task, which gives them packet
/// ids in sending order.
#[derive(Clone)]
pub struct LinkClient(mpsc::Sender<Packet>);

impl LinkClient {
    /// Queues a packet; waits while the link's queue is full.
    pub async fn send(&self, packet: Packet) -> Result<(), LinkClosed> {
        self.0.send(packet).await.map_err(|_| LinkClosed)
    }
}

/// What the link's CONNECT says.
pub struct LinkOptions {
    pub client_id: String,
    pub login: Option<(String, String)>,
    /// Largest packet the bridge takes (its CONNECT's Maximum Packet Size).
    pub max_packet: u32,
}

/// A link and its queue of requests (as deep as rumqttc's was).
pub fn channel(capacity: usize) -> (LinkClient, mpsc::Receiver<Packet>) {
    let (tx, rx) = mpsc::channel(capacity);
    (LinkClient(tx), rx)
}

/// How a connection of the link ended.
enum Ended {
    /// DISCONNECT sent on the bridge's request, or the bridge is stopping.
    Done,
    /// The session ended otherwise; connect again.
    Lost(String),
}

/// Runs the link until the bridge asks it to disconnect (or drops every
/// [`LinkClient`]) or `cancel` fires, connecting again after any loss.
pub async fn run(
    broker: Arc<dyn LocalBroker>,
    options: LinkOptions,
    mut requests: mpsc::Receiver<Packet>,
    inbox: Inbox,
    cancel: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
        let session = tokio::spawn(broker.serve_link(theirs));
        let (read, write) = tokio::io::split(ours);
        let mut conn = Conn {
            read,
            write,
            inbuf: BytesMut::with_capacity(READ_CHUNK),
            out: BytesMut::with_capacity(OUT_HIGH),
            pkid: 0,
            inflight: 0,
            max_inflight: MAX_INFLIGHT,
            max_packet: options.max_packet,
        };
        let ended = tokio::select! {
            _ = cancel.cancelled() => Ended::Done,
            ended = conn.serve(&options, &mut requests, &inbox, &mut backoff) => ended,
        };
        inbox.disconnected();
        // Closing our end ends the broker's session.
        drop(conn);
        let _ = session.await;
        match ended {
            Ended::Done => return,
            Ended::Lost(why) => {
                tracing::warn!(reason = why, retry_in = ?backoff, "in-process MQTT link lost");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

struct Conn {
    read: ReadHalf<DuplexStream>,
    write: WriteHalf<DuplexStream>,
    inbuf: BytesMut,
    /// Encoded, not yet written.
    out: BytesMut,
    /// The last packet id given.
    pkid: u16,
    /// QoS 1 publishes sent and not acknowledged.
    inflight: usize,
    max_inflight: usize,
    max_packet: u32,
}

impl Conn {
    async fn serve(
        &mut self,
        options: &LinkOptions,
        requests: &mut mpsc::Receiver<Packet>,
        inbox: &Inbox,
        backoff: &mut Duration,
    ) -> Ended {
        let connack = match tokio::time::timeout(CONNACK_WAIT, self.connect(options)).await {
            Ok(Ok(connack)) => connack,
            Ok(Err(why)) => return Ended::Lost(why),
            Err(_) => return Ended::Lost("no CONNACK".into()),
        };
        if connack.code != ConnectReturnCode::Success {
            return Ended::Lost(format!("connection refused: {:?}", connack.code));
        }
        *backoff = BACKOFF_MIN;
        let receive_max = connack.properties.as_ref().and_then(|p| p.receive_max);
        self.max_inflight =
            receive_max.map_or(MAX_INFLIGHT, |r| usize::from(r).clamp(1, MAX_INFLIGHT));
        inbox.connected(connack.properties.as_ref().and_then(|p| p.max_packet_size));
        // The broker may shorten the keep-alive (Server Keep Alive).
        let keep_alive = connack
            .properties
            .as_ref()
            .and_then(|p| p.server_keep_alive)
            .unwrap_or(KEEP_ALIVE_SECS);
        let every = Duration::from_millis(u64::from(keep_alive) * 500).max(MIN_PING);
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            let take = self.out.len() < OUT_HIGH && self.inflight < self.max_inflight;
            tokio::select! {
                // Reading comes first and never waits for a write: the
                // broker's session writes to us while we write to it.
                read = self.read.read_buf(&mut self.inbuf) => match read {
                    Ok(0) => return Ended::Lost("the broker closed the session".into()),
                    Ok(_) => {
                        if let Err(why) = self.incoming(inbox) {
                            return Ended::Lost(why);
                        }
                    }
                    Err(e) => return Ended::Lost(e.to_string()),
                },
                written = self.write.write(&self.out), if !self.out.is_empty() => match written {
                    Ok(0) => return Ended::Lost("the pipe closed".into()),
                    Ok(n) => {
                        let _ = self.out.split_to(n);
                    }
                    Err(e) => return Ended::Lost(e.to_string()),
                },
                request = requests.recv(), if take => match request {
                    None => return self.goodbye().await,
                    Some(Packet::Disconnect(_)) => return self.goodbye().await,
                    Some(packet) => {
                        self.encode(packet);
                        // Whatever else is waiting goes in the same write.
                        while self.out.len() < OUT_HIGH && self.inflight < self.max_inflight {
                            match requests.try_recv() {
                                Ok(Packet::Disconnect(_)) => return self.goodbye().await,
                                Ok(packet) => self.encode(packet),
                                Err(_) => break,
                            }
                        }
                    }
                },
                _ = ping.tick() => self.encode(Packet::PingReq(PingReq)),
            }
        }
    }

    async fn connect(&mut self, options: &LinkOptions) -> Result<ConnAck, String> {
        let connect = Packet::Connect(
            Connect {
                keep_alive: KEEP_ALIVE_SECS,
                client_id: options.client_id.clone(),
                clean_start: true,
                properties: Some(ConnectProperties {
                    max_packet_size: Some(options.max_packet),
                    ..Default::default()
                }),
            },
            None,
            options
                .login
                .as_ref()
                .map(|(user, password)| Login::new(user, password)),
        );
        let mut buf = BytesMut::new();
        connect
            .write(&mut buf, None)
            .map_err(|e| format!("encode CONNECT: {e:?}"))?;
        self.write
            .write_all(&buf)
            .await
            .map_err(|e| e.to_string())?;
        loop {
            match Packet::read(&mut self.inbuf, Some(self.max_packet)) {
                Ok(Packet::ConnAck(ack)) => return Ok(ack),
                Ok(other) => return Err(format!("expected CONNACK, got {other:?}")),
                Err(CodecError::InsufficientBytes(_)) => {}
                Err(e) => return Err(format!("undecodable CONNACK: {e:?}")),
            }
            self.inbuf.reserve(READ_CHUNK);
            match self.read.read_buf(&mut self.inbuf).await {
                Ok(0) => return Err("the broker closed the session before its CONNACK".into()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Handles every whole packet read so far.
    fn incoming(&mut self, inbox: &Inbox) -> Result<(), String> {
        loop {
            let packet = match Packet::read(&mut self.inbuf, Some(self.max_packet)) {
                Ok(packet) => packet,
                Err(CodecError::InsufficientBytes(_)) => break,
                Err(e) => return Err(format!("undecodable packet from the broker: {e:?}")),
            };
            match packet {
                Packet::Publish(publish) => {
                    if publish.qos != QoS::AtMostOnce {
                        self.encode(Packet::PubAck(PubAck::new(publish.pkid, None)));
                    }
                    inbox.publish(&publish);
                }
                Packet::PubAck(_) => self.inflight = self.inflight.saturating_sub(1),
                Packet::SubAck(ack) => inbox.suback(&ack),
                Packet::Disconnect(d) => {
                    inbox.broker_disconnect(&d);
                    return Err(format!("DISCONNECT {:?}", d.reason_code));
                }
                Packet::UnsubAck(_) | Packet::PingResp(_) => {}
                other => return Err(format!("unexpected packet from the broker: {other:?}")),
            }
        }
        self.inbuf.reserve(READ_CHUNK);
        Ok(())
    }

    /// Encodes a request, giving it a packet id when it needs one.
    fn encode(&mut self, mut packet: Packet) {
        let mut next_id = || {
            self.pkid = self.pkid.checked_add(1).unwrap_or(1);
            self.pkid
        };
        let mut acked = false;
        match &mut packet {
            Packet::Publish(p) if p.qos != QoS::AtMostOnce => {
                p.pkid = next_id();
                acked = true;
            }
            Packet::Subscribe(s) => s.pkid = next_id(),
            Packet::Unsubscribe(u) => u.pkid = next_id(),
            _ => {}
        }
        let start = self.out.len();
        match packet.write(&mut self.out, None) {
            Ok(_) if acked => self.inflight += 1,
            Ok(_) => {}
            // Only a request the bridge built wrong; the others go on.
            Err(e) => {
                self.out.truncate(start);
                tracing::error!(error = ?e, "a packet for the in-process MQTT link could not be encoded")
            }
        }
    }

    /// Writes what is pending, then DISCONNECT.
    async fn goodbye(&mut self) -> Ended {
        self.encode(Packet::Disconnect(Disconnect::new(
            DisconnectReasonCode::NormalDisconnection,
        )));
        if let Err(error) = self.write.write_all(&self.out).await {
            tracing::debug!(%error, "DISCONNECT on the in-process MQTT link");
        }
        self.out.clear();
        Ended::Done
    }
}
