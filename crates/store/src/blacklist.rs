//! The refresh-token blacklist. It lives in the database rather than in one process so that a
//! token refused by one replica is refused by all.

use chrono::{DateTime, Utc};
use diesel::prelude::*;

use super::schema::blacklisted_tokens;
use super::{each_backend, run, DbError, DbPool};

#[derive(Debug, Clone)]
pub struct BlacklistEntry {
    pub jti: String,
    pub user_id: i64,
    pub expires_at: DateTime<Utc>,
}

/// Blacklists the token; returns `false` when it already was. The single INSERT … ON CONFLICT is
/// the compare-and-set that lets exactly one of two concurrent refreshes with the same token win.
pub async fn blacklist(pool: &DbPool, entry: BlacklistEntry) -> Result<bool, DbError> {
    run(pool, move |conn| {
        let row = (
            blacklisted_tokens::jti.eq(entry.jti),
            blacklisted_tokens::user_id.eq(entry.user_id),
            blacklisted_tokens::expires_at.eq(entry.expires_at.naive_utc()),
        );
        each_backend!(conn, |conn| diesel::insert_into(blacklisted_tokens::table)
            .values(row)
            .on_conflict_do_nothing()
            .execute(conn)
            .map(|rows| rows == 1))
    })
    .await
}

pub async fn is_blacklisted(pool: &DbPool, jti: String) -> Result<bool, DbError> {
    run(pool, move |conn| {
        diesel::select(diesel::dsl::exists(
            blacklisted_tokens::table.filter(blacklisted_tokens::jti.eq(jti)),
        ))
        .get_result(conn)
    })
    .await
}

/// Deletes entries whose token has expired anyway; returns how many.
pub async fn purge_expired(pool: &DbPool) -> Result<usize, DbError> {
    run(pool, move |conn| {
        diesel::delete(
            blacklisted_tokens::table.filter(blacklisted_tokens::expires_at.lt(super::now())),
        )
        .execute(conn)
    })
    .await
}
