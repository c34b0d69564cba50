//! Where an event is: its position in its type's log, the cursor a client resumes from, and how
//! much of a log is kept.

use std::fmt;
use std::sync::Arc;

use crate::envelope::{AnyData, Envelope, EventType};
use crate::registry::{Key, Readers, Registry};

/// Where an event is in its type's log: a Redis stream id `<ms>-<seq>` (the in-memory log uses
/// `0-<n>`). Ordered as the log is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub ms: u64,
    pub seq: u64,
}

impl Position {
    pub const ZERO: Position = Position { ms: 0, seq: 0 };

    /// A stream id, `<ms>-<seq>`.
    pub fn parse(text: &str) -> Option<Position> {
        let (ms, seq) = text.split_once('-')?;
        Some(Position {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// What a result's `extensions.cursor` names and `extensions.resumeFrom` gives back: the
/// position of an event in the log of its type, in the log's epoch. Written as
/// `<epoch>:<type>:<ms>-<seq>`; clients treat it as opaque.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub epoch: String,
    pub event_type: EventType,
    pub position: Position,
}

impl Cursor {
    /// A cursor of one of `registry`'s event types.
    pub fn parse(text: &str, registry: &Registry) -> Result<Cursor, String> {
        let malformed = || {
            format!(
                "`extensions.resumeFrom` is not a cursor of this server: {:?} (send back a \
                 result's `extensions.cursor` unchanged)",
                text.chars().take(80).collect::<String>()
            )
        };
        let mut parts = text.splitn(3, ':');
        let (Some(epoch), Some(event_type), Some(position)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed());
        };
        if epoch.is_empty() || epoch.len() > 64 || !epoch.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed());
        }
        let event_type = registry.get(event_type).ok_or_else(malformed)?;
        let position = Position::parse(position).ok_or_else(malformed)?;
        // No log reaches the last millisecond a position can name, and Redis refuses to read
        // after `u64::MAX-u64::MAX`: such a cursor was not written by a server.
        if position.ms == u64::MAX {
            return Err(format!(
                "`extensions.resumeFrom` names a position no log reaches ({position}); send \
                 back a result's `extensions.cursor` unchanged"
            ));
        }
        Ok(Cursor {
            epoch: epoch.to_owned(),
            event_type,
            position,
        })
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.epoch, self.event_type, self.position)
    }
}

/// One event read back from a log.
#[derive(Debug, Clone)]
pub struct LoggedEvent {
    pub event_type: EventType,
    pub position: Position,
    /// The result cursor naming it, built once.
    pub cursor: Arc<str>,
    pub envelope: Envelope<AnyData>,
    /// What it is routed by ([`Registry::keys`]), computed once when it is decoded.
    pub keys: Vec<Key>,
    /// Who may read it ([`Registry::readers`]), computed once when it is decoded.
    pub readers: Readers,
}

impl LoggedEvent {
    /// An event read at `position` of `event_type`'s log in `epoch`, with what it is routed by
    /// and who may read it; its cursor is written here, once.
    pub fn new(
        event_type: EventType,
        position: Position,
        epoch: &str,
        envelope: Envelope<AnyData>,
        keys: Vec<Key>,
        readers: Readers,
    ) -> Self {
        let cursor = Cursor {
            epoch: epoch.to_owned(),
            event_type,
            position,
        };
        Self {
            event_type,
            position,
            cursor: Arc::from(cursor.to_string()),
            envelope,
            keys,
            readers,
        }
    }

    /// Whether a subscription keyed by `key` (or unkeyed, `None`) takes this event.
    pub fn is_for(&self, key: Option<Key>) -> bool {
        key.is_none_or(|key| self.keys.contains(&key))
    }
}

/// How much of each log is kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub count: u64,
    /// 0: no age limit.
    pub max_age_secs: u64,
}

impl Default for Retention {
    /// What EVENT_RETENTION_COUNT and EVENT_RETENTION_SECS default to.
    fn default() -> Self {
        Self {
            count: 10_000,
            max_age_secs: 3_600,
        }
    }
}
