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
//!    api-service would (`PUBLISH <prefix>events:car.updated`). Each carries a unique make, so
//!    every delivery is matched to its event and timed from just before the `PUBLISH`.
//! 5. **Drain.** Up to `--drain-secs` for the last deliveries; whatever has not arrived then is
//!    counted missing.
//!
//! The clock is one `Instant` shared by the publisher and the client threads, so publish and
//! receipt times are comparable. A receipt is stamped when the client decodes the frame, so the
//! figures include the client's own queueing (it shares the cores with the gateway).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use awc::ws;
use clap::{Args, Parser, ValueEnum};
use common::db::cars::Car;
use common::events::{Envelope, EventBus as _, EventType, RedisBus};
use common::jwt::{new_jti, Claims, JwtKeys, SecretPolicy, TokenType};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};

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
    if let Some(limit) = open_files_limit() {
        let needed = u64::from(args.connections) + 64;
        if needed > limit {
            return Err(format!(
                "{} connections need about {needed} file descriptors but `ulimit -n` is {limit}; raise it in this shell",
                args.connections
            ));
        }
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.max_seconds);
    let token = actix_web::rt::System::new().block_on(obtain_token(args))?;
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
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let threads = args.threads.min(args.connections);
    let ramp_started_ns = shared.now_ns();
    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let args = args.clone();
            let shared = shared.clone();
            let token = token.clone();
            let stop = stop_rx.clone();
            std::thread::spawn(move || {
                actix_web::rt::System::new()
                    .block_on(client_thread(thread, threads, args, shared, token, stop))
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
    let _ = stop_tx.send(true);
    let mut total = Tally::default();
    for handle in handles {
        let tally = handle
            .join()
            .map_err(|_| "a client thread panicked".to_owned())?;
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
    for k in 0..args.events as usize {
        ticks.tick().await;
        if Instant::now() >= deadline {
            stopped_by_cap = true;
            break;
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
    })
}

fn live_total(shared: &Shared) -> u64 {
    shared
        .live_by_pk
        .iter()
        .map(|n| n.load(Ordering::Relaxed))
        .sum()
}

/// Publishes event `index` for car `pk`, as api-service's write path does; the publish time is
/// taken just before the `PUBLISH`, so it is set before any delivery can arrive.
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

async fn obtain_token(args: &SubscribeArgs) -> Result<String, String> {
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
            .map(str::to_owned)
            .ok_or_else(|| "login returned no access token".to_owned());
    }
    let secret = match (&args.jwt_secret, args.demo_secret) {
        (Some(secret), _) => secret.clone(),
        (None, true) => common::jwt::DEMO_SECRET.to_owned(),
        (None, false) => {
            return Err("give --jwt-secret (or JWT_SECRET), --demo-secret, or --auth".into())
        }
    };
    mint(&secret, args.max_seconds)
}

/// The JWT settings as the services parse them, so the key id is derived exactly as the gateway
/// derives it.
#[derive(Parser)]
struct JwtOnly {
    #[command(flatten)]
    jwt: common::config::JwtArgs,
}

/// An access token as auth-service would sign it, valid for the whole run and a margin.
fn mint(secret: &str, run_secs: u64) -> Result<String, String> {
    let settings = JwtOnly::try_parse_from([
        "loadgen",
        "--jwt-algorithm=HS256",
        &format!("--jwt-secret={secret}"),
    ])
    .map_err(|err| format!("JWT settings: {err}"))?;
    let (keys, _) = JwtKeys::from_args(&settings.jwt, SecretPolicy::RequireConfigured)
        .map_err(|err| err.to_string())?;
    let now = chrono_now();
    keys.signing
        .sign(&Claims {
            token_type: TokenType::Access,
            exp: now + run_secs as i64 + 600,
            iat: now,
            jti: new_jti(),
            user_id: 1,
            username: "loadgen".into(),
        })
        .map_err(|err| format!("cannot sign the token: {err}"))
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
async fn client_thread(
    thread: u32,
    threads: u32,
    args: SubscribeArgs,
    shared: Arc<Shared>,
    token: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Tally {
    // One client per source address: awc binds the socket to the connector's local address.
    let clients: Vec<awc::Client> = (1..=SOURCE_ADDRESSES)
        .map(|x| {
            let local = IpAddr::V4(Ipv4Addr::new(127, 0, 0, x as u8));
            awc::Client::builder()
                .connector(
                    awc::Connector::new()
                        .local_address(local)
                        .timeout(HANDSHAKE_TIMEOUT)
                        // Upgraded sockets keep their pool permit for life: no limit.
                        .limit(0),
                )
                .finish()
        })
        .collect();
    let tally = Rc::new(RefCell::new(Tally::default()));
    let init = Rc::new(init_message(args.protocol, &token));
    let thread_rate = f64::from(args.rate) / f64::from(threads);
    let ramp_start = Instant::now();
    let mut tasks = Vec::new();
    let mut nth = 0u32;
    let mut index = thread;
    while index < args.connections {
        if *stop.borrow() {
            break;
        }
        let due = ramp_start + Duration::from_secs_f64(f64::from(nth) / thread_rate);
        tokio::time::sleep_until(due.into()).await;
        let client = clients[(index % SOURCE_ADDRESSES) as usize].clone();
        let pk_index = index as usize % args.pks.len();
        let subscribe = subscribe_message(args.protocol, args.pks[pk_index]);
        tasks.push(actix_web::rt::spawn(subscriber(
            client,
            args.target.clone(),
            args.protocol,
            init.clone(),
            subscribe,
            pk_index,
            shared.clone(),
            tally.clone(),
            stop.clone(),
        )));
        nth += 1;
        index += threads;
    }
    for task in tasks {
        let _ = task.await;
    }
    Rc::try_unwrap(tally)
        .map(RefCell::into_inner)
        .unwrap_or_default()
}

fn init_message(protocol: WsProtocol, token: &str) -> String {
    let _ = protocol; // Both protocols open with the same `connection_init`.
    json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {token}")}})
        .to_string()
}

fn subscribe_message(protocol: WsProtocol, pk: i64) -> String {
    let kind = match protocol {
        WsProtocol::TransportWs => "subscribe",
        WsProtocol::LegacyWs => "start",
    };
    json!({
        "id": "1",
        "type": kind,
        "payload": {"query": format!("subscription {{ carModelUpdated(pk: {pk}) {{ id make model }} }}")},
    })
    .to_string()
}

/// How a connection attempt ended before its subscription started.
enum Handshake {
    Failed(String),
    Closed(String),
}

/// One subscriber: connect, init, subscribe, then record deliveries until told to stop or closed.
#[allow(clippy::too_many_arguments)]
async fn subscriber(
    client: awc::Client,
    url: String,
    protocol: WsProtocol,
    init: Rc<String>,
    subscribe: String,
    pk_index: usize,
    shared: Arc<Shared>,
    tally: Rc<RefCell<Tally>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let began = Instant::now();
    let mut framed = match handshake(&client, &url, protocol, &init, subscribe).await {
        Ok(framed) => framed,
        Err(outcome) => {
            let mut tally = tally.borrow_mut();
            match outcome {
                Handshake::Failed(kind) => *tally.connect_errors.entry(kind).or_insert(0) += 1,
                Handshake::Closed(code) => {
                    *tally
                        .closes
                        .entry(format!("{code} before ack"))
                        .or_insert(0) += 1
                }
            }
            shared.attempted.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    tally
        .borrow_mut()
        .handshake_us
        .push(began.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    shared.live_by_pk[pk_index].fetch_add(1, Ordering::Relaxed);
    shared.established.fetch_add(1, Ordering::Relaxed);
    shared
        .last_established_ns
        .fetch_max(shared.now_ns(), Ordering::Relaxed);
    shared.attempted.fetch_add(1, Ordering::Relaxed);

    let ended: Option<String> = loop {
        tokio::select! {
            biased;
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break None;
                }
            }
            frame = framed.next() => match frame {
                Some(Ok(ws::Frame::Text(bytes))) => {
                    let received_ns = shared.now_ns();
                    match classify(&bytes) {
                        Incoming::Data => {
                            let mut tally = tally.borrow_mut();
                            match event_index(&bytes, &shared.run) {
                                Some(index) if index < shared.delivered.len() => {
                                    shared.delivered[index].fetch_add(1, Ordering::Relaxed);
                                    tally.receipts.push((index as u32, received_ns));
                                }
                                _ => tally.foreign += 1,
                            }
                        }
                        Incoming::Ping => {
                            tally.borrow_mut().keepalives += 1;
                            let pong = ws::Message::Text(r#"{"type":"pong"}"#.into());
                            if framed.send(pong).await.is_err() {
                                break Some("send failed".into());
                            }
                        }
                        Incoming::KeepAlive => tally.borrow_mut().keepalives += 1,
                        Incoming::Other(kind) => {
                            *tally.borrow_mut().protocol_errors.entry(kind).or_insert(0) += 1
                        }
                    }
                }
                Some(Ok(ws::Frame::Ping(bytes))) => {
                    if framed.send(ws::Message::Pong(bytes)).await.is_err() {
                        break Some("send failed".into());
                    }
                }
                Some(Ok(ws::Frame::Close(reason))) => {
                    break Some(reason.map_or("close without code".into(), |r| u16::from(r.code).to_string()));
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => break Some(format!("websocket error: {}", crate::truncate(&err.to_string()))),
                None => break Some("eof".into()),
            }
        }
    };
    match ended {
        Some(kind) => {
            shared.live_by_pk[pk_index].fetch_sub(1, Ordering::Relaxed);
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            *tally.borrow_mut().closes.entry(kind).or_insert(0) += 1;
        }
        None => {
            // Our own stop: say goodbye without waiting for the answer.
            let _ = tokio::time::timeout(
                Duration::from_millis(200),
                framed.send(ws::Message::Close(Some(ws::CloseCode::Normal.into()))),
            )
            .await;
        }
    }
}

/// The upgrade (with the subprotocol checked), `connection_init` → `connection_ack`, and the
/// subscription request.
async fn handshake(
    client: &awc::Client,
    url: &str,
    protocol: WsProtocol,
    init: &str,
    subscribe: String,
) -> Result<actix_codec::Framed<awc::BoxedSocket, ws::Codec>, Handshake> {
    let request = client
        .ws(url)
        .protocols([protocol.name()])
        .max_frame_size(1 << 20);
    let (response, mut framed) =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, request.connect()).await {
            Err(_) => return Err(Handshake::Failed("upgrade timed out".into())),
            Ok(Err(awc::error::WsClientError::InvalidResponseStatus(status))) => {
                return Err(Handshake::Failed(format!("HTTP {}", status.as_u16())))
            }
            Ok(Err(err)) => return Err(Handshake::Failed(connect_error_kind(&err.to_string()))),
            Ok(Ok(parts)) => parts,
        };
    let agreed = response
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        == Some(protocol.name());
    if !agreed {
        return Err(Handshake::Failed("subprotocol not agreed".into()));
    }
    if framed
        .send(ws::Message::Text(init.to_owned().into()))
        .await
        .is_err()
    {
        return Err(Handshake::Failed("send failed".into()));
    }
    let acked = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            match framed.next().await {
                Some(Ok(ws::Frame::Text(bytes))) => match classify(&bytes) {
                    Incoming::Other(kind) if kind == "connection_ack" => return Ok(()),
                    Incoming::Other(kind) => return Err(Handshake::Failed(kind)),
                    _ => continue,
                },
                Some(Ok(ws::Frame::Close(reason))) => {
                    return Err(Handshake::Closed(
                        reason.map_or("close".into(), |r| u16::from(r.code).to_string()),
                    ))
                }
                Some(Ok(_)) => continue,
                Some(Err(err)) => {
                    return Err(Handshake::Failed(format!(
                        "websocket error: {}",
                        crate::truncate(&err.to_string())
                    )))
                }
                None => return Err(Handshake::Closed("eof".into())),
            }
        }
    })
    .await;
    match acked {
        Err(_) => return Err(Handshake::Failed("no connection_ack in time".into())),
        Ok(Err(outcome)) => return Err(outcome),
        Ok(Ok(())) => {}
    }
    if framed
        .send(ws::Message::Text(subscribe.into()))
        .await
        .is_err()
    {
        return Err(Handshake::Failed("send failed".into()));
    }
    Ok(framed)
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
    let kind = serde_json::from_slice::<Value>(text)
        .ok()
        .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| "not a message".into());
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
    let duplicates: u64 = phases
        .expected
        .iter()
        .zip(&received)
        .map(|(want, got)| got.saturating_sub(*want))
        .sum();
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

    #[test]
    fn deliveries_are_matched_by_the_make() {
        let text = br#"{"type":"next","id":"1","payload":{"data":{"carModelUpdated":{"id":"1","make":"lgab-17","model":"Octavia"}}}}"#;
        assert_eq!(event_index(text, "lgab"), Some(17));
        assert_eq!(event_index(text, "lgcd"), None);
        assert_eq!(event_index(br#"{"make":"Skoda"}"#, "lgab"), None);
    }
}
