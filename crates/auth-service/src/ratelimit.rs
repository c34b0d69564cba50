//! Failed-login counters in Redis, per username and per client address, shared by every replica.
//!
//! Checking a counter and counting the attempt are one atomic step: every attempt first takes a
//! slot ([`LoginLimiter::reserve`]: `INCR` of both counters in one `MULTI`, the window set by the
//! first), and is evaluated only if neither count went past its maximum. A failure keeps its
//! slot; a success gives the username's counter back (it is deleted) and the address's slot
//! ([`LoginLimiter::succeeded`]). Checking first and counting after the password check, as
//! before, let 40 simultaneous guesses all be evaluated against a limit of 5, because each one
//! read the counter before any had failed. Refused attempts keep their slot too: they are
//! guesses, and the window is never extended by them (`EXPIRE … NX`).
//!
//! When Redis is unreachable the limiter lets logins through and counts the outage in a metric:
//! the argon2 cost and the login concurrency bound ([`crate::routes::LoginGate`]) still slow
//! guessing, and an outage of the cache should not lock every user out.
//!
//! The embedded single-process mode has no Redis: there the counters live in this process's
//! memory ([`Counters::Memory`]), with the same keys, windows and answers, under one lock. One
//! process is the whole deployment there, so nothing needs sharing.

use std::collections::HashMap;
use std::net::IpAddr;
#[cfg(test)]
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use deadpool_redis::redis as redis_client;
use prometheus::IntCounterVec;
use service_kit::error::ApiError;
use service_kit::redis::{self, RedisPool};

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

    /// Counts this attempt, and refuses it with 429 and the seconds left when that takes either
    /// counter past its maximum.
    pub async fn reserve(&self, username: &str, address: IpAddr) -> Result<(), ApiError> {
        let (user_key, addr_key) = self.keys(username, address);
        let redis_pool = match &self.counters {
            Counters::Redis(pool) => pool,
            Counters::Memory(map) => {
                let mut map = lock(map);
                let now = Instant::now();
                map.retain(|_, (_, until)| *until > now);
                let window = Duration::from_secs(self.window_secs);
                let mut count = |key: String, max: u64| {
                    // The window starts at the first attempt and is never extended.
                    let entry = map.entry(key).or_insert((0, now + window));
                    entry.0 += 1;
                    if entry.0 > max {
                        entry.1.saturating_duration_since(now).as_secs().max(1)
                    } else {
                        0
                    }
                };
                let retry_after =
                    count(user_key, self.max_per_user).max(count(addr_key, self.max_per_address));
                return limited(retry_after);
            }
        };
        let mut pipe = redis_client::pipe();
        // EXPIRE … NX starts the window at the first attempt and never extends it.
        pipe.atomic()
            .incr(&user_key, 1)
            .cmd("EXPIRE")
            .arg(&user_key)
            .arg(self.window_secs)
            .arg("NX")
            .ignore()
            .ttl(&user_key)
            .incr(&addr_key, 1)
            .cmd("EXPIRE")
            .arg(&addr_key)
            .arg(self.window_secs)
            .arg("NX")
            .ignore()
            .ttl(&addr_key);
        let result: Result<(u64, i64, u64, i64), _> = redis::query(redis_pool, &pipe).await;
        let (user_count, user_ttl, addr_count, addr_ttl) = match result {
            Ok(values) => values,
            Err(err) => {
                self.errors.with_label_values(&["reserve"]).inc();
                tracing::warn!(%err, "login rate limit unavailable; allowing the attempt");
                return Ok(());
            }
        };
        let mut retry_after = 0;
        if user_count > self.max_per_user {
            retry_after = retry_after.max(ttl_or_window(user_ttl, self.window_secs));
        }
        if addr_count > self.max_per_address {
            retry_after = retry_after.max(ttl_or_window(addr_ttl, self.window_secs));
        }
        limited(retry_after)
    }

    /// A successful login: the username's counter is cleared, and the address's slot given back
    /// (one address guessing many accounts stays limited by its failures).
    pub async fn succeeded(&self, username: &str, address: IpAddr) {
        self.give_back(username, address, true).await
    }

    /// An attempt that was counted but not evaluated (the server was too busy): both slots are
    /// given back, so an overloaded server never locks a user out.
    pub async fn not_evaluated(&self, username: &str, address: IpAddr) {
        self.give_back(username, address, false).await
    }

    async fn give_back(&self, username: &str, address: IpAddr, clear_user: bool) {
        let (user_key, addr_key) = self.keys(username, address);
        let redis_pool = match &self.counters {
            Counters::Redis(pool) => pool,
            Counters::Memory(map) => {
                let mut map = lock(map);
                if clear_user {
                    map.remove(&user_key);
                }
                let keys = if clear_user {
                    vec![addr_key]
                } else {
                    vec![user_key, addr_key]
                };
                for key in keys {
                    if let Some(entry) = map.get_mut(&key) {
                        entry.0 = entry.0.saturating_sub(1);
                    }
                }
                return;
            }
        };
        let mut pipe = redis_client::pipe();
        pipe.atomic();
        if clear_user {
            pipe.cmd("DEL").arg(&user_key).ignore();
        } else {
            decrement_existing(&mut pipe, &user_key);
        }
        decrement_existing(&mut pipe, &addr_key);
        if let Err(err) = redis::query::<()>(redis_pool, &pipe).await {
            self.errors.with_label_values(&["give_back"]).inc();
            tracing::warn!(%err, "cannot give a login attempt back to its counters");
        }
    }
}

/// `DECR` only if the key still exists: a counter whose window ended meanwhile must not come
/// back as -1 without an expiry.
fn decrement_existing(pipe: &mut redis_client::Pipeline, key: &str) {
    pipe.cmd("EVAL")
        .arg("if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('DECR', KEYS[1]) end return 0")
        .arg(1)
        .arg(key)
        .ignore();
}

fn limited(retry_after_secs: u64) -> Result<(), ApiError> {
    if retry_after_secs > 0 {
        Err(ApiError::RateLimited { retry_after_secs })
    } else {
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter() -> Arc<LoginLimiter> {
        Arc::new(LoginLimiter {
            counters: Counters::memory(),
            key_prefix: "t:".into(),
            max_per_user: 5,
            max_per_address: 20,
            window_secs: 300,
            errors: IntCounterVec::new(prometheus::Opts::new("e", "e"), &["operation"])
                .expect("a valid metric"),
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parallel_attempts_get_no_more_slots_than_the_limit() {
        let limiter = limiter();
        let address: IpAddr = "127.0.0.1".parse().expect("an address");
        let attempts = (0..40).map(|_| {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.reserve("admin", address).await.is_ok() })
        });
        let mut admitted = 0;
        for attempt in attempts {
            admitted += usize::from(attempt.await.expect("the task ran"));
        }
        assert_eq!(admitted, 5);
    }

    #[tokio::test]
    async fn a_success_gives_the_slots_back() {
        let limiter = limiter();
        let address: IpAddr = "127.0.0.1".parse().expect("an address");
        for _ in 0..4 {
            assert!(limiter.reserve("admin", address).await.is_ok());
        }
        assert!(limiter.reserve("admin", address).await.is_ok());
        limiter.succeeded("admin", address).await;
        for _ in 0..5 {
            assert!(limiter.reserve("admin", address).await.is_ok());
        }
        // The fifth slot of the window is taken; one not evaluated comes back.
        limiter.not_evaluated("admin", address).await;
        assert!(limiter.reserve("admin", address).await.is_ok());
        assert!(matches!(
            limiter.reserve("admin", address).await,
            Err(ApiError::RateLimited { .. })
        ));
    }
}
