//! Axion's client side, shared by every process that talks to the broker:
//! the `mqtt://` URL every command accepts, the topic tree of docs/DESIGN.md, the
//! retained heartbeat record and its publisher, the fleet table that readers
//! build from those records, the janitor that clears dead instances, and
//! what `/proc` says about the processes behind them.

pub mod error;
pub mod fleet;
pub mod janitor;
pub mod process;
pub mod publisher;
pub mod runtime;
pub mod schema;
pub mod topics;
pub mod url;

pub use error::HeartbeatError;
pub use fleet::{Fleet, FleetWatcher, InstanceView, State, WatchOptions};
pub use janitor::spawn_janitor;
pub use publisher::{HeartbeatConfig, HeartbeatHandle, HeartbeatPublisher};
pub use schema::{Heartbeat, Status};
pub use topics::TopicError;
pub use url::{MqttUrl, UrlError, DEFAULT_MQTT_URL};
