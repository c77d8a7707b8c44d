//! Axion's embedded MQTT broker.
//!
//! rumqttd 0.20's router is fast, but its network front end lets one client
//! take the broker down (client ids with `/+#$`, connections past the limit,
//! topics starting with a non-ASCII character), refuses keep-alive 0, needs
//! two ports for MQTT 3.1.1 and 5 and never sets TCP_NODELAY. So Axion keeps
//! the router and terminates MQTT itself: [`server`] accepts connections,
//! [`session`] speaks MQTT to one client and drives the router through
//! rumqttd's public `LinkBuilder` links, [`names`] makes every client id and
//! topic safe for the router, [`retained`] keeps retained messages (the
//! router drops most of them), and [`router`] owns the router thread.
//! Who may connect, publish and subscribe is decided by `axion-access`,
//! which the bridge shares; [`refusals`] logs refused subscriptions once
//! per episode. [`disk`] keeps retained
//! messages, kept sessions and, through [`offline`], what kept sessions
//! are owed; [`topic_cache`] remembers which subscriptions a topic
//! matched, for flow control and for that capture. [`traffic`] counts
//! what crosses the sockets, [`sys`] publishes the `$SYS/broker/…` topics
//! and [`metrics`] serves all of it to Prometheus.

pub mod codec;
pub mod config;
pub mod disk;
pub mod expiry;
pub mod flow;
pub mod listener;
pub mod marks;
pub mod metrics;
pub mod names;
pub mod offline;
pub mod refusals;
pub mod renewal;
pub mod retained;
pub mod router;
pub mod server;
pub mod session;
pub mod state_log;
pub mod sys;
pub mod topic_cache;
pub mod traffic;

pub use config::BrokerConfig;
pub use server::{Broker, BrokerError, Connections};
