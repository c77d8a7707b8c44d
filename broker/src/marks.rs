//! What the front end must still know about a publish when it delivers it.
//!
//! rumqttd's router stores a publish once and hands it to every matching
//! subscriber without saying at which QoS it was published, whether it was
//! retained or who sent it. MQTT needs all three at delivery time:
//! delivered QoS = min(publish, subscription), retain-as-published and No
//! Local. So the front end writes them into one user property on the way
//! in and takes it off on the way out; no subscriber ever sees it. A
//! publish that needs none of them (QoS 1 with no QoS 2 subscriber
//! anywhere, no No Local or retain-as-published subscription) carries no
//! mark and costs nothing. (Message expiry needs no mark: the router counts
//! the time a message waits in its log and lowers the interval itself.)

use std::sync::atomic::{AtomicBool, Ordering};

use rumqttd::protocol::PublishProperties;

/// The user property's key; it is always the last user property.
pub const KEY: &str = "axion";

/// Facts about one publish, as written into its mark.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mark {
    /// QoS the publisher used, when a subscriber might get more.
    pub qos: Option<u8>,
    /// The publisher set RETAIN (the router only sees live traffic).
    pub retain: bool,
    /// The publishing client's router id, for No Local.
    pub origin: Option<String>,
    /// A renewal marker of that round (see [`crate::renewal`]): never
    /// delivered.
    pub marker: Option<u64>,
}

impl Mark {
    fn is_empty(&self) -> bool {
        *self == Mark::default()
    }

    fn encode(&self) -> String {
        let mut s = String::new();
        if let Some(q) = self.qos {
            s.push_str(&format!("q{q};"));
        }
        if self.retain {
            s.push_str("r;");
        }
        if let Some(round) = self.marker {
            s.push_str(&format!("m{round};"));
        }
        // Last, because a client id may contain `;`.
        if let Some(o) = &self.origin {
            s.push('o');
            s.push_str(o);
        }
        s
    }

    fn decode(mut s: &str) -> Mark {
        let mut mark = Mark::default();
        while !s.is_empty() {
            if let Some(origin) = s.strip_prefix('o') {
                mark.origin = Some(origin.to_string());
                break;
            }
            let (field, rest) = s.split_once(';').unwrap_or((s, ""));
            s = rest;
            match field.split_at(1) {
                ("q", q) => mark.qos = q.parse().ok(),
                ("r", _) => mark.retain = true,
                ("m", round) => mark.marker = round.parse().ok(),
                _ => {}
            }
        }
        mark
    }

    /// Appends this mark to `props` (nothing if there is nothing to say).
    pub fn attach(self, props: Option<PublishProperties>) -> Option<PublishProperties> {
        if self.is_empty() {
            return props;
        }
        let mut p = props.unwrap_or_default();
        p.user_properties.push((KEY.to_string(), self.encode()));
        Some(p)
    }

    /// The round of a renewal marker, without taking the mark off.
    pub fn marker_round(props: &Option<PublishProperties>) -> Option<u64> {
        let (k, v) = props.as_ref()?.user_properties.last()?;
        if k != KEY {
            return None;
        }
        Mark::decode(v).marker
    }

    /// Removes the mark from `props`, leaving `None` if nothing else was there.
    pub fn take(props: &mut Option<PublishProperties>) -> Mark {
        let Some(p) = props.as_mut() else {
            return Mark::default();
        };
        if p.user_properties.last().is_none_or(|(k, _)| k != KEY) {
            return Mark::default();
        }
        let mark = p
            .user_properties
            .pop()
            .map(|(_, v)| Mark::decode(&v))
            .unwrap_or_default();
        if *p == PublishProperties::default() {
            *props = None;
        }
        mark
    }
}

/// Which facts any subscription so far needs; each flag is set once and
/// stays set, so publishes carry only the marks someone may use.
#[derive(Debug, Default)]
pub struct Needed {
    /// A subscription with MQTT 5 No Local exists.
    pub origin: AtomicBool,
    /// A QoS 2 subscription exists: QoS 1 publishes need their QoS.
    pub qos1: AtomicBool,
    /// A subscription with retain-as-published exists.
    pub retain: AtomicBool,
}

impl Needed {
    /// The mark for a publish at `qos` from `origin`.
    pub fn mark(&self, qos: u8, retain: bool, origin: Option<&str>) -> Mark {
        let wanted = |flag: &AtomicBool| flag.load(Ordering::Relaxed);
        Mark {
            qos: (qos == 0 || (qos == 1 && wanted(&self.qos1))).then_some(qos),
            retain: retain && wanted(&self.retain),
            origin: origin.filter(|_| wanted(&self.origin)).map(str::to_string),
            marker: None,
        }
    }

    pub fn set(flag: &AtomicBool) {
        if !flag.load(Ordering::Relaxed) {
            flag.store(true, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_the_round_trip_and_leave_other_properties_alone() {
        let mark = Mark {
            qos: Some(1),
            retain: true,
            origin: Some("a;b%2Fc".into()),
            marker: Some(7),
        };
        let props = PublishProperties {
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        };
        let mut props = mark.clone().attach(Some(props));
        assert_eq!(Mark::take(&mut props), mark);
        assert_eq!(
            props.unwrap().user_properties,
            vec![("k".into(), "v".into())]
        );
    }

    #[test]
    fn an_empty_mark_adds_nothing_and_taking_from_nothing_is_empty() {
        assert_eq!(Mark::default().attach(None), None);
        let mut props = Mark {
            qos: Some(0),
            ..Default::default()
        }
        .attach(None);
        assert_eq!(Mark::take(&mut props).qos, Some(0));
        assert_eq!(props, None);
        assert_eq!(Mark::take(&mut None), Mark::default());
    }
}
