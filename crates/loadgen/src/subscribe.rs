//! `loadgen subscribe`: websocket fan-out through subscription-gateway.
//!
//! The run has fixed phases, each bounded by `--max-seconds` for the whole run:
//! 1. **Ramp.** `--connections` sockets are opened at `--rate` per second, each bound to a source
//!    address 127.0.0.x (x cycling 1..=250), so the count is not capped by the ~28k ephemeral
//!    ports of one address pair. Each sends `connection_init` with the token, waits for the ack,
//!    and starts `carModelUpdated(pk: …)` (pks from `--pks`, dealt out in turn).
//! 2. **Idle.** `--settle-secs` with nothing to deliver; the gateway's RSS is read at the end.
//! 3. **Warm-up.** One event per pk, not counted, until every subscriber has had one: this proves
//!    each subscription is live at the gateway (the protocol has no ack for a subscription).
//! 4. **Events.** `--events` envelopes at `--events-per-sec`, published straight into Redis as
//!    api-service would (`XADD <prefix>events:car.updated`). Each carries a unique make, so
//!    every delivery is matched to its event and timed from just before the `XADD`.
//! 5. **Drain.** Up to `--drain-secs` for the last deliveries; whatever has not arrived then is
//!    counted missing.
//!
//! Two scenarios ride on these phases:
//! - **Resume** (`--resume`, with `--kill-pid`/`--kill-after-secs` for a reconnect storm): a
//!   subscriber keeps the cursor of its last delivery and, whenever its socket closes, reconnects
//!   and subscribes again with `extensions.resumeFrom`, as the README's client recipe does. Each
//!   subscriber keeps one bit per event, so a duplicate is told from a first delivery; an event
//!   missing is one that never arrived. Per reconnect it reports when the subscriber held every
//!   event published before it subscribed again ("caught up"), timed from the SIGTERM.
//! - **Renew** (`--renew-every-secs`, often with a short `--token-lifetime-secs`): every socket
//!   sends `ping` with a freshly minted token for its user and times the `pong {"exp"}`.
//!
//! The clock is one `Instant` shared by the publisher and the client threads, so publish and
//! receipt times are comparable. A receipt is stamped right after the read that brought its frame,
//! so the figures include the client's own queueing (it shares the cores with the gateway).
//!
//! The websocket client is a bare one (a tokio socket, actix-http's frame codec, a read buffer
//! that exists only while bytes are waiting), so that loadgen's own CPU per delivery takes as
//! little as possible of the two cores it shares with the gateway.

use std::collections::BTreeMap;
use std::future::{poll_fn, Future as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs as _};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use actix_codec::{Decoder as _, Encoder as _};
use actix_http::ws::{hash_key, CloseCode, Codec, Frame, Message, ProtocolError};
use actix_web::web::BytesMut;
use base64::prelude::{Engine as _, BASE64_STANDARD};
use clap::{Args, Parser, ValueEnum};
use common::db::cars::Car;
use common::events::{Envelope, EventBus as _, EventType, RedisBus};
use common::jwt::{new_jti, Claims, JwtKeys, SecretPolicy, TokenType};
use serde_json::{json, Value};
use tokio::io::Interest;
use tokio::net::{TcpSocket, TcpStream};

/// Source addresses cycle over 127.0.0.1..=127.0.0.250.
const SOURCE_ADDRESSES: u32 = 250;
/// Longest wait for the upgrade, and then for `connection_ack`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the warm-up events to reach every subscriber.
const WARMUP_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Args)]
pub struct SubscribeArgs {
    /// The gateway's websocket endpoint.
    #[arg(long, default_value = "ws://127.0.0.1:8003/graphql/")]
    target: String,
    /// Websocket subprotocol.
    #[arg(long, value_enum, default_value = "graphql-transport-ws")]
    protocol: WsProtocol,
    /// Subscribers to open (one socket, one subscription each).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=200_000))]
    connections: u32,
    /// New connections per second during the ramp.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=50_000))]
    rate: u32,
    /// Car pks subscribed to, comma-separated; subscriber i takes pks[i % len], event k goes to
    /// pks[k % len].
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pks: Vec<i64>,
    /// Measured events (after one warm-up event per pk).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    events: u32,
    /// Publishing rate of the measured events.
    #[arg(long, default_value_t = 1.0)]
    events_per_sec: f64,
    /// HS256 secret the gateway verifies with; loadgen mints its own access token.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Mint the token with the built-in demo secret (a gateway started with `DEMO=true` and no
    /// `JWT_SECRET`).
    #[arg(long, default_value_t = false)]
    demo_secret: bool,
    /// Instead of minting: log in at this auth-service (`/api/token/`). Its access tokens live 5
    /// minutes by default, and the gateway closes a socket when its token expires.
    #[arg(long)]
    auth: Option<String>,
    #[arg(long, default_value = "admin")]
    username: String,
    #[arg(long, default_value = "letmein")]
    password: String,
    /// The Redis the gateway listens to, and its key prefix: both must be the gateway's.
    #[command(flatten)]
    redis: common::config::RedisArgs,
    /// The gateway's process id, to read its resident memory (`VmRSS`) from /proc.
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// Client threads the sockets are spread over.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    threads: u32,
    /// Idle time after the ramp, before the idle RSS reading and the first event, in seconds.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(0..=300))]
    settle_secs: u64,
    /// Wait after the last event for late deliveries, in seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=60))]
    drain_secs: u64,
    /// Hard cap on the whole run, in seconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(5..=600))]
    max_seconds: u64,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Resume after every close, as the README's client recipe does: reconnect at once and
    /// subscribe again with `extensions.resumeFrom` set to the cursor of the last delivery.
    #[arg(long, default_value_t = false)]
    resume: bool,
    /// With --resume: connection attempts per close before a subscriber gives up (100 ms apart,
    /// plus up to 100 ms of jitter, so that a storm is spread as a real client spreads it).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    reconnect_attempts: u32,
    /// SIGTERM this process (a gateway replica) --kill-after-secs into the measured events: the
    /// reconnect storm of a rolling deploy.
    #[arg(long, requires = "kill_after_secs")]
    kill_pid: Option<u32>,
    #[arg(long, requires = "kill_pid")]
    kill_after_secs: Option<f64>,
    /// Renew every connection's token on the open socket this often (graphql-transport-ws
    /// `ping` carrying `Authorization`, with a freshly minted token for the same user); the
    /// first renewals are spread over one period.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
    renew_every_secs: Option<u64>,
    /// Lifetime of the minted access tokens, in seconds (default: the whole run and 10
    /// minutes). Shorter than the run, the sockets live only as long as they renew.
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..=86_400))]
    token_lifetime_secs: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum WsProtocol {
    /// The graphql-ws library's protocol (`subscribe` / `next`).
    #[value(name = "graphql-transport-ws")]
    TransportWs,
    /// subscriptions-transport-ws's legacy protocol (`start` / `data`).
    #[value(name = "graphql-ws")]
    LegacyWs,
}

impl WsProtocol {
    fn name(self) -> &'static str {
        match self {
            WsProtocol::TransportWs => "graphql-transport-ws",
            WsProtocol::LegacyWs => "graphql-ws",
        }
    }
}

/// What the publisher and the client threads share. Times are nanoseconds since `base`.
struct Shared {
    base: Instant,
    /// Tag in every make of this run (`lg<run>-<event>`), so stray events of other runs are ignored.
    run: String,
    /// Publish time per event (warm-up events first); 0 until published.
    published_ns: Vec<AtomicU64>,
    /// Deliveries per event so far.
    delivered: Vec<AtomicU32>,
    /// Subscriptions started and not closed, per index into `pks`.
    live_by_pk: Vec<AtomicU64>,
    /// Connections that finished their handshake, successfully or not.
    attempted: AtomicU64,
    established: AtomicU64,
    /// Time the last subscription was started.
    last_established_ns: AtomicU64,
    /// Whether the gateway closed sockets (or they failed) after the handshake.
    dropped: AtomicUsize,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
}

/// What one client thread saw.
#[derive(Default)]
struct Tally {
    /// (event index, receipt time in ns since `base`).
    receipts: Vec<(u32, u64)>,
    /// Upgrade request to `connection_ack`, in µs.
    handshake_us: Vec<u32>,
    connect_errors: BTreeMap<String, u64>,
    closes: BTreeMap<String, u64>,
    /// `error` / `complete` / `connection_error` and anything unexpected, by type.
    protocol_errors: BTreeMap<String, u64>,
    keepalives: u64,
    /// Deliveries whose make was not of this run or not parseable.
    foreign: u64,
    /// Deliveries of an event this subscriber had already received (not counted as receipts).
    duplicates: u64,
    /// With --resume: one per reconnect that subscribed again.
    resumes: Vec<Resumed>,
    /// Resumed subscriptions whose first result said `recovered: false`.
    unrecovered: u64,
    /// Subscribers that gave up reconnecting.
    gave_up: u64,
    /// Renewal `ping`s sent, and the time to their `pong {"exp"}` in µs.
    renewals_sent: u64,
    renewal_us: Vec<u32>,
}

/// One reconnect of a resuming subscriber; times in ns since `base`.
#[derive(Debug, Clone, Copy)]
struct Resumed {
    /// When its socket was closed.
    dropped_ns: u64,
    /// When it subscribed again with its cursor.
    resubscribed_ns: u64,
    /// When it held every event published before `resubscribed_ns`.
    caught_up_ns: u64,
}

pub fn run(args: &SubscribeArgs) -> Result<(), String> {
    crate::ensure_loopback(&args.target);
    crate::ensure_loopback(&args.redis.redis_url);
    if let Some(auth) = &args.auth {
        crate::ensure_loopback(auth);
    }
    if args.pks.is_empty() {
        return Err("--pks needs at least one pk".into());
    }
    if !(0.1..=10_000.0).contains(&args.events_per_sec) {
        return Err("--events-per-sec must be within 0.1..=10000".into());
    }
    if args.renew_every_secs.is_some() {
        if args.protocol != WsProtocol::TransportWs {
            return Err("--renew-every-secs needs --protocol graphql-transport-ws: the legacy protocol has no renewal".into());
        }
        if args.auth.is_some() {
            return Err("--renew-every-secs mints the new tokens: give --jwt-secret or --demo-secret, not --auth".into());
        }
    }
    if args
        .kill_after_secs
        .is_some_and(|secs| !(0.0..=600.0).contains(&secs))
    {
        return Err("--kill-after-secs must be within 0..=600".into());
    }
    if let Some(limit) = open_files_limit() {
        let needed = u64::from(args.connections) + 64;
        if needed > limit {
            return Err(format!(
                "{} connections need about {needed} file descriptors but `ulimit -n` is {limit}; raise it in this shell",
                args.connections
            ));
        }
    }
    let target = Target::parse(&args.target)?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.max_seconds);
    let minter = minter(args)?.map(Arc::new);
    let tokens =
        Arc::new(actix_web::rt::System::new().block_on(obtain_tokens(args, minter.as_deref()))?);
    let warmups = args.pks.len();
    let total_events = warmups + args.events as usize;
    let shared = Arc::new(Shared {
        base: started,
        run: format!("lg{:x}", started_nanos() & 0xff_ffff),
        published_ns: (0..total_events).map(|_| AtomicU64::new(0)).collect(),
        delivered: (0..total_events).map(|_| AtomicU32::new(0)).collect(),
        live_by_pk: args.pks.iter().map(|_| AtomicU64::new(0)).collect(),
        attempted: AtomicU64::new(0),
        established: AtomicU64::new(0),
        last_established_ns: AtomicU64::new(0),
        dropped: AtomicUsize::new(0),
    });

    let rss_before = args.gateway_pid.and_then(rss_kib);
    let stop = Arc::new(Stop::default());
    let threads = args.threads.min(args.connections);
    let ramp_started_ns = shared.now_ns();
    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let args = args.clone();
            let shared = shared.clone();
            let tokens = tokens.clone();
            let minter = minter.clone();
            let target = target.clone();
            let stop = stop.clone();
            std::thread::spawn(move || -> Result<Tally, String> {
                // A bare current-thread runtime rather than actix's System: tasks woken by the
                // I/O driver go straight onto its local queue, not through a LocalSet's
                // locked remote queue, once per delivery.
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|err| format!("cannot start a client thread's runtime: {err}"))?;
                Ok(runtime.block_on(client_thread(
                    thread, threads, args, shared, tokens, minter, target, stop,
                )))
            })
        })
        .collect();

    let outcome = actix_web::rt::System::new().block_on(orchestrate(
        args,
        &shared,
        deadline,
        ramp_started_ns,
        rss_before,
    ));
    stop.stop();
    let mut total = Tally::default();
    for handle in handles {
        let tally = handle
            .join()
            .map_err(|_| "a client thread panicked".to_owned())??;
        merge(&mut total, tally);
    }
    let phases = outcome?;
    report(args, &shared, total, phases)?;
    if shared.established.load(Ordering::Relaxed) == 0 {
        return Err("no subscriber connected".into());
    }
    Ok(())
}

/// Times and readings the orchestrator took along the way.
struct Phases {
    ramp_started_ns: u64,
    rss_before: Option<u64>,
    rss_idle: Option<u64>,
    rss_end: Option<u64>,
    /// Live subscriptions when the idle reading was taken.
    live_at_idle: u64,
    warmup_complete: bool,
    /// Expected deliveries per measured event (live subscribers of its pk when published).
    expected: Vec<u64>,
    publish_errors: BTreeMap<String, u64>,
    events_started_ns: u64,
    events_ended_ns: u64,
    /// CPU time (user + system, in seconds) of the gateway and of loadgen over the ramp and over
    /// the events (from the first measured event to the end of the drain).
    cpu_ramp: CpuPair,
    cpu_events: CpuPair,
    stopped_by_cap: bool,
    /// When --kill-pid was sent SIGTERM, and how that went.
    killed: Option<(u64, Result<(), String>)>,
}

#[derive(Debug, Default, Clone, Copy)]
struct CpuPair {
    gateway: Option<f64>,
    loadgen: Option<f64>,
}

impl CpuPair {
    fn now(gateway_pid: Option<u32>) -> Self {
        Self {
            gateway: gateway_pid.and_then(|pid| cpu_seconds(&pid.to_string())),
            loadgen: cpu_seconds("self"),
        }
    }

    fn since(self, earlier: CpuPair) -> CpuPair {
        let minus = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
        CpuPair {
            gateway: minus(self.gateway, earlier.gateway),
            loadgen: minus(self.loadgen, earlier.loadgen),
        }
    }
}

async fn orchestrate(
    args: &SubscribeArgs,
    shared: &Shared,
    deadline: Instant,
    ramp_started_ns: u64,
    rss_before: Option<u64>,
) -> Result<Phases, String> {
    let mut stopped_by_cap = false;
    let cpu_start = CpuPair::now(args.gateway_pid);
    // 1. Ramp: until every connection finished its handshake.
    let total = u64::from(args.connections);
    while shared.attempted.load(Ordering::Relaxed) < total {
        if Instant::now() >= deadline {
            stopped_by_cap = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu_ramp = CpuPair::now(args.gateway_pid).since(cpu_start);
    // 2. Idle.
    let settle_until = Instant::now() + Duration::from_secs(args.settle_secs);
    tokio::time::sleep_until(settle_until.min(deadline).into()).await;
    let live_at_idle = live_total(shared);
    let rss_idle = args.gateway_pid.and_then(rss_kib);

    let pool = common::redis::pool(&args.redis).map_err(|err| err.to_string())?;
    let bus = RedisBus::new(pool, args.redis.redis_key_prefix.clone());
    let mut publish_errors = BTreeMap::new();

    // 3. Warm-up: one event per pk, until each reached every live subscriber of its pk.
    let warmups = args.pks.len();
    let mut warm_expected = Vec::new();
    for index in 0..warmups {
        warm_expected.push(shared.live_by_pk[index].load(Ordering::Relaxed));
        if let Err(kind) = publish(&bus, shared, index, args.pks[index]).await {
            *publish_errors.entry(kind).or_insert(0) += 1;
        }
    }
    let warm_deadline = (Instant::now() + WARMUP_TIMEOUT).min(deadline);
    let mut warmup_complete = false;
    while Instant::now() < warm_deadline {
        warmup_complete = (0..warmups)
            .all(|i| u64::from(shared.delivered[i].load(Ordering::Relaxed)) >= warm_expected[i]);
        if warmup_complete {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // 4. Events at a fixed rate.
    let mut expected = Vec::with_capacity(args.events as usize);
    let events_started_ns = shared.now_ns();
    let cpu_before_events = CpuPair::now(args.gateway_pid);
    let period = Duration::from_secs_f64(1.0 / args.events_per_sec);
    let mut ticks = tokio::time::interval(period);
    let kill_at = args
        .kill_pid
        .zip(args.kill_after_secs)
        .map(|(pid, secs)| (pid, Instant::now() + Duration::from_secs_f64(secs)));
    let mut killed = None;
    for k in 0..args.events as usize {
        ticks.tick().await;
        if Instant::now() >= deadline {
            stopped_by_cap = true;
            break;
        }
        if let Some((pid, at)) = kill_at.filter(|_| killed.is_none()) {
            if Instant::now() >= at {
                killed = Some((shared.now_ns(), terminate(pid)));
            }
        }
        let pk_index = k % args.pks.len();
        expected.push(shared.live_by_pk[pk_index].load(Ordering::Relaxed));
        if let Err(kind) = publish(&bus, shared, warmups + k, args.pks[pk_index]).await {
            *publish_errors.entry(kind).or_insert(0) += 1;
        }
    }

    // 5. Drain: until every published event reached its subscribers, or the drain time is up.
    let drain_deadline = (Instant::now() + Duration::from_secs(args.drain_secs)).min(deadline);
    while Instant::now() < drain_deadline {
        let done = expected.iter().enumerate().all(|(k, want)| {
            u64::from(shared.delivered[warmups + k].load(Ordering::Relaxed)) >= *want
        });
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let events_ended_ns = shared.now_ns();
    let cpu_events = CpuPair::now(args.gateway_pid).since(cpu_before_events);
    let rss_end = args.gateway_pid.and_then(rss_kib);
    Ok(Phases {
        ramp_started_ns,
        rss_before,
        rss_idle,
        rss_end,
        live_at_idle,
        warmup_complete,
        expected,
        publish_errors,
        events_started_ns,
        events_ended_ns,
        cpu_ramp,
        cpu_events,
        stopped_by_cap,
        killed,
    })
}

/// Sends SIGTERM, as a deploy stops a replica.
fn terminate(pid: u32) -> Result<(), String> {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .map_err(|err| format!("cannot run kill: {err}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kill -TERM {pid}: {status}"))
    }
}

fn live_total(shared: &Shared) -> u64 {
    shared
        .live_by_pk
        .iter()
        .map(|n| n.load(Ordering::Relaxed))
        .sum()
}

/// Publishes event `index` for car `pk`, as api-service's write path does; the publish time is
/// taken just before the `XADD`, so it is set before any delivery can arrive.
async fn publish(bus: &RedisBus, shared: &Shared, index: usize, pk: i64) -> Result<(), String> {
    let car = Car {
        id: pk,
        make: format!("{}-{index}", shared.run),
        model: "Octavia".into(),
        variant: "Scout".into(),
        year: "2011".into(),
        owner: None,
    };
    let envelope = Envelope::new(EventType::CarUpdated, car);
    let payload = serde_json::to_string(&envelope).map_err(|err| err.to_string())?;
    shared.published_ns[index].store(shared.now_ns().max(1), Ordering::Relaxed);
    bus.publish(EventType::CarUpdated, &payload)
        .await
        .map_err(|err| crate::truncate(&err.to_string()))
}

/// Connections that share one minted user, within the gateway's default
/// MAX_CONNECTIONS_PER_USER (100). With `--auth` every connection is the one logged-in user, so
/// that gateway needs MAX_CONNECTIONS_PER_USER=0 (or at least `--connections`).
const CONNECTIONS_PER_USER: u32 = 100;

/// The access tokens the connections use: with `--auth` the one from logging in; else one
/// minted per [`CONNECTIONS_PER_USER`] connections, each for a user of its own.
async fn obtain_tokens(
    args: &SubscribeArgs,
    minter: Option<&Minter>,
) -> Result<Vec<String>, String> {
    if let Some(auth) = &args.auth {
        let client = awc::Client::builder()
            .timeout(Duration::from_secs(30))
            .finish();
        let credentials = json!({"username": args.username, "password": args.password});
        let pair = crate::post(
            &client,
            &format!("{}/api/token/", auth.trim_end_matches('/')),
            &credentials,
            None,
        )
        .await?;
        return pair["access"]
            .as_str()
            .map(|token| vec![token.to_owned()])
            .ok_or_else(|| "login returned no access token".to_owned());
    }
    let minter = minter.ok_or("give --jwt-secret (or JWT_SECRET), --demo-secret, or --auth")?;
    let users = args.connections.div_ceil(CONNECTIONS_PER_USER).max(1);
    (1..=i64::from(users))
        .map(|user_id| minter.mint(user_id))
        .collect()
}

/// Signs access tokens as auth-service would: the first ones, and with --renew-every-secs the
/// renewals.
struct Minter {
    keys: JwtKeys,
    lifetime_secs: u64,
}

/// The minter, unless the tokens come from logging in (--auth).
fn minter(args: &SubscribeArgs) -> Result<Option<Minter>, String> {
    if args.auth.is_some() {
        return Ok(None);
    }
    let secret = match (&args.jwt_secret, args.demo_secret) {
        (Some(secret), _) => secret.clone(),
        (None, true) => common::jwt::DEMO_SECRET.to_owned(),
        (None, false) => return Ok(None),
    };
    let settings = JwtOnly::try_parse_from([
        "loadgen",
        "--jwt-algorithm=HS256",
        &format!("--jwt-secret={secret}"),
    ])
    .map_err(|err| format!("JWT settings: {err}"))?;
    let (keys, _) = JwtKeys::from_args(&settings.jwt, SecretPolicy::RequireConfigured)
        .map_err(|err| err.to_string())?;
    Ok(Some(Minter {
        keys,
        lifetime_secs: args.token_lifetime_secs.unwrap_or(args.max_seconds + 600),
    }))
}

/// The JWT settings as the services parse them, so the key id is derived exactly as the gateway
/// derives it.
#[derive(Parser)]
struct JwtOnly {
    #[command(flatten)]
    jwt: common::config::JwtArgs,
}

impl Minter {
    fn mint(&self, user_id: i64) -> Result<String, String> {
        let now = chrono_now();
        self.keys
            .signing
            .sign(&Claims {
                token_type: TokenType::Access,
                exp: now + self.lifetime_secs as i64,
                iat: now,
                jti: new_jti(),
                user_id,
                username: format!("loadgen-{user_id}"),
            })
            .map_err(|err| format!("cannot sign the token: {err}"))
    }
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn started_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// One client thread: its share of the connections (every `threads`-th), ramped at its share of
/// the rate, each in a task of its own; returns when all have ended.
#[allow(clippy::too_many_arguments)]
async fn client_thread(
    thread: u32,
    threads: u32,
    args: SubscribeArgs,
    shared: Arc<Shared>,
    tokens: Arc<Vec<String>>,
    minter: Option<Arc<Minter>>,
    target: Target,
    stop: Arc<Stop>,
) -> Tally {
    let args = Arc::new(args);
    let target = Arc::new(target);
    let inits: Vec<Arc<String>> = tokens
        .iter()
        .map(|token| Arc::new(init_message(args.protocol, token)))
        .collect();
    let thread_rate = f64::from(args.rate) / f64::from(threads);
    let ramp_start = Instant::now();
    let mut tasks = Vec::new();
    let mut nth = 0u32;
    let mut index = thread;
    while index < args.connections {
        if stop.flag.load(Ordering::Relaxed) {
            break;
        }
        let due = ramp_start + Duration::from_secs_f64(f64::from(nth) / thread_rate);
        tokio::time::sleep_until(due.into()).await;
        let user = (index / CONNECTIONS_PER_USER) as usize % inits.len();
        // Renewals start spread over one period, so that they do not all come at once.
        let renew = args.renew_every_secs.map(|every| {
            let first = Duration::from_secs_f64(
                every as f64 * f64::from(index) / f64::from(args.connections),
            );
            (first, Duration::from_secs(every))
        });
        tasks.push(tokio::spawn(subscriber(Subscription {
            local: Ipv4Addr::new(127, 0, 0, (1 + index % SOURCE_ADDRESSES) as u8),
            target: target.clone(),
            args: args.clone(),
            init: inits[user].clone(),
            user_id: user as i64 + 1,
            minter: minter.clone(),
            renew,
            pk_index: index as usize % args.pks.len(),
            shared: shared.clone(),
            stop: stop.clone(),
        })));
        nth += 1;
        index += threads;
    }
    let mut tally = Tally::default();
    for task in tasks {
        if let Ok(own) = task.await {
            merge(&mut tally, own);
        }
    }
    tally
}

fn init_message(protocol: WsProtocol, token: &str) -> String {
    let _ = protocol; // Both protocols open with the same `connection_init`.
    json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {token}")}})
        .to_string()
}

fn subscribe_message(protocol: WsProtocol, pk: i64, resume_from: Option<&str>) -> String {
    let kind = match protocol {
        WsProtocol::TransportWs => "subscribe",
        WsProtocol::LegacyWs => "start",
    };
    let mut payload = json!({
        "query": format!("subscription {{ carModelUpdated(pk: {pk}) {{ id make model }} }}"),
    });
    if let Some(cursor) = resume_from {
        payload["extensions"] = json!({ "resumeFrom": cursor });
    }
    json!({"id": "1", "type": kind, "payload": payload}).to_string()
}

/// The end of the run, as the client tasks see it. A busy socket is always readable and its read
/// comes first, so the flag is read after every read; a task waiting on an idle socket needs the
/// wake-up, through one waiter it registers for its whole life. A `watch` channel polled beside
/// each read instead enrolled and removed a waiter per message: 5% of loadgen's CPU samples.
#[derive(Default)]
struct Stop {
    flag: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Stop {
    fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
}

/// Where `--target` points: resolved once, not per socket.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    addr: SocketAddr,
    /// `host[:port]` as written, for the `Host` header.
    authority: String,
    /// Path and query of the request line.
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, String> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| format!("--target {url}: only ws:// URLs are supported"))?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(at) if rest[at..].starts_with('?') => (&rest[..at], format!("/{}", &rest[at..])),
            Some(at) => (&rest[..at], rest[at..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        // A port is what follows the last ':' outside an IPv6 literal's brackets.
        let has_port = authority
            .rfind(':')
            .is_some_and(|colon| authority.rfind(']').is_none_or(|bracket| colon > bracket));
        let with_port = if has_port {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        // Every socket is bound to a 127.0.0.x source, so only an IPv4 target can be reached.
        let addr = with_port
            .to_socket_addrs()
            .map_err(|err| format!("--target {url}: {err}"))?
            .find(SocketAddr::is_ipv4)
            .ok_or_else(|| format!("--target {url}: no IPv4 address"))?;
        Ok(Target {
            addr,
            authority: authority.to_owned(),
            path,
        })
    }
}

/// How a connection attempt ended before its subscription started.
enum Handshake {
    Failed(String),
    Closed(String),
}

impl Handshake {
    fn count(self, tally: &mut Tally) {
        match self {
            Handshake::Failed(kind) => *tally.connect_errors.entry(kind).or_insert(0) += 1,
            Handshake::Closed(code) => {
                *tally
                    .closes
                    .entry(format!("{code} before ack"))
                    .or_insert(0) += 1
            }
        }
    }
}

/// What one subscriber task is given.
struct Subscription {
    local: Ipv4Addr,
    target: Arc<Target>,
    args: Arc<SubscribeArgs>,
    init: Arc<String>,
    user_id: i64,
    minter: Option<Arc<Minter>>,
    /// With --renew-every-secs: the first renewal's delay, then the period.
    renew: Option<(Duration, Duration)>,
    pk_index: usize,
    shared: Arc<Shared>,
    stop: Arc<Stop>,
}

/// What a subscriber carries from one connection to the next.
struct Progress {
    /// The cursor of the last delivery (--resume).
    cursor: Option<String>,
    /// Events received, one bit each, to tell a duplicate from a first delivery.
    seen: Vec<u64>,
    /// `connection_init` with the newest token (a renewed one after a renewal).
    init: Arc<String>,
    next_renewal: Option<Instant>,
}

/// One subscriber: connect, init, subscribe, then record deliveries until told to stop or closed;
/// with --resume, closed is followed by a reconnect that resumes from the last cursor. It keeps a
/// tally of its own, merged when it ends, so that a delivery touches nothing shared but its
/// event's counter.
async fn subscriber(sub: Subscription) -> Tally {
    let shared = &sub.shared;
    let args = &sub.args;
    let mut tally = Tally::default();
    let mut progress = Progress {
        cursor: None,
        seen: vec![0; shared.delivered.len().div_ceil(64)],
        init: sub.init.clone(),
        next_renewal: sub.renew.map(|(first, _)| Instant::now() + first),
    };
    let pk = args.pks[sub.pk_index];
    let began = Instant::now();
    let mut conn = match handshake(
        sub.local,
        &sub.target,
        args.protocol,
        &progress.init,
        subscribe_message(args.protocol, pk, None),
    )
    .await
    {
        Ok(conn) => conn,
        Err(outcome) => {
            outcome.count(&mut tally);
            shared.attempted.fetch_add(1, Ordering::Relaxed);
            return tally;
        }
    };
    tally
        .handshake_us
        .push(began.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    shared.live_by_pk[sub.pk_index].fetch_add(1, Ordering::Relaxed);
    shared.established.fetch_add(1, Ordering::Relaxed);
    shared
        .last_established_ns
        .fetch_max(shared.now_ns(), Ordering::Relaxed);
    shared.attempted.fetch_add(1, Ordering::Relaxed);

    // One waiter for the subscriber's life, registered before the flag is first read, so a stop
    // between the two still wakes this task; re-polling it costs no new registration.
    let stopped = sub.stop.notify.notified();
    tokio::pin!(stopped);
    stopped.as_mut().enable();
    loop {
        let ended = serve(&sub, &mut conn, &mut progress, &mut tally, stopped.as_mut()).await;
        let Some(kind) = ended else {
            // Our own stop: say goodbye without waiting for the answer.
            let _ = tokio::time::timeout(
                Duration::from_millis(200),
                conn.send(Message::Close(Some(CloseCode::Normal.into()))),
            )
            .await;
            break;
        };
        *tally.closes.entry(kind).or_insert(0) += 1;
        if !args.resume || sub.stop.flag.load(Ordering::Relaxed) {
            shared.live_by_pk[sub.pk_index].fetch_sub(1, Ordering::Relaxed);
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            break;
        }
        let dropped_ns = shared.now_ns();
        match reconnect(&sub, &progress, &mut tally).await {
            Some((again, resubscribed_ns)) => {
                conn = again;
                tally.resumes.push(Resumed {
                    dropped_ns,
                    resubscribed_ns,
                    caught_up_ns: resubscribed_ns,
                });
            }
            None => {
                tally.gave_up += 1;
                shared.live_by_pk[sub.pk_index].fetch_sub(1, Ordering::Relaxed);
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
    caught_up(&mut tally, shared);
    tally
}

/// Connects again and subscribes from the last cursor; `None` when every attempt failed or the
/// run is stopping.
async fn reconnect(
    sub: &Subscription,
    progress: &Progress,
    tally: &mut Tally,
) -> Option<(WsConn, u64)> {
    let args = &sub.args;
    let pk = args.pks[sub.pk_index];
    for _ in 0..args.reconnect_attempts {
        if sub.stop.flag.load(Ordering::Relaxed) {
            return None;
        }
        let subscribe = subscribe_message(args.protocol, pk, progress.cursor.as_deref());
        match handshake(
            sub.local,
            &sub.target,
            args.protocol,
            &progress.init,
            subscribe,
        )
        .await
        {
            Ok(conn) => return Some((conn, sub.shared.now_ns())),
            Err(outcome) => outcome.count(tally),
        }
        let jitter = rand::random::<u64>() % 100;
        tokio::time::sleep(Duration::from_millis(100 + jitter)).await;
    }
    None
}

/// For every reconnect, when the subscriber held each event published before it subscribed
/// again: the latest receipt, after that moment, of such an event.
fn caught_up(tally: &mut Tally, shared: &Shared) {
    for resumed in &mut tally.resumes {
        let at = resumed.resubscribed_ns;
        resumed.caught_up_ns = tally
            .receipts
            .iter()
            .filter(|(index, received)| {
                let published = shared.published_ns[*index as usize].load(Ordering::Relaxed);
                *received >= at && published > 0 && published <= at
            })
            .map(|(_, received)| *received)
            .max()
            .unwrap_or(at);
    }
}

/// What woke a subscriber waiting on its socket.
enum Wake {
    Read(std::io::Result<usize>),
    Stop,
    Renew,
}

/// Records one connection's deliveries until it ends: `None` for the run's stop, else why.
async fn serve(
    sub: &Subscription,
    conn: &mut WsConn,
    progress: &mut Progress,
    tally: &mut Tally,
    mut stopped: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
) -> Option<String> {
    let shared = &sub.shared;
    let mut renewal = progress
        .next_renewal
        .map(|at| Box::pin(tokio::time::sleep_until(at.into())));
    let mut renewal_sent: Option<Instant> = None;
    // Frames decoded from bytes of the handshake's last read count from the end of the handshake.
    let mut received_ns = shared.now_ns();
    loop {
        let frame = match conn.buffered_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                if sub.stop.flag.load(Ordering::Relaxed) {
                    return None;
                }
                // The socket first: while it has data, the stop is seen through the flag.
                let wake = poll_fn(|cx| {
                    if let Poll::Ready(read) = conn.poll_read(cx) {
                        return Poll::Ready(Wake::Read(read));
                    }
                    if stopped.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Wake::Stop);
                    }
                    match renewal.as_mut() {
                        Some(timer) => timer.as_mut().poll(cx).map(|()| Wake::Renew),
                        None => Poll::Pending,
                    }
                })
                .await;
                match wake {
                    Wake::Read(Ok(0)) => return Some("eof".into()),
                    Wake::Read(Ok(_)) => received_ns = shared.now_ns(),
                    Wake::Read(Err(err)) => return Some(websocket_error(&err)),
                    Wake::Stop => return None,
                    Wake::Renew => {
                        let (_, every) = sub.renew.unwrap_or_default();
                        let next = Instant::now() + every;
                        progress.next_renewal = Some(next);
                        renewal = Some(Box::pin(tokio::time::sleep_until(next.into())));
                        let Some(minter) = &sub.minter else { continue };
                        let token = match minter.mint(sub.user_id) {
                            Ok(token) => token,
                            Err(kind) => {
                                *tally.protocol_errors.entry(kind).or_insert(0) += 1;
                                continue;
                            }
                        };
                        let authorization = format!("Bearer {token}");
                        let ping =
                            json!({"type": "ping", "payload": {"Authorization": authorization}});
                        if conn
                            .send(Message::Text(ping.to_string().into()))
                            .await
                            .is_err()
                        {
                            return Some("send failed".into());
                        }
                        // A reconnect after this one opens with the newest token.
                        progress.init = Arc::new(init_message(sub.args.protocol, &token));
                        tally.renewals_sent += 1;
                        renewal_sent = Some(Instant::now());
                    }
                }
                continue;
            }
            Err(err) => return Some(websocket_error(&err)),
        };
        match frame {
            Frame::Text(bytes) => match classify(&bytes) {
                Incoming::Data => match event_index(&bytes, &shared.run) {
                    Some(index) if index < shared.delivered.len() => {
                        if sub.args.resume {
                            if let Some(cursor) = result_cursor(&bytes) {
                                progress.cursor = Some(cursor.to_owned());
                            }
                            if contains(&bytes, br#""recovered":false"#) {
                                tally.unrecovered += 1;
                            }
                        }
                        let (word, bit) = (index / 64, 1u64 << (index % 64));
                        if progress.seen[word] & bit != 0 {
                            tally.duplicates += 1;
                            continue;
                        }
                        progress.seen[word] |= bit;
                        shared.delivered[index].fetch_add(1, Ordering::Relaxed);
                        tally.receipts.push((index as u32, received_ns));
                    }
                    _ => tally.foreign += 1,
                },
                Incoming::Ping => {
                    tally.keepalives += 1;
                    let pong = Message::Text(r#"{"type":"pong"}"#.into());
                    if conn.send(pong).await.is_err() {
                        return Some("send failed".into());
                    }
                }
                Incoming::KeepAlive => match renewal_sent.take() {
                    Some(sent) if contains(&bytes, br#""exp":"#) => tally
                        .renewal_us
                        .push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32),
                    other => {
                        renewal_sent = other;
                        tally.keepalives += 1;
                    }
                },
                Incoming::Other(kind) => *tally.protocol_errors.entry(kind).or_insert(0) += 1,
            },
            Frame::Ping(bytes) => {
                if conn.send(Message::Pong(bytes)).await.is_err() {
                    return Some("send failed".into());
                }
            }
            Frame::Close(reason) => {
                return Some(reason.map_or("close without code".into(), |r| {
                    u16::from(r.code).to_string()
                }));
            }
            // The gateway sends small whole frames; a fragment means something else is talking.
            Frame::Continuation(_) => {
                *tally
                    .protocol_errors
                    .entry("continuation frame".into())
                    .or_insert(0) += 1
            }
            Frame::Binary(_) | Frame::Pong(_) => {}
        }
    }
}

fn contains(text: &[u8], needle: &[u8]) -> bool {
    text.windows(needle.len()).any(|w| w == needle)
}

/// `extensions.cursor` of a result, which the gateway writes as a plain string.
fn result_cursor(text: &[u8]) -> Option<&str> {
    let key = br#""cursor":""#;
    let start = text.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = &text[start..];
    let end = rest.iter().position(|b| *b == b'"')?;
    std::str::from_utf8(&rest[..end]).ok()
}

fn websocket_error(err: &dyn std::fmt::Display) -> String {
    format!("websocket error: {}", crate::truncate(&err.to_string()))
}

/// The upgrade (with the accept key and the subprotocol checked), `connection_init` →
/// `connection_ack`, and the subscription request.
async fn handshake(
    local: Ipv4Addr,
    target: &Target,
    protocol: WsProtocol,
    init: &str,
    subscribe: String,
) -> Result<WsConn, Handshake> {
    let (stream, leftover) = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        upgrade(local, target, protocol.name()),
    )
    .await
    {
        Err(_) => return Err(Handshake::Failed("upgrade timed out".into())),
        Ok(Err(kind)) => return Err(Handshake::Failed(kind)),
        Ok(Ok(parts)) => parts,
    };
    let mut conn = WsConn::new(stream, leftover);
    if conn.send(Message::Text(init.into())).await.is_err() {
        return Err(Handshake::Failed("send failed".into()));
    }
    let acked = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            match conn.next_frame().await {
                Ok(Some(Frame::Text(bytes))) => match classify(&bytes) {
                    Incoming::Other(kind) if kind == "connection_ack" => return Ok(()),
                    Incoming::Other(kind) => return Err(Handshake::Failed(kind)),
                    _ => continue,
                },
                Ok(Some(Frame::Close(reason))) => {
                    return Err(Handshake::Closed(
                        reason.map_or("close".into(), |r| u16::from(r.code).to_string()),
                    ))
                }
                Ok(Some(_)) => continue,
                Ok(None) => return Err(Handshake::Closed("eof".into())),
                Err(kind) => return Err(Handshake::Failed(kind)),
            }
        }
    })
    .await;
    match acked {
        Err(_) => return Err(Handshake::Failed("no connection_ack in time".into())),
        Ok(Err(outcome)) => return Err(outcome),
        Ok(Ok(())) => {}
    }
    if conn.send(Message::Text(subscribe.into())).await.is_err() {
        return Err(Handshake::Failed("send failed".into()));
    }
    Ok(conn)
}

/// Room asked for per read. A delivery is about 120 bytes, so this holds several; a busier socket
/// just reads again (its readiness is kept when a read fills the room). Small enough for malloc's
/// per-thread cache, since an idle connection's buffer is allocated anew on every delivery.
const READ_CHUNK: usize = 1024;
/// Largest upgrade response head accepted.
const MAX_RESPONSE_HEAD: usize = 8192;

/// Connects from `local`, sends the upgrade request and checks the response head. Returns the
/// stream and the bytes read past the head, which are already websocket frames.
async fn upgrade(
    local: Ipv4Addr,
    target: &Target,
    protocol: &str,
) -> Result<(TcpStream, BytesMut), String> {
    let io_kind = |err: std::io::Error| connect_error_kind(&err.to_string());
    let socket = TcpSocket::new_v4().map_err(io_kind)?;
    socket
        .bind(SocketAddr::new(IpAddr::V4(local), 0))
        .map_err(io_kind)?;
    socket.set_nodelay(true).map_err(io_kind)?;
    let stream = socket.connect(target.addr).await.map_err(io_kind)?;
    let key = BASE64_STANDARD.encode(rand::random::<[u8; 16]>());
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n",
        path = target.path,
        host = target.authority,
    );
    write_all(&stream, request.as_bytes())
        .await
        .map_err(io_kind)?;
    let mut buf = BytesMut::new();
    loop {
        if let Some(end) = head_end(&buf) {
            let rest = buf.split_off(end);
            check_upgrade(&buf, &key, protocol)?;
            return Ok((stream, rest));
        }
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err("response head too large".into());
        }
        let want = MAX_RESPONSE_HEAD - buf.len();
        match poll_fn(|cx| poll_read_some(&stream, &mut buf, want, cx)).await {
            Ok(0) => return Err("eof during upgrade".into()),
            Ok(_) => {}
            Err(err) => return Err(io_kind(err)),
        }
    }
}

/// Length of the response head (through its blank line), once all of it has been read.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4)
}

/// Checks an upgrade response head: status 101, `Upgrade: websocket`, the accept key derived from
/// ours, and the subprotocol we asked for.
fn check_upgrade(head: &[u8], key: &str, protocol: &str) -> Result<(), String> {
    const MALFORMED: &str = "malformed response head";
    let head = std::str::from_utf8(head).map_err(|_| MALFORMED.to_owned())?;
    let mut lines = head.split("\r\n");
    let mut status = lines.next().unwrap_or_default().split(' ');
    if !status.next().unwrap_or_default().starts_with("HTTP/1.") {
        return Err(MALFORMED.into());
    }
    let code: u16 = status
        .next()
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| MALFORMED.to_owned())?;
    if code != 101 {
        return Err(format!("HTTP {code}"));
    }
    let (mut upgraded, mut accept, mut agreed) = (false, None, None);
    for line in lines.filter(|line| !line.is_empty()) {
        let (name, value) = line.split_once(':').ok_or_else(|| MALFORMED.to_owned())?;
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("upgrade") {
            upgraded = value.eq_ignore_ascii_case("websocket");
        } else if name.eq_ignore_ascii_case("sec-websocket-accept") {
            accept = Some(value);
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            agreed = Some(value);
        }
    }
    if !upgraded {
        return Err("no Upgrade: websocket".into());
    }
    if accept.map(str::as_bytes) != Some(&hash_key(key.as_bytes())[..]) {
        return Err("wrong Sec-WebSocket-Accept".into());
    }
    if agreed != Some(protocol) {
        return Err("subprotocol not agreed".into());
    }
    Ok(())
}

/// Reads what the socket has into `buf` once it is readable, asking for at least `want` bytes of
/// room; `Ok(0)` is the end of the stream. A poll function rather than `readable().await`, so a
/// delivery costs no waiter list insertion and removal.
fn poll_read_some(
    stream: &TcpStream,
    buf: &mut BytesMut,
    want: usize,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<usize>> {
    loop {
        ready!(stream.poll_read_ready(cx))?;
        buf.reserve(want);
        let room = buf.capacity() - buf.len();
        match stream.try_read_buf(buf) {
            Ok(n) => {
                // A read that did not fill the room drained the socket (epoll is edge-triggered),
                // so forget the readiness now rather than pay a read that would block to learn it;
                // tokio's own `poll_read` does the same.
                if 0 < n && n < room {
                    let _ = stream.try_io(Interest::READABLE, || {
                        Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
                    });
                }
                return Poll::Ready(Ok(n));
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                // A stale readiness: do not keep the room just reserved while idle.
                if buf.is_empty() {
                    *buf = BytesMut::new();
                }
            }
            Err(err) => return Poll::Ready(Err(err)),
        }
    }
}

async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match stream.try_write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => stream.writable().await?,
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// The next frame among the bytes read so far. An emptied buffer is released, so that idle
/// connections (nearly all of them, nearly all the time) hold no read buffer.
fn decode_buffered(codec: &mut Codec, buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
    let frame = codec.decode(buf);
    if buf.is_empty() && buf.capacity() > 0 {
        *buf = BytesMut::new();
    }
    frame
}

/// A client websocket on a bare TCP stream: no pool, no boxed socket, no fixed-size buffers.
struct WsConn {
    stream: TcpStream,
    /// Client mode: frames it encodes are masked, frames it decodes must not be.
    codec: Codec,
    /// Bytes read and not decoded yet.
    buf: BytesMut,
}

impl WsConn {
    fn new(stream: TcpStream, leftover: BytesMut) -> Self {
        Self {
            stream,
            codec: Codec::new().client_mode().max_size(1 << 20),
            buf: leftover,
        }
    }

    fn buffered_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        decode_buffered(&mut self.codec, &mut self.buf)
    }

    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        poll_read_some(&self.stream, &mut self.buf, READ_CHUNK, cx)
    }

    /// The next frame, reading as needed; `None` at the end of the stream.
    async fn next_frame(&mut self) -> Result<Option<Frame>, String> {
        loop {
            if let Some(frame) = self.buffered_frame().map_err(|e| websocket_error(&e))? {
                return Ok(Some(frame));
            }
            let read = poll_fn(|cx| self.poll_read(cx)).await;
            if read.map_err(|e| websocket_error(&e))? == 0 {
                return Ok(None);
            }
        }
    }

    async fn send(&mut self, message: Message) -> Result<(), String> {
        let mut out = BytesMut::new();
        self.codec
            .encode(message, &mut out)
            .map_err(|e| websocket_error(&e))?;
        write_all(&self.stream, &out)
            .await
            .map_err(|e| websocket_error(&e))
    }
}

/// Connect errors by kind, without the parts that differ per socket.
/// E.g. "Failed to connect to host: Connection refused (os error 111)" → "Connection refused (os
/// error 111)".
fn connect_error_kind(message: &str) -> String {
    let message = crate::truncate(message);
    match message.rfind(": ") {
        Some(at) => message[at + 2..].to_owned(),
        None => message,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Incoming {
    /// `next` / `data`: a delivery.
    Data,
    /// graphql-transport-ws `ping`: answered with `pong`.
    Ping,
    /// Legacy `ka`, or a `pong`.
    KeepAlive,
    /// Anything else, by its `type`.
    Other(String),
}

/// Tells messages apart by their leading `type`, which the gateway writes first; only the rare
/// other messages are parsed as JSON.
fn classify(text: &[u8]) -> Incoming {
    if text.starts_with(br#"{"type":"next""#) || text.starts_with(br#"{"type":"data""#) {
        return Incoming::Data;
    }
    if text.starts_with(br#"{"type":"ping""#) {
        return Incoming::Ping;
    }
    if text.starts_with(br#"{"type":"ka""#) || text.starts_with(br#"{"type":"pong""#) {
        return Incoming::KeepAlive;
    }
    let message = serde_json::from_slice::<Value>(text).ok();
    let kind = message
        .as_ref()
        .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| "not a message".into());
    // An operation's `error` says why in its first error's code.
    if kind == "error" {
        if let Some(code) = message
            .as_ref()
            .and_then(|v| v["payload"][0]["extensions"]["code"].as_str())
        {
            return Incoming::Other(format!("error {code}"));
        }
    }
    match kind.as_str() {
        "next" | "data" => Incoming::Data,
        "ping" => Incoming::Ping,
        "ka" | "pong" => Incoming::KeepAlive,
        _ => Incoming::Other(kind),
    }
}

/// The event index in a delivery's make (`"make":"<run>-<index>"`), when it is of this run.
fn event_index(text: &[u8], run: &str) -> Option<usize> {
    let key = br#""make":""#;
    let start = text.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = &text[start..];
    let end = rest.iter().position(|b| *b == b'"')?;
    let make = std::str::from_utf8(&rest[..end]).ok()?;
    make.strip_prefix(run)?.strip_prefix('-')?.parse().ok()
}

fn merge(total: &mut Tally, tally: Tally) {
    total.receipts.extend(tally.receipts);
    total.handshake_us.extend(tally.handshake_us);
    for (map, from) in [
        (&mut total.connect_errors, tally.connect_errors),
        (&mut total.closes, tally.closes),
        (&mut total.protocol_errors, tally.protocol_errors),
    ] {
        for (kind, n) in from {
            *map.entry(kind).or_insert(0) += n;
        }
    }
    total.keepalives += tally.keepalives;
    total.foreign += tally.foreign;
    total.duplicates += tally.duplicates;
    total.resumes.extend(tally.resumes);
    total.unrecovered += tally.unrecovered;
    total.gave_up += tally.gave_up;
    total.renewals_sent += tally.renewals_sent;
    total.renewal_us.extend(tally.renewal_us);
}

/// The reconnects of resuming subscribers, timed from the SIGTERM (or the first drop).
fn resume_figures(tally: &Tally, phases: &Phases) -> Value {
    let from_ns = phases
        .killed
        .as_ref()
        .map(|(at, _)| *at)
        .or_else(|| tally.resumes.iter().map(|r| r.dropped_ns).min());
    let since =
        |ns: Option<u64>| -> Option<f64> { Some(ns?.saturating_sub(from_ns?) as f64 / 1e9) };
    let mut drop_to_caught_up_us: Vec<u32> = tally
        .resumes
        .iter()
        .map(|r| {
            (r.caught_up_ns.saturating_sub(r.dropped_ns) / 1000).min(u64::from(u32::MAX)) as u32
        })
        .collect();
    drop_to_caught_up_us.sort_unstable();
    let ms = |p: f64| crate::percentile(&drop_to_caught_up_us, p);
    json!({
        "reconnects": tally.resumes.len(),
        "gave_up": tally.gave_up,
        "unrecovered": tally.unrecovered,
        "last_resubscribed_s": since(tally.resumes.iter().map(|r| r.resubscribed_ns).max()),
        "last_caught_up_s": since(tally.resumes.iter().map(|r| r.caught_up_ns).max()),
        "drop_to_caught_up_ms": {"p50": ms(50.0), "p99": ms(99.0), "max": ms(100.0)},
    })
}

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// User + system CPU time of a process (`self` or a pid), in seconds, from /proc/<pid>/stat.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at the state, field 3;
    // utime and stime are fields 14 and 15, in clock ticks of 1/100 s on Linux.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    let user: f64 = fields.next()?.parse().ok()?;
    let system: f64 = fields.next()?.parse().ok()?;
    Some((user + system) / 100.0)
}

/// This process's soft limit of open files.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|soft| soft.parse().ok())
}

fn report(
    args: &SubscribeArgs,
    shared: &Shared,
    mut tally: Tally,
    phases: Phases,
) -> Result<(), String> {
    let warmups = args.pks.len();
    let established = shared.established.load(Ordering::Relaxed);
    let ramp_secs = (shared.last_established_ns.load(Ordering::Relaxed) as f64
        - phases.ramp_started_ns as f64)
        / 1e9;
    let connections_per_sec = if ramp_secs > 0.0 {
        established as f64 / ramp_secs
    } else {
        f64::NAN
    };
    tally.handshake_us.sort_unstable();

    // Deliveries of measured events, and per event the latest one.
    let measured = phases.expected.len();
    let mut latencies_us: Vec<u32> = Vec::with_capacity(tally.receipts.len());
    let mut last_us: Vec<Option<u32>> = vec![None; measured];
    let mut first_us: Vec<Option<u32>> = vec![None; measured];
    let mut received: Vec<u64> = vec![0; measured];
    let mut last_receipt_ns = 0u64;
    for (index, at_ns) in &tally.receipts {
        let index = *index as usize;
        if index < warmups || index - warmups >= measured {
            continue;
        }
        let published = shared.published_ns[index].load(Ordering::Relaxed);
        let latency = (at_ns.saturating_sub(published) / 1000).min(u64::from(u32::MAX)) as u32;
        latencies_us.push(latency);
        let k = index - warmups;
        received[k] += 1;
        last_us[k] = Some(last_us[k].map_or(latency, |l| l.max(latency)));
        first_us[k] = Some(first_us[k].map_or(latency, |f| f.min(latency)));
        last_receipt_ns = last_receipt_ns.max(*at_ns);
    }
    latencies_us.sort_unstable();
    let mut last_sorted: Vec<u32> = last_us.iter().flatten().copied().collect();
    last_sorted.sort_unstable();
    let expected_total: u64 = phases.expected.iter().sum();
    let missing: u64 = phases
        .expected
        .iter()
        .zip(&received)
        .map(|(want, got)| want.saturating_sub(*got))
        .sum();
    let duplicates: u64 = tally.duplicates
        + phases
            .expected
            .iter()
            .zip(&received)
            .map(|(want, got)| got.saturating_sub(*want))
            .sum::<u64>();
    let resume = resume_figures(&tally, &phases);
    tally.renewal_us.sort_unstable();
    let delivered = latencies_us.len() as u64;
    let first_publish_ns = (warmups..warmups + measured)
        .map(|i| shared.published_ns[i].load(Ordering::Relaxed))
        .filter(|ns| *ns > 0)
        .min()
        .unwrap_or(phases.events_started_ns);
    let delivery_secs = (last_receipt_ns.saturating_sub(first_publish_ns)) as f64 / 1e9;
    let messages_per_sec = if delivery_secs > 0.0 {
        delivered as f64 / delivery_secs
    } else {
        f64::NAN
    };
    let per_connection = |rss: Option<u64>| match (phases.rss_before, rss) {
        (Some(before), Some(after)) if established > 0 => {
            Some((after as f64 - before as f64) / established as f64)
        }
        _ => None,
    };
    // Fan-out speed while events are being delivered: deliveries over the time during which at
    // least one event was on its way (the union of each event's publish-to-last-receipt span).
    let mut spans: Vec<(u64, u64)> = last_us
        .iter()
        .enumerate()
        .filter_map(|(k, last)| {
            let published = shared.published_ns[warmups + k].load(Ordering::Relaxed);
            last.map(|us| (published, published + u64::from(us) * 1000))
        })
        .collect();
    spans.sort_unstable();
    let mut busy_ns = 0u64;
    let mut covered_until = 0u64;
    for (start, end) in spans {
        let start = start.max(covered_until);
        if end > start {
            busy_ns += end - start;
            covered_until = end;
        }
    }
    let busy_secs = busy_ns as f64 / 1e9;
    let burst_per_sec = if busy_secs > 0.0 {
        delivered as f64 / busy_secs
    } else {
        f64::NAN
    };
    let per_delivery_us = |cpu: Option<f64>| {
        cpu.filter(|_| delivered > 0)
            .map(|secs| secs * 1e6 / delivered as f64)
    };
    let ms = |sorted: &[u32], p: f64| crate::percentile(sorted, p);

    let figures = json!({
        "scenario": "subscribe carModelUpdated",
        "protocol": args.protocol.name(),
        "connections": args.connections,
        "pks": args.pks,
        "threads": args.threads,
        "rate": args.rate,
        "established": established,
        "connections_per_second": connections_per_sec,
        "ramp_seconds": ramp_secs,
        "handshake_ms": {
            "p50": ms(&tally.handshake_us, 50.0),
            "p99": ms(&tally.handshake_us, 99.0),
            "max": ms(&tally.handshake_us, 100.0),
        },
        "live_at_idle": phases.live_at_idle,
        "warmup_complete": phases.warmup_complete,
        "events": measured,
        "events_per_second": args.events_per_sec,
        "deliveries": delivered,
        "deliveries_expected": expected_total,
        "messages_per_second": messages_per_sec,
        "messages_per_second_while_delivering": burst_per_sec,
        "delivery_ms": {
            "p50": ms(&latencies_us, 50.0),
            "p99": ms(&latencies_us, 99.0),
            "max": ms(&latencies_us, 100.0),
        },
        "last_delivery_per_event_ms": {
            "p50": ms(&last_sorted, 50.0),
            "p99": ms(&last_sorted, 99.0),
            "max": ms(&last_sorted, 100.0),
        },
        // Event by event, in publishing order: when its first and its last subscriber had it
        // (null: nobody did). A slow event with a late first delivery was held up before the
        // fan-out (Redis, the hub, the execution); one with an early first, during it.
        "by_event_ms": {
            "first": first_us.iter().map(|us| us.map(|us| f64::from(us) / 1000.0)).collect::<Vec<_>>(),
            "last": last_us.iter().map(|us| us.map(|us| f64::from(us) / 1000.0)).collect::<Vec<_>>(),
        },
        "errors": {
            "connect": tally.connect_errors,
            "closes": tally.closes,
            "protocol": tally.protocol_errors,
            "publish": phases.publish_errors,
            "missing_deliveries": missing,
            "duplicate_deliveries": duplicates,
            "foreign_deliveries": tally.foreign,
        },
        "keepalives": tally.keepalives,
        "gateway_rss_kib": {
            "before": phases.rss_before,
            "idle": phases.rss_idle,
            "end": phases.rss_end,
            "idle_per_connection": per_connection(phases.rss_idle),
            "end_per_connection": per_connection(phases.rss_end),
        },
        "cpu_seconds": {
            "ramp": {"gateway": phases.cpu_ramp.gateway, "loadgen": phases.cpu_ramp.loadgen},
            "events": {"gateway": phases.cpu_events.gateway, "loadgen": phases.cpu_events.loadgen},
            "gateway_us_per_delivery": per_delivery_us(phases.cpu_events.gateway),
            "loadgen_us_per_delivery": per_delivery_us(phases.cpu_events.loadgen),
        },
        "stopped_by_cap": phases.stopped_by_cap,
        "seconds": (phases.events_ended_ns as f64) / 1e9,
        "resume": resume,
        "renewals": {
            "every_secs": args.renew_every_secs,
            "token_lifetime_secs": args.token_lifetime_secs,
            "sent": tally.renewals_sent,
            "answered": tally.renewal_us.len(),
            "ping_to_pong_ms": {
                "p50": ms(&tally.renewal_us, 50.0),
                "p99": ms(&tally.renewal_us, 99.0),
                "max": ms(&tally.renewal_us, 100.0),
            },
        },
    });

    println!(
        "subscribe {} ({}), {} threads: {}/{} established in {:.2} s = {:.0} conn/s; handshake p50 {:.2} ms, p99 {:.2} ms",
        args.protocol.name(),
        if args.pks.len() == 1 { format!("pk {}", args.pks[0]) } else { format!("pks {:?}", args.pks) },
        args.threads,
        established,
        args.connections,
        ramp_secs,
        connections_per_sec,
        ms(&tally.handshake_us, 50.0),
        ms(&tally.handshake_us, 99.0),
    );
    if !phases.warmup_complete {
        println!("  warm-up: not every subscriber got the warm-up event in time");
    }
    println!(
        "{:>7} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>10} {:>10} {:>10}",
        "events",
        "deliver",
        "missing",
        "msg/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "last p50",
        "last p99",
        "last max"
    );
    println!(
        "{:>7} {:>9} {:>9} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>10.2} {:>10.2} {:>10.2}",
        measured,
        delivered,
        missing,
        messages_per_sec,
        ms(&latencies_us, 50.0),
        ms(&latencies_us, 99.0),
        ms(&latencies_us, 100.0),
        ms(&last_sorted, 50.0),
        ms(&last_sorted, 99.0),
        ms(&last_sorted, 100.0),
    );
    let secs = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
    println!(
        "fan-out while delivering: {burst_per_sec:.0} msg/s; CPU s during events: gateway {} ({} µs/delivery), loadgen {} ({} µs/delivery); during ramp: gateway {}, loadgen {}",
        secs(phases.cpu_events.gateway),
        secs(per_delivery_us(phases.cpu_events.gateway)),
        secs(phases.cpu_events.loadgen),
        secs(per_delivery_us(phases.cpu_events.loadgen)),
        secs(phases.cpu_ramp.gateway),
        secs(phases.cpu_ramp.loadgen),
    );
    let kib = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    let per = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    if args.gateway_pid.is_some() {
        println!(
            "gateway RSS KiB: before {}, idle {} ({} KiB/conn), end {} ({} KiB/conn)",
            kib(phases.rss_before),
            kib(phases.rss_idle),
            per(per_connection(phases.rss_idle)),
            kib(phases.rss_end),
            per(per_connection(phases.rss_end)),
        );
    }
    for (label, map) in [
        ("connect error", &figures["errors"]["connect"]),
        ("closed", &figures["errors"]["closes"]),
        ("protocol message", &figures["errors"]["protocol"]),
        ("publish error", &figures["errors"]["publish"]),
    ] {
        if let Some(map) = map.as_object() {
            for (kind, n) in map {
                println!("  {label} {kind}: {n}");
            }
        }
    }
    if duplicates > 0 || tally.foreign > 0 {
        println!(
            "  duplicate deliveries: {duplicates}, foreign: {}",
            tally.foreign
        );
    }
    if args.resume || args.kill_pid.is_some() {
        let s = |v: &Value| v.as_f64().map_or("-".to_owned(), |v| format!("{v:.2}"));
        println!(
            "resume: {} reconnects, {} gave up, {} recovered:false; from {}: last resubscribed +{} s, last caught up +{} s; drop → caught up per reconnect p50 {} ms, p99 {} ms, max {} ms",
            resume["reconnects"],
            resume["gave_up"],
            resume["unrecovered"],
            if phases.killed.is_some() { "the SIGTERM" } else { "the first drop" },
            s(&resume["last_resubscribed_s"]),
            s(&resume["last_caught_up_s"]),
            s(&resume["drop_to_caught_up_ms"]["p50"]),
            s(&resume["drop_to_caught_up_ms"]["p99"]),
            s(&resume["drop_to_caught_up_ms"]["max"]),
        );
        if let Some((_, Err(err))) = &phases.killed {
            println!("  kill failed: {err}");
        }
    }
    if args.renew_every_secs.is_some() {
        println!(
            "renewals: {} sent, {} answered with the new exp; ping → pong p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            tally.renewals_sent,
            tally.renewal_us.len(),
            ms(&tally.renewal_us, 50.0),
            ms(&tally.renewal_us, 99.0),
            ms(&tally.renewal_us, 100.0),
        );
    }
    if phases.stopped_by_cap {
        println!("  stopped by --max-seconds");
    }
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&figures).unwrap_or_default(),
        )
        .map_err(|err| format!("cannot write {}: {err}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_classified_by_their_leading_type() {
        assert_eq!(classify(br#"{"type":"next","id":"1"}"#), Incoming::Data);
        assert_eq!(classify(br#"{"type":"data","id":"1"}"#), Incoming::Data);
        assert_eq!(classify(br#"{"type":"ping"}"#), Incoming::Ping);
        assert_eq!(classify(br#"{"type":"ka"}"#), Incoming::KeepAlive);
        assert_eq!(classify(br#"{"id":"1","type":"next"}"#), Incoming::Data);
        assert_eq!(
            classify(br#"{"type":"connection_ack"}"#),
            Incoming::Other("connection_ack".into())
        );
        assert_eq!(classify(b"nope"), Incoming::Other("not a message".into()));
        assert_eq!(
            classify(br#"{"type":"error","id":"1","payload":[{"message":"x","extensions":{"code":"SERVICE_UNAVAILABLE"}}]}"#),
            Incoming::Other("error SERVICE_UNAVAILABLE".into())
        );
    }

    #[test]
    fn connect_errors_are_grouped_by_their_cause() {
        assert_eq!(
            connect_error_kind("Failed to connect to host: Connection refused (os error 111)"),
            "Connection refused (os error 111)"
        );
        assert_eq!(
            connect_error_kind("Timeout while waiting for response"),
            "Timeout while waiting for response"
        );
    }

    /// A response head as the gateway writes it, for `key`.
    fn response_head(key: &str, protocol: &str) -> String {
        let accept = String::from_utf8_lossy(&hash_key(key.as_bytes())).into_owned();
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
             sec-websocket-accept: {accept}\r\nsec-websocket-protocol: {protocol}\r\n\r\n"
        )
    }

    /// An unmasked server frame with a payload under 126 bytes.
    fn server_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![first, payload.len() as u8];
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn the_upgrade_response_is_checked() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = response_head(key, "graphql-transport-ws");
        assert_eq!(
            check_upgrade(ok.as_bytes(), key, "graphql-transport-ws"),
            Ok(())
        );
        // RFC 6455's own example of a key and its accept value.
        let rfc = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: graphql-ws\r\n\r\n";
        assert_eq!(check_upgrade(rfc.as_bytes(), key, "graphql-ws"), Ok(()));
        let other_key = response_head("AAAAAAAAAAAAAAAAAAAAAA==", "graphql-transport-ws");
        assert_eq!(
            check_upgrade(other_key.as_bytes(), key, "graphql-transport-ws"),
            Err("wrong Sec-WebSocket-Accept".into())
        );
        assert_eq!(
            check_upgrade(ok.as_bytes(), key, "graphql-ws"),
            Err("subprotocol not agreed".into())
        );
        let no_protocol = ok.replace("sec-websocket-protocol: graphql-transport-ws\r\n", "");
        assert_eq!(
            check_upgrade(no_protocol.as_bytes(), key, "graphql-transport-ws"),
            Err("subprotocol not agreed".into())
        );
        let not_upgraded = ok.replace("upgrade: websocket", "upgrade: h2c");
        assert_eq!(
            check_upgrade(not_upgraded.as_bytes(), key, "graphql-transport-ws"),
            Err("no Upgrade: websocket".into())
        );
        assert_eq!(
            check_upgrade(
                b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n",
                key,
                "x"
            ),
            Err("HTTP 403".into())
        );
        for garbage in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 abc\r\n\r\n",
            b"\xff\r\n\r\n",
        ] {
            assert_eq!(
                check_upgrade(garbage, key, "x"),
                Err("malformed response head".into())
            );
        }
    }

    #[test]
    fn the_head_ends_at_its_blank_line_however_it_is_split() {
        let head = response_head("dGhlIHNhbXBsZSBub25jZQ==", "graphql-ws");
        let mut bytes = head.clone().into_bytes();
        bytes.extend_from_slice(&server_frame(0x81, b"{}"));
        for cut in 0..head.len() {
            assert_eq!(head_end(&bytes[..cut]), None, "cut at {cut}");
        }
        assert_eq!(head_end(&bytes), Some(head.len()));
    }

    #[test]
    fn frames_are_decoded_and_an_emptied_buffer_released() {
        let mut codec = Codec::new().client_mode().max_size(1 << 20);
        let text = server_frame(0x81, br#"{"type":"next"}"#);
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        buf.extend_from_slice(&text[..5]);
        assert!(matches!(decode_buffered(&mut codec, &mut buf), Ok(None)));
        assert!(buf.capacity() > 0, "a partial frame stays buffered");
        buf.extend_from_slice(&text[5..]);
        match decode_buffered(&mut codec, &mut buf) {
            Ok(Some(Frame::Text(bytes))) => assert_eq!(&bytes[..], br#"{"type":"next"}"#),
            other => panic!("not the text frame: {other:?}"),
        }
        assert_eq!(buf.capacity(), 0);
        // A fragment is reported as what it is, not reassembled.
        let mut buf = BytesMut::from(&server_frame(0x01, b"{")[..]);
        assert!(matches!(
            decode_buffered(&mut codec, &mut buf),
            Ok(Some(Frame::Continuation(_)))
        ));
        // A masked frame from the server is a protocol error.
        let mut buf = BytesMut::from(&[0x81u8, 0x80, 1, 2, 3, 4][..]);
        assert!(decode_buffered(&mut codec, &mut buf).is_err());
    }

    #[test]
    fn targets_are_parsed_into_address_host_and_path() {
        let target = Target::parse("ws://127.0.0.1:18013/graphql/").expect("a valid target");
        assert_eq!(target.addr, "127.0.0.1:18013".parse().expect("an address"));
        assert_eq!(target.authority, "127.0.0.1:18013");
        assert_eq!(target.path, "/graphql/");
        let target = Target::parse("ws://127.0.0.2?x=1").expect("a valid target");
        assert_eq!(target.addr, "127.0.0.2:80".parse().expect("an address"));
        assert_eq!(target.path, "/?x=1");
        assert!(Target::parse("wss://127.0.0.1/graphql").is_err());
        assert!(Target::parse("ws://[::1]:8003/graphql").is_err());
    }

    /// The client against a scripted server: the request it writes, a response head that arrives
    /// in two reads with a frame right behind it, and masked frames going out.
    #[test]
    fn the_client_upgrades_and_frames_over_a_real_socket() {
        use std::io::{Read as _, Write as _};

        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
        let port = listener.local_addr().expect("its address").port();
        let server = std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().expect("a connection");
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while head_end(&request).is_none() {
                socket.read_exact(&mut byte).expect("the request");
                request.push(byte[0]);
            }
            let request = String::from_utf8(request).expect("a text request");
            let key = request
                .lines()
                .find_map(|line| line.strip_prefix("Sec-WebSocket-Key: "))
                .expect("a key")
                .to_owned();
            let head = response_head(&key, "graphql-transport-ws");
            let split = head.len() - 3;
            socket.write_all(&head.as_bytes()[..split]).expect("write");
            socket.flush().expect("flush");
            std::thread::sleep(Duration::from_millis(50));
            let mut rest = head.as_bytes()[split..].to_vec();
            rest.extend_from_slice(&server_frame(0x81, br#"{"type":"connection_ack"}"#));
            socket.write_all(&rest).expect("write");
            let mut frame = [0u8; 8];
            socket.read_exact(&mut frame).expect("a client frame");
            socket
                .write_all(&server_frame(0x89, b"hi"))
                .expect("a ping");
            let mut pong = [0u8; 8];
            socket.read_exact(&mut pong).expect("the pong");
            (request, frame, pong)
        });

        let target = Target::parse(&format!("ws://127.0.0.1:{port}/graphql/")).expect("a target");
        actix_web::rt::System::new().block_on(async {
            let local = Ipv4Addr::new(127, 0, 0, 7);
            let (stream, leftover) = upgrade(local, &target, "graphql-transport-ws")
                .await
                .expect("an upgrade");
            assert_eq!(
                stream.local_addr().expect("its address").ip(),
                IpAddr::V4(local)
            );
            let mut conn = WsConn::new(stream, leftover);
            match conn.next_frame().await {
                Ok(Some(Frame::Text(bytes))) => {
                    assert_eq!(classify(&bytes), Incoming::Other("connection_ack".into()))
                }
                other => panic!("not the ack: {other:?}"),
            }
            conn.send(Message::Text("{}".into())).await.expect("a send");
            match conn.next_frame().await {
                Ok(Some(Frame::Ping(bytes))) => {
                    conn.send(Message::Pong(bytes)).await.expect("a pong")
                }
                other => panic!("not the ping: {other:?}"),
            }
        });
        let (request, frame, pong) = server.join().expect("the server");
        assert!(request.starts_with("GET /graphql/ HTTP/1.1\r\n"));
        for header in [
            &format!("Host: 127.0.0.1:{port}")[..],
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Version: 13",
            "Sec-WebSocket-Protocol: graphql-transport-ws",
        ] {
            assert!(request.lines().any(|line| line == header), "{header}");
        }
        assert_eq!(
            frame[..2],
            [0x81, 0x80 | 2],
            "a masked text frame of 2 bytes"
        );
        assert_eq!(
            pong[..2],
            [0x8a, 0x80 | 2],
            "a masked pong echoing the ping"
        );
    }

    #[test]
    fn a_result_s_cursor_is_kept_and_sent_back_as_resume_from() {
        let text = br#"{"type":"next","id":"1","payload":{"data":{"carModelUpdated":{"make":"lgab-3"}},"extensions":{"cursor":"e1:car.updated:17-0","recovered":false}}}"#;
        assert_eq!(result_cursor(text), Some("e1:car.updated:17-0"));
        assert!(contains(text, br#""recovered":false"#));
        assert_eq!(
            result_cursor(br#"{"type":"next","payload":{"data":{}}}"#),
            None
        );
        let resume: Value = serde_json::from_str(&subscribe_message(
            WsProtocol::TransportWs,
            1,
            Some("e1:car.updated:17-0"),
        ))
        .expect("JSON");
        assert_eq!(resume["type"], "subscribe");
        assert_eq!(
            resume["payload"]["extensions"]["resumeFrom"],
            "e1:car.updated:17-0"
        );
        let first: Value =
            serde_json::from_str(&subscribe_message(WsProtocol::LegacyWs, 2, None)).expect("JSON");
        assert_eq!(first["type"], "start");
        assert!(first["payload"].get("extensions").is_none());
    }

    #[test]
    fn deliveries_are_matched_by_the_make() {
        let text = br#"{"type":"next","id":"1","payload":{"data":{"carModelUpdated":{"id":"1","make":"lgab-17","model":"Octavia"}}}}"#;
        assert_eq!(event_index(text, "lgab"), Some(17));
        assert_eq!(event_index(text, "lgcd"), None);
        assert_eq!(event_index(br#"{"make":"Skoda"}"#, "lgab"), None);
    }
}
