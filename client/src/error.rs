//! The one error type of this crate, so callers match on what went wrong
//! (a bad name, a bad environment variable, a broker that never answered)
//! instead of parsing strings.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    #[error(transparent)]
    Topic(#[from] axion_wire::TopicError),
    #[error("environment variable {name}={value:?} is not a whole number of seconds")]
    Env { name: &'static str, value: String },
    #[error("cannot read this machine's hostname: {0}")]
    Hostname(std::io::Error),
    #[error("the heartbeat task has already stopped")]
    Stopped,
    #[error("the offline record was not acknowledged by the broker within {0:?}")]
    StopTimeout(Duration),
    /// Boxed: rumqttc's error carries the whole failed request.
    #[error("MQTT client request failed: {0}")]
    Client(Box<rumqttc::v5::ClientError>),
    #[error("no SUBACK from the broker within {0:?}")]
    SubscribeTimeout(Duration),
}

impl From<rumqttc::v5::ClientError> for HeartbeatError {
    fn from(err: rumqttc::v5::ClientError) -> Self {
        HeartbeatError::Client(Box::new(err))
    }
}
