//! Events between services: the JSON envelope of every change, the log of each event type, the
//! [`EventBus`] that appends envelopes to it (a Redis stream, or in memory for the embedded
//! mode), and the [`EventSource`] that subscription resolvers read them from.
//!
//! Envelope (version 1), one per committed write:
//! `{"v":1,"id":"<32 hex>","type":"car.updated","at":"<RFC 3339>","data":{…the car…}}`.
//! Nothing here knows a domain type: [`Envelope`] is generic over its `data`, an [`EventType`] is
//! a name a domain type declares, and the [`Registry`] (built by the domain crate) says which
//! names exist and how each one's envelopes decode.
//! Delivery is at-least-once (see the store's outbox): a consumer drops an `id` it has seen.
//!
//! Each event type has a log, `<REDIS_KEY_PREFIX>events:<type>`: a Redis stream whose entry ids
//! are the events' [`Position`]s, the same for every gateway, kept for a bounded retention
//! ([`EventLogArgs`]). A gateway reads it with `XREAD` from the last position it has seen, so a
//! reconnection to Redis loses nothing, and a client that resumes names a [`Cursor`] (the log's
//! [`epoch`](epoch_key), the type and the position) to get what it missed. The epoch changes
//! when the log is reset (a Redis that restarted empty): cursors of an older epoch are not
//! covered any more.

use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, SubsecRound as _, Utc};
use deadpool_redis::redis;
use futures_util::future::BoxFuture;
use futures_util::Stream;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use service_kit::config::EventLogArgs;
use service_kit::redis::RedisPool;

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

    /// The event type whose log is `key`, if it is a registered one.
    pub fn channel_type(&self, key_prefix: &str, key: &str) -> Option<EventType> {
        self.get(key.strip_prefix(key_prefix)?.strip_prefix("events:")?)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("event type not registered")]
    Unregistered,
    #[error("malformed event envelope: {0}")]
    Malformed(serde_json::Error),
    #[error("event type does not match its log")]
    WrongType,
}

/// One event as it travels on the bus; `data` is the domain value after the change.
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

/// The log (a Redis stream) of an event type: `<REDIS_KEY_PREFIX>events:<type>`, e.g.
/// `gqlws:events:car.updated`.
pub fn channel(key_prefix: &str, event_type: &str) -> String {
    format!("{key_prefix}events:{event_type}")
}

/// The Redis string naming the logs' epoch: a random value set (`SET NX`) by the first gateway
/// that finds none. A Redis that lost its data loses it too, and the next one set tells every
/// gateway (and every cursor) that the history before it is gone.
pub fn epoch_key(key_prefix: &str) -> String {
    format!("{key_prefix}events:epoch")
}

/// The `CLIENT SETNAME` of a gateway's event connection: `<prefix>gateway-events` (Redis names
/// cannot hold spaces or newlines; such characters of a prefix become `_`).
pub fn events_connection_name(key_prefix: &str) -> String {
    format!("{key_prefix}gateway-events")
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .collect()
}

/// A new epoch: 64 random bits as 16 hex characters.
pub fn new_epoch() -> String {
    let mut id = new_event_id();
    id.truncate(16);
    id
}

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

impl From<&EventLogArgs> for Retention {
    fn from(args: &EventLogArgs) -> Self {
        Self {
            count: args.event_retention_count.max(1),
            max_age_secs: args.event_retention_secs,
        }
    }
}

impl Default for Retention {
    fn default() -> Self {
        Self::from(&EventLogArgs::default())
    }
}

/// The field of a stream entry that holds the envelope.
pub const ENTRY_FIELD: &str = "e";

/// 128 random bits as 32 hex characters.
pub fn new_event_id() -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("event bus unavailable: {0}")]
    Unavailable(String),
}

/// Where committed events are published: [`RedisBus`] between processes, [`MemoryBus`] in the
/// embedded single-process mode. The write path does not know which.
pub trait EventBus: Send + Sync + 'static {
    /// Publishes one serialized envelope on the log of `event_type`. A name, not an
    /// [`EventType`]: the outbox relay publishes what was committed whether or not this process
    /// knows its type, so that nothing committed is dropped.
    fn publish<'a>(
        &'a self,
        event_type: &'a str,
        payload: &'a str,
    ) -> BoxFuture<'a, Result<(), BusError>>;
}

/// Appends with `XADD <prefix>events:<type> MAXLEN ~ <count> * e <envelope>` (and trims by age)
/// on the shared Redis pool.
#[derive(Clone)]
pub struct RedisBus {
    pool: RedisPool,
    key_prefix: String,
    retention: Retention,
}

impl RedisBus {
    pub fn new(pool: RedisPool, key_prefix: impl Into<String>) -> Self {
        Self {
            pool,
            key_prefix: key_prefix.into(),
            retention: Retention::default(),
        }
    }

    pub fn with_retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }
}

/// `XADD` of one envelope to `key`, trimmed to `retention` in the same round trip.
pub fn append_command(key: &str, payload: &str, retention: Retention) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.cmd("XADD")
        .arg(key)
        .arg("MAXLEN")
        .arg("~")
        .arg(retention.count)
        .arg("*")
        .arg(ENTRY_FIELD)
        .arg(payload);
    if retention.max_age_secs > 0 {
        let oldest = (Utc::now().timestamp_millis().max(0) as u64)
            .saturating_sub(retention.max_age_secs.saturating_mul(1000));
        pipe.cmd("XTRIM")
            .arg(key)
            .arg("MINID")
            .arg("~")
            .arg(oldest)
            .ignore();
    }
    pipe
}

impl EventBus for RedisBus {
    fn publish<'a>(
        &'a self,
        event_type: &'a str,
        payload: &'a str,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            let pipe = match event_type {
                REVOCATION_EVENT => append_command(
                    &revocation_channel(&self.key_prefix),
                    payload,
                    REVOCATION_RETENTION,
                ),
                _ => append_command(
                    &channel(&self.key_prefix, event_type),
                    payload,
                    self.retention,
                ),
            };
            service_kit::redis::query::<(String,)>(&self.pool, &pipe)
                .await
                .map(|_id| ())
                .map_err(|err| BusError::Unavailable(err.to_string()))
        })
    }
}

/// One message on the in-memory bus: the channel (log) it would have on Redis, its position
/// there, and the payload.
#[derive(Debug, Clone)]
pub struct BusMessage {
    pub channel: String,
    pub position: Position,
    pub payload: Arc<str>,
}

/// The bus of the embedded single-process mode: a bounded log per channel with the Redis
/// streams' semantics (positions, retention, an epoch), and a tokio broadcast channel that
/// carries each message, in log order, to the gateway's hub, which consumes it with the same
/// decoding, dedupe and fan-out as Redis entries. Cheap to clone; every clone is the same bus.
#[derive(Clone)]
pub struct MemoryBus {
    sender: tokio::sync::broadcast::Sender<BusMessage>,
    key_prefix: String,
    log: Arc<std::sync::Mutex<MemoryLog>>,
    epoch: Arc<str>,
}

struct MemoryLog {
    channels: std::collections::HashMap<String, ChannelLog>,
    retention: Retention,
}

#[derive(Default)]
struct ChannelLog {
    entries: std::collections::VecDeque<(Position, i64, Arc<str>)>,
    last: Position,
    /// The highest position trimmed away (Redis's `max-deleted-entry-id`).
    trimmed: Position,
}

/// What a log still holds after a cursor.
#[derive(Debug)]
pub struct History {
    /// Whether every event after the cursor is still there.
    pub covered: bool,
    /// Those events, oldest first, as (position, serialized envelope).
    pub entries: Vec<(Position, Arc<str>)>,
}

impl MemoryBus {
    /// `capacity` messages may wait for the slowest receiver (the hub) before it lags.
    pub fn new(key_prefix: impl Into<String>, capacity: usize) -> Self {
        Self::with_retention(key_prefix, capacity, Retention::default())
    }

    pub fn with_retention(
        key_prefix: impl Into<String>,
        capacity: usize,
        retention: Retention,
    ) -> Self {
        Self {
            sender: tokio::sync::broadcast::channel(capacity.max(1)).0,
            key_prefix: key_prefix.into(),
            log: Arc::new(std::sync::Mutex::new(MemoryLog {
                channels: std::collections::HashMap::new(),
                retention,
            })),
            epoch: Arc::from(new_epoch()),
        }
    }

    pub fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    /// This process's epoch: the log starts empty with every start.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Every message published from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<BusMessage> {
        self.sender.subscribe()
    }

    /// Appends `payload` to `channel_name`'s log and hands it to the listeners. Nobody
    /// listening is not an error (as with Redis, where nobody may be reading the stream).
    pub fn send(&self, channel_name: String, payload: &str) {
        let mut log = self
            .log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let retention = log.retention;
        let now = Utc::now().timestamp();
        let entry = log.channels.entry(channel_name.clone()).or_default();
        let position = Position {
            ms: 0,
            seq: entry.last.seq + 1,
        };
        entry.last = position;
        let payload: Arc<str> = Arc::from(payload);
        entry.entries.push_back((position, now, payload.clone()));
        let too_old = |at: i64| {
            retention.max_age_secs > 0
                && now.saturating_sub(at)
                    > i64::try_from(retention.max_age_secs).unwrap_or(i64::MAX)
        };
        while entry.entries.len() as u64 > retention.count
            || entry.entries.front().is_some_and(|(_, at, _)| too_old(*at))
        {
            if let Some((trimmed, _, _)) = entry.entries.pop_front() {
                entry.trimmed = trimmed;
            }
        }
        // Sent under the log's lock, so that the hub receives messages in log order.
        let _ = self.sender.send(BusMessage {
            channel: channel_name,
            position,
            payload,
        });
    }

    /// The entries of `channel_name` after `after`.
    pub fn history(&self, channel_name: &str, after: Position) -> History {
        let log = self
            .log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(entry) = log.channels.get(channel_name) else {
            return History {
                covered: after == Position::ZERO,
                entries: Vec::new(),
            };
        };
        History {
            covered: entry.trimmed <= after && after <= entry.last,
            entries: entry
                .entries
                .iter()
                .filter(|(position, _, _)| *position > after)
                .map(|(position, _, payload)| (*position, payload.clone()))
                .collect(),
        }
    }
}

impl EventBus for MemoryBus {
    fn publish<'a>(
        &'a self,
        event_type: &'a str,
        payload: &'a str,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        let name = match event_type {
            REVOCATION_EVENT => revocation_channel(&self.key_prefix),
            _ => channel(&self.key_prefix, event_type),
        };
        self.send(name, payload);
        Box::pin(std::future::ready(Ok(())))
    }
}

/// A stream of envelopes of one type, from the moment of subscribing on.
pub type EnvelopeStream = Pin<Box<dyn Stream<Item = Envelope<AnyData>> + Send>>;

/// Where subscription resolvers get events from. The subscription gateway plugs its fan-out in
/// here (one Redis subscriber per process); api-service has none, as it serves no subscriptions.
pub trait EventSource: Send + Sync + 'static {
    /// The events of `event_type` from now on: all of them, or with `key` only those routed by
    /// it ([`Key`]), which is what lets the gateway's work per event follow the subscriptions
    /// it is for rather than all of the type.
    fn subscribe(&self, event_type: EventType, key: Option<Key>) -> EnvelopeStream;
}

/// A shared event source, as the GraphQL context holds it.
pub type SharedEventSource = Arc<dyn EventSource>;

/// The Redis stream on which auth-service announces revoked sessions (a blacklisted refresh
/// token); gateways read it with the event logs and close that user's sockets at once.
/// `<REDIS_KEY_PREFIX>auth:revoked`, trimmed to [`REVOCATION_RETENTION`] entries.
pub fn revocation_channel(key_prefix: &str) -> String {
    format!("{key_prefix}auth:revoked")
}

/// The name under which a [`Revocation`] is committed to the outbox and published by its relay:
/// both buses append it to [`revocation_channel`], not to a log of its own. What a process that
/// cannot reach the server's memory does (`gqlws deactivate-user` beside the embedded server),
/// as `trigger-event` does for a write.
pub const REVOCATION_EVENT: &str = "auth.revoked";

/// Announcements kept on the revocation stream. The stream is only a wake-up (the cutoffs of
/// `tokens::revocations` are the record, read by every replica's poll), so a gateway that
/// missed some still learns of them within a poll.
pub const REVOCATION_RETENTION: Retention = Retention {
    count: 1_000,
    max_age_secs: 0,
};

/// The message on [`revocation_channel`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub user_id: i64,
    /// The blacklisted refresh token's id.
    pub jti: String,
    /// Access tokens of the user issued at or before this (unix milliseconds) are revoked
    /// (`tokens::revocations`).
    pub cutoff_ms: i64,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Thing {
        id: i64,
        make: String,
    }

    const UPDATED: EventType = EventType::new("thing.updated");

    #[test]
    fn envelope_has_the_documented_shape() {
        let thing = Thing {
            id: 1,
            make: "Skoda".into(),
        };
        let envelope = Envelope::new(UPDATED, thing.clone());
        let json = serde_json::to_value(&envelope).unwrap_or_default();
        assert_eq!(json["v"], 1);
        assert_eq!(json["type"], "thing.updated");
        assert_eq!(json["data"]["make"], "Skoda");
        assert_eq!(json["id"].as_str().map(str::len), Some(32));
        let at = json["at"].as_str().unwrap_or_default();
        assert!(DateTime::parse_from_rfc3339(at).is_ok(), "{at}");
        let back: Envelope<Thing> = serde_json::from_value(json).expect("round trip");
        assert_eq!(back, envelope);
        assert_eq!(channel("p:", "thing.deleted"), "p:events:thing.deleted");
    }

    #[test]
    fn the_registry_decodes_what_it_knows_and_refuses_the_rest() {
        let registry = Registry::new(vec![EventKind::of::<Thing>(UPDATED, |_| Readers::Everyone)])
            .expect("valid");
        let payload = serde_json::to_vec(&Envelope::new(
            UPDATED,
            Thing {
                id: 3,
                make: "x".into(),
            },
        ))
        .unwrap_or_default();
        let decoded = registry.decode(UPDATED, &payload).expect("decodes");
        assert_eq!(decoded.data.downcast_ref::<Thing>().map(|t| t.id), Some(3));
        let other = EventType::new("thing.deleted");
        assert!(matches!(
            registry.decode(other, &payload),
            Err(DecodeError::Unregistered)
        ));
        assert_eq!(
            registry.channel_type("p:", "p:events:thing.updated"),
            Some(UPDATED)
        );
        assert_eq!(registry.channel_type("p:", "p:events:thing.deleted"), None);
        let wrong = Registry::new(vec![
            EventKind::of::<Thing>(other, |_| Readers::Everyone),
            EventKind::of::<Thing>(UPDATED, |_| Readers::Everyone),
        ])
        .expect("valid");
        assert!(matches!(
            wrong.decode(other, &payload),
            Err(DecodeError::WrongType)
        ));
        assert!(Registry::new(vec![
            EventKind::of::<Thing>(UPDATED, |_| Readers::Everyone),
            EventKind::of::<Thing>(UPDATED, |_| Readers::Everyone)
        ])
        .is_err());
        assert!(
            Registry::new(vec![EventKind::of::<Thing>(EventType::new("a:b"), |_| {
                Readers::Everyone
            })])
            .is_err()
        );
    }

    #[test]
    fn a_cursor_past_every_log_is_refused_at_parse() {
        let registry = Registry::new(vec![EventKind::of::<Thing>(UPDATED, |_| Readers::Everyone)])
            .expect("valid");
        let max = format!("ab12:thing.updated:{}-{}", u64::MAX, u64::MAX);
        let err = Cursor::parse(&max, &registry).expect_err("refused");
        assert!(err.contains("no log reaches"), "{err}");
        let last_second = format!("ab12:thing.updated:{}-0", u64::MAX);
        assert!(Cursor::parse(&last_second, &registry).is_err());
        let fine = format!("ab12:thing.updated:{}-{}", u64::MAX - 1, u64::MAX);
        assert!(Cursor::parse(&fine, &registry).is_ok());
        assert!(Cursor::parse("ab12:thing.updated:1-2-3", &registry).is_err());
    }

    #[test]
    fn readers_admit_the_owner_and_staff_of_a_private_record() {
        let owner = Viewer {
            user_id: 7,
            is_staff: false,
        };
        let other = Viewer {
            user_id: 8,
            is_staff: false,
        };
        let staff = Viewer {
            user_id: 9,
            is_staff: true,
        };
        let private = Readers::OwnerAndStaff(Some(7));
        assert!(private.admit(owner) && private.admit(staff) && !private.admit(other));
        let unowned = Readers::OwnerAndStaff(None);
        assert!(unowned.admit(staff) && !unowned.admit(owner));
        assert!(Readers::Everyone.admit(other));
        assert!(Readers::Staff.admit(staff) && !Readers::Staff.admit(owner));
    }

    #[test]
    fn an_unregistered_type_is_read_by_staff_only() {
        let registry = Registry::new(vec![EventKind::of::<Thing>(UPDATED, |_| Readers::Everyone)])
            .expect("valid");
        let data: AnyData = Arc::new(());
        assert_eq!(registry.readers(UPDATED, &data), Readers::Everyone);
        assert_eq!(
            registry.readers(EventType::new("other.updated"), &data),
            Readers::Staff
        );
    }
}
