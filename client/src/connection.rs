//! How an Axion client connects to the broker: one set of MQTT 5 options
//! for every process, so a lost broker is noticed within seconds by all of
//! them and none pays for Nagle's algorithm, and one reconnect backoff for
//! their event loops (rumqttc has none of its own: polling again after an
//! error reconnects at once).

use std::time::Duration;

use axion_wire::MqttUrl;

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
/// otherwise be reconnected to at once, forever. Each event loop owns one.
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

    /// How long to wait after a failed poll; the wait after the next
    /// failure is twice as long, up to `max`.
    pub fn after_failure(&mut self) -> Duration {
        self.after_failure_at(std::time::Instant::now())
    }

    fn after_failure_at(&mut self, now: std::time::Instant) -> Duration {
        if let Some(since) = self.since.take() {
            if now.duration_since(since) >= STABLE {
                self.next = self.min;
            }
        }
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }
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
}
