//! Authenticated sockets per user, counted across every gateway process
//! (`MAX_CONNECTIONS_PER_USER`), so that adding replicas does not multiply what one account may
//! hold.
//!
//! Each process counts its own sockets in memory, as before, and with Redis also files each one
//! in the user's sorted set `<prefix>gateway:sockets:<user id>` (member `<process>:<n>`, score
//! the time it expires). `connection_init` runs one script: drop the expired members, refuse
//! when the set is full, add the socket. A closed socket is removed at once; a process that
//! dies without closing its sockets leaves members that expire within [`TTL`], because every
//! process renews its live members every [`TTL`] / 3. While Redis cannot be reached the
//! process's own count still holds (fail open across replicas, with a warning and a metric: an
//! outage of Redis should not lock users out).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_redis::redis;
use service_kit::http::{Counted, Tally};
use service_kit::redis::RedisPool;
use tokio_util::sync::CancellationToken;

use crate::lock;

/// How long a socket's entry lives without being renewed.
pub const TTL: Duration = Duration::from_secs(60);

/// The counts: this process's, and the shared one when there is Redis.
pub struct UserSockets {
    local: Arc<Tally<i64>>,
    shared: Option<Arc<SharedCount>>,
}

/// The entries of this process in Redis.
struct SharedCount {
    pool: RedisPool,
    key_prefix: String,
    /// This process's name in the members.
    process: String,
    max: usize,
    next: AtomicU64,
    /// Live members, by member, with their user: renewed by [`renew`].
    live: Mutex<HashMap<String, i64>>,
}

/// A socket's place in the counts; given back when dropped.
pub struct UserSlot {
    _local: Counted<i64>,
    /// Boxed: it lives in every connection's state, which stays small while idle.
    shared: Option<Box<(Arc<SharedCount>, String, i64)>>,
}

/// Drops the expired members, refuses when full, adds the socket:
/// KEYS[1] the user's set; ARGV now (ms), expiry (ms), max, member, ttl (ms).
const ENTER: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
";

impl UserSockets {
    /// `max` of 0 means no bound. With `redis`, the bound holds across every process sharing
    /// the key prefix.
    pub fn new(max: usize, redis: Option<(RedisPool, String)>) -> Self {
        let shared = redis.filter(|_| max > 0).map(|(pool, key_prefix)| {
            let process = tokens::jwt::new_jti();
            Arc::new(SharedCount {
                pool,
                key_prefix,
                process: process[..12].to_owned(),
                max,
                next: AtomicU64::new(0),
                live: Mutex::new(HashMap::new()),
            })
        });
        Self {
            local: Tally::new(max),
            shared,
        }
    }

    pub fn max(&self) -> usize {
        self.local.max()
    }

    /// A place for one more socket of `user_id`, or `None` when the user holds the maximum
    /// (on this process, or on all of them together).
    pub async fn enter(&self, user_id: i64) -> Option<UserSlot> {
        let local = self.local.enter(user_id)?;
        let Some(shared) = &self.shared else {
            return Some(UserSlot {
                _local: local,
                shared: None,
            });
        };
        let member = format!(
            "{}:{}",
            shared.process,
            shared.next.fetch_add(1, Ordering::Relaxed)
        );
        let now = chrono::Utc::now().timestamp_millis();
        let mut enter = redis::cmd("EVAL");
        enter
            .arg(ENTER)
            .arg(1)
            .arg(key(&shared.key_prefix, user_id))
            .arg(now)
            .arg(now + TTL.as_millis() as i64)
            .arg(shared.max)
            .arg(&member)
            .arg(TTL.as_millis() as u64);
        match service_kit::redis::query::<i64>(&shared.pool, &enter).await {
            Ok(0) => return None,
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(%err, "cannot count the user's sockets across gateways; this process's count holds");
                return Some(UserSlot {
                    _local: local,
                    shared: None,
                });
            }
        }
        lock(&shared.live).insert(member.clone(), user_id);
        Some(UserSlot {
            _local: local,
            shared: Some(Box::new((shared.clone(), member, user_id))),
        })
    }

    /// Renews this process's entries until `stop` is cancelled (nothing to do without Redis).
    pub fn spawn_renewal(&self, stop: CancellationToken) {
        if let Some(shared) = self.shared.clone() {
            tokio::spawn(renew(shared, stop));
        }
    }
}

impl UserSlot {
    /// Gives the place back now, in Redis too, before the caller goes on: the socket's user may
    /// open the next one at once (on any gateway).
    pub async fn release(mut self) {
        if let Some(entry) = self.shared.take() {
            let (shared, member, user_id) = *entry;
            lock(&shared.live).remove(&member);
            shared.remove(user_id, &member).await;
        }
    }
}

impl SharedCount {
    async fn remove(&self, user_id: i64, member: &str) {
        let mut remove = redis::cmd("ZREM");
        remove.arg(key(&self.key_prefix, user_id)).arg(member);
        if let Err(err) = service_kit::redis::query::<i64>(&self.pool, &remove).await {
            tracing::debug!(%err, "cannot remove a closed socket's entry; it expires");
        }
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let Some(entry) = self.shared.take() else {
            return;
        };
        let (shared, member, user_id) = *entry;
        lock(&shared.live).remove(&member);
        // Outside a runtime (the process is stopping) the entry simply expires.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { shared.remove(user_id, &member).await });
        }
    }
}

fn key(key_prefix: &str, user_id: i64) -> String {
    format!("{key_prefix}gateway:sockets:{user_id}")
}

/// Every [`TTL`] / 3, moves the expiry of this process's live entries on, a pipeline of at most
/// 1,000 at a time. `XX`: an entry removed meanwhile (its socket closed) is not brought back.
async fn renew(shared: Arc<SharedCount>, stop: CancellationToken) {
    let mut every = tokio::time::interval(TTL / 3);
    every.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let live: Vec<(String, i64)> = lock(&shared.live)
            .iter()
            .map(|(member, user)| (member.clone(), *user))
            .collect();
        let expiry = chrono::Utc::now().timestamp_millis() + TTL.as_millis() as i64;
        for chunk in live.chunks(1000) {
            let mut pipe = redis::pipe();
            for (member, user_id) in chunk {
                let key = key(&shared.key_prefix, *user_id);
                pipe.cmd("ZADD")
                    .arg(&key)
                    .arg("XX")
                    .arg(expiry)
                    .arg(member)
                    .ignore()
                    .cmd("PEXPIRE")
                    .arg(&key)
                    .arg(TTL.as_millis() as u64)
                    .ignore();
            }
            if let Err(err) = service_kit::redis::query::<()>(&shared.pool, &pipe).await {
                tracing::debug!(%err, "cannot renew the sockets' entries; retrying");
                break;
            }
        }
    }
}
