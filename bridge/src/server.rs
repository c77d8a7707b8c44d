//! The WebSocket and HTTP side on one port: the legacy protocol on any path
//! (legacy clients connect to `ws://host:7000`), and `/health/live`,
//! `/health/ready` (ready = the MQTT side is connected), `/stats` and
//! `/metrics` (Prometheus).
//!
//! Each connection is a reader loop plus a writer task. The writer drains
//! the client's bounded queue in batches (one flush per batch), sends a
//! ping every `ping_interval`, and ends the connection when nothing has
//! been heard for two intervals or a write stalls that long. A text frame
//! up to `max_frame_bytes` is handled; a larger one, up to the transport
//! limit of four times that, is answered with an error and the connection
//! lives on; beyond the transport limit the WebSocket layer closes it (it
//! cannot skip a frame it refused to buffer).

use crate::client::{ClientHandle, Kick, Metrics};
use crate::hub::Hub;
use crate::mqtt::Mqtt;
use crate::protocol::{self, FrameError, Request};
use crate::tasks::Tasks;
use crate::Limits;
use axion_access::auth::{Auth, Principal};
use axion_access::login_limit::Throttled;
use axion_supervise::legacy::Source;
use axion_supervise::LegacyHeartbeats;
use axion_wire::topics;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Close code for a client disconnected for not reading (RFC 6455 policy).
const CLOSE_POLICY: u16 = 1008;
/// How many queued frames the writer sends before one flush.
const WRITE_BATCH: usize = 256;
/// Most bytes one read of a client's socket takes. The WebSocket layer
/// zero-fills that much room before every read, including the one that
/// finds nothing: at its default of 128 KiB that was 4% of the CPU at
/// 10k events/s of 200-byte frames. A larger frame is read in more calls.
const READ_CHUNK: usize = 16 * 1024;

pub struct Shared {
    pub limits: Limits,
    /// When set, clients authenticate with a bearer token and their
    /// requests are checked against their user's ACL.
    pub auth: Option<Arc<Auth>>,
    pub package: String,
    pub hub: Arc<Hub>,
    pub mqtt: Arc<Mqtt>,
    pub tasks: Arc<Tasks>,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    pub next_key: AtomicU64,
    pub legacy_heartbeats: Option<Arc<LegacyHeartbeats>>,
    /// The broker in the same process, if any (see [`crate::local`]).
    pub local_broker: Option<Arc<dyn crate::LocalBroker>>,
    /// What `/metrics` serves (see [`crate::metrics`]).
    pub registry: prometheus_client::registry::Registry,
}

pub fn router(shared: Arc<Shared>) -> Router {
    let legacy = shared.legacy_heartbeats.clone();
    let router = Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/stats", get(stats))
        .route("/metrics", get(crate::metrics::serve))
        .fallback(upgrade)
        .with_state(shared);
    match legacy {
        Some(service) => router.merge(axion_supervise::legacy::routes(service)),
        None => router,
    }
}

async fn live() -> Json<Value> {
    Json(json!({ "status": "live" }))
}

async fn ready(State(s): State<Arc<Shared>>) -> Response {
    if s.metrics.mqtt_connected.load(Ordering::Relaxed) {
        Json(json!({ "status": "ready", "mqtt": "connected" })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "mqtt": "disconnected" })),
        )
            .into_response()
    }
}

async fn stats(State(s): State<Arc<Shared>>) -> Json<Value> {
    let mut v = s.metrics.snapshot();
    v["filters"] = json!(s.hub.filter_count());
    Json(v)
}

async fn upgrade(
    State(s): State<Arc<Shared>>,
    uri: axum::http::Uri,
    extensions: axum::http::Extensions,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let peer = extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip());
    let ws = match ws {
        Ok(ws) => ws,
        // A plain GET of the fleet view's page or its assets.
        Err(rejection) => {
            return crate::web::asset(uri.path()).unwrap_or_else(|| rejection.into_response())
        }
    };
    // `?token=` is checked before the upgrade (401); without it the first
    // frame must be `{"action":"auth","token":…}`.
    let principal = match (&s.auth, query_token(&uri)) {
        (Some(auth), Some(token)) => match check_token(auth, token, peer).await {
            Ok(p) => Some(p),
            Err(TokenRefused::Invalid) => {
                return (StatusCode::UNAUTHORIZED, "invalid token").into_response()
            }
            Err(TokenRefused::Throttled(throttled)) => {
                let retry_after = match throttled {
                    Throttled::Backoff { retry_in, .. } => retry_in.as_secs().max(1),
                    Throttled::Busy { .. } => 1,
                };
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    [(axum::http::header::RETRY_AFTER, retry_after.to_string())],
                    throttled.to_string(),
                )
                    .into_response();
            }
        },
        _ => None,
    };
    if s.metrics.clients.load(Ordering::Relaxed) >= s.limits.max_clients as u64 {
        tracing::warn!(
            limit = s.limits.max_clients,
            "refusing a WebSocket client: too many connected"
        );
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many WebSocket clients",
        )
            .into_response();
    }
    let transport_limit = s.limits.max_frame_bytes.saturating_mul(4);
    ws.read_buffer_size(READ_CHUNK)
        .max_message_size(transport_limit)
        .max_frame_size(transport_limit)
        .on_upgrade(move |socket| connection(socket, s, principal, peer))
}

struct Conn {
    handle: Arc<ClientHandle>,
    /// The token's user; `None` until authenticated (or with auth off).
    principal: Option<Principal>,
    /// MQTT filters this client subscribed through the hub.
    filters: HashSet<String>,
    /// Where the client connects from, when known.
    peer: Option<IpAddr>,
}

fn query_token(uri: &axum::http::Uri) -> Option<&str> {
    uri.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
}

/// Why a bearer token did not let a client in.
#[derive(Debug, thiserror::Error)]
enum TokenRefused {
    #[error("unauthorized")]
    Invalid,
    #[error(transparent)]
    Throttled(#[from] Throttled),
}

/// Verifies a bearer token off the async threads (argon2), unless `peer`
/// has failed too often (then refused before argon2); logs refusals.
async fn check_token(
    auth: &Arc<Auth>,
    token: &str,
    peer: Option<IpAddr>,
) -> Result<Principal, TokenRefused> {
    // Both listeners give every request its peer; a router served without
    // one puts all its clients in one bucket of the login limit.
    let peer = peer.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let user = token.split_once('.').map(|(u, _)| u).unwrap_or("");
    let attempt = auth.admit(peer, user)?;
    let (a, t) = (auth.clone(), token.to_string());
    match tokio::task::spawn_blocking(move || a.token(&t)).await {
        Ok(Ok(p)) => {
            attempt.succeeded();
            Ok(p)
        }
        Ok(Err(why)) => {
            auth.audit.refused_connects.fetch_add(1, Ordering::Relaxed);
            let failures = auth.login_failed(attempt, peer, user).failures;
            tracing::warn!(%peer, user, failures, reason = why.as_str(), "WebSocket client refused");
            Err(TokenRefused::Invalid)
        }
        Err(error) => {
            tracing::error!(%error, "token check failed");
            Err(TokenRefused::Invalid)
        }
    }
}

async fn connection(
    socket: WebSocket,
    s: Arc<Shared>,
    principal: Option<Principal>,
    peer: Option<IpAddr>,
) {
    let key = s.next_key.fetch_add(1, Ordering::Relaxed);
    let id = uuid::Uuid::new_v4().to_string();
    let (tx, rx) = mpsc::channel(s.limits.client_queue_frames);
    let cancel = s.shutdown.child_token();
    let handle = Arc::new(ClientHandle::new(
        key,
        id,
        tx,
        s.limits.client_queue_bytes,
        cancel.clone(),
    ));
    s.metrics.clients.fetch_add(1, Ordering::Relaxed);
    s.metrics.connections_total.fetch_add(1, Ordering::Relaxed);
    s.tasks.register(&handle);
    tracing::info!(client = %handle.id, "client connected");

    let (sink, stream) = socket.split();
    let heard = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_loop(
        sink,
        rx,
        handle.clone(),
        heard.clone(),
        s.clone(),
    ));
    let mut conn = Conn {
        handle: handle.clone(),
        principal,
        filters: HashSet::new(),
        peer,
    };
    read_loop(stream, &mut conn, &heard, &s).await;

    cancel.cancel();
    for filter in conn.filters.drain() {
        s.hub.unsubscribe(&filter, key);
        if let Err(error) = s.mqtt.reconcile(&filter).await {
            tracing::warn!(%error, filter, "unsubscribe after disconnect failed");
        }
    }
    s.tasks.client_gone(key).await;
    if let Err(error) = writer.await {
        tracing::error!(%error, client = %handle.id, "writer task failed");
    }
    s.metrics.clients.fetch_sub(1, Ordering::Relaxed);
    tracing::info!(client = %handle.id, slow = handle.was_slow(), "client disconnected");
}

/// Reads the client's frames until it goes; `heard` is set by each (the
/// writer's ping round clears it: see [`write_loop`]).
async fn read_loop(
    mut stream: SplitStream<WebSocket>,
    conn: &mut Conn,
    heard: &AtomicBool,
    s: &Shared,
) {
    loop {
        let msg = tokio::select! {
            _ = conn.handle.cancel.cancelled() => return,
            msg = stream.next() => msg,
        };
        let msg = match msg {
            None => return,
            Some(Err(error)) => {
                tracing::debug!(%error, client = %conn.handle.id, "WebSocket read ended");
                return;
            }
            Some(Ok(msg)) => msg,
        };
        heard.store(true, Ordering::Relaxed);
        match msg {
            Message::Text(text) => {
                s.metrics.frames_in.fetch_add(1, Ordering::Relaxed);
                if let Err(reply) = handle_text(text.as_str(), conn, s).await {
                    s.metrics.bad_frames.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(client = %conn.handle.id, error = %reply["error"], "bad frame");
                    conn.handle
                        .send(Utf8Bytes::from(reply.to_string()), &s.metrics);
                    if s.auth.is_some() && conn.principal.is_none() {
                        // Refused: the writer sends the error, then closes.
                        return;
                    }
                }
            }
            Message::Binary(_) => {
                s.metrics.frames_in.fetch_add(1, Ordering::Relaxed);
                s.metrics.bad_frames.fetch_add(1, Ordering::Relaxed);
                let reply =
                    json!({ "error": "binary frames are not supported; send JSON in text frames" });
                conn.handle
                    .send(Utf8Bytes::from(reply.to_string()), &s.metrics);
            }
            Message::Close(_) => {
                // RFC 6455 §5.5.1: the close is answered. The WebSocket
                // queued the answer on reading it, and sends it on its next
                // read, which then ends.
                let _ = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
                return;
            }
            Message::Ping(_) | Message::Pong(_) => {}
        }
    }
}

fn error(msg: impl std::fmt::Display) -> Value {
    json!({ "error": msg.to_string() })
}

/// The first frame of an unauthenticated client: `{"action":"auth","token":…}`.
async fn authenticate(
    text: &str,
    auth: &Arc<Auth>,
    peer: Option<IpAddr>,
) -> Result<Principal, TokenRefused> {
    let frame: Value = serde_json::from_str(text).map_err(|_| TokenRefused::Invalid)?;
    let token = frame
        .get("action")
        .filter(|a| a.as_str() == Some("auth"))
        .and_then(|_| frame.get("token")?.as_str())
        .ok_or(TokenRefused::Invalid)?;
    check_token(auth, token, peer).await
}

/// Asks the ACL about a request's MQTT topic or filter (`publish` or
/// `subscribe`); logs and counts a denial.
fn allowed(conn: &Conn, s: &Shared, subscribe: bool, topic: &str) -> Result<(), Value> {
    let (Some(auth), Some(p)) = (&s.auth, &conn.principal) else {
        return Ok(());
    };
    let checked = if subscribe {
        auth.may_subscribe(p, &conn.handle.id, topic)
    } else {
        auth.may_publish(p, &conn.handle.id, topic)
    };
    checked.map_err(|why| {
        tracing::warn!(client = %conn.handle.id, user = p.user.as_deref().unwrap_or(""), topic, subscribe, reason = why.as_str(), "bridge request denied");
        error(format!("not authorized: {topic}"))
    })
}

/// Handles one text frame; `Err` is the `{"error": …}` reply.
async fn handle_text(text: &str, conn: &mut Conn, s: &Shared) -> Result<(), Value> {
    if text.len() > s.limits.max_frame_bytes {
        return Err(error(format!(
            "frame too large: {} bytes (limit {})",
            text.len(),
            s.limits.max_frame_bytes
        )));
    }
    if let (Some(auth), None) = (&s.auth, &conn.principal) {
        let principal = authenticate(text, auth, conn.peer).await;
        conn.principal = Some(principal.map_err(error)?);
        return Ok(());
    }
    let request = protocol::parse_frame(text).map_err(|e: FrameError| e.reply())?;
    if let Request::Publish { message } = request {
        // The topic is needed for the ACL and for the publish: built once.
        let topic = protocol::type_to_topic(&s.hub.event_prefix, &message.event_type);
        allowed(conn, s, false, &topic)?;
        return publish(message, topic, conn, s).await;
    }
    match &request {
        Request::Subscribe { topic } => allowed(conn, s, true, &s.hub.event_filter(topic))?,
        Request::Enqueue { queue, .. } => {
            allowed(conn, s, false, &topics::queue(&s.package, queue, "enqueue"))?
        }
        // Pulling makes the client a worker of the queue's shared group;
        // acks and fails only reach tasks it pulled.
        Request::Pull { queue } => allowed(
            conn,
            s,
            true,
            &topics::queue_tasks_shared(&s.package, queue),
        )?,
        _ => {}
    }
    match request {
        Request::Subscribe { topic } => {
            let filter = s.hub.event_filter(&topic);
            if conn.filters.contains(&filter) {
                return Ok(());
            }
            if conn.filters.len() >= s.limits.max_subscriptions_per_client {
                return Err(error(format!(
                    "too many subscriptions on this connection (limit {})",
                    s.limits.max_subscriptions_per_client
                )));
            }
            s.hub.subscribe(&filter, &conn.handle).map_err(error)?;
            conn.filters.insert(filter.clone());
            tracing::debug!(client = %conn.handle.id, topic, "subscribed");
            s.mqtt.reconcile(&filter).await.map_err(|e| {
                tracing::error!(error = %e, filter, "subscribe failed");
                error("the MQTT connection is gone; subscription will be restored on reconnect")
            })
        }
        Request::Unsubscribe { topic } => {
            let filter = s.hub.event_filter(&topic);
            if conn.filters.remove(&filter) {
                s.hub.unsubscribe(&filter, conn.handle.key);
                s.mqtt.reconcile(&filter).await.map_err(|e| {
                    tracing::error!(error = %e, filter, "unsubscribe failed");
                    error("the MQTT connection is gone")
                })?;
            }
            Ok(())
        }
        // Handled above.
        Request::Publish { .. } => Ok(()),
        Request::Enqueue { queue, task } => s
            .tasks
            .enqueue(&conn.handle, &queue, task)
            .await
            .map_err(error),
        Request::Pull { queue } => s.tasks.pull(&conn.handle, &queue).await.map_err(error),
        Request::Ack { task_id } => s
            .tasks
            .finish(&conn.handle, &task_id, None)
            .await
            .map_err(error),
        Request::Fail { task_id, reason } => s
            .tasks
            .finish(&conn.handle, &task_id, Some(reason))
            .await
            .map_err(error),
        Request::Heartbeat => Ok(()),
    }
}

fn legacy_beat(service: &LegacyHeartbeats, message: &protocol::Message<'_>, conn: &Conn) {
    let Some(payload) = message.payload() else {
        return;
    };
    let beat = serde_json::from_str::<Value>(payload.get())
        .map_err(|e| e.to_string())
        .and_then(|v| {
            service
                .accept_json(&v, conn.peer, Source::BridgeEvent)
                .map_err(|r| r.error)
        });
    if let Err(error) = beat {
        tracing::debug!(client = %conn.handle.id, error, "heartbeat event not taken as a legacy heartbeat");
    }
}

/// Publishes a client's event on MQTT, and hands it to this bridge's own
/// WebSocket subscribers directly: the bridge's event subscriptions are
/// No Local, so the broker does not send its own events back to it. With
/// the broker in the same process, an event no MQTT client reads is not
/// published at all (see [`crate::local`]).
async fn publish(
    message: protocol::Message<'_>,
    topic: String,
    conn: &Conn,
    s: &Shared,
) -> Result<(), Value> {
    if !s.metrics.mqtt_connected.load(Ordering::Relaxed) {
        return Err(error("the MQTT broker is unreachable; event not published"));
    }
    // The legacy service template beats with `heartbeat` events: the
    // process joins the mesh as if it had used the heartbeat service.
    if let (Some(service), "heartbeat") = (&s.legacy_heartbeats, message.event_type.as_ref()) {
        legacy_beat(service, &message, conn);
    }
    let event = message.normalize_quoted(&conn.handle.id_json);
    // Checked before anything reaches MQTT: a property past its length
    // field or a packet past the broker's maximum makes the broker drop
    // the connection every client shares.
    let correlation = event.correlation.as_ref().map_or(0, Vec::len);
    if correlation > crate::client::MAX_PROPERTY {
        s.metrics.oversize_refused.fetch_add(1, Ordering::Relaxed);
        return Err(error(format!(
            "correlationId too long: {correlation} bytes (at most {})",
            crate::client::MAX_PROPERTY
        )));
    }
    let envelope_len = event.envelope_range().len();
    let reply_len = event.reply_to.as_ref().map_or(0, |r| r.len()) + s.hub.event_prefix.len() + 8;
    s.metrics
        .fits(topic.len(), envelope_len, 3 + correlation + 3 + reply_len)
        .map_err(error)?;
    let envelope = event.envelope_range();
    // One buffer: the MQTT payload is the envelope inside the frame.
    let frame = Utf8Bytes::from(event.frame);
    let heard = s
        .local_broker
        .as_ref()
        .is_none_or(|broker| broker.read_by_others(&topic, &s.mqtt.client_id));
    if heard {
        let props = PublishProperties {
            correlation_data: event.correlation.map(Bytes::from),
            response_topic: event
                .reply_to
                .filter(|reply| protocol::validate_type(reply).is_ok())
                .map(|reply| protocol::type_to_topic(&s.hub.event_prefix, &reply)),
            ..Default::default()
        };
        let payload = Bytes::from(frame.clone()).slice(envelope);
        s.mqtt
            .client
            .publish(topic.clone(), QoS::AtMostOnce, payload, Some(props))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "publish to MQTT failed");
                error("the MQTT connection is gone; event not published")
            })?;
        s.metrics.events_published.fetch_add(1, Ordering::Relaxed);
    } else {
        s.metrics.events_kept_local.fetch_add(1, Ordering::Relaxed);
    }
    // The broker withholds deny-listed topics from every subscriber; the
    // bridge's own subscribers, served without it, likewise.
    if s.auth.as_ref().is_some_and(|auth| auth.withholds(&topic)) {
        return Ok(());
    }
    for client in s.hub.dispatch_local(&topic, &frame) {
        let patience = s.limits.slow_consumer_timeout;
        if client
            .send_waiting(frame.clone(), &s.metrics, patience)
            .await
        {
            s.metrics.events_delivered.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Writes the client's queued frames in batches, one flush each, and
/// pings it every interval. A peer from which nothing (a frame, a pong)
/// was `heard` in two whole intervals is dropped, as is one a write to
/// which stalls for two intervals. (A flag the reader sets, not a time it
/// stores: reading the clock for every frame was a measurable cost.)
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Utf8Bytes>,
    handle: Arc<ClientHandle>,
    heard: Arc<AtomicBool>,
    s: Arc<Shared>,
) {
    let interval = s.limits.ping_interval;
    let stall = interval * 2;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let mut silent_intervals = 0u32;
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let cancel = handle.cancel.clone();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            n = rx.recv_many(&mut batch, WRITE_BATCH) => {
                if n == 0 {
                    break;
                }
                let write = async {
                    for frame in batch.drain(..) {
                        handle.dequeued(frame.len());
                        sink.feed(Message::Text(frame)).await?;
                    }
                    sink.flush().await
                };
                tokio::pin!(write);
                let frames = n as u64;
                // Nearly every batch fits in the socket's buffer at once: a
                // timer for the stall is set only when it does not.
                let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
                let outcome = match first {
                    Poll::Ready(written) => Ok(written),
                    Poll::Pending => tokio::select! {
                        _ = cancel.cancelled() => break,
                        r = tokio::time::timeout(stall, write) => r,
                    },
                };
                match outcome {
                    Ok(Ok(())) => {
                        s.metrics.frames_out.fetch_add(frames, Ordering::Relaxed);
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(%error, client = %handle.id, "WebSocket write failed");
                        cancel.cancel();
                        break;
                    }
                    Err(_) => {
                        handle.kick(Kick::SlowConsumer, &s.metrics);
                        break;
                    }
                }
            }
            _ = ping.tick() => {
                silent_intervals = if heard.swap(false, Ordering::Relaxed) { 0 } else { silent_intervals + 1 };
                if silent_intervals >= 2 {
                    handle.kick(Kick::DeadPeer, &s.metrics);
                    break;
                }
                let sent = tokio::time::timeout(stall, sink.send(Message::Ping(Bytes::new()))).await;
                if !matches!(sent, Ok(Ok(()))) {
                    handle.kick(Kick::DeadPeer, &s.metrics);
                    break;
                }
            }
        }
    }
    // Best effort: a client that is not reading will not see this.
    let close = if handle.was_slow() {
        Some(CloseFrame {
            code: CLOSE_POLICY,
            reason: Utf8Bytes::from_static("slow consumer: outgoing queue full"),
        })
    } else {
        None
    };
    // Frames queued before a normal close (e.g. "unauthorized") go first.
    let last_words = async {
        if !handle.was_slow() {
            // Frames of a batch interrupted by the close were already dequeued.
            for frame in batch.drain(..) {
                sink.feed(Message::Text(frame)).await?;
            }
            while let Ok(frame) = rx.try_recv() {
                handle.dequeued(frame.len());
                sink.feed(Message::Text(frame)).await?;
            }
        }
        sink.send(Message::Close(close)).await
    };
    let _ = tokio::time::timeout(Duration::from_millis(200), last_words).await;
}
