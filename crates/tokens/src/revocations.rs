//! Logouts that reach access tokens: a per-user cutoff, "tokens issued up to this millisecond are
//! revoked", shared by every replica.
//!
//! A logout blacklists the refresh token in PostgreSQL, but an access token is checked without a
//! database, so a logout (or `deactivate-user`) also writes the user's cutoff to Redis, and every
//! verifying process keeps a copy of all cutoffs in memory ([`RevokedBefore`]). A token whose
//! issue time ([`Claims::issued_at_ms`]) is at or before its user's cutoff is refused as revoked,
//! on HTTP, at `connection_init`, at a renewal and on forwarded operations alike; the gateway
//! also closes the open sockets it covers ([`RevokedBefore::changes`]).
//!
//! What one user can do to another's logout, nothing, rests on four rules:
//! - **A cutoff is the logout's own moment, never later.** A token issued after it carries a
//!   later `iat_ms`, so nothing has to be pushed into the future to tell the two apart, and a
//!   burst of logouts cannot move anyone's clock, their own tokens' `exp` included.
//! - **Replicas read changes by version, not by time.** Each write takes the next number of a
//!   counter and files the user under it (`…:changes`, a sorted set with one member per user,
//!   scored by the version of the user's last change), so a poll of "versions after the last one
//!   I read" sees every change exactly, however the cutoffs compare ([`poll`]).
//! - **Trimming looks at each entry's own cutoff.** The oldest changes are dropped only once
//!   their own cutoff is older than any token still accepted (access lifetime plus leeway), so
//!   no number of other users' logouts can remove a live one, and a replica started later reads
//!   every live cutoff.
//! - **A logout is answered only after its cutoff is stored.** Redis unreachable: auth-service
//!   answers 503 and blacklists nothing, so the client can try again.
//!
//! The three keys share a hash tag (`{<prefix>auth:revoked}`), so they stay on one node of a
//! Redis Cluster and each change is one atomic script. The revocation stream
//! (`events::revocation_channel`) is only a wake-up: the gateway's hub reads it with the event
//! logs and records the cutoff at once, before the next poll.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use deadpool_redis::redis;
use tokio::sync::watch;

use crate::jwt::Claims;
use service_kit::redis::RedisPool;

/// How often a verifying process reads the cutoffs written since its last read: the longest a
/// replica that did not answer the logout accepts a revoked token.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Changes read per round trip of a poll.
const PAGE: usize = 1000;

/// The keys of the cutoffs: (cutoff by user, user by version of its last change, the version
/// counter).
pub fn keys(key_prefix: &str) -> [String; 3] {
    let tag = format!("{{{key_prefix}auth:revoked}}");
    [
        format!("{tag}:cutoffs"),
        format!("{tag}:changes"),
        format!("{tag}:version"),
    ]
}

/// Now, in unix milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The cutoffs this process knows, by user id, and a signal for those who must look again.
pub struct RevokedBefore {
    cutoffs: RwLock<HashMap<i64, i64>>,
    /// How long a cutoff matters: the longest an access token is accepted (lifetime + leeway).
    retention_ms: i64,
    /// Bumped whenever a cutoff is raised: the gateway's connections check their token again.
    changes: watch::Sender<u64>,
    /// Whether a first read of Redis (or, in the embedded mode, nothing to read) has completed:
    /// before it, a process that just started does not know the logouts of the last minutes.
    loaded: std::sync::atomic::AtomicBool,
}

impl RevokedBefore {
    pub fn new(access_lifetime_secs: u64, leeway_secs: u64) -> Arc<Self> {
        let retention_secs = i64::try_from(access_lifetime_secs.saturating_add(leeway_secs))
            .unwrap_or(i64::MAX / 1000);
        Arc::new(Self {
            cutoffs: RwLock::new(HashMap::new()),
            retention_ms: retention_secs.saturating_mul(1000),
            changes: watch::channel(0).0,
            loaded: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A list that has nothing to load (the embedded mode, where logouts record here directly).
    pub fn new_loaded(access_lifetime_secs: u64, leeway_secs: u64) -> Arc<Self> {
        let list = Self::new(access_lifetime_secs, leeway_secs);
        list.mark_loaded();
        list
    }

    /// Whether the token was issued at or before its user's cutoff.
    pub fn is_revoked(&self, claims: &Claims) -> bool {
        self.cutoff(claims.user_id)
            .is_some_and(|cutoff| claims.issued_at_ms() <= cutoff)
    }

    /// The user's cutoff in unix milliseconds, if one is known.
    pub fn cutoff(&self, user_id: i64) -> Option<i64> {
        let cutoffs = match self.cutoffs.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        cutoffs.get(&user_id).copied()
    }

    /// Raises the user's cutoff (never lowers it), forgets cutoffs no token can be under, and
    /// tells the watchers when something was raised.
    pub fn record(&self, user_id: i64, cutoff_ms: i64) {
        let oldest_useful = now_ms().saturating_sub(self.retention_ms);
        let raised = {
            let mut cutoffs = match self.cutoffs.write() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            let entry = cutoffs.entry(user_id).or_insert(i64::MIN);
            let raised = cutoff_ms > *entry;
            *entry = (*entry).max(cutoff_ms);
            cutoffs.retain(|_, cutoff| *cutoff >= oldest_useful);
            raised
        };
        if raised {
            self.changes.send_modify(|version| *version += 1);
        }
    }

    /// A receiver that changes whenever a cutoff is raised; a holder of claims then asks
    /// [`RevokedBefore::is_revoked`] again.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Whether the cutoffs written before this process started are known (`/readyz`).
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(std::sync::atomic::Ordering::Acquire)
    }

    fn mark_loaded(&self) {
        self.loaded
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// How long a cutoff matters, in milliseconds.
    pub fn retention_ms(&self) -> i64 {
        self.retention_ms
    }
}

/// `/readyz`'s check: not ready until the cutoffs written before this process started have
/// been read, so that a replica started after a logout never serves the logged-out token.
pub fn readiness_probe(list: Arc<RevokedBefore>) -> service_kit::http::Probe {
    Arc::new(move || {
        let loaded = list.is_loaded();
        Box::pin(async move {
            if loaded {
                Ok(())
            } else {
                Err("the logout cutoffs have not been read from Redis yet".to_owned())
            }
        })
    })
}

/// The write: the user's cutoff raised (never lowered), the user filed under a new version, and
/// the oldest changes dropped while their own cutoff is out of retention (a few per write, so
/// the sets stay as large as the users logged out within one retention).
const WRITE_SCRIPT: &str = r"
local version = redis.call('INCR', KEYS[3])
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')
if tonumber(ARGV[2]) > current then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call('ZADD', KEYS[2], version, ARGV[1])
for _ = 1, 16 do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 then break end
  local cutoff = tonumber(redis.call('HGET', KEYS[1], oldest[1]) or '-1')
  if cutoff >= tonumber(ARGV[3]) then break end
  redis.call('ZREM', KEYS[2], oldest[1])
  redis.call('HDEL', KEYS[1], oldest[1])
end
return version
";

/// The read: the counter, then (user, cutoff, version) for each user changed after ARGV[1].
const READ_SCRIPT: &str = r"
local out = { tostring(tonumber(redis.call('GET', KEYS[3]) or '0')) }
local changed = redis.call('ZRANGE', KEYS[2], '(' .. ARGV[1], '+inf', 'BYSCORE',
  'LIMIT', 0, tonumber(ARGV[2]), 'WITHSCORES')
for i = 1, #changed, 2 do
  local cutoff = redis.call('HGET', KEYS[1], changed[i])
  if cutoff then
    table.insert(out, changed[i])
    table.insert(out, cutoff)
    table.insert(out, changed[i + 1])
  end
end
return out
";

/// Writes the user's cutoff for every replica, atomically; returns its version.
pub async fn write(
    pool: &RedisPool,
    key_prefix: &str,
    user_id: i64,
    cutoff_ms: i64,
    retention_ms: i64,
) -> Result<u64, service_kit::redis::RedisError> {
    let [cutoffs, changes, version] = keys(key_prefix);
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(WRITE_SCRIPT)
        .arg(3)
        .arg(cutoffs)
        .arg(changes)
        .arg(version)
        .arg(user_id)
        .arg(cutoff_ms)
        .arg(now_ms().saturating_sub(retention_ms));
    service_kit::redis::query::<u64>(pool, &cmd).await
}

/// One page of changes after `after`: the counter's value, and (user, cutoff, version) each.
async fn read_changes(
    pool: &RedisPool,
    key_prefix: &str,
    after: u64,
) -> Result<(u64, Vec<(i64, i64, u64)>), service_kit::redis::RedisError> {
    let [cutoffs, changes, version] = keys(key_prefix);
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(READ_SCRIPT)
        .arg(3)
        .arg(cutoffs)
        .arg(changes)
        .arg(version)
        .arg(after)
        .arg(PAGE);
    let reply = service_kit::redis::query::<Vec<String>>(pool, &cmd).await?;
    let malformed =
        || service_kit::redis::RedisError::Command("malformed revocation changes".into());
    let (counter, rest) = reply.split_first().ok_or_else(malformed)?;
    let counter = counter.parse().map_err(|_| malformed())?;
    let entries = rest
        .chunks_exact(3)
        .map(|entry| {
            Some((
                entry[0].parse().ok()?,
                entry[1].parse().ok()?,
                // Scores come back as Lua's text of a double ("12" or "1.2e+16").
                entry[2].parse::<f64>().ok()? as u64,
            ))
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(malformed)?;
    Ok((counter, entries))
}

/// Reads every change after `*last` into `list`, page by page, and moves `*last` on. A counter
/// below `*last` means Redis lost its data (restarted without persistence): everything is read
/// again from the start.
pub async fn catch_up(
    pool: &RedisPool,
    key_prefix: &str,
    list: &RevokedBefore,
    last: &mut u64,
) -> Result<(), service_kit::redis::RedisError> {
    loop {
        let (counter, entries) = read_changes(pool, key_prefix, *last).await?;
        if counter < *last {
            *last = 0;
            continue;
        }
        let full = entries.len() == PAGE;
        for (user_id, cutoff_ms, version) in entries {
            list.record(user_id, cutoff_ms);
            *last = (*last).max(version);
        }
        if !full {
            list.mark_loaded();
            return Ok(());
        }
    }
}

/// The first read, before a service starts serving, so that it is ready with every live cutoff.
/// Redis unreachable is not fatal: the service starts, `/readyz` says why it is not ready, and
/// [`poll`] reads them as soon as Redis answers.
pub async fn load_at_start(pool: &RedisPool, key_prefix: &str, list: &RevokedBefore) {
    if let Err(err) = catch_up(pool, key_prefix, list, &mut 0).await {
        tracing::warn!(%err, "cannot read the logout cutoffs yet; not ready until they are read");
    }
}

/// Keeps `list` up to date from Redis until `shutdown` resolves: every [`POLL_INTERVAL`] the
/// changes made since the last read. While Redis is unreachable the copy stays as it was and the
/// poll goes on; the tokens' expiry still applies.
pub async fn poll(
    pool: RedisPool,
    key_prefix: String,
    list: Arc<RevokedBefore>,
    shutdown: impl Future<Output = ()>,
) {
    let mut last = 0;
    tokio::pin!(shutdown);
    loop {
        if let Err(err) = catch_up(&pool, &key_prefix, &list, &mut last).await {
            tracing::debug!(%err, "cannot read the revocation cutoffs; retrying");
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

    fn claims(user_id: i64, iat_ms: i64) -> Claims {
        Claims {
            token_type: TokenType::Access,
            exp: iat_ms / 1000 + 300,
            iat: iat_ms / 1000,
            iat_ms: Some(iat_ms),
            jti: "j".into(),
            user_id,
            username: "u".into(),
            is_staff: false,
        }
    }

    #[test]
    fn tokens_issued_up_to_the_cutoff_are_revoked_and_later_ones_are_not() {
        let list = RevokedBefore::new(300, 5);
        let mut changes = list.changes();
        let now = now_ms();
        list.record(7, now);
        assert!(changes.has_changed().unwrap(), "a raised cutoff is told");
        changes.mark_unchanged();
        assert!(list.is_revoked(&claims(7, now - 1)));
        assert!(
            list.is_revoked(&claims(7, now)),
            "the logout's own millisecond is covered"
        );
        assert!(
            !list.is_revoked(&claims(7, now + 1)),
            "a token of the next millisecond, even in the same second, is not"
        );
        assert!(!list.is_revoked(&claims(8, now - 1)), "another user");
        // A cutoff is never lowered, and lowering is not a change.
        list.record(7, now - 100);
        assert!(list.is_revoked(&claims(7, now - 1)));
        assert!(!changes.has_changed().unwrap());
        // Cutoffs older than any acceptable token are forgotten.
        list.record(9, now - 1_000_000);
        assert!(list.cutoff(9).is_none());
    }

    #[test]
    fn a_token_without_milliseconds_counts_from_the_start_of_its_second() {
        let list = RevokedBefore::new(300, 5);
        let now = now_ms();
        list.record(7, now);
        let mut claims = claims(7, now + 1);
        claims.iat_ms = None;
        claims.iat = now.div_euclid(1000);
        assert!(
            list.is_revoked(&claims),
            "without `iat_ms` the token may be from before the logout"
        );
    }
}
