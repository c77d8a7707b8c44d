//! The `axion/<package>/…` topic tree of docs/DESIGN.md, built in one place.
//!
//! Every name that becomes a topic level (package, service, queue) is checked
//! here, so a `/`, `+`, `#` or NUL in user input is refused with a clear error
//! instead of silently landing on the wrong topic.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopicError {
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("{what} {value:?} must not contain '/', '+', '#' or NUL")]
    Forbidden { what: &'static str, value: String },
}

/// Checks that `value` can stand as one topic level.
pub fn validate_level(what: &'static str, value: &str) -> Result<(), TopicError> {
    if value.is_empty() {
        return Err(TopicError::Empty { what });
    }
    if value.contains(['/', '+', '#', '\0']) {
        return Err(TopicError::Forbidden {
            what,
            value: value.to_string(),
        });
    }
    Ok(())
}

/// `axion/<pkg>/heartbeat/<service>/<host>:<port>`
pub fn heartbeat(package: &str, service: &str, instance_id: &str) -> String {
    format!("axion/{package}/heartbeat/{service}/{instance_id}")
}

/// Wildcard over every heartbeat of every package.
pub const ALL_HEARTBEATS: &str = "axion/+/heartbeat/+/+";

/// `axion/<pkg>/alarm/<service>`: a retained alarm about a service (a
/// restart loop), cleared by an empty retained message.
pub fn alarm(package: &str, service: &str) -> String {
    format!("axion/{package}/alarm/{service}")
}

/// `(package, service)` of an alarm topic.
pub fn parse_alarm(topic: &str) -> Option<(&str, &str)> {
    let rest = topic.strip_prefix("axion/")?;
    let (package, rest) = rest.split_once('/')?;
    let service = rest.strip_prefix("alarm/")?;
    (!package.is_empty() && !service.is_empty() && !service.contains('/'))
        .then_some((package, service))
}

/// `axion/<pkg>/cmd/announce`: ask every instance to republish now.
pub fn announce(package: &str) -> String {
    format!("axion/{package}/cmd/announce")
}

/// Asks every instance of every package to republish its heartbeat now:
/// what a fleet-wide reader (`axion monitor` without a package) sends on
/// connect, so records that only live as retained messages on another
/// node of a clustered broker are published again where it listens.
pub const ANNOUNCE_FLEET: &str = "axion/cmd/announce";

/// `axion/<pkg>/event/<t1>/<t2>/…` for the event type `t1.t2.…`.
pub fn event(package: &str, event_type: &str) -> String {
    format!("axion/{package}/event/{}", event_type.replace('.', "/"))
}

/// `axion/<pkg>/queue/<queue>/<leaf>` (leaf: enqueue, tasks, ack, fail,
/// progress, ready, dead, stats).
pub fn queue(package: &str, queue: &str, leaf: &str) -> String {
    format!("axion/{package}/queue/{queue}/{leaf}")
}

/// `axion/<pkg>/queues/cmd/list`: asks the queue owner of `package` for
/// the current stats of every queue it holds. The reply goes to the MQTT 5
/// Response Topic with its Correlation Data (or the body's `replyTo`), as
/// for a queue's `…/cmd`; see [`crate::queue::ListRequest`]. It is a
/// package-level topic because a reader that does not know the queues yet
/// cannot address one of them.
pub fn queues_list(package: &str) -> String {
    format!("axion/{package}/queues/cmd/list")
}

/// The shared subscription workers use for a queue's tasks. One group name
/// per queue, because rumqttd keys shared groups by name alone.
pub fn queue_tasks_shared(package: &str, queue_name: &str) -> String {
    format!(
        "$share/{package}.{queue_name}/{}",
        queue(package, queue_name, "tasks")
    )
}

/// `axion/<pkg>/queue/<queue>/tasks/<worker>`: where the owner delivers
/// a worker's tasks when it takes them by directed delivery (a broker
/// without shared subscriptions). `worker` must be one topic level (see
/// [`validate_level`]).
pub fn queue_tasks_directed(package: &str, queue_name: &str, worker: &str) -> String {
    format!("{}/{worker}", queue(package, queue_name, "tasks"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_checked() {
        assert!(validate_level("queue", "embedding.generate").is_ok());
        assert_eq!(
            validate_level("service", ""),
            Err(TopicError::Empty { what: "service" })
        );
        for bad in ["a/b", "a+", "#", "a\0"] {
            assert!(validate_level("package", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn topics_follow_the_design() {
        assert_eq!(event("p", "fs.change"), "axion/p/event/fs/change");
        assert_eq!(
            queue_tasks_shared("p", "embedding.generate"),
            "$share/p.embedding.generate/axion/p/queue/embedding.generate/tasks"
        );
        assert_eq!(
            queue_tasks_directed("p", "embedding.generate", "w-1"),
            "axion/p/queue/embedding.generate/tasks/w-1"
        );
        assert_eq!(queues_list("p"), "axion/p/queues/cmd/list");
        assert_eq!(
            heartbeat("p", "report", "h:1"),
            "axion/p/heartbeat/report/h:1"
        );
    }
}
