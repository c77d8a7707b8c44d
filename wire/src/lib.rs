//! Axion's wire contract: what every process that talks to the broker must
//! agree on byte for byte, and nothing else. The broker URL every command
//! accepts ([`url`]), the `axion/<package>/…` topic tree ([`topics`]), the
//! retained heartbeat record ([`schema`]), the bodies of the queue topics
//! ([`queue`]), the client-id formats the broker's ACL relies on
//! ([`ids`]) and the ports file a process reports its bound listeners in
//! ([`ports`]). Each format is written here once, so the broker, the queue
//! owner, the bridge, the service runtime and the tools cannot drift apart.
//! This crate does no I/O and knows no MQTT client.

pub mod ids;
pub mod ports;
pub mod queue;
pub mod schema;
pub mod topics;
pub mod url;

pub use schema::{Heartbeat, Status};
pub use topics::TopicError;
pub use url::{BrokerUrls, MqttUrl, UrlError, DEFAULT_MQTT_URL};
