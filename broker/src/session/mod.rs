//! One client connection: MQTT spoken by Axion, routing done by rumqttd.
//!
//! The session reads the CONNECT, refuses what must be refused with a
//! proper CONNACK, registers a link with the router, then shuttles packets
//! both ways. Everything rumqttd would choke on is answered here: keep-alive
//! 0, unsafe client ids and topics, oversize or malformed packets, unknown
//! unsubscribes, `$` filters, and the will (which the router cannot fire
//! for an external link).

mod aliases;
mod delivery;
mod handshake;
mod inbound;
mod repeats;
mod sys;

use delivery::Slot;
use handshake::handshake;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, LastWill, LastWillProperties, Packet, PingReq, Publish,
    PublishProperties, QoS, SubscribeReasonCode, UnsubAck,
};
use rumqttd::Notification;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::{sleep_until, Instant};
use tracing::{debug, info, warn};

use crate::codec::Codec;
use crate::expiry;
use crate::flow::Consumer;
use crate::listener::Stream;
use crate::marks::Mark;
use crate::names;
use crate::renewal::{self, Phase};
use crate::router;
use crate::server::Shared;
use axion_access::auth::Principal;
use axion_queues::outlet::{Injected, OutletLink};

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

/// Packet id of the front end's own SUBSCRIBE (clients never use 0).
const RESUBSCRIBE_PKID: u16 = 0;

/// Packet id of the outlet's publishes: the router's PUBACK for them is
/// not the client's (clients never use 0).
const OUTLET_PKID: u16 = 0;

/// Packet ids for QoS 1 deliveries the router was acknowledged for at
/// once: between the router's ids (1..=100, reused as soon as it is
/// acknowledged) and the front end's own ([`delivery::LOCAL_PKIDS`]).
const EAGER_PKIDS: std::ops::RangeInclusive<u16> = 101..=999;

/// A QoS 1 or 2 publish waiting for room in the client's receive window.
struct Waiting {
    bytes: BytesMut,
    /// Its packet id is taken from [`EAGER_PKIDS`] when it is sent.
    eager: bool,
}

pub(crate) type Reader = Box<dyn AsyncRead + Send + Sync + Unpin>;
pub(crate) type Writer = Box<dyn AsyncWrite + Send + Sync + Unpin>;

/// Serves one accepted connection to completion, over TLS if `tls`.
pub(crate) async fn run(
    stream: Stream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let session = match (stream, tls) {
        (Stream::Unix(stream), _) => {
            let (r, w) = stream.into_split();
            handshake(Box::new(r), Box::new(w), peer, &shared).await
        }
        (Stream::Tcp(stream), None) => {
            set_nodelay(&stream, peer);
            // Owned halves: no lock between reader and writer on plain TCP.
            let (r, w) = stream.into_split();
            handshake(Box::new(r), Box::new(w), peer, &shared).await
        }
        (Stream::Tcp(stream), Some(acceptor)) => {
            set_nodelay(&stream, peer);
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

/// Serves a connection that reached the broker by other means than its
/// listeners (MQTT over WebSocket, from the bridge's port): the same
/// handshake and session as a TCP client's.
pub(crate) async fn run_io(
    reader: Reader,
    writer: Writer,
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) {
    let Some(mut session) = handshake(reader, writer, peer, &shared).await else {
        return;
    };
    let ending = session.serve(shutdown).await;
    session.finish(ending).await;
}

/// The publish a will becomes, ready for the router.
fn will_packet(shared: &Shared, will: LastWill, props: Option<LastWillProperties>) -> Packet {
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
    shared.prepare_publish(publish, qos as u8, props, None)
}

fn set_nodelay(stream: &TcpStream, peer: SocketAddr) {
    if let Err(err) = stream.set_nodelay(true) {
        debug!(%peer, %err, "set_nodelay failed");
    }
}

/// State of an established session.
struct Session {
    peer: SocketAddr,
    client_id: String,
    router_id: String,
    /// The router keeps nothing of this session once it ends.
    clean_session: bool,
    /// Seconds the session outlives the connection (MQTT 5 Session Expiry
    /// Interval, capped; a DISCONNECT may change it).
    session_expiry: Arc<AtomicU32>,
    /// This connection's generation (see [`crate::expiry`]).
    generation: u64,
    /// Deliveries still to come that the previous connection of this
    /// session received without acknowledging: they carry DUP.
    redeliver: usize,
    /// Router deliveries sent and not yet acknowledged, for the next
    /// connection's DUP flags (see [`crate::expiry`]).
    unacknowledged: Arc<AtomicUsize>,
    keep_alive: Option<Duration>,
    codec: Codec,
    shared: Arc<Shared>,
    link_tx: LinkTx,
    link_rx: LinkRx,
    read_half: Reader,
    writer: mpsc::UnboundedSender<BytesMut>,
    writer_task: tokio::task::JoinHandle<()>,
    inbuf: BytesMut,
    /// The will, until this session's end or a takeover decides it.
    will: expiry::WillSlot,
    /// Filters this client holds, as stored in the router.
    filters: HashSet<String>,
    /// Most filters it may hold (`max_filters_per_client`); `None` for
    /// Axion's own components.
    filter_bound: Option<usize>,
    /// Its filters refused at that bound, for one log line per episode.
    bound_refusals: crate::refusals::Refusals,
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
    /// Encoded QoS 1 publishes waiting for room in the client's window
    /// (see [`Waiting`]), and their bytes.
    window: VecDeque<Waiting>,
    window_bytes: usize,
    /// Router deliveries in the ledger whose acknowledgement the router
    /// still waits for: while there are none, a QoS 1 delivery to a clean
    /// session is acknowledged to the router at once (see
    /// `Session::deliver`).
    router_slots: usize,
    /// Packet ids of such deliveries at the client (see [`EAGER_PKIDS`]).
    eager_pkids: HashSet<u16>,
    /// Bytes handed to the writer task and not yet written to the socket.
    unwritten: Arc<std::sync::atomic::AtomicUsize>,
    /// Router acknowledgements of deliveries taken over by this session,
    /// sent with the batch being written.
    eager_acks: Vec<Packet>,
    /// Disk commits (of away sessions' queues) the acknowledgement of the
    /// client's publish with this packet id waits for.
    durable_acks: HashMap<u16, Vec<crate::disk::Commit>>,
    /// Acknowledgements of the client's publishes waiting for their
    /// commits or verdicts, and every one behind them, in order.
    pending_acks: VecDeque<PendingAck>,
    /// MQTT 5 QoS 1 enqueues (by packet id) handed to the queue owner:
    /// their PUBACK waits for its verdict, and carries 0x97 and the reason
    /// if the queue refused the task.
    verdicts: HashMap<u16, tokio::sync::oneshot::Receiver<String>>,
    /// Router-form filters subscribed with MQTT 5 No Local.
    nolocal_filters: HashSet<String>,
    /// MQTT 5 topic aliases, both ways.
    aliases: aliases::Aliases,
    /// Router-form filters subscribed with MQTT 5 retain-as-published.
    rap_filters: HashSet<String>,
    /// Router QoS 2 deliveries the client got at QoS 0 or 1 (or not at
    /// all): the front end answers the router's PUBREL for them.
    downgraded: HashSet<u16>,
    /// Retained QoS 2 messages the front end sent, PUBREL'd, awaiting PUBCOMP.
    local_pubrel: HashSet<u16>,
    /// The router's SUBACK for [`Session::resubscribe`] is still to come.
    resubscribing: bool,
    /// This session's subscriptions, kept beside it across connections
    /// (see [`crate::expiry`]); mirrors `filters`, `nolocal_filters` and
    /// `rap_filters`.
    subscriptions: expiry::SharedSubscriptions,
    /// Filters the router has been sent (`filters` runs ahead of it while
    /// a SUBSCRIBE is held).
    router_filters: HashSet<String>,
    /// QoS 2 publishes the router holds until the client's PUBREL.
    qos2_in: HashSet<u16>,
    /// What a router renewal needs to know of this session.
    live: renewal::Live,
    renewal_rx: watch::Receiver<Phase>,
    /// Generation of the router `link_tx`/`link_rx` belong to.
    link_epoch: u64,
    /// The last topic this session noted for renewals, and its router
    /// generation: a stream to one topic takes the lock once.
    last_published: Option<(u64, Bytes)>,
    /// The renewal round whose barrier PINGREQ awaits its PINGRESP.
    barrier_round: Option<u64>,
    /// A router renewal is under way: report what is in flight.
    renewing: bool,
    /// `$share` forwards already sent on this link (see [`repeats`]).
    repeats: repeats::Repeats,
    /// Publishes the queue owner hands its own session without MQTT (see
    /// [`axion_queues::outlet`]); only on the owner's session.
    outlet: Option<OutletLink>,
    /// Ids of the last tasks the queue owner delivered to this client (see
    /// [`axion_queues::tap::RECEIVED`]).
    received_tasks: delivery::Recent,
    /// Disk commits the batch being forwarded waits for: kept-session
    /// records (see [`crate::disk`]).
    disk_commits: Vec<crate::disk::Commit>,
    /// Router-form filters of a resumed session its user may no longer
    /// hold (see `restore_subscriptions`).
    revoked: HashSet<String>,
    /// While it reads its queue (see [`crate::offline`]): the sequence
    /// number to read from next, and what was read and not yet sent.
    replay_from: Option<u64>,
    replay_buf: VecDeque<crate::disk::QueuedMessage>,
    /// Bytes of it sent and not yet acknowledged by the client.
    replay_unacked: usize,
    /// `$SYS` filters (client form) it holds, each with
    /// retain-as-published: served by the front end, never the router
    /// (see [`crate::sys`]).
    sys_filters: HashMap<String, bool>,
    /// While it holds one: wakes at each round of new `$SYS` values.
    sys_rx: Option<watch::Receiver<u64>>,
    /// The last round of `$SYS` values it was sent.
    sys_seen: u64,
}

/// How long a kept session's subscription (with a data directory) may
/// hold publishers back before its connection is closed and what it is
/// owed goes to its queue.
const KEPT_PATIENCE: Duration = Duration::from_millis(100);

type Admission = std::pin::Pin<Box<dyn Future<Output = ()> + Send + Sync>>;

/// A PUBACK or PUBREC for the client, once what it waits for is done.
type PendingAck = std::pin::Pin<Box<dyn Future<Output = Packet> + Send + Sync>>;

/// The acknowledgement at the front of `pending`, once it is ready (then
/// taken off); never if there is none.
async fn front_ack(pending: &mut VecDeque<PendingAck>) -> Packet {
    let Some(front) = pending.front_mut() else {
        return std::future::pending().await;
    };
    let packet = front.as_mut().await;
    pending.pop_front();
    packet
}

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

/// Writes what the session hands over, in order. The session never waits
/// for it: what a client does not read piles up here, counted in
/// `unwritten`, and the session disconnects a client whose pile passes
/// the broker's per-subscriber buffer.
async fn write_loop(
    mut half: Writer,
    mut rx: mpsc::UnboundedReceiver<BytesMut>,
    unwritten: Arc<std::sync::atomic::AtomicUsize>,
    peer: SocketAddr,
    shared: Arc<Shared>,
) {
    while let Some(mut buf) = rx.recv().await {
        // Coalesce whatever else is already queued into one write.
        while let Ok(more) = rx.try_recv() {
            buf.extend_from_slice(&more);
        }
        // Flushed at once: a transport that buffers (TLS, WebSocket
        // frames) would otherwise hold the batch until the next one.
        if let Err(err) = async {
            half.write_all(&buf).await?;
            half.flush().await
        }
        .await
        {
            debug!(%peer, %err, "write to client failed");
            return;
        }
        unwritten.fetch_sub(buf.len(), Ordering::Relaxed);
        shared.traffic.written(&buf);
    }
    let _ = half.shutdown().await;
}

/// The next publishes from the outlet; never, without one.
async fn recv_injected(outlet: &mut Option<OutletLink>, buf: &mut Vec<Injected>) -> usize {
    match outlet {
        Some(link) => link.recv_many(buf).await,
        None => std::future::pending().await,
    }
}

/// The next round of `$SYS` values; never, without a `$SYS` filter.
async fn sys_round(rx: &mut Option<watch::Receiver<u64>>) {
    let Some(rx) = rx else {
        return std::future::pending().await;
    };
    if rx.changed().await.is_err() {
        // The broker is going away.
        std::future::pending::<()>().await;
    }
}

/// Polls a future once; `None` if it is not ready.
pub(crate) async fn now_or_never<F: Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
        Poll::Ready(v) => Poll::Ready(Some(v)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

pub(crate) fn make_publish(
    topic: Bytes,
    payload: Bytes,
    qos: QoS,
    retain: bool,
    pkid: u16,
) -> Publish {
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
        let mut injected = Vec::new();
        let far = Duration::from_secs(86_400 * 365);
        // A client may send its first packets right behind CONNECT, in the
        // same segment the handshake read: they are already here, and no
        // more bytes may come to wake the read below.
        if !self.inbuf.is_empty() {
            if let Some(ending) = self.incoming().await {
                return ending;
            }
        }
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
                        Ok(n) => {
                            self.shared.traffic.read(n);
                            last_rx = Instant::now();
                            if let Some(ending) = self.incoming().await {
                                return ending;
                            }
                            // Acknowledgements made room for more of its
                            // queue.
                            if self.replay_from.is_some() && !self.pump_replay().await {
                                return Ending::Lost;
                            }
                        }
                        Err(err) => {
                            debug!(peer = %self.peer, client_id = self.client_id, %err, "read failed");
                            return Ending::Lost;
                        }
                    }
                }
                n = recv_injected(&mut self.outlet, &mut injected), if self.held_bytes < MAX_HELD_BYTES => {
                    if n == 0 {
                        // The owner has stopped.
                        self.outlet = None;
                    } else {
                        let packets = self.injected_packets(injected.drain(..));
                        self.held_bytes += packets.iter().map(held_size).sum::<usize>();
                        self.held.extend(packets);
                        let mut batch = Vec::new();
                        self.pump_held(&mut batch);
                        if self.forward(batch).await.is_err() {
                            return Ending::Kicked;
                        }
                    }
                }
                () = sys_round(&mut self.sys_rx) => {
                    let mut out = BytesMut::new();
                    self.sys_updates(&mut out);
                    if !self.send_bytes(out).await {
                        return Ending::Lost;
                    }
                }
                packet = front_ack(&mut self.pending_acks) => {
                    let mut out = BytesMut::new();
                    self.encode_ack(packet, &mut out);
                    self.ready_acks(&mut out).await;
                    if !self.send_bytes(out).await {
                        return Ending::Lost;
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
                Ok(()) = self.renewal_rx.changed() => {
                    let phase = *self.renewal_rx.borrow_and_update();
                    if self.follow_renewal(phase).await.is_err() {
                        return Ending::Kicked;
                    }
                }
            }
            if self.renewing {
                self.report_idle();
            }
        }
    }

    /// Takes this session's part in a router renewal (see [`crate::renewal`]).
    async fn follow_renewal(&mut self, phase: Phase) -> Result<(), ()> {
        self.renewing = phase != Phase::Idle;
        match phase {
            Phase::Idle => self.barrier_round = None,
            Phase::Pause(round) => {
                // A publish admitted just before the pause goes first, so
                // that the barrier is behind it.
                if let Some(admission) = self.admission.as_mut() {
                    if now_or_never(admission).await.is_some() {
                        self.admission = None;
                        let mut batch: Vec<Packet> = self.pop_held().into_iter().collect();
                        self.pump_held(&mut batch);
                        self.forward(batch).await?;
                    }
                }
                self.barrier_round = Some(round);
                self.forward(vec![Packet::PingReq(PingReq)]).await?;
            }
            Phase::Switch => self.relink().await?,
        }
        self.report_idle();
        Ok(())
    }

    /// The router answered the barrier: all this session sent is in it.
    fn barrier_passed(&mut self) {
        if let Some(round) = self.barrier_round.take() {
            let filters = self.router_filters.iter().cloned().collect();
            self.shared
                .renewal
                .update(&self.live, |s| s.barrier = Some((round, filters)));
        }
    }

    /// Tells a renewal whether anything between client and router is
    /// still in flight.
    fn report_idle(&self) {
        // Deliveries the front end took over (retained, queued, or acked
        // to the router at once) are nothing the router waits for.
        let idle = self.router_slots == 0
            && self.downgraded.is_empty()
            && self.qos2_in.is_empty()
            && !self.resubscribing;
        self.shared.renewal.update(&self.live, |s| s.idle = idle);
    }

    /// Moves this session's link to the current router, if a renewal
    /// replaced it: same id, same filters at the same QoS.
    async fn relink(&mut self) -> Result<(), ()> {
        let (epoch, router) = self.shared.router_epoch();
        if epoch == self.link_epoch {
            return Ok(());
        }
        let (tx, rx, _connack) = router
            .link(self.router_id.clone(), self.clean_session)
            .await
            .map_err(|err| warn!(client_id = self.client_id, %err, "could not move to the renewed router"))?;
        self.link_tx = tx;
        self.link_rx = rx;
        self.link_epoch = epoch;
        self.repeats.clear();
        self.router_filters.clear();
        self.shared.renewal.update(&self.live, |s| s.epoch = epoch);
        self.resubscribe().await
    }

    /// Sends `bytes` to the writer task; false if the client is gone.
    async fn send_bytes(&self, bytes: BytesMut) -> bool {
        if bytes.is_empty() {
            return true;
        }
        self.unwritten.fetch_add(bytes.len(), Ordering::Relaxed);
        self.writer.send(bytes).is_ok()
    }

    /// Bytes this client has been sent or is due and has not taken: what
    /// the socket did not accept, and what waits for its receive window.
    fn backlog(&self) -> usize {
        self.unwritten.load(Ordering::Relaxed) + self.window_bytes
    }

    /// A kept session (with a data directory) has what is published to it
    /// journaled until its client acknowledges it, so `kill -9` loses none
    /// of it (see [`crate::offline`]); called whenever its subscriptions
    /// change.
    fn journal_subscriptions(&self) {
        if self.clean_session || self.shared.disk.is_none() {
            return;
        }
        let filters = self
            .subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .for_capture();
        self.shared.offline.online(&self.router_id, &filters);
    }

    /// A kept session's subscription whose backlog can go to its queue on
    /// disk holds publishers back only briefly before the session is moved
    /// there (see [`crate::offline`]).
    fn set_patience(&self, consumer: &Consumer) {
        if !self.clean_session && self.shared.disk.is_some() {
            consumer.set_patience(KEPT_PATIENCE);
        }
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

    async fn violation(&self, why: &str, code: DisconnectReasonCode) -> Ending {
        info!(client_id = self.client_id, peer = %self.peer, why, "protocol violation; closing the connection");
        self.disconnect_client(code).await;
        Ending::Lost
    }

    /// Hands packets to the router: all but the last go straight into the
    /// link's buffer, the last one wakes the router once for the batch.
    /// Publishes to the embedded queue owner's inbound topics go to it too,
    /// first (see [`axion_queues::tap`]).
    async fn forward(&mut self, mut packets: Vec<Packet>) -> Result<(), ()> {
        let mut subscriptions_changed = false;
        let mut answered = BytesMut::new();
        let mut i = 0;
        while i < packets.len() {
            match &packets[i] {
                Packet::Subscribe(sub, _) => {
                    subscriptions_changed = true;
                    self.router_filters
                        .extend(sub.filters.iter().map(|f| f.path.clone()));
                }
                Packet::Unsubscribe(unsub, _) => {
                    subscriptions_changed = true;
                    let mut linked = false;
                    for path in &unsub.filters {
                        linked |= self.router_filters.remove(path);
                    }
                    if !linked {
                        // Held through a router renewal, it reaches a router
                        // that never had these filters (the session
                        // subscribed again only to what it still holds):
                        // the router would not answer, so the front end does.
                        let pkid = unsub.pkid;
                        packets.remove(i);
                        let ack = Packet::UnsubAck(
                            UnsubAck {
                                pkid,
                                reasons: Vec::new(),
                            },
                            None,
                        );
                        let ack = self.patch_ack(ack);
                        self.encode(ack, &mut answered);
                        continue;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        if subscriptions_changed {
            self.journal_subscriptions();
        }
        if !self.send_bytes(answered).await {
            return Err(());
        }
        // A renewal drains only the filters that what the router got may
        // have reached (see `renewal::Published`).
        for packet in &packets {
            if let Packet::Publish(publish, _) = packet {
                let noted = (self.link_epoch, publish.topic.clone());
                if self.last_published.as_ref() != Some(&noted) {
                    self.shared
                        .renewal
                        .published(noted.0, &noted.1, self.shared.config.max_topics);
                    self.last_published = Some(noted);
                }
            }
        }
        // A queue publish reaches the owner through the tap at once, the
        // router only with the batch. A SUBSCRIBE earlier in the batch
        // goes to the router first, so that what the owner publishes in
        // answer (a task for a worker that subscribed, then said ready in
        // the same write) finds the subscription, as it would have had the
        // two come in separate reads.
        if let Some(cut) = self.subscription_before_tapped(&packets) {
            let later = packets.split_off(cut);
            self.tap_copies(&packets).await;
            self.send_to_router(packets).await?;
            packets = later;
        }
        self.tap_copies(&packets).await;
        self.send_to_router(packets).await
    }

    /// The index of the first queue publish the tap takes that comes after
    /// a SUBSCRIBE or UNSUBSCRIBE in `packets`.
    fn subscription_before_tapped(&self, packets: &[Packet]) -> Option<usize> {
        let tap = self.shared.queue_tap.get()?;
        let mut changed = false;
        for (i, packet) in packets.iter().enumerate() {
            match packet {
                Packet::Subscribe(..) | Packet::Unsubscribe(..) => changed = true,
                Packet::Publish(publish, _) if changed && tap.wants(&publish.topic) => {
                    return Some(i)
                }
                _ => {}
            }
        }
        None
    }

    /// Copies the queue publishes among `packets` to the queue owner.
    async fn tap_copies(&mut self, packets: &[Packet]) {
        if let Some(tap) = self.shared.queue_tap.get() {
            for packet in packets {
                // Queue topics start with `axion/`, which the router form
                // never escapes: the check needs no copy of the topic.
                if let Packet::Publish(publish, props) = packet {
                    if tap.wants(&publish.topic) {
                        // The owner gets the client's properties, not the
                        // front end's mark for the router.
                        let mut props = props.clone();
                        Mark::take(&mut props);
                        let topic = publish.topic.clone();
                        let received = axion_queues::tap::is_task_answer(&topic)
                            && axion_queues::tap::task_id(&publish.payload)
                                .is_some_and(|id| self.received_tasks.contains(&id));
                        // Only an MQTT 5 PUBACK can carry a refusal.
                        let verdict = match crate::router::qos_pkid(publish) {
                            (1, pkid) if self.codec.is_v5() && tap.is_enqueue(&topic) => {
                                let (tx, rx) = tokio::sync::oneshot::channel();
                                self.verdicts.insert(pkid, rx);
                                Some(tx)
                            }
                            _ => None,
                        };
                        tap.send(
                            topic,
                            publish.payload.clone(),
                            publish.retain,
                            props,
                            &self.client_id,
                            received,
                            verdict,
                        )
                        .await;
                    }
                }
            }
        }
    }

    /// Hands `packets` to the router, waking it once.
    async fn send_to_router(&mut self, mut packets: Vec<Packet>) -> Result<(), ()> {
        // The router acknowledges a subscription: only once the kept
        // session's record holding it is on disk.
        for commit in self.disk_commits.drain(..) {
            let _ = commit.await;
        }
        let Some(last) = packets.pop() else {
            return Ok(());
        };
        {
            let mut buffer = self.link_tx.buffer();
            buffer.extend(packets);
        }
        self.link_tx.send(last).await.map(|_| ()).map_err(|_| ())
    }

    fn encode(&self, packet: Packet, out: &mut BytesMut) {
        if let Err(err) = self.codec.write(packet, out) {
            warn!(client_id = self.client_id, %err, "could not encode a packet for the client");
        }
    }

    /// Writes this session's record to the data directory if the session
    /// outlives its connection (see [`expiry::KeptRecord`]).
    pub(super) fn save_kept(&self, ended: bool) -> Option<crate::disk::Commit> {
        let expiry = self.session_expiry.load(Ordering::Relaxed);
        if self.clean_session || expiry == 0 || self.shared.disk.is_none() {
            return None;
        }
        let subs = self.subscriptions.lock().unwrap_or_else(|p| p.into_inner());
        expiry::KeptRecord::new(
            &self.router_id,
            self.principal.as_ref().and_then(|p| p.user.as_deref()),
            expiry,
            ended,
            &subs,
        )
        .save(&self.shared)
    }

    /// Publishes the will if due, detaches from the router and closes.
    async fn finish(mut self, ending: Ending) {
        debug!(client_id = self.client_id, ?ending, "session ended");
        let kept = !self.clean_session;
        self.shared
            .renewal
            .update(&self.live, |s| s.finishing = Some(kept));
        if ending != Ending::Kicked {
            // What the client sent before it left goes out, held or not.
            let mut packets: Vec<Packet> = self.held.drain(..).collect();
            self.admission = None;
            let will_due = matches!(ending, Ending::Lost | Ending::CleanWithWill);
            // MQTT-3.1.3-9: at the will delay or the session's end,
            // whichever comes first.
            let delay = self.will_delay();
            if will_due && delay > 0 {
                // Taken at once: a takeover while it waits cancels it.
                if let Some((will, props)) = self.take_will() {
                    if !self
                        .wait_will_delay(Duration::from_secs(u64::from(delay)))
                        .await
                    {
                        // Taken over by a reconnect during the will delay: no will.
                        self.close().await;
                        return;
                    }
                    packets.push(will_packet(&self.shared, will, props));
                }
            }
            // A newer connection of this id has taken the router's slot
            // over: rumqttd reuses connection ids, so what this stale link
            // sent now would land on that connection (a late DISCONNECT
            // ended it). Holding the lock orders this against a takeover.
            // The renewal gate keeps a router renewal from starting while
            // these last packets go out, and they go to the current router.
            let shared = self.shared.clone();
            let gate = shared.renewal.gate.read().await;
            match shared
                .lifetimes
                .hold_if_newest(&self.router_id, self.generation)
                .await
            {
                Some(_newest) => {
                    // So does what the queue owner handed the outlet before
                    // it disconnected (its final stats).
                    if let Some(waiting) = self.outlet.as_mut().map(OutletLink::take_waiting) {
                        packets.extend(self.injected_packets(waiting.into_iter()));
                    }
                    // Under the lock a takeover takes the will with: it
                    // goes out once, from here or from the new connection.
                    if let (true, Some((will, props))) = (will_due, self.take_will()) {
                        packets.push(will_packet(&self.shared, will, props));
                    }
                    packets.push(router::disconnect());
                    drop(self.save_kept(true));
                    if self.relink().await.is_ok() {
                        let _ = self.forward(packets).await;
                    }
                }
                None => debug!(
                    client_id = self.client_id,
                    "taken over before it ended; nothing more goes to the router"
                ),
            }
            if ending == Ending::Shutdown {
                self.disconnect_client(DisconnectReasonCode::ServerShuttingDown)
                    .await;
            }
            // Not under the gate: it waits for the router to let go of
            // the link.
            drop(gate);
            self.read_what_is_left(ending != Ending::Shutdown).await;
            if !self.clean_session {
                // Queued or journaled messages it was sent and did not
                // acknowledge carry DUP when they go out again.
                let sent = self
                    .ledger
                    .iter()
                    .filter(|s| !s.acked)
                    .filter_map(|s| s.queued.map(|(seq, _)| seq));
                self.shared.offline.mark_sent(&self.router_id, sent);
            }
            // Before the session's drainer starts: it counts what it reads
            // against the parked positions.
            self.park_consumers().await;
            tokio::spawn(expiry::session_ended(
                self.shared.clone(),
                self.router_id.clone(),
                self.generation,
            ));
        }
        // Whatever the ending, no later connection of this id may find it.
        self.take_will();
        self.park_consumers().await;
        self.drop_consumers(|_| true);
        self.shared.leave_groups(&self.router_id);
        self.close().await;
    }

    /// A resumed session takes back what the front end kept of it; a new
    /// one starts with nothing (whatever was kept for the id is stale).
    fn restore_subscriptions(&mut self, session_present: bool) {
        let mut subs = self.subscriptions.lock().unwrap_or_else(|p| p.into_inner());
        let parked = std::mem::take(&mut subs.parked);
        if !session_present {
            *subs = expiry::Subscriptions::default();
            drop(subs);
            expiry::release(&self.shared, parked);
            return;
        }
        // A resumed session keeps only what its user may subscribe to now:
        // rights can change while it is away (the auth file reloaded).
        let revoked: Vec<String> = subs
            .filters
            .iter()
            .filter(|path| !self.may_subscribe(&names::client_filter(path)))
            .cloned()
            .collect();
        for path in &revoked {
            subs.filters.remove(path);
            subs.qos.remove(path);
            subs.nolocal.remove(path);
            subs.rap.remove(path);
        }
        self.filters = subs.filters.clone();
        self.nolocal_filters = subs.nolocal.clone();
        self.rap_filters = subs.rap.clone();
        let sys_revoked: Vec<String> = subs
            .sys
            .keys()
            .filter(|filter| !self.may_subscribe(filter))
            .cloned()
            .collect();
        for filter in &sys_revoked {
            subs.sys.remove(filter);
        }
        self.sys_filters = subs.sys.iter().map(|(f, s)| (f.clone(), s.rap)).collect();
        drop(subs);
        if !sys_revoked.is_empty() {
            info!(client_id = self.client_id, filters = ?sys_revoked, "resumed session: $SYS subscriptions no longer allowed are dropped");
        }
        if !self.sys_filters.is_empty() {
            self.watch_sys();
        }
        if !revoked.is_empty() {
            info!(client_id = self.client_id, filters = ?revoked, "resumed session: subscriptions no longer allowed are dropped");
        }
        // The router still holds them; what it delivers on them alone is
        // dropped at delivery.
        self.revoked = revoked.into_iter().collect();
        let mut parked: HashMap<String, Arc<Consumer>> = parked.into_iter().collect();
        for path in self.filters.clone() {
            let (_, rest) = names::split_share(&path);
            let group = names::share_group(&path);
            if let Some(group) = group {
                self.shared.join_group(group, &self.router_id);
            }
            // Only non-shared filters are parked.
            let old = group.is_none().then(|| parked.remove(&path)).flatten();
            let consumer = match old {
                Some(old) => {
                    if old.kicked.load(Ordering::Relaxed) {
                        warn!(client_id = self.client_id, filter = rest, "resumed session fell behind while away: what the router overwrote meanwhile was dropped for it");
                    }
                    let c = self
                        .shared
                        .flow
                        .resume(rest, &self.client_id, self.kick.clone(), &old);
                    self.set_patience(&c);
                    self.shared.flow.unsubscribe(rest, &old, true);
                    c
                }
                None => self
                    .shared
                    .flow
                    .subscribe(rest, group, &self.client_id, self.kick.clone()),
            };
            self.consumers.push(Subscription { path, consumer });
        }
        expiry::release(&self.shared, parked);
    }

    /// rumqttd restores a resumed session's subscriptions but not its entry
    /// in the router's filter → connections map, so an UNSUBSCRIBE of one
    /// of them would get no UNSUBACK and change nothing, and it drops the
    /// session from its shared groups. Subscribing the same filters again
    /// repairs both without a second reading position (the router keeps
    /// the existing one); the front end swallows the SUBACK.
    async fn resubscribe(&mut self) -> Result<(), ()> {
        if self.filters.is_empty() {
            return Ok(());
        }
        let filters = self
            .subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .with_qos();
        self.resubscribing = true;
        self.forward(vec![router::subscribe(RESUBSCRIBE_PKID, filters)])
            .await
    }

    /// Hands the flow positions of a kept session's own (not shared)
    /// filters to [`crate::expiry`] while no connection reads them.
    async fn park_consumers(&mut self) {
        if self.clean_session {
            return;
        }
        let mut positions = Vec::new();
        self.consumers.retain(|sub| {
            if names::share_group(&sub.path).is_some() {
                return true;
            }
            positions.push((sub.path.clone(), sub.consumer.clone()));
            false
        });
        if let Err(back) = self
            .shared
            .lifetimes
            .park(&self.router_id, self.generation, positions)
            .await
        {
            // Not kept, or taken over: nobody will read these.
            expiry::release(&self.shared, back);
        }
    }

    /// Takes the will out of the slot this connection shares with the next
    /// one of its id.
    fn take_will(&self) -> Option<expiry::Will> {
        self.will
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }

    /// Seconds the will waits after the connection ends: its Will Delay,
    /// or less if the session ends sooner.
    fn will_delay(&self) -> u32 {
        let slot = self
            .will
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        slot.as_ref()
            .map_or(0, expiry::will_delay)
            .min(self.session_expiry.load(Ordering::Relaxed))
    }

    /// Waits out a will delay; false if the link was taken over meanwhile.
    async fn wait_will_delay(&mut self, delay: Duration) -> bool {
        let deadline = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = sleep_until(deadline) => return true,
                n = self.link_rx.next() => match n {
                    // A renewal retired this link's router: not a takeover
                    // (that is checked again before the will goes out).
                    Err(_) if self.shared.router_epoch().0 != self.link_epoch => {
                        sleep_until(deadline).await;
                        return true;
                    }
                    Err(_) => return false,
                    Ok(Some(Notification::Unschedule)) => { let _ = self.link_rx.wake().await; }
                    Ok(_) => {}
                }
            }
        }
    }

    async fn close(self) {
        self.shared.renewal.deregister(self.generation);
        drop(self.writer);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.writer_task).await;
    }
}
