//! The run's phases as the orchestrator drives them on the main thread, while the client threads
//! connect and receive: it waits out the ramp and the idle time, publishes the warm-up and the
//! measured events into Redis as api-service would, waits for the drain, and takes the readings
//! (RSS, CPU time, expected deliveries) that the report sets against what the clients saw.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use domain::Car;
use domain::Record as _;
use events::{Envelope, EventLog as _, RedisLog};

use super::proc::{rss_kib, CpuPair};
use super::{Shared, SubscribeArgs};

/// Longest wait for the warm-up events to reach every subscriber.
const WARMUP_TIMEOUT: Duration = Duration::from_secs(15);
/// XADDs per pipeline of a burst.
const BURST_PIPELINE: usize = 256;

/// Times and readings the orchestrator took along the way.
pub(super) struct Phases {
    pub(super) ramp_started_ns: u64,
    pub(super) rss_before: Option<u64>,
    pub(super) rss_idle: Option<u64>,
    pub(super) rss_end: Option<u64>,
    /// Live subscriptions when the idle reading was taken.
    pub(super) live_at_idle: u64,
    pub(super) warmup_complete: bool,
    /// Expected deliveries per measured event (live subscribers of its pk when published).
    pub(super) expected: Vec<u64>,
    pub(super) publish_errors: BTreeMap<String, u64>,
    pub(super) events_started_ns: u64,
    pub(super) events_ended_ns: u64,
    /// CPU time (user + system, in seconds) of the gateway and of loadgen over the ramp and over
    /// the events (from the first measured event to the end of the drain).
    pub(super) cpu_ramp: CpuPair,
    pub(super) cpu_events: CpuPair,
    pub(super) stopped_by_cap: bool,
    /// When --kill-pid was sent SIGTERM, and how that went.
    pub(super) killed: Option<(u64, Result<(), String>)>,
}

/// Drives the phases after the ramp began, each cut short by the deadline (`--max-seconds`).
pub(super) async fn orchestrate(
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

    let pool = service_kit::redis::pool(&args.redis).map_err(|err| err.to_string())?;
    // Trimmed by count only, in the same round trip as each append.
    let retention = events::Retention {
        count: args.retention_count,
        max_age_secs: 0,
    };
    let registry = domain::registry()?;
    // Laid out as the gateway reads the logs (REDIS_CLUSTER, EVENT_LOG_PARTITIONS).
    let bus = RedisLog::new(pool.clone(), args.redis.redis_key_prefix.clone())
        .with_retention(retention)
        .partitioned(args.layout.event_log_partitions, registry);
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
    // At most a tick a millisecond: faster rates publish the events due at each tick in one
    // pipeline, since one round trip per event caps a publisher near 7,000 a second here.
    let period = Duration::from_secs_f64(1.0 / args.events_per_sec).max(Duration::from_millis(1));
    let mut ticks = tokio::time::interval(period);
    let paced_from = Instant::now();
    let kill_at = args
        .kill_pid
        .zip(args.kill_after_secs)
        .map(|(pid, secs)| (pid, Instant::now() + Duration::from_secs_f64(secs)));
    let mut killed = None;
    if args.burst {
        // A burst: pipelines of XADDs back to back, each event's publish time taken just
        // before its pipeline is sent.
        let mut k = 0;
        while k < args.events as usize {
            if Instant::now() >= deadline {
                stopped_by_cap = true;
                break;
            }
            let batch: Vec<(usize, i64)> = (k..(k + BURST_PIPELINE).min(args.events as usize))
                .map(|k| {
                    let pk_index = shared.spread.event(k);
                    expected.push(shared.live_by_pk[pk_index].load(Ordering::Relaxed));
                    (warmups + k, args.pks[pk_index])
                })
                .collect();
            k += batch.len();
            if let Err(kind) = publish_pipelined(&pool, &bus, args, shared, &batch).await {
                *publish_errors.entry(kind).or_insert(0) += batch.len() as u64;
            }
        }
    } else {
        let events = args.events as usize;
        let mut k = 0;
        while k < events {
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
            // The events due by now at the rate (at least the next one).
            let due = ((paced_from.elapsed().as_secs_f64() * args.events_per_sec) as usize + 1)
                .clamp(k + 1, events);
            let batch: Vec<(usize, i64)> = (k..due)
                .map(|k| {
                    let pk_index = shared.spread.event(k);
                    expected.push(shared.live_by_pk[pk_index].load(Ordering::Relaxed));
                    (warmups + k, args.pks[pk_index])
                })
                .collect();
            k = due;
            let published = match batch.as_slice() {
                [(index, pk)] => publish(&bus, shared, *index, *pk).await,
                _ => publish_pipelined(&pool, &bus, args, shared, &batch).await,
            };
            if let Err(kind) = published {
                *publish_errors.entry(kind).or_insert(0) += batch.len() as u64;
            }
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

/// Publishes the events `(index, pk)` in one pipeline of XADDs per stream (one in all with one
/// partition), sent at once, as api-service's write path appends each; the publish times are
/// taken just before they are sent.
async fn publish_pipelined(
    pool: &service_kit::redis::RedisPool,
    bus: &RedisLog,
    args: &SubscribeArgs,
    shared: &Shared,
    batch: &[(usize, i64)],
) -> Result<(), String> {
    // Trimmed by count only, in the same round trip as each append.
    let retention = events::Retention {
        count: args.retention_count,
        max_age_secs: 0,
    };
    let mut pipes: BTreeMap<String, deadpool_redis::redis::Pipeline> = BTreeMap::new();
    for (index, pk) in batch {
        let envelope = envelope(shared, *index, *pk);
        let payload = serde_json::to_string(&envelope).map_err(|err| err.to_string())?;
        let key = bus.key_of(Car::EVENTS.updated.as_str(), &payload);
        let pipe = pipes.entry(key.clone()).or_default();
        events::push_append(pipe, &key, &payload, retention);
    }
    let now = shared.now_ns().max(1);
    for (index, _) in batch {
        shared.published_ns[*index].store(now, Ordering::Relaxed);
    }
    let sent = pipes
        .values()
        .map(|pipe| service_kit::redis::query::<()>(pool, pipe));
    for result in futures_util::future::join_all(sent).await {
        result.map_err(|err| crate::truncate(&err.to_string()))?;
    }
    Ok(())
}

/// Event `index`'s envelope, with a trace context of its own under `--traced`.
fn envelope(shared: &Shared, index: usize, pk: i64) -> Envelope<Car> {
    let mut envelope = Envelope::new(Car::EVENTS.updated, car(shared, index, pk));
    if shared.traced {
        // The run's tag and the event's number: a distinct, valid (non-zero) id per event.
        let run =
            u64::from_str_radix(shared.run.trim_start_matches("lg"), 16).unwrap_or(0) | 1 << 40;
        let id = index as u64 + 1;
        envelope.traceparent = Some(format!("00-{run:016x}{id:016x}-{id:016x}-01"));
    }
    envelope
}

/// The car of event `index`: its make names the run and the event, so that each delivery is
/// matched to its event.
fn car(shared: &Shared, index: usize, pk: i64) -> Car {
    Car {
        id: pk,
        make: format!("{}-{index}", shared.run),
        model: "Octavia".into(),
        variant: "Scout".into(),
        year: "2011".into(),
        private: shared.private,
        owner: shared.owners.then(|| domain::Owner {
            id: super::tokens::owner_of(pk),
            username: format!("loadgen-{}", super::tokens::owner_of(pk)),
            is_staff: false,
        }),
    }
}

/// Publishes event `index` for car `pk`, as api-service's write path does; the publish time is
/// taken just before the `XADD`, so it is set before any delivery can arrive.
async fn publish(bus: &RedisLog, shared: &Shared, index: usize, pk: i64) -> Result<(), String> {
    let envelope = envelope(shared, index, pk);
    let payload = serde_json::to_string(&envelope).map_err(|err| err.to_string())?;
    shared.published_ns[index].store(shared.now_ns().max(1), Ordering::Relaxed);
    bus.append(Car::EVENTS.updated.as_str(), &payload)
        .await
        .map_err(|err| crate::truncate(&err.to_string()))
}
