//! Who may do what, for every listener Axion opens: the broker's MQTT
//! ports and the bridge's WebSocket port share one auth file and one set of
//! rules, so a login or a topic is treated the same whichever way it comes
//! in. [`auth`] checks logins (argon2 hashes, bridge tokens) and holds each
//! login's roles; [`acl`] decides who may publish and subscribe to what
//! (rumqttd has no per-topic authorization); [`login_limit`] slows down
//! password guessing per address; [`tls`] loads the certificate of an
//! MQTTS or `wss://` listener. Its own crate so that the bridge gets access
//! control without the broker's router and store.

pub mod acl;
pub mod auth;
pub mod login_limit;
pub mod tls;
