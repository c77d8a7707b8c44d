//! Process supervision for the whole fleet, whatever language its services
//! are written in.
//!
//! - [`legacy`]: the legacy heartbeat service's HTTP and WebSocket API,
//!   answered by Axion, turning each process that beats into a retained
//!   record of the heartbeat mesh.
//! - [`reaper`]: stops this host's processes that hang (silent, cut off
//!   from the broker, or stalled with work pending), and raises alarms on
//!   restart loops ([`restarts`]).
//! - [`policy`]: the rules, as pure functions of heartbeat records.
//! - [`limits`]: instance limits per service, from flags or a PM2
//!   ecosystem file.

pub mod legacy;
pub mod limits;
mod link;
pub mod policy;
pub mod reaper;
pub mod restarts;

pub use legacy::{LegacyConfig, LegacyHeartbeats};
pub use limits::InstanceLimits;
pub use reaper::{ReaperConfig, ReaperError};
