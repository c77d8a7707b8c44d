//! The MQTT client ids of Axion's own components, written once.
//!
//! Some of these are a security rule, not a naming habit: the broker's ACL
//! lets only the client `axion-hb-<service>-<host>-<port>` write the
//! heartbeat topic of that instance, so the publisher that builds the id
//! and the ACL that checks it must use the same function. The queue owner's
//! id is stable so a restart takes over its session.

/// Client ids of Axion's own components start with this; the broker keeps
/// connection slots for them and refuses the prefix to other clients that
/// log in as themselves.
pub const OWN_PREFIX: &str = "axion-";

/// A client id the broker accepts: rumqttd's listener dies on `/ + # $` in a
/// client id, so anything outside a safe set becomes `_`.
pub fn sanitize_client_id(raw: &str) -> String {
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The heartbeat publisher's client id for `<host>:<port>` of `service`:
/// the only client the ACL lets write that instance's heartbeat topic.
pub fn heartbeat_client(service: &str, host: &str, port_slot: impl std::fmt::Display) -> String {
    sanitize_client_id(&format!("axion-hb-{service}-{host}-{port_slot}"))
}

/// The client id of a service on the service runtime; it also names the
/// worker whose tasks the queue owner frees when its heartbeat goes offline.
pub fn service_client(service: &str, host: &str, slot: u32) -> String {
    sanitize_client_id(&format!("axion-svc-{service}-{host}-{slot}"))
}

/// The queue owner's client id unless configured otherwise: stable, so a
/// restart takes over its session.
pub fn queue_owner_client(package: &str) -> String {
    format!("axion-queues-{package}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_characters_become_underscores() {
        assert_eq!(
            sanitize_client_id("axion-hb-a/b+c#d$e-h:1"),
            "axion-hb-a_b_c_d_e-h:1"
        );
    }

    #[test]
    fn heartbeat_ids_are_sanitised_and_prefixed() {
        let id = heartbeat_client("re port", "h1", 8080);
        assert_eq!(id, "axion-hb-re_port-h1-8080");
        assert!(id.starts_with(OWN_PREFIX));
    }
}
