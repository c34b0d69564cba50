//! The database settings.

use std::time::Duration;

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// Database URL: PostgreSQL (`postgres://user@127.0.0.1:5432/app`) or an SQLite file
    /// (`sqlite://./data/gqlws.db`, the embedded mode's storage).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// Maximum number of pooled database connections per process.
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub database_pool_size: u32,
    /// How long a request waits for a pooled connection before failing, in seconds.
    #[arg(long, env = "DATABASE_TIMEOUT_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub database_timeout_secs: u64,
}

impl DatabaseArgs {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.database_timeout_secs)
    }
}
