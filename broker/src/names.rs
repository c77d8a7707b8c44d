//! Client ids, topic names and filters made safe for rumqttd's router.
//!
//! The router panics or kills a listener on a client id containing
//! `/ + # $`, and panics matching a topic whose first character is
//! multi-byte. Both are legal MQTT, so instead of refusing such clients the
//! front end maps them injectively before they reach the router and maps
//! topics back on the way out: a client never sees the difference.

use bytes::{Bytes, BytesMut};

/// Prefix marking an escaped topic or filter level. DEL is ASCII (so the
/// router's one-byte slice is safe) and practically never starts a topic.
const ESCAPE: u8 = 0x7f;

/// Longest client id accepted, in bytes.
pub const MAX_CLIENT_ID: usize = 1024;

/// The router's id for a client: `/ + # $ %` percent-encoded, so distinct
/// ids stay distinct and the router's own validation never trips.
pub fn router_client_id(client_id: &str) -> String {
    if !client_id.contains(['/', '+', '#', '$', '%']) {
        return client_id.to_string();
    }
    let mut out = String::with_capacity(client_id.len() + 8);
    for c in client_id.chars() {
        match c {
            '/' | '+' | '#' | '$' | '%' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// The client id a [`router_client_id`] came from, for logs and records.
pub fn client_id_of(router_id: &str) -> String {
    if !router_id.contains('%') {
        return router_id.to_string();
    }
    let mut out = String::with_capacity(router_id.len());
    let mut rest = router_id;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 3);
        match code.and_then(|c| u8::from_str_radix(c, 16).ok()) {
            Some(b) => {
                out.push(char::from(b));
                rest = &rest[at + 3..];
            }
            None => {
                out.push('%');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn needs_escape(first: u8) -> bool {
    first >= ESCAPE
}

/// Topic as stored in the router.
pub fn escape_topic(topic: Bytes) -> Bytes {
    match topic.first() {
        Some(&b) if needs_escape(b) => {
            let mut out = BytesMut::with_capacity(topic.len() + 1);
            out.extend_from_slice(&[ESCAPE]);
            out.extend_from_slice(&topic);
            out.freeze()
        }
        _ => topic,
    }
}

/// [`escape_topic`] of a borrowed topic, copied only when it changes.
pub fn escape_topic_ref(topic: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    match topic.first() {
        Some(&b) if needs_escape(b) => {
            std::borrow::Cow::Owned(escape_topic(Bytes::copy_from_slice(topic)).to_vec())
        }
        _ => std::borrow::Cow::Borrowed(topic),
    }
}

/// Topic as the client published it.
pub fn unescape_topic(topic: Bytes) -> Bytes {
    match topic.first() {
        Some(&ESCAPE) => topic.slice(1..),
        _ => topic,
    }
}

/// Client ids of Axion's own components start with this (see the
/// connection limit in `session::handshake`).
pub const OWN_CLIENT_PREFIX: &str = axion_wire::ids::OWN_PREFIX;

/// Filter as stored in the router; the `$share/<group>/` prefix is kept and
/// the filter behind it escaped like a topic, so matching is unchanged.
pub fn escape_filter(filter: &str) -> String {
    let (prefix, rest) = split_share(filter);
    let rest = match rest.as_bytes().first() {
        Some(&b) if needs_escape(b) => format!("{}{rest}", ESCAPE as char),
        _ => rest.to_string(),
    };
    match share_group(filter) {
        // rumqttd keys a shared group by its name alone, so `$share/g/a`
        // and `$share/g/b` would share one reading position across two
        // logs and lose messages; MQTT names a shared subscription by group
        // and filter together. The router gets a group name of its own for
        // each filter (`~` cannot clash: the hash is always appended).
        Some(group) => format!("$share/{group}~{:016x}/{rest}", fnv1a(rest.as_bytes())),
        None => {
            debug_assert!(prefix.is_empty());
            rest
        }
    }
}

/// A router-form filter as the client subscribed it (the inverse of
/// [`escape_filter`]).
pub fn client_filter(path: &str) -> String {
    let (prefix, rest) = split_share(path);
    let rest = rest.strip_prefix(ESCAPE as char).unwrap_or(rest);
    match share_group(path) {
        Some(group) => {
            let group = group.split_once('~').map_or(group, |(g, _)| g);
            format!("$share/{group}/{rest}")
        }
        None => {
            debug_assert!(prefix.is_empty());
            rest.to_string()
        }
    }
}

/// FNV-1a: a stable, dependency-free hash for the router's group names.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Splits `$share/<group>/<filter>` into (`$share/<group>/`, `<filter>`).
pub fn split_share(filter: &str) -> (&str, &str) {
    if let Some(rest) = filter.strip_prefix("$share/") {
        if let Some(slash) = rest.find('/') {
            let cut = "$share/".len() + slash + 1;
            return (&filter[..cut], &filter[cut..]);
        }
    }
    ("", filter)
}

/// The group of a `$share/<group>/<filter>` filter, if it is one.
pub fn share_group(filter: &str) -> Option<&str> {
    let (share, _) = split_share(filter);
    share
        .strip_prefix("$share/")
        .map(|g| g.trim_end_matches('/'))
}

/// Why a topic name or filter is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("topic is not valid UTF-8")]
    NotUtf8,
    #[error("topic contains NUL")]
    Nul,
    #[error("topic name contains a wildcard")]
    Wildcard,
    #[error("topic name is empty")]
    EmptyTopic,
    #[error("topic filter {0:?} is invalid")]
    InvalidFilter(String),
}

/// True for `axion/<pkg>/queue/<q>/enqueue` and `…/cmd`: requests the
/// queue owner answers on a topic the requester names.
pub fn is_queue_request(topic: &[u8]) -> bool {
    let mut levels = topic.split(|b| *b == b'/');
    matches!(
        (
            levels.next(),
            levels.next(),
            levels.next(),
            levels.next(),
            levels.next(),
            levels.next()
        ),
        (Some(b"axion"), Some(pkg), Some(b"queue"), Some(q), Some(b"enqueue" | b"cmd"), None)
            if !pkg.is_empty() && !q.is_empty()
    )
}

/// Checks a PUBLISH topic name (MQTT-4.7.3, 3.3.2-2). An empty topic is
/// only legal with an MQTT 5 topic alias, which the caller checks.
pub fn check_topic(topic: &[u8]) -> Result<(), NameError> {
    let s = std::str::from_utf8(topic).map_err(|_| NameError::NotUtf8)?;
    if s.contains('\0') {
        return Err(NameError::Nul);
    }
    if s.contains(['+', '#']) {
        return Err(NameError::Wildcard);
    }
    Ok(())
}

/// Checks a SUBSCRIBE/UNSUBSCRIBE filter (MQTT-4.7.1, 4.8.2).
pub fn check_filter(filter: &str) -> Result<(), NameError> {
    let invalid = || NameError::InvalidFilter(filter.to_string());
    if filter.contains('\0') {
        return Err(NameError::Nul);
    }
    let (prefix, rest) = split_share(filter);
    if filter.starts_with("$share/") && (prefix.is_empty() || prefix.len() <= "$share//".len()) {
        return Err(invalid());
    }
    if prefix.contains(['+', '#']) || rest.is_empty() {
        return Err(invalid());
    }
    let levels: Vec<&str> = rest.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let last = i + 1 == levels.len();
        if level.contains('#') && (*level != "#" || !last) {
            return Err(invalid());
        }
        if level.contains('+') && *level != "+" {
            return Err(invalid());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_router_client_id_turns_back_into_the_client_id() {
        for id in ["plain", "a/b+c#d$e%f", "%", "x%2"] {
            assert_eq!(client_id_of(&router_client_id(id)), id);
        }
    }

    use super::*;

    #[test]
    fn router_filters_map_back_to_what_the_client_subscribed() {
        for filter in ["a/+/c", "#", "$share/g/a/#", "$share/g/é/x", "é/#"] {
            assert_eq!(client_filter(&escape_filter(filter)), filter);
        }
    }

    #[test]
    fn queue_requests_are_enqueue_and_cmd_only() {
        assert!(is_queue_request(b"axion/p/queue/q/enqueue"));
        assert!(is_queue_request(b"axion/p/queue/q/cmd"));
        for t in [
            "axion/p/queue/q/ack",
            "axion/p/queue//enqueue",
            "axion/p/queue/q/enqueue/x",
            "x/p/queue/q/cmd",
        ] {
            assert!(!is_queue_request(t.as_bytes()), "{t}");
        }
    }

    #[test]
    fn client_ids_map_injectively() {
        assert_eq!(router_client_id("plain-id"), "plain-id");
        assert_eq!(router_client_id("a/b"), "a%2Fb");
        assert_eq!(router_client_id("a%2Fb"), "a%252Fb");
        assert!(!router_client_id("x+#$/").contains(['+', '#', '$', '/']));
    }

    #[test]
    fn topics_round_trip() {
        for t in ["é/x", "plain/topic", "\u{7f}odd", "", "日本"] {
            let escaped = escape_topic(Bytes::from(t.to_string()));
            assert!(escaped.first().is_none_or(|b| b.is_ascii()));
            assert_eq!(unescape_topic(escaped), Bytes::from(t.to_string()));
        }
        assert_eq!(escape_filter("é/+"), "\u{7f}é/+");
        let shared = escape_filter("$share/g/é/#");
        assert!(shared.starts_with("$share/g~") && shared.ends_with("/\u{7f}é/#"));
        assert_eq!(split_share(&shared).1, "\u{7f}é/#");
        // One router group per (group, filter); the same pair maps alike.
        assert_ne!(
            share_group(&escape_filter("$share/g/a")),
            share_group(&escape_filter("$share/g/b"))
        );
        assert_eq!(escape_filter("$share/g/a"), escape_filter("$share/g/a"));
        assert_eq!(escape_filter("+/é"), "+/é");
        assert_eq!(share_group("$share/g1/a/#"), Some("g1"));
        assert_eq!(share_group("a/#"), None);
    }

    #[test]
    fn validates_names() {
        assert!(check_topic(b"a/b").is_ok());
        assert_eq!(check_topic(b"a/+"), Err(NameError::Wildcard));
        assert_eq!(check_topic(b"a\0"), Err(NameError::Nul));
        assert_eq!(check_topic(&[0xff, 0xfe]), Err(NameError::NotUtf8));
        for ok in ["#", "a/+/c", "+", "a/#", "$share/g/a/#", "/"] {
            assert!(check_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a#", "a/#/b", "a+/b", "$share/g/", "$share//a", "a\0"] {
            assert!(check_filter(bad).is_err(), "{bad:?}");
        }
    }
}
