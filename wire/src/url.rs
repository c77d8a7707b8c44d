//! The broker URL every Axion client accepts (`--mqtt`, `AXION_MQTT_URL`).
//!
//! One parser so that `mqtt://user:pass@host:port` (or a local broker's
//! Unix socket, `unix://[user:pass@]/path`) means the same thing to the
//! bridge, the queue owner, the heartbeat sidecar and the service runtime.
//! A clustered broker is named by several URLs, comma-separated
//! ([`BrokerUrls`]); every client fails over between them.

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
    #[error("no broker URL given")]
    NoUrl,
    #[error(
        "the broker URL list has an empty entry (entry {0}); separate URLs with single commas"
    )]
    EmptyEntry(usize),
    #[error("entry {position} of the broker URL list: {source}")]
    Entry {
        position: usize,
        source: Box<UrlError>,
    },
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

/// `url` as an error may quote it: any password replaced by `***`.
fn shown(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let at = match scheme {
        Some("unix") => rest.find("@/").or_else(|| rest.rfind('@')),
        _ => rest.rfind('@'),
    };
    let Some((user, _)) = at.and_then(|at| rest[..at].split_once(':')) else {
        return url.to_string();
    };
    let tail = &rest[at.unwrap_or_default()..];
    match scheme {
        Some(scheme) => format!("{scheme}://{user}:***{tail}"),
        None => format!("{user}:***{tail}"),
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
                return Err(UrlError::UnixPath(shown(url)));
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
            .ok_or_else(|| UrlError::Scheme(shown(url)))?;
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
                    url: shown(url),
                    port: p.to_string(),
                })?;
                (h, port)
            }
            _ => (hostport, 1883),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(UrlError::NoHost(shown(url)));
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

/// The brokers a client may reach, in the order it tries them: the nodes
/// of one clustered broker, written `mqtt://a:1883,mqtt://b:1883`. Never
/// empty. A single URL is a list of one, so one parser serves both.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrls(Vec<MqttUrl>);

impl BrokerUrls {
    /// Parses a comma-separated list; each entry is an [`MqttUrl`]. A
    /// password may not contain a comma here (percent-encoding is not
    /// decoded); put it in `AXION_MQTT_PASSWORD` instead.
    pub fn parse(list: &str) -> Result<Self, UrlError> {
        let entries: Vec<&str> = list.split(',').map(str::trim).collect();
        if entries.len() == 1 {
            if entries[0].is_empty() {
                return Err(UrlError::NoUrl);
            }
            return Ok(Self(vec![MqttUrl::parse(entries[0])?]));
        }
        entries
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                if entry.is_empty() {
                    return Err(UrlError::EmptyEntry(i + 1));
                }
                MqttUrl::parse(entry).map_err(|e| UrlError::Entry {
                    position: i + 1,
                    source: Box::new(e),
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    /// The URL tried first.
    pub fn first(&self) -> &MqttUrl {
        &self.0[0]
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a list has at least one URL.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The URL at `index`, counting round the list.
    pub fn get(&self, index: usize) -> &MqttUrl {
        &self.0[index % self.0.len()]
    }

    pub fn iter(&self) -> std::slice::Iter<'_, MqttUrl> {
        self.0.iter()
    }

    /// [`MqttUrl::with_env_credentials`] for each URL: the environment
    /// fills what a URL does not carry.
    pub fn with_env_credentials(self) -> Self {
        Self(
            self.0
                .into_iter()
                .map(MqttUrl::with_env_credentials)
                .collect(),
        )
    }
}

impl From<MqttUrl> for BrokerUrls {
    fn from(url: MqttUrl) -> Self {
        Self(vec![url])
    }
}

// Passwords never reach a log line: each URL shows without its own.
impl fmt::Display for BrokerUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, url) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{url}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BrokerUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl std::str::FromStr for BrokerUrls {
    type Err = UrlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_names_each_node_in_order() {
        let urls =
            BrokerUrls::parse("mqtt://bob:pw@a:1883, mqtt://b:1884,unix:///run/m.sock").unwrap();
        assert_eq!(urls.len(), 3);
        assert_eq!(urls.first().host, "a");
        assert_eq!(urls.first().password.as_deref(), Some("pw"));
        assert_eq!((urls.get(1).host.as_str(), urls.get(1).port), ("b", 1884));
        assert_eq!(urls.get(1).user, None);
        assert_eq!(urls.get(3), urls.first());
        let shown = urls.to_string();
        assert_eq!(shown, "mqtt://bob@a:1883,mqtt://b:1884,unix:///run/m.sock");
        assert_eq!(format!("{urls:?}"), shown);
    }

    #[test]
    fn a_single_url_parses_and_fails_as_it_always_did() {
        let one = BrokerUrls::parse(DEFAULT_MQTT_URL).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one.first(), &MqttUrl::parse(DEFAULT_MQTT_URL).unwrap());
        assert_eq!(
            BrokerUrls::parse("http://x"),
            Err(UrlError::Scheme("http://x".into()))
        );
        assert_eq!(BrokerUrls::parse(""), Err(UrlError::NoUrl));
        assert_eq!(BrokerUrls::parse("  "), Err(UrlError::NoUrl));
    }

    #[test]
    fn a_bad_entry_in_a_list_is_named() {
        assert_eq!(
            BrokerUrls::parse("mqtt://a,,mqtt://b"),
            Err(UrlError::EmptyEntry(2))
        );
        assert_eq!(BrokerUrls::parse("mqtt://a,"), Err(UrlError::EmptyEntry(2)));
        assert_eq!(BrokerUrls::parse(","), Err(UrlError::EmptyEntry(1)));
        let err = BrokerUrls::parse("mqtt://a,http://b:1883").unwrap_err();
        assert_eq!(
            err,
            UrlError::Entry {
                position: 2,
                source: Box::new(UrlError::Scheme("http://b:1883".into()))
            }
        );
        assert!(err.to_string().contains("entry 2"), "{err}");
        assert!(err.to_string().contains("http://b:1883"), "{err}");
        assert!(matches!(
            BrokerUrls::parse("mqtt://a:x,mqtt://b"),
            Err(UrlError::Entry { position: 1, .. })
        ));
        assert!(matches!(
            BrokerUrls::parse("mqtt://a,unix://rel.sock"),
            Err(UrlError::Entry { position: 2, .. })
        ));
    }

    #[test]
    fn the_environment_fills_credentials_of_every_url() {
        // Only this test sets these variables in this crate.
        std::env::set_var("AXION_MQTT_USER", "envuser");
        std::env::set_var("AXION_MQTT_PASSWORD", "envpw");
        let urls = BrokerUrls::parse("mqtt://own:pw@a,mqtt://b")
            .unwrap()
            .with_env_credentials();
        std::env::remove_var("AXION_MQTT_USER");
        std::env::remove_var("AXION_MQTT_PASSWORD");
        assert_eq!(
            (urls.get(0).user.as_deref(), urls.get(0).password.as_deref()),
            (Some("own"), Some("pw"))
        );
        assert_eq!(
            (urls.get(1).user.as_deref(), urls.get(1).password.as_deref()),
            (Some("envuser"), Some("envpw"))
        );
    }

    #[test]
    fn an_error_never_quotes_a_password() {
        for bad in [
            "http://u:s3cret@h:1883",
            "mqtt://u:s3cret@h:notaport",
            "mqtt://u:s3cret@",
            "unix://u:s3cret@relative",
            "u:s3cret@h:1883",
        ] {
            let err = MqttUrl::parse(bad).expect_err(bad).to_string();
            assert!(!err.contains("s3cret"), "{bad}: {err}");
            assert!(err.contains("u:***"), "{bad}: {err}");
        }
        let err = BrokerUrls::parse("mqtt://a,http://u:s3cret@b")
            .expect_err("bad entry")
            .to_string();
        assert!(!err.contains("s3cret"), "{err}");
    }

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
