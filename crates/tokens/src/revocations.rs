//! Logouts that reach access tokens: a per-user cutoff, "tokens issued up to this second are
//! revoked", shared by every replica.
//!
//! A logout blacklists the refresh token in PostgreSQL, but an access token is checked without a
//! database: until this module, the access token kept working on HTTP and opened new sockets
//! until it expired (5 minutes by default). Now auth-service writes the user's cutoff into one
//! Redis sorted set (`<REDIS_KEY_PREFIX>auth:revoked-before`, member the user id, score the cutoff
//! in unix seconds, only ever raised) and every verifying process keeps a copy in memory,
//! refreshed every [`POLL_INTERVAL`] with the entries changed since its last read
//! ([`poll`]). A token whose `iat` is before its user's cutoff is refused as revoked, on HTTP and
//! at `connection_init` alike; the gateway also closes the open sockets of that token at once
//! (the announcement on the revocation channel carries the cutoff).
//!
//! `iat` is in whole seconds, so the cutoff covers the logout's own second (`iat <= cutoff`), and
//! auth-service issues the user's next tokens with an `iat` after it (a login in the same second
//! as a logout gets `iat` = cutoff + 1). Entries older than an access token's lifetime (plus leeway) can no
//! longer match any unexpired token and are dropped, in Redis and in memory. The embedded mode
//! shares one [`RevokedBefore`] between its auth routes and its verifiers.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use deadpool_redis::redis;

use crate::jwt::Claims;
use service_kit::redis::RedisPool;

/// How often a verifying process reads the cutoffs written since its last read.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The sorted set of cutoffs.
pub fn key(key_prefix: &str) -> String {
    format!("{key_prefix}auth:revoked-before")
}

/// The cutoffs this process knows, by user id.
pub struct RevokedBefore {
    cutoffs: RwLock<HashMap<i64, i64>>,
    /// How long a cutoff matters: the longest an access token is accepted (lifetime + leeway).
    retention_secs: i64,
}

impl RevokedBefore {
    pub fn new(access_lifetime_secs: u64, leeway_secs: u64) -> Arc<Self> {
        Arc::new(Self {
            cutoffs: RwLock::new(HashMap::new()),
            retention_secs: i64::try_from(access_lifetime_secs.saturating_add(leeway_secs))
                .unwrap_or(i64::MAX),
        })
    }

    /// Whether the token was issued at or before its user's cutoff.
    pub fn is_revoked(&self, claims: &Claims) -> bool {
        self.cutoff(claims.user_id)
            .is_some_and(|cutoff| claims.iat <= cutoff)
    }

    /// The user's cutoff, if one is known.
    pub fn cutoff(&self, user_id: i64) -> Option<i64> {
        let cutoffs = match self.cutoffs.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        cutoffs.get(&user_id).copied()
    }

    /// Raises the user's cutoff (never lowers it) and forgets cutoffs no token can be under.
    pub fn record(&self, user_id: i64, cutoff: i64) {
        let now = chrono::Utc::now().timestamp();
        let mut cutoffs = match self.cutoffs.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let entry = cutoffs.entry(user_id).or_insert(cutoff);
        *entry = (*entry).max(cutoff);
        let oldest_useful = now.saturating_sub(self.retention_secs);
        cutoffs.retain(|_, cutoff| *cutoff >= oldest_useful);
    }
}

/// Writes the user's cutoff for every replica: `ZADD GT` (a cutoff is only ever raised), old
/// entries removed, and the set expires when no logout happened for a whole retention.
pub async fn write(
    pool: &RedisPool,
    key_prefix: &str,
    user_id: i64,
    cutoff: i64,
    retention_secs: u64,
) -> Result<(), service_kit::redis::RedisError> {
    let key = key(key_prefix);
    let retention = i64::try_from(retention_secs).unwrap_or(i64::MAX);
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("ZADD")
        .arg(&key)
        .arg("GT")
        .arg(cutoff)
        .arg(user_id)
        .ignore()
        .cmd("ZREMRANGEBYSCORE")
        .arg(&key)
        .arg("-inf")
        .arg(format!("({}", cutoff.saturating_sub(retention)))
        .ignore()
        .cmd("EXPIRE")
        .arg(&key)
        .arg(retention_secs.max(1))
        .ignore();
    service_kit::redis::query::<()>(pool, &pipe).await
}

/// The user's cutoff as Redis has it.
pub async fn read(
    pool: &RedisPool,
    key_prefix: &str,
    user_id: i64,
) -> Result<Option<i64>, service_kit::redis::RedisError> {
    let mut cmd = redis::cmd("ZSCORE");
    cmd.arg(key(key_prefix)).arg(user_id);
    service_kit::redis::query::<Option<i64>>(pool, &cmd).await
}

/// Keeps `list` up to date from Redis until `shutdown` resolves: every [`POLL_INTERVAL`] the
/// entries whose cutoff is at or after the newest one already seen (so one written in the same
/// second is not missed). While Redis is unreachable the copy stays as it was and the poll goes
/// on; the gateway's revocation feed and the token's expiry still apply.
pub async fn poll(
    pool: RedisPool,
    key_prefix: String,
    list: Arc<RevokedBefore>,
    shutdown: impl Future<Output = ()>,
) {
    let key = key(&key_prefix);
    let mut newest_seen = i64::MIN;
    tokio::pin!(shutdown);
    loop {
        let mut cmd = redis::cmd("ZRANGE");
        let from = if newest_seen == i64::MIN {
            "-inf".to_owned()
        } else {
            newest_seen.to_string()
        };
        cmd.arg(&key)
            .arg(from)
            .arg("+inf")
            .arg("BYSCORE")
            .arg("WITHSCORES");
        match service_kit::redis::query::<Vec<(i64, i64)>>(&pool, &cmd).await {
            Ok(entries) => {
                for (user_id, cutoff) in entries {
                    list.record(user_id, cutoff);
                    newest_seen = newest_seen.max(cutoff);
                }
            }
            Err(err) => tracing::debug!(%err, "cannot read the revocation cutoffs; retrying"),
        }
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(POLL_INTERVAL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::TokenType;

    fn claims(user_id: i64, iat: i64) -> Claims {
        Claims {
            token_type: TokenType::Access,
            exp: iat + 300,
            iat,
            jti: "j".into(),
            user_id,
            username: "u".into(),
        }
    }

    #[test]
    fn tokens_issued_before_the_cutoff_are_revoked_and_later_ones_are_not() {
        let list = RevokedBefore::new(300, 5);
        let now = chrono::Utc::now().timestamp();
        list.record(7, now);
        assert!(list.is_revoked(&claims(7, now - 1)));
        assert!(
            list.is_revoked(&claims(7, now)),
            "the logout's own second is covered"
        );
        assert!(!list.is_revoked(&claims(7, now + 1)));
        assert!(!list.is_revoked(&claims(8, now - 1)), "another user");
        // A cutoff is never lowered.
        list.record(7, now - 100);
        assert!(list.is_revoked(&claims(7, now - 1)));
        // Cutoffs older than any acceptable token are forgotten.
        list.record(9, now - 1000);
        assert!(!list.is_revoked(&claims(9, now - 2000)));
    }
}
