//! Log setup shared by every subcommand.
//!
//! rumqttd logs routine events at ERROR (a clean disconnect, a late event
//! for a connection that just closed: `no-connection id N is already
//! gone`), which would drown real errors. Its listener and routing modules
//! are silenced and the rest held at WARN unless `RUST_LOG` says otherwise;
//! a dead router is detected and reported by `axion serve` itself.

use tracing_subscriber::EnvFilter;

const DEFAULT_FILTER: &str =
    "info,rumqttd=warn,rumqttd::server::broker=off,rumqttd::router::routing=off";

pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true)
        .init();
}
