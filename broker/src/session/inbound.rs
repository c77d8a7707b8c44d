//! Client to router: decoding, checks, ACLs, flow-control holds and acknowledgements.

use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{
    DisconnectReasonCode, Packet, PingResp, PubAck, PubAckProperties, PubAckReason, PubComp,
    PubCompReason, PubRec, PubRecProperties, PubRecReason, PubRel, PubRelReason, Publish, QoS,
    RetainForwardRule, SubAck, SubscribeReasonCode, UnsubAck, UnsubAckReason, Unsubscribe,
};
use tracing::{debug, warn};

use super::{held_size, Ending, Session, Subscription};
use crate::codec::{self, Frame};
use crate::marks::Needed;
use crate::names;
use axion_queues::outlet::Injected;

impl Session {
    /// Decodes every complete packet in the input buffer and acts on it.
    pub(super) async fn incoming(&mut self) -> Option<Ending> {
        let max = self.shared.config.max_packet_size;
        let mut to_router: Vec<Packet> = Vec::new();
        let mut reply = BytesMut::new();
        let mut ending = None;
        // Counted once per read, not per packet (see `crate::traffic`).
        let (mut packets, mut publishes) = (0u64, 0u64);
        loop {
            let framed = match codec::frame(&self.inbuf, max) {
                Frame::Incomplete => break,
                Frame::Complete(framed) => framed,
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
            if let Err(why) = check_flags(framed.byte1) {
                ending = Some(
                    self.violation(why, DisconnectReasonCode::MalformedPacket)
                        .await,
                );
                break;
            }
            let packet = match self.codec.read(&mut self.inbuf, framed, max) {
                Ok(p) => p,
                Err(err) => {
                    let why = format!("undecodable packet: {err}");
                    ending = Some(self.violation(&why, err.reason()).await);
                    break;
                }
            };
            packets += 1;
            publishes += u64::from(framed.byte1 >> 4 == 3);
            match self.inbound(packet, framed.byte1, &mut to_router, &mut reply) {
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
        self.shared.traffic.decoded(packets, publishes);
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
        self.count_unacknowledged();
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
    pub(super) fn pump_held(&mut self, batch: &mut Vec<Packet>) {
        if self.admission.is_some() {
            return;
        }
        while let Some(packet) = self.held.front() {
            if !matches!(packet, Packet::Publish(..)) && self.shared.flow.is_paused() {
                // A router renewal is under way: (un)subscribes wait too.
                let shared = self.shared.clone();
                self.admission = Some(Box::pin(async move { shared.flow.unpaused().await }));
                return;
            }
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

    pub(super) fn pop_held(&mut self) -> Option<Packet> {
        let packet = self.held.pop_front()?;
        self.held_bytes -= held_size(&packet);
        Some(packet)
    }

    /// Acts on one client packet. `Err` is a protocol violation.
    pub(super) fn inbound(
        &mut self,
        packet: Packet,
        byte1: u8,
        to_router: &mut Vec<Packet>,
        reply: &mut BytesMut,
    ) -> Result<Option<Ending>, (String, DisconnectReasonCode)> {
        match packet {
            Packet::Publish(mut publish, mut props) => {
                let alias = props.as_mut().and_then(|p| p.topic_alias.take());
                self.aliases
                    .resolve(&mut publish.topic, alias)
                    .map_err(|(why, code)| (why.to_string(), code))?;
                if let Err(e) = names::check_topic(&publish.topic) {
                    return Err((e.to_string(), DisconnectReasonCode::TopicNameInvalid));
                }
                let qos = (byte1 >> 1) & 0x03;
                if crate::sys::is_sys_topic(&publish.topic) {
                    // Only the broker writes `$SYS` (see `crate::sys`).
                    debug!(
                        client_id = self.client_id,
                        "publish to a $SYS topic refused"
                    );
                    self.refuse_publish(
                        &publish,
                        qos,
                        reply,
                        Some("the $SYS topics are written by the broker only"),
                    );
                    return Ok(None);
                }
                if !self.may_publish(&publish.topic) {
                    self.refuse_publish(&publish, qos, reply, None);
                    return Ok(None);
                }
                if let Err(why) = self.may_ask_reply(&publish, props.as_ref()) {
                    self.refuse_publish(&publish, qos, reply, Some(why));
                    return Ok(None);
                }
                publish.topic = names::escape_topic(publish.topic);
                // Away sessions it matches get it on disk first (the
                // publisher's acknowledgement waits for that too).
                if let (true, Some(disk)) = (qos > 0, &self.shared.disk) {
                    let commits = self.shared.offline.capture(
                        disk,
                        &publish.topic,
                        &publish.payload,
                        qos,
                        publish.retain,
                        props.as_ref(),
                    );
                    if !commits.is_empty() {
                        // The publish goes on to the router at once; its
                        // acknowledgement waits (see `Session::outgoing`).
                        self.durable_acks.insert(publish_pkid(&publish), commits);
                    }
                }
                let (packet, commit) =
                    self.shared
                        .prepare_publish_durable(publish, qos, props, Some(&self.router_id));
                // A retained message goes on to the router (and its
                // subscribers) at once; its acknowledgement waits until it
                // is on disk (see `Session::outgoing`).
                if let (Some(commit), Packet::Publish(publish, _)) =
                    (commit.filter(|_| qos > 0), &packet)
                {
                    self.durable_acks
                        .entry(publish_pkid(publish))
                        .or_default()
                        .push(commit);
                }
                to_router.push(packet);
            }
            Packet::Subscribe(mut subscribe, props) => {
                let mut local: Vec<(usize, SubscribeReasonCode)> = Vec::new();
                let mut forwarded = Vec::new();
                let mut sys_changed = false;
                for (i, mut filter) in subscribe.filters.drain(..).enumerate() {
                    if let Err(e) = names::check_filter(&filter.path) {
                        return Err((e.to_string(), DisconnectReasonCode::TopicFilterInvalid));
                    }
                    if !self.may_subscribe(&filter.path) {
                        local.push((i, self.sub_failure(SubscribeReasonCode::NotAuthorized)));
                        continue;
                    }
                    let (share, rest) = names::split_share(&filter.path);
                    if share.is_empty() && crate::sys::is_sys_filter(&filter.path) {
                        // The broker's own topics: the front end serves
                        // them, the router never sees the filter.
                        let new = self.sys_subscribe(
                            &filter.path,
                            filter.qos,
                            filter.preserve_retain,
                            reply,
                        );
                        sys_changed = true;
                        local.push((i, SubscribeReasonCode::Success(filter.qos)));
                        if wants_retained(&filter.retain_forward_rule, new) {
                            self.pending_retained
                                .entry(subscribe.pkid)
                                .or_default()
                                .push((filter.path.clone(), filter.qos as u8));
                        }
                        continue;
                    }
                    if rest.starts_with('$') || (share.is_empty() && filter.path.starts_with('$')) {
                        // rumqttd disconnects on any other `$` filter (and matches no `$`
                        // topic); refusing the one filter is what clients expect.
                        local.push((i, self.sub_failure(SubscribeReasonCode::NotAuthorized)));
                        continue;
                    }
                    let path = names::escape_filter(&filter.path);
                    // The client's own bound first: a filter it may not
                    // have must not take room in the router's.
                    if self.past_own_bound(&path, &filter.path)
                        || !self.admitted(&path, &filter.path)
                    {
                        local.push((i, self.sub_failure(SubscribeReasonCode::QuotaExceeded)));
                        continue;
                    }
                    if let Some(group) = names::share_group(&path) {
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
                    let needed = &self.shared.needed;
                    if filter.nolocal && share.is_empty() {
                        Needed::set(&needed.origin);
                        self.nolocal_filters.insert(path.clone());
                    } else {
                        self.nolocal_filters.remove(&path);
                    }
                    if filter.preserve_retain {
                        Needed::set(&needed.retain);
                        self.rap_filters.insert(path.clone());
                    } else {
                        self.rap_filters.remove(&path);
                    }
                    if filter.qos == QoS::ExactlyOnce {
                        Needed::set(&needed.qos1);
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
                        if group.is_none() {
                            self.set_patience(&consumer);
                        }
                        self.consumers.push(Subscription {
                            path: path.clone(),
                            consumer,
                        });
                    }
                    if share.is_empty() && wants_retained(&filter.retain_forward_rule, new) {
                        self.pending_retained
                            .entry(subscribe.pkid)
                            .or_default()
                            .push((path.clone(), filter.qos as u8));
                    }
                    filter.path = path;
                    forwarded.push(filter);
                }
                if !forwarded.is_empty() {
                    let mut guard = self.subscriptions.lock().unwrap_or_else(|p| p.into_inner());
                    let subs = &mut *guard;
                    for f in &forwarded {
                        subs.filters.insert(f.path.clone());
                        subs.qos.insert(f.path.clone(), f.qos);
                        for (mine, kept) in [
                            (&self.nolocal_filters, &mut subs.nolocal),
                            (&self.rap_filters, &mut subs.rap),
                        ] {
                            if mine.contains(&f.path) {
                                kept.insert(f.path.clone());
                            } else {
                                kept.remove(&f.path);
                            }
                        }
                    }
                }
                if !forwarded.is_empty() {
                    // Acknowledged once the session's record says so.
                    if let Some(commit) = self.save_kept(false) {
                        self.disk_commits.push(commit);
                    }
                }
                if sys_changed && forwarded.is_empty() {
                    // Not awaited: a `$SYS` subscription lost with the
                    // broker costs its client a few rounds of figures.
                    drop(self.save_kept(false));
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
                    // `$SYS` values, after the SUBACK as retained messages are.
                    self.deliver_retained(subscribe.pkid, reply);
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
                let mut sys_changed = false;
                for filter in &unsubscribe.filters {
                    if filter.is_empty() || filter.contains('\0') {
                        return Err((
                            format!("invalid filter {filter:?} in UNSUBSCRIBE"),
                            DisconnectReasonCode::TopicFilterInvalid,
                        ));
                    }
                    if crate::sys::is_sys_filter(filter) {
                        let existed = self.sys_unsubscribe(filter);
                        sys_changed |= existed;
                        known.push(existed);
                        continue;
                    }
                    let path = names::escape_filter(filter);
                    let exists = self.filters.remove(&path);
                    if exists {
                        self.drop_consumers(|p| p == path);
                        self.nolocal_filters.remove(&path);
                        self.rap_filters.remove(&path);
                    }
                    known.push(exists);
                    if exists {
                        forwarded.push(path);
                    }
                }
                if !forwarded.is_empty() {
                    // rumqttd drops the client from every shared group on any unsubscribe.
                    self.shared.leave_groups(&self.router_id);
                    let mut subs = self.subscriptions.lock().unwrap_or_else(|p| p.into_inner());
                    for path in &forwarded {
                        subs.filters.remove(path);
                        subs.qos.remove(path);
                        subs.nolocal.remove(path);
                        subs.rap.remove(path);
                    }
                }
                if !forwarded.is_empty() {
                    // Acknowledged once the session's record says so.
                    if let Some(commit) = self.save_kept(false) {
                        self.disk_commits.push(commit);
                    }
                }
                if sys_changed && forwarded.is_empty() {
                    drop(self.save_kept(false));
                }
                if forwarded.is_empty() {
                    let reasons = known
                        .iter()
                        .map(|&existed| {
                            if existed {
                                UnsubAckReason::Success
                            } else {
                                UnsubAckReason::NoSubscriptionExisted
                            }
                        })
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
            Packet::Disconnect(disconnect, props) => {
                if let Some(expiry) = props.and_then(|p| p.session_expiry_interval) {
                    if self.session_expiry.load(Ordering::Relaxed) == 0 && expiry > 0 {
                        // MQTT-3.14.2-2: a session that was to end cannot be extended now.
                        return Err((
                            "DISCONNECT sets a session expiry the CONNECT did not".into(),
                            DisconnectReasonCode::ProtocolError,
                        ));
                    }
                    self.session_expiry.store(
                        expiry.min(self.shared.config.max_session_expiry),
                        Ordering::Relaxed,
                    );
                }
                let with_will =
                    disconnect.reason_code == DisconnectReasonCode::DisconnectWithWillMessage;
                if !with_will {
                    // Deleted now, not when the session has finished: a
                    // reconnect right behind this DISCONNECT must not find it.
                    self.take_will();
                }
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
                    self.qos2_in.remove(&pubrel.pkid);
                    to_router.push(Packet::PubRel(pubrel, None));
                }
            }
            Packet::PubAck(ack, props) => {
                if self.acked(ack.pkid, to_router).is_some() {
                    self.window_freed(reply);
                } else {
                    to_router.push(Packet::PubAck(ack, props));
                }
            }
            Packet::PubRec(rec, props) => match self.acked(rec.pkid, to_router) {
                // A retained QoS 2 message the front end sent: it answers.
                Some(true) => {
                    self.local_pubrel.insert(rec.pkid);
                    self.encode(
                        Packet::PubRel(
                            PubRel {
                                pkid: rec.pkid,
                                reason: PubRelReason::Success,
                            },
                            None,
                        ),
                        reply,
                    );
                }
                Some(false) => {}
                None => to_router.push(Packet::PubRec(rec, props)),
            },
            Packet::PubComp(comp, props) => {
                self.window_freed(reply);
                if !self.local_pubrel.remove(&comp.pkid) {
                    to_router.push(Packet::PubComp(comp, props));
                }
            }
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

    /// The outlet's publishes as the router must get them, checked like
    /// the client's own: a topic the client could not publish to is
    /// dropped with a warning (the owner publishes only to topics its
    /// clients named: a bad Response Topic lands here).
    pub(super) fn injected_packets(&self, batch: impl Iterator<Item = Injected>) -> Vec<Packet> {
        let mut packets = Vec::new();
        for p in batch {
            if let Err(err) = names::check_topic(&p.topic) {
                warn!(client_id = self.client_id, topic = %String::from_utf8_lossy(&p.topic), %err, "queue owner publish dropped: invalid topic");
                continue;
            }
            if !self.may_publish(&p.topic) {
                continue;
            }
            let topic = names::escape_topic(p.topic);
            let publish = super::make_publish(
                topic,
                p.payload,
                QoS::AtLeastOnce,
                p.retain,
                super::OUTLET_PKID,
            );
            packets.push(self.shared.prepare_owned_publish(
                publish,
                QoS::AtLeastOnce as u8,
                p.properties.map(|p| *p),
                Some(&self.router_id),
            ));
        }
        packets
    }

    /// True if `path` (router form of the client's `filter`) would be one
    /// filter more than this session may hold; counts and logs (once per
    /// episode) the refusal. A filter it holds already is subscribed again.
    fn past_own_bound(&self, path: &str, filter: &str) -> bool {
        let Some(max) = self.filter_bound else {
            return false;
        };
        if self.filters.len() < max || self.filters.contains(path) {
            return false;
        }
        self.shared
            .filters_refused_per_client
            .fetch_add(1, Ordering::Relaxed);
        self.bound_refusals
            .refuse(&self.client_id, filter, move |e| {
                warn!(
                    client_id = e.first_client_id,
                    refused = e.refused,
                    max_filters_per_client = max,
                    first_filter = e.first_filter,
                    "per-client filter bound reached; subscriptions refused"
                )
            });
        true
    }

    /// True if the router has room for `path` (router form of the
    /// client's `filter`); logs a refusal once per episode.
    fn admitted(&self, path: &str, filter: &str) -> bool {
        if self.shared.admit_filter(path) {
            return true;
        }
        let max = self.shared.config.max_filters;
        self.shared
            .filters_refused_at_limit
            .fetch_add(1, Ordering::Relaxed);
        self.shared
            .filter_limit_refusals
            .refuse(&self.client_id, filter, move |e| {
                warn!(
                    refused = e.refused,
                    clients = e.clients.len(),
                    first_client_id = e.first_client_id,
                    first_filter = e.first_filter,
                    max_filters = max,
                    "filter limit reached; subscriptions refused until a router renewal frees room"
                )
            });
        false
    }

    /// Asks the ACL (if any) about a publish; logs and counts a denial.
    pub(super) fn may_publish(&self, topic: &Bytes) -> bool {
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
    pub(super) fn may_subscribe(&self, filter: &str) -> bool {
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
    /// A request to the queue owner (`…/queue/<q>/enqueue` or `…/cmd`)
    /// names where the owner should answer: the Response Topic, and for
    /// `cmd` the body's `replyTo`. The owner publishes with its own rights,
    /// so the client must itself be allowed to publish there, or the owner
    /// would write for it where it may not (another queue's `ack`, a
    /// heartbeat, another user's topic).
    fn may_ask_reply(
        &self,
        publish: &Publish,
        props: Option<&rumqttd::protocol::PublishProperties>,
    ) -> Result<(), &'static str> {
        if self.shared.config.auth.is_none() || !names::is_queue_request(&publish.topic) {
            return Ok(());
        }
        let mut asked: Vec<String> = props
            .and_then(|p| p.response_topic.clone())
            .into_iter()
            .collect();
        if publish.topic.ends_with(b"/cmd") {
            #[derive(serde::Deserialize)]
            struct Cmd {
                #[serde(rename = "replyTo")]
                reply_to: Option<String>,
            }
            if let Ok(Cmd { reply_to: Some(to) }) = serde_json::from_slice(&publish.payload) {
                asked.push(to);
            }
        }
        for topic in asked {
            if !self.may_publish(&Bytes::from(topic)) {
                return Err("not authorized to publish on the reply topic");
            }
        }
        Ok(())
    }

    pub(super) fn refuse_publish(
        &mut self,
        publish: &Publish,
        qos: u8,
        reply: &mut BytesMut,
        reason: Option<&str>,
    ) {
        let pkid = publish_pkid(publish);
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
                    reason.filter(|_| v5).map(|r| PubAckProperties {
                        reason_string: Some(r.to_string()),
                        user_properties: Vec::new(),
                    }),
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
                        reason.filter(|_| v5).map(|r| PubRecProperties {
                            reason_string: Some(r.to_string()),
                            user_properties: Vec::new(),
                        }),
                    ),
                    reply,
                );
            }
            _ => {}
        }
    }

    pub(super) fn sub_failure(&self, v5: SubscribeReasonCode) -> SubscribeReasonCode {
        if self.codec.is_v5() {
            v5
        } else {
            SubscribeReasonCode::Failure
        }
    }
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

/// The packet id of a client's publish.
fn publish_pkid(publish: &rumqttd::protocol::Publish) -> u16 {
    crate::router::qos_pkid(publish).1
}

/// MQTT 5 Retain Handling: whether a subscription gets the retained
/// messages it matches (`new`: the filter was not subscribed before).
fn wants_retained(rule: &RetainForwardRule, new: bool) -> bool {
    match rule {
        RetainForwardRule::OnEverySubscribe => true,
        RetainForwardRule::OnNewSubscribe => new,
        RetainForwardRule::Never => false,
    }
}
