//! Axion's client side, shared by every process that talks to the broker:
//! how a client connects ([`connection`]), the retained heartbeat record's
//! publisher, the fleet table that readers build from those records, the
//! janitor that clears dead instances, what `/proc` says about the
//! processes behind them, and the ports file a process reports its bound
//! listeners in ([`ports_file`]). What goes on the wire is defined in `axion-wire`;
//! this crate is what sends and reads it.

pub mod connection;
pub mod error;
pub mod fleet;
pub mod janitor;
pub mod ports_file;
pub mod process;
pub mod publisher;

pub use error::HeartbeatError;
pub use fleet::{Fleet, FleetWatcher, InstanceView, State, WatchOptions};
pub use janitor::spawn_janitor;
pub use publisher::{HeartbeatConfig, HeartbeatHandle, HeartbeatPublisher};
