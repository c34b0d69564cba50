//! The logs on Redis: a stream per event type, `<REDIS_KEY_PREFIX>events:<type>`, whose entry
//! ids are the events' positions, the same for every gateway; the revocation announcements on
//! `<REDIS_KEY_PREFIX>auth:revoked`; the epoch. The stream format (an entry's one field, `e`,
//! holding the envelope) is written and read here and nowhere else.
//!
//! A follower is fed by one connection of its own: `XREAD BLOCK` over the logs it asks for,
//! each from the last position seen, plus the announcements. A log is added when the follower
//! asks for it (at its tip; the blocked read is interrupted with `CLIENT UNBLOCK`) and left out
//! when it no longer does. When Redis goes away the connection is made again with capped
//! backoff and the read goes on from the positions it had; a changed epoch (Redis lost its
//! data) restarts every log at 0.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use deadpool_redis::redis;
use deadpool_redis::redis::Value;
use futures_util::future::BoxFuture;
use service_kit::redis::RedisPool;

use crate::envelope::EventType;
use crate::log::{
    new_epoch, EventLog, Follower, History, LogError, Revocation, REVOCATION_EVENT,
    REVOCATION_RETENTION,
};
use crate::position::{Position, Retention};

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long one `XREAD` blocks: also the health check of the connection, since a Redis that
/// hangs without closing the socket is noticed when a read does not return within this time
/// plus [`REDIS_TIMEOUT`].
const BLOCK: Duration = Duration::from_secs(5);
const REDIS_TIMEOUT: Duration = Duration::from_secs(3);
/// Entries per `XREAD` and per page of a history.
const READ_COUNT: usize = 512;

/// The field of a stream entry that holds the envelope.
pub const ENTRY_FIELD: &str = "e";

/// The log (a Redis stream) of an event type: `<REDIS_KEY_PREFIX>events:<type>`, e.g.
/// `gqlws:events:car.updated`.
pub fn channel(key_prefix: &str, event_type: &str) -> String {
    format!("{key_prefix}events:{event_type}")
}

/// The stream on which auth-service announces revoked sessions (a blacklisted refresh token);
/// gateways read it with the event logs and close that user's sockets at once.
/// `<REDIS_KEY_PREFIX>auth:revoked`, trimmed to [`REVOCATION_RETENTION`] entries.
pub fn revocation_channel(key_prefix: &str) -> String {
    format!("{key_prefix}auth:revoked")
}

/// The event type's name in a log's key ([`channel`]'s inverse).
fn log_name<'k>(key_prefix: &str, key: &'k str) -> Option<&'k str> {
    key.strip_prefix(key_prefix)?.strip_prefix("events:")
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

/// Appends with `XADD <prefix>events:<type> MAXLEN ~ <count> * e <envelope>` (and trims by age)
/// on the shared pool; follows on a connection of its own, made from `url`.
#[derive(Clone)]
pub struct RedisLog {
    pool: RedisPool,
    key_prefix: String,
    retention: Retention,
    /// Where a follower connects; none for a process that only appends and reads back.
    client: Option<redis::Client>,
}

impl RedisLog {
    pub fn new(pool: RedisPool, key_prefix: impl Into<String>) -> Self {
        Self {
            pool,
            key_prefix: key_prefix.into(),
            retention: Retention::default(),
            client: None,
        }
    }

    pub fn with_retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// A log that can be followed, on a connection of its own to `url`.
    pub fn followed_at(mut self, url: &str) -> Result<Self, String> {
        self.client = Some(redis::Client::open(url).map_err(|err| err.to_string())?);
        Ok(self)
    }

    fn key(&self, event_type: &str) -> String {
        match event_type {
            REVOCATION_EVENT => revocation_channel(&self.key_prefix),
            _ => channel(&self.key_prefix, event_type),
        }
    }
}

/// `XADD` of one envelope to `key`, trimmed to `retention` in the same round trip.
pub fn append_command(key: &str, payload: &str, retention: Retention) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    push_append(&mut pipe, key, payload, retention);
    pipe
}

/// Adds the `XADD` of one envelope to `key` (and its trim) to `pipe`: for a writer that sends
/// many at once (loadgen), in the format this module alone writes and reads.
pub fn push_append(pipe: &mut redis::Pipeline, key: &str, payload: &str, retention: Retention) {
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
}

impl EventLog for RedisLog {
    fn append<'a>(
        &'a self,
        event_type: &'a str,
        payload: &'a str,
    ) -> BoxFuture<'a, Result<(), LogError>> {
        Box::pin(async move {
            let retention = match event_type {
                REVOCATION_EVENT => REVOCATION_RETENTION,
                _ => self.retention,
            };
            let pipe = append_command(&self.key(event_type), payload, retention);
            service_kit::redis::query::<(String,)>(&self.pool, &pipe)
                .await
                .map(|_id| ())
                .map_err(|err| LogError::Unavailable(err.to_string()))
        })
    }

    fn history<'a>(
        &'a self,
        event_type: EventType,
        after: Position,
    ) -> BoxFuture<'a, Result<History, LogError>> {
        Box::pin(async move {
            history(&self.pool, &self.key(event_type.as_str()), after)
                .await
                .map_err(LogError::Unavailable)
        })
    }

    fn follow(&self, follower: Arc<dyn Follower>) -> BoxFuture<'static, ()> {
        let log = self.clone();
        Box::pin(async move {
            let Some(client) = log.client.clone() else {
                tracing::error!("this Redis log was built without a URL to follow it from");
                return;
            };
            follow(log, client, follower).await
        })
    }
}

async fn follow(log: RedisLog, client: redis::Client, follower: Arc<dyn Follower>) {
    let mut backoff = Duration::from_millis(100);
    // Where the announcements stand; kept across reconnections like the logs' positions.
    let mut revocations: Option<Position> = None;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(REDIS_TIMEOUT))
        // Reads block for BLOCK; each is bounded by a timeout of its own.
        .set_response_timeout(None);
    loop {
        let connected = tokio::time::timeout(
            REDIS_TIMEOUT,
            client.get_multiplexed_async_connection_with_config(&config),
        )
        .await;
        match connected {
            Ok(Ok(connection)) => {
                backoff = Duration::from_millis(100);
                let err = Reader::new(&log, &*follower, connection)
                    .serve(&mut revocations)
                    .await;
                follower.connected(false);
                tracing::warn!(%err, "lost the Redis event connection; reconnecting");
            }
            Ok(Err(err)) => tracing::warn!(%err, "cannot connect to Redis; retrying"),
            Err(_) => tracing::warn!("connecting to Redis timed out; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection's reading: set up, then `XREAD BLOCK` until it fails.
struct Reader<'a> {
    log: &'a RedisLog,
    follower: &'a dyn Follower,
    connection: redis::aio::MultiplexedConnection,
    revocation_key: String,
}

impl<'a> Reader<'a> {
    fn new(
        log: &'a RedisLog,
        follower: &'a dyn Follower,
        connection: redis::aio::MultiplexedConnection,
    ) -> Self {
        Reader {
            revocation_key: revocation_channel(&log.key_prefix),
            log,
            follower,
            connection,
        }
    }

    /// Reads until the connection fails; returns why.
    async fn serve(mut self, revocations: &mut Option<Position>) -> String {
        let client_id = match self.hello(revocations).await {
            Ok(id) => id,
            Err(err) => return err,
        };
        self.follower.connected(true);
        tracing::info!("reading the event logs from Redis");
        loop {
            if let Err(err) = self.read(client_id, revocations).await {
                return err;
            }
        }
    }

    /// Names the connection, agrees on the epoch and finds where the announcements stand;
    /// returns the connection's id, for `CLIENT UNBLOCK`.
    async fn hello(&mut self, revocations: &mut Option<Position>) -> Result<i64, String> {
        let prefix = &self.log.key_prefix;
        // Named, so that an operator (and the tests) can tell it in `CLIENT LIST`.
        let mut hello = redis::pipe();
        hello
            .cmd("CLIENT")
            .arg("SETNAME")
            .arg(events_connection_name(prefix))
            .ignore()
            .cmd("CLIENT")
            .arg("ID");
        let (client_id,): (i64,) = with_timeout(hello.query_async(&mut self.connection)).await?;
        // The epoch: ours if none is set (a new or emptied Redis), else the one every gateway uses.
        let mut epoch_pipe = redis::pipe();
        epoch_pipe
            .cmd("SET")
            .arg(epoch_key(prefix))
            .arg(new_epoch())
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(epoch_key(prefix));
        let (epoch,): (String,) =
            with_timeout(epoch_pipe.query_async(&mut self.connection)).await?;
        if self.follower.epoch(&epoch) {
            tracing::warn!(
                epoch,
                "the event logs were reset (Redis lost its data); reading them from the start"
            );
            if revocations.is_some() {
                *revocations = Some(Position::ZERO);
            }
        }
        if revocations.is_none() {
            *revocations = Some(stream_tip(&mut self.connection, &self.revocation_key).await?);
        }
        Ok(client_id)
    }

    /// Starts the logs just asked for, then reads once: until entries come, `BLOCK` passes or
    /// a new log is asked for.
    async fn read(
        &mut self,
        client_id: i64,
        revocations: &mut Option<Position>,
    ) -> Result<(), String> {
        let mut logs = Vec::new();
        for (event_type, position) in self.follower.logs() {
            let key = channel(&self.log.key_prefix, event_type.as_str());
            let position = match position {
                Some(position) => position,
                None => {
                    let tip = stream_tip(&mut self.connection, &key).await?;
                    self.follower.start(event_type, tip);
                    tip
                }
            };
            logs.push((key, position));
        }
        logs.push((self.revocation_key.clone(), revocations.unwrap_or_default()));
        let mut read = redis::cmd("XREAD");
        read.arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS");
        for (key, _) in &logs {
            read.arg(key);
        }
        for (_, position) in &logs {
            read.arg(position.to_string());
        }
        let mut reading = self.connection.clone();
        let reply = tokio::time::timeout(
            BLOCK + REDIS_TIMEOUT,
            read.query_async::<Value>(&mut reading),
        );
        tokio::pin!(reply);
        let changed = self.follower.changed();
        tokio::pin!(changed);
        let mut unblocked = false;
        let reply = loop {
            tokio::select! {
                reply = &mut reply => break reply,
                () = &mut changed, if !unblocked => {
                    // A new log to read: end the blocked read now (from another connection, as
                    // this one waits for the read) rather than at the end of BLOCK.
                    unblocked = true;
                    let pool = self.log.pool.clone();
                    tokio::spawn(async move {
                        let mut unblock = redis::cmd("CLIENT");
                        unblock.arg("UNBLOCK").arg(client_id);
                        let _ = service_kit::redis::query::<i64>(&pool, &unblock).await;
                    });
                }
            }
        };
        let entries = match reply {
            Ok(Ok(value)) => stream_entries(value),
            Ok(Err(err)) => return Err(err.to_string()),
            Err(_) => return Err("read timed out".into()),
        };
        for (key, position, payload) in entries {
            if key == self.revocation_key {
                *revocations = Some(revocations.unwrap_or_default().max(position));
                self.follower.revoked(Revocation::decode(&payload));
            } else if let Some(event_type) = log_name(&self.log.key_prefix, &key) {
                self.follower.entry(event_type, position, &payload);
            }
        }
        Ok(())
    }
}

/// The id of a stream's last entry (`0-0` when it has none).
async fn stream_tip(
    connection: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> Result<Position, String> {
    let reply: Value = with_timeout(
        redis::cmd("XREVRANGE")
            .arg(key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(connection),
    )
    .await?;
    Ok(entries_of(reply)
        .into_iter()
        .next()
        .map(|(position, _)| position)
        .unwrap_or_default())
}

/// A log's entries after `after` and whether none was trimmed away since. Redis trims from the
/// oldest end, so the history is whole when the cursor's own entry is still there, or when the
/// cursor is the last id the log ever gave (trimmed by age, with nothing after it).
///
/// Those are looked up first: a position the log does not hold (trimmed, or made up) is
/// answered at the cost of two lookups, without reading what follows it, so forged cursors
/// cannot make the gateway read the whole log each. It is looked up again after
/// the read, so that a trim racing with the read counts. (`max-deleted-entry-id` would say it
/// directly, but Redis 7.0 does not raise it when trimming.)
async fn history(pool: &RedisPool, key: &str, after: Position) -> Result<History, String> {
    if !has_entry(pool, key, after).await? {
        let last = last_generated(pool, key).await?;
        return Ok(History {
            covered: last == Some(after),
            entries: Vec::new(),
        });
    }
    let mut entries = Vec::new();
    let mut from = after;
    loop {
        let mut range = redis::cmd("XRANGE");
        range
            .arg(key)
            .arg(format!("({from}"))
            .arg("+")
            .arg("COUNT")
            .arg(READ_COUNT);
        let page = entries_of(
            service_kit::redis::query::<Value>(pool, &range)
                .await
                .map_err(|err| err.to_string())?,
        );
        let full = page.len() == READ_COUNT;
        for (position, payload) in page {
            from = position;
            entries.push((position, Arc::from(String::from_utf8_lossy(&payload))));
        }
        if !full {
            break;
        }
    }
    let covered = has_entry(pool, key, after).await?;
    Ok(History { covered, entries })
}

/// The last id the log gave, if the log exists.
async fn last_generated(pool: &RedisPool, key: &str) -> Result<Option<Position>, String> {
    let mut info = redis::cmd("XINFO");
    info.arg("STREAM").arg(key);
    match service_kit::redis::query::<Value>(pool, &info).await {
        Ok(info) => Ok(pairs(&info)
            .into_iter()
            .find(|(field, _)| field == "last-generated-id")
            .and_then(|(_, value)| text(&value))
            .and_then(|text| Position::parse(&text))),
        // No such log: it was deleted since the cursor's event was in it.
        Err(service_kit::redis::RedisError::Command(_)) => Ok(None),
        Err(err) => Err(err.to_string()),
    }
}

/// Whether the log holds an entry at `position`.
async fn has_entry(pool: &RedisPool, key: &str, position: Position) -> Result<bool, String> {
    let mut anchor = redis::cmd("XRANGE");
    anchor
        .arg(key)
        .arg(position.to_string())
        .arg(position.to_string());
    let reply = service_kit::redis::query::<Value>(pool, &anchor)
        .await
        .map_err(|err| err.to_string())?;
    Ok(!entries_of(reply).is_empty())
}

/// The entries of an `XREAD` reply, as (log, position, envelope).
fn stream_entries(reply: Value) -> Vec<(String, Position, Vec<u8>)> {
    let streams: Vec<(Value, Value)> = match reply {
        Value::Map(map) => map,
        Value::Array(items) => items
            .into_iter()
            .filter_map(|item| match item {
                Value::Array(mut pair) if pair.len() == 2 => {
                    let entries = pair.pop()?;
                    Some((pair.pop()?, entries))
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    streams
        .into_iter()
        .filter_map(|(key, entries)| Some((text(&key)?, entries)))
        .flat_map(|(key, entries)| {
            entries_of(entries)
                .into_iter()
                .map(move |(position, payload)| (key.clone(), position, payload))
        })
        .collect()
}

/// `[[id, [field, value, …]], …]` → (position, the envelope field's value).
fn entries_of(value: Value) -> Vec<(Position, Vec<u8>)> {
    let Value::Array(entries) = value else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|entry| {
            let Value::Array(mut entry) = entry else {
                return None;
            };
            if entry.len() != 2 {
                return None;
            }
            let fields = entry.pop()?;
            let position = Position::parse(&text(&entry.pop()?)?)?;
            let payload = pairs(&fields)
                .into_iter()
                .find(|(field, _)| field == ENTRY_FIELD)
                .and_then(|(_, value)| match value {
                    Value::BulkString(bytes) => Some(bytes),
                    Value::SimpleString(text) => Some(text.into_bytes()),
                    _ => None,
                })
                .unwrap_or_default();
            Some((position, payload))
        })
        .collect()
}

/// A flat `[field, value, …]` array (or a RESP3 map) as pairs.
fn pairs(value: &Value) -> Vec<(String, Value)> {
    match value {
        Value::Map(map) => map
            .iter()
            .filter_map(|(k, v)| Some((text(k)?, v.clone())))
            .collect(),
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|pair| match pair {
                [k, v] => Some((text(k)?, v.clone())),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

async fn with_timeout<T>(
    work: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(REDIS_TIMEOUT, work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_key_names_its_event_type_and_nothing_else_does() {
        let key = channel("p:", "thing.updated");
        assert_eq!(log_name("p:", &key), Some("thing.updated"));
        assert_eq!(log_name("p:", &revocation_channel("p:")), None);
        assert_eq!(log_name("q:", &key), None);
    }
}
