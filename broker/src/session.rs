//! One client connection: MQTT spoken by Axion, routing done by rumqttd.
//!
//! The session reads the CONNECT, refuses what must be refused with a
//! proper CONNACK, registers a link with the router, then shuttles packets
//! both ways. Everything rumqttd would choke on is answered here: keep-alive
//! 0, unsafe client ids and topics, oversize or malformed packets, unknown
//! unsubscribes, `$` filters, and the will (which the router cannot fire
//! for an external link).

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, Connect, ConnectReturnCode, Disconnect, DisconnectReasonCode,
    LastWill, LastWillProperties, Packet, PingResp, PubAck, PubAckReason, PubComp, PubCompReason,
    PubRec, PubRecReason, Publish, PublishProperties, QoS, RetainForwardRule, SubAck,
    SubscribeReasonCode, UnsubAck, UnsubAckReason, Unsubscribe,
};
use rumqttd::Notification;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::{sleep_until, Instant};
use tracing::{debug, info, warn};

use crate::auth::{LoginError, Principal};
use crate::codec::{self, Codec, Frame};
use crate::flow::Consumer;
use crate::names;
use crate::server::Shared;

/// How a session ended, which decides what happens to the will.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The client sent DISCONNECT: no will.
    Clean,
    /// The client sent DISCONNECT 0x04: publish the will anyway.
    CleanWithWill,
    /// Socket closed, keep-alive expired or protocol violated: publish the will.
    Lost,
    /// The broker is stopping.
    Shutdown,
    /// The router dropped the link (session taken over): the link is gone.
    Kicked,
}

/// Outgoing bytes waiting for the writer task, in batches.
const WRITE_QUEUE: usize = 64;

type Reader = Box<dyn AsyncRead + Send + Sync + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Sync + Unpin>;

/// Serves one accepted TCP connection to completion, over TLS if `tls`.
pub async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    if let Err(err) = stream.set_nodelay(true) {
        debug!(%peer, %err, "set_nodelay failed");
    }
    let session = match tls {
        None => {
            // Owned halves: no lock between reader and writer on plain TCP.
            let (r, w) = stream.into_split();
            handshake(Box::new(r), Box::new(w), peer, &shared).await
        }
        Some(acceptor) => {
            let accepted =
                tokio::time::timeout(shared.config.connect_timeout, acceptor.accept(stream)).await;
            match accepted {
                Ok(Ok(tls)) => {
                    let (r, w) = tokio::io::split(tls);
                    handshake(Box::new(r), Box::new(w), peer, &shared).await
                }
                Ok(Err(err)) => {
                    info!(%peer, %err, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    debug!(%peer, "no TLS handshake within the connect timeout");
                    None
                }
            }
        }
    };
    let Some(mut session) = session else {
        return;
    };
    let ending = session.serve(shutdown).await;
    session.finish(ending).await;
}

/// State of an established session.
struct Session {
    peer: SocketAddr,
    client_id: String,
    router_id: String,
    clean_session: bool,
    keep_alive: Option<Duration>,
    codec: Codec,
    shared: Arc<Shared>,
    link_tx: LinkTx,
    link_rx: LinkRx,
    read_half: Reader,
    writer: mpsc::Sender<BytesMut>,
    writer_task: tokio::task::JoinHandle<()>,
    inbuf: BytesMut,
    will: Option<(LastWill, Option<LastWillProperties>)>,
    /// Filters this client holds, as stored in the router.
    filters: HashSet<String>,
    /// SUBACK codes answered by the front end, spliced into the router's SUBACK.
    suback_patches: HashMap<u16, Vec<(usize, SubscribeReasonCode)>>,
    /// For each UNSUBSCRIBE forwarded, whether each original filter existed.
    unsuback_patches: HashMap<u16, Vec<bool>>,
    /// QoS 1 publishes sent to the client, oldest first, until their
    /// acknowledgement has been passed to the router (see [`Slot`]).
    ledger: VecDeque<Slot>,
    /// Retained messages to send once the router's SUBACK for a packet id
    /// is written: (router-form filter, subscription QoS).
    pending_retained: HashMap<u16, Vec<(String, u8)>>,
    /// Next packet id for publishes the front end sends itself (retained
    /// messages); above the router's range of 1..=100.
    next_local_pkid: u16,
    /// Reading positions of this client's subscriptions, for flow control.
    consumers: Vec<Subscription>,
    /// Woken when flow control disconnects this client as too slow.
    kick: Arc<Notify>,
    /// Who logged in; `None` when the broker runs without an auth file.
    principal: Option<Principal>,
    /// QoS 2 publishes refused by the ACL whose PUBREL the front end answers.
    denied_qos2: HashSet<u16>,
    /// Client packets waiting behind a publish that flow control holds,
    /// in order. Acknowledgements never wait here: a client that publishes
    /// to its own subscription must be able to catch up while it waits.
    held: VecDeque<Packet>,
    /// Resolves when the publish at the front of `held` may go.
    admission: Option<Admission>,
    /// Topic and payload bytes in `held`.
    held_bytes: usize,
    /// Largest packet the client accepts (MQTT 5 Maximum Packet Size).
    client_max_packet: usize,
    /// QoS 1 publishes the client may hold unacknowledged (MQTT 5 Receive
    /// Maximum; the router's own window is 100).
    receive_max: usize,
    /// QoS 1 publishes sent to the client and not yet acknowledged.
    at_client: usize,
    /// Encoded QoS 1 publishes waiting for room in the client's window.
    window: VecDeque<BytesMut>,
    /// Router-form filters subscribed with MQTT 5 No Local.
    nolocal_filters: HashSet<String>,
}

type Admission = std::pin::Pin<Box<dyn Future<Output = ()> + Send + Sync>>;

/// Bytes of held publishes before the socket stops being read (then TCP
/// pushes back). Generous, because the client's acknowledgements for what
/// it receives come behind its publishes on the same socket: a client that
/// floods its own subscription needs them read to catch up.
const MAX_HELD_BYTES: usize = 8 * 1024 * 1024;

fn held_size(packet: &Packet) -> usize {
    match packet {
        Packet::Publish(p, _) => p.topic.len() + p.payload.len(),
        _ => 64,
    }
}

/// Waits for the admission in progress, or forever if there is none.
async fn admitted(admission: &mut Option<Admission>) {
    match admission {
        Some(fut) => fut.await,
        None => std::future::pending().await,
    }
}

/// One subscription as flow control sees it.
struct Subscription {
    /// Router-form filter, `$share/<group>/` included.
    path: String,
    consumer: Arc<Consumer>,
}

/// Marker on QoS 0 publishes so the front end can deliver them at QoS 0:
/// rumqttd delivers at the subscription's QoS, not min(publish, subscription).
const QOS0_MARK: (&str, &str) = ("axion-qos", "0");

/// Packet ids the front end uses for its own QoS 1 publishes.
const LOCAL_PKIDS: std::ops::RangeInclusive<u16> = 1000..=u16::MAX;

/// One QoS 1 publish sent to the client. rumqttd disconnects a link that
/// acknowledges out of order, while MQTT lets clients acknowledge in any
/// order: the ledger releases acknowledgements to the router in sending
/// order. Local slots (retained messages sent by the front end) and QoS 0
/// deliveries are never released to the router / are released at once.
#[derive(Debug)]
struct Slot {
    pkid: u16,
    local: bool,
    acked: bool,
}

async fn write_once(stream: &mut Writer, codec: &Codec, packet: Packet) {
    let mut out = BytesMut::new();
    if codec.write(packet, &mut out).is_ok() {
        let _ = stream.write_all(&out).await;
        let _ = stream.flush().await;
    }
}

/// A CONNACK refusal (v4 code for 3.1.1 clients, v5 reason otherwise).
fn refusal(codec: &Codec, v4: ConnectReturnCode, v5: ConnectReturnCode, reason: &str) -> Packet {
    if codec.is_v5() {
        let props = ConnAckProperties {
            reason_string: Some(reason.to_string()),
            ..Default::default()
        };
        Packet::ConnAck(
            ConnAck {
                session_present: false,
                code: v5,
            },
            Some(props),
        )
    } else {
        Packet::ConnAck(
            ConnAck {
                session_present: false,
                code: v4,
            },
            None,
        )
    }
}

/// Reads and vets the CONNECT, registers with the router and answers CONNACK.
async fn handshake(
    mut reader: Reader,
    mut stream: Writer,
    peer: SocketAddr,
    shared: &Arc<Shared>,
) -> Option<Session> {
    let max = shared.config.max_packet_size;
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = Instant::now() + shared.config.connect_timeout;
    let (byte1, len) = loop {
        match codec::frame(&buf, max) {
            Frame::Complete { byte1, len, .. } => break (byte1, len),
            Frame::TooLarge { remaining } => {
                // The level is readable if the CONNECT header already arrived.
                if let Some(codec) = codec::connect_level(&buf).and_then(Codec::for_level) {
                    let p = refusal(
                        &codec,
                        ConnectReturnCode::ServiceUnavailable,
                        ConnectReturnCode::PacketTooLarge,
                        "CONNECT exceeds the maximum packet size",
                    );
                    write_once(&mut stream, &codec, p).await;
                }
                warn!(%peer, remaining, max, "refused oversize CONNECT");
                return None;
            }
            Frame::Malformed => {
                debug!(%peer, "malformed first packet");
                return None;
            }
            Frame::Incomplete => {}
        }
        match tokio::time::timeout_at(deadline, reader.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(_)) => {}
            Err(_) => {
                debug!(%peer, "no CONNECT within the connect timeout");
                return None;
            }
        }
    };
    if byte1 >> 4 != 1 {
        debug!(%peer, byte1, "first packet is not CONNECT");
        return None;
    }
    let Some(mut codec) = codec::connect_level(&buf[..len]).and_then(Codec::for_level) else {
        // 3.1.1's answer to an unsupported level (MQTT-3.1.2-2).
        let p = Packet::ConnAck(
            ConnAck {
                session_present: false,
                code: ConnectReturnCode::RefusedProtocolVersion,
            },
            None,
        );
        write_once(&mut stream, &Codec::V4(rumqttd::protocol::v4::V4), p).await;
        debug!(%peer, "unsupported protocol level");
        return None;
    };
    if byte1 & 0x0f != 0 {
        debug!(%peer, "CONNECT with reserved flags set");
        return None;
    }
    // Malformed connect flags: close without CONNACK (MQTT-3.2.2-6).
    let level = if codec.is_v5() { 5 } else { 4 };
    match codec::connect_flags(&buf[..len]).map(|f| codec::check_connect_flags(f, level)) {
        Some(Ok(())) => {}
        Some(Err(why)) => {
            debug!(%peer, why, "malformed CONNECT flags");
            return None;
        }
        None => return None,
    }
    let (connect, props, will, will_props, login) = match codec.read(&mut buf, max) {
        Ok(Packet::Connect(connect, props, will, will_props, login)) => {
            (connect, props, will, will_props, login)
        }
        Ok(_) => return None,
        Err(err) => {
            let p = refusal(
                &codec,
                ConnectReturnCode::RefusedProtocolVersion,
                ConnectReturnCode::MalformedPacket,
                "malformed CONNECT",
            );
            write_once(&mut stream, &codec, p).await;
            debug!(%peer, %err, "malformed CONNECT");
            return None;
        }
    };
    let Connect {
        keep_alive,
        client_id,
        clean_session,
    } = connect;
    // MQTT-1.5.4-2: no U+0000 in UTF-8 strings.
    if client_id.contains('\0') || login.as_ref().is_some_and(|l| l.username.contains('\0')) {
        debug!(%peer, "NUL in the client id or user name");
        return None;
    }
    // MQTT-3.1.2-24 (v5): the client's Maximum Packet Size.
    let client_max_packet = props
        .as_ref()
        .and_then(|p| p.max_packet_size)
        .map_or(usize::MAX, |m| m as usize);
    let receive_max = props
        .as_ref()
        .and_then(|p| p.receive_maximum)
        .map_or(usize::from(u16::MAX), usize::from);

    if shared.sessions.load(Ordering::Relaxed) > shared.config.max_connections {
        shared.refused.fetch_add(1, Ordering::Relaxed);
        warn!(%peer, client_id, max = shared.config.max_connections, "connection limit reached; refused with CONNACK");
        let p = refusal(
            &codec,
            ConnectReturnCode::ServiceUnavailable,
            ConnectReturnCode::ServerBusy,
            "connection limit reached",
        );
        write_once(&mut stream, &codec, p).await;
        return None;
    }
    if client_id.len() > names::MAX_CLIENT_ID || (client_id.is_empty() && !clean_session) {
        let p = refusal(
            &codec,
            ConnectReturnCode::ClientIdentifierNotValid,
            ConnectReturnCode::ClientIdentifierNotValid,
            "client id is too long, or empty with a persistent session",
        );
        write_once(&mut stream, &codec, p).await;
        info!(%peer, len = client_id.len(), "refused client id");
        return None;
    }
    let assigned = client_id.is_empty();
    let client_id = if assigned {
        format!("axion-{}", uuid::Uuid::new_v4().simple())
    } else {
        client_id
    };
    let principal = match &shared.config.auth {
        None => None,
        Some(auth) => {
            let auth = auth.clone();
            let (user, pass) = match login {
                Some(l) => (Some(l.username), Some(l.password)),
                None => (None, None),
            };
            let user_for_log = user.clone();
            // argon2 takes milliseconds of CPU: keep it off the async threads.
            let checked = tokio::task::spawn_blocking(move || {
                auth.login(user.as_deref(), pass.as_deref().map(str::as_bytes))
            })
            .await;
            match checked {
                Ok(Ok(principal)) => Some(principal),
                Ok(Err(why)) => {
                    if let Some(auth) = &shared.config.auth {
                        auth.audit.refused_connects.fetch_add(1, Ordering::Relaxed);
                    }
                    warn!(%peer, client_id, user = user_for_log.as_deref().unwrap_or(""), reason = why.as_str(), "connect refused");
                    let (v4, v5) = match why {
                        LoginError::BadCredentials => (
                            ConnectReturnCode::BadUserNamePassword,
                            ConnectReturnCode::BadUserNamePassword,
                        ),
                        LoginError::NotAuthorized => (
                            ConnectReturnCode::NotAuthorized,
                            ConnectReturnCode::NotAuthorized,
                        ),
                    };
                    write_once(&mut stream, &codec, refusal(&codec, v4, v5, why.as_str())).await;
                    return None;
                }
                Err(err) => {
                    warn!(%peer, %err, "login check failed");
                    return None;
                }
            }
        }
    };
    if let (Some(auth), Some(principal), Some(w)) = (&shared.config.auth, &principal, &will) {
        // A will is a publish made later on the client's behalf: same rules.
        let topic = String::from_utf8_lossy(&w.topic);
        if let Err(why) = auth.may_publish(principal, &client_id, &topic) {
            auth.audit.refused_connects.fetch_add(1, Ordering::Relaxed);
            warn!(%peer, client_id, user = principal.user.as_deref().unwrap_or(""), %topic, reason = why.as_str(), "connect refused: will topic denied");
            let p = refusal(
                &codec,
                ConnectReturnCode::NotAuthorized,
                ConnectReturnCode::NotAuthorized,
                "will topic not allowed",
            );
            write_once(&mut stream, &codec, p).await;
            return None;
        }
    }
    let will = match will {
        Some(mut w) => {
            if names::check_topic(&w.topic).is_err() || w.topic.is_empty() {
                let p = refusal(
                    &codec,
                    ConnectReturnCode::RefusedProtocolVersion,
                    ConnectReturnCode::TopicNameInvalid,
                    "invalid will topic",
                );
                write_once(&mut stream, &codec, p).await;
                return None;
            }
            w.topic = names::escape_topic(w.topic);
            Some((w, will_props))
        }
        None => None,
    };

    let router_id = names::router_client_id(&client_id);
    let link = {
        let shared = shared.clone();
        let router_id = router_id.clone();
        tokio::task::spawn_blocking(move || shared.router.connect(&router_id, clean_session)).await
    };
    let (link_tx, link_rx, connack) = match link {
        Ok(Ok(link)) => link,
        other => {
            warn!(%peer, client_id, error = ?other.err().map(|e| e.to_string()), router_alive = shared.router.is_alive(), "router refused the link");
            let p = refusal(
                &codec,
                ConnectReturnCode::ServiceUnavailable,
                ConnectReturnCode::ServerUnavailable,
                "broker unavailable",
            );
            write_once(&mut stream, &codec, p).await;
            return None;
        }
    };
    let connack = match Option::<Packet>::from(connack) {
        Some(Packet::ConnAck(ack, props)) => {
            let mut props = props.unwrap_or_default();
            props.max_packet_size = u32::try_from(max).ok();
            if assigned {
                props.assigned_client_identifier = Some(client_id.clone());
            }
            Packet::ConnAck(ack, Some(props))
        }
        _ => return None,
    };
    let mut out = BytesMut::new();
    if codec.write(connack, &mut out).is_err() || stream.write_all(&out).await.is_err() {
        return None;
    }
    debug!(%peer, client_id, v5 = codec.is_v5(), clean_session, keep_alive, "client connected");

    let read_half = reader;
    let (writer, rx) = mpsc::channel(WRITE_QUEUE);
    let writer_task = tokio::spawn(write_loop(stream, rx, peer));
    Some(Session {
        peer,
        client_id,
        router_id,
        clean_session,
        client_max_packet,
        receive_max,
        at_client: 0,
        window: VecDeque::new(),
        nolocal_filters: HashSet::new(),
        // MQTT-3.1.2-24: the server allows one and a half times the keep-alive.
        keep_alive: (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
        codec,
        shared: shared.clone(),
        link_tx,
        link_rx,
        read_half,
        writer,
        writer_task,
        inbuf: buf,
        will,
        filters: HashSet::new(),
        suback_patches: HashMap::new(),
        unsuback_patches: HashMap::new(),
        ledger: VecDeque::new(),
        pending_retained: HashMap::new(),
        next_local_pkid: *LOCAL_PKIDS.start(),
        consumers: Vec::new(),
        kick: Arc::new(Notify::new()),
        principal,
        denied_qos2: HashSet::new(),
        held: VecDeque::new(),
        admission: None,
        held_bytes: 0,
    })
}

async fn write_loop(mut half: Writer, mut rx: mpsc::Receiver<BytesMut>, peer: SocketAddr) {
    while let Some(mut buf) = rx.recv().await {
        // Coalesce whatever else is already queued into one write.
        while let Ok(more) = rx.try_recv() {
            buf.extend_from_slice(&more);
        }
        if let Err(err) = half.write_all(&buf).await {
            debug!(%peer, %err, "write to client failed");
            return;
        }
    }
    let _ = half.shutdown().await;
}

/// Polls a future once; `None` if it is not ready.
async fn now_or_never<F: Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
        Poll::Ready(v) => Poll::Ready(Some(v)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

fn make_publish(topic: Bytes, payload: Bytes, qos: QoS, retain: bool, pkid: u16) -> Publish {
    // `Publish`'s qos and pkid are crate-private in rumqttd; its own
    // serialization format is the public way to set them.
    let mut b = BytesMut::with_capacity(5 + topic.len() + payload.len());
    b.put_u8(0x30 | u8::from(retain) | ((qos as u8) << 1));
    b.put_u16(pkid);
    b.put_u16(topic.len() as u16);
    b.extend_from_slice(&topic);
    b.extend_from_slice(&payload);
    Publish::deserialize(b.freeze())
}

impl Session {
    async fn serve(&mut self, mut shutdown: watch::Receiver<bool>) -> Ending {
        let mut last_rx = Instant::now();
        let far = Duration::from_secs(86_400 * 365);
        loop {
            let deadline = last_rx + self.keep_alive.unwrap_or(far);
            tokio::select! {
                _ = shutdown.changed() => return Ending::Shutdown,
                _ = self.kick.notified() => {
                    info!(client_id = self.client_id, "disconnected: too slow to read what it subscribed to");
                    self.disconnect_client(DisconnectReasonCode::QuotaExceeded).await;
                    return Ending::Lost;
                }
                _ = admitted(&mut self.admission) => {
                    self.admission = None;
                    // The front publish was counted by `admit`: it goes now.
                    let mut batch: Vec<Packet> = self.pop_held().into_iter().collect();
                    self.pump_held(&mut batch);
                    if self.forward(batch).await.is_err() {
                        return Ending::Kicked;
                    }
                }
                read = self.read_half.read_buf(&mut self.inbuf), if self.held_bytes < MAX_HELD_BYTES => {
                    match read {
                        Ok(0) => return Ending::Lost,
                        Ok(_) => {
                            last_rx = Instant::now();
                            if let Some(ending) = self.incoming().await {
                                return ending;
                            }
                        }
                        Err(err) => {
                            debug!(peer = %self.peer, client_id = self.client_id, %err, "read failed");
                            return Ending::Lost;
                        }
                    }
                }
                notification = self.link_rx.next() => {
                    match notification {
                        Ok(Some(n)) => {
                            if let Some(ending) = self.outgoing(n).await {
                                return ending;
                            }
                        }
                        Ok(None) => {}
                        Err(_) => return Ending::Kicked,
                    }
                }
                _ = sleep_until(deadline) => {
                    info!(client_id = self.client_id, "keep-alive expired");
                    return Ending::Lost;
                }
            }
        }
    }

    /// Sends `bytes` to the writer task; false if the client is gone.
    async fn send_bytes(&self, bytes: BytesMut) -> bool {
        bytes.is_empty() || self.writer.send(bytes).await.is_ok()
    }

    async fn disconnect_client(&self, reason: DisconnectReasonCode) {
        if self.codec.is_v5() {
            let mut out = BytesMut::new();
            if self
                .codec
                .write(
                    Packet::Disconnect(
                        Disconnect {
                            reason_code: reason,
                        },
                        None,
                    ),
                    &mut out,
                )
                .is_ok()
            {
                self.send_bytes(out).await;
            }
        }
    }

    /// Decodes every complete packet in the input buffer and acts on it.
    async fn incoming(&mut self) -> Option<Ending> {
        let max = self.shared.config.max_packet_size;
        let mut to_router: Vec<Packet> = Vec::new();
        let mut reply = BytesMut::new();
        let mut ending = None;
        loop {
            let byte1 = match codec::frame(&self.inbuf, max) {
                Frame::Incomplete => break,
                Frame::Complete { byte1, .. } => byte1,
                Frame::TooLarge { remaining } => {
                    warn!(
                        client_id = self.client_id,
                        remaining, max, "packet exceeds the maximum size; disconnecting"
                    );
                    self.disconnect_client(DisconnectReasonCode::PacketTooLarge)
                        .await;
                    ending = Some(Ending::Lost);
                    break;
                }
                Frame::Malformed => {
                    ending = Some(
                        self.violation(
                            "malformed remaining length",
                            DisconnectReasonCode::MalformedPacket,
                        )
                        .await,
                    );
                    break;
                }
            };
            if let Err(why) = check_flags(byte1) {
                ending = Some(
                    self.violation(why, DisconnectReasonCode::MalformedPacket)
                        .await,
                );
                break;
            }
            let packet = match self.codec.read(&mut self.inbuf, max) {
                Ok(p) => p,
                Err(err) => {
                    let why = format!("undecodable packet: {err}");
                    ending = Some(
                        self.violation(&why, DisconnectReasonCode::MalformedPacket)
                            .await,
                    );
                    break;
                }
            };
            match self.inbound(packet, byte1, &mut to_router, &mut reply) {
                Ok(None) => {}
                Ok(Some(end)) => {
                    ending = Some(end);
                    break;
                }
                Err((why, code)) => {
                    ending = Some(self.violation(&why, code).await);
                    break;
                }
            }
        }
        // Flow control: a publish whose subscribers have no room in the
        // router's log waits in `held`, and what follows it waits behind it;
        // acknowledgements go at once.
        let mut batch = Vec::with_capacity(to_router.len());
        for packet in to_router {
            let is_ack = matches!(
                packet,
                Packet::PubAck(..) | Packet::PubRec(..) | Packet::PubRel(..) | Packet::PubComp(..)
            );
            if is_ack {
                batch.push(packet);
            } else {
                self.held_bytes += held_size(&packet);
                self.held.push_back(packet);
            }
        }
        self.pump_held(&mut batch);
        let to_router = batch;
        if !to_router.is_empty() && self.forward(to_router).await.is_err() {
            return Some(Ending::Kicked);
        }
        if !self.send_bytes(reply).await {
            return Some(Ending::Lost);
        }
        ending
    }

    /// Moves held packets into `batch` until a publish must wait; then
    /// starts waiting for its admission.
    fn pump_held(&mut self, batch: &mut Vec<Packet>) {
        if self.admission.is_some() {
            return;
        }
        while let Some(packet) = self.held.front() {
            if let Packet::Publish(publish, _) = packet {
                let size = (publish.topic.len() + publish.payload.len()) as u64;
                if !self.shared.flow.try_admit(&publish.topic, size) {
                    let (shared, topic) = (self.shared.clone(), publish.topic.clone());
                    self.admission =
                        Some(Box::pin(
                            async move { shared.flow.admit(&topic, size).await },
                        ));
                    return;
                }
            }
            if let Some(packet) = self.pop_held() {
                batch.push(packet);
            }
        }
    }

    fn pop_held(&mut self) -> Option<Packet> {
        let packet = self.held.pop_front()?;
        self.held_bytes -= held_size(&packet);
        Some(packet)
    }

    async fn violation(&self, why: &str, code: DisconnectReasonCode) -> Ending {
        info!(client_id = self.client_id, peer = %self.peer, why, "protocol violation; closing the connection");
        self.disconnect_client(code).await;
        Ending::Lost
    }

    /// Hands packets to the router: all but the last go straight into the
    /// link's buffer, the last one wakes the router once for the batch.
    async fn forward(&mut self, mut packets: Vec<Packet>) -> Result<(), ()> {
        let Some(last) = packets.pop() else {
            return Ok(());
        };
        {
            let mut buffer = self.link_tx.buffer();
            buffer.extend(packets);
        }
        self.link_tx.send(last).await.map(|_| ()).map_err(|_| ())
    }

    /// Acts on one client packet. `Err` is a protocol violation.
    fn inbound(
        &mut self,
        packet: Packet,
        byte1: u8,
        to_router: &mut Vec<Packet>,
        reply: &mut BytesMut,
    ) -> Result<Option<Ending>, (String, DisconnectReasonCode)> {
        match packet {
            Packet::Publish(mut publish, props) => {
                let alias = props.as_ref().and_then(|p| p.topic_alias).is_some();
                if publish.topic.is_empty() && !alias {
                    return Err((
                        "empty topic name".into(),
                        DisconnectReasonCode::ProtocolError,
                    ));
                }
                if let Err(e) = names::check_topic(&publish.topic) {
                    return Err((e.to_string(), DisconnectReasonCode::TopicNameInvalid));
                }
                let qos = (byte1 >> 1) & 0x03;
                if !self.may_publish(&publish.topic) {
                    self.refuse_publish(&publish, qos, reply);
                    return Ok(None);
                }
                publish.topic = names::escape_topic(publish.topic);
                let props = if self.shared.any_nolocal.load(Ordering::Relaxed) {
                    mark_origin(props, &self.router_id)
                } else {
                    props
                };
                to_router.push(self.shared.prepare_publish(publish, qos, props));
            }
            Packet::Subscribe(mut subscribe, props) => {
                let mut local: Vec<(usize, SubscribeReasonCode)> = Vec::new();
                let mut forwarded = Vec::new();
                for (i, mut filter) in subscribe.filters.drain(..).enumerate() {
                    if let Err(e) = names::check_filter(&filter.path) {
                        return Err((e.to_string(), DisconnectReasonCode::TopicFilterInvalid));
                    }
                    if !self.may_subscribe(&filter.path) {
                        local.push((i, self.sub_failure(SubscribeReasonCode::NotAuthorized)));
                        continue;
                    }
                    let (share, rest) = names::split_share(&filter.path);
                    if rest.starts_with('$') || (share.is_empty() && filter.path.starts_with('$')) {
                        // rumqttd disconnects on `$SYS/#`; refusing the one filter is what clients expect.
                        local.push((i, self.sub_failure(SubscribeReasonCode::NotAuthorized)));
                        continue;
                    }
                    let path = names::escape_filter(&filter.path);
                    if !self.shared.admit_filter(&path) {
                        warn!(
                            client_id = self.client_id,
                            filter = filter.path,
                            "filter limit reached; subscription refused"
                        );
                        local.push((i, self.sub_failure(SubscribeReasonCode::QuotaExceeded)));
                        continue;
                    }
                    if let Some(group) = names::share_group(&filter.path) {
                        self.shared.join_group(group, &self.router_id);
                        if !self.clean_session {
                            // rumqttd panics ("group must exists") when the
                            // last member of a shared group leaves a
                            // persistent session with QoS 1 in flight, a
                            // race no front end can close. Granting QoS 0
                            // (legal: the SUBACK says so) leaves nothing in
                            // flight. Axion's queues do not rely on it: the
                            // owner redelivers what a worker never acked.
                            filter.qos = QoS::AtMostOnce;
                        }
                    }
                    if filter.nolocal && share.is_empty() {
                        self.shared.any_nolocal.store(true, Ordering::Relaxed);
                        self.nolocal_filters.insert(path.clone());
                    }
                    let new = self.filters.insert(path.clone());
                    if new {
                        let (_, rest) = names::split_share(&path);
                        let group = names::share_group(&path);
                        let consumer = self.shared.flow.subscribe(
                            rest,
                            group,
                            &self.client_id,
                            self.kick.clone(),
                        );
                        self.consumers.push(Subscription {
                            path: path.clone(),
                            consumer,
                        });
                    }
                    let send_retained = share.is_empty()
                        && match filter.retain_forward_rule {
                            RetainForwardRule::OnEverySubscribe => true,
                            RetainForwardRule::OnNewSubscribe => new,
                            RetainForwardRule::Never => false,
                        };
                    if send_retained {
                        self.pending_retained
                            .entry(subscribe.pkid)
                            .or_default()
                            .push((path.clone(), filter.qos as u8));
                    }
                    filter.path = path;
                    forwarded.push(filter);
                }
                if forwarded.is_empty() {
                    let codes = local.into_iter().map(|(_, c)| c).collect();
                    self.encode(
                        Packet::SubAck(
                            SubAck {
                                pkid: subscribe.pkid,
                                return_codes: codes,
                            },
                            None,
                        ),
                        reply,
                    );
                } else {
                    if !local.is_empty() {
                        self.suback_patches.insert(subscribe.pkid, local);
                    }
                    subscribe.filters = forwarded;
                    to_router.push(Packet::Subscribe(subscribe, props));
                }
            }
            Packet::Unsubscribe(unsubscribe, props) => {
                if unsubscribe.filters.is_empty() {
                    return Err((
                        "UNSUBSCRIBE without topic filters".into(),
                        DisconnectReasonCode::ProtocolError,
                    ));
                }
                let mut known = Vec::with_capacity(unsubscribe.filters.len());
                let mut forwarded = Vec::new();
                for filter in &unsubscribe.filters {
                    if filter.is_empty() || filter.contains('\0') {
                        return Err((
                            format!("invalid filter {filter:?} in UNSUBSCRIBE"),
                            DisconnectReasonCode::TopicFilterInvalid,
                        ));
                    }
                    let path = names::escape_filter(filter);
                    let exists = self.filters.remove(&path);
                    if exists {
                        self.drop_consumers(|p| p == path);
                    }
                    known.push(exists);
                    if exists {
                        forwarded.push(path);
                    }
                }
                if !forwarded.is_empty() {
                    // rumqttd drops the client from every shared group on any unsubscribe.
                    self.shared.leave_groups(&self.router_id);
                }
                if forwarded.is_empty() {
                    let reasons = known
                        .iter()
                        .map(|_| UnsubAckReason::NoSubscriptionExisted)
                        .collect();
                    self.encode(
                        Packet::UnsubAck(
                            UnsubAck {
                                pkid: unsubscribe.pkid,
                                reasons,
                            },
                            None,
                        ),
                        reply,
                    );
                } else {
                    self.unsuback_patches.insert(unsubscribe.pkid, known);
                    to_router.push(Packet::Unsubscribe(
                        Unsubscribe {
                            pkid: unsubscribe.pkid,
                            filters: forwarded,
                        },
                        props,
                    ));
                }
            }
            Packet::PingReq(_) => self.encode(Packet::PingResp(PingResp), reply),
            Packet::Disconnect(disconnect, _) => {
                let with_will =
                    disconnect.reason_code == DisconnectReasonCode::DisconnectWithWillMessage;
                return Ok(Some(if with_will {
                    Ending::CleanWithWill
                } else {
                    Ending::Clean
                }));
            }
            // rumqttd only matches a PUBREL without properties.
            Packet::PubRel(pubrel, _) => {
                if self.denied_qos2.remove(&pubrel.pkid) {
                    self.encode(
                        Packet::PubComp(
                            PubComp {
                                pkid: pubrel.pkid,
                                reason: PubCompReason::Success,
                            },
                            None,
                        ),
                        reply,
                    );
                } else {
                    to_router.push(Packet::PubRel(pubrel, None));
                }
            }
            Packet::PubAck(ack, props) => {
                if !self.acked(ack.pkid, to_router, reply) {
                    to_router.push(Packet::PubAck(ack, props));
                }
            }
            p @ (Packet::PubRec(..) | Packet::PubComp(..)) => to_router.push(p),
            Packet::Connect(..) => {
                return Err(("second CONNECT".into(), DisconnectReasonCode::ProtocolError))
            }
            other => {
                return Err((
                    format!("client sent a server-only packet {:?}", packet_name(&other)),
                    DisconnectReasonCode::ProtocolError,
                ));
            }
        }
        Ok(None)
    }

    /// Marks `pkid` acknowledged and releases, in order, every
    /// acknowledgement the router may now have. False if `pkid` is not in
    /// the ledger (the caller passes the ack on unchanged).
    fn acked(&mut self, pkid: u16, to_router: &mut Vec<Packet>, reply: &mut BytesMut) -> bool {
        let Some(slot) = self.ledger.iter_mut().find(|s| s.pkid == pkid && !s.acked) else {
            return false;
        };
        slot.acked = true;
        self.release_acks(to_router);
        self.at_client = self.at_client.saturating_sub(1);
        while self.at_client < self.receive_max {
            let Some(waiting) = self.window.pop_front() else {
                break;
            };
            reply.extend_from_slice(&waiting);
            self.at_client += 1;
        }
        true
    }

    /// True if every subscription of this client matching the router-form
    /// `topic` asked for No Local (the router delivers one copy per
    /// matching subscription and does not say which).
    fn only_nolocal_match(&self, topic: &Bytes) -> bool {
        if self.nolocal_filters.is_empty() {
            return false;
        }
        let Ok(topic) = std::str::from_utf8(topic) else {
            return false;
        };
        let mut any = false;
        for filter in &self.filters {
            let (share, f) = names::split_share(filter);
            if !share.is_empty() || !rumqttd::protocol::matches(topic, f) {
                continue;
            }
            if !self.nolocal_filters.contains(filter) {
                return false;
            }
            any = true;
        }
        any
    }

    /// Sends the QoS 1 publish encoded at `out[start..]` now, or keeps it
    /// until the client's receive window has room (MQTT-4.9.0-2).
    fn send_qos1(&mut self, out: &mut BytesMut, start: usize) {
        if self.at_client < self.receive_max && self.window.is_empty() {
            self.at_client += 1;
        } else {
            self.window.push_back(out.split_off(start));
        }
    }

    fn release_acks(&mut self, to_router: &mut Vec<Packet>) {
        while self.ledger.front().is_some_and(|s| s.acked) {
            if let Some(slot) = self.ledger.pop_front() {
                if !slot.local {
                    to_router.push(puback(slot.pkid));
                }
            }
        }
    }

    fn local_pkid(&mut self) -> u16 {
        loop {
            let pkid = self.next_local_pkid;
            self.next_local_pkid = if pkid == *LOCAL_PKIDS.end() {
                *LOCAL_PKIDS.start()
            } else {
                pkid + 1
            };
            if !self.ledger.iter().any(|s| s.pkid == pkid) {
                return pkid;
            }
        }
    }

    /// Writes the retained messages for the filters of SUBSCRIBE `pkid`.
    fn deliver_retained(&mut self, pkid: u16, out: &mut BytesMut) {
        let Some(filters) = self.pending_retained.remove(&pkid) else {
            return;
        };
        for (filter, sub_qos) in filters {
            for (topic, retained) in self.shared.retained_matching(&filter) {
                // QoS 2 retained messages go out at QoS 1: the front end
                // keeps no QoS 2 state of its own.
                let qos = retained.qos.min(sub_qos).min(1);
                let (qos, pkid) = if qos == 1 {
                    (QoS::AtLeastOnce, self.local_pkid())
                } else {
                    (QoS::AtMostOnce, 0)
                };
                if pkid != 0 {
                    self.ledger.push_back(Slot {
                        pkid,
                        local: true,
                        acked: false,
                    });
                }
                let publish = make_publish(
                    names::unescape_topic(topic),
                    retained.payload,
                    qos,
                    true,
                    pkid,
                );
                let start = out.len();
                self.encode(Packet::Publish(publish, retained.properties), out);
                if pkid != 0 {
                    self.send_qos1(out, start);
                }
            }
        }
    }

    /// Asks the ACL (if any) about a publish; logs and counts a denial.
    fn may_publish(&self, topic: &Bytes) -> bool {
        let (Some(auth), Some(principal)) = (&self.shared.config.auth, &self.principal) else {
            return true;
        };
        let topic = String::from_utf8_lossy(topic);
        match auth.may_publish(principal, &self.client_id, &topic) {
            Ok(()) => true,
            Err(why) => {
                warn!(client_id = self.client_id, user = principal.user.as_deref().unwrap_or(""), %topic, reason = why.as_str(), "publish denied");
                false
            }
        }
    }

    /// Asks the ACL (if any) about a subscription; logs and counts a denial.
    fn may_subscribe(&self, filter: &str) -> bool {
        let (Some(auth), Some(principal)) = (&self.shared.config.auth, &self.principal) else {
            return true;
        };
        match auth.may_subscribe(principal, &self.client_id, filter) {
            Ok(()) => true,
            Err(why) => {
                warn!(
                    client_id = self.client_id,
                    user = principal.user.as_deref().unwrap_or(""),
                    filter,
                    reason = why.as_str(),
                    "subscription denied"
                );
                false
            }
        }
    }

    /// Answers a denied publish without passing it on: QoS 0 is dropped,
    /// QoS 1 gets PUBACK (0x87 in MQTT 5), QoS 2 PUBREC (0x87 in MQTT 5;
    /// in 3.1.1 the flow completes and the front end answers the PUBREL).
    fn refuse_publish(&mut self, publish: &Publish, qos: u8, reply: &mut BytesMut) {
        // `Publish::pkid` is crate-private; its serialization is public.
        let raw = publish.serialize();
        let pkid = u16::from_be_bytes([raw[1], raw[2]]);
        let v5 = self.codec.is_v5();
        match qos {
            1 => self.encode(
                Packet::PubAck(
                    PubAck {
                        pkid,
                        reason: if v5 {
                            PubAckReason::NotAuthorized
                        } else {
                            PubAckReason::Success
                        },
                    },
                    None,
                ),
                reply,
            ),
            2 => {
                if !v5 {
                    self.denied_qos2.insert(pkid);
                }
                self.encode(
                    Packet::PubRec(
                        PubRec {
                            pkid,
                            reason: if v5 {
                                PubRecReason::NotAuthorized
                            } else {
                                PubRecReason::Success
                            },
                        },
                        None,
                    ),
                    reply,
                );
            }
            _ => {}
        }
    }

    fn sub_failure(&self, v5: SubscribeReasonCode) -> SubscribeReasonCode {
        if self.codec.is_v5() {
            v5
        } else {
            SubscribeReasonCode::Failure
        }
    }

    fn encode(&self, packet: Packet, out: &mut BytesMut) {
        if let Err(err) = self.codec.write(packet, out) {
            warn!(client_id = self.client_id, %err, "could not encode a packet for the client");
        }
    }

    /// Writes one router notification (and any already queued behind it).
    async fn outgoing(&mut self, first: Notification) -> Option<Ending> {
        let mut out = BytesMut::new();
        let mut wake = false;
        let mut release = false;
        let mut delivered = false;
        let mut ending = None;
        let mut next = Some(first);
        let mut budget = 1024;
        while let Some(notification) = next.take() {
            match notification {
                Notification::Forward(forward) => {
                    self.delivered(&forward.publish.topic, &forward.publish.payload);
                    delivered = true;
                    let mut props = forward.properties;
                    let qos0 = take_qos0_mark(&mut props);
                    let own = take_origin_mark(&mut props).is_some_and(|o| o == self.router_id);
                    let not_for_me = own && self.only_nolocal_match(&forward.publish.topic);
                    let mut publish = forward.publish;
                    publish.topic = names::unescape_topic(publish.topic);
                    // Kept only for a QoS 0 publish, which may need
                    // re-encoding at QoS 0 below.
                    let downgrade = qos0.then(|| {
                        (
                            publish.topic.clone(),
                            publish.payload.clone(),
                            publish.retain,
                            props.clone(),
                        )
                    });
                    let start = out.len();
                    self.encode(Packet::Publish(publish, props), &mut out);
                    let oversize = out.len() - start > self.client_max_packet;
                    if oversize {
                        // MQTT-3.1.2-25: discarded as if sent.
                        debug!(
                            client_id = self.client_id,
                            size = out.len() - start,
                            max = self.client_max_packet,
                            "message over the client's maximum packet size discarded"
                        );
                    }
                    let discard = not_for_me || oversize;
                    match outgoing_qos_pkid(&out[start..]) {
                        Some((1, pkid)) => {
                            if discard {
                                out.truncate(start);
                            } else if let Some((topic, payload, retain, props)) = downgrade {
                                // Published at QoS 0: deliver at QoS 0.
                                out.truncate(start);
                                let publish =
                                    make_publish(topic, payload, QoS::AtMostOnce, retain, 0);
                                self.encode(Packet::Publish(publish, props), &mut out);
                            } else {
                                self.send_qos1(&mut out, start);
                            }
                            // Not sent at QoS 1: acknowledge the router's copy ourselves.
                            let acked = qos0 || discard;
                            self.ledger.push_back(Slot {
                                pkid,
                                local: false,
                                acked,
                            });
                            release = release || acked;
                        }
                        _ if discard => out.truncate(start),
                        _ => {}
                    }
                }
                Notification::DeviceAck(ack) => {
                    let packet = self.patch_ack(Packet::from(ack));
                    let suback = match &packet {
                        Packet::SubAck(s, _) => Some(s.pkid),
                        _ => None,
                    };
                    self.encode(packet, &mut out);
                    if let Some(pkid) = suback {
                        self.deliver_retained(pkid, &mut out);
                    }
                }
                Notification::Unschedule => wake = true,
                Notification::Disconnect(disconnect, props) => {
                    self.encode(Packet::Disconnect(disconnect, props), &mut out);
                    ending = Some(Ending::Lost);
                    break;
                }
                _ => {}
            }
            budget -= 1;
            if budget == 0 {
                break;
            }
            next = match now_or_never(self.link_rx.next()).await {
                Some(Ok(Some(n))) => Some(n),
                Some(Err(_)) => {
                    ending = Some(Ending::Kicked);
                    None
                }
                _ => None,
            };
        }
        if !self.send_bytes(out).await {
            return Some(ending.unwrap_or(Ending::Lost));
        }
        if delivered {
            self.shared.flow.progressed();
        }
        if release {
            let mut acks = Vec::new();
            self.release_acks(&mut acks);
            if self.forward(acks).await.is_err() {
                return Some(Ending::Kicked);
            }
        }
        if wake && self.link_rx.wake().await.is_err() {
            return Some(Ending::Kicked);
        }
        ending
    }

    /// Splices the front end's own answers into the router's SUBACK/UNSUBACK.
    fn patch_ack(&mut self, packet: Packet) -> Packet {
        match packet {
            Packet::SubAck(mut suback, props) => {
                if let Some(patches) = self.suback_patches.remove(&suback.pkid) {
                    for (i, code) in patches {
                        let at = i.min(suback.return_codes.len());
                        suback.return_codes.insert(at, code);
                    }
                }
                Packet::SubAck(suback, props)
            }
            Packet::UnsubAck(unsuback, props) => {
                let reasons = match self.unsuback_patches.remove(&unsuback.pkid) {
                    Some(known) => known
                        .into_iter()
                        .map(|k| {
                            if k {
                                UnsubAckReason::Success
                            } else {
                                UnsubAckReason::NoSubscriptionExisted
                            }
                        })
                        .collect(),
                    None => unsuback.reasons,
                };
                Packet::UnsubAck(
                    UnsubAck {
                        pkid: unsuback.pkid,
                        reasons,
                    },
                    props,
                )
            }
            other => other,
        }
    }

    /// Publishes the will if due, detaches from the router and closes.
    async fn finish(mut self, ending: Ending) {
        debug!(client_id = self.client_id, ?ending, "session ended");
        if ending != Ending::Kicked {
            // What the client sent before it left goes out, held or not.
            let mut packets: Vec<Packet> = self.held.drain(..).collect();
            self.admission = None;
            let will_due = matches!(ending, Ending::Lost | Ending::CleanWithWill);
            if let (true, Some((will, props))) = (will_due, self.will.take()) {
                let delay = props.as_ref().and_then(|p| p.delay_interval).unwrap_or(0);
                if delay > 0
                    && !self
                        .wait_will_delay(Duration::from_secs(u64::from(delay)))
                        .await
                {
                    // Taken over by a reconnect during the will delay: no will.
                    self.close().await;
                    return;
                }
                packets.push(self.will_packet(will, props));
            }
            packets.push(Packet::Disconnect(
                Disconnect {
                    reason_code: DisconnectReasonCode::NormalDisconnection,
                },
                None,
            ));
            let _ = self.forward(packets).await;
            if ending == Ending::Shutdown {
                self.disconnect_client(DisconnectReasonCode::ServerShuttingDown)
                    .await;
            }
        }
        self.drop_consumers(|_| true);
        self.shared.leave_groups(&self.router_id);
        self.close().await;
    }

    /// Counts a forwarded message against every subscription it matches.
    fn delivered(&self, topic: &Bytes, payload: &Bytes) {
        let size = (topic.len() + payload.len()) as u64;
        let Ok(topic) = std::str::from_utf8(topic) else {
            return;
        };
        for sub in &self.consumers {
            let (_, filter) = names::split_share(&sub.path);
            if rumqttd::protocol::matches(topic, filter) {
                sub.consumer.delivered(size);
            }
        }
    }

    /// Stops flow control for the subscriptions whose path satisfies `which`.
    fn drop_consumers(&mut self, which: impl Fn(&str) -> bool) {
        let shared = self.shared.clone();
        self.consumers.retain(|sub| {
            if !which(&sub.path) {
                return true;
            }
            let (_, filter) = names::split_share(&sub.path);
            let last = match names::share_group(&sub.path) {
                Some(group) => shared.sole_member(group, &self.router_id),
                None => true,
            };
            shared.flow.unsubscribe(filter, &sub.consumer, last);
            false
        });
    }

    fn will_packet(&self, will: LastWill, props: Option<LastWillProperties>) -> Packet {
        let qos = if will.qos == QoS::AtMostOnce {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let pkid = if qos == QoS::AtMostOnce { 0 } else { u16::MAX };
        let publish = make_publish(will.topic, will.message, qos, will.retain, pkid);
        let props = props.map(|p| PublishProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            topic_alias: None,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user_properties,
            subscription_identifiers: Vec::new(),
            content_type: p.content_type,
        });
        self.shared.prepare_publish(publish, qos as u8, props)
    }

    /// Waits out a will delay; false if the link was taken over meanwhile.
    async fn wait_will_delay(&mut self, delay: Duration) -> bool {
        let deadline = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = sleep_until(deadline) => return true,
                n = self.link_rx.next() => match n {
                    Err(_) => return false,
                    Ok(Some(Notification::Unschedule)) => { let _ = self.link_rx.wake().await; }
                    Ok(_) => {}
                }
            }
        }
    }

    async fn close(self) {
        drop(self.writer);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.writer_task).await;
    }
}

/// QoS and packet id of an encoded PUBLISH with QoS > 0.
fn outgoing_qos_pkid(packet: &[u8]) -> Option<(u8, u16)> {
    let byte1 = *packet.first()?;
    let qos = (byte1 >> 1) & 0x03;
    if byte1 >> 4 != 3 || qos == 0 {
        return None;
    }
    let mut i = 1;
    while *packet.get(i)? & 0x80 != 0 {
        i += 1;
    }
    i += 1;
    let topic_len = usize::from(u16::from_be_bytes([*packet.get(i)?, *packet.get(i + 1)?]));
    let at = i + 2 + topic_len;
    Some((
        qos,
        u16::from_be_bytes([*packet.get(at)?, *packet.get(at + 1)?]),
    ))
}

fn puback(pkid: u16) -> Packet {
    Packet::PubAck(
        PubAck {
            pkid,
            reason: PubAckReason::Success,
        },
        None,
    )
}

/// Removes the QoS 0 marker; true if it was there.
fn take_qos0_mark(props: &mut Option<PublishProperties>) -> bool {
    let Some(p) = props.as_mut() else {
        return false;
    };
    let marked = p
        .user_properties
        .last()
        .is_some_and(|(k, v)| k == QOS0_MARK.0 && v == QOS0_MARK.1);
    if marked {
        p.user_properties.pop();
        if *p == PublishProperties::default() {
            *props = None;
        }
    }
    marked
}

/// User property naming the publishing client, for No Local.
pub(crate) const ORIGIN_MARK: &str = "axion-from";

fn mark_origin(props: Option<PublishProperties>, router_id: &str) -> Option<PublishProperties> {
    let mut p = props.unwrap_or_default();
    p.user_properties
        .push((ORIGIN_MARK.to_string(), router_id.to_string()));
    Some(p)
}

/// Removes the origin marker (it sits last once the QoS 0 mark is gone).
fn take_origin_mark(props: &mut Option<PublishProperties>) -> Option<String> {
    let p = props.as_mut()?;
    if p.user_properties
        .last()
        .is_some_and(|(k, _)| k == ORIGIN_MARK)
    {
        let origin = p.user_properties.pop().map(|(_, v)| v);
        if *p == PublishProperties::default() {
            *props = None;
        }
        return origin;
    }
    None
}

/// Marks a QoS 0 publish (see [`QOS0_MARK`]).
pub(crate) fn mark_qos0(props: Option<PublishProperties>) -> Option<PublishProperties> {
    let mut p = props.unwrap_or_default();
    p.user_properties
        .push((QOS0_MARK.0.to_string(), QOS0_MARK.1.to_string()));
    Some(p)
}

/// Fixed-header flags the spec fixes per packet type (MQTT-2.2.2-2).
fn check_flags(byte1: u8) -> Result<(), &'static str> {
    let flags = byte1 & 0x0f;
    match byte1 >> 4 {
        3 => {
            let qos = (flags >> 1) & 0x03;
            if qos == 3 {
                return Err("PUBLISH with QoS 3");
            }
            if qos == 0 && flags & 0x08 != 0 {
                return Err("PUBLISH QoS 0 with DUP set");
            }
            Ok(())
        }
        6 | 8 | 10 => (flags == 0x02)
            .then_some(())
            .ok_or("reserved flags must be 0010"),
        0 | 15 => Err("reserved packet type"),
        _ => (flags == 0).then_some(()).ok_or("reserved flags must be 0"),
    }
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::ConnAck(..) => "CONNACK",
        Packet::SubAck(..) => "SUBACK",
        Packet::UnsubAck(..) => "UNSUBACK",
        Packet::PingResp(..) => "PINGRESP",
        _ => "other",
    }
}
