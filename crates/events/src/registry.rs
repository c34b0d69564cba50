//! The event types a process knows: how each one's envelopes decode, what an event is routed by
//! and who may read it.

use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::envelope::{AnyData, DecodeError, Envelope, EventType};

/// What an event is routed by: a field of its record that subscriptions select on, and the
/// value it has there. A car's own events carry `id` 7; a record that belongs to car 7 would
/// carry its own `id` and `car` 7, so "every visit of car 7" is routed as well. A gateway hands
/// an event only to the subscriptions keyed by one of its keys, and to the unkeyed ones of its
/// type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub field: &'static str,
    pub value: i64,
}

impl Key {
    pub const fn new(field: &'static str, value: i64) -> Self {
        Self { field, value }
    }

    /// The record's own id.
    pub const fn id(value: i64) -> Self {
        Self::new("id", value)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.field, self.value)
    }
}

/// Who may read a record as one of its versions shows it: the domain's read rule
/// (`Record::readers`), computed once per event and compared with each subscriber's [`Viewer`],
/// so that a shared execution serves private records without running once per user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readers {
    /// Every signed-in user.
    Everyone,
    /// Its owner (none: staff only) and staff.
    OwnerAndStaff(Option<i64>),
    /// Staff only: what an event whose data does not decode to its type gets, so that a
    /// mistake never shows a record to everyone.
    Staff,
}

impl Readers {
    pub fn admit(self, viewer: Viewer) -> bool {
        match self {
            Readers::Everyone => true,
            Readers::OwnerAndStaff(owner) => viewer.is_staff || owner == Some(viewer.user_id),
            Readers::Staff => viewer.is_staff,
        }
    }
}

/// Who is reading: the signed-in user and whether it is staff (from the database over HTTP; from
/// the access token's `is_staff` claim on the gateway, which has no database).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Viewer {
    pub user_id: i64,
    pub is_staff: bool,
}

/// One registered event type: its name, how its envelopes are decoded, the keys an event of it
/// is routed by and who may read it.
#[derive(Clone, Copy)]
pub struct EventKind {
    pub event_type: EventType,
    decode: fn(&[u8]) -> Result<Envelope<AnyData>, serde_json::Error>,
    keys: fn(&AnyData) -> Vec<Key>,
    readers: fn(&AnyData) -> Readers,
    /// Each event carries its record's whole state after the write, so for one record a newer
    /// event supersedes an older one ([`Registry::supersedes`]).
    state: bool,
}

impl EventKind {
    /// `event_type`, whose envelopes carry a `T`, read by `readers` (the domain's read rule
    /// through a downcast; there is no default, so that no type is readable by everyone
    /// because a line was forgotten); routed by no key until [`EventKind::routed_by`].
    pub fn of<T>(event_type: EventType, readers: fn(&AnyData) -> Readers) -> Self
    where
        T: DeserializeOwned + Send + Sync + 'static,
    {
        Self {
            event_type,
            decode: decode_as::<T>,
            keys: |_| Vec::new(),
            readers,
            state: false,
        }
    }

    /// Declares that each event carries its record's whole state after the write (an
    /// `updated`): for one record, the newest event tells a subscriber all the older ones did.
    /// A gateway past capacity may then deliver only the newest of a record's events to a
    /// subscription keyed by the record's id, saying how many it skipped; `created` and
    /// `deleted` events are never skipped.
    pub fn with_state(mut self, state: bool) -> Self {
        self.state = state;
        self
    }

    /// The keys of a decoded event's data (the domain's `Record::keys`, through a downcast).
    pub fn routed_by(mut self, keys: fn(&AnyData) -> Vec<Key>) -> Self {
        self.keys = keys;
        self
    }
}

fn decode_as<T: DeserializeOwned + Send + Sync + 'static>(
    payload: &[u8],
) -> Result<Envelope<AnyData>, serde_json::Error> {
    let envelope = serde_json::from_slice::<Envelope<T>>(payload)?;
    Ok(Envelope {
        v: envelope.v,
        id: envelope.id,
        event_type: envelope.event_type,
        at: envelope.at,
        data: Arc::new(envelope.data),
        traceparent: envelope.traceparent,
    })
}

/// Every event type a process knows, with its decoder: built once from the domain's list of
/// types (`domain::registry()`), so that the gateway reads every log a writer may append to.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: Arc<[EventKind]>,
}

impl Registry {
    /// Refuses a name given twice or one that cannot be a log's name, so that a mistake in the
    /// domain's list stops the process at start rather than mixing two types in one log.
    pub fn new(kinds: Vec<EventKind>) -> Result<Self, String> {
        let mut seen = std::collections::HashSet::new();
        for kind in &kinds {
            let name = kind.event_type.as_str();
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
                return Err(format!("event type {name:?} is not a valid log name"));
            }
            if !seen.insert(name) {
                return Err(format!("event type {name:?} is registered twice"));
            }
        }
        Ok(Self {
            kinds: kinds.into(),
        })
    }

    pub fn event_types(&self) -> impl Iterator<Item = EventType> + '_ {
        self.kinds.iter().map(|kind| kind.event_type)
    }

    /// The registered type named `name`.
    pub fn get(&self, name: &str) -> Option<EventType> {
        self.kind(name).map(|kind| kind.event_type)
    }

    fn kind(&self, name: &str) -> Option<&EventKind> {
        self.kinds
            .iter()
            .find(|kind| kind.event_type.as_str() == name)
    }

    /// Decodes an envelope of `event_type`, checking that it says it is one.
    pub fn decode(
        &self,
        event_type: EventType,
        payload: &[u8],
    ) -> Result<Envelope<AnyData>, DecodeError> {
        let kind = self
            .kind(event_type.as_str())
            .ok_or(DecodeError::Unregistered)?;
        let envelope = (kind.decode)(payload).map_err(DecodeError::Malformed)?;
        if envelope.event_type != event_type.as_str() {
            return Err(DecodeError::WrongType);
        }
        Ok(envelope)
    }

    /// The keys an event of `event_type` with `data` is routed by, each once.
    pub fn keys(&self, event_type: EventType, data: &AnyData) -> Vec<Key> {
        let mut keys = self
            .kind(event_type.as_str())
            .map(|kind| (kind.keys)(data))
            .unwrap_or_default();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// Whether, to a subscription keyed by `key`, a newer event of `event_type` supersedes an
    /// older one: a state event ([`EventKind::with_state`]) of one record, keyed by its `id`.
    pub fn supersedes(&self, event_type: EventType, key: Option<Key>) -> bool {
        key.is_some_and(|key| key.field == "id")
            && self
                .kind(event_type.as_str())
                .is_some_and(|kind| kind.state)
    }

    /// Who may read an event of `event_type` with `data`; staff only for a type not registered.
    pub fn readers(&self, event_type: EventType, data: &AnyData) -> Readers {
        self.kind(event_type.as_str())
            .map_or(Readers::Staff, |kind| (kind.readers)(data))
    }
}
