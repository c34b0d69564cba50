//! The Redis connection pool, to one server or to a Redis Cluster. Every call is bounded in time
//! so a Redis that stops answering turns into an error the caller can handle, never a request
//! that hangs.
//!
//! In cluster mode a command goes to the primary of its key's slot and redirections (`MOVED`,
//! `ASK`) and failovers are followed by the client. A command or pipeline over several keys must
//! keep them in one slot: the process's own keys ([`RedisArgs::key_prefix`]) share one hash tag,
//! and the event logs carry one per partition (`events::redis`).

use std::time::Duration;

use deadpool_redis::redis;
use deadpool_redis::{Config, PoolConfig, Runtime, Timeouts};

use crate::config::ConfigError;

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct RedisArgs {
    /// Redis URL, e.g. `redis://127.0.0.1:6379/0`; with REDIS_CLUSTER, one or more nodes of the
    /// cluster, comma-separated (`redis://10.0.0.1:7000,redis://10.0.0.2:7000`): the rest are
    /// found from them.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379/0")]
    pub redis_url: String,
    /// Talk to a Redis Cluster (ElastiCache or Memorystore in cluster mode, or `redis-server
    /// --cluster-enabled yes`) rather than one server.
    #[arg(long, env = "REDIS_CLUSTER", default_value_t = false, action = clap::ArgAction::Set)]
    pub redis_cluster: bool,
    /// Prefix of every Redis key and channel this process uses, so several deployments (or test
    /// runs) can share one Redis.
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "gqlws:")]
    pub redis_key_prefix: String,
    /// Maximum number of pooled Redis connections per process.
    #[arg(long, env = "REDIS_POOL_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub redis_pool_size: u32,
}

impl RedisArgs {
    /// The URLs of REDIS_URL: one, or in cluster mode the seed nodes.
    pub fn urls(&self) -> Vec<String> {
        self.redis_url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The prefix of this process's own keys (rate limits, logout cutoffs, persisted queries,
    /// sockets per user): REDIS_KEY_PREFIX, in cluster mode as a hash tag (`{gqlws:}`) so that
    /// the scripts and pipelines over several of them find them in one slot. The event logs are
    /// laid out by `events::redis` from REDIS_KEY_PREFIX itself.
    pub fn key_prefix(&self) -> String {
        if self.redis_cluster {
            format!("{{{}}}", self.redis_key_prefix)
        } else {
            self.redis_key_prefix.clone()
        }
    }

    fn check(&self) -> Result<(), ConfigError> {
        let urls = self.urls();
        if urls.is_empty() {
            return Err(ConfigError::new("REDIS_URL", "no URL given"));
        }
        if urls.len() > 1 && !self.redis_cluster {
            return Err(ConfigError::new(
                "REDIS_URL",
                "several URLs are the seed nodes of a Redis Cluster: set REDIS_CLUSTER=true, \
                 or give one URL",
            ));
        }
        if self.redis_cluster && self.redis_key_prefix.contains(['{', '}']) {
            return Err(ConfigError::new(
                "REDIS_KEY_PREFIX",
                "must not hold `{` or `}` with REDIS_CLUSTER: the keys' hash tags are made from it",
            ));
        }
        Ok(())
    }
}

/// How long any single Redis operation may take, including getting a connection.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Pooled connections to one Redis server, or to a Redis Cluster (each pooled connection then
/// reaches every node it needs). Cheap to clone.
#[derive(Clone)]
pub enum RedisPool {
    Single(deadpool_redis::Pool),
    Cluster(deadpool_redis::cluster::Pool),
}

impl RedisPool {
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisPool::Cluster(_))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    #[error("redis command failed: {0}")]
    Command(String),
}

/// Builds the pool without connecting; connections are made on first use.
pub fn pool(args: &RedisArgs) -> Result<RedisPool, ConfigError> {
    args.check()?;
    let pool_config = PoolConfig {
        max_size: args.redis_pool_size as usize,
        timeouts: Timeouts {
            wait: Some(REDIS_TIMEOUT),
            create: Some(REDIS_TIMEOUT),
            recycle: Some(REDIS_TIMEOUT),
        },
        ..PoolConfig::default()
    };
    let invalid = |err: &dyn std::fmt::Display| ConfigError::new("REDIS_URL", err.to_string());
    if args.redis_cluster {
        let mut config = deadpool_redis::cluster::Config::from_urls(args.urls());
        config.pool = Some(pool_config);
        return config
            .create_pool(Some(Runtime::Tokio1))
            .map(RedisPool::Cluster)
            .map_err(|err| invalid(&err));
    }
    let mut config = Config::from_url(args.redis_url.clone());
    config.pool = Some(pool_config);
    config
        .create_pool(Some(Runtime::Tokio1))
        .map(RedisPool::Single)
        .map_err(|err| invalid(&err))
}

/// Runs one command (or pipeline) on a pooled connection, bounded by [`REDIS_TIMEOUT`].
pub async fn query<T: redis::FromRedisValue>(
    pool: &RedisPool,
    cmd: &(impl QueryAsync + Sync),
) -> Result<T, RedisError> {
    let unavailable = |err: &dyn std::fmt::Display| RedisError::Unavailable(err.to_string());
    let work = async {
        match pool {
            RedisPool::Single(pool) => {
                let mut conn = pool.get().await.map_err(|err| unavailable(&err))?;
                cmd.query_on(&mut *conn).await
            }
            RedisPool::Cluster(pool) => {
                let mut conn = pool.get().await.map_err(|err| unavailable(&err))?;
                cmd.query_on(&mut *conn).await
            }
        }
    };
    bounded(work).await
}

/// `work`, or `Unavailable` once it took [`REDIS_TIMEOUT`].
async fn bounded<T>(
    work: impl std::future::Future<Output = Result<T, RedisError>>,
) -> Result<T, RedisError> {
    tokio::time::timeout(REDIS_TIMEOUT, work)
        .await
        .map_err(|_| RedisError::Unavailable("timed out".into()))?
}

/// Runs `cmd` on the node at `host:port` (in a cluster, through the pool's connection to it; on
/// one server, that server): for a command about a connection of that node, such as
/// `CLIENT UNBLOCK`.
pub async fn query_node(
    pool: &RedisPool,
    host: &str,
    port: u16,
    cmd: &redis::Cmd,
) -> Result<redis::Value, RedisError> {
    let RedisPool::Cluster(cluster) = pool else {
        return query(pool, cmd).await;
    };
    use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
    let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
        host: host.to_owned(),
        port,
    });
    let work = async {
        let mut conn = cluster
            .get()
            .await
            .map_err(|err| RedisError::Unavailable(err.to_string()))?;
        conn.route_command(cmd.clone(), routing)
            .await
            .map_err(|err| classify(&err))
    };
    bounded(work).await
}

/// `PING`, for `/readyz`.
pub async fn ping(pool: &RedisPool) -> Result<(), RedisError> {
    query::<String>(pool, &redis::cmd("PING")).await.map(|_| ())
}

/// Lets [`query`] take both a single command and a pipeline.
pub trait QueryAsync {
    fn query_on<T: redis::FromRedisValue>(
        &self,
        conn: &mut (impl redis::aio::ConnectionLike + Send),
    ) -> impl std::future::Future<Output = Result<T, RedisError>> + Send;
}

impl QueryAsync for redis::Cmd {
    async fn query_on<T: redis::FromRedisValue>(
        &self,
        conn: &mut (impl redis::aio::ConnectionLike + Send),
    ) -> Result<T, RedisError> {
        self.query_async(conn).await.map_err(|err| classify(&err))
    }
}

impl QueryAsync for redis::Pipeline {
    async fn query_on<T: redis::FromRedisValue>(
        &self,
        conn: &mut (impl redis::aio::ConnectionLike + Send),
    ) -> Result<T, RedisError> {
        self.query_async(conn).await.map_err(|err| classify(&err))
    }
}

fn classify(err: &redis::RedisError) -> RedisError {
    if err.is_io_error() || err.is_connection_dropped() || err.is_connection_refusal() {
        RedisError::Unavailable(err.to_string())
    } else {
        RedisError::Command(err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: &str, cluster: bool, prefix: &str) -> RedisArgs {
        RedisArgs {
            redis_url: url.to_owned(),
            redis_cluster: cluster,
            redis_key_prefix: prefix.to_owned(),
            redis_pool_size: 2,
        }
    }

    #[test]
    fn seed_lists_need_cluster_mode_and_cluster_prefixes_make_one_hash_tag() {
        let seeds = "redis://127.0.0.1:7101, redis://127.0.0.1:7102";
        let refusal = |args: RedisArgs| pool(&args).err().map(|err| err.to_string());
        let err = refusal(args(seeds, false, "gqlws:"));
        assert!(
            err.as_deref()
                .is_some_and(|err| err.contains("REDIS_CLUSTER=true")),
            "{err:?}"
        );
        let cluster = args(seeds, true, "gqlws:");
        assert_eq!(cluster.urls().len(), 2);
        assert!(pool(&cluster).is_ok_and(|pool| pool.is_cluster()));
        assert_eq!(cluster.key_prefix(), "{gqlws:}");
        assert_eq!(args(seeds, false, "gqlws:").key_prefix(), "gqlws:");
        let err = refusal(args(seeds, true, "a{b}:"));
        assert!(
            err.as_deref()
                .is_some_and(|err| err.contains("REDIS_KEY_PREFIX")),
            "{err:?}"
        );
        assert!(pool(&args(" ", false, "gqlws:")).is_err());
    }
}
