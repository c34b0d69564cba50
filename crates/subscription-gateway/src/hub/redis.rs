//! Reading the event logs: the hub's one Redis connection (`XREAD BLOCK` over the logs its
//! subscribers need and the revocation stream, reconnecting with capped backoff), the
//! in-memory bus of the embedded mode, and the reads a replay makes.

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::redis;
use deadpool_redis::redis::Value;
use events::{
    channel, epoch_key, new_epoch, revocation_channel, BusMessage, Position, ENTRY_FIELD,
};
use service_kit::redis::RedisPool;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::{set_connected, Backend, Hub};

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long one `XREAD` blocks: also the health check of the connection, since a Redis that
/// hangs without closing the socket is noticed when a read does not return within this time
/// plus [`REDIS_TIMEOUT`].
const BLOCK: Duration = Duration::from_secs(5);
const REDIS_TIMEOUT: Duration = Duration::from_secs(3);
/// Entries per `XREAD` and per page of a replay.
const READ_COUNT: usize = 512;

pub(super) async fn run(hub: Hub, client: redis::Client, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    // Where the revocation stream stands; kept across reconnections like the logs' positions.
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
                let reason = serve(&hub, connection, &mut revocations, &shutdown).await;
                set_connected(&hub, false);
                match reason {
                    Ended::Shutdown => return,
                    Ended::Lost(err) => {
                        tracing::warn!(%err, "lost the Redis event connection; reconnecting")
                    }
                }
            }
            Ok(Err(err)) => tracing::warn!(%err, "cannot connect to Redis; retrying"),
            Err(_) => tracing::warn!("connecting to Redis timed out; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Feeds the hub from the in-memory bus until shutdown (or until the bus is gone).
pub(super) async fn run_memory(
    hub: Hub,
    mut messages: broadcast::Receiver<BusMessage>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            message = messages.recv() => match message {
                Ok(message) => hub.dispatch(&message.channel, message.position, message.payload.as_bytes()),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "the hub fell behind the in-memory bus; events were lost");
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    set_connected(&hub, false);
}

enum Ended {
    Shutdown,
    Lost(String),
}

async fn serve(
    hub: &Hub,
    mut connection: redis::aio::MultiplexedConnection,
    revocations: &mut Option<Position>,
    shutdown: &CancellationToken,
) -> Ended {
    let Backend::Redis(pool) = &hub.inner.backend else {
        return Ended::Shutdown;
    };
    let prefix = &hub.inner.key_prefix;
    let revocation_key = revocation_channel(prefix);
    // Named, so that an operator (and the tests) can tell it in `CLIENT LIST`.
    let mut hello = redis::pipe();
    hello
        .cmd("CLIENT")
        .arg("SETNAME")
        .arg(events::events_connection_name(prefix))
        .ignore()
        .cmd("CLIENT")
        .arg("ID");
    let (client_id,): (i64,) = match with_timeout(hello.query_async(&mut connection)).await {
        Ok(id) => id,
        Err(err) => return Ended::Lost(err),
    };
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
    let (epoch,): (String,) = match with_timeout(epoch_pipe.query_async(&mut connection)).await {
        Ok(epoch) => epoch,
        Err(err) => return Ended::Lost(err),
    };
    if hub.set_epoch(&epoch) {
        tracing::warn!(
            epoch,
            "the event logs were reset (Redis lost its data); reading them from the start"
        );
        if revocations.is_some() {
            *revocations = Some(Position::ZERO);
        }
    }
    if revocations.is_none() {
        match stream_tip(&mut connection, &revocation_key).await {
            Ok(tip) => *revocations = Some(tip),
            Err(err) => return Ended::Lost(err),
        }
    }
    set_connected(hub, true);
    hub.inner.ready.notify_waiters();
    tracing::info!("reading the event logs from Redis");
    loop {
        for event_type in hub.unstarted() {
            match stream_tip(&mut connection, &channel(prefix, event_type.as_str())).await {
                Ok(tip) => hub.start_topic(event_type, tip),
                Err(err) => return Ended::Lost(err),
            }
        }
        let mut logs = hub.read_set();
        logs.push((revocation_key.clone(), revocations.unwrap_or_default()));
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
        let mut reading = connection.clone();
        let reply = tokio::time::timeout(
            BLOCK + REDIS_TIMEOUT,
            read.query_async::<Value>(&mut reading),
        );
        tokio::pin!(reply);
        let mut unblocked = false;
        let reply = loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ended::Shutdown,
                reply = &mut reply => break reply,
                () = hub.inner.wake.notified(), if !unblocked => {
                    // A new log to read: end the blocked read now (from another connection, as
                    // this one waits for the read) rather than at the end of BLOCK.
                    unblocked = true;
                    let pool = pool.clone();
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
            Ok(Err(err)) => return Ended::Lost(err.to_string()),
            Err(_) => return Ended::Lost("read timed out".into()),
        };
        for (key, position, payload) in entries {
            if key == revocation_key {
                *revocations = Some(revocations.unwrap_or_default().max(position));
            }
            hub.dispatch(&key, position, &payload);
        }
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
pub(super) async fn redis_history(
    pool: &RedisPool,
    key: &str,
    after: Position,
) -> Result<(bool, Vec<(Position, Arc<str>)>), String> {
    if !has_entry(pool, key, after).await? {
        let last = last_generated(pool, key).await?;
        return Ok((last == Some(after), Vec::new()));
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
    Ok((covered, entries))
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
