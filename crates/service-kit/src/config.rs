//! Settings shared by every binary. Each is a clap argument that can also come from the environment,
//! so `--help` documents every variable. A malformed or missing setting ends the process with one
//! line that names it and exit code 2; nothing here panics.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Args, Parser, ValueEnum};

/// A setting that was present but unusable (or absent where it is required), found after clap has
/// parsed the arguments. `setting` is the environment variable name, which is what operators set.
#[derive(Debug)]
pub struct ConfigError {
    pub setting: &'static str,
    pub message: String,
}

impl ConfigError {
    pub fn new(setting: &'static str, message: impl Into<String>) -> Self {
        Self {
            setting,
            message: message.into(),
        }
    }

    /// Prints the one-line error and exits with status 2, the convention for usage errors.
    pub fn exit(&self) -> ! {
        eprintln!("error: {self}");
        std::process::exit(2)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration {}: {}",
            self.setting, self.message
        )
    }
}

impl std::error::Error for ConfigError {}

/// Parses the command line, printing `--help`/`--version` normally but any error as a single line
/// (clap's own format spans several lines and hides which environment variable was at fault).
pub fn parse_or_exit<T: Parser>() -> T {
    match T::try_parse() {
        Ok(parsed) => parsed,
        Err(err) => match err.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => err.exit(),
            _ => {
                eprintln!("error: {}", one_line_clap_error(&err, &T::command()));
                std::process::exit(2)
            }
        },
    }
}

/// Clap's error as one line that names the environment variable at fault.
pub fn one_line_clap_error(err: &clap::Error, command: &clap::Command) -> String {
    let rendered = err.render().to_string();
    let first_line = rendered
        .lines()
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ")
        .trim_end_matches(':')
        .to_owned();
    match err.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => match arg_env_name(arg, command) {
            Some(env) => format!("{first_line} (environment variable {env})"),
            None => first_line,
        },
        // Missing required arguments: clap lists them on the following lines.
        Some(ContextValue::Strings(args)) => {
            let named: Vec<String> = args
                .iter()
                .map(|arg| match arg_env_name(arg, command) {
                    Some(env) => format!("{arg} (environment variable {env})"),
                    None => arg.clone(),
                })
                .collect();
            format!("{first_line}: {}", named.join(", "))
        }
        _ => first_line,
    }
}

// Flags are documented with their environment variable in `--help`; the error line repeats it
// because in containers the variable, not the flag, is what an operator set.
fn arg_env_name(arg: &str, command: &clap::Command) -> Option<String> {
    let flag = arg.split_whitespace().next()?.trim_start_matches('-');
    if flag.is_empty() {
        return None;
    }
    // The variable the argument really reads (the embedded binary's differ from the flag's
    // name); by convention the flag's name in capitals otherwise.
    let declared = command
        .get_arguments()
        .find(|candidate| candidate.get_long() == Some(flag))
        .and_then(|candidate| candidate.get_env())
        .map(|env| env.to_string_lossy().into_owned());
    Some(declared.unwrap_or_else(|| flag.replace('-', "_").to_ascii_uppercase()))
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable, coloured when stderr is a terminal.
    Pretty,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "pretty")]
    pub log_format: LogFormat,
    /// Log filter in `tracing` EnvFilter syntax, e.g. `info,auth_service=debug`.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

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

/// The event log: how much history each event type keeps for subscribers that resume
/// ([`crate::events`]). Set on the processes that publish (api-service, `trigger-event`, the
/// embedded server); a subscriber whose cursor is older gets `recovered: false`.
#[derive(Debug, Clone, Copy, Args)]
pub struct EventLogArgs {
    /// Events kept per event type (Redis `XADD … MAXLEN ~`, so a little more may stay).
    #[arg(long, env = "EVENT_RETENTION_COUNT", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub event_retention_count: u64,
    /// Longest an event is kept, in seconds (0 = no age limit; the count still applies).
    #[arg(long, env = "EVENT_RETENTION_SECS", default_value_t = 3_600)]
    pub event_retention_secs: u64,
}

impl Default for EventLogArgs {
    fn default() -> Self {
        Self {
            event_retention_count: 10_000,
            event_retention_secs: 3_600,
        }
    }
}

/// Persisted queries (`graphql_schema::persisted`), read by api-service and the gateway.
#[derive(Debug, Clone, Args)]
pub struct PersistedQueryArgs {
    /// How long an automatic persisted query stays registered after its last registration.
    #[arg(long, env = "APQ_TTL_SECS", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(60..=2_592_000))]
    pub apq_ttl_secs: u64,
    /// Run trusted documents only: the operations of this persisted query manifest (Apollo's
    /// format, `{"operations": [{"id": "<sha256>", "body": "<document>"}]}`); anything else is
    /// refused with PERSISTED_QUERY_NOT_IN_LIST.
    #[arg(long, env = "TRUSTED_DOCUMENTS")]
    pub trusted_documents: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct HttpArgs {
    /// Address to listen on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8001")]
    pub listen_addr: SocketAddr,
    /// Number of HTTP worker threads (0 = one per core).
    #[arg(long, env = "HTTP_WORKERS", default_value_t = 0)]
    pub http_workers: usize,
    /// How long in-flight requests may take to finish after SIGTERM, in seconds.
    #[arg(long, env = "SHUTDOWN_TIMEOUT_SECS", default_value_t = 10)]
    pub shutdown_timeout_secs: u64,
    /// Trust the `X-Forwarded-For` header for the client address (set this only behind a proxy
    /// such as the repo's NGINX, which overwrites it; otherwise clients could spoof it).
    #[arg(long, env = "TRUST_FORWARDED_FOR", default_value_t = false, action = clap::ArgAction::Set)]
    pub trust_forwarded_for: bool,
    /// Longest a client may take to send a request body, in seconds (then 408 and the connection
    /// closes).
    #[arg(long, env = "BODY_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub body_timeout_secs: u64,
    /// Blocking threads (database calls, password checks) of the process, shared by its HTTP
    /// workers; more work waits for one.
    #[arg(long, env = "BLOCKING_THREADS", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub blocking_threads: u64,
    /// Requests one client address may have in flight at once; more get 429.
    #[arg(long, env = "MAX_REQUESTS_PER_ADDRESS", default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_requests_per_address: u64,
}

impl HttpArgs {
    pub fn body_limits(&self, max_bytes: usize) -> crate::http::BodyLimits {
        crate::http::BodyLimits {
            max_bytes,
            timeout: std::time::Duration::from_secs(self.body_timeout_secs),
        }
    }

    pub fn address_limit(&self) -> crate::http::AddressLimit {
        crate::http::AddressLimit::new(
            usize::try_from(self.max_requests_per_address).unwrap_or(usize::MAX),
            self.trust_forwarded_for,
        )
    }
}

/// Settings of the JWT keys. Which of them are required depends on the algorithm; [`crate::jwt`]
/// checks them and reports the missing one by name.
#[derive(Debug, Clone, Args)]
pub struct JwtArgs {
    /// Signing algorithm of new tokens: `HS256` (shared secret) or `EdDSA` (Ed25519 private key).
    #[arg(long, env = "JWT_ALGORITHM", default_value = "HS256")]
    pub jwt_algorithm: String,
    /// Shared HS256 secret (at least 32 bytes). Required for HS256 unless `--demo`.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM file of the Ed25519 (PKCS#8) private key that signs tokens, for EdDSA.
    #[arg(long, env = "JWT_PRIVATE_KEY_FILE")]
    pub jwt_private_key_file: Option<PathBuf>,
    /// Key id (`kid`) written into every token's header. Defaults to a fingerprint of the key.
    #[arg(long, env = "JWT_KEY_ID")]
    pub jwt_key_id: Option<String>,
    /// Further Ed25519 public keys that verify tokens, as `KID=PATH.pem`, comma-separated: the keys
    /// of previous signing keys during a rotation.
    #[arg(long, env = "JWT_VERIFY_KEYS", value_delimiter = ',')]
    pub jwt_verify_keys: Vec<String>,
    /// Algorithms accepted on verification, comma-separated. Defaults to the signing algorithm
    /// (plus EdDSA when verification keys are given). Never taken from the token.
    #[arg(long, env = "JWT_ACCEPTED_ALGORITHMS", value_delimiter = ',')]
    pub jwt_accepted_algorithms: Vec<String>,
    /// Lifetime of access tokens, in seconds.
    #[arg(long, env = "ACCESS_TOKEN_LIFETIME_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub access_token_lifetime_secs: u64,
    /// Lifetime of refresh tokens, in seconds.
    #[arg(long, env = "REFRESH_TOKEN_LIFETIME_SECS", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    pub refresh_token_lifetime_secs: u64,
    /// Clock skew tolerated when checking `exp`, in seconds (jsonwebtoken's default of 60 would keep
    /// expired tokens alive for a minute).
    #[arg(long, env = "JWT_LEEWAY_SECS", default_value_t = 5)]
    pub jwt_leeway_secs: u64,
}

/// Where services other than auth-service get verification keys when they use auth-service's
/// JWKS instead of configured keys.
#[derive(Debug, Clone, Args)]
pub struct JwksArgs {
    /// auth-service's JWKS URL (e.g. `http://127.0.0.1:8001/api/token/jwks/`). When set, tokens
    /// are verified with its public keys and no JWT secret or key file is needed.
    #[arg(long, env = "JWKS_URL")]
    pub jwks_url: Option<String>,
    /// Least time between two JWKS fetches triggered by unknown key ids, in seconds.
    #[arg(long, env = "JWKS_MIN_REFETCH_SECS", default_value_t = 10)]
    pub jwks_min_refetch_secs: u64,
    /// Age after which the cached JWKS is fetched again, in seconds.
    #[arg(long, env = "JWKS_MAX_AGE_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub jwks_max_age_secs: u64,
}
