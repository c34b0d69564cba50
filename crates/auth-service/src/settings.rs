//! Every setting of auth-service, from flags or the environment (`auth-service --help` lists them).

use clap::{Args, Parser, Subcommand};
use service_kit::http::HttpArgs;
use service_kit::redis::RedisArgs;
use service_kit::telemetry::LogArgs;
use store::settings::DatabaseArgs;
use tokens::settings::JwtArgs;

#[derive(Debug, Parser)]
#[command(
    name = "auth-service",
    version,
    args_override_self = true,
    about = "Issues, refreshes, verifies and blacklists JWTs (SimpleJWT's REST contract)."
)]
pub struct Cli {
    #[command(flatten)]
    pub settings: Settings,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the token endpoints (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Create a user (or, with --update, reset an existing user's password).
    CreateUser {
        #[arg(long)]
        username: String,
        /// Read the password from the first line of standard input; otherwise a random one is
        /// generated and printed once.
        #[arg(long)]
        password_stdin: bool,
        /// Make the user staff (may change any car).
        #[arg(long)]
        staff: bool,
        /// Reset the password (and staff flag) when the user exists instead of failing.
        #[arg(long)]
        update: bool,
    },
    /// Deactivate a user: no more logins or refreshes, and every access token already issued is
    /// revoked on every replica (its open sockets close).
    DeactivateUser {
        #[arg(long)]
        username: String,
    },
    /// Write a new Ed25519 key pair as PEM files, for JWT_ALGORITHM=EdDSA.
    GenerateKey {
        /// Path of the private key; the public key is written beside it with `.pub.pem`.
        #[arg(long)]
        out: std::path::PathBuf,
    },
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
    pub jwt: JwtArgs,
    #[command(flatten)]
    pub log: LogArgs,
    /// Demo mode: create `admin`/`letmein` when absent and allow the built-in demo JWT secret
    /// (a warning is printed). Never in production.
    #[arg(long, env = "DEMO", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub demo: bool,
    /// Apply pending migrations at start.
    #[arg(long, env = "MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,
    /// Issue a new refresh token on every refresh (SimpleJWT's ROTATE_REFRESH_TOKENS).
    #[arg(long, env = "ROTATE_REFRESH_TOKENS", default_value_t = true, action = clap::ArgAction::Set)]
    pub rotate_refresh_tokens: bool,
    /// Blacklist the old refresh token when rotating (SimpleJWT's BLACKLIST_AFTER_ROTATION).
    #[arg(long, env = "BLACKLIST_AFTER_ROTATION", default_value_t = true, action = clap::ArgAction::Set)]
    pub blacklist_after_rotation: bool,
    /// Failed logins per username within the window before further attempts get 429.
    #[arg(long, env = "LOGIN_MAX_FAILURES_PER_USER", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub login_max_failures_per_user: u64,
    /// Failed logins per client address within the window before further attempts get 429.
    #[arg(long, env = "LOGIN_MAX_FAILURES_PER_ADDRESS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub login_max_failures_per_address: u64,
    /// Length of the failed-login window, in seconds.
    #[arg(long, env = "LOGIN_FAILURE_WINDOW_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub login_failure_window_secs: u64,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 16 * 1024)]
    pub max_body_bytes: usize,
    /// Password checks (argon2id, ~19 MiB each) run at once; 0 means one per core.
    #[arg(long, env = "LOGIN_CONCURRENCY", default_value_t = 0)]
    pub login_concurrency: usize,
    /// Logins that may wait for a password check; beyond that a login gets 503 at once.
    #[arg(long, env = "LOGIN_QUEUE", default_value_t = 64)]
    pub login_queue: usize,
}
