//! Events between services: the JSON envelope of every change, the Redis channel of each event
//! type, the [`EventBus`] that publishes envelopes (on Redis, or in memory for the embedded
//! mode), and the [`EventSource`] that subscription resolvers read them from.
//!
//! Envelope (version 1), one per committed write:
//! `{"v":1,"id":"<32 hex>","type":"car.updated","at":"<RFC 3339>","data":{…the car…}}`.
//! Delivery is at-least-once (see [`crate::repository`]): a consumer drops an `id` it has seen.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, SubsecRound as _, Utc};
use deadpool_redis::redis;
use futures_util::future::BoxFuture;
use futures_util::Stream;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::db::cars::Car;
use crate::redis::RedisPool;

/// The envelope's format version; bumped only for changes an old consumer would misread.
pub const ENVELOPE_VERSION: u32 = 1;

/// What happened to a car. The serialized names are the envelope's `type` and the last part of
/// the Redis channel name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventType {
    #[serde(rename = "car.created")]
    CarCreated,
    #[serde(rename = "car.updated")]
    CarUpdated,
    #[serde(rename = "car.deleted")]
    CarDeleted,
}

impl EventType {
    pub const ALL: [EventType; 3] = [
        EventType::CarCreated,
        EventType::CarUpdated,
        EventType::CarDeleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::CarCreated => "car.created",
            EventType::CarUpdated => "car.updated",
            EventType::CarDeleted => "car.deleted",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event as it travels on the bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    /// Unique per event (not per delivery): consumers use it to drop duplicates.
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// When the change was committed (to the microsecond, in UTC).
    #[serde(serialize_with = "rfc3339", deserialize_with = "from_rfc3339")]
    pub at: DateTime<Utc>,
    /// The car after the change (for `car.deleted`, as it was before the deletion).
    pub data: Car,
}

impl Envelope {
    /// A new envelope with a fresh random id, stamped now.
    pub fn new(event_type: EventType, car: Car) -> Self {
        Self {
            v: ENVELOPE_VERSION,
            id: new_event_id(),
            event_type,
            // Microseconds, as serialized, so an envelope read back equals the one written.
            at: Utc::now().trunc_subsecs(6),
            data: car,
        }
    }
}

/// The Redis channel of an event type: `<REDIS_KEY_PREFIX>events:<type>`, e.g.
/// `gqlws:events:car.updated`.
pub fn channel(key_prefix: &str, event_type: EventType) -> String {
    format!("{key_prefix}events:{}", event_type.as_str())
}

/// 128 random bits as 32 hex characters.
pub fn new_event_id() -> String {
    crate::jwt::new_jti()
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("event bus unavailable: {0}")]
    Unavailable(String),
}

/// Where committed events are published: [`RedisBus`] between processes, [`MemoryBus`] in the
/// embedded single-process mode. The write path does not know which.
pub trait EventBus: Send + Sync + 'static {
    /// Publishes one serialized envelope on the channel of `event_type`.
    fn publish<'a>(
        &'a self,
        event_type: EventType,
        payload: &'a str,
    ) -> BoxFuture<'a, Result<(), BusError>>;
}

/// Publishes with `PUBLISH <prefix>events:<type> <envelope>` on the shared Redis pool.
#[derive(Clone)]
pub struct RedisBus {
    pool: RedisPool,
    key_prefix: String,
}

impl RedisBus {
    pub fn new(pool: RedisPool, key_prefix: impl Into<String>) -> Self {
        Self {
            pool,
            key_prefix: key_prefix.into(),
        }
    }
}

impl EventBus for RedisBus {
    fn publish<'a>(
        &'a self,
        event_type: EventType,
        payload: &'a str,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("PUBLISH");
            cmd.arg(channel(&self.key_prefix, event_type)).arg(payload);
            crate::redis::query::<i64>(&self.pool, &cmd)
                .await
                .map(|_receivers| ())
                .map_err(|err| BusError::Unavailable(err.to_string()))
        })
    }
}

/// One message on the in-memory bus: the channel it would have on Redis, and the payload.
#[derive(Debug, Clone)]
pub struct BusMessage {
    pub channel: String,
    pub payload: Arc<str>,
}

/// The bus of the embedded single-process mode: a tokio broadcast channel in place of Redis
/// pub/sub, carrying the same channel names and payloads, so the gateway's hub consumes it with
/// the same decoding, dedupe and fan-out. Cheap to clone; every clone is the same bus.
#[derive(Clone)]
pub struct MemoryBus {
    sender: tokio::sync::broadcast::Sender<BusMessage>,
    key_prefix: String,
}

impl MemoryBus {
    /// `capacity` messages may wait for the slowest receiver (the hub) before it lags.
    pub fn new(key_prefix: impl Into<String>, capacity: usize) -> Self {
        Self {
            sender: tokio::sync::broadcast::channel(capacity.max(1)).0,
            key_prefix: key_prefix.into(),
        }
    }

    pub fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    /// Every message published from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<BusMessage> {
        self.sender.subscribe()
    }

    /// Publishes `payload` on `channel_name`. Nobody listening is not an error (as with Redis
    /// `PUBLISH`, which reports zero receivers).
    pub fn send(&self, channel_name: String, payload: &str) {
        let _ = self.sender.send(BusMessage {
            channel: channel_name,
            payload: Arc::from(payload),
        });
    }
}

impl EventBus for MemoryBus {
    fn publish<'a>(
        &'a self,
        event_type: EventType,
        payload: &'a str,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        self.send(channel(&self.key_prefix, event_type), payload);
        Box::pin(std::future::ready(Ok(())))
    }
}

/// A stream of envelopes of one type, from the moment of subscribing on.
pub type EnvelopeStream = Pin<Box<dyn Stream<Item = Envelope> + Send>>;

/// Where subscription resolvers get events from. The subscription gateway plugs its fan-out in
/// here (one Redis subscriber per process); api-service has none, as it serves no subscriptions.
pub trait EventSource: Send + Sync + 'static {
    fn subscribe(&self, event_type: EventType) -> EnvelopeStream;
}

/// A shared event source, as the GraphQL context holds it.
pub type SharedEventSource = Arc<dyn EventSource>;

/// The Redis channel on which auth-service announces revoked sessions (a blacklisted refresh
/// token); gateways close that user's sockets at once. `<REDIS_KEY_PREFIX>auth:revoked`.
pub fn revocation_channel(key_prefix: &str) -> String {
    format!("{key_prefix}auth:revoked")
}

/// The message on [`revocation_channel`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub user_id: i64,
    /// The blacklisted refresh token's id.
    pub jti: String,
    /// Access tokens of the user issued before this (unix seconds) are revoked
    /// ([`crate::revocations`]). Absent from older senders: then every socket of the user closes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_before: Option<i64>,
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
    use crate::db::cars::Owner;

    #[test]
    fn envelope_has_the_documented_shape() {
        let car = Car {
            id: 1,
            make: "Skoda".into(),
            model: "Octavia".into(),
            variant: "Scout".into(),
            year: "2011".into(),
            owner: Some(Owner {
                id: 7,
                username: "admin".into(),
                is_staff: true,
            }),
        };
        let envelope = Envelope::new(EventType::CarUpdated, car);
        let json = serde_json::to_value(&envelope).unwrap_or_default();
        assert_eq!(json["v"], 1);
        assert_eq!(json["type"], "car.updated");
        assert_eq!(json["data"]["make"], "Skoda");
        assert_eq!(json["id"].as_str().map(str::len), Some(32));
        let at = json["at"].as_str().unwrap_or_default();
        assert!(DateTime::parse_from_rfc3339(at).is_ok(), "{at}");
        let back: Envelope = serde_json::from_value(json).expect("round trip");
        assert_eq!(back, envelope);
        assert_eq!(channel("p:", EventType::CarDeleted), "p:events:car.deleted");
    }
}
