//! The ports file (`--ports-file`, `AXION_PORTS_FILE`): the address each
//! listener of a process is bound to, one `name=address` line per
//! listener (`mqtt=127.0.0.1:1883`).
//!
//! A listen address with port 0 lets the kernel pick a free port at the
//! bind itself, so nothing can take the port between choosing and binding
//! it; this file is how a supervisor, a script or a test then learns the
//! port. Lines, not JSON, so `sed -n 's/^mqtt=//p'` reads it. A listener is
//! named after its flag without `-listen` (`--mqtt-listen` is `mqtt`).

use std::net::SocketAddr;

/// `--mqtt-listen`: the broker's MQTT port (3.1.1 and 5).
pub const MQTT: &str = "mqtt";
/// `--mqtts-listen`: the broker's MQTT-over-TLS port.
pub const MQTTS: &str = "mqtts";
/// `--ws-listen`: the WebSocket bridge's port (`ws://` or `wss://`, HTTP).
pub const WS: &str = "ws";
/// `--legacy-heartbeat-listen`: the legacy heartbeat service's own port.
pub const LEGACY_HEARTBEAT: &str = "legacy-heartbeat";
/// `--health-listen`/`HEALTH_LISTEN`: a service's `/health/*` probes.
pub const HEALTH: &str = "health";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortsError {
    #[error("ports file line {line}: {text:?} is not name=address")]
    Line { line: usize, text: String },
}

/// The bound listeners of one process, in the order they were added.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ports {
    listeners: Vec<(String, SocketAddr)>,
}

impl Ports {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the address of listener `name`.
    pub fn insert(&mut self, name: &str, addr: SocketAddr) {
        match self.listeners.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => entry.1 = addr,
            None => self.listeners.push((name.to_string(), addr)),
        }
    }

    pub fn get(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, SocketAddr)> {
        self.listeners.iter().map(|(n, a)| (n.as_str(), *a))
    }

    pub fn is_empty(&self) -> bool {
        self.listeners.is_empty()
    }

    /// The file's text: one `name=address` line per listener.
    pub fn render(&self) -> String {
        self.listeners
            .iter()
            .map(|(name, addr)| format!("{name}={addr}\n"))
            .collect()
    }

    /// Reads what [`Ports::render`] wrote; blank lines are skipped.
    pub fn parse(text: &str) -> Result<Self, PortsError> {
        let mut ports = Self::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() {
                continue;
            }
            let bad = || PortsError::Line {
                line: i + 1,
                text: raw.to_string(),
            };
            let (name, addr) = line.split_once('=').ok_or_else(bad)?;
            let addr: SocketAddr = addr.trim().parse().map_err(|_| bad())?;
            let name = name.trim();
            if name.is_empty() {
                return Err(bad());
            }
            ports.insert(name, addr);
        }
        Ok(ports)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rendered_file_parses_back_ipv6_included() {
        let mut ports = Ports::new();
        ports.insert(MQTT, "127.0.0.1:41883".parse().unwrap());
        ports.insert(WS, "[::1]:47000".parse().unwrap());
        let text = ports.render();
        assert_eq!(text, "mqtt=127.0.0.1:41883\nws=[::1]:47000\n");
        assert_eq!(Ports::parse(&text), Ok(ports.clone()));
        assert_eq!(ports.get(WS), Some("[::1]:47000".parse().unwrap()));
        assert_eq!(ports.get(MQTTS), None);
    }

    #[test]
    fn a_line_that_is_not_name_equals_address_is_refused() {
        for text in ["mqtt 127.0.0.1:1", "mqtt=localhost:1883", "=127.0.0.1:1"] {
            assert!(Ports::parse(text).is_err(), "{text}");
        }
        assert_eq!(Ports::parse("\n\n"), Ok(Ports::new()));
    }
}
