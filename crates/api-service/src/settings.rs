//! Every setting of api-service, from flags or the environment (`api-service --help` lists them).

use clap::{Args, Parser, Subcommand};
use events::settings::EventLogArgs;
use service_kit::http::HttpArgs;
use service_kit::redis::RedisArgs;
use service_kit::telemetry::LogArgs;
use store::settings::DatabaseArgs;
use tokens::settings::{JwksArgs, JwtArgs};

#[derive(Debug, Parser)]
#[command(
    name = "api-service",
    version,
    about = "GraphQL queries and mutations over HTTP, with JWT auth; publishes an event per write.",
    // The shared HTTP settings default to auth-service's port; this service listens on :8002.
    mut_arg("listen_addr", |arg| arg.default_value("127.0.0.1:8002"))
)]
pub struct Cli {
    #[command(flatten)]
    pub settings: Settings,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve GraphQL (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Give a car a random make (Skoda, Skoda Autogroup or Skoda (VAG)) through the same write
    /// path as `updateCar`, so subscribers see an update; prints what changed.
    TriggerEvent {
        /// The car's id.
        #[arg(long, default_value_t = 1)]
        pk: i64,
    },
    /// Print the GraphQL schema (SDL), as checked in at schema.graphql.
    PrintSchema,
}

#[derive(Debug, Clone, Args)]
pub struct Settings {
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub events: EventLogArgs,
    #[command(flatten)]
    pub jwt: JwtArgs,
    #[command(flatten)]
    pub log: LogArgs,
    /// Verify tokens with auth-service's public keys (JWKS_URL) instead of the JWT_* key settings.
    #[command(flatten)]
    pub jwks: JwksArgs,
    /// Demo mode: allow the built-in demo JWT secret (a warning is printed) and create the demo
    /// user and cars (Car 1 Skoda Octavia Scout 2011, Car 2 Skoda Octavia Tour 2007). Never in
    /// production.
    #[arg(long, env = "DEMO", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub demo: bool,
    /// Apply pending migrations at start.
    #[arg(long, env = "MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,
    /// Serve GraphQL Playground (and GraphiQL) to browsers.
    /// How long a write made under a client's `Idempotency-Key` is remembered, in hours: a
    /// retry with the same key within it is answered with what the write committed, without
    /// writing again.
    #[arg(long, env = "IDEMPOTENCY_WINDOW_HOURS", default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=720))]
    pub idempotency_window_hours: u64,
    #[arg(long, env = "PLAYGROUND", default_value_t = true, action = clap::ArgAction::Set)]
    pub playground: bool,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u64).range(1..=16_777_216))]
    pub max_body_bytes: u64,
    /// Most operations in one batched request (a JSON array); 0 refuses batches.
    #[arg(long, env = "MAX_BATCH_SIZE", default_value_t = 10)]
    pub max_batch_size: usize,
    /// Deepest nesting of selections a document may have (fragments expanded).
    #[arg(long, env = "MAX_QUERY_DEPTH", default_value_t = 24, value_parser = clap::value_parser!(u64).range(2..=200))]
    pub max_query_depth: u64,
    /// Most fields (aliases included, fragments expanded) an operation may select.
    #[arg(long, env = "MAX_QUERY_FIELDS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_query_fields: u64,
    #[command(flatten)]
    pub persisted: graphql_schema::persisted::PersistedQueryArgs,
    /// Most tokens a document may have.
    #[arg(long, env = "MAX_QUERY_TOKENS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(100..=1_000_000))]
    pub max_query_tokens: u64,
    /// How often the outbox relay looks for events that were not published, in milliseconds.
    #[arg(long, env = "OUTBOX_RELAY_INTERVAL_MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub outbox_relay_interval_ms: u64,
    /// How long the writer of an event owns it before a relay may publish it, in seconds.
    #[arg(long, env = "OUTBOX_LEASE_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub outbox_lease_secs: u64,
}
