//! The refresh-token blacklist. It lives in the database rather than in one process so that a
//! token refused by one replica is refused by all.

use chrono::{DateTime, Utc};
use diesel::prelude::*;

use super::schema::blacklisted_tokens;
use super::{run, DbError, DbPool};

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = blacklisted_tokens)]
pub struct BlacklistEntry {
    pub jti: String,
    pub user_id: i64,
    pub expires_at: DateTime<Utc>,
}

/// Blacklists the token; returns `false` when it already was. The single INSERT … ON CONFLICT is
/// the compare-and-set that lets exactly one of two concurrent refreshes with the same token win.
pub async fn blacklist(pool: &DbPool, entry: BlacklistEntry) -> Result<bool, DbError> {
    run(pool, move |conn| {
        diesel::insert_into(blacklisted_tokens::table)
            .values(&entry)
            .on_conflict_do_nothing()
            .execute(conn)
            .map(|rows| rows == 1)
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
            blacklisted_tokens::table.filter(blacklisted_tokens::expires_at.lt(Utc::now())),
        )
        .execute(conn)
    })
    .await
}
