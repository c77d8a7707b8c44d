//! Log setup shared by every subcommand.
//!
//! rumqttd logs routine events at ERROR (a clean disconnect, a late event
//! for a connection that just closed: `no-connection id N is already
//! gone`), which would drown real errors, and opens an ERROR-level span for
//! every publish its router handles, formatting the topic each time (a
//! tenth of `axion serve`'s CPU under queue load when enabled). So its
//! listener and routing modules are silenced and the rest held at WARN,
//! whatever level `RUST_LOG` asks for, unless `RUST_LOG` names rumqttd
//! itself; a dead router is detected and reported by `axion serve` itself.

use tracing_subscriber::EnvFilter;

const DEFAULT_LEVEL: &str = "info";
const RUMQTTD_QUIET: &str = "rumqttd=warn,rumqttd::server::broker=off,rumqttd::router::routing=off";

pub fn init() {
    let filter = EnvFilter::new(directives(std::env::var("RUST_LOG").ok().as_deref()));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true)
        .init();
}

/// The filter for `RUST_LOG` (if set), with rumqttd quietened unless it
/// names rumqttd.
fn directives(rust_log: Option<&str>) -> String {
    match rust_log.map(str::trim).filter(|s| !s.is_empty()) {
        Some(asked) if asked.contains("rumqttd") => asked.to_string(),
        Some(asked) => format!("{asked},{RUMQTTD_QUIET}"),
        None => format!("{DEFAULT_LEVEL},{RUMQTTD_QUIET}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rumqttd_stays_quiet_unless_named() {
        assert_eq!(directives(None), format!("info,{RUMQTTD_QUIET}"));
        assert_eq!(directives(Some("")), format!("info,{RUMQTTD_QUIET}"));
        assert_eq!(directives(Some("debug")), format!("debug,{RUMQTTD_QUIET}"));
        assert_eq!(directives(Some("warn,rumqttd=trace")), "warn,rumqttd=trace");
    }
}
