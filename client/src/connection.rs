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
/// `min` up to `max`, and back to `min` once a CONNACK arrives. Each event
/// loop owns one.
#[derive(Debug, Clone)]
pub struct Reconnect {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Reconnect {
    pub const fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    /// The broker answered: the next failure waits `min` again.
    pub fn connected(&mut self) {
        self.next = self.min;
    }

    /// How long to wait after a failed poll; the wait after the next
    /// failure is twice as long, up to `max`.
    pub fn after_failure(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }
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
    fn the_wait_doubles_up_to_its_bound_and_starts_over_when_connected() {
        let ms = Duration::from_millis;
        let mut r = Reconnect::new(ms(200), Duration::from_secs(1));
        let waits: Vec<_> = (0..5).map(|_| r.after_failure()).collect();
        assert_eq!(waits, [ms(200), ms(400), ms(800), ms(1000), ms(1000)]);
        r.connected();
        assert_eq!(r.after_failure(), ms(200));
    }
}
