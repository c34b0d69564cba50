//! The Redis connection pool. Every call is bounded in time so a Redis that stops answering turns
//! into an error the caller can handle, never a request that hangs.

use std::time::Duration;

use deadpool_redis::redis;
use deadpool_redis::{Config, Pool, PoolConfig, Runtime, Timeouts};

use crate::config::ConfigError;

use clap::Args;
pub use deadpool_redis::Pool as RedisPool;

#[derive(Debug, Clone, Args)]
pub struct RedisArgs {
    /// Redis URL, e.g. `redis://127.0.0.1:6379/0`.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379/0")]
    pub redis_url: String,
    /// Prefix of every Redis key and channel this process uses, so several deployments (or test
    /// runs) can share one Redis.
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "gqlws:")]
    pub redis_key_prefix: String,
    /// Maximum number of pooled Redis connections per process.
    #[arg(long, env = "REDIS_POOL_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub redis_pool_size: u32,
}

/// How long any single Redis operation may take, including getting a connection.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    #[error("redis command failed: {0}")]
    Command(String),
}

/// Builds the pool without connecting; connections are made on first use.
pub fn pool(args: &RedisArgs) -> Result<Pool, ConfigError> {
    let mut config = Config::from_url(args.redis_url.clone());
    config.pool = Some(PoolConfig {
        max_size: args.redis_pool_size as usize,
        timeouts: Timeouts {
            wait: Some(REDIS_TIMEOUT),
            create: Some(REDIS_TIMEOUT),
            recycle: Some(REDIS_TIMEOUT),
        },
        ..PoolConfig::default()
    });
    config
        .create_pool(Some(Runtime::Tokio1))
        .map_err(|err| ConfigError::new("REDIS_URL", err.to_string()))
}

/// Runs one command (or pipeline) on a pooled connection, bounded by [`REDIS_TIMEOUT`].
pub async fn query<T: redis::FromRedisValue>(
    pool: &Pool,
    cmd: &(impl QueryAsync + Sync),
) -> Result<T, RedisError> {
    let work = async {
        let mut conn = pool
            .get()
            .await
            .map_err(|err| RedisError::Unavailable(err.to_string()))?;
        cmd.query_on(&mut conn).await
    };
    tokio::time::timeout(REDIS_TIMEOUT, work)
        .await
        .map_err(|_| RedisError::Unavailable("timed out".into()))?
}

/// `PING`, for `/readyz`.
pub async fn ping(pool: &Pool) -> Result<(), RedisError> {
    query::<String>(pool, &redis::cmd("PING")).await.map(|_| ())
}

/// Lets [`query`] take both a single command and a pipeline.
pub trait QueryAsync {
    fn query_on<T: redis::FromRedisValue>(
        &self,
        conn: &mut deadpool_redis::Connection,
    ) -> impl std::future::Future<Output = Result<T, RedisError>> + Send;
}

impl QueryAsync for redis::Cmd {
    async fn query_on<T: redis::FromRedisValue>(
        &self,
        conn: &mut deadpool_redis::Connection,
    ) -> Result<T, RedisError> {
        self.query_async(conn).await.map_err(|err| classify(&err))
    }
}

impl QueryAsync for redis::Pipeline {
    async fn query_on<T: redis::FromRedisValue>(
        &self,
        conn: &mut deadpool_redis::Connection,
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
