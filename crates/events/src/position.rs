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

/// How many partitions a log may be split into (EVENT_LOG_PARTITIONS).
pub const MAX_PARTITIONS: u16 = 256;

/// Where an event is: which partition of its type's log holds it, and where in that partition.
/// A log of one partition (the default on one Redis) has only partition 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct At {
    pub partition: u16,
    pub position: Position,
}

/// Where each partition of a log stands, in partition order.
pub type Positions = Arc<[Position]>;

/// What a result's `extensions.cursor` names and `extensions.resumeFrom` gives back: an event
/// of a log in the log's epoch, with where every partition of that log stood when the event was
/// handed on, which is where a resumed subscription takes up each of them.
///
/// Written as `<epoch>:<type>:<ms>-<seq>` for a log of one partition, and as
/// `<epoch>:<type>:<partition>:<p0>,<p1>,…` (each `<ms>-<seq>`) for a log of several; clients
/// treat it as opaque.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub epoch: String,
    pub event_type: EventType,
    /// The partition of the event it names.
    pub partition: u16,
    /// Where each partition stood; the event it names is at `positions[partition]`.
    pub positions: Positions,
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
        let (Some(epoch), Some(event_type), Some(rest)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed());
        };
        if epoch.is_empty() || epoch.len() > 64 || !epoch.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed());
        }
        let event_type = registry.get(event_type).ok_or_else(malformed)?;
        let (partition, positions) = match rest.split_once(':') {
            None => (0, vec![Position::parse(rest).ok_or_else(malformed)?]),
            Some((partition, positions)) => {
                let positions = positions
                    .split(',')
                    .map(Position::parse)
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(malformed)?;
                let partition: u16 = partition.parse().map_err(|_| malformed())?;
                if positions.len() > usize::from(MAX_PARTITIONS)
                    || usize::from(partition) >= positions.len()
                {
                    return Err(malformed());
                }
                (partition, positions)
            }
        };
        // No log reaches the last millisecond a position can name, and Redis refuses to read
        // after `u64::MAX-u64::MAX`: such a cursor was not written by a server.
        if let Some(position) = positions.iter().find(|p| p.ms == u64::MAX) {
            return Err(format!(
                "`extensions.resumeFrom` names a position no log reaches ({position}); send \
                 back a result's `extensions.cursor` unchanged"
            ));
        }
        Ok(Cursor {
            epoch: epoch.to_owned(),
            event_type,
            partition,
            positions: positions.into(),
        })
    }

    /// The position of the event it names.
    pub fn position(&self) -> Position {
        self.positions
            .get(usize::from(self.partition))
            .copied()
            .unwrap_or_default()
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:", self.epoch, self.event_type)?;
        if self.positions.len() == 1 {
            return write!(f, "{}", self.position());
        }
        write!(f, "{}:", self.partition)?;
        for (i, position) in self.positions.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{position}")?;
        }
        Ok(())
    }
}

/// One event read back from a log.
#[derive(Debug, Clone)]
pub struct LoggedEvent {
    pub event_type: EventType,
    pub partition: u16,
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
    /// An event read at `partition` of `event_type`'s log in `epoch`, when the log's partitions
    /// stood at `positions` (its own included), with what it is routed by and who may read it;
    /// its cursor is written here, once.
    pub fn new(
        event_type: EventType,
        partition: u16,
        positions: Positions,
        epoch: &str,
        envelope: Envelope<AnyData>,
        keys: Vec<Key>,
        readers: Readers,
    ) -> Self {
        let cursor = Cursor {
            epoch: epoch.to_owned(),
            event_type,
            partition,
            positions,
        };
        Self {
            event_type,
            partition,
            position: cursor.position(),
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

    pub fn at(&self) -> At {
        At {
            partition: self.partition,
            position: self.position,
        }
    }
}

/// The partition of a log that holds the events routed by `keys` ([`Registry::keys`]): the one
/// of the record's `id` (else of its first key), so that the events of one record stay in one
/// partition, in order. FNV-1a, the same in every process and version.
pub fn partition_of(keys: &[Key], partitions: u16) -> u16 {
    if partitions <= 1 {
        return 0;
    }
    let Some(key) = keys.iter().find(|key| key.field == "id").or(keys.first()) else {
        return 0;
    };
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key
        .field
        .bytes()
        .chain([b'='])
        .chain(key.value.to_string().into_bytes())
    {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    (hash % u32::from(partitions)) as u16
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
