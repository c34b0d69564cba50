//! The fan-out: one Redis pub/sub connection per process (or, in the embedded mode, the in-memory
//! bus: [`Hub::start_memory`]), and in memory a broadcast channel per event type that every local
//! subscriber of that type reads.
//!
//! - A Redis channel is subscribed when the first local subscriber of its type appears and
//!   unsubscribed when the last one leaves ([`TopicGuard`] counts them).
//! - Each message is decoded once, checked against recently seen event ids (delivery is
//!   at-least-once, so duplicates are expected), and handed to the broadcast channel as one shared
//!   `Arc<Envelope>`: no per-subscriber decoding or copying here.
//! - A subscriber that falls more than `FANOUT_BUFFER` events behind is a slow consumer: its
//!   connection is closed rather than buffered without bound.
//! - When Redis goes away, the task reconnects with capped exponential backoff and subscribes again
//!   to every channel still wanted; sockets stay open meanwhile and `/readyz` says not ready.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::events::{
    channel, revocation_channel, BusMessage, Envelope, EnvelopeStream, EventSource, EventType,
    MemoryBus, Revocation,
};
use deadpool_redis::redis;
use futures_util::StreamExt as _;
use tokio::sync::{broadcast, mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::lock;
use crate::metrics::GatewayMetrics;

/// How many event ids are remembered for dropping duplicates.
const RECENT_IDS: usize = 16_384;
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the subscriber connection is pinged: a Redis that hangs without closing the socket
/// is noticed within this time plus the ping timeout.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
const REDIS_TIMEOUT: Duration = Duration::from_secs(3);

/// Cheap to clone; one per process.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    key_prefix: String,
    buffer: usize,
    topics: Mutex<HashMap<EventType, Topic>>,
    commands: mpsc::UnboundedSender<Command>,
    connected: AtomicBool,
    revocations: broadcast::Sender<Arc<Revocation>>,
    recent: Mutex<RecentIds>,
    metrics: GatewayMetrics,
}

struct Topic {
    sender: broadcast::Sender<Arc<Envelope>>,
    subscribers: usize,
}

enum Command {
    Subscribe(String),
    Unsubscribe(String),
}

impl Hub {
    /// Creates the hub over Redis and spawns its Redis task, which runs until `shutdown` is
    /// cancelled.
    pub fn start(
        redis_url: &str,
        key_prefix: &str,
        buffer: usize,
        metrics: GatewayMetrics,
        shutdown: CancellationToken,
    ) -> Result<Hub, String> {
        let client = redis::Client::open(redis_url).map_err(|err| err.to_string())?;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (revocations, _) = broadcast::channel(256);
        let hub = Hub {
            inner: Arc::new(Inner {
                key_prefix: key_prefix.to_owned(),
                buffer: buffer.max(1),
                topics: Mutex::new(HashMap::new()),
                commands,
                connected: AtomicBool::new(false),
                revocations,
                recent: Mutex::new(RecentIds::default()),
                metrics,
            }),
        };
        tokio::spawn(run(hub.clone(), client, command_rx, shutdown));
        Ok(hub)
    }

    /// Creates the hub over the in-memory bus of the embedded mode and spawns the task that feeds
    /// it, which runs until `shutdown` is cancelled. Messages go through the same decoding,
    /// dedupe and fan-out as Redis messages; the bus carries every channel, so there is nothing
    /// to subscribe to and the hub is connected from the start.
    pub fn start_memory(
        bus: &MemoryBus,
        buffer: usize,
        metrics: GatewayMetrics,
        shutdown: CancellationToken,
    ) -> Hub {
        // Nobody reads the subscribe/unsubscribe commands: sending them fails quietly.
        let (commands, _) = mpsc::unbounded_channel();
        let (revocations, _) = broadcast::channel(256);
        let hub = Hub {
            inner: Arc::new(Inner {
                key_prefix: bus.key_prefix().to_owned(),
                buffer: buffer.max(1),
                topics: Mutex::new(HashMap::new()),
                commands,
                connected: AtomicBool::new(false),
                revocations,
                recent: Mutex::new(RecentIds::default()),
                metrics,
            }),
        };
        set_connected(&hub, true);
        tokio::spawn(run_memory(hub.clone(), bus.subscribe(), shutdown));
        hub
    }

    /// True while the subscriber connection to Redis is up.
    pub fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::Relaxed)
    }

    /// Revoked sessions, as auth-service announces them.
    pub fn revocations(&self) -> broadcast::Receiver<Arc<Revocation>> {
        self.inner.revocations.subscribe()
    }

    /// Registers a local subscriber of `event_type`: the receiver, and a guard that unregisters it
    /// when dropped.
    pub fn subscribe(
        &self,
        event_type: EventType,
    ) -> (broadcast::Receiver<Arc<Envelope>>, TopicGuard) {
        let mut topics = lock(&self.inner.topics);
        let topic = topics.entry(event_type).or_insert_with(|| Topic {
            sender: broadcast::channel(self.inner.buffer).0,
            subscribers: 0,
        });
        topic.subscribers += 1;
        if topic.subscribers == 1 {
            let _ = self.inner.commands.send(Command::Subscribe(channel(
                &self.inner.key_prefix,
                event_type,
            )));
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

    /// Decodes one message and hands it to the local subscribers.
    fn dispatch(&self, channel_name: &str, payload: &[u8]) {
        let inner = &self.inner;
        if channel_name == revocation_channel(&inner.key_prefix) {
            match serde_json::from_slice::<Revocation>(payload) {
                Ok(revocation) => {
                    let _ = inner.revocations.send(Arc::new(revocation));
                }
                Err(err) => {
                    inner.metrics.events_malformed.inc();
                    tracing::warn!(%err, "malformed revocation message");
                }
            }
            return;
        }
        let envelope: Envelope = match serde_json::from_slice(payload) {
            Ok(envelope) => envelope,
            Err(err) => {
                inner.metrics.events_malformed.inc();
                tracing::warn!(%err, channel = channel_name, "malformed event envelope");
                return;
            }
        };
        if channel(&inner.key_prefix, envelope.event_type) != channel_name {
            inner.metrics.events_malformed.inc();
            tracing::warn!(
                channel = channel_name,
                "event type does not match its channel"
            );
            return;
        }
        inner
            .metrics
            .events_received
            .with_label_values(&[envelope.event_type.as_str()])
            .inc();
        if !lock(&inner.recent).insert(&envelope.id) {
            inner.metrics.events_duplicate.inc();
            return;
        }
        let topics = lock(&inner.topics);
        if let Some(topic) = topics.get(&envelope.event_type) {
            // An error only means nobody is listening right now.
            let _ = topic.sender.send(Arc::new(envelope));
        }
    }

    fn wanted_channels(&self) -> Vec<String> {
        let topics = lock(&self.inner.topics);
        topics
            .keys()
            .map(|t| channel(&self.inner.key_prefix, *t))
            .collect()
    }
}

/// Unregisters a local subscriber on drop; the last one out unsubscribes the Redis channel.
pub struct TopicGuard {
    hub: Hub,
    event_type: EventType,
}

impl Drop for TopicGuard {
    fn drop(&mut self) {
        let inner = &self.hub.inner;
        let mut topics = lock(&inner.topics);
        if let Some(topic) = topics.get_mut(&self.event_type) {
            topic.subscribers = topic.subscribers.saturating_sub(1);
            if topic.subscribers == 0 {
                topics.remove(&self.event_type);
                let _ = inner.commands.send(Command::Unsubscribe(channel(
                    &inner.key_prefix,
                    self.event_type,
                )));
            }
        }
    }
}

/// The hub as one connection's subscriptions see it: events come from the hub, and falling behind
/// tells the connection (through `slow`) to close.
pub struct ConnectionEvents {
    pub hub: Hub,
    pub slow: Arc<Notify>,
}

tokio::task_local! {
    /// The commit time (`at`, in µs since the epoch) of the event the current subscription task
    /// is turning into a message, for the delivery-latency histogram.
    pub static EVENT_AT: std::cell::Cell<Option<i64>>;
}

impl EventSource for ConnectionEvents {
    fn subscribe(&self, event_type: EventType) -> EnvelopeStream {
        let (receiver, guard) = self.hub.subscribe(event_type);
        let slow = self.slow.clone();
        Box::pin(futures_util::stream::unfold(
            (receiver, guard, slow),
            |(mut receiver, guard, slow)| async move {
                match receiver.recv().await {
                    Ok(envelope) => {
                        let _ =
                            EVENT_AT.try_with(|at| at.set(Some(envelope.at.timestamp_micros())));
                        Some((Envelope::clone(&envelope), (receiver, guard, slow)))
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

async fn run(
    hub: Hub,
    client: redis::Client,
    mut commands: mpsc::UnboundedReceiver<Command>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = tokio::time::timeout(REDIS_TIMEOUT, client.get_async_pubsub()).await;
        match connected {
            Ok(Ok(pubsub)) => {
                backoff = Duration::from_millis(100);
                let reason = serve(&hub, pubsub, &mut commands, &shutdown).await;
                set_connected(&hub, false);
                match reason {
                    Ended::Shutdown => return,
                    Ended::Lost(err) => {
                        tracing::warn!(%err, "lost the Redis subscriber connection; reconnecting")
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
                Ok(message) => hub.dispatch(&message.channel, message.payload.as_bytes()),
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
    pubsub: redis::aio::PubSub,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    shutdown: &CancellationToken,
) -> Ended {
    let (mut sink, mut stream) = pubsub.split();
    let mut channels = hub.wanted_channels();
    channels.push(revocation_channel(&hub.inner.key_prefix));
    for name in &channels {
        if let Err(err) = with_timeout(sink.subscribe(name)).await {
            return Ended::Lost(err);
        }
    }
    set_connected(hub, true);
    tracing::info!(channels = channels.len(), "subscribed to Redis");
    let mut health = tokio::time::interval(HEALTH_INTERVAL);
    health.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ended::Shutdown,
            message = stream.next() => match message {
                Some(message) => hub.dispatch(message.get_channel_name(), message.get_payload_bytes()),
                None => return Ended::Lost("connection closed".into()),
            },
            command = commands.recv() => {
                let result = match command {
                    Some(Command::Subscribe(name)) => with_timeout(sink.subscribe(name)).await,
                    Some(Command::Unsubscribe(name)) => with_timeout(sink.unsubscribe(name)).await,
                    // The hub (and so every sender) is gone: nothing left to serve.
                    None => return Ended::Shutdown,
                };
                if let Err(err) = result {
                    return Ended::Lost(err);
                }
            }
            _ = health.tick() => {
                if let Err(err) = with_timeout(sink.ping::<redis::Value>()).await {
                    return Ended::Lost(err);
                }
            }
        }
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
