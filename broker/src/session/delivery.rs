//! Router to client: each delivery at the QoS, retain flag and expiry MQTT
//! asks for, the ledger that hands acknowledgements back to the router in
//! the order it insists on, the client's receive window, and the retained
//! messages the front end sends itself.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{Packet, Publish, PublishProperties, QoS, UnsubAck, UnsubAckReason};
use rumqttd::Notification;
use tracing::{debug, warn};

use super::aliases::Outgoing;
use super::{make_publish, now_or_never, Ending, Session, Waiting, EAGER_PKIDS, RESUBSCRIBE_PKID};
use crate::marks::Mark;
use crate::names;
use crate::offline::LiveCopy;
use crate::router::{puback, pubcomp, pubrec};
use axion_queues::tap::Tap;

/// Packet ids the front end uses for its own QoS 1 and 2 publishes,
/// above the router's range.
pub(super) const LOCAL_PKIDS: std::ops::RangeInclusive<u16> = 1000..=u16::MAX;

/// One publish the router handed over with QoS > 0, or one the front end
/// sent itself. rumqttd disconnects a link that acknowledges out of order
/// (PUBACK and PUBREC alike), while MQTT lets clients acknowledge in any
/// order: the ledger releases acknowledgements to the router in the order
/// it sent. Local slots are never released to the router; deliveries the
/// client will not acknowledge (sent at QoS 0, or discarded) are acked at
/// once.
#[derive(Debug)]
pub(super) struct Slot {
    pub(super) pkid: u16,
    pub(super) local: bool,
    pub(super) acked: bool,
    /// The router sent it at QoS 2: it expects PUBREC, not PUBACK.
    pub(super) rec: bool,
    /// A task the embedded queue owner delivered (topic, payload): given
    /// back to it if the client never acknowledges it (see
    /// [`Session::give_back_tasks`]).
    pub(super) task: Option<Box<(Bytes, Bytes)>>,
    /// A message of this session's offline queue (sequence number, bytes
    /// on disk): deleted from it once the client acknowledges it.
    pub(super) queued: Option<(u64, u64)>,
}

impl Slot {
    /// A delivery of the front end's own (retained, queued, or taken over
    /// from the router): never released to the router.
    fn local(pkid: u16, queued: Option<(u64, u64)>) -> Self {
        Slot {
            pkid,
            local: true,
            acked: false,
            rec: false,
            task: None,
            queued,
        }
    }
}

/// The last few task ids delivered to a client, bounded.
#[derive(Debug, Default)]
pub(crate) struct Recent {
    order: VecDeque<String>,
    ids: HashSet<String>,
}

impl Recent {
    /// Enough for every task a worker can hold at once (its credit) and
    /// more, at a few kilobytes for a busy worker; nothing for the rest.
    const KEEP: usize = 1024;

    fn insert(&mut self, id: String) {
        if self.ids.insert(id.clone()) {
            self.order.push_back(id);
            if self.order.len() > Self::KEEP {
                if let Some(old) = self.order.pop_front() {
                    self.ids.remove(&old);
                }
            }
        }
    }

    pub(crate) fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }
}

impl Session {
    /// True if every subscription of this client matching the router-form
    /// `topic` asked for No Local (the router delivers one copy per
    /// matching subscription and does not say which).
    pub(super) fn only_nolocal_match(&self, topic: &Bytes) -> bool {
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

    /// True if only subscriptions dropped when the session resumed (its
    /// user may no longer hold them) match the router-form `topic`.
    pub(super) fn only_revoked_match(&self, topic: &Bytes) -> bool {
        if self.revoked.is_empty() {
            return false;
        }
        let Ok(topic) = std::str::from_utf8(topic) else {
            return false;
        };
        let matched = |filter: &String| {
            let (_, f) = names::split_share(filter);
            rumqttd::protocol::matches(topic, f)
        };
        self.revoked.iter().any(matched) && !self.filters.iter().any(matched)
    }

    /// Sends the QoS 1 or 2 publish encoded at `out[start..]` now, or keeps
    /// it until the client's receive window has room (MQTT-4.9.0-2).
    pub(super) fn send_windowed(&mut self, out: &mut BytesMut, start: usize) {
        self.send_or_wait(out, start, false);
    }

    /// [`Session::send_windowed`]; an `eager` publish (acknowledged to the
    /// router already) takes its packet id from [`EAGER_PKIDS`] as it goes.
    fn send_or_wait(&mut self, out: &mut BytesMut, start: usize, eager: bool) {
        if self.at_client < self.receive_max && self.window.is_empty() {
            if !eager {
                self.at_client += 1;
                return;
            }
            if let Some(pkid) = self.alloc_eager_pkid() {
                set_pkid(&mut out[start..], pkid);
                self.at_client += 1;
                return;
            }
        }
        let bytes = out.split_off(start);
        self.window_bytes += bytes.len();
        self.window.push_back(Waiting { bytes, eager });
    }

    /// A free id of [`EAGER_PKIDS`], held by a local ledger slot until the
    /// client acknowledges it.
    fn alloc_eager_pkid(&mut self) -> Option<u16> {
        let pkid = EAGER_PKIDS
            .clone()
            .find(|p| !self.eager_pkids.contains(p))?;
        self.eager_pkids.insert(pkid);
        self.ledger.push_back(Slot::local(pkid, None));
        Some(pkid)
    }

    /// One QoS 1 or 2 flow with the client ended: send what waits for room.
    pub(super) fn window_freed(&mut self, reply: &mut BytesMut) {
        self.at_client = self.at_client.saturating_sub(1);
        while self.at_client < self.receive_max {
            let Some(mut waiting) = self.window.pop_front() else {
                break;
            };
            if waiting.eager {
                let Some(pkid) = self.alloc_eager_pkid() else {
                    self.window.push_front(waiting);
                    break;
                };
                set_pkid(&mut waiting.bytes, pkid);
            }
            self.window_bytes -= waiting.bytes.len();
            reply.extend_from_slice(&waiting.bytes);
            self.at_client += 1;
        }
    }

    /// The client acknowledged `pkid` (PUBACK, or PUBREC for QoS 2):
    /// releases, in order, every acknowledgement the router may now have.
    /// `Some(local)` if the ledger knew it, `None` if not (the caller
    /// passes the ack on unchanged).
    pub(super) fn acked(&mut self, pkid: u16, to_router: &mut Vec<Packet>) -> Option<bool> {
        let slot = self
            .ledger
            .iter_mut()
            .find(|s| s.pkid == pkid && !s.acked)?;
        slot.acked = true;
        let local = slot.local;
        self.release_acks(to_router);
        Some(local)
    }

    /// Publishes how many router deliveries the router still waits to
    /// hear acknowledged (and would send again to a resumed session).
    pub(super) fn count_unacknowledged(&self) {
        let n = self.ledger.iter().filter(|s| !s.local).count();
        self.unacknowledged.store(n, Ordering::Relaxed);
    }

    pub(super) fn release_acks(&mut self, to_router: &mut Vec<Packet>) {
        while self.ledger.front().is_some_and(|s| s.acked) {
            if let Some(slot) = self.ledger.pop_front() {
                if !slot.local {
                    self.router_slots -= 1;
                }
                if EAGER_PKIDS.contains(&slot.pkid) {
                    self.eager_pkids.remove(&slot.pkid);
                }
                if let (true, Some((_, size))) = (slot.local, slot.queued) {
                    self.replay_unacked = self
                        .replay_unacked
                        .saturating_sub(usize::try_from(size).unwrap_or(usize::MAX));
                }
                if let (Some((seq, size)), Some(disk)) = (slot.queued, &self.shared.disk) {
                    self.shared
                        .offline
                        .delivered(disk, &self.router_id, seq, size);
                }
                if slot.local {
                    continue;
                }
                to_router.push(if slot.rec {
                    pubrec(slot.pkid)
                } else {
                    puback(slot.pkid)
                });
            }
        }
    }

    /// A free local packet id, given the ids in use; `None` once all of
    /// [`LOCAL_PKIDS`] are taken (the caller then sends at QoS 0).
    fn alloc_local_pkid(&mut self, used: &mut HashSet<u16>) -> Option<u16> {
        let span = usize::from(*LOCAL_PKIDS.end() - *LOCAL_PKIDS.start()) + 1;
        for _ in 0..span {
            let pkid = self.next_local_pkid;
            self.next_local_pkid = if pkid == *LOCAL_PKIDS.end() {
                *LOCAL_PKIDS.start()
            } else {
                pkid + 1
            };
            if used.insert(pkid) {
                return Some(pkid);
            }
        }
        None
    }

    /// Sends more of this session's queue while it reads it (see
    /// [`crate::offline`]): enough to fill its receive window, read from
    /// disk a batch at a time, so a long queue costs neither memory nor
    /// the subscriber buffer. Each message keeps a local packet id until
    /// the client acknowledges it and is deleted from the queue then; what
    /// the client may no longer receive is deleted now. False if the
    /// client is gone.
    pub(super) async fn pump_replay(&mut self) -> bool {
        const BATCH: usize = 256;
        // Bytes sent ahead of the client's acknowledgements (counted by
        // them, so each acknowledgement that frees room also sends more):
        // enough to keep it busy, far below the subscriber buffer.
        const AHEAD: usize = 1024 * 1024;
        let Some(disk) = self.shared.disk.clone() else {
            self.replay_from = None;
            return true;
        };
        let mut out = BytesMut::new();
        let mut used: Option<HashSet<u16>> = None;
        while self.window.is_empty()
            && self.at_client < self.receive_max
            && self.replay_unacked < AHEAD
        {
            let Some(m) = self.replay_buf.pop_front() else {
                let Some(from) = self.replay_from else {
                    break;
                };
                let batch = self
                    .shared
                    .offline
                    .next_replay(&disk, &self.router_id, from, BATCH)
                    .await;
                match batch.last() {
                    Some(last) => self.replay_from = Some(last.seq + 1),
                    None => {
                        debug!(
                            client_id = self.client_id,
                            "queue read to the end: live from here on"
                        );
                        self.replay_from = None;
                    }
                }
                self.replay_buf.extend(batch);
                continue;
            };
            let used = used.get_or_insert_with(|| {
                self.ledger
                    .iter()
                    .map(|s| s.pkid)
                    .chain(self.local_pubrel.iter().copied())
                    .collect()
            });
            let topic = names::unescape_topic(m.topic.clone());
            if self.withheld(&topic) || self.only_revoked_match(&m.topic) {
                self.shared
                    .offline
                    .delivered(&disk, &self.router_id, m.seq, m.size);
                continue;
            }
            let Some(pkid) = self.alloc_local_pkid(used) else {
                // Every id is held: the rest waits for acknowledgements.
                self.replay_buf.push_front(m);
                break;
            };
            let mut props = m.properties;
            if let Some(expiry) = props
                .as_mut()
                .and_then(|p| p.message_expiry_interval.as_mut())
            {
                // MQTT-3.3.2-6: the interval left.
                let waited = u32::try_from(m.age.as_secs()).unwrap_or(u32::MAX);
                *expiry = expiry.saturating_sub(waited).max(1);
            }
            let qos = if m.qos >= 2 {
                QoS::ExactlyOnce
            } else {
                QoS::AtLeastOnce
            };
            self.ledger
                .push_back(Slot::local(pkid, Some((m.seq, m.size))));
            self.replay_unacked += usize::try_from(m.size).unwrap_or(usize::MAX);
            let publish = make_publish(topic, m.payload, qos, m.retain, pkid);
            let start = out.len();
            self.encode(Packet::Publish(publish, props), &mut out);
            if m.dup {
                // MQTT-3.3.1-1: sent before, unacknowledged.
                out[start] |= 0x08;
            }
            self.send_windowed(&mut out, start);
        }
        self.send_bytes(out).await
    }

    /// Writes the retained messages for the filters of SUBSCRIBE `pkid`.
    ///
    /// A QoS 1/2 retained message takes a local packet id until the client
    /// acknowledges it; a subscription matching more retained messages than
    /// there are ids (64 536) gets the rest at QoS 0 rather than waiting,
    /// said once in the log. The ids in use are gathered once per call, so
    /// a large burst costs no scan per message.
    pub(super) fn deliver_retained(&mut self, pkid: u16, out: &mut BytesMut) {
        let Some(filters) = self.pending_retained.remove(&pkid) else {
            return;
        };
        let mut used: HashSet<u16> = self
            .ledger
            .iter()
            .map(|s| s.pkid)
            .chain(self.local_pubrel.iter().copied())
            .collect();
        let mut downgraded = 0usize;
        for (filter, sub_qos) in filters {
            for (topic, retained) in self.shared.retained_matching(&filter) {
                let topic = names::unescape_topic(topic);
                if self.withheld(&topic) {
                    continue;
                }
                let wanted = retained.qos.min(sub_qos);
                // Once the ids ran out they stay out for this burst.
                let id = if wanted > 0 && downgraded == 0 {
                    self.alloc_local_pkid(&mut used)
                } else {
                    None
                };
                if wanted > 0 && id.is_none() {
                    downgraded += 1;
                }
                let (qos, pkid) = match (wanted, id) {
                    (1, Some(id)) => (QoS::AtLeastOnce, id),
                    (2.., Some(id)) => (QoS::ExactlyOnce, id),
                    _ => (QoS::AtMostOnce, 0),
                };
                if pkid != 0 {
                    self.ledger.push_back(Slot::local(pkid, None));
                }
                let publish = make_publish(topic, retained.payload, qos, true, pkid);
                let start = out.len();
                let props = retained.properties.map(|p| *p);
                self.encode(Packet::Publish(publish, props), out);
                if pkid != 0 {
                    self.send_windowed(out, start);
                }
            }
        }
        if downgraded > 0 {
            warn!(
                client_id = self.client_id,
                downgraded,
                "more retained messages than packet ids for one subscription: the rest sent at QoS 0"
            );
        }
    }

    /// Writes one router notification (and any already queued behind it).
    pub(super) async fn outgoing(&mut self, first: Notification) -> Option<Ending> {
        let mut out = BytesMut::new();
        let mut wake = false;
        let mut release = false;
        let mut delivered = false;
        let mut ending = None;
        let mut next = Some(first);
        let mut budget = 1024;
        let mut router_acks = Vec::new();
        while let Some(notification) = next.take() {
            match notification {
                Notification::Forward(forward) => {
                    let repeat = self.only_a_share_matches(&forward.publish.topic)
                        && self
                            .repeats
                            .is_repeat(forward.cursor, &forward.publish.payload);
                    if repeat {
                        self.shared.share_repeats.fetch_add(1, Ordering::Relaxed);
                        debug!(client_id = self.client_id, cursor = ?forward.cursor, "router forwarded a $share message twice; second copy dropped");
                    } else {
                        match Mark::marker_round(&forward.properties) {
                            Some(round) => self.shared.renewal.marker_copy(&self.live, round),
                            None => {
                                self.delivered(&forward.publish.topic, &forward.publish.payload);
                                delivered = true;
                            }
                        }
                    }
                    release |= self.deliver(forward.publish, forward.properties, repeat, &mut out);
                }
                Notification::DeviceAck(ack) => match self.patch_ack(Packet::from(ack)) {
                    // A QoS 2 delivery the client got at a lower QoS: its
                    // flow with the router ends here.
                    Packet::PubRel(rel, _) if self.downgraded.remove(&rel.pkid) => {
                        router_acks.push(pubcomp(rel.pkid));
                    }
                    Packet::SubAck(s, _) if s.pkid == RESUBSCRIBE_PKID && self.resubscribing => {
                        self.resubscribing = false;
                    }
                    // Only a renewal's barrier asks the router for one.
                    Packet::PingResp(_) => self.barrier_passed(),
                    Packet::PubAck(ack, _) if ack.pkid == super::OUTLET_PKID => {}
                    // What the broker acknowledges is on disk: a publish
                    // captured for kept sessions, or retained, waits for
                    // its commits; an enqueue waits for the queue owner's
                    // verdict. The session goes on meanwhile, and the
                    // acknowledgements behind it wait in order
                    // (MQTT-4.6.0-2).
                    packet @ (Packet::PubAck(..) | Packet::PubRec(..))
                        if !self.pending_acks.is_empty()
                            || self.durable_acks.contains_key(&client_ack_pkid(&packet))
                            || self.verdicts.contains_key(&client_ack_pkid(&packet)) =>
                    {
                        let pkid = client_ack_pkid(&packet);
                        let commits = self.durable_acks.remove(&pkid).unwrap_or_default();
                        let verdict = self.verdicts.remove(&pkid);
                        self.pending_acks.push_back(Box::pin(async move {
                            for commit in commits {
                                let _ = commit.await;
                            }
                            match (packet, verdict) {
                                (Packet::PubAck(ack, props), Some(verdict)) => {
                                    enqueue_ack(ack, props, verdict).await
                                }
                                (packet, _) => packet,
                            }
                        }));
                    }
                    Packet::PubRec(rec, props) => {
                        // The router holds this QoS 2 publish until PUBREL.
                        self.qos2_in.insert(rec.pkid);
                        self.encode(Packet::PubRec(rec, props), &mut out);
                    }
                    packet => {
                        let suback = match &packet {
                            Packet::SubAck(s, _) => Some(s.pkid),
                            _ => None,
                        };
                        self.encode(packet, &mut out);
                        if let Some(pkid) = suback {
                            self.deliver_retained(pkid, &mut out);
                        }
                    }
                },
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
        self.ready_acks(&mut out).await;
        if !self.send_bytes(out).await {
            return Some(ending.unwrap_or(Ending::Lost));
        }
        if delivered {
            self.shared.flow.progressed();
        }
        router_acks.append(&mut self.eager_acks);
        if release {
            self.release_acks(&mut router_acks);
        }
        if delivered {
            self.count_unacknowledged();
        }
        if self.forward(router_acks).await.is_err() {
            return Some(Ending::Kicked);
        }
        if wake && self.link_rx.wake().await.is_err() {
            return Some(Ending::Kicked);
        }
        let limit = self.shared.config.max_subscriber_buffer;
        if ending.is_none() && self.backlog() > limit {
            self.shared
                .flow
                .slow_consumers_disconnected
                .fetch_add(1, Ordering::Relaxed);
            warn!(
                client_id = self.client_id,
                backlog_bytes = self.backlog(),
                limit,
                "disconnected: it stopped taking what it subscribed to and its buffer is full"
            );
            self.disconnect_client(rumqttd::protocol::DisconnectReasonCode::QuotaExceeded)
                .await;
            return Some(Ending::Lost);
        }
        ending
    }

    /// Encodes acknowledgements at the front of `pending_acks` that are
    /// ready, in order, into `out`.
    pub(super) async fn ready_acks(&mut self, out: &mut BytesMut) {
        while let Some(front) = self.pending_acks.front_mut() {
            let Some(packet) = now_or_never(front.as_mut()).await else {
                return;
            };
            self.pending_acks.pop_front();
            self.encode_ack(packet, out);
        }
    }

    /// Encodes an acknowledgement taken from `pending_acks`.
    pub(super) fn encode_ack(&mut self, packet: Packet, out: &mut BytesMut) {
        if let Packet::PubRec(rec, _) = &packet {
            // The router holds this QoS 2 publish until PUBREL.
            self.qos2_in.insert(rec.pkid);
        }
        self.encode(packet, out);
    }

    /// Encodes one publish from the router into `out` as this client must
    /// get it: at min(publish QoS, subscription QoS), with retain as
    /// published if asked, under a topic alias if the client takes them,
    /// and not at all if it exceeds the client's maximum packet size or is
    /// the client's own under No Local. True if the ledger holds an
    /// acknowledgement to release now.
    pub(super) fn deliver(
        &mut self,
        mut publish: Publish,
        mut props: Option<PublishProperties>,
        repeat: bool,
        out: &mut BytesMut,
    ) -> bool {
        let mark = Mark::take(&mut props);
        // A kept session skips the router's copies of what it gets from its
        // queue, and deletes a message's journal entry once its client
        // acknowledges it (see `crate::offline`).
        let live = if !self.clean_session && self.shared.disk.is_some() {
            let hash = self.shared.offline.hash(&publish.topic, &publish.payload);
            self.shared.offline.live_copy(&self.router_id, hash)
        } else {
            LiveCopy::Deliver(None)
        };
        let (queued_copy, journaled) = match live {
            LiveCopy::Skip => (true, None),
            LiveCopy::Deliver(entry) => (false, entry),
        };
        let own = mark.origin.as_deref() == Some(self.router_id.as_str());
        let not_for_me = (own && self.only_nolocal_match(&publish.topic))
            || self.only_revoked_match(&publish.topic);
        let as_published = mark.retain && self.retain_as_published(&publish.topic);
        let task = self
            .shared
            .queue_tap
            .get()
            .filter(|tap| self.is_worker_task(tap, &publish.topic))
            .map(|_| Box::new((publish.topic.clone(), publish.payload.clone())));
        if let Some(id) = task.as_ref().and_then(|t| axion_queues::tap::task_id(&t.1)) {
            self.received_tasks.insert(id);
        }
        publish.topic = names::unescape_topic(publish.topic);
        let withheld = self.withheld(&publish.topic);
        let alias = self.aliases.outgoing(&publish.topic);
        let topic = publish.topic.clone();
        match alias {
            Some(Outgoing::Known(a)) => {
                props.get_or_insert_with(Default::default).topic_alias = Some(a);
                publish.topic = Bytes::new();
            }
            Some(Outgoing::New(a)) => {
                props.get_or_insert_with(Default::default).topic_alias = Some(a);
            }
            None => {}
        }
        // Kept only for a QoS 0 publish, which may need re-encoding.
        let at_qos0 = (mark.qos == Some(0)).then(|| {
            (
                publish.topic.clone(),
                publish.payload.clone(),
                props.clone(),
            )
        });
        let start = out.len();
        self.encode(Packet::Publish(publish, props), out);
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
        let discard =
            not_for_me || oversize || repeat || withheld || queued_copy || mark.marker.is_some();
        if let (false, Some(Outgoing::New(a))) = (discard, alias) {
            self.aliases.learned(&topic, a);
        }
        let Some((router_qos, pkid)) = outgoing_qos_pkid(&out[start..]) else {
            self.forget_journaled(journaled);
            if discard {
                out.truncate(start);
            } else if as_published {
                out[start] |= 0x01;
            }
            return false;
        };
        let qos = router_qos.min(mark.qos.unwrap_or(2));
        // The router sends what the previous connection left unacknowledged
        // first; it does not say so (MQTT-3.3.1-1).
        let dup = self.redeliver > 0 && qos > 0;
        self.redeliver = self.redeliver.saturating_sub(1);
        if discard {
            out.truncate(start);
        } else if qos == 0 {
            out.truncate(start);
            if let Some((topic, payload, props)) = at_qos0 {
                let publish = make_publish(topic, payload, QoS::AtMostOnce, as_published, 0);
                self.encode(Packet::Publish(publish, props), out);
            }
        } else {
            // Same length at QoS 1 and 2: patch the fixed header in place.
            out[start] = (out[start] & !0x06)
                | (qos << 1)
                | u8::from(as_published)
                | if dup { 0x08 } else { 0 };
            // A clean session keeps what its client has not taken itself
            // (bounded, see `Session::backlog`): the router is acknowledged
            // at once and goes on sending, so a client that stops reading
            // never holds publishers back. Only while nothing older waits
            // for its acknowledgement (the router insists on order); not
            // for queue tasks, which go back to the queue if unacknowledged.
            if self.clean_session && router_qos == 1 && self.router_slots == 0 && task.is_none() {
                self.eager_acks.push(puback(pkid));
                self.send_or_wait(out, start, true);
                return false;
            }
            self.send_windowed(out, start);
        }
        // Not sent with an acknowledgement to come: ack the router's copy now.
        let acked = discard || qos == 0;
        if router_qos == 2 && (acked || qos < 2) {
            self.downgraded.insert(pkid);
        }
        if acked {
            // Sent at QoS 0 or not at all: nothing of it to keep.
            self.forget_journaled(journaled);
        }
        if acked && self.router_slots == 0 {
            // Nothing older waits for its acknowledgement: it goes now,
            // without a ledger slot that would keep the next deliveries
            // from being taken over.
            self.eager_acks.push(if router_qos == 2 {
                pubrec(pkid)
            } else {
                puback(pkid)
            });
            return false;
        }
        self.router_slots += 1;
        self.ledger.push_back(Slot {
            pkid,
            local: false,
            acked,
            rec: router_qos == 2,
            task: task.filter(|_| !acked),
            queued: journaled.filter(|_| !acked),
        });
        acked
    }

    /// Deletes the journal entry of a delivery the client will not
    /// acknowledge.
    fn forget_journaled(&self, journaled: Option<(u64, u64)>) {
        if let (Some((seq, size)), Some(disk)) = (journaled, &self.shared.disk) {
            self.shared
                .offline
                .delivered(disk, &self.router_id, seq, size);
        }
    }

    /// True if the deny list withholds a message on (client-form) `topic`
    /// from every subscriber.
    pub(super) fn withheld(&self, topic: &Bytes) -> bool {
        self.shared
            .config
            .auth
            .as_ref()
            .is_some_and(|auth| std::str::from_utf8(topic).is_ok_and(|t| auth.withholds(t)))
    }

    /// True if a subscription of this client matching the router-form
    /// `topic` asked for retain-as-published.
    pub(super) fn retain_as_published(&self, topic: &Bytes) -> bool {
        if self.rap_filters.is_empty() {
            return false;
        }
        let Ok(topic) = std::str::from_utf8(topic) else {
            return false;
        };
        self.rap_filters.iter().any(|filter| {
            let (_, f) = names::split_share(filter);
            rumqttd::protocol::matches(topic, f)
        })
    }

    /// Splices the front end's own answers into the router's SUBACK/UNSUBACK.
    pub(super) fn patch_ack(&mut self, packet: Packet) -> Packet {
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

    /// True if the router-form `topic` matches exactly one subscription of
    /// this client and that one is a `$share` (see [`super::repeats`]).
    fn only_a_share_matches(&self, topic: &Bytes) -> bool {
        if !self
            .consumers
            .iter()
            .any(|sub| sub.path.starts_with("$share/"))
        {
            return false;
        }
        let Ok(topic) = std::str::from_utf8(topic) else {
            return false;
        };
        let mut matching = self.consumers.iter().filter(|sub| {
            let (_, filter) = names::split_share(&sub.path);
            rumqttd::protocol::matches(topic, filter)
        });
        matches!(
            (matching.next(), matching.next()),
            (Some(sub), None) if sub.path.starts_with("$share/")
        )
    }

    /// Counts a forwarded message against every subscription it matches.
    pub(super) fn delivered(&self, topic: &Bytes, payload: &Bytes) {
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
    pub(super) fn drop_consumers(&mut self, which: impl Fn(&str) -> bool) {
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
    /// True if the router-form `topic` is a task of the embedded queue
    /// owner that came to this client as a worker: only a `$share`
    /// subscription matched it (an observer's `axion/#` copy is not the one
    /// the owner counts on). Task topics start with `axion/`, which the
    /// router form never escapes.
    fn is_worker_task(&self, tap: &Tap, topic: &Bytes) -> bool {
        tap.is_task(topic) && self.only_a_share_matches(topic)
    }

    /// Reads what the router sent this ended session's link after it
    /// stopped reading, until the router lets go of the link (called once
    /// the router has the session's DISCONNECT). rumqttd does not send it
    /// again to a later link of the same id, so:
    /// - a kept session counts it read for flow control: otherwise its
    ///   parked positions would show it unread for as long as the session
    ///   is away, and a router renewal and a clean stop, which wait for
    ///   away sessions to catch up, would wait for it in vain (what a kept
    ///   session is owed is in its queue already, journaled or captured);
    /// - a shared-group member hands the embedded queue owner back every
    ///   task it was sent and never acknowledged receiving, and every one
    ///   it never read, as this client's `release`: the owner delivers it
    ///   again at once, to a live worker, without counting an attempt
    ///   (`give_back`: not at a shutdown, when the owner is stopping too).
    pub(super) async fn read_what_is_left(&mut self, give_back: bool) {
        let shared = self.shared.clone();
        let tap = shared.queue_tap.get();
        let mut tasks: Vec<(Bytes, Bytes)> = match tap {
            Some(_) if give_back => self
                .ledger
                .iter_mut()
                .filter(|slot| !slot.acked)
                .filter_map(|slot| slot.task.take().map(|task| *task))
                .collect(),
            _ => Vec::new(),
        };
        let member = self
            .consumers
            .iter()
            .any(|sub| sub.path.starts_with("$share/"));
        let parks = !self.clean_session && !self.consumers.is_empty();
        if member || parks {
            let deadline = tokio::time::Instant::now() + LINK_RELEASE;
            loop {
                match tokio::time::timeout_at(deadline, self.link_rx.next()).await {
                    Ok(Ok(Some(Notification::Forward(forward)))) => {
                        let publish = forward.publish;
                        if Mark::marker_round(&forward.properties).is_some() {
                            continue;
                        }
                        if parks {
                            self.delivered(&publish.topic, &publish.payload);
                        }
                        let task = tap.is_some_and(|tap| {
                            give_back && self.is_worker_task(tap, &publish.topic)
                        });
                        if task {
                            tasks.push((publish.topic, publish.payload));
                        }
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => break,
                    Err(_) => {
                        debug!(
                            client_id = self.client_id,
                            "the router kept the link of an ended session"
                        );
                        break;
                    }
                }
            }
        }
        if let Some(tap) = tap {
            for (topic, payload) in tasks {
                tap.give_back(&topic, &payload, &self.client_id).await;
            }
        }
    }
}

/// Longest an ended session waits for the router to drop its link.
const LINK_RELEASE: Duration = Duration::from_secs(2);

/// The packet id of a PUBACK or PUBREC for a client's publish.
fn client_ack_pkid(packet: &Packet) -> u16 {
    match packet {
        Packet::PubAck(a, _) => a.pkid,
        Packet::PubRec(r, _) => r.pkid,
        _ => 0,
    }
}

/// Rewrites the packet id of an encoded PUBLISH with QoS > 0.
fn set_pkid(packet: &mut [u8], pkid: u16) {
    let mut i = 1;
    while packet.get(i).is_some_and(|b| b & 0x80 != 0) {
        i += 1;
    }
    i += 1;
    let Some(len) = packet.get(i..i + 2) else {
        return;
    };
    let at = i + 2 + usize::from(u16::from_be_bytes([len[0], len[1]]));
    if let Some(id) = packet.get_mut(at..at + 2) {
        id.copy_from_slice(&pkid.to_be_bytes());
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

/// Longest a PUBACK waits for the queue owner's verdict on an enqueue: the
/// owner decides as it takes the task in, long before the task is on disk,
/// so this bounds only an owner that is behind or still loading its store
/// (the reply topic tells the producer either way).
const VERDICT_WAIT: Duration = Duration::from_secs(1);

/// The PUBACK of an enqueue: the router's, or 0x97 with the owner's reason
/// if the queue refused the task.
async fn enqueue_ack(
    ack: rumqttd::protocol::PubAck,
    props: Option<rumqttd::protocol::PubAckProperties>,
    verdict: tokio::sync::oneshot::Receiver<String>,
) -> Packet {
    match tokio::time::timeout(VERDICT_WAIT, verdict).await {
        Ok(Ok(reason)) => Packet::PubAck(
            rumqttd::protocol::PubAck {
                pkid: ack.pkid,
                reason: rumqttd::protocol::PubAckReason::QuotaExceeded,
            },
            Some(rumqttd::protocol::PubAckProperties {
                reason_string: Some(reason),
                user_properties: Vec::new(),
            }),
        ),
        // Taken, or no verdict in time.
        _ => Packet::PubAck(ack, props),
    }
}
