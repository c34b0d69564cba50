//! Writes made at most once per client key: a client that got no answer to a mutation (a 502
//! from the proxy when the replica that served it was killed, a socket lost) retries it with the
//! same `Idempotency-Key` and does not write twice.
//!
//! Each write of a request under a key is recorded in its own transaction, with the value it
//! committed ([`record`]): either both are committed or neither. A retry finds the record
//! ([`recorded`]) and is answered with that value, without writing and without an event. The
//! writes of one request are numbered in the order they run (`seq`; mutation fields run one
//! after another), so that a retry of a request with several mutations finds each its own.
//! Two requests with one key at the same time are serialized on the key (PostgreSQL: a lock for
//! the transaction; SQLite writes one transaction at a time anyway): the second waits for the
//! first and then finds its record. A key used for another request (another fingerprint) is
//! refused. Records older than the window count as absent and are purged.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use diesel::prelude::*;
use diesel::sql_types::Text;
use domain::Record;

use super::schema::idempotency_keys;
use super::{run, AnyConnection, DbError, DbPool};

/// One request made under a client's key: the writes it makes are numbered as they come.
#[derive(Debug)]
pub struct IdempotentRequest {
    user_id: i64,
    key: String,
    fingerprint: String,
    window: chrono::Duration,
    next_seq: AtomicI32,
}

impl IdempotentRequest {
    /// `fingerprint`: a digest of the request (its document, operation and variables).
    pub fn new(user_id: i64, key: &str, fingerprint: &str, window: chrono::Duration) -> Self {
        Self {
            user_id,
            key: key.to_owned(),
            fingerprint: fingerprint.to_owned(),
            window,
            next_seq: AtomicI32::new(0),
        }
    }

    /// The next write's place.
    pub(crate) fn next(self: &Arc<Self>) -> Once {
        Once {
            request: self.clone(),
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
        }
    }
}

/// One write's place under a key: its request, and its number in it.
#[derive(Debug, Clone)]
pub struct Once {
    request: Arc<IdempotentRequest>,
    seq: i32,
}

/// What the records of a key say of one write.
pub(crate) enum Recorded<T> {
    /// Not made yet: make it, then [`record`] it.
    Nothing,
    /// Made already: this is what it committed.
    Made(T),
    /// The key was used for another request.
    OtherRequest,
}

/// Serializes the writes under one key until the transaction ends (PostgreSQL; SQLite runs one
/// write transaction at a time already).
pub(crate) fn lock(conn: &mut AnyConnection, once: &Once) -> QueryResult<()> {
    let request = &once.request;
    if let AnyConnection::Postgresql(conn) = conn {
        diesel::sql_query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind::<Text, _>(format!("idempotency:{}:{}", request.user_id, request.key))
            .execute(conn)?;
    }
    Ok(())
}

/// What the key's records (within the window) say of this write.
pub(crate) fn recorded<T: Record>(
    conn: &mut AnyConnection,
    once: &Once,
) -> QueryResult<Recorded<T>> {
    let request = &once.request;
    let cutoff = super::now() - request.window;
    diesel::delete(
        idempotency_keys::table
            .filter(idempotency_keys::user_id.eq(request.user_id))
            .filter(idempotency_keys::key.eq(&request.key))
            .filter(idempotency_keys::created_at.lt(cutoff)),
    )
    .execute(conn)?;
    let rows: Vec<(i32, String, String)> = idempotency_keys::table
        .filter(idempotency_keys::user_id.eq(request.user_id))
        .filter(idempotency_keys::key.eq(&request.key))
        .select((
            idempotency_keys::seq,
            idempotency_keys::fingerprint,
            idempotency_keys::record,
        ))
        .load(conn)?;
    if rows
        .iter()
        .any(|(_, fingerprint, _)| *fingerprint != request.fingerprint)
    {
        return Ok(Recorded::OtherRequest);
    }
    match rows.into_iter().find(|(seq, _, _)| *seq == once.seq) {
        Some((_, _, record)) => serde_json::from_str(&record)
            .map(Recorded::Made)
            .map_err(|err| diesel::result::Error::DeserializationError(Box::new(err))),
        None => Ok(Recorded::Nothing),
    }
}

/// Records the write and the value it committed, in its transaction.
pub(crate) fn record<T: Record>(
    conn: &mut AnyConnection,
    once: &Once,
    value: &T,
) -> QueryResult<()> {
    let record = serde_json::to_string(value)
        .map_err(|err| diesel::result::Error::SerializationError(Box::new(err)))?;
    let request = &once.request;
    diesel::insert_into(idempotency_keys::table)
        .values((
            idempotency_keys::user_id.eq(request.user_id),
            idempotency_keys::key.eq(&request.key),
            idempotency_keys::seq.eq(once.seq),
            idempotency_keys::fingerprint.eq(&request.fingerprint),
            idempotency_keys::record.eq(record),
            idempotency_keys::created_at.eq(super::now()),
        ))
        .execute(conn)?;
    Ok(())
}

/// Deletes the records older than `window`; how many.
pub async fn purge(pool: &DbPool, window: chrono::Duration) -> Result<usize, DbError> {
    run(pool, move |conn| {
        diesel::delete(
            idempotency_keys::table.filter(idempotency_keys::created_at.lt(super::now() - window)),
        )
        .execute(conn)
    })
    .await
}

/// Purges the records older than `window` every ten minutes until `stop` resolves.
pub async fn run_purge(
    pool: DbPool,
    window: chrono::Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut stop = std::pin::pin!(stop);
    let mut every = tokio::time::interval(std::time::Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = every.tick() => {
                match purge(&pool, window).await {
                    Ok(0) => {}
                    Ok(purged) => tracing::debug!(purged, "idempotency records past their window purged"),
                    Err(err) => tracing::warn!(%err, "cannot purge idempotency records; retrying later"),
                }
            }
        }
    }
}
