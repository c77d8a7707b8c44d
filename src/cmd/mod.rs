//! One module per subcommand: flags in, library calls out.

pub mod bridge;
pub mod heartbeat;
pub mod monitor;
pub mod passwd;
pub mod queue;
pub mod queues;
pub mod reap;
pub mod serve;
pub mod work;
