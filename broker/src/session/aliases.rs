//! MQTT 5 topic aliases, both ways, kept by the front end.
//!
//! rumqttd keys the aliases it sends by subscription filter, so a client
//! subscribed with a wildcard gets messages under the wrong topic; and an
//! alias-only publish would reach the front end's topic checks with an
//! empty topic. So the router never sees an alias: incoming aliases are
//! resolved here before any check, and outgoing ones are chosen here per
//! topic, within the maximum the client announced.

use std::collections::HashMap;

use bytes::Bytes;
use rumqttd::protocol::DisconnectReasonCode;

/// Aliases a client may set, as announced in CONNACK; also the most this
/// broker sends a client, which bounds both maps' memory per session.
pub(super) const MAX_ALIASES: u16 = 64;

#[derive(Debug, Default)]
pub(super) struct Aliases {
    /// Client to broker: alias → topic, as the client sent it.
    incoming: HashMap<u16, Bytes>,
    /// Broker to client: topic → alias.
    outgoing: HashMap<Bytes, u16>,
    /// Aliases the client accepts (its Topic Alias Maximum, capped).
    outgoing_max: u16,
}

/// What to do with a delivery's topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outgoing {
    /// Send the topic and this alias; [`Aliases::learned`] once it is sent.
    New(u16),
    /// Send an empty topic and this alias.
    Known(u16),
}

impl Aliases {
    pub(super) fn new(client_max: u16) -> Self {
        Aliases {
            outgoing_max: client_max.min(MAX_ALIASES),
            ..Default::default()
        }
    }

    /// Resolves a client publish's topic from its alias (MQTT-3.3.2-7..12).
    pub(super) fn resolve(
        &mut self,
        topic: &mut Bytes,
        alias: Option<u16>,
    ) -> Result<(), (&'static str, DisconnectReasonCode)> {
        let Some(alias) = alias else {
            if topic.is_empty() {
                return Err(("empty topic name", DisconnectReasonCode::ProtocolError));
            }
            return Ok(());
        };
        if alias == 0 || alias > MAX_ALIASES {
            return Err((
                "topic alias out of range",
                DisconnectReasonCode::TopicAliasInvalid,
            ));
        }
        if topic.is_empty() {
            *topic = self
                .incoming
                .get(&alias)
                .cloned()
                .ok_or(("topic alias never set", DisconnectReasonCode::ProtocolError))?;
        } else {
            // A copy: `topic` is a view into the read buffer its packet
            // came in, which the alias would otherwise hold for the whole
            // session.
            self.incoming.insert(alias, Bytes::copy_from_slice(topic));
        }
        Ok(())
    }

    /// The alias to use for a delivery on `topic`, if any.
    pub(super) fn outgoing(&self, topic: &Bytes) -> Option<Outgoing> {
        if let Some(alias) = self.outgoing.get(topic) {
            return Some(Outgoing::Known(*alias));
        }
        let next = u16::try_from(self.outgoing.len()).ok()? + 1;
        (next <= self.outgoing_max).then_some(Outgoing::New(next))
    }

    /// The client has been sent `topic` with `alias`.
    pub(super) fn learned(&mut self, topic: &Bytes, alias: u16) {
        // A copy: the delivery's topic is a view into its publisher's read
        // buffer, which this session would otherwise hold while it lives.
        self.outgoing.insert(Bytes::copy_from_slice(topic), alias);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incoming_aliases_are_set_then_used_and_bad_ones_refused() {
        let mut a = Aliases::new(0);
        let mut t = Bytes::from_static(b"a/b");
        assert!(a.resolve(&mut t, Some(3)).is_ok());
        let mut empty = Bytes::new();
        assert!(a.resolve(&mut empty, Some(3)).is_ok());
        assert_eq!(empty, "a/b");
        assert!(a.resolve(&mut Bytes::new(), Some(4)).is_err());
        assert!(a.resolve(&mut Bytes::new(), None).is_err());
        let mut t = Bytes::from_static(b"x");
        assert_eq!(
            a.resolve(&mut t, Some(0)).unwrap_err().1,
            DisconnectReasonCode::TopicAliasInvalid
        );
        assert!(a.resolve(&mut t, Some(MAX_ALIASES + 1)).is_err());
    }

    #[test]
    fn outgoing_aliases_stay_within_the_clients_maximum() {
        let mut a = Aliases::new(1);
        let (x, y) = (Bytes::from_static(b"x"), Bytes::from_static(b"y"));
        assert_eq!(a.outgoing(&x), Some(Outgoing::New(1)));
        a.learned(&x, 1);
        assert_eq!(a.outgoing(&x), Some(Outgoing::Known(1)));
        assert_eq!(a.outgoing(&y), None);
        assert_eq!(Aliases::new(0).outgoing(&x), None);
    }
}
