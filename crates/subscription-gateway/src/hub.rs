//! The fan-out: one Redis connection per process reading the event logs (or, in the embedded
//! mode, the in-memory bus: [`Hub::start_memory`]), and in memory a broadcast channel per event
//! type that every local subscriber of that type reads.
//!
//! - The logs are Redis streams ([`events`]); which logs exist, and how each one's envelopes
//!   decode, the hub learns from the domain's [`events::Registry`]. The hub's connection runs
//!   `XREAD BLOCK` over the logs its subscribers need, each from the last position it has seen, and over the
//!   revocation stream. A log is added when the first local subscriber of its type appears
//!   (starting at the log's tip then; the blocked read is interrupted with `CLIENT UNBLOCK` so it
//!   is picked up at once) and left out when the last one leaves ([`TopicGuard`] counts them).
//! - Each entry is decoded once, checked against recently seen event ids (delivery is
//!   at-least-once, so duplicates are expected), and handed to the broadcast channel as one shared
//!   `Arc<LoggedEvent>` with its position and cursor: no per-subscriber decoding or copying.
//! - The receivers are executions, not connections: one per distinct subscription, shared by
//!   every socket that sent it ([`crate::executions`]). An execution that falls more than
//!   `FANOUT_BUFFER` events behind has lost events for all of its members, so each member's
//!   connection is closed as slow (1013) rather than buffered without bound; a client that is
//!   slow on its own socket is cut off by its outbound queue instead (`OUTBOUND_QUEUE`).
//! - When Redis goes away, the task reconnects with capped exponential backoff and reads on from
//!   the positions it had, so nothing published meanwhile is skipped; sockets stay open and
//!   `/readyz` says not ready. A changed epoch (Redis lost its data) restarts every log at 0.
//! - [`Hub::replay`] reads a log after a client's cursor, for subscriptions that resume. After a
//!   replica's restart its clients come back at once with the same cursor (the last event they
//!   all had), so reads for one cursor that wait at the same time are made once ([`Flight`]),
//!   and at most [`REPLAY_READS`] reads run at a time.

use std::cell::Cell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use deadpool_redis::redis;
use deadpool_redis::redis::Value;
use events::{
    channel, epoch_key, new_epoch, revocation_channel, BusMessage, Cursor, DecodeError,
    EnvelopeStream, EventSource, EventType, LoggedEvent, MemoryBus, Position, Registry, Revocation,
    ENTRY_FIELD,
};
use futures_util::future::{BoxFuture, Shared};
use futures_util::{FutureExt as _, StreamExt as _};
use service_kit::redis::RedisPool;
use tokens::revocations::RevokedBefore;
use tokio::sync::{broadcast, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::lock;
use crate::metrics::GatewayMetrics;

/// How many event ids are remembered for dropping duplicates.
const RECENT_IDS: usize = 16_384;
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long one `XREAD` blocks: also the health check of the connection, since a Redis that
/// hangs without closing the socket is noticed when a read does not return within this time
/// plus [`REDIS_TIMEOUT`].
const BLOCK: Duration = Duration::from_secs(5);
const REDIS_TIMEOUT: Duration = Duration::from_secs(3);
/// Entries per `XREAD` and per page of a replay.
const READ_COUNT: usize = 512;
/// Longest a replay waits for the hub to know where a log stands (Redis reconnecting).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Replay reads under way at once. More would only queue for the pool's connections (and time
/// out there under a reconnect storm); while a read waits for its turn, others for the same
/// cursor join it.
const REPLAY_READS: usize = 4;

/// What a hub works with, whichever its source.
pub struct HubParts {
    /// The event types there are, and how each one's envelopes decode.
    pub registry: Registry,
    /// Events an execution may fall behind before it is cut off (`FANOUT_BUFFER`).
    pub buffer: usize,
    pub metrics: GatewayMetrics,
    /// The logout cutoffs; announcements read with the logs are recorded here.
    pub revoked: Arc<RevokedBefore>,
}

/// Cheap to clone; one per process.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    key_prefix: String,
    /// The event types there are, and how each one's envelopes decode.
    registry: Registry,
    buffer: usize,
    topics: Mutex<HashMap<EventType, Topic>>,
    /// Tells the Redis task that a topic needs a start position and a place in the read.
    wake: Notify,
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
    backend: Backend,
    /// Replay reads by cursor that have not begun reading yet, or are reading.
    flights: Mutex<HashMap<String, Arc<Flight>>>,
    replay_reads: Arc<Semaphore>,
}

/// One read of a log after a cursor, shared by the resuming subscriptions that wait for it.
///
/// Sharing is correct only with a subscription whose live part already read the hub when the
/// read begins: an event the read misses then reaches it live. So a subscription joins a flight
/// only while `reading` is still false (set under the `flights` lock); once the read has begun,
/// a newcomer starts a flight of its own.
struct Flight {
    reading: AtomicBool,
    result: Shared<BoxFuture<'static, Result<Arc<Replay>, ReplayError>>>,
}

enum Backend {
    Redis(RedisPool),
    Memory {
        bus: MemoryBus,
        /// The last position dispatched per type, subscribed or not: a new topic starts there.
        seen: Mutex<HashMap<EventType, Position>>,
    },
}

struct Topic {
    sender: broadcast::Sender<Arc<LoggedEvent>>,
    subscribers: usize,
    /// The last position read from the log; `None` until the Redis task has read its tip.
    position: Option<Position>,
}

/// What [`Hub::replay`] found after a cursor.
#[derive(Debug)]
pub struct Replay {
    /// Whether the history still covers the cursor; when not, `events` is empty and the
    /// subscriber continues live.
    pub recovered: bool,
    pub events: Vec<Arc<LoggedEvent>>,
    /// Every event after this position reaches the subscription live: the last one read, or
    /// the cursor's own when there was nothing after it.
    pub until: Position,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ReplayError {
    #[error(
        "`extensions.resumeFrom` names a position among {cursor} events, but this subscription \
         reads {wanted} events; resume with a cursor of this subscription's results"
    )]
    OtherType {
        cursor: EventType,
        wanted: EventType,
    },
    #[error("the event history cannot be read right now ({0}); resubscribe with the same cursor")]
    Unavailable(String),
}

impl Hub {
    /// Creates the hub over Redis and spawns its Redis task, which runs until `shutdown` is
    /// cancelled. `pool` serves replays and the rare `CLIENT UNBLOCK`; events arrive on the
    /// task's own connection.
    pub fn start(
        redis_url: &str,
        key_prefix: &str,
        pool: RedisPool,
        parts: HubParts,
        shutdown: CancellationToken,
    ) -> Result<Hub, String> {
        let client = redis::Client::open(redis_url).map_err(|err| err.to_string())?;
        let hub = Hub::new(key_prefix, parts, Backend::Redis(pool), "");
        tokio::spawn(run(hub.clone(), client, shutdown));
        Ok(hub)
    }

    /// Creates the hub over the in-memory bus of the embedded mode and spawns the task that feeds
    /// it, which runs until `shutdown` is cancelled. Messages go through the same decoding,
    /// dedupe and fan-out as Redis entries; the bus carries every log, so there is nothing to
    /// subscribe to and the hub is connected from the start.
    pub fn start_memory(bus: &MemoryBus, parts: HubParts, shutdown: CancellationToken) -> Hub {
        let hub = Hub::new(
            bus.key_prefix(),
            parts,
            Backend::Memory {
                bus: bus.clone(),
                seen: Mutex::new(HashMap::new()),
            },
            bus.epoch(),
        );
        set_connected(&hub, true);
        tokio::spawn(run_memory(hub.clone(), bus.subscribe(), shutdown));
        hub
    }

    fn new(key_prefix: &str, parts: HubParts, backend: Backend, epoch: &str) -> Hub {
        Hub {
            inner: Arc::new(Inner {
                key_prefix: key_prefix.to_owned(),
                registry: parts.registry,
                buffer: parts.buffer.max(1),
                topics: Mutex::new(HashMap::new()),
                wake: Notify::new(),
                ready: Notify::new(),
                connected: AtomicBool::new(false),
                epoch: RwLock::new(Arc::from(epoch)),
                revoked: parts.revoked,
                recent: Mutex::new(RecentIds::default()),
                metrics: parts.metrics,
                backend,
                flights: Mutex::new(HashMap::new()),
                replay_reads: Arc::new(Semaphore::new(REPLAY_READS)),
            }),
        }
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

    /// Registers a local subscriber of `event_type`: the receiver, and a guard that unregisters it
    /// when dropped.
    pub fn subscribe(
        &self,
        event_type: EventType,
    ) -> (broadcast::Receiver<Arc<LoggedEvent>>, TopicGuard) {
        let mut topics = lock(&self.inner.topics);
        let topic = topics.entry(event_type).or_insert_with(|| {
            let position = match &self.inner.backend {
                Backend::Memory { seen, .. } => {
                    Some(lock(seen).get(&event_type).copied().unwrap_or_default())
                }
                Backend::Redis(_) => None,
            };
            Topic {
                sender: broadcast::channel(self.inner.buffer).0,
                subscribers: 0,
                position,
            }
        });
        topic.subscribers += 1;
        if topic.position.is_none() {
            self.inner.wake.notify_one();
        }
        let receiver = topic.sender.subscribe();
        (
            receiver,
            TopicGuard {
                hub: self.clone(),
                event_type,
            },
        )
    }

    /// Decodes one log entry and hands it to the local subscribers.
    fn dispatch(&self, key: &str, position: Position, payload: &[u8]) {
        let inner = &self.inner;
        if key == revocation_channel(&inner.key_prefix) {
            match serde_json::from_slice::<Revocation>(payload) {
                Ok(revocation) => inner
                    .revoked
                    .record(revocation.user_id, revocation.cutoff_ms),
                Err(err) => {
                    inner.metrics.events_malformed.inc();
                    tracing::warn!(%err, "malformed revocation message");
                }
            }
            return;
        }
        let Some(event_type) = inner.registry.channel_type(&inner.key_prefix, key) else {
            inner.metrics.events_malformed.inc();
            tracing::warn!(key, "entry of an unknown log");
            return;
        };
        if let Backend::Memory { seen, .. } = &inner.backend {
            lock(seen).insert(event_type, position);
        }
        let decoded = inner.registry.decode(event_type, payload);
        let mut topics = lock(&inner.topics);
        let topic = topics.get_mut(&event_type);
        if let Some(topic) = &topic {
            if topic.position.is_some_and(|last| position <= last) {
                // Read already (a read that raced with the topic's start).
                return;
            }
        }
        let topic = topic.map(|topic| {
            if topic.position.replace(position).is_none() {
                // Started by this entry rather than by its tip: a replay may wait for that.
                inner.ready.notify_waiters();
            }
            &topic.sender
        });
        let envelope = match decoded {
            Ok(envelope) => envelope,
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
        if !lock(&inner.recent).insert(&envelope.id) {
            inner.metrics.events_duplicate.inc();
            return;
        }
        if let Some(sender) = topic {
            let cursor = Cursor {
                epoch: self.epoch().to_string(),
                event_type,
                position,
            };
            // An error only means nobody is listening right now.
            let _ = sender.send(Arc::new(LoggedEvent {
                position,
                cursor: Arc::from(cursor.to_string()),
                envelope,
            }));
        }
    }

    /// The topics the Redis task must find a start for.
    fn unstarted(&self) -> Vec<EventType> {
        lock(&self.inner.topics)
            .iter()
            .filter(|(_, topic)| topic.position.is_none())
            .map(|(event_type, _)| *event_type)
            .collect()
    }

    fn start_topic(&self, event_type: EventType, tip: Position) {
        if let Some(topic) = lock(&self.inner.topics).get_mut(&event_type) {
            topic.position.get_or_insert(tip);
        }
        self.inner.ready.notify_waiters();
    }

    /// The logs to read and where each stands.
    fn read_set(&self) -> Vec<(String, Position)> {
        lock(&self.inner.topics)
            .iter()
            .filter_map(|(event_type, topic)| {
                Some((
                    channel(&self.inner.key_prefix, event_type.as_str()),
                    topic.position?,
                ))
            })
            .collect()
    }

    /// A new epoch: the log was reset, and every position in it starts again at 0.
    fn set_epoch(&self, epoch: &str) -> bool {
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
                if topic.position.is_some() {
                    topic.position = Some(Position::ZERO);
                }
            }
        }
        had_one
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
                    .is_some_and(|topic| topic.position.is_some());
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

    /// The events of `event_type` after `cursor`, for a subscription that resumes. Called once
    /// the subscription's live part reads the log, so that [`Replay::until`] joins the two
    /// without a gap.
    pub async fn replay(
        &self,
        event_type: EventType,
        cursor: &Cursor,
    ) -> Result<Arc<Replay>, ReplayError> {
        if cursor.event_type != event_type {
            return Err(ReplayError::OtherType {
                cursor: cursor.event_type,
                wanted: event_type,
            });
        }
        self.until_ready(event_type).await?;
        let key = cursor.to_string();
        let flight = {
            let mut flights = lock(&self.inner.flights);
            match flights.get(&key) {
                Some(flight) if !flight.reading.load(Ordering::Acquire) => flight.clone(),
                _ => {
                    let flight = self.flight(key.clone(), event_type, cursor.clone());
                    flights.insert(key, flight.clone());
                    flight
                }
            }
        };
        flight.result.clone().await
    }

    /// A read of the log after `cursor` that begins when one of [`REPLAY_READS`] is free.
    fn flight(&self, key: String, event_type: EventType, cursor: Cursor) -> Arc<Flight> {
        Arc::new_cyclic(|this: &std::sync::Weak<Flight>| {
            let hub = self.clone();
            let this = this.clone();
            let result = async move {
                let permit = hub.inner.replay_reads.clone().acquire_owned().await;
                {
                    let mut flights = lock(&hub.inner.flights);
                    if let Some(flight) = this.upgrade() {
                        flight.reading.store(true, Ordering::Release);
                    }
                    // Gone from the map once reading: later subscriptions start their own.
                    if flights
                        .get(&key)
                        .is_some_and(|f| std::ptr::eq(Arc::as_ptr(f), this.as_ptr()))
                    {
                        flights.remove(&key);
                    }
                }
                let result = hub.read_replay(event_type, &cursor).await.map(Arc::new);
                drop(permit);
                result
            }
            .boxed()
            .shared();
            Flight {
                reading: AtomicBool::new(false),
                result,
            }
        })
    }

    async fn read_replay(
        &self,
        event_type: EventType,
        cursor: &Cursor,
    ) -> Result<Replay, ReplayError> {
        let epoch = self.epoch();
        let not_recovered = Replay {
            recovered: false,
            events: Vec::new(),
            until: Position::ZERO,
        };
        if *epoch != *cursor.epoch {
            return Ok(not_recovered);
        }
        let key = channel(&self.inner.key_prefix, event_type.as_str());
        let (covered, entries) = match &self.inner.backend {
            Backend::Memory { bus, .. } => {
                let history = bus.history(&key, cursor.position);
                (history.covered, history.entries)
            }
            Backend::Redis(pool) => redis_history(pool, &key, cursor.position)
                .await
                .map_err(ReplayError::Unavailable)?,
        };
        let metrics = &self.inner.metrics;
        metrics.replay_entries_read.inc_by(entries.len() as u64);
        metrics
            .replays
            .with_label_values(&[if covered { "true" } else { "false" }])
            .inc();
        if !covered {
            return Ok(not_recovered);
        }
        let mut until = cursor.position;
        let mut ids = HashSet::new();
        let mut events = Vec::with_capacity(entries.len());
        for (position, payload) in entries {
            until = until.max(position);
            let Ok(envelope) = self.inner.registry.decode(event_type, payload.as_bytes()) else {
                continue;
            };
            if !ids.insert(envelope.id.clone()) {
                continue;
            }
            let cursor = Cursor {
                epoch: epoch.to_string(),
                event_type,
                position,
            };
            events.push(Arc::new(LoggedEvent {
                position,
                cursor: Arc::from(cursor.to_string()),
                envelope,
            }));
        }
        Ok(Replay {
            recovered: true,
            events,
            until,
        })
    }
}

/// Unregisters a local subscriber on drop; the last one out takes the log out of the read.
pub struct TopicGuard {
    hub: Hub,
    event_type: EventType,
}

impl Drop for TopicGuard {
    fn drop(&mut self) {
        let mut topics = lock(&self.hub.inner.topics);
        if let Some(topic) = topics.get_mut(&self.event_type) {
            topic.subscribers = topic.subscribers.saturating_sub(1);
            if topic.subscribers == 0 {
                topics.remove(&self.event_type);
            }
        }
    }
}

/// The event a subscription task is turning into a result: its commit time (`at`, µs since the
/// epoch, for the delivery-latency histogram), its position and its cursor.
#[derive(Clone)]
pub struct EventMark {
    pub at: i64,
    pub position: Position,
    pub cursor: Arc<str>,
}

tokio::task_local! {
    /// Set by the event streams as they yield, read by the task after each result.
    pub static CURRENT_EVENT: Cell<Option<EventMark>>;
}

fn mark(event: &LoggedEvent) {
    let _ = CURRENT_EVENT.try_with(|current| {
        current.set(Some(EventMark {
            at: event.envelope.at.timestamp_micros(),
            position: event.position,
            cursor: event.cursor.clone(),
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
    fn subscribe(&self, event_type: EventType) -> EnvelopeStream {
        let (receiver, guard) = self.hub.subscribe(event_type);
        let slow = self.slow.clone();
        Box::pin(futures_util::stream::unfold(
            (receiver, guard, slow),
            |(mut receiver, guard, slow)| async move {
                match receiver.recv().await {
                    Ok(event) => {
                        mark(&event);
                        Some((event.envelope.clone(), (receiver, guard, slow)))
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        slow.notify_one();
                        None
                    }
                    Err(broadcast::error::RecvError::Closed) => None,
                }
            },
        ))
    }
}

/// What a replay ended with, for the task that runs it.
#[derive(Debug, Default)]
pub struct ReplayOutcome {
    /// `None` until the log was read.
    pub result: Option<Result<ReplayEnd, ReplayError>>,
}

/// Where a replay ended (see [`Replay`]).
#[derive(Debug, Clone, Copy)]
pub struct ReplayEnd {
    pub recovered: bool,
    pub until: Position,
}

/// The log after a cursor as one resuming subscription sees it: a finite stream of the events
/// it missed, through the same resolver as live ones.
pub struct ReplayEvents {
    pub hub: Hub,
    pub cursor: Cursor,
    pub outcome: Arc<Mutex<ReplayOutcome>>,
}

impl EventSource for ReplayEvents {
    fn subscribe(&self, event_type: EventType) -> EnvelopeStream {
        let hub = self.hub.clone();
        let cursor = self.cursor.clone();
        let outcome = self.outcome.clone();
        Box::pin(
            futures_util::stream::once(async move {
                let replay = hub.replay(event_type, &cursor).await;
                let mut outcome = lock(&outcome);
                match replay {
                    Ok(replay) => {
                        outcome.result = Some(Ok(ReplayEnd {
                            recovered: replay.recovered,
                            until: replay.until,
                        }));
                        replay.events.clone()
                    }
                    Err(err) => {
                        outcome.result = Some(Err(err));
                        Vec::new()
                    }
                }
            })
            .flat_map(|events| {
                futures_util::stream::iter(events.into_iter().map(|event| {
                    mark(&event);
                    event.envelope.clone()
                }))
            }),
        )
    }
}

async fn run(hub: Hub, client: redis::Client, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    // Where the revocation stream stands; kept across reconnections like the logs' positions.
    let mut revocations: Option<Position> = None;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(REDIS_TIMEOUT))
        // Reads block for BLOCK; each is bounded by a timeout of its own.
        .set_response_timeout(None);
    loop {
        let connected = tokio::time::timeout(
            REDIS_TIMEOUT,
            client.get_multiplexed_async_connection_with_config(&config),
        )
        .await;
        match connected {
            Ok(Ok(connection)) => {
                backoff = Duration::from_millis(100);
                let reason = serve(&hub, connection, &mut revocations, &shutdown).await;
                set_connected(&hub, false);
                match reason {
                    Ended::Shutdown => return,
                    Ended::Lost(err) => {
                        tracing::warn!(%err, "lost the Redis event connection; reconnecting")
                    }
                }
            }
            Ok(Err(err)) => tracing::warn!(%err, "cannot connect to Redis; retrying"),
            Err(_) => tracing::warn!("connecting to Redis timed out; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Feeds the hub from the in-memory bus until shutdown (or until the bus is gone).
async fn run_memory(
    hub: Hub,
    mut messages: broadcast::Receiver<BusMessage>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            message = messages.recv() => match message {
                Ok(message) => hub.dispatch(&message.channel, message.position, message.payload.as_bytes()),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "the hub fell behind the in-memory bus; events were lost");
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    set_connected(&hub, false);
}

enum Ended {
    Shutdown,
    Lost(String),
}

async fn serve(
    hub: &Hub,
    mut connection: redis::aio::MultiplexedConnection,
    revocations: &mut Option<Position>,
    shutdown: &CancellationToken,
) -> Ended {
    let Backend::Redis(pool) = &hub.inner.backend else {
        return Ended::Shutdown;
    };
    let prefix = &hub.inner.key_prefix;
    let revocation_key = revocation_channel(prefix);
    // Named, so that an operator (and the tests) can tell it in `CLIENT LIST`.
    let mut hello = redis::pipe();
    hello
        .cmd("CLIENT")
        .arg("SETNAME")
        .arg(events::events_connection_name(prefix))
        .ignore()
        .cmd("CLIENT")
        .arg("ID");
    let (client_id,): (i64,) = match with_timeout(hello.query_async(&mut connection)).await {
        Ok(id) => id,
        Err(err) => return Ended::Lost(err),
    };
    // The epoch: ours if none is set (a new or emptied Redis), else the one every gateway uses.
    let mut epoch_pipe = redis::pipe();
    epoch_pipe
        .cmd("SET")
        .arg(epoch_key(prefix))
        .arg(new_epoch())
        .arg("NX")
        .ignore()
        .cmd("GET")
        .arg(epoch_key(prefix));
    let (epoch,): (String,) = match with_timeout(epoch_pipe.query_async(&mut connection)).await {
        Ok(epoch) => epoch,
        Err(err) => return Ended::Lost(err),
    };
    if hub.set_epoch(&epoch) {
        tracing::warn!(
            epoch,
            "the event logs were reset (Redis lost its data); reading them from the start"
        );
        if revocations.is_some() {
            *revocations = Some(Position::ZERO);
        }
    }
    if revocations.is_none() {
        match stream_tip(&mut connection, &revocation_key).await {
            Ok(tip) => *revocations = Some(tip),
            Err(err) => return Ended::Lost(err),
        }
    }
    set_connected(hub, true);
    hub.inner.ready.notify_waiters();
    tracing::info!("reading the event logs from Redis");
    loop {
        for event_type in hub.unstarted() {
            match stream_tip(&mut connection, &channel(prefix, event_type.as_str())).await {
                Ok(tip) => hub.start_topic(event_type, tip),
                Err(err) => return Ended::Lost(err),
            }
        }
        let mut logs = hub.read_set();
        logs.push((revocation_key.clone(), revocations.unwrap_or_default()));
        let mut read = redis::cmd("XREAD");
        read.arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS");
        for (key, _) in &logs {
            read.arg(key);
        }
        for (_, position) in &logs {
            read.arg(position.to_string());
        }
        let mut reading = connection.clone();
        let reply = tokio::time::timeout(
            BLOCK + REDIS_TIMEOUT,
            read.query_async::<Value>(&mut reading),
        );
        tokio::pin!(reply);
        let mut unblocked = false;
        let reply = loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ended::Shutdown,
                reply = &mut reply => break reply,
                () = hub.inner.wake.notified(), if !unblocked => {
                    // A new log to read: end the blocked read now (from another connection, as
                    // this one waits for the read) rather than at the end of BLOCK.
                    unblocked = true;
                    let pool = pool.clone();
                    tokio::spawn(async move {
                        let mut unblock = redis::cmd("CLIENT");
                        unblock.arg("UNBLOCK").arg(client_id);
                        let _ = service_kit::redis::query::<i64>(&pool, &unblock).await;
                    });
                }
            }
        };
        let entries = match reply {
            Ok(Ok(value)) => stream_entries(value),
            Ok(Err(err)) => return Ended::Lost(err.to_string()),
            Err(_) => return Ended::Lost("read timed out".into()),
        };
        for (key, position, payload) in entries {
            if key == revocation_key {
                *revocations = Some(revocations.unwrap_or_default().max(position));
            }
            hub.dispatch(&key, position, &payload);
        }
    }
}

/// The id of a stream's last entry (`0-0` when it has none).
async fn stream_tip(
    connection: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> Result<Position, String> {
    let reply: Value = with_timeout(
        redis::cmd("XREVRANGE")
            .arg(key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(connection),
    )
    .await?;
    Ok(entries_of(reply)
        .into_iter()
        .next()
        .map(|(position, _)| position)
        .unwrap_or_default())
}

/// A log's entries after `after` and whether none was trimmed away since. Redis trims from the
/// oldest end, so the history is whole when the cursor's own entry is still there, or when the
/// cursor is the last id the log ever gave (trimmed by age, with nothing after it).
///
/// Those are looked up first: a position the log does not hold (trimmed, or made up) is
/// answered at the cost of two lookups, without reading what follows it, so forged cursors
/// cannot make the gateway read the whole log each. It is looked up again after
/// the read, so that a trim racing with the read counts. (`max-deleted-entry-id` would say it
/// directly, but Redis 7.0 does not raise it when trimming.)
async fn redis_history(
    pool: &RedisPool,
    key: &str,
    after: Position,
) -> Result<(bool, Vec<(Position, Arc<str>)>), String> {
    if !has_entry(pool, key, after).await? {
        let last = last_generated(pool, key).await?;
        return Ok((last == Some(after), Vec::new()));
    }
    let mut entries = Vec::new();
    let mut from = after;
    loop {
        let mut range = redis::cmd("XRANGE");
        range
            .arg(key)
            .arg(format!("({from}"))
            .arg("+")
            .arg("COUNT")
            .arg(READ_COUNT);
        let page = entries_of(
            service_kit::redis::query::<Value>(pool, &range)
                .await
                .map_err(|err| err.to_string())?,
        );
        let full = page.len() == READ_COUNT;
        for (position, payload) in page {
            from = position;
            entries.push((position, Arc::from(String::from_utf8_lossy(&payload))));
        }
        if !full {
            break;
        }
    }
    let covered = has_entry(pool, key, after).await?;
    Ok((covered, entries))
}

/// The last id the log gave, if the log exists.
async fn last_generated(pool: &RedisPool, key: &str) -> Result<Option<Position>, String> {
    let mut info = redis::cmd("XINFO");
    info.arg("STREAM").arg(key);
    match service_kit::redis::query::<Value>(pool, &info).await {
        Ok(info) => Ok(pairs(&info)
            .into_iter()
            .find(|(field, _)| field == "last-generated-id")
            .and_then(|(_, value)| text(&value))
            .and_then(|text| Position::parse(&text))),
        // No such log: it was deleted since the cursor's event was in it.
        Err(service_kit::redis::RedisError::Command(_)) => Ok(None),
        Err(err) => Err(err.to_string()),
    }
}

/// Whether the log holds an entry at `position`.
async fn has_entry(pool: &RedisPool, key: &str, position: Position) -> Result<bool, String> {
    let mut anchor = redis::cmd("XRANGE");
    anchor
        .arg(key)
        .arg(position.to_string())
        .arg(position.to_string());
    let reply = service_kit::redis::query::<Value>(pool, &anchor)
        .await
        .map_err(|err| err.to_string())?;
    Ok(!entries_of(reply).is_empty())
}

/// The entries of an `XREAD` reply, as (log, position, envelope).
fn stream_entries(reply: Value) -> Vec<(String, Position, Vec<u8>)> {
    let streams: Vec<(Value, Value)> = match reply {
        Value::Map(map) => map,
        Value::Array(items) => items
            .into_iter()
            .filter_map(|item| match item {
                Value::Array(mut pair) if pair.len() == 2 => {
                    let entries = pair.pop()?;
                    Some((pair.pop()?, entries))
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    streams
        .into_iter()
        .filter_map(|(key, entries)| Some((text(&key)?, entries)))
        .flat_map(|(key, entries)| {
            entries_of(entries)
                .into_iter()
                .map(move |(position, payload)| (key.clone(), position, payload))
        })
        .collect()
}

/// `[[id, [field, value, …]], …]` → (position, the envelope field's value).
fn entries_of(value: Value) -> Vec<(Position, Vec<u8>)> {
    let Value::Array(entries) = value else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|entry| {
            let Value::Array(mut entry) = entry else {
                return None;
            };
            if entry.len() != 2 {
                return None;
            }
            let fields = entry.pop()?;
            let position = Position::parse(&text(&entry.pop()?)?)?;
            let payload = pairs(&fields)
                .into_iter()
                .find(|(field, _)| field == ENTRY_FIELD)
                .and_then(|(_, value)| match value {
                    Value::BulkString(bytes) => Some(bytes),
                    Value::SimpleString(text) => Some(text.into_bytes()),
                    _ => None,
                })
                .unwrap_or_default();
            Some((position, payload))
        })
        .collect()
}

/// A flat `[field, value, …]` array (or a RESP3 map) as pairs.
fn pairs(value: &Value) -> Vec<(String, Value)> {
    match value {
        Value::Map(map) => map
            .iter()
            .filter_map(|(k, v)| Some((text(k)?, v.clone())))
            .collect(),
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|pair| match pair {
                [k, v] => Some((text(k)?, v.clone())),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

async fn with_timeout<T>(
    work: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(REDIS_TIMEOUT, work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

fn set_connected(hub: &Hub, connected: bool) {
    hub.inner.connected.store(connected, Ordering::Relaxed);
    hub.inner.metrics.redis_connected.set(i64::from(connected));
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
