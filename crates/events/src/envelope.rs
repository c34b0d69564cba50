//! The envelope every committed change travels in, and the name of its type.

use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, SubsecRound as _, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The envelope's format version; bumped only for changes an old consumer would misread.
pub const ENVELOPE_VERSION: u32 = 1;

/// An event type's name: the envelope's `type` and the last part of its log's name, e.g.
/// `car.updated`. A domain type declares its own (`Record::EVENTS` in the domain crate); the
/// [`Registry`] is where a process learns which exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventType(&'static str);

impl EventType {
    pub const fn new(name: &'static str) -> Self {
        Self(name)
    }

    pub fn as_str(self) -> &'static str {
        self.0
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl Serialize for EventType {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0)
    }
}

/// An event's data once decoded, of whichever domain type its event type names; a subscription
/// stream downcasts it to the type it serves. Shared: decoded once, read by every subscriber.
pub type AnyData = Arc<dyn Any + Send + Sync>;
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("event type not registered")]
    Unregistered,
    #[error("malformed event envelope: {0}")]
    Malformed(serde_json::Error),
    #[error("event type does not match its log")]
    WrongType,
}

/// One event as it travels between services; `data` is the domain value after the change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<D> {
    pub v: u32,
    /// Unique per event (not per delivery): consumers use it to drop duplicates.
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: Cow<'static, str>,
    /// When the change was committed (to the microsecond, in UTC).
    #[serde(serialize_with = "rfc3339", deserialize_with = "from_rfc3339")]
    pub at: DateTime<Utc>,
    /// The value after the change (for a deletion, as it was before).
    pub data: D,
    /// The W3C trace context of the write, when it was traced: what a publish and each
    /// delivery of the event link to. Absent otherwise (and from events written before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl<D> Envelope<D> {
    /// A new envelope with a fresh random id, stamped now.
    pub fn new(event_type: EventType, data: D) -> Self {
        Self {
            v: ENVELOPE_VERSION,
            id: new_event_id(),
            event_type: Cow::Borrowed(event_type.as_str()),
            // Microseconds, as serialized, so an envelope read back equals the one written.
            at: Utc::now().trunc_subsecs(6),
            data,
            traceparent: None,
        }
    }
}

/// 128 random bits as 32 hex characters.
pub fn new_event_id() -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
fn rfc3339<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&at.to_rfc3339_opts(SecondsFormat::Micros, true))
}

fn from_rfc3339<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
    let text = String::deserialize(deserializer)?;
    DateTime::parse_from_rfc3339(&text)
        .map(|at| at.with_timezone(&Utc))
        .map_err(serde::de::Error::custom)
}
