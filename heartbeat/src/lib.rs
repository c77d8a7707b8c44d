//! Axion's client side, shared by every process that talks to the broker:
//! the `mqtt://` URL every command accepts, the topic tree of DESIGN.md, and
//! (in later modules) the retained heartbeat publisher and its aggregation.

pub mod topics;
pub mod url;

pub use topics::TopicError;
pub use url::{MqttUrl, UrlError, DEFAULT_MQTT_URL};
