//! The fan-out: one Redis connection per process reading the event logs (or, in the embedded
//! mode, the in-memory log), each entry decoded once and handed to the local executions it is
//! for. By concern:
//!
//! - here, the [`Hub`]: what it holds, subscribing ([`Hub::subscribe`], [`TopicGuard`]) and
//!   dispatching an entry (decode, dedupe by id, route); also what the executions read
//!   ([`ConnectionEvents`]) and the revocation announcements, recorded in the logout cutoffs;
//! - [`routes`]: which executions an event goes to. An event of Car 7 reaches the executions
//!   keyed by Car 7 and the unkeyed ones of its type, so the work per event follows the
//!   executions it is for, not how many exist; each execution has a queue of its own
//!   (`FANOUT_BUFFER` events), so a burst on other keys never makes it fall behind;
//! - the hub is the [`Follower`] of the process's [`EventLog`] (`events::redis`, or
//!   `events::memory` in the embedded mode), which reads the logs local subscribers need: a log
//!   is asked for when the first local subscriber of its type appears and left out when the
//!   last one leaves. While the log is unreachable sockets stay open and `/readyz` says not
//!   ready;
//! - [`backlog`]: reading a log after a client's cursor for subscriptions that resume, each
//!   handed only the events of its key; reads for one cursor that wait at the same time are
//!   made once, at most a few at a time.
//!
//! Delivery is at-least-once, so event ids recently seen are dropped. The receivers are
//! executions, not connections: one per distinct subscription, shared by every socket that sent
//! it ([`crate::executions`]). An execution more than `FANOUT_BUFFER` events behind on its own
//! queue has lost events for all of its members, so each member's connection is closed as slow
//! (1013) rather than buffered without bound; a client slow on its own socket is cut off by its
//! outbound queue instead (`OUTBOUND_QUEUE`).

mod backlog;
mod routes;

use std::cell::Cell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use events::{
    At, DecodeError, EnvelopeStream, EventLog, EventSource, EventType, Follower, Key, LoggedEvent,
    Position, Readers, Registry, Revocation,
};
use futures_util::future::BoxFuture;
use futures_util::FutureExt as _;
use tokens::revocations::RevokedBefore;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::lock;
use crate::metrics::GatewayMetrics;

pub use backlog::{Backlog, BacklogEnd, BacklogEvents, BacklogOutcome, ReplayError};
use backlog::{Flight, REPLAY_READS};
pub use routes::RouteReader;
use routes::{Latest, Route, Topic};

/// How many event ids are remembered for dropping duplicates.
const RECENT_IDS: usize = 16_384;
/// Longest a replay waits for the hub to know where a log stands (Redis reconnecting).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// What a hub works with, whichever its source.
pub struct HubParts {
    /// The event types there are, and how each one's envelopes decode.
    pub registry: Registry,
    /// Events an execution may fall behind before it is cut off (`FANOUT_BUFFER`).
    pub buffer: usize,
    pub metrics: GatewayMetrics,
    /// The logout cutoffs; announcements read with the logs are recorded here.
    pub revoked: Arc<RevokedBefore>,
    /// A state subscription whose next event is older than this (OVERLOAD_LAG_MS) skips to the
    /// newest it has waiting.
    pub overload_lag: Duration,
}

/// Cheap to clone; one per process.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    /// The event types there are, and how each one's envelopes decode.
    registry: Registry,
    buffer: usize,
    overload_lag: Duration,
    topics: Mutex<HashMap<EventType, Topic>>,
    /// Tells each partition's reader that a topic needs a start position and a place in the
    /// read.
    wake: Vec<Notify>,
    /// How many partitions each log is split into.
    partitions: u16,
    /// Woken whenever a topic's start position becomes known.
    ready: Notify,
    connected: AtomicBool,
    /// The logs' epoch; empty until the Redis task has read it.
    epoch: RwLock<Arc<str>>,
    /// The logout cutoffs the connections check their tokens against: an announcement read
    /// with the logs is recorded here at once, which wakes them.
    revoked: Arc<RevokedBefore>,
    recent: Mutex<RecentIds>,
    metrics: GatewayMetrics,
    log: Arc<dyn EventLog>,
    /// Replay reads by cursor that have not begun reading yet, or are reading.
    flights: Mutex<HashMap<String, Arc<Flight>>>,
    replay_reads: Arc<Semaphore>,
    /// Names each route, so that its guard removes that one.
    next_route: AtomicU64,
}

impl Hub {
    /// Creates the hub over `log` and spawns the task that follows it, which runs until
    /// `shutdown` is cancelled.
    pub fn start(log: Arc<dyn EventLog>, parts: HubParts, shutdown: CancellationToken) -> Hub {
        let hub = Hub {
            inner: Arc::new(Inner {
                registry: parts.registry,
                buffer: parts.buffer.max(1),
                overload_lag: parts.overload_lag,
                topics: Mutex::new(HashMap::new()),
                wake: (0..log.partitions().max(1))
                    .map(|_| Notify::new())
                    .collect(),
                partitions: log.partitions().max(1),
                ready: Notify::new(),
                connected: AtomicBool::new(false),
                epoch: RwLock::new(Arc::from("")),
                revoked: parts.revoked,
                recent: Mutex::new(RecentIds::default()),
                metrics: parts.metrics,
                log: log.clone(),
                flights: Mutex::new(HashMap::new()),
                replay_reads: Arc::new(Semaphore::new(REPLAY_READS)),
                next_route: AtomicU64::new(0),
            }),
        };
        let following = log.follow(Arc::new(hub.clone()));
        let follower = hub.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                () = following => {}
            }
            follower.connected(false);
        });
        hub
    }

    /// True while the connection to Redis is up.
    pub fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::Relaxed)
    }

    /// The event types there are.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    fn epoch(&self) -> Arc<str> {
        self.inner
            .epoch
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Registers a local subscriber of `event_type`: of every event of it, or with `key` of
    /// those routed by that key. Returns the reader, which gets at most the hub's buffer of
    /// events ahead of it (further, a state subscription gets the newest of those that did not
    /// fit, and any other is told through `slow` and ends), and a guard that unregisters it
    /// when dropped.
    pub fn subscribe(
        &self,
        event_type: EventType,
        key: Option<Key>,
        slow: Arc<Notify>,
    ) -> (RouteReader, TopicGuard) {
        let (sender, receiver) = mpsc::channel(self.inner.buffer);
        let latest = self
            .inner
            .registry
            .supersedes(event_type, key)
            .then(|| Arc::new(Latest::default()));
        let id = self.inner.next_route.fetch_add(1, Ordering::Relaxed);
        let mut topics = lock(&self.inner.topics);
        let topic = topics.entry(event_type).or_insert_with(|| {
            Topic::new(self.inner.partitions, self.inner.log.tip_now(event_type))
        });
        topic.add(key, Route::new(id, sender, slow, latest.clone()));
        for (position, wake) in topic.positions.iter().zip(&self.inner.wake) {
            if position.is_none() {
                wake.notify_one();
            }
        }
        (
            RouteReader {
                receiver,
                latest,
                late_after_ms: self.inner.overload_lag.as_millis() as u64,
            },
            TopicGuard {
                hub: self.clone(),
                event_type,
                key,
                route: id,
            },
        )
    }

    /// Decodes one log entry and hands it to the local subscribers it is for.
    fn dispatch(&self, key: &str, partition: u16, position: Position, payload: &[u8]) {
        let inner = &self.inner;
        let Some(event_type) = inner.registry.get(key) else {
            inner.metrics.events_malformed.inc();
            tracing::warn!(key, "entry of an unknown log");
            return;
        };
        // Decoded and keyed before the routes are locked: the lock is held only to hand on.
        let decoded = inner.registry.decode(event_type, payload).map(|envelope| {
            let keys = inner.registry.keys(event_type, &envelope.data);
            let readers = inner.registry.readers(event_type, &envelope.data);
            (envelope, keys, readers)
        });
        let mut topics = lock(&inner.topics);
        let mut topic = topics.get_mut(&event_type);
        if let Some(topic) = &mut topic {
            let started = topic.started();
            let Some(last) = topic.positions.get_mut(usize::from(partition)) else {
                tracing::warn!(
                    key,
                    partition,
                    "entry of a partition this gateway does not read"
                );
                return;
            };
            if last.is_some_and(|last| position <= last) {
                // Read already (a read that raced with the topic's start).
                return;
            }
            *last = Some(position);
            if !started && topic.started() {
                // Started by this entry rather than by its tip: a replay may wait for that.
                inner.ready.notify_waiters();
            }
        }
        let (envelope, keys, readers) = match decoded {
            Ok(decoded) => decoded,
            Err(DecodeError::WrongType) => {
                inner.metrics.events_malformed.inc();
                tracing::warn!(key, %position, "event type does not match its log");
                return;
            }
            Err(err) => {
                inner.metrics.events_malformed.inc();
                tracing::warn!(%err, key, %position, "malformed event envelope");
                return;
            }
        };
        inner
            .metrics
            .events_received
            .with_label_values(&[event_type.as_str()])
            .inc();
        if position.ms > 0 {
            // (Across partitions, the lag of the partition read last.)
            let lag_ms = chrono::Utc::now().timestamp_millis() - position.ms as i64;
            inner
                .metrics
                .hub_lag
                .with_label_values(&[event_type.as_str()])
                .set(lag_ms.max(0) as f64 / 1e3);
        }
        if !lock(&inner.recent).insert(&envelope.id) {
            inner.metrics.events_duplicate.inc();
            return;
        }
        if let Some(topic) = topic {
            topic.deliver(&Arc::new(LoggedEvent::new(
                event_type,
                partition,
                topic.stands(),
                &self.epoch(),
                envelope,
                keys,
                readers,
            )));
        }
    }

    /// Waits until the hub reads `event_type`'s log (a subscription to it exists) and knows
    /// where it stands: every event after that position reaches the topic's subscribers.
    async fn until_ready(&self, event_type: EventType) -> Result<(), ReplayError> {
        let wait = async {
            loop {
                let notified = self.inner.ready.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let started = lock(&self.inner.topics)
                    .get(&event_type)
                    .is_some_and(Topic::started);
                if started && !self.epoch().is_empty() {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(READY_TIMEOUT, wait)
            .await
            .map_err(|_| ReplayError::Unavailable("Redis is not reachable".into()))
    }
}

/// Unregisters a local subscriber on drop; the last one out takes the log out of the read.
pub struct TopicGuard {
    hub: Hub,
    event_type: EventType,
    key: Option<Key>,
    route: u64,
}

impl Drop for TopicGuard {
    fn drop(&mut self) {
        let mut topics = lock(&self.hub.inner.topics);
        if let Some(topic) = topics.get_mut(&self.event_type) {
            if topic.remove(self.key, self.route) {
                topics.remove(&self.event_type);
            }
        }
    }
}

/// The event a subscription task is turning into a result: its type and commit time (`at`, µs
/// since the epoch; for the delivery-latency histograms), its position, its cursor and who may
/// read it.
#[derive(Clone)]
pub struct EventMark {
    pub event_type: EventType,
    /// The write's trace context, when it was traced and this process traces.
    pub traceparent: Option<String>,
    pub at: i64,
    /// Its partition and position in its log.
    pub log_at: At,
    pub cursor: Arc<str>,
    pub readers: Readers,
    /// Events of the subscription skipped right before this one (a state subscription past its
    /// queue: this one supersedes them).
    pub skipped: u64,
    /// Whether a newer event of the subscription supersedes this one (a state subscription).
    pub supersedable: bool,
}

tokio::task_local! {
    /// Set by the event streams as they yield, read by the task after each result.
    pub static CURRENT_EVENT: Cell<Option<EventMark>>;
}

fn mark(event: &LoggedEvent, skipped: u64, supersedable: bool) {
    let _ = CURRENT_EVENT.try_with(|current| {
        current.set(Some(EventMark {
            event_type: event.event_type,
            traceparent: service_kit::telemetry::enabled()
                .then(|| event.envelope.traceparent.clone())
                .flatten(),
            at: event.envelope.at.timestamp_micros(),
            log_at: event.at(),
            cursor: event.cursor.clone(),
            readers: event.readers,
            skipped,
            supersedable,
        }))
    });
}

/// The hub as one shared execution sees it: events come from the hub, and falling behind
/// tells the execution (through `slow`) to cut its subscribers off.
pub struct ConnectionEvents {
    pub hub: Hub,
    pub slow: Arc<Notify>,
}

impl EventSource for ConnectionEvents {
    fn subscribe(&self, event_type: EventType, key: Option<Key>) -> EnvelopeStream {
        let (reader, guard) = self.hub.subscribe(event_type, key, self.slow.clone());
        let supersedable = reader.latest.is_some();
        // When the hub drops a route that fell behind, `slow` has been told and the reader
        // ends after what it holds: the execution then cuts its members off.
        Box::pin(futures_util::stream::unfold(
            (reader, guard),
            move |(mut reader, guard)| async move {
                let (event, skipped) = reader.next().await?;
                mark(&event, skipped, supersedable);
                Some((event.envelope.clone(), (reader, guard)))
            },
        ))
    }
}

impl Follower for Hub {
    fn logs(&self, partition: u16) -> Vec<(EventType, Option<Position>)> {
        lock(&self.inner.topics)
            .iter()
            .map(|(event_type, topic)| {
                let position = topic.positions.get(usize::from(partition)).copied();
                (*event_type, position.flatten())
            })
            .collect()
    }

    fn start(&self, event_type: EventType, partition: u16, tip: Position) {
        if let Some(topic) = lock(&self.inner.topics).get_mut(&event_type) {
            if let Some(position) = topic.positions.get_mut(usize::from(partition)) {
                position.get_or_insert(tip);
            }
        }
        self.inner.ready.notify_waiters();
    }

    fn changed(&self, partition: u16) -> BoxFuture<'_, ()> {
        match self.inner.wake.get(usize::from(partition)) {
            Some(wake) => wake.notified().boxed(),
            None => futures_util::future::pending().boxed(),
        }
    }

    fn entry(&self, event_type: &str, partition: u16, position: Position, payload: &[u8]) {
        self.dispatch(event_type, partition, position, payload);
    }

    fn revoked(&self, revocation: Result<Revocation, String>) {
        match revocation {
            Ok(revocation) => self
                .inner
                .revoked
                .record(revocation.user_id, revocation.cutoff_ms),
            Err(err) => {
                self.inner.metrics.events_malformed.inc();
                tracing::warn!(%err, "malformed revocation message");
            }
        }
    }

    /// A new epoch: the log was reset, and every position in it starts again at 0.
    fn epoch(&self, epoch: &str) -> bool {
        let mut current = self
            .inner
            .epoch
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if &**current == epoch {
            return false;
        }
        let had_one = !current.is_empty();
        *current = Arc::from(epoch);
        drop(current);
        if had_one {
            for topic in lock(&self.inner.topics).values_mut() {
                for position in topic.positions.iter_mut().flatten() {
                    *position = Position::ZERO;
                }
            }
        }
        self.inner.ready.notify_waiters();
        had_one
    }

    /// Events of the type are gone before they were handed on: no subscriber of it may go on
    /// as if it had them. Each is cut off as a slow consumer (1013) and resumes from its
    /// cursor, which says `recovered: false` when its events are gone.
    fn lost(&self, event_type: &str, partition: u16) {
        let Some(known) = self.inner.registry.get(event_type) else {
            return;
        };
        self.inner
            .metrics
            .log_gaps
            .with_label_values(&[known.as_str()])
            .inc();
        let dropped = lock(&self.inner.topics)
            .get_mut(&known)
            .map_or(0, Topic::drop_all);
        tracing::warn!(
            event_type,
            partition,
            dropped,
            "entries of the log were trimmed before this gateway read them; closing its subscribers, who resume"
        );
    }

    fn connected(&self, connected: bool) {
        self.inner.connected.store(connected, Ordering::Relaxed);
        self.inner.metrics.redis_connected.set(i64::from(connected));
        if connected {
            self.inner.ready.notify_waiters();
        }
    }
}

/// A bounded set of the most recent event ids.
#[derive(Default)]
struct RecentIds {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl RecentIds {
    /// False when `id` was seen already.
    fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() == RECENT_IDS {
            if let Some(oldest) = self.order.pop_front() {
                self.set.remove(&oldest);
            }
        }
        self.set.insert(id.to_owned());
        self.order.push_back(id.to_owned());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::RecentIds;

    #[test]
    fn recent_ids_drop_duplicates_and_forget_the_oldest() {
        let mut recent = RecentIds::default();
        assert!(recent.insert("a"));
        assert!(!recent.insert("a"));
        for i in 0..super::RECENT_IDS {
            assert!(recent.insert(&i.to_string()));
        }
        assert!(
            recent.insert("a"),
            "the oldest id is forgotten once the set is full"
        );
    }
}
