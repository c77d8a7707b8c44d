//! Owns rumqttd's router thread and hands out links to it.
//!
//! `rumqttd::Broker` hides its router channel, and the router's `Event`
//! type cannot be named outside rumqttd, so the channel is captured in
//! closures here: the rest of the front end sees only "connect a client"
//! and "is the router still alive".

use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::{Notification, Router, RouterConfig, Strategy};

use crate::BrokerConfig;

type Connect =
    dyn Fn(&str, bool) -> Result<(LinkTx, LinkRx, Notification), LinkFailed> + Send + Sync;

/// The router would not register a link (it died, or refused the client).
#[derive(Debug, thiserror::Error)]
#[error("router refused the link: {0}")]
pub struct LinkFailed(String);
type Alive = dyn Fn() -> bool + Send + Sync;

/// A running router. Cloning the inner closures is not needed: share it in an `Arc`.
pub struct RouterHandle {
    connect: Box<Connect>,
    alive: Box<Alive>,
}

impl RouterHandle {
    /// Starts the router thread with settings derived from `config`.
    pub fn spawn(config: &BrokerConfig) -> Self {
        let router_config = RouterConfig {
            // The front end enforces the public limit with a CONNACK; the
            // router's own limit (which just drops the link) must never bite.
            max_connections: config.max_connections + 1024,
            // Also caps the retained messages sent after a SUBACK to a QoS 0
            // subscriber (rumqttd truncates them to one read): a dashboard
            // must see a whole fleet, not the first 200 instances.
            max_outgoing_packet_count: 10_000,
            max_segment_size: config.segment_size.max(1024),
            max_segment_count: config.segment_count.max(1),
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        };
        let tx = Router::new(0, router_config).spawn();
        let alive_tx = tx.clone();
        RouterHandle {
            connect: Box::new(move |client_id, clean| {
                LinkBuilder::new(client_id, tx.clone())
                    .clean_session(clean)
                    .dynamic_filters(true)
                    .build()
                    .map_err(|e: LinkError| LinkFailed(e.to_string()))
            }),
            alive: Box::new(move || !alive_tx.is_disconnected()),
        }
    }

    /// Registers a client with the router. Blocks until the router answers,
    /// so call it from a blocking context.
    pub fn connect(
        &self,
        client_id: &str,
        clean_session: bool,
    ) -> Result<(LinkTx, LinkRx, Notification), LinkFailed> {
        (self.connect)(client_id, clean_session)
    }

    /// False once the router thread has died.
    pub fn is_alive(&self) -> bool {
        (self.alive)()
    }
}
