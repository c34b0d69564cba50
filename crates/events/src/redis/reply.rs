//! Reading Redis's replies to the stream commands.

use deadpool_redis::redis;
use deadpool_redis::redis::Value;

use super::{ENTRY_FIELD, REDIS_TIMEOUT};
use crate::position::Position;

/// The entries of an `XREAD` reply, as (log, position, envelope).
pub(super) fn stream_entries(reply: Value) -> Vec<(String, Position, Vec<u8>)> {
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
pub(super) fn entries_of(value: Value) -> Vec<(Position, Vec<u8>)> {
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
pub(super) fn pairs(value: &Value) -> Vec<(String, Value)> {
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

pub(super) fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

pub(super) async fn with_timeout<T>(
    work: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(REDIS_TIMEOUT, work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err("timed out".into()),
    }
}
