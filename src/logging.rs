//! Log setup shared by every subcommand.
//!
//! rumqttd logs every clean disconnect at ERROR (`router-drop
//! error=Recv(Disconnected)`), which would drown real errors, so its
//! modules are held at WARN unless `RUST_LOG` says otherwise.

use tracing_subscriber::EnvFilter;

const DEFAULT_FILTER: &str =
    "info,rumqttd=warn,rumqttd::server::broker=off,rumqttd::router::routing=warn";

pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true)
        .init();
}
