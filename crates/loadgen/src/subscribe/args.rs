//! The command line of `loadgen subscribe`, and the checks between arguments that clap cannot
//! express, so that a run refuses a bad combination before it opens a socket.

use clap::{Args, ValueEnum};

#[derive(Debug, Clone, Args)]
pub(crate) struct SubscribeArgs {
    /// The gateway's websocket endpoint.
    #[arg(long, default_value = "ws://127.0.0.1:8003/graphql/")]
    pub(super) target: String,
    /// Websocket subprotocol.
    #[arg(long, value_enum, default_value = "graphql-transport-ws")]
    pub(super) protocol: WsProtocol,
    /// Subscribers to open (one socket, one subscription each).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=200_000))]
    pub(super) connections: u32,
    /// New connections per second during the ramp.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=50_000))]
    pub(super) rate: u32,
    /// Car pks subscribed to, comma-separated; spread over subscribers and events by
    /// `--distribution` (uniform: subscriber i takes pks[i % len], event k pks[k % len]).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1",
        conflicts_with = "keys"
    )]
    pub(super) pks: Vec<i64>,
    /// Shorthand for `--pks 1,2,…,K`: K distinct keys (cars need not exist: events are
    /// published straight into Redis).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(super) keys: Option<u32>,
    /// How subscribers and events are spread over the pks.
    #[arg(long, value_enum, default_value = "uniform")]
    pub(super) distribution: Distribution,
    /// With `--distribution zipf`: the law's exponent (1: the k-th key is 1/k as popular as the
    /// first).
    #[arg(long, default_value_t = 1.0)]
    pub(super) zipf_exponent: f64,
    /// A mixed run: this many subscribers on the first pk (the hot key), the others spread over
    /// the rest.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=200_000))]
    pub(super) hot_subscribers: Option<u32>,
    /// With `--hot-subscribers`: the share of events for the hot key.
    #[arg(long, default_value_t = 0.5)]
    pub(super) hot_event_share: f64,
    /// Publish the measured events back to back, pipelined, as fast as Redis takes them
    /// (`--events-per-sec` is then ignored): a burst of writes.
    #[arg(long, default_value_t = false)]
    pub(super) burst: bool,
    /// Publish the cars private: readable by their owner and staff only. Their owner is the
    /// subscribers' user with `--owners`, else nobody (staff only), and only the subscribers
    /// who may read them are expected to receive them.
    #[arg(long, default_value_t = false)]
    pub(super) private: bool,
    /// Each event's envelope carries a W3C `traceparent`, as a traced write's does, so that a
    /// gateway with tracing on makes its delivery spans (the cost of tracing).
    #[arg(long, default_value_t = false)]
    pub(super) traced: bool,
    /// Each subscriber is the owner of the car it watches: its token is minted for that car's
    /// owner (one user per key), whom the published cars name.
    #[arg(long, default_value_t = false)]
    pub(super) owners: bool,
    /// The first N subscribers carry a staff token (the `is_staff` claim).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=200_000))]
    pub(super) staff: u32,
    /// Measured events (after one warm-up event per pk).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(0..=5_000_000))]
    pub(super) events: u32,
    /// Publishing rate of the measured events.
    #[arg(long, default_value_t = 1.0)]
    pub(super) events_per_sec: f64,
    /// HS256 secret the gateway verifies with; loadgen mints its own access token.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub(super) jwt_secret: Option<String>,
    /// Mint the token with the built-in demo secret (a gateway started with `DEMO=true` and no
    /// `JWT_SECRET`).
    #[arg(long, default_value_t = false)]
    pub(super) demo_secret: bool,
    /// Instead of minting: log in at this auth-service (`/api/token/`). Its access tokens live 5
    /// minutes by default, and the gateway closes a socket when its token expires.
    #[arg(long)]
    pub(super) auth: Option<String>,
    #[arg(long, default_value = "admin")]
    pub(super) username: String,
    #[arg(long, default_value = "letmein")]
    pub(super) password: String,
    /// Events the log keeps (`XADD … MAXLEN ~`), as the services' EVENT_RETENTION_COUNT. Past
    /// capacity a gateway that falls further behind than this loses what was trimmed before
    /// it read it: size it to the rate times the lag a run may reach.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub(super) retention_count: u64,
    /// The Redis the gateway listens to, and its key prefix: both must be the gateway's.
    #[command(flatten)]
    pub(super) redis: service_kit::redis::RedisArgs,
    #[command(flatten)]
    pub(super) layout: events::settings::PartitionArgs,
    /// The gateway's process id, to read its resident memory (`VmRSS`) from /proc.
    #[arg(long)]
    pub(super) gateway_pid: Option<u32>,
    /// Bind each socket to a port of its own from this one on (subscriber i: 127.0.0.(1 + i %
    /// 250), port BASE + i / 250) rather than to one the kernel picks from its ephemeral range.
    /// Past about 80,000 sockets on one machine, the ports loadgen binds in that range leave a
    /// proxy on the same machine none for its own connections to the gateways (EADDRNOTAVAIL);
    /// ports below the range (32768 here) do not. Give each loadgen process its own range.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1024..=65000))]
    pub(super) source_port_base: Option<u16>,
    /// Client threads the sockets are spread over.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub(super) threads: u32,
    /// Idle time after the ramp, before the idle RSS reading and the first event, in seconds.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(0..=300))]
    pub(super) settle_secs: u64,
    /// Wait after the last event for late deliveries, in seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub(super) drain_secs: u64,
    /// Hard cap on the whole run, in seconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(5..=600))]
    pub(super) max_seconds: u64,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    pub(super) json: Option<std::path::PathBuf>,
    /// Resume after every close, as the README's client recipe does: reconnect at once and
    /// subscribe again with `extensions.resumeFrom` set to the cursor of the last delivery.
    #[arg(long, default_value_t = false)]
    pub(super) resume: bool,
    /// With --resume: connection attempts per close before a subscriber gives up (100 ms apart,
    /// plus up to 100 ms of jitter, so that a storm is spread as a real client spreads it).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub(super) reconnect_attempts: u32,
    /// SIGTERM this process (a gateway replica) --kill-after-secs into the measured events: the
    /// reconnect storm of a rolling deploy.
    #[arg(long, requires = "kill_after_secs")]
    pub(super) kill_pid: Option<u32>,
    #[arg(long, requires = "kill_pid")]
    pub(super) kill_after_secs: Option<f64>,
    /// Renew every connection's token on the open socket this often (graphql-transport-ws
    /// `ping` carrying `Authorization`, with a freshly minted token for the same user); the
    /// first renewals are spread over one period.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(super) renew_every_secs: Option<u64>,
    /// Lifetime of the minted access tokens, in seconds (default: the whole run and 10
    /// minutes). Shorter than the run, the sockets live only as long as they renew.
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..=86_400))]
    pub(super) token_lifetime_secs: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum Distribution {
    /// Each key in turn.
    Uniform,
    /// A Zipf law over the keys (`--zipf-exponent`).
    Zipf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum WsProtocol {
    /// The graphql-ws library's protocol (`subscribe` / `next`).
    #[value(name = "graphql-transport-ws")]
    TransportWs,
    /// subscriptions-transport-ws's legacy protocol (`start` / `data`).
    #[value(name = "graphql-ws")]
    LegacyWs,
    /// Not a websocket: GraphQL over SSE (`POST` with `Accept: text/event-stream`), one
    /// stream per subscriber.
    #[value(name = "graphql-sse")]
    Sse,
}

impl WsProtocol {
    pub(super) fn name(self) -> &'static str {
        match self {
            WsProtocol::TransportWs => "graphql-transport-ws",
            WsProtocol::LegacyWs => "graphql-ws",
            WsProtocol::Sse => "graphql-sse",
        }
    }
}

impl SubscribeArgs {
    /// What clap cannot check: ranges of floats, and options that only make sense together.
    /// Also expands `--keys` into `--pks`.
    pub(super) fn validate(&mut self) -> Result<(), String> {
        if let Some(keys) = self.keys {
            self.pks = (1..=i64::from(keys)).collect();
        }
        if self.hot_subscribers.is_some() && self.pks.len() < 2 {
            return Err(
                "--hot-subscribers needs at least two pks: the hot one and the others".into(),
            );
        }
        if !(0.0..=1.0).contains(&self.hot_event_share) {
            return Err("--hot-event-share must be within 0..=1".into());
        }
        if !(0.1..=10.0).contains(&self.zipf_exponent) {
            return Err("--zipf-exponent must be within 0.1..=10".into());
        }
        if self.pks.is_empty() {
            return Err("--pks needs at least one pk".into());
        }
        if let Some(base) = self.source_port_base {
            let last = u32::from(base) + self.connections / 250;
            if last > 65_535 {
                return Err(format!(
                    "--source-port-base {base}: {} connections need ports up to {last}",
                    self.connections
                ));
            }
        }
        if !(0.1..=100_000.0).contains(&self.events_per_sec) {
            return Err("--events-per-sec must be within 0.1..=100000".into());
        }
        if self.protocol == WsProtocol::Sse && (self.resume || self.renew_every_secs.is_some()) {
            return Err(
                "--protocol graphql-sse measures fan-out only: no --resume or --renew-every-secs"
                    .into(),
            );
        }
        if (self.owners || self.staff > 0) && self.auth.is_some() {
            return Err("--owners and --staff mint their tokens: give --jwt-secret or --demo-secret, not --auth".into());
        }
        if self.renew_every_secs.is_some() {
            if self.protocol != WsProtocol::TransportWs {
                return Err("--renew-every-secs needs --protocol graphql-transport-ws: the legacy protocol has no renewal".into());
            }
            if self.auth.is_some() {
                return Err("--renew-every-secs mints the new tokens: give --jwt-secret or --demo-secret, not --auth".into());
            }
        }
        if self
            .kill_after_secs
            .is_some_and(|secs| !(0.0..=600.0).contains(&secs))
        {
            return Err("--kill-after-secs must be within 0..=600".into());
        }
        Ok(())
    }
}
