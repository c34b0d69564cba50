//! The `event_outbox` table: events committed with their change and not yet known to be on the
//! bus. Rows are leased (`locked_until`) rather than locked, so that the same statements work on
//! PostgreSQL and SQLite and a publisher that dies simply lets its lease run out.

use chrono::{DateTime, Duration, NaiveDateTime, SubsecRound as _, Utc};
use diesel::prelude::*;

use super::schema::event_outbox;
use super::{run, AnyConnection, DbError, DbPool};

/// An outbox row to insert inside the write's transaction.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_id: String,
    pub event_type: String,
    /// The serialized envelope, exactly as it will be published.
    pub payload: String,
    /// The writer's lease: until then only the writer publishes it (right after commit).
    pub locked_until: Option<DateTime<Utc>>,
    /// The write's trace context, when traced.
    pub traceparent: Option<String>,
}

/// An unpublished event claimed by a relay.
#[derive(Debug, Clone, Queryable)]
pub struct PendingEvent {
    pub id: i64,
    pub event_id: String,
    pub event_type: String,
    pub payload: String,
    pub attempts: i32,
    /// The lease this process holds on it; releasing is conditional on it, so a process whose
    /// lease ran out (or an operator's hold) is never overwritten.
    pub lease: Option<NaiveDateTime>,
    /// The write's trace context, when traced: its publish links to it.
    pub traceparent: Option<String>,
}

/// Inserts the row in the caller's transaction.
pub(crate) fn insert(conn: &mut AnyConnection, event: NewEvent) -> QueryResult<PendingEvent> {
    let lease = event.locked_until.map(|until| until.naive_utc());
    let id = diesel::insert_into(event_outbox::table)
        .values((
            event_outbox::event_id.eq(&event.event_id),
            event_outbox::event_type.eq(&event.event_type),
            event_outbox::payload.eq(&event.payload),
            event_outbox::locked_until.eq(lease),
            event_outbox::traceparent.eq(&event.traceparent),
        ))
        .returning(event_outbox::id)
        .get_result(conn)?;
    Ok(PendingEvent {
        id,
        event_id: event.event_id,
        event_type: event.event_type,
        payload: event.payload,
        attempts: 0,
        lease,
        traceparent: event.traceparent,
    })
}

/// Commits an event that is no write's (a revocation by a command run beside the embedded
/// server), due at once for the relay of the process that owns the log.
pub async fn commit(pool: &DbPool, event_type: &str, payload: String) -> Result<(), DbError> {
    let event = NewEvent {
        event_id: events::new_event_id(),
        event_type: event_type.to_owned(),
        payload,
        locked_until: None,
        traceparent: None,
    };
    run(pool, move |conn| insert(conn, event).map(|_| ())).await
}

/// Removes a published event.
pub async fn delete(pool: &DbPool, id: i64) -> Result<(), DbError> {
    run(pool, move |conn| {
        diesel::delete(event_outbox::table.filter(event_outbox::id.eq(id)))
            .execute(conn)
            .map(|_| ())
    })
    .await
}

/// Makes an event whose publication failed due again at once, if this process still holds the
/// lease it had (else someone else owns the event now, and it is theirs to handle).
pub async fn release(pool: &DbPool, event: &PendingEvent) -> Result<(), DbError> {
    let (id, lease) = (event.id, event.lease);
    run(pool, move |conn| {
        let target = event_outbox::table.filter(event_outbox::id.eq(id));
        match lease {
            Some(lease) => diesel::update(target.filter(event_outbox::locked_until.eq(lease)))
                .set(event_outbox::locked_until.eq(None::<NaiveDateTime>))
                .execute(conn),
            None => diesel::update(target.filter(event_outbox::locked_until.is_null()))
                .set(event_outbox::locked_until.eq(None::<NaiveDateTime>))
                .execute(conn),
        }
        .map(|_| ())
    })
    .await
}

/// A lease ending `duration` from now, to the microsecond (the database's precision, so that
/// the value read back compares equal).
pub fn lease_until(duration: Duration) -> DateTime<Utc> {
    (Utc::now() + duration).trunc_subsecs(6)
}

/// Claims up to `limit` events whose lease has run out, oldest first, leasing each for `lease`.
/// Each claim is a conditional UPDATE, so of two relays racing for a row exactly one gets it.
pub async fn claim_due(
    pool: &DbPool,
    limit: i64,
    lease: Duration,
) -> Result<Vec<PendingEvent>, DbError> {
    run(pool, move |conn| {
        let now = super::now();
        let until = lease_until(lease).naive_utc();
        let due = || {
            event_outbox::locked_until
                .is_null()
                .or(event_outbox::locked_until.lt(now))
        };
        let candidates: Vec<i64> = event_outbox::table
            .filter(due())
            .order(event_outbox::id.asc())
            .limit(limit)
            .select(event_outbox::id)
            .load(conn)?;
        let mut claimed = Vec::with_capacity(candidates.len());
        for id in candidates {
            let row = diesel::update(
                event_outbox::table
                    .filter(event_outbox::id.eq(id))
                    .filter(due()),
            )
            .set((
                event_outbox::locked_until.eq(until),
                event_outbox::attempts.eq(event_outbox::attempts + 1),
            ))
            .returning((
                event_outbox::id,
                event_outbox::event_id,
                event_outbox::event_type,
                event_outbox::payload,
                event_outbox::attempts,
                event_outbox::locked_until,
                event_outbox::traceparent,
            ))
            .get_result::<PendingEvent>(conn)
            .optional()?;
            claimed.extend(row);
        }
        Ok(claimed)
    })
    .await
}

/// How many events wait to be published (for `/metrics` and the tests).
pub async fn pending_count(pool: &DbPool) -> Result<i64, DbError> {
    run(pool, |conn| event_outbox::table.count().get_result(conn)).await
}

/// Sets the lease of every unpublished event to `until` (`None`: due at once). An operator's tool
/// (hold events back during maintenance, or release them now), and the tests'.
pub async fn lease_all(pool: &DbPool, until: Option<DateTime<Utc>>) -> Result<usize, DbError> {
    let until = until.map(|until| until.naive_utc());
    run(pool, move |conn| {
        diesel::update(event_outbox::table)
            .set(event_outbox::locked_until.eq(until))
            .execute(conn)
    })
    .await
}
