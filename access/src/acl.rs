//! What an authenticated client may publish and subscribe to.
//!
//! rumqttd has no per-topic authorization, so without this anyone who can
//! connect could forge or delete a heartbeat, ack someone else's task or
//! read every event. Rules are MQTT filters with `%c` (client id) and `%u`
//! (user name) substituted at check time; the MQTT front end and the
//! WebSocket bridge both ask the same [`Permissions`] before acting.
//!
//! Two rules hold whatever the roles say:
//! - a heartbeat topic `axion/<pkg>/heartbeat/<service>/<host>:<port>` is
//!   written only by the instance's own client id
//!   (`axion-hb-<service>-<host>-<port>`, `axion_wire::ids::heartbeat_client`,
//!   the same function the publisher names itself with), so no
//!   client can forge or delete (empty retained payload) another's record;
//! - a rule's leading wildcard never matches a `$` level (as in MQTT
//!   matching), so `$share/…` subscriptions need an explicit `$share/…`
//!   rule: shared queue groups are for roles that list them (workers).

use axion_wire::ids;

/// Why a publish or subscription was refused, for logs and audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No rule of the client's roles covers it.
    NoRule,
    /// The global deny list covers it.
    Forbidden,
    /// A heartbeat topic written by another instance's client.
    ForeignHeartbeat,
    /// A client id reserved to Axion's own components.
    ReservedClientId,
}

impl Denied {
    pub fn as_str(self) -> &'static str {
        match self {
            Denied::NoRule => "no rule allows it",
            Denied::Forbidden => "forbidden by the deny list",
            Denied::ForeignHeartbeat => "heartbeat topic of another instance",
            Denied::ReservedClientId => "client id reserved to Axion's own components",
        }
    }
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One filter rule, kept as written: substitution happens per check.
#[derive(Debug, Clone)]
pub struct Rule {
    raw: String,
    /// Whether `%c` or `%u` occur, so plain rules skip substitution.
    templated: bool,
}

impl Rule {
    pub fn new(raw: &str) -> Result<Rule, String> {
        if raw.is_empty() || raw.contains('\0') {
            return Err("empty filter or NUL in filter".into());
        }
        let levels: Vec<&str> = raw.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            let bad_hash = level.contains('#') && (*level != "#" || i + 1 != levels.len());
            let bad_plus = level.contains('+') && *level != "+";
            if bad_hash || bad_plus {
                return Err(format!("level {level:?} is not a valid filter level"));
            }
        }
        Ok(Rule {
            raw: raw.to_string(),
            templated: raw.contains("%c") || raw.contains("%u"),
        })
    }

    /// Whether the rule, as written (a deny rule has no `%c`/`%u`), matches
    /// `topic`.
    pub fn matches(&self, topic: &str) -> bool {
        topic_matches(&self.raw, topic)
    }

    /// The rule with `%c`/`%u` filled in; `None` if a value would change
    /// the rule's shape (a `/`, `+` or `#` in it), `%u` has no user, or
    /// `%c` is not a client id the user may claim (see [`claims`]).
    fn resolve<'a>(
        &'a self,
        client_id: &str,
        user: Option<&str>,
    ) -> Option<std::borrow::Cow<'a, str>> {
        if !self.templated {
            return Some(std::borrow::Cow::Borrowed(&self.raw));
        }
        let unsafe_value = |v: &str| v.is_empty() || v.contains(['/', '+', '#', '\0']);
        let mut s = self.raw.clone();
        if s.contains("%c") {
            if unsafe_value(client_id) || !claims(user, client_id) {
                return None;
            }
            s = s.replace("%c", client_id);
        }
        if s.contains("%u") {
            let user = user.filter(|u| !unsafe_value(u))?;
            s = s.replace("%u", user);
        }
        Some(std::borrow::Cow::Owned(s))
    }
}

/// Whether `user` may claim `client_id` for a `%c` rule: the id is the
/// user name, or starts with it and a `-` (`alice`, `alice-sensor-7`).
/// Any client may pick any id, so without this a `%c` rule would grant
/// one user's topics to whoever connects with that user's device id; an
/// anonymous client claims nothing.
pub fn claims(user: Option<&str>, client_id: &str) -> bool {
    let Some(user) = user.filter(|u| !u.is_empty()) else {
        return false;
    };
    client_id
        .strip_prefix(user)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
}

/// The rules one principal holds (the union of its roles).
#[derive(Debug, Clone, Default)]
pub struct Permissions {
    /// Everything allowed (Axion's internal components, admins), except
    /// the global deny lists.
    pub superuser: bool,
    /// May use the client ids of Axion's own components (`axion-…`).
    pub components: bool,
    pub publish: Vec<Rule>,
    pub subscribe: Vec<Rule>,
}

/// Filters nobody may use, whatever their roles.
#[derive(Debug, Clone, Default)]
pub struct DenyList {
    pub publish: Vec<Rule>,
    pub subscribe: Vec<Rule>,
}

impl Permissions {
    /// May `client_id` (logged in as `user`) publish on `topic`?
    pub fn may_publish(
        &self,
        deny: &DenyList,
        client_id: &str,
        user: Option<&str>,
        topic: &str,
    ) -> Result<(), Denied> {
        if deny.publish.iter().any(|r| topic_matches(&r.raw, topic)) {
            return Err(Denied::Forbidden);
        }
        if self.superuser {
            return Ok(());
        }
        if let Some(owner) = heartbeat_owner(topic) {
            if owner != client_id {
                return Err(Denied::ForeignHeartbeat);
            }
        }
        let allowed = self.publish.iter().any(|r| {
            r.resolve(client_id, user)
                .is_some_and(|rule| topic_matches(&rule, topic))
        });
        allowed.then_some(()).ok_or(Denied::NoRule)
    }

    /// May `client_id` subscribe to `filter` (`$share/<group>/…` included)?
    pub fn may_subscribe(
        &self,
        deny: &DenyList,
        client_id: &str,
        user: Option<&str>,
        filter: &str,
    ) -> Result<(), Denied> {
        if deny.subscribe.iter().any(|r| filter_covers(&r.raw, filter)) {
            return Err(Denied::Forbidden);
        }
        if self.superuser {
            return Ok(());
        }
        let allowed = self.subscribe.iter().any(|r| {
            r.resolve(client_id, user)
                .is_some_and(|rule| filter_covers(&rule, filter))
        });
        allowed.then_some(()).ok_or(Denied::NoRule)
    }
}

/// True for `axion/<pkg>/heartbeat/<service>/<instance>`.
pub fn is_heartbeat_topic(topic: &str) -> bool {
    heartbeat_owner(topic).is_some()
}

/// The client id allowed to write `topic` if it is a heartbeat topic.
fn heartbeat_owner(topic: &str) -> Option<String> {
    let mut levels = topic.split('/');
    let (Some("axion"), Some(_pkg), Some("heartbeat"), Some(service), Some(instance), None) = (
        levels.next(),
        levels.next(),
        levels.next(),
        levels.next(),
        levels.next(),
        levels.next(),
    ) else {
        return None;
    };
    // An instance id without `host:port` shape has no owner: nobody but a
    // superuser writes it.
    let owner = match instance.rsplit_once(':') {
        Some((host, port)) => ids::heartbeat_client(service, host, port),
        None => String::new(),
    };
    Some(owner)
}

/// MQTT matching of a topic name against a filter; a wildcard in the first
/// level does not match a topic starting with `$` (MQTT-4.7.2-1).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    let mut first = true;
    loop {
        match (f.next(), t.next()) {
            (Some("#"), level) => return !(first && level.is_some_and(|l| l.starts_with('$'))),
            (Some("+"), Some(level)) => {
                if first && level.starts_with('$') {
                    return false;
                }
            }
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}

/// True if every topic `requested` matches is matched by `rule`.
pub fn filter_covers(rule: &str, requested: &str) -> bool {
    let mut r = rule.split('/');
    let mut q = requested.split('/');
    let mut first = true;
    loop {
        match (r.next(), q.next()) {
            (Some("#"), level) => return !(first && level.is_some_and(|l| l.starts_with('$'))),
            (Some("+"), Some(level)) => {
                if level == "#" || (first && level.starts_with('$')) {
                    return false;
                }
            }
            (Some(a), Some(b)) if a == b && a != "+" && a != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perms(publish: &[&str], subscribe: &[&str]) -> Permissions {
        Permissions {
            superuser: false,
            components: false,
            publish: publish.iter().map(|r| Rule::new(r).unwrap()).collect(),
            subscribe: subscribe.iter().map(|r| Rule::new(r).unwrap()).collect(),
        }
    }

    #[test]
    fn matching_follows_mqtt() {
        assert!(topic_matches("a/+/c", "a/b/c"));
        assert!(topic_matches("a/#", "a"));
        assert!(topic_matches("a/#", "a/b/c"));
        assert!(!topic_matches("a/+", "a/b/c"));
        assert!(!topic_matches("#", "$SYS/x"));
        assert!(!topic_matches("+/x", "$SYS/x"));
        assert!(topic_matches("$SYS/#", "$SYS/x"));
    }

    #[test]
    fn coverage_of_filters() {
        assert!(filter_covers("a/#", "a/+/c"));
        assert!(filter_covers("a/+/c", "a/b/c"));
        assert!(!filter_covers("a/+/c", "a/#"));
        assert!(!filter_covers("a/b", "a/+"));
        assert!(!filter_covers("#", "$share/g/a"));
        assert!(filter_covers(
            "$share/+/axion/p/queue/+/tasks",
            "$share/p.q/axion/p/queue/q/tasks"
        ));
        assert!(!filter_covers("axion/p/#", "axion/other/#"));
    }

    #[test]
    fn substitution_cannot_widen_a_rule() {
        let p = perms(&["dev/%c/#", "user/%u/+"], &["dev/%c/#"]);
        let deny = DenyList::default();
        let bob = Some("bob");
        assert!(p.may_publish(&deny, "bob-c1", bob, "dev/bob-c1/x").is_ok());
        assert!(p.may_publish(&deny, "bob-c1", bob, "dev/bob-c2/x").is_err());
        // `%c` only stands for ids the user may claim.
        assert!(p
            .may_publish(&deny, "alice-c1", bob, "dev/alice-c1/x")
            .is_err());
        assert!(p.may_publish(&deny, "bobby", bob, "dev/bobby/x").is_err());
        assert!(p.may_publish(&deny, "c1", None, "dev/c1/x").is_err());
        assert!(p
            .may_publish(&deny, "c1", Some("bob"), "user/bob/x")
            .is_ok());
        assert!(p.may_publish(&deny, "c1", None, "user/bob/x").is_err());
        assert!(p.may_subscribe(&deny, "#", None, "dev/a/#").is_err());
    }

    #[test]
    fn heartbeats_belong_to_their_instance() {
        let p = perms(&["axion/p/#"], &[]);
        let deny = DenyList::default();
        let topic = "axion/p/heartbeat/report/h1:8080";
        assert!(p
            .may_publish(&deny, "axion-hb-report-h1-8080", None, topic)
            .is_ok());
        assert_eq!(
            p.may_publish(&deny, "intruder", None, topic),
            Err(Denied::ForeignHeartbeat)
        );
        assert!(p
            .may_publish(&deny, "intruder", None, "axion/p/event/x")
            .is_ok());
    }
}
