//! Failed-login counters in Redis, per username and per client address, shared by every replica.
//!
//! A failure increments both counters (created with the window as their expiry); a login is
//! refused with 429 while either counter is at its maximum, for the rest of that counter's window.
//! When Redis is unreachable the limiter lets logins through and counts the outage in a metric:
//! the argon2 cost still slows guessing, and an outage of the cache should not lock every user out.
//!
//! The embedded single-process mode has no Redis: there the counters live in this process's
//! memory ([`Counters::Memory`]), with the same keys, windows and answers. One process is the
//! whole deployment there, so nothing needs sharing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::error::ApiError;
use common::redis::{self, RedisPool};
use deadpool_redis::redis as redis_client;
use prometheus::IntCounterVec;

/// Where the failure counters live.
pub enum Counters {
    /// Shared by every replica.
    Redis(RedisPool),
    /// In this process only (the embedded mode): key → (failures, end of the window).
    Memory(Mutex<HashMap<String, (u64, Instant)>>),
}

impl Counters {
    pub fn memory() -> Self {
        Counters::Memory(Mutex::new(HashMap::new()))
    }
}

pub struct LoginLimiter {
    pub counters: Counters,
    pub key_prefix: String,
    pub max_per_user: u64,
    pub max_per_address: u64,
    pub window_secs: u64,
    /// Counts Redis errors by operation, so an outage that disables the limit is visible.
    pub errors: IntCounterVec,
}

impl LoginLimiter {
    fn keys(&self, username: &str, address: IpAddr) -> (String, String) {
        // Usernames are matched case-insensitively here so "Admin" and "admin" share one budget.
        (
            format!(
                "{}auth:login-fail:user:{}",
                self.key_prefix,
                username.to_lowercase()
            ),
            format!("{}auth:login-fail:addr:{}", self.key_prefix, address),
        )
    }

    /// Refuses with 429 and the seconds left when either counter is exhausted.
    pub async fn check(&self, username: &str, address: IpAddr) -> Result<(), ApiError> {
        let (user_key, addr_key) = self.keys(username, address);
        let redis_pool = match &self.counters {
            Counters::Redis(pool) => pool,
            Counters::Memory(map) => {
                let mut map = lock(map);
                let now = Instant::now();
                map.retain(|_, (_, until)| *until > now);
                let left = |key: &str, max: u64| match map.get(key) {
                    Some((count, until)) if *count >= max => {
                        until.saturating_duration_since(now).as_secs().max(1)
                    }
                    _ => 0,
                };
                let retry_after =
                    left(&user_key, self.max_per_user).max(left(&addr_key, self.max_per_address));
                return if retry_after > 0 {
                    Err(ApiError::RateLimited {
                        retry_after_secs: retry_after,
                    })
                } else {
                    Ok(())
                };
            }
        };
        let mut pipe = redis_client::pipe();
        pipe.get(&user_key)
            .ttl(&user_key)
            .get(&addr_key)
            .ttl(&addr_key);
        let result: Result<(Option<u64>, i64, Option<u64>, i64), _> =
            redis::query(redis_pool, &pipe).await;
        let (user_count, user_ttl, addr_count, addr_ttl) = match result {
            Ok(values) => values,
            Err(err) => {
                self.errors.with_label_values(&["check"]).inc();
                tracing::warn!(%err, "login rate limit unavailable; allowing the attempt");
                return Ok(());
            }
        };
        let mut retry_after = 0;
        if user_count.unwrap_or(0) >= self.max_per_user {
            retry_after = retry_after.max(ttl_or_window(user_ttl, self.window_secs));
        }
        if addr_count.unwrap_or(0) >= self.max_per_address {
            retry_after = retry_after.max(ttl_or_window(addr_ttl, self.window_secs));
        }
        if retry_after > 0 {
            Err(ApiError::RateLimited {
                retry_after_secs: retry_after,
            })
        } else {
            Ok(())
        }
    }

    pub async fn record_failure(&self, username: &str, address: IpAddr) {
        let (user_key, addr_key) = self.keys(username, address);
        let redis_pool = match &self.counters {
            Counters::Redis(pool) => pool,
            Counters::Memory(map) => {
                let mut map = lock(map);
                let now = Instant::now();
                let window = Duration::from_secs(self.window_secs);
                for key in [user_key, addr_key] {
                    let entry = map.entry(key).or_insert((0, now + window));
                    // The window starts at the first failure and is never extended (EXPIRE NX).
                    if entry.1 <= now {
                        *entry = (0, now + window);
                    }
                    entry.0 += 1;
                }
                return;
            }
        };
        let mut pipe = redis_client::pipe();
        // EXPIRE … NX starts the window at the first failure and never extends it.
        pipe.atomic()
            .incr(&user_key, 1)
            .ignore()
            .cmd("EXPIRE")
            .arg(&user_key)
            .arg(self.window_secs)
            .arg("NX")
            .ignore()
            .incr(&addr_key, 1)
            .ignore()
            .cmd("EXPIRE")
            .arg(&addr_key)
            .arg(self.window_secs)
            .arg("NX")
            .ignore();
        if let Err(err) = redis::query::<()>(redis_pool, &pipe).await {
            self.errors.with_label_values(&["record"]).inc();
            tracing::warn!(%err, "cannot record failed login");
        }
    }

    /// A successful login clears the username's counter (not the address's: one address guessing
    /// many accounts stays limited).
    pub async fn reset_user(&self, username: &str, address: IpAddr) {
        let (user_key, _) = self.keys(username, address);
        let redis_pool = match &self.counters {
            Counters::Redis(pool) => pool,
            Counters::Memory(map) => {
                lock(map).remove(&user_key);
                return;
            }
        };
        if let Err(err) =
            redis::query::<()>(redis_pool, redis_client::cmd("DEL").arg(&user_key)).await
        {
            self.errors.with_label_values(&["reset"]).inc();
            tracing::warn!(%err, "cannot reset failed-login counter");
        }
    }
}

fn ttl_or_window(ttl: i64, window: u64) -> u64 {
    // -1: the key has no expiry (should not happen, but never lock forever); -2: gone meanwhile.
    if ttl > 0 {
        ttl as u64
    } else {
        window
    }
}

/// A poisoned lock only means another thread panicked while counting; the counts are still usable.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
