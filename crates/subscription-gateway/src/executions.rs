//! Shared executions: subscriptions with the same document, operation name and variables on one
//! gateway process are executed once per event, not once per subscriber.
//!
//! The first subscriber of an operation starts an [`Execution`]: one task that runs the juniper
//! stream (resolvers, filtering, the selection set) and serializes each result once. For every
//! result it then walks its subscribers and puts a frame on each one's connection queue, wrapping
//! the shared payload with the subscriber's id (`{"type":"next","id":…,"payload":<shared>}`).
//! There is no task or channel per subscriber: per delivery the cost is one small string and one
//! `try_send`. A full queue means that connection reads too slowly; it is told to close (1013)
//! and the others are not held up. The last subscriber to leave drops the execution, which stops
//! its task and, through the hub's guard, unsubscribes the Redis channel when nobody else needs it.
//!
//! Results do not depend on who subscribed (any signed-in user may read every car, and each
//! connection's own token was checked at `connection_init` and is watched for expiry and
//! revocation), which is what makes sharing them correct. A per-user field would have to be
//! part of the key.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use common::graphql::Context;
use futures_util::{FutureExt as _, StreamExt as _};
use juniper::{DefaultScalarValue, ExecutionOutput, SubscriptionCoordinator as _};
use serde_json::Value;
use tokio::sync::{mpsc, Notify};

use crate::connection::{Coordinator, Outbound};
use crate::hub::{ConnectionEvents, Hub, EVENT_AT};
use crate::protocol::{self, Protocol};

/// The running executions of this process, by operation key.
pub struct Executions {
    running: Mutex<HashMap<String, Weak<Execution>>>,
    /// `gateway_executions_active`: distinct operations being executed.
    gauge: prometheus::IntGauge,
}

/// One shared execution. Dropping the last [`Membership`] stops it.
pub struct Execution {
    key: String,
    subscribers: Mutex<HashMap<u64, Subscriber>>,
    next_slot: AtomicU64,
    /// Set (under the registry lock) when the task has delivered its last message, so that
    /// nobody joins an execution that will never send again.
    finished: AtomicBool,
    task: Mutex<Option<actix_web::rt::task::JoinHandle<()>>>,
    registry: Weak<Executions>,
}

/// Where one subscription's messages go.
pub struct Subscriber {
    pub protocol: Protocol,
    /// The subscription's id.
    pub id: String,
    /// Its connection's outbound queue.
    pub out: mpsc::Sender<Outbound>,
    /// Tells its connection that the queue overflowed.
    pub slow: Arc<Notify>,
}

/// A subscription's place in an execution; dropping it leaves.
pub struct Membership {
    execution: Arc<Execution>,
    slot: u64,
}

impl Drop for Membership {
    fn drop(&mut self) {
        lock(&self.execution.subscribers).remove(&self.slot);
    }
}

impl Drop for Execution {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
        if let Some(registry) = self.registry.upgrade() {
            registry.gauge.dec();
            let mut running = lock(&registry.running);
            // Only remove our own entry; a newer execution may have taken the key.
            if running
                .get(&self.key)
                .is_some_and(|weak| weak.strong_count() == 0)
            {
                running.remove(&self.key);
            }
        }
    }
}

/// What a subscriber needs to join or start an execution.
pub struct Start<'a> {
    pub coordinator: &'a Arc<Coordinator>,
    pub hub: &'a Hub,
    pub claims: &'a common::jwt::Claims,
    pub request: juniper::http::GraphQLRequest<DefaultScalarValue>,
    pub subscriber: Subscriber,
}

impl Executions {
    pub fn new(gauge: prometheus::IntGauge) -> Self {
        Self {
            running: Mutex::new(HashMap::new()),
            gauge,
        }
    }

    /// Joins the running execution of the request, or starts one. The subscriber receives every
    /// result from now on, for as long as the returned membership lives.
    pub fn join(self: &Arc<Self>, start: Start<'_>) -> Membership {
        let key = operation_key(&start.request);
        let mut running = lock(&self.running);
        if let Some(execution) = running.get(&key).and_then(Weak::upgrade) {
            if !execution.finished.load(Ordering::Acquire) {
                return execution.add(start.subscriber);
            }
        }
        // The shared task falling more than FANOUT_BUFFER events behind the hub ends its stream
        // and leaves a permit here; its subscribers' connections are then closed as slow (1013),
        // so that clients reconnect and resubscribe rather than silently miss events.
        let lagged = Arc::new(Notify::new());
        let context =
            Context::new(Ok(start.claims.clone())).with_events(Arc::new(ConnectionEvents {
                hub: start.hub.clone(),
                slow: lagged.clone(),
            }));
        let execution = Arc::new(Execution {
            key: key.clone(),
            subscribers: Mutex::new(HashMap::new()),
            next_slot: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            task: Mutex::new(None),
            registry: Arc::downgrade(self),
        });
        let membership = execution.add(start.subscriber);
        let task = actix_web::rt::spawn(EVENT_AT.scope(
            Cell::new(None),
            drive(
                start.coordinator.clone(),
                start.request,
                context,
                Arc::downgrade(&execution),
                lagged,
            ),
        ));
        *lock(&execution.task) = Some(task);
        running.insert(key, Arc::downgrade(&execution));
        self.gauge.inc();
        membership
    }
}

impl Execution {
    fn add(self: &Arc<Self>, subscriber: Subscriber) -> Membership {
        let slot = self.next_slot.fetch_add(1, Ordering::Relaxed);
        lock(&self.subscribers).insert(slot, subscriber);
        Membership {
            execution: self.clone(),
            slot,
        }
    }

    /// One result to every subscriber.
    fn deliver(&self, payload: &str, event_at: Option<i64>) {
        for subscriber in lock(&self.subscribers).values() {
            let text = protocol::next_raw(subscriber.protocol, &id_json(&subscriber.id), payload);
            if let Err(mpsc::error::TrySendError::Full(_)) =
                subscriber.out.try_send(Outbound::Next { text, event_at })
            {
                subscriber.slow.notify_one();
            }
        }
    }

    /// The last message to every subscriber (an error list, or `complete` when `errors` is
    /// `None`), marked under the registry lock so that nobody joins afterwards.
    fn finish(&self, errors: Option<&str>) {
        let registry = self.registry.upgrade();
        let _guard = registry.as_ref().map(|r| lock(&r.running));
        self.finished.store(true, Ordering::Release);
        for subscriber in lock(&self.subscribers).values() {
            let text = match errors {
                Some(errors) => protocol::operation_error_raw(&id_json(&subscriber.id), errors),
                None => protocol::complete(&subscriber.id),
            };
            let finished = Outbound::Finished {
                id: subscriber.id.clone(),
                text,
            };
            if let Err(mpsc::error::TrySendError::Full(_)) = subscriber.out.try_send(finished) {
                subscriber.slow.notify_one();
            }
        }
    }
}

impl Execution {
    /// The execution missed events: every subscriber's connection closes as slow (1013).
    fn cut_off_everyone(&self) {
        let registry = self.registry.upgrade();
        let _guard = registry.as_ref().map(|r| lock(&r.running));
        self.finished.store(true, Ordering::Release);
        for subscriber in lock(&self.subscribers).values() {
            subscriber.slow.notify_one();
        }
    }
}

/// Runs the juniper stream once for every subscriber of the operation.
async fn drive(
    coordinator: Arc<Coordinator>,
    request: juniper::http::GraphQLRequest<DefaultScalarValue>,
    context: Context,
    execution: Weak<Execution>,
    lagged: Arc<Notify>,
) {
    let stream = match coordinator.subscribe(&request, &context).await {
        Ok(stream) => stream,
        Err(err) => {
            let errors = match err {
                juniper::GraphQLError::NotSubscription => protocol::errors(
                    "only subscriptions are served on the websocket; send queries and mutations \
                     with HTTP POST to /graphql/",
                    "BAD_REQUEST",
                ),
                other => serde_json::to_value(&other)
                    .ok()
                    .filter(Value::is_array)
                    .unwrap_or_else(|| protocol::errors(&other.to_string(), "BAD_REQUEST")),
            };
            if let Some(execution) = execution.upgrade() {
                execution.finish(Some(&errors.to_string()));
            }
            return;
        }
    };
    tokio::pin!(stream);
    while let Some(output) = stream.next().await {
        let payload = result_payload(output);
        let event_at = EVENT_AT.try_with(Cell::take).ok().flatten();
        let Some(execution) = execution.upgrade() else {
            return;
        };
        execution.deliver(&payload, event_at);
    }
    let Some(execution) = execution.upgrade() else {
        return;
    };
    if lagged.notified().now_or_never().is_some() {
        execution.cut_off_everyone();
    } else {
        execution.finish(None);
    }
}

/// `{data, errors}` with `errors` left out when empty, as the GraphQL response format asks,
/// serialized once.
fn result_payload(output: ExecutionOutput<DefaultScalarValue>) -> String {
    let serialized = if output.errors.is_empty() {
        serde_json::to_string(&DataOnly { data: &output.data })
    } else {
        serde_json::to_string(&output)
    };
    serialized.unwrap_or_else(|_| r#"{"data":null}"#.to_owned())
}

#[derive(serde::Serialize)]
struct DataOnly<'a> {
    data: &'a juniper::Value<DefaultScalarValue>,
}

fn id_json(id: &str) -> String {
    serde_json::to_string(id).unwrap_or_else(|_| "\"\"".to_owned())
}

/// The operation's identity: document, operation name and variables (serde_json's maps are
/// sorted, so equal variables serialize equally).
fn operation_key(request: &juniper::http::GraphQLRequest<DefaultScalarValue>) -> String {
    let variables = request
        .variables
        .as_ref()
        .and_then(|v| serde_json::to_value(v).ok())
        .map(|v| v.to_string())
        .unwrap_or_default();
    format!(
        "{}\u{0}{}\u{0}{}",
        request.operation_name.as_deref().unwrap_or(""),
        variables,
        request.query
    )
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
