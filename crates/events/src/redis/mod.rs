//! The logs on Redis, one server or a Redis Cluster. The stream format (an entry's one field,
//! `e`, holding the envelope) is written and read here and nowhere else.
//!
//! The layout ([`Layout`]): each event type's log is split into EVENT_LOG_PARTITIONS
//! partitions, a stream each; an event is in the partition of its record
//! ([`crate::partition_of`]). On one server with one partition (the default) a log is the one
//! stream `<REDIS_KEY_PREFIX>events:<type>`. Otherwise partition `p` is
//! `<prefix>events:{<prefix>p<p>.<n>}:<type>`: the hash tag puts every type's partition `p` in
//! one slot of a cluster, so that one `XREAD` reads them all, and `n` (the first that does) puts
//! that slot in the `p`-th of `P` equal ranges of the 16,384 slots, so that the partitions spread
//! over the shards as evenly as a cluster spreads its slots ([`Layout::tag`]). The revocation
//! announcements are `<prefix>auth:revoked`, in a cluster `<prefix>auth:{<tag of p0>}:revoked`
//! (read with partition 0). Entry ids are the events' positions, the same for every gateway.
//!
//! A follower is fed by one connection per partition ([`follow`]), not per subscriber.

mod follow;
mod reply;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use deadpool_redis::redis;
use deadpool_redis::redis::Value;
use futures_util::future::BoxFuture;
use service_kit::redis::{RedisArgs, RedisPool};
use tokio::sync::OnceCell;

use crate::envelope::EventType;
use crate::log::{EventLog, Follower, History, LogError, REVOCATION_EVENT, REVOCATION_RETENTION};
use crate::position::{partition_of, Position, Retention, MAX_PARTITIONS};
use crate::registry::Registry;
use reply::{entries_of, pairs, text};

const REDIS_TIMEOUT: Duration = Duration::from_secs(3);
/// Entries per `XREAD` and per page of a history.
const READ_COUNT: usize = 512;

/// The field of a stream entry that holds the envelope.
pub const ENTRY_FIELD: &str = "e";

/// The log (a Redis stream) of an event type on one server with one partition:
/// `<REDIS_KEY_PREFIX>events:<type>`, e.g. `gqlws:events:car.updated`.
pub fn channel(key_prefix: &str, event_type: &str) -> String {
    format!("{key_prefix}events:{event_type}")
}

/// The stream on which auth-service announces revoked sessions (a blacklisted refresh token)
/// on one server; gateways read it with the event logs and close that user's sockets at once.
/// `<REDIS_KEY_PREFIX>auth:revoked`, trimmed to [`REVOCATION_RETENTION`] entries.
pub fn revocation_channel(key_prefix: &str) -> String {
    format!("{key_prefix}auth:revoked")
}

/// The Redis string naming the logs' epoch: a random value set (`SET NX`) by the first gateway
/// that finds none. A Redis that lost its data loses it too, and the next one set tells every
/// gateway (and every cursor) that the history before it is gone.
pub fn epoch_key(key_prefix: &str) -> String {
    format!("{key_prefix}events:epoch")
}

/// The Redis string recording how many partitions the logs are split into, set (`SET NX`) by
/// the first process that writes or follows them: a process configured otherwise refuses to,
/// rather than write where nobody reads.
pub fn partitions_key(key_prefix: &str) -> String {
    format!("{key_prefix}events:partitions")
}

/// The `CLIENT SETNAME` of a gateway's event connections: `<prefix>gateway-events` (Redis names
/// cannot hold spaces or newlines; such characters of a prefix become `_`).
pub fn events_connection_name(key_prefix: &str) -> String {
    format!("{key_prefix}gateway-events")
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .collect()
}

/// Where the logs are: the keys of each partition and of the announcements.
#[derive(Debug, Clone)]
pub struct Layout {
    key_prefix: String,
    partitions: u16,
    /// A Redis Cluster: every key a command reads with others carries a hash tag.
    cluster: bool,
    /// Each partition's hash tag.
    tags: Arc<[String]>,
}

impl Layout {
    /// One server, one partition: the stream names of a log that was never split.
    pub fn single(key_prefix: impl Into<String>) -> Self {
        Self::new(key_prefix, 1, false)
    }

    pub fn new(key_prefix: impl Into<String>, partitions: u16, cluster: bool) -> Self {
        let key_prefix = key_prefix.into();
        let partitions = partitions.clamp(1, MAX_PARTITIONS);
        let tags = (0..partitions)
            .map(|partition| Self::tag(&key_prefix, partition, partitions))
            .collect();
        Self {
            key_prefix,
            partitions,
            cluster,
            tags,
        }
    }

    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    /// The hash tag of `partition` of `partitions`: `<prefix>p<partition>.<n>` with the first
    /// `n` whose slot is in the `partition`-th of `partitions` equal ranges of the slots.
    fn tag(prefix: &str, partition: u16, partitions: u16) -> String {
        let wanted = u32::from(partition);
        (0..1_000_000u32)
            .map(|n| format!("{prefix}p{partition}.{n}"))
            .find(|tag| u32::from(slot(tag)) * u32::from(partitions) / SLOTS == wanted)
            // Not reached (a range holds at least 64 slots, and CRC16 spreads): any tag works.
            .unwrap_or_else(|| format!("{prefix}p{partition}"))
    }

    /// `partition` of `event_type`'s log.
    pub fn log_key(&self, event_type: &str, partition: u16) -> String {
        let prefix = &self.key_prefix;
        if self.partitions == 1 && !self.cluster {
            return channel(prefix, event_type);
        }
        let tag = self
            .tags
            .get(usize::from(partition))
            .map_or("", String::as_str);
        format!("{prefix}events:{{{tag}}}:{event_type}")
    }

    /// The event type's name in a key of `partition` ([`Layout::log_key`]'s inverse).
    fn log_name<'k>(&self, key: &'k str, partition: u16) -> Option<&'k str> {
        key.strip_prefix(&self.log_key("", partition))
    }

    /// The revocation announcements, read with partition 0.
    pub fn revocation_key(&self) -> String {
        let prefix = &self.key_prefix;
        if self.cluster {
            format!("{prefix}auth:{{{}}}:revoked", self.tags[0])
        } else {
            revocation_channel(prefix)
        }
    }
}

/// Slots of a Redis Cluster.
const SLOTS: u32 = 16_384;

/// The cluster slot of a hash tag: CRC16 (XMODEM) modulo 16,384, as Redis computes it.
fn slot(tag: &str) -> u16 {
    let mut crc: u16 = 0;
    for byte in tag.bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    (u32::from(crc) % SLOTS) as u16
}

/// Appends with `XADD <log key> MAXLEN ~ <count> * e <envelope>` (and trims by age) on the
/// shared pool; follows on connections of its own, one per partition.
#[derive(Clone)]
pub struct RedisLog {
    pool: RedisPool,
    layout: Layout,
    retention: Retention,
    /// Decodes an event to find its partition; none with one partition.
    registry: Option<Registry>,
    /// Where a follower connects (in a cluster, the seed nodes); none for a process that only
    /// appends and reads back.
    seeds: Vec<redis::Client>,
    /// Set once the partition count is known to match the one in Redis.
    agreed: Arc<OnceCell<()>>,
    /// Replicas that must acknowledge an append (EVENT_LOG_REPLICA_ACKS).
    replica_acks: u16,
}

/// How long an append waits for its replicas' acknowledgement: replication on a healthy network
/// takes well under a millisecond, and a shard without a replica (its primary just promoted,
/// the old one gone) must not cost every write much.
const REPLICA_WAIT: Duration = Duration::from_millis(200);

impl RedisLog {
    /// The logs of REDIS_KEY_PREFIX in one partition (a log that was never split).
    pub fn new(pool: RedisPool, key_prefix: impl Into<String>) -> Self {
        let cluster = pool.is_cluster();
        Self {
            pool,
            layout: Layout::new(key_prefix, 1, cluster),
            retention: Retention::default(),
            registry: None,
            seeds: Vec::new(),
            agreed: Arc::new(OnceCell::new()),
            replica_acks: 0,
        }
    }

    /// The logs as REDIS_* say, followed from REDIS_URL's node(s).
    pub fn from_args(pool: RedisPool, args: &RedisArgs) -> Result<Self, String> {
        let mut log = Self::new(pool, args.redis_key_prefix.clone());
        log.seeds = args
            .urls()
            .iter()
            .map(|url| redis::Client::open(url.as_str()).map_err(|err| err.to_string()))
            .collect::<Result<_, _>>()?;
        Ok(log)
    }

    pub fn with_retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// Split into `partitions` (EVENT_LOG_PARTITIONS); `registry` finds each event's record.
    pub fn partitioned(mut self, partitions: u16, registry: Registry) -> Self {
        self.layout = Layout::new(
            self.layout.key_prefix.clone(),
            partitions,
            self.layout.cluster,
        );
        self.registry = Some(registry);
        self
    }

    /// Appends count once `replicas` replicas hold them (EVENT_LOG_REPLICA_ACKS).
    pub fn acknowledged_by(mut self, replicas: u16) -> Self {
        self.replica_acks = replicas;
        self
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The stream an event of `event_type` with `payload` is appended to: for a writer that
    /// pipelines many appends ([`push_append`]; in a cluster, one pipeline per stream).
    pub fn key_of(&self, event_type: &str, payload: &str) -> String {
        self.key(event_type, self.partition(event_type, payload))
    }

    fn key(&self, event_type: &str, partition: u16) -> String {
        match event_type {
            REVOCATION_EVENT => self.layout.revocation_key(),
            _ => self.layout.log_key(event_type, partition),
        }
    }

    /// The partition of an event of `event_type` with `payload`: its record's. An envelope this
    /// process cannot decode goes to partition 0, where every follower still reads it.
    fn partition(&self, event_type: &str, payload: &str) -> u16 {
        let Some(registry) = self
            .registry
            .as_ref()
            .filter(|_| self.layout.partitions > 1)
        else {
            return 0;
        };
        let Some(kind) = registry.get(event_type) else {
            return 0;
        };
        registry
            .decode(kind, payload.as_bytes())
            .map_or(0, |envelope| {
                partition_of(&registry.keys(kind, &envelope.data), self.layout.partitions)
            })
    }

    /// Records the partition count in Redis, or checks it against the one recorded there.
    async fn agree(&self) -> Result<(), String> {
        self.agreed
            .get_or_try_init(|| async {
                let key = partitions_key(&self.layout.key_prefix);
                let mut pipe = redis::pipe();
                pipe.cmd("SET")
                    .arg(&key)
                    .arg(self.layout.partitions)
                    .arg("NX")
                    .ignore()
                    .cmd("GET")
                    .arg(&key);
                let (recorded,): (u16,) = service_kit::redis::query(&self.pool, &pipe)
                    .await
                    .map_err(|err| err.to_string())?;
                if recorded != self.layout.partitions {
                    return Err(format!(
                        "EVENT_LOG_PARTITIONS is {} here, but the logs in Redis are split into \
                         {recorded} ({key}); give every process the same count",
                        self.layout.partitions
                    ));
                }
                Ok(())
            })
            .await
            .map(|_| ())
    }
}

/// `XADD` of one envelope to `key`, trimmed to `retention` in the same round trip.
pub fn append_command(key: &str, payload: &str, retention: Retention) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    push_append(&mut pipe, key, payload, retention);
    pipe
}

/// Adds the `XADD` of one envelope to `key` (and its trim) to `pipe`: for a writer that sends
/// many at once (loadgen), in the format this module alone writes and reads. In a cluster, a
/// pipeline holds the keys of one partition only.
pub fn push_append(pipe: &mut redis::Pipeline, key: &str, payload: &str, retention: Retention) {
    pipe.cmd("XADD")
        .arg(key)
        .arg("MAXLEN")
        .arg("~")
        .arg(retention.count)
        .arg("*")
        .arg(ENTRY_FIELD)
        .arg(payload);
    if retention.max_age_secs > 0 {
        let oldest = (Utc::now().timestamp_millis().max(0) as u64)
            .saturating_sub(retention.max_age_secs.saturating_mul(1000));
        pipe.cmd("XTRIM")
            .arg(key)
            .arg("MINID")
            .arg("~")
            .arg(oldest)
            .ignore();
    }
}

impl EventLog for RedisLog {
    fn append<'a>(
        &'a self,
        event_type: &'a str,
        payload: &'a str,
    ) -> BoxFuture<'a, Result<(), LogError>> {
        Box::pin(async move {
            // (The announcements are laid out the same whatever the partitions.)
            let retention = match event_type {
                REVOCATION_EVENT => REVOCATION_RETENTION,
                _ => {
                    self.agree().await.map_err(LogError::Unavailable)?;
                    self.retention
                }
            };
            let key = self.key_of(event_type, payload);
            let mut pipe = append_command(&key, payload, retention);
            if self.replica_acks == 0 {
                return service_kit::redis::query::<(String,)>(&self.pool, &pipe)
                    .await
                    .map(|_id| ())
                    .map_err(|err| LogError::Unavailable(err.to_string()));
            }
            // In the XADD's pipeline, so on its node (a cluster routes a pipeline by its key).
            pipe.cmd("WAIT")
                .arg(self.replica_acks)
                .arg(REPLICA_WAIT.as_millis() as u64);
            let (_id, acks): (String, u16) = service_kit::redis::query(&self.pool, &pipe)
                .await
                .map_err(|err| LogError::Unavailable(err.to_string()))?;
            if acks < self.replica_acks {
                // It is in the log: publishing it again would only append a duplicate. Whether
                // a failover can lose it is what the operator learns here (a shard without a
                // replica, or one lagging).
                tracing::warn!(
                    acks,
                    wanted = self.replica_acks,
                    key,
                    "an event was published that not enough replicas acknowledged within {} ms; \
                     a failover of this shard now could lose it",
                    REPLICA_WAIT.as_millis()
                );
            }
            Ok(())
        })
    }

    fn partitions(&self) -> u16 {
        self.layout.partitions
    }

    fn history<'a>(
        &'a self,
        event_type: EventType,
        partition: u16,
        after: Position,
    ) -> BoxFuture<'a, Result<History, LogError>> {
        Box::pin(async move {
            history(&self.pool, &self.key(event_type.as_str(), partition), after)
                .await
                .map_err(LogError::Unavailable)
        })
    }

    fn follow(&self, follower: Arc<dyn Follower>) -> BoxFuture<'static, ()> {
        let log = self.clone();
        Box::pin(async move {
            if log.seeds.is_empty() {
                tracing::error!("this Redis log was built without a URL to follow it from");
                return;
            }
            follow::follow(log, follower).await
        })
    }
}

/// Where a stream stands: the last id it gave, even when that entry was trimmed since (`0-0`
/// for one never written), so that a follower starting there sees a gap only where entries it
/// has not read are gone.
async fn stream_tip(pool: &RedisPool, key: &str) -> Result<Position, String> {
    Ok(last_generated(pool, key).await?.unwrap_or_default())
}

/// Whether the log still holds everything it was given after `after`: as a history's
/// [`anchored`], or `after` is the last id it gave (its entry trimmed by age, nothing since).
async fn whole_after(pool: &RedisPool, key: &str, after: Position) -> Result<bool, String> {
    Ok(anchored(pool, key, after).await? || last_generated(pool, key).await? == Some(after))
}

/// A log's entries after `after` and whether none was trimmed away since. Redis trims from the
/// oldest end, so the history is whole when the cursor's own entry is still there, or when the
/// cursor is the last id the log ever gave (trimmed by age, with nothing after it), or when the
/// cursor is at the start (0-0: a partition where its subscriber had seen nothing) of a log
/// nothing was trimmed from.
///
/// Those are looked up first: a position the log does not hold (trimmed, or made up) is
/// answered at the cost of two lookups, without reading what follows it, so forged cursors
/// cannot make the gateway read the whole log each. It is looked up again after
/// the read, so that a trim racing with the read counts. (`max-deleted-entry-id` would say it
/// directly, but Redis 7.0 does not raise it when trimming.)
async fn history(pool: &RedisPool, key: &str, after: Position) -> Result<History, String> {
    if !anchored(pool, key, after).await? {
        let last = last_generated(pool, key).await?;
        return Ok(History {
            covered: last == Some(after),
            entries: Vec::new(),
        });
    }
    let mut entries = Vec::new();
    let mut from = after;
    loop {
        let mut range = redis::cmd("XRANGE");
        range
            .arg(key)
            .arg(format!("({from}"))
            .arg("+")
            .arg("COUNT")
            .arg(READ_COUNT);
        let page = entries_of(
            service_kit::redis::query::<Value>(pool, &range)
                .await
                .map_err(|err| err.to_string())?,
        );
        let full = page.len() == READ_COUNT;
        for (position, payload) in page {
            from = position;
            entries.push((position, Arc::from(String::from_utf8_lossy(&payload))));
        }
        if !full {
            break;
        }
    }
    let covered = anchored(pool, key, after).await?;
    Ok(History { covered, entries })
}

/// Whether what the log holds after `after` is all it was given after it: the log still holds
/// the entry at `after`, or `after` is its start (0-0, a partition the cursor's subscriber had
/// seen nothing of) and nothing was ever removed from it.
async fn anchored(pool: &RedisPool, key: &str, after: Position) -> Result<bool, String> {
    if after != Position::ZERO {
        return has_entry(pool, key, after).await;
    }
    Ok(match stream_info(pool, key).await? {
        // Never written to (trimming keeps the key of an emptied stream).
        None => true,
        Some(info) => {
            let count = |field: &str| {
                info.iter()
                    .find(|(name, _)| name == field)
                    .and_then(|(_, value)| match value {
                        Value::Int(n) => Some(*n),
                        _ => None,
                    })
            };
            matches!((count("entries-added"), count("length")), (Some(added), Some(length)) if added == length)
        }
    })
}

/// `XINFO STREAM` as (field, value) pairs, or `None` when the log does not exist.
async fn stream_info(pool: &RedisPool, key: &str) -> Result<Option<Vec<(String, Value)>>, String> {
    let mut info = redis::cmd("XINFO");
    info.arg("STREAM").arg(key);
    match service_kit::redis::query::<Value>(pool, &info).await {
        Ok(info) => Ok(Some(pairs(&info))),
        Err(service_kit::redis::RedisError::Command(_)) => Ok(None),
        Err(err) => Err(err.to_string()),
    }
}

/// The last id the log gave, if the log exists.
async fn last_generated(pool: &RedisPool, key: &str) -> Result<Option<Position>, String> {
    Ok(stream_info(pool, key).await?.and_then(|info| {
        info.into_iter()
            .find(|(field, _)| field == "last-generated-id")
            .and_then(|(_, value)| text(&value))
            .and_then(|text| Position::parse(&text))
    }))
}

/// Whether the log holds an entry at `position`.
async fn has_entry(pool: &RedisPool, key: &str, position: Position) -> Result<bool, String> {
    let mut anchor = redis::cmd("XRANGE");
    anchor
        .arg(key)
        .arg(position.to_string())
        .arg(position.to_string());
    let reply = service_kit::redis::query::<Value>(pool, &anchor)
        .await
        .map_err(|err| err.to_string())?;
    Ok(!entries_of(reply).is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_key_names_its_event_type_and_nothing_else_does() {
        let single = Layout::single("p:");
        let key = single.log_key("thing.updated", 0);
        assert_eq!(key, channel("p:", "thing.updated"));
        assert_eq!(single.log_name(&key, 0), Some("thing.updated"));
        assert_eq!(single.log_name(&single.revocation_key(), 0), None);
        assert_eq!(Layout::single("q:").log_name(&key, 0), None);
        let split = Layout::new("p:", 4, true);
        let key = split.log_key("thing.updated", 3);
        assert!(key.starts_with("p:events:{p:p3."), "{key}");
        assert_eq!(split.log_name(&key, 3), Some("thing.updated"));
        assert_eq!(split.log_name(&key, 2), None);
        // Read in one XREAD with partition 0: the same hash tag.
        let tag0 = &split.tags[0];
        assert_eq!(split.revocation_key(), format!("p:auth:{{{tag0}}}:revoked"));
    }

    #[test]
    fn slots_are_redis_s_and_partitions_take_equal_shares_of_them() {
        // As `CLUSTER KEYSLOT` answers.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("gqlws:p0"), 15822);
        assert_eq!(slot("p3"), 3689);
        for partitions in [1, 3, 6, 16] {
            let layout = Layout::new("gqlws:", partitions, true);
            for (partition, tag) in layout.tags.iter().enumerate() {
                let share = u32::from(slot(tag)) * u32::from(partitions) / SLOTS;
                assert_eq!(share, partition as u32, "{tag}");
            }
        }
    }
}
