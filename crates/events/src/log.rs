//! The [`EventLog`]: what every process does with the logs (append, read back after a position,
//! follow), whichever holds them, and the [`Follower`] a gateway's hub is to it. Choosing Redis
//! or memory happens once, where a process builds its log; nothing downstream asks which.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::Stream;
use serde::{Deserialize, Serialize};

use crate::envelope::{new_event_id, AnyData, Envelope, EventType};
use crate::position::{Position, Retention};
use crate::registry::Key;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("event log unavailable: {0}")]
    Unavailable(String),
}

/// The logs of every event type and the revocation announcements: [`crate::RedisLog`] between
/// processes, [`crate::MemoryLog`] in the embedded single-process mode. The write path, the
/// hub and the replays do not know which.
pub trait EventLog: Send + Sync + 'static {
    /// Appends one serialized envelope to the log of `event_type` ([`REVOCATION_EVENT`]: to the
    /// revocation announcements). A name, not an [`EventType`]: the outbox relay publishes what
    /// was committed whether or not this process knows its type, so that nothing committed is
    /// dropped.
    fn append<'a>(
        &'a self,
        event_type: &'a str,
        payload: &'a str,
    ) -> BoxFuture<'a, Result<(), LogError>>;

    /// How many partitions each event type's log is split into (EVENT_LOG_PARTITIONS): an
    /// event is in the one of its record ([`crate::partition_of`]).
    fn partitions(&self) -> u16 {
        1
    }

    /// What `partition` of the log of `event_type` still holds after `after`.
    fn history<'a>(
        &'a self,
        event_type: EventType,
        partition: u16,
        after: Position,
    ) -> BoxFuture<'a, Result<History, LogError>>;

    /// Where the log of `event_type` stands, when that is known without a round trip (the
    /// in-memory log, of one partition): a subscriber that appears then starts there at once.
    fn tip_now(&self, event_type: EventType) -> Option<Position> {
        let _ = event_type;
        None
    }

    /// Reads the logs `follower` asks for, from where each partition stands, and hands it every
    /// entry and announcement, in each partition's order, until the returned future is dropped. A lost
    /// connection is retried with capped backoff from the same positions, so a reconnection
    /// loses nothing. What runs before the future is first polled (the in-memory log's epoch)
    /// is known to the follower when this returns.
    fn follow(&self, follower: Arc<dyn Follower>) -> BoxFuture<'static, ()>;
}

/// What a log feeds while it is followed ([`EventLog::follow`]): the gateway's hub.
pub trait Follower: Send + Sync + 'static {
    /// The logs to read in `partition`, each with where it stands there; `None` for one just
    /// asked for, which the log starts at its tip ([`Follower::start`]).
    fn logs(&self, partition: u16) -> Vec<(EventType, Option<Position>)>;
    /// `partition` of `event_type`'s log stands at `tip`: every later entry reaches the
    /// follower.
    fn start(&self, event_type: EventType, partition: u16, tip: Position);
    /// Resolves when [`Follower::logs`] asks for a log in `partition` it did not ask for
    /// before (each partition's reader waits on its own).
    fn changed(&self, partition: u16) -> BoxFuture<'_, ()>;
    /// One entry of `partition` of the log named `event_type` (a name: the log may hold types
    /// this process does not know).
    fn entry(&self, event_type: &str, partition: u16, position: Position, payload: &[u8]);
    /// One revocation announcement, or why it did not decode.
    fn revoked(&self, revocation: Result<Revocation, String>);
    /// The logs' epoch, on every (re)connection. True when it replaced another: the logs were
    /// reset and every position in them starts again at 0.
    fn epoch(&self, epoch: &str) -> bool;
    /// Whether the log is reachable.
    fn connected(&self, connected: bool);
    /// Entries of `partition` of the log named `event_type` were removed before this follower
    /// read them (trimmed while it was behind by about the retention, or away): what it hands
    /// on next does not follow what it handed on before.
    fn lost(&self, event_type: &str, partition: u16);
}

/// What a log still holds after a cursor.
#[derive(Debug)]
pub struct History {
    /// Whether every event after the cursor is still there.
    pub covered: bool,
    /// Those events, oldest first, as (position, serialized envelope).
    pub entries: Vec<(Position, Arc<str>)>,
}

/// A new epoch: 64 random bits as 16 hex characters.
pub fn new_epoch() -> String {
    let mut id = new_event_id();
    id.truncate(16);
    id
}

/// The name under which a [`Revocation`] is committed to the outbox and published by its relay:
/// both logs append it to the revocation announcements, not to a log of its own. What a
/// process that cannot reach the server's memory does (`gqlws deactivate-user` beside the
/// embedded server), as `trigger-event` does for a write.
pub const REVOCATION_EVENT: &str = "auth.revoked";

/// Announcements kept. They are only a wake-up (the cutoffs of `tokens::revocations` are the
/// record, read by every replica's poll), so a gateway that missed some still learns of them
/// within a poll.
pub const REVOCATION_RETENTION: Retention = Retention {
    count: 1_000,
    max_age_secs: 0,
};

/// A revocation announcement: a user's sessions up to a time are over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub user_id: i64,
    /// The blacklisted refresh token's id.
    pub jti: String,
    /// Access tokens of the user issued at or before this (unix milliseconds) are revoked
    /// (`tokens::revocations`).
    pub cutoff_ms: i64,
}

impl Revocation {
    #[cfg(feature = "runtime")]
    pub(crate) fn decode(payload: &[u8]) -> Result<Revocation, String> {
        serde_json::from_slice(payload).map_err(|err| err.to_string())
    }
}

/// A stream of envelopes of one type, from the moment of subscribing on.
pub type EnvelopeStream = Pin<Box<dyn Stream<Item = Envelope<AnyData>> + Send>>;

/// Where subscription resolvers get events from. The subscription gateway plugs its fan-out in
/// here (one reader of the logs per process); api-service has none, as it serves no
/// subscriptions.
pub trait EventSource: Send + Sync + 'static {
    /// The events of `event_type` from now on: all of them, or with `key` only those routed by
    /// it ([`Key`]), which is what lets the gateway's work per event follow the subscriptions
    /// it is for rather than all of the type.
    fn subscribe(&self, event_type: EventType, key: Option<Key>) -> EnvelopeStream;
}

/// A shared event source, as the GraphQL context holds it.
pub type SharedEventSource = Arc<dyn EventSource>;
