//! The broker URL every Axion client accepts (`--mqtt`, `AXION_MQTT_URL`).
//!
//! One parser so that `mqtt://user:pass@host:port` (or a local broker's
//! Unix socket, `unix://[user:pass@]/path`) means the same thing to the
//! bridge, the queue owner, the heartbeat sidecar and the service runtime.

use std::fmt;
use std::path::PathBuf;

/// Default broker URL when none is given.
pub const DEFAULT_MQTT_URL: &str = "mqtt://127.0.0.1:1883";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("broker URL {0:?} must start with mqtt:// (or tcp://, or unix:// for a Unix socket)")]
    Scheme(String),
    #[error(
        "broker URL {0:?} must name an absolute socket path, as in unix:///run/axion/mqtt.sock"
    )]
    UnixPath(String),
    #[error("broker URL {0:?} has no host")]
    NoHost(String),
    #[error("broker URL {url:?} has an invalid port {port:?}")]
    Port { url: String, port: String },
}

/// A parsed `mqtt://[user[:password]@]host[:port]` or
/// `unix://[user[:password]@]/path` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct MqttUrl {
    pub host: String,
    pub port: u16,
    /// The broker's Unix socket; when set, `host` and `port` are unused.
    pub unix: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
}

// The password never reaches a log line.
impl fmt::Debug for MqttUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for MqttUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let user = self
            .user
            .as_deref()
            .map(|u| format!("{u}@"))
            .unwrap_or_default();
        match &self.unix {
            Some(path) => write!(f, "unix://{user}{}", path.display()),
            None => write!(f, "mqtt://{user}{}:{}", self.host, self.port),
        }
    }
}

/// Splits `user[:password]`.
fn credentials(creds: Option<&str>) -> (Option<String>, Option<String>) {
    match creds {
        Some(c) => match c.split_once(':') {
            Some((u, p)) => (Some(u.to_string()), Some(p.to_string())),
            None => (Some(c.to_string()), None),
        },
        None => (None, None),
    }
}

impl MqttUrl {
    /// A URL for the broker listening on the Unix socket at `path`.
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Self {
            host: String::new(),
            port: 0,
            unix: Some(path.into()),
            user: None,
            password: None,
        }
    }

    pub fn parse(url: &str) -> Result<Self, UrlError> {
        if let Some(rest) = url.strip_prefix("unix://") {
            // Credentials end at the "@" that starts the absolute path.
            let (creds, path) = match rest.find("@/") {
                Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
                None => (None, rest),
            };
            if !path.starts_with('/') || path.len() < 2 {
                return Err(UrlError::UnixPath(url.to_string()));
            }
            let (user, password) = credentials(creds);
            return Ok(Self {
                user,
                password,
                ..Self::unix(path)
            });
        }
        let rest = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
            .ok_or_else(|| UrlError::Scheme(url.to_string()))?;
        let rest = rest.trim_end_matches('/');
        let (creds, hostport) = match rest.rsplit_once('@') {
            Some((c, h)) => (Some(c), h),
            None => (None, rest),
        };
        let (user, password) = credentials(creds);
        let (host, port) = match hostport.rsplit_once(':') {
            // An IPv6 literal without a port: "[::1]".
            Some((h, p)) if !p.ends_with(']') => {
                let port = p.parse::<u16>().map_err(|_| UrlError::Port {
                    url: url.to_string(),
                    port: p.to_string(),
                })?;
                (h, port)
            }
            _ => (hostport, 1883),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(UrlError::NoHost(url.to_string()));
        }
        Ok(Self {
            host: host.to_string(),
            port,
            unix: None,
            user,
            password,
        })
    }

    /// Fills user and password from `AXION_MQTT_USER`/`AXION_MQTT_PASSWORD`
    /// when the URL carries none.
    pub fn with_env_credentials(mut self) -> Self {
        if self.user.is_none() {
            self.user = std::env::var("AXION_MQTT_USER")
                .ok()
                .filter(|u| !u.is_empty());
        }
        if self.password.is_none() {
            self.password = std::env::var("AXION_MQTT_PASSWORD").ok();
        }
        self
    }
}

impl std::str::FromStr for MqttUrl {
    type Err = UrlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_and_short_forms() {
        let u = MqttUrl::parse("mqtt://bob:s3cr:et@broker.local:1884").unwrap();
        assert_eq!(u.host, "broker.local");
        assert_eq!(u.port, 1884);
        assert_eq!(u.user.as_deref(), Some("bob"));
        assert_eq!(u.password.as_deref(), Some("s3cr:et"));
        assert!(!format!("{u:?}").contains("s3cr"));
        let u = MqttUrl::parse("tcp://127.0.0.1").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 1883));
        let u = MqttUrl::parse("mqtt://[::1]:1999").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 1999));
    }

    #[test]
    fn parses_unix_socket_urls() {
        let u = MqttUrl::parse("unix:///run/axion/mqtt.sock").unwrap();
        assert_eq!(
            u.unix.as_deref(),
            Some(std::path::Path::new("/run/axion/mqtt.sock"))
        );
        assert_eq!(u.user, None);
        assert_eq!(u.to_string(), "unix:///run/axion/mqtt.sock");
        let u = MqttUrl::parse("unix://bob:p@ss@/tmp/a@b.sock").unwrap();
        assert_eq!(
            u.unix.as_deref(),
            Some(std::path::Path::new("/tmp/a@b.sock"))
        );
        assert_eq!(
            (u.user.as_deref(), u.password.as_deref()),
            (Some("bob"), Some("p@ss"))
        );
        assert!(!format!("{u:?}").contains("p@ss"));
        assert!(matches!(
            MqttUrl::parse("unix://relative.sock"),
            Err(UrlError::UnixPath(_))
        ));
        assert!(matches!(
            MqttUrl::parse("unix://"),
            Err(UrlError::UnixPath(_))
        ));
    }

    #[test]
    fn refuses_bad_urls() {
        assert!(matches!(
            MqttUrl::parse("http://x"),
            Err(UrlError::Scheme(_))
        ));
        assert!(matches!(
            MqttUrl::parse("mqtt://:1883"),
            Err(UrlError::NoHost(_))
        ));
        assert!(matches!(
            MqttUrl::parse("mqtt://h:99999"),
            Err(UrlError::Port { .. })
        ));
    }
}
