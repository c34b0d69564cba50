//! `loadgen subscribe`: websocket fan-out through subscription-gateway.
//!
//! The run has fixed phases, each bounded by `--max-seconds` for the whole run:
//! 1. **Ramp.** `--connections` sockets are opened at `--rate` per second, each bound to a source
//!    address 127.0.0.x (x cycling 1..=250), so the count is not capped by the ~28k ephemeral
//!    ports of one address pair. Each sends `connection_init` with the token, waits for the ack,
//!    and starts `carModelUpdated(pk: …)`: pks from `--pks` (or `--keys K`: 1..=K), spread over
//!    the subscribers by `--distribution` (in turn, or a Zipf law), or with `--hot-subscribers N`
//!    N on the first pk and the rest over the others (`spread`).
//! 2. **Idle.** `--settle-secs` with nothing to deliver; the gateway's RSS is read at the end.
//! 3. **Warm-up.** One event per pk, not counted, until every subscriber has had one: this proves
//!    each subscription is live at the gateway (the protocol has no ack for a subscription).
//! 4. **Events.** `--events` envelopes at `--events-per-sec` (with `--burst`: pipelined back to
//!    back, as fast as Redis takes them), published straight into Redis as api-service would
//!    (`XADD <prefix>events:car.updated`), their pks spread as the subscribers are (with a hot
//!    pk: `--hot-event-share` of them on it). Each carries a unique make, so every delivery is
//!    matched to its event and timed from just before the `XADD`.
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
//!
//! This module starts the run and holds what its threads share; the rest is by concern: `args`
//! the command line, `phases` the orchestrator (the phases and the publishing), `tokens` the
//! access tokens, `spread` which pk each subscriber and event takes, `client` the subscribers, `messages` the graphql-ws messages, `ws` the
//! websocket client, `proc` the /proc readings, `tally` what the subscribers saw, `report` the
//! figures.

mod args;
mod client;
mod messages;
mod phases;
mod proc;
mod report;
mod spread;
mod tally;
mod tokens;
mod ws;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) use args::SubscribeArgs;

/// What the publisher and the client threads share. Times are nanoseconds since `base`.
struct Shared {
    base: Instant,
    /// Tag in every make of this run (`lg<run>-<event>`), so stray events of other runs are ignored.
    run: String,
    /// `--private` and `--owners`: how the published cars say who may read them.
    private: bool,
    owners: bool,
    /// `--traced`.
    traced: bool,
    /// Publish time per event (warm-up events first); 0 until published.
    published_ns: Vec<AtomicU64>,
    /// Deliveries per event so far.
    delivered: Vec<AtomicU32>,
    /// Subscriptions started and not closed, per index into `pks`.
    live_by_pk: Vec<AtomicU64>,
    /// Which pk each subscriber and each measured event takes.
    spread: spread::Spread,
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

/// Checks the arguments, starts the client threads, drives the phases on this thread and reports;
/// an error when not one subscriber connected, so that a script running it notices.
pub(crate) fn run(args: &SubscribeArgs) -> Result<(), String> {
    let mut args = args.clone();
    args.validate()?;
    let args = &args;
    crate::ensure_loopback(&args.target);
    for url in args.redis.urls() {
        crate::ensure_loopback(&url);
    }
    if let Some(auth) = &args.auth {
        crate::ensure_loopback(auth);
    }
    if let Some(limit) = proc::open_files_limit() {
        let needed = u64::from(args.connections) + 64;
        if needed > limit {
            return Err(format!(
                "{} connections need about {needed} file descriptors but `ulimit -n` is {limit}; raise it in this shell",
                args.connections
            ));
        }
    }
    let target = ws::Target::parse(&args.target)?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.max_seconds);
    let minter = tokens::minter(args)?.map(Arc::new);
    let tokens = Arc::new(
        actix_web::rt::System::new().block_on(tokens::obtain_tokens(args, minter.as_deref()))?,
    );
    let warmups = args.pks.len();
    let total_events = warmups + args.events as usize;
    let shared = Arc::new(Shared {
        base: started,
        run: format!("lg{:x}", started_nanos() & 0xff_ffff),
        private: args.private,
        owners: args.owners,
        traced: args.traced,
        published_ns: (0..total_events).map(|_| AtomicU64::new(0)).collect(),
        delivered: (0..total_events).map(|_| AtomicU32::new(0)).collect(),
        live_by_pk: args.pks.iter().map(|_| AtomicU64::new(0)).collect(),
        spread: spread::Spread::new(args),
        attempted: AtomicU64::new(0),
        established: AtomicU64::new(0),
        last_established_ns: AtomicU64::new(0),
        dropped: AtomicUsize::new(0),
    });

    let rss_before = args.gateway_pid.and_then(proc::rss_kib);
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
            std::thread::spawn(move || -> Result<tally::Tally, String> {
                // A bare current-thread runtime rather than actix's System: tasks woken by the
                // I/O driver go straight onto its local queue, not through a LocalSet's
                // locked remote queue, once per delivery.
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|err| format!("cannot start a client thread's runtime: {err}"))?;
                Ok(runtime.block_on(client::client_thread(
                    thread, threads, args, shared, tokens, minter, target, stop,
                )))
            })
        })
        .collect();

    let outcome = actix_web::rt::System::new().block_on(phases::orchestrate(
        args,
        &shared,
        deadline,
        ramp_started_ns,
        rss_before,
    ));
    stop.stop();
    let mut total = tally::Tally::default();
    for handle in handles {
        let tally = handle
            .join()
            .map_err(|_| "a client thread panicked".to_owned())??;
        tally::merge(&mut total, tally);
    }
    let phases = outcome?;
    report::report(args, &shared, total, phases)?;
    if shared.established.load(Ordering::Relaxed) == 0 {
        return Err("no subscriber connected".into());
    }
    Ok(())
}

fn started_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
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
