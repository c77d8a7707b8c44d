//! The CONNECT: vetting it, refusing with the right CONNACK, registering with the router.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::{ConnAck, ConnAckProperties, Connect, ConnectReturnCode, Packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::aliases::{Aliases, MAX_ALIASES};
use super::delivery::LOCAL_PKIDS;
use super::{write_loop, Reader, Session, Writer};
use crate::codec::{self, Codec, DecodeError, Frame, Framed};
use crate::names;
use crate::server::Shared;
use axion_access::auth::{LoginError, INTERNAL_USER};
use axion_access::login_limit::Throttled;

async fn write_once(stream: &mut Writer, codec: &Codec, packet: Packet) {
    let mut out = BytesMut::new();
    if codec.write(packet, &mut out).is_ok() {
        let _ = stream.write_all(&out).await;
        let _ = stream.flush().await;
    }
}

/// Connections past `--max-connections` that Axion's own clients may use.
const RESERVED_FOR_OWN: usize = 16;

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
pub(super) async fn handshake(
    mut reader: Reader,
    mut stream: Writer,
    peer: SocketAddr,
    shared: &Arc<Shared>,
) -> Option<Session> {
    let max = shared.config.max_packet_size;
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = Instant::now() + shared.config.connect_timeout;
    let framed = loop {
        match codec::frame(&buf, max) {
            Frame::Complete(framed) => break framed,
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
            Ok(Ok(n)) => shared.traffic.read(n),
            Err(_) => {
                debug!(%peer, "no CONNECT within the connect timeout");
                return None;
            }
        }
    };
    let Framed { byte1, len, .. } = framed;
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
    let (connect, props, will, will_props, login) = match codec.read(&mut buf, framed, max) {
        Ok(Packet::Connect(connect, props, will, will_props, login)) => {
            (connect, props, will, will_props, login)
        }
        Ok(_) => return None,
        // Fields that do not fill the packet exactly: nothing in it can be
        // trusted, so no CONNACK either (MQTT-3.1.4-1; Mosquitto does the same).
        Err(DecodeError::Length(err)) => {
            debug!(%peer, %err, "CONNECT does not fill its length; closed without CONNACK");
            return None;
        }
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
        mut keep_alive,
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
    let topic_alias_max = props.as_ref().and_then(|p| p.topic_alias_max).unwrap_or(0);
    let receive_max = props
        .as_ref()
        .and_then(|p| p.receive_maximum)
        .map_or(usize::from(u16::MAX), usize::from);

    // Axion's own clients (queue owner, bridge, heartbeats) keep a few
    // slots beyond the limit, so a flood of connections cannot cut the
    // broker off from its own parts. Only from loopback; the slots are few.
    let own = peer.ip().is_loopback() && client_id.starts_with(names::OWN_CLIENT_PREFIX);
    let limit = shared.config.max_connections + if own { RESERVED_FOR_OWN } else { 0 };
    if shared.sessions.load(Ordering::Relaxed) > limit {
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
            let (user, pass) = match login {
                Some(l) => (Some(l.username), Some(l.password)),
                None => (None, None),
            };
            let user_for_log = user.clone().unwrap_or_default();
            // Before argon2 runs, so a flood from an address in backoff costs
            // no CPU. No user name means no password check (anonymous or
            // refused at once); the internal user has a random secret
            // compared in constant time and must never be locked out.
            let limited = !user_for_log.is_empty() && user_for_log != INTERNAL_USER;
            let attempt = if limited {
                match auth.admit(peer.ip(), &user_for_log) {
                    Ok(attempt) => Some(attempt),
                    Err(throttled) => {
                        let (v4, v5) = match throttled {
                            // 3.1.1 has no code for a ban; "not authorized" is closest.
                            Throttled::Backoff { .. } => {
                                (ConnectReturnCode::NotAuthorized, ConnectReturnCode::Banned)
                            }
                            Throttled::Busy { .. } => (
                                ConnectReturnCode::ServiceUnavailable,
                                ConnectReturnCode::ConnectionRateExceeded,
                            ),
                        };
                        let reason = throttled.to_string();
                        write_once(&mut stream, &codec, refusal(&codec, v4, v5, &reason)).await;
                        return None;
                    }
                }
            } else {
                None
            };
            let checker = auth.clone();
            // argon2 takes milliseconds of CPU: keep it off the async threads.
            let checked = tokio::task::spawn_blocking(move || {
                checker.login(user.as_deref(), pass.as_deref().map(str::as_bytes))
            })
            .await;
            match checked {
                Ok(Ok(principal)) => {
                    if let Some(attempt) = attempt {
                        attempt.succeeded();
                    }
                    Some(principal)
                }
                Ok(Err(why)) => {
                    auth.audit.refused_connects.fetch_add(1, Ordering::Relaxed);
                    let failures =
                        attempt.map(|a| auth.login_failed(a, peer.ip(), &user_for_log).failures);
                    warn!(%peer, client_id, user = user_for_log, failures, reason = why.as_str(), "connect refused");
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
    // An id the broker assigned is the client's own whatever its prefix.
    if let (Some(auth), Some(principal), false) = (&shared.config.auth, &principal, assigned) {
        if let Err(why) = auth.may_use_client_id(principal, &client_id) {
            warn!(%peer, client_id, user = principal.user.as_deref().unwrap_or(""), reason = why.as_str(), "connect refused: client id");
            let p = refusal(
                &codec,
                ConnectReturnCode::ClientIdentifierNotValid,
                ConnectReturnCode::ClientIdentifierNotValid,
                why.as_str(),
            );
            write_once(&mut stream, &codec, p).await;
            return None;
        }
    }
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
            if crate::sys::is_sys_topic(&w.topic) {
                // Only the broker writes `$SYS` (see `crate::sys`).
                info!(%peer, client_id, "connect refused: will on a $SYS topic");
                let p = refusal(
                    &codec,
                    ConnectReturnCode::NotAuthorized,
                    ConnectReturnCode::NotAuthorized,
                    "the $SYS topics are written by the broker only",
                );
                write_once(&mut stream, &codec, p).await;
                return None;
            }
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

    // How long the session outlives this connection: MQTT 5 says, capped;
    // a 3.1.1 persistent session gets the cap.
    let cap = shared.config.max_session_expiry;
    let session_expiry = if codec.is_v5() {
        props
            .as_ref()
            .and_then(|p| p.session_expiry_interval)
            .unwrap_or(0)
            .min(cap)
    } else if clean_session {
        0
    } else {
        cap
    };
    // The router keeps state only for unclean links: a session to keep,
    // or an MQTT 5 session resumed for this connection only.
    let keep_in_router = session_expiry > 0 || !clean_session;
    let router_id = names::router_client_id(&client_id);
    let session_expiry = Arc::new(AtomicU32::new(session_expiry));
    let unacknowledged = Arc::new(AtomicUsize::new(0));
    let will: crate::expiry::WillSlot = Arc::new(std::sync::Mutex::new(will));
    // Another connection with this id registers and links first; this one
    // then takes the session over from it.
    let linking = shared.lifetimes.linking(&router_id).await;
    // No router renewal starts while this connection links and registers.
    let gate = shared.renewal.gate.read().await;
    let resumed = shared
        .lifetimes
        .connected(
            shared,
            &router_id,
            clean_session,
            crate::expiry::Joining {
                kept: keep_in_router,
                expiry: session_expiry.clone(),
                unacknowledged: unacknowledged.clone(),
                will: will.clone(),
                owner: principal.as_ref().and_then(|p| p.user.clone()),
            },
        )
        .await;
    let resumed = match resumed {
        Ok(resumed) => resumed,
        Err(foreign) => {
            drop(gate);
            if let Some(auth) = &shared.config.auth {
                auth.audit
                    .refused_client_ids
                    .fetch_add(1, Ordering::Relaxed);
            }
            warn!(%peer, client_id, user = principal.as_ref().and_then(|p| p.user.as_deref()).unwrap_or(""),
                owner = foreign.owner.as_deref().unwrap_or(""), "connect refused: the client id's session belongs to another user");
            let p = refusal(
                &codec,
                ConnectReturnCode::ClientIdentifierNotValid,
                ConnectReturnCode::ClientIdentifierNotValid,
                "client id in use by another user",
            );
            write_once(&mut stream, &codec, p).await;
            return None;
        }
    };
    let (link_epoch, router) = shared.router_epoch();
    // Taking over a live connection ends it (MQTT 5 3.1.3.2.2: its will
    // goes out unless a Will Delay is still running). Published before this
    // connection links, so it reaches subscribers before anything the new
    // connection sends (say, its own "online" heartbeat).
    let superseded = resumed.superseded_will;
    if let Some((will, props)) = superseded.filter(|w| crate::expiry::will_delay(w) == 0) {
        let packet = super::will_packet(shared, will, props);
        if let Packet::Publish(publish, _) = &packet {
            shared
                .renewal
                .published(link_epoch, &publish.topic, shared.config.max_topics);
        }
        let visitor = format!("{}will-{}", names::OWN_CLIENT_PREFIX, resumed.generation);
        if let Err(err) = router.clone().visit(visitor, true, vec![packet]).await {
            warn!(%peer, client_id, %err, "the will of the connection taken over was not published");
        }
    }
    let (link_tx, link_rx, connack) = match router.link(router_id.clone(), !keep_in_router).await {
        Ok(link) => link,
        Err(err) => {
            warn!(%peer, client_id, %err, router_alive = shared.router().is_alive(), "router refused the link");
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
    drop(linking);
    let session_present;
    let connack = match Option::<Packet>::from(connack) {
        Some(Packet::ConnAck(ack, props)) => {
            session_present = ack.session_present;
            let mut props = props.unwrap_or_default();
            props.max_packet_size = u32::try_from(max).ok();
            props.topic_alias_max = Some(MAX_ALIASES);
            if keep_alive > shared.config.max_keep_alive && codec.is_v5() {
                keep_alive = shared.config.max_keep_alive;
                props.server_keep_alive = Some(keep_alive);
            }
            if assigned {
                props.assigned_client_identifier = Some(client_id.clone());
            }
            Packet::ConnAck(ack, Some(props))
        }
        _ => return None,
    };
    let mut out = BytesMut::new();
    if codec.write(connack, &mut out).is_err()
        || stream.write_all(&out).await.is_err()
        || stream.flush().await.is_err()
    {
        return None;
    }
    // The CONNECT and its CONNACK; what the session writes from here on
    // is counted by its writer task.
    shared.traffic.decoded(1, 0);
    shared.traffic.written(&out);
    debug!(%peer, client_id, v5 = codec.is_v5(), clean_session, ?session_expiry, keep_alive, "client connected");

    // Axion's own components are not held to the per-client filter bound:
    // the bridge subscribes for all its WebSocket clients in one session
    // (within its own --ws-max-filters). Only they have such an id: with
    // an auth file it was checked above against the user's rights, without
    // one every client is trusted and only loopback ones count. An id the
    // broker assigned is the client's own whatever its prefix.
    let component = !assigned
        && client_id.starts_with(names::OWN_CLIENT_PREFIX)
        && (shared.config.auth.is_some() || peer.ip().is_loopback());
    let filter_bound = (!component).then_some(shared.config.max_filters_per_client);
    let (live, renewal_rx) = shared
        .renewal
        .register(resumed.generation, link_epoch, &client_id);
    let read_half = reader;
    let (writer, rx) = mpsc::unbounded_channel();
    let unwritten = Arc::new(AtomicUsize::new(0));
    let writer_task = tokio::spawn(write_loop(
        stream,
        rx,
        unwritten.clone(),
        peer,
        shared.clone(),
    ));
    let mut session = Session {
        peer,
        client_id,
        router_id,
        clean_session: !keep_in_router,
        session_expiry,
        generation: resumed.generation,
        redeliver: resumed.unacknowledged,
        unacknowledged,
        client_max_packet,
        receive_max,
        at_client: 0,
        window: VecDeque::new(),
        window_bytes: 0,
        router_slots: 0,
        eager_pkids: HashSet::new(),
        unwritten,
        eager_acks: Vec::new(),
        durable_acks: HashMap::new(),
        pending_acks: VecDeque::new(),
        verdicts: HashMap::new(),
        nolocal_filters: HashSet::new(),
        rap_filters: HashSet::new(),
        aliases: Aliases::new(topic_alias_max),
        downgraded: HashSet::new(),
        local_pubrel: HashSet::new(),
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
        filter_bound,
        bound_refusals: Default::default(),
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
        subscriptions: resumed.subscriptions,
        resubscribing: false,
        router_filters: HashSet::new(),
        qos2_in: HashSet::new(),
        live,
        renewal_rx,
        link_epoch,
        last_published: None,
        barrier_round: None,
        renewing: false,
        repeats: Default::default(),
        outlet: None,
        revoked: HashSet::new(),
        received_tasks: Default::default(),
        disk_commits: Vec::new(),
        replay_from: None,
        replay_buf: VecDeque::new(),
        replay_unacked: 0,
        sys_filters: HashMap::new(),
        sys_rx: None,
        sys_seen: 0,
    };
    session.outlet = shared
        .queue_tap
        .get()
        .and_then(|tap| tap.outlet.for_client(&session.client_id));
    session.restore_subscriptions(session_present);
    if resumed.back {
        // What it was owed while away goes out before anything live.
        session.replay_from = Some(0);
        if !session.pump_replay().await {
            shared.renewal.deregister(resumed.generation);
            return None;
        }
    }
    session.journal_subscriptions();
    // Not awaited: until it subscribes, a kept session lost with the broker
    // costs its client only `session_present` (its SUBACKs wait for disk).
    drop(session.save_kept(false));
    if session.resubscribe().await.is_err() {
        shared.renewal.deregister(resumed.generation);
        return None;
    }
    drop(gate);
    Some(session)
}
