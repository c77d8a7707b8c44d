//! How an Axion client connects to the broker: one set of MQTT 5 options
//! for every process, so a lost broker is noticed within seconds by all of
//! them and none pays for Nagle's algorithm, and one reconnect backoff for
//! their event loops (rumqttc has none of its own: polling again after an
//! error reconnects at once). [`Failover`] adds the other half of a lost
//! connection: which node of a clustered broker to try next.

use std::time::{Duration, Instant};

use axion_wire::{BrokerUrls, MqttUrl};

/// QoS 1/2 publishes a client keeps in flight at most.
pub const MAX_INFLIGHT: u16 = 1024;

/// MQTT 5 client options for the broker at `url`, with a keep-alive short
/// enough that a lost broker is noticed within seconds, and TCP_NODELAY.
pub fn options_v5(url: &MqttUrl, client_id: &str) -> rumqttc::v5::MqttOptions {
    let mut opts = match &url.unix {
        Some(path) => {
            let mut opts =
                rumqttc::v5::MqttOptions::new(client_id, path.to_string_lossy().into_owned(), 0);
            opts.set_transport(rumqttc::Transport::Unix);
            opts
        }
        None => rumqttc::v5::MqttOptions::new(client_id, &url.host, url.port),
    };
    opts.set_keep_alive(Duration::from_secs(5));
    // Without an upper limit rumqttc 0.25 preallocates a slot for all
    // 65 535 packet ids: 14 MB per client, measured with massif.
    opts.set_outgoing_inflight_upper_limit(MAX_INFLIGHT);
    // rumqttc leaves Nagle on: a small publish written while the last
    // one is unacknowledged waits for the peer's delayed ACK (~40 ms),
    // which put 40–90 ms on every queue hand-off (credit, release,
    // delivery) before this was set.
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    opts.set_network_options(network);
    if let Some(user) = &url.user {
        opts.set_credentials(user, url.password.as_deref().unwrap_or(""));
    }
    opts
}

/// The wait between a client's tries to reach the broker: doubling from
/// `min` up to `max`, and back to `min` once a connection has lasted
/// [`STABLE`]. A broker that accepts the CONNECT and then refuses what the
/// client does next (a subscription it does not support, say) would
/// otherwise be reconnected to at once, forever. Each event loop's
/// [`Failover`] owns one.
#[derive(Debug, Clone)]
pub struct Reconnect {
    min: Duration,
    max: Duration,
    next: Duration,
    since: Option<std::time::Instant>,
}

/// How long a connection must last before the next failure is treated as
/// a new one (its wait starts at `min` again).
pub const STABLE: Duration = Duration::from_secs(10);

impl Reconnect {
    pub const fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
            since: None,
        }
    }

    /// The broker answered (a CONNACK).
    pub fn connected(&mut self) {
        self.connected_at(std::time::Instant::now());
    }

    fn connected_at(&mut self, now: std::time::Instant) {
        self.since = Some(now);
    }

    /// Ends the connection that started at the last [`Reconnect::connected`],
    /// if any; true if it lasted [`STABLE`], and the waits start over.
    fn settle_at(&mut self, now: Instant) -> bool {
        let stable = self
            .since
            .take()
            .is_some_and(|since| now.duration_since(since) >= STABLE);
        if stable {
            self.next = self.min;
        }
        stable
    }

    /// How long to wait after a failed poll; the wait after the next
    /// failure is twice as long, up to `max`.
    fn after_failure_at(&mut self, now: std::time::Instant) -> Duration {
        self.settle_at(now);
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }
}

/// Which node of the broker an event loop tries next, and how long it
/// waits first. After a failed try or a lost connection the loop moves to
/// the next URL of the list, round robin, after [`Reconnect`]'s shortest
/// wait; only a full round of failures waits the growing backoff. So a
/// client moves to a live node within a fraction of a second, and a dead
/// cluster is tried as gently as a single dead broker. With one URL this
/// is exactly [`Reconnect`]. Each event loop owns one.
#[derive(Debug, Clone)]
pub struct Failover {
    urls: BrokerUrls,
    /// Index of the URL the event loop is set to.
    at: usize,
    /// Failures since the last connection that lasted [`STABLE`]; every
    /// `urls.len()`th one ends a round.
    failures: usize,
    reconnect: Reconnect,
}

impl Failover {
    pub fn new(urls: BrokerUrls, reconnect: Reconnect) -> Self {
        Self {
            urls,
            at: 0,
            failures: 0,
            reconnect,
        }
    }

    /// The URL the event loop is set to (at first, the list's first).
    pub fn current(&self) -> &MqttUrl {
        self.urls.get(self.at)
    }

    pub fn urls(&self) -> &BrokerUrls {
        &self.urls
    }

    /// Lasting refusals in a row (see [`lasting_refusal`]) after which a
    /// client gives up: [`REFUSALS_BEFORE_GIVING_UP`], and at least one
    /// from every node, so one misconfigured node never stops a client
    /// that another would accept.
    pub fn refusals_before_giving_up(&self) -> u32 {
        REFUSALS_BEFORE_GIVING_UP.max(u32::try_from(self.urls.len()).unwrap_or(u32::MAX))
    }

    /// A node answered (a CONNACK).
    pub fn connected(&mut self) {
        self.reconnect.connected();
    }

    /// After a failed poll: points `eventloop` at the next node (keeping
    /// every other option the caller set) and returns how long to wait
    /// before polling again.
    pub fn after_failure(
        &mut self,
        eventloop: &mut rumqttc::v5::EventLoop,
        reason: &dyn std::fmt::Display,
    ) -> Duration {
        let from = self.at;
        let wait = self.after_failure_at(Instant::now());
        if self.at != from {
            eventloop.options = retarget(&eventloop.options, self.current());
            // Every switch of the first round is news; a dead cluster
            // tried round after round is not.
            if self.failures <= self.urls.len() {
                tracing::info!(broker = %self.current(), from = %self.urls.get(from), %reason, retry_in = ?wait, "trying the next broker node");
            } else {
                tracing::debug!(broker = %self.current(), from = %self.urls.get(from), %reason, retry_in = ?wait, "trying the next broker node");
            }
        }
        wait
    }

    fn after_failure_at(&mut self, now: Instant) -> Duration {
        if self.reconnect.settle_at(now) {
            self.failures = 0;
        }
        self.failures += 1;
        self.at = (self.at + 1) % self.urls.len();
        if self.failures.is_multiple_of(self.urls.len()) {
            self.reconnect.after_failure_at(now)
        } else {
            self.reconnect.min
        }
    }
}

/// `options` pointed at `url`: its address, transport and credentials,
/// with every other setting kept (client id, clean start, session expiry
/// and the other CONNECT properties, last will, keep-alive, acks, in-flight
/// bound, socket options).
pub fn retarget(options: &rumqttc::v5::MqttOptions, url: &MqttUrl) -> rumqttc::v5::MqttOptions {
    let mut next = options_v5(url, &options.client_id());
    next.set_keep_alive(options.keep_alive())
        .set_clean_start(options.clean_start())
        .set_manual_acks(options.manual_acks())
        .set_pending_throttle(options.pending_throttle())
        .set_connection_timeout(options.connection_timeout())
        .set_network_options(options.network_options())
        .set_request_channel_capacity(options.request_channel_capacity());
    if let Some(props) = options.connect_properties() {
        next.set_connect_properties(props);
    }
    if let Some(will) = options.last_will() {
        next.set_last_will(will);
    }
    if let Some(limit) = options.get_outgoing_inflight_upper_limit() {
        next.set_outgoing_inflight_upper_limit(limit);
    }
    next
}

/// Consecutive refusals that will repeat (see [`lasting_refusal`]) a
/// client takes before it gives up: a few backed-off tries ride out an
/// auth file being edited, never a reconnect storm.
pub const REFUSALS_BEFORE_GIVING_UP: u32 = 3;

/// The broker's reason, when a failed poll is a refusal that trying again
/// will not change: a CONNACK refusing these credentials or this client,
/// or a DISCONNECT for something the client does (a subscription kind the
/// broker does not support, a topic it may not use). A lost connection,
/// a busy broker or a broker shutting down is not one.
pub fn lasting_refusal(err: &rumqttc::v5::ConnectionError) -> Option<String> {
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as C, DisconnectReasonCode as D};
    use rumqttc::v5::{ConnectionError, StateError};
    match err {
        ConnectionError::ConnectionRefused(code) => match code {
            C::UnsupportedProtocolVersion
            | C::ClientIdentifierNotValid
            | C::BadUserNamePassword
            | C::NotAuthorized
            | C::Banned
            | C::BadAuthenticationMethod
            | C::TopicNameInvalid
            | C::PacketTooLarge
            | C::RetainNotSupported
            | C::QoSNotSupported
            | C::PayloadFormatInvalid => {
                Some(format!("the broker refused the connection: {code:?}"))
            }
            _ => None,
        },
        ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code,
            reason_string,
        }) => match reason_code {
            D::NotAuthorized
            | D::TopicFilterInvalid
            | D::TopicNameInvalid
            | D::PacketTooLarge
            | D::PayloadFormatInvalid
            | D::RetainNotSupported
            | D::QoSNotSupported
            | D::SharedSubscriptionNotSupported
            | D::SubscriptionIdentifiersNotSupported
            | D::WildcardSubscriptionsNotSupported
            | D::TopicAliasInvalid
            | D::ProtocolError
            | D::MalformedPacket => Some(match reason_string {
                Some(why) => {
                    format!("the broker disconnected this client: {reason_code:?} ({why})")
                }
                None => format!("the broker disconnected this client: {reason_code:?}"),
            }),
            _ => None,
        },
        _ => None,
    }
}

/// True if a SUBACK's code refuses the filter for good (not authorized,
/// not supported, invalid), as opposed to a momentary limit.
pub fn lasting_subscribe_refusal(code: &rumqttc::v5::mqttbytes::v5::SubscribeReasonCode) -> bool {
    use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as S;
    matches!(
        code,
        S::NotAuthorized
            | S::TopicFilterInvalid
            | S::SharedSubscriptionsNotSupported
            | S::SubscriptionIdNotSupported
            | S::WildcardSubscriptionsNotSupported
    )
}

/// 200 ms doubling to 5 s: quick to come back after a broker restart,
/// without hammering a broker that stays away.
impl Default for Reconnect {
    fn default() -> Self {
        Self::new(Duration::from_millis(200), Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_doubles_up_to_its_bound_and_starts_over_after_a_stable_connection() {
        let ms = Duration::from_millis;
        let start = std::time::Instant::now();
        let mut r = Reconnect::new(ms(200), Duration::from_secs(1));
        let waits: Vec<_> = (0..5).map(|_| r.after_failure_at(start)).collect();
        assert_eq!(waits, [ms(200), ms(400), ms(800), ms(1000), ms(1000)]);
        r.connected_at(start);
        assert_eq!(r.after_failure_at(start + STABLE), ms(200));
    }

    #[test]
    fn a_connection_that_fails_at_once_keeps_backing_off() {
        let ms = Duration::from_millis;
        let start = std::time::Instant::now();
        let mut r = Reconnect::new(ms(200), Duration::from_secs(5));
        let mut waits = Vec::new();
        for i in 0..4u32 {
            // Accepted, then dropped a moment later: not a new start.
            let at = start + ms(100) * i;
            r.connected_at(at);
            waits.push(r.after_failure_at(at + ms(50)));
        }
        assert_eq!(waits, [ms(200), ms(400), ms(800), ms(1600)]);
    }

    fn three_nodes() -> BrokerUrls {
        BrokerUrls::parse("mqtt://a:1,mqtt://b:2,mqtt://c:3").unwrap()
    }

    #[test]
    fn a_failure_moves_to_the_next_node_at_once_and_a_full_round_backs_off() {
        let ms = Duration::from_millis;
        let start = Instant::now();
        let mut f = Failover::new(
            three_nodes(),
            Reconnect::new(ms(200), Duration::from_secs(1)),
        );
        assert_eq!(f.current().host, "a");
        let mut tries = Vec::new();
        for _ in 0..9 {
            let wait = f.after_failure_at(start);
            tries.push((f.current().host.clone(), wait));
        }
        let hosts: Vec<_> = tries.iter().map(|(h, _)| h.as_str()).collect();
        assert_eq!(hosts, ["b", "c", "a", "b", "c", "a", "b", "c", "a"]);
        let waits: Vec<_> = tries.iter().map(|(_, w)| *w).collect();
        assert_eq!(
            waits,
            [
                ms(200),
                ms(200),
                ms(200),
                ms(200),
                ms(200),
                ms(400),
                ms(200),
                ms(200),
                ms(800)
            ]
        );
    }

    #[test]
    fn after_a_stable_connection_the_next_node_is_tried_at_once_again() {
        let ms = Duration::from_millis;
        let start = Instant::now();
        let mut f = Failover::new(
            three_nodes(),
            Reconnect::new(ms(200), Duration::from_secs(5)),
        );
        for _ in 0..6 {
            f.after_failure_at(start);
        }
        // Back on "a" after two rounds, connected for a while, then lost.
        f.reconnect.connected_at(start);
        let lost = start + STABLE;
        assert_eq!(f.after_failure_at(lost), ms(200));
        assert_eq!(f.current().host, "b");
        assert_eq!(f.after_failure_at(lost), ms(200));
        assert_eq!(
            f.after_failure_at(lost),
            ms(200),
            "the backoff started over"
        );
        assert_eq!(f.after_failure_at(lost), ms(200));
        assert_eq!(f.after_failure_at(lost), ms(200));
        assert_eq!(f.after_failure_at(lost), ms(400));
    }

    #[test]
    fn nodes_that_accept_then_drop_at_once_are_not_hammered() {
        let ms = Duration::from_millis;
        let start = Instant::now();
        let urls = BrokerUrls::parse("mqtt://a:1,mqtt://b:2").unwrap();
        let mut f = Failover::new(urls, Reconnect::new(ms(200), Duration::from_secs(5)));
        let mut waits = Vec::new();
        for i in 0..6u32 {
            let at = start + ms(100) * i;
            f.reconnect.connected_at(at);
            waits.push(f.after_failure_at(at + ms(50)));
        }
        assert_eq!(
            waits,
            [ms(200), ms(200), ms(200), ms(400), ms(200), ms(800)]
        );
    }

    #[test]
    fn one_url_fails_over_to_itself_with_the_plain_backoff() {
        let ms = Duration::from_millis;
        let start = Instant::now();
        let one = BrokerUrls::parse("mqtt://a:1").unwrap();
        let mut f = Failover::new(one, Reconnect::new(ms(200), Duration::from_secs(1)));
        let waits: Vec<_> = (0..5).map(|_| f.after_failure_at(start)).collect();
        assert_eq!(waits, [ms(200), ms(400), ms(800), ms(1000), ms(1000)]);
        assert_eq!(f.current().host, "a");
        assert_eq!(f.refusals_before_giving_up(), REFUSALS_BEFORE_GIVING_UP);
    }

    #[test]
    fn every_node_must_refuse_before_a_client_gives_up() {
        let five = BrokerUrls::parse("mqtt://a,mqtt://b,mqtt://c,mqtt://d,mqtt://e").unwrap();
        assert_eq!(
            Failover::new(five, Reconnect::default()).refusals_before_giving_up(),
            5
        );
        assert_eq!(
            Failover::new(three_nodes(), Reconnect::default()).refusals_before_giving_up(),
            3
        );
    }

    #[test]
    fn the_event_loop_moves_to_the_next_node_with_its_other_settings() {
        use rumqttc::v5::mqttbytes::{v5::LastWill, QoS};
        let urls = BrokerUrls::parse("mqtt://a:1,mqtt://bob:pw@b:2,unix:///run/m.sock").unwrap();
        let mut f = Failover::new(urls.clone(), Reconnect::default());
        let mut opts = options_v5(f.current(), "owner-1");
        opts.set_clean_start(false)
            .set_session_expiry_interval(Some(600))
            .set_max_packet_size(Some(4096))
            .set_keep_alive(Duration::from_secs(7))
            .set_manual_acks(true)
            .set_outgoing_inflight_upper_limit(10)
            .set_last_will(LastWill::new(
                "t/will",
                "gone",
                QoS::AtLeastOnce,
                true,
                None,
            ));
        let (_client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 10);
        f.after_failure(&mut eventloop, &"connection refused");
        let o = &eventloop.options;
        assert_eq!(o.broker_address(), ("b".to_string(), 2));
        let login = o.credentials().expect("credentials of b");
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("bob", "pw")
        );
        assert_eq!(o.client_id(), "owner-1");
        assert!(!o.clean_start());
        assert_eq!(o.session_expiry_interval(), Some(600));
        assert_eq!(o.max_packet_size(), Some(4096));
        assert_eq!(o.keep_alive(), Duration::from_secs(7));
        assert!(o.manual_acks());
        assert_eq!(o.get_outgoing_inflight_upper_limit(), Some(10));
        assert_eq!(o.last_will().map(|w| w.topic), Some("t/will".into()));
        f.after_failure(&mut eventloop, &"connection refused");
        let o = &eventloop.options;
        assert!(matches!(o.transport(), rumqttc::Transport::Unix));
        assert_eq!(o.broker_address().0, "/run/m.sock");
        assert!(o.credentials().is_none());
        f.after_failure(&mut eventloop, &"connection refused");
        assert_eq!(eventloop.options.broker_address(), ("a".to_string(), 1));
    }
}
