//! Every setting of the gateway, from flags or the environment (`subscription-gateway --help`).

use clap::{Args, Parser};
use service_kit::http::HttpArgs;
use service_kit::redis::RedisArgs;
use service_kit::telemetry::LogArgs;
use tokens::settings::{JwksArgs, JwtArgs};

#[derive(Debug, Parser)]
#[command(
    name = "subscription-gateway",
    version,
    args_override_self = true,
    about = "GraphQL subscriptions over websockets (graphql-transport-ws and graphql-ws), fed by Redis.",
    mut_arg("listen_addr", |arg| arg.default_value("127.0.0.1:8003"))
)]
pub struct Cli {
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Clone, Args)]
pub struct Settings {
    #[command(flatten)]
    pub http: HttpArgs,
    /// A second listener for `/healthz` and `/readyz` only, served by a thread of its own, so
    /// that probes are answered at once while the workers are busy with fan-out (past capacity,
    /// the main listener's answer waits behind a delivery round). Point the probes here. Unset:
    /// only the main listener answers them.
    #[arg(long, env = "HEALTH_LISTEN_ADDR")]
    pub health_listen_addr: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub layout: events::settings::PartitionArgs,
    #[command(flatten)]
    pub jwt: JwtArgs,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub jwks: JwksArgs,
    /// Demo mode: allow the built-in demo JWT secret (with a warning). Never in production.
    #[arg(long, env = "DEMO", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub demo: bool,
    /// Interval of keep-alive messages (`ping` / legacy `ka`, with a websocket ping), in seconds.
    /// Keep it well below every proxy's idle timeout (the repo's NGINX allows an hour). A client
    /// from which nothing arrived for two intervals is taken for gone and disconnected (1001).
    #[arg(long, env = "KEEPALIVE_SECS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub keepalive_secs: u64,
    /// Time a client has to send `connection_init` after connecting, in seconds (then 4408).
    #[arg(long, env = "INIT_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub init_timeout_secs: u64,
    /// Most sockets one client address may hold open (behind NGINX, the address NGINX saw, with
    /// TRUST_FORWARDED_FOR); more get 429 at the upgrade. 0: no bound.
    #[arg(long, env = "MAX_CONNECTIONS_PER_ADDRESS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub max_connections_per_address: u64,
    /// Most authenticated sockets one user may hold on this gateway; one more is closed at
    /// `connection_init` with 1008 (the legacy protocol gets `connection_error` first). 0: no
    /// bound.
    #[arg(long, env = "MAX_CONNECTIONS_PER_USER", default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub max_connections_per_user: u64,
    /// Replays (resumes reading what they missed) one connection may run at once; more wait.
    #[arg(long, env = "MAX_REPLAYS_PER_CONNECTION", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub max_replays_per_connection: u64,
    /// Replays one user may run at once on this process; more wait (REPLAY_QUEUE_PER_USER).
    #[arg(long, env = "MAX_REPLAYS_PER_USER", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_replays_per_user: u64,
    /// Replays running at once on this process, whoever asked.
    #[arg(long, env = "MAX_REPLAYS", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_replays: u64,
    /// A user's replays that may wait for a turn; a resume past them is answered at once with
    /// `recovered: false` (the client refetches its state) and goes live.
    #[arg(long, env = "REPLAY_QUEUE_PER_USER", default_value_t = 256, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub replay_queue_per_user: u64,
    /// Replayed events per second one user's replays may take together on this process; live
    /// events are never paced.
    #[arg(long, env = "REPLAY_EVENTS_PER_SEC_PER_USER", default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub replay_events_per_sec_per_user: u32,
    /// Most subscriptions one connection may hold at once.
    #[arg(long, env = "MAX_SUBSCRIPTIONS_PER_CONNECTION", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_subscriptions_per_connection: u64,
    /// Largest websocket message accepted from a client, in bytes (reassembled fragments count).
    #[arg(long, env = "MAX_FRAME_BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u64).range(256..=16_777_216))]
    pub max_frame_bytes: u64,
    /// Messages that may wait for a client whose socket buffer is full before it is disconnected
    /// (1013).
    #[arg(long, env = "OUTBOUND_QUEUE", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub outbound_queue: u64,
    /// Kernel send buffer of each websocket, in bytes (SO_SNDBUF; Linux doubles it for its own
    /// bookkeeping). Without a cap the kernel grows it to `net.ipv4.tcp_wmem`'s maximum (4 MiB
    /// here) for a client that stops reading: about 3 MB per such client held outside
    /// OUTBOUND_QUEUE. 0: leave it to the kernel.
    #[arg(long, env = "SOCKET_SEND_BUFFER_BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(0..=64 * 1024 * 1024))]
    pub socket_send_buffer_bytes: u32,
    /// Longest a client may leave waiting messages unread (no byte taken) before it is
    /// disconnected as too slow (1013), in seconds.
    #[arg(long, env = "WRITE_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub write_timeout_secs: u64,
    /// Events queued for each shared execution (only those it is for: of its key, or all of its
    /// type when unkeyed); an execution further behind than this closes its subscribers'
    /// connections as slow (1013) so they resubscribe.
    #[arg(long, env = "FANOUT_BUFFER", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub fanout_buffer: u64,
    /// Delivery lag (from an event's append to its result written), in milliseconds, over which
    /// the gateway takes itself for overloaded and admits websocket upgrades only at
    /// UPGRADES_PER_SEC_WHILE_LAGGING; the others get 503 with a `Retry-After` of 1-5 s.
    #[arg(long, env = "OVERLOAD_LAG_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub overload_lag_ms: u64,
    /// Websocket upgrades admitted per second while the gateway lags (OVERLOAD_LAG_MS).
    #[arg(long, env = "UPGRADES_PER_SEC_WHILE_LAGGING", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub upgrades_per_sec_while_lagging: u32,
    /// api-service's GraphQL endpoint as this process reaches it (directly, not through NGINX):
    /// queries and mutations sent on the websocket are POSTed there with the connection's token.
    #[arg(
        long,
        env = "API_INTERNAL_URL",
        default_value = "http://127.0.0.1:8002/graphql"
    )]
    pub api_internal_url: String,
    /// Set by the embedded mode only (not a setting): the secret its forwarded operations carry,
    /// so that its own API counts them by the client's address.
    #[arg(skip)]
    pub forwarding_key: Option<std::sync::Arc<str>>,
    /// After SIGTERM, how long sockets may take to close before the process exits, in seconds.
    #[arg(long, env = "DRAIN_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub drain_timeout_secs: u64,
    /// Deepest selection accepted in a subscription document.
    #[arg(long, env = "MAX_QUERY_DEPTH", default_value_t = 24, value_parser = clap::value_parser!(u64).range(2..=200))]
    pub max_query_depth: u64,
    /// Most fields accepted in a subscription document.
    #[arg(long, env = "MAX_QUERY_FIELDS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_query_fields: u64,
    #[command(flatten)]
    pub persisted: graphql_schema::persisted::PersistedQueryArgs,
    /// Most lexical tokens accepted in a subscription document.
    #[arg(long, env = "MAX_QUERY_TOKENS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(100..=1_000_000))]
    pub max_query_tokens: u64,
}

impl Settings {
    /// The bounds on documents (MAX_QUERY_*).
    pub fn document_limits(&self) -> graphql_schema::DocumentLimits {
        graphql_schema::DocumentLimits {
            max_depth: self.max_query_depth as usize,
            max_fields: self.max_query_fields as usize,
            max_tokens: self.max_query_tokens as usize,
        }
    }

    /// What one connection may do and hold.
    pub fn connection_limits(&self) -> crate::state::ConnectionLimits {
        crate::state::ConnectionLimits {
            keepalive: std::time::Duration::from_secs(self.keepalive_secs),
            init_timeout: std::time::Duration::from_secs(self.init_timeout_secs),
            max_subscriptions: self.max_subscriptions_per_connection as usize,
            outbound_queue: self.outbound_queue as usize,
            write_timeout: std::time::Duration::from_secs(self.write_timeout_secs),
        }
    }

    /// The bounds on replays (MAX_REPLAYS*, REPLAY_*).
    pub fn replay_limits(&self) -> crate::replays::ReplayLimits {
        crate::replays::ReplayLimits {
            per_connection: self.max_replays_per_connection as usize,
            per_user: self.max_replays_per_user as usize,
            per_process: self.max_replays as usize,
            queue_per_user: self.replay_queue_per_user as usize,
            events_per_sec_per_user: self.replay_events_per_sec_per_user,
        }
    }
}
