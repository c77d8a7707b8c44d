//! A session's `$SYS` subscriptions, served by the front end from the
//! broker's own values (see [`crate::sys`]): the router never holds the
//! filters nor sees the topics.

use bytes::BytesMut;
use rumqttd::protocol::{Packet, QoS};

use super::{make_publish, Session};
use crate::expiry::SysFilter;

impl Session {
    /// Holds `$SYS` filter `filter` (client form); true if it is new.
    /// What its earlier `$SYS` filters are owed goes into `reply` first:
    /// from here on the rounds are counted for all of them together.
    pub(super) fn sys_subscribe(
        &mut self,
        filter: &str,
        qos: QoS,
        rap: bool,
        reply: &mut BytesMut,
    ) -> bool {
        if !self.sys_filters.is_empty() {
            self.sys_updates(reply);
        }
        let new = self.sys_filters.insert(filter.to_string(), rap).is_none();
        self.subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sys
            .insert(
                filter.to_string(),
                SysFilter {
                    qos: qos as u8,
                    rap,
                },
            );
        self.watch_sys();
        new
    }

    /// Drops `$SYS` filter `filter`; true if it held it.
    pub(super) fn sys_unsubscribe(&mut self, filter: &str) -> bool {
        let held = self.sys_filters.remove(filter).is_some();
        self.subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sys
            .remove(filter);
        if self.sys_filters.is_empty() {
            self.sys_rx = None;
        }
        held
    }

    /// Starts waiting for new rounds of `$SYS` values, if not already.
    pub(super) fn watch_sys(&mut self) {
        if self.sys_rx.is_none() {
            self.sys_rx = Some(self.shared.sys.subscribe());
            self.sys_seen = self.shared.sys.round();
        }
    }

    /// Encodes the `$SYS` values changed since the last round this client
    /// was sent that its filters match: QoS 0 (as the broker publishes
    /// them), retained only for a retain-as-published filter, withheld by
    /// the deny list like any topic, and never over the client's maximum
    /// packet size.
    pub(super) fn sys_updates(&mut self, out: &mut BytesMut) {
        let (changed, round) = self
            .shared
            .sys
            .changed_since(self.sys_seen, self.sys_filters.keys().map(String::as_str));
        self.sys_seen = round;
        for (topic, payload) in changed {
            if self.withheld(&topic) {
                continue;
            }
            let topic_str = String::from_utf8_lossy(&topic);
            let rap = self
                .sys_filters
                .iter()
                .any(|(f, rap)| *rap && axion_access::acl::topic_matches(f, &topic_str));
            let publish = make_publish(topic, payload, QoS::AtMostOnce, rap, 0);
            let start = out.len();
            self.encode(Packet::Publish(publish, None), out);
            if out.len() - start > self.client_max_packet {
                out.truncate(start);
            }
        }
    }
}
