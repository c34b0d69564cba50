//! Shared executions: subscriptions with the same document, operation name and variables on one
//! gateway process are executed once per event, not once per subscriber.
//!
//! The first subscriber of an operation starts an [`Execution`]: one task that runs the juniper
//! stream (resolvers, filtering, the selection set) and serializes each result once into a shared
//! JSON payload, which it broadcasts. Every subscriber's task then only wraps that payload with its
//! own id (`{"id":…,"type":"next","payload":<shared>}`) and queues it for its socket. The last
//! subscriber to leave drops the execution, which stops its task and, through the hub's guard,
//! unsubscribes the Redis channel when nobody else needs it.
//!
//! Results do not depend on who subscribed (any signed-in user may read every car, and each
//! connection's own token was checked at `connection_init` and is watched for expiry and
//! revocation), which is what makes sharing them correct. A per-user field would have to be
//! part of the key.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use common::graphql::Context;
use futures_util::StreamExt as _;
use juniper::{DefaultScalarValue, ExecutionOutput, SubscriptionCoordinator as _};
use serde_json::Value;
use tokio::sync::{broadcast, Notify};

use crate::connection::Coordinator;
use crate::hub::{ConnectionEvents, Hub, EVENT_AT};
use crate::protocol;

/// What an execution broadcasts to its subscribers.
#[derive(Debug)]
pub enum Item {
    /// One result: the serialized `{data, errors?}` and the commit time of its event (µs).
    Result {
        payload: Box<str>,
        event_at: Option<i64>,
    },
    /// The operation failed before producing results: the serialized GraphQL error list.
    Failed { errors: Box<str> },
    /// The stream ended (the event source closed); subscribers complete.
    Done,
}

/// The running executions of this process, by operation key.
pub struct Executions {
    running: Mutex<HashMap<String, Weak<Execution>>>,
    /// `gateway_executions_active`: distinct operations being executed.
    gauge: prometheus::IntGauge,
}

/// One shared execution. Dropping the last `Arc` stops it.
pub struct Execution {
    key: String,
    sender: broadcast::Sender<Arc<Item>>,
    /// Set (under the registry lock) when the task has sent its last item, so that nobody joins
    /// an execution that will never send again.
    finished: Arc<AtomicBool>,
    task: actix_web::rt::task::JoinHandle<()>,
    registry: Weak<Executions>,
}

impl Drop for Execution {
    fn drop(&mut self) {
        self.task.abort();
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
    pub buffer: usize,
}

impl Executions {
    pub fn new(gauge: prometheus::IntGauge) -> Self {
        Self {
            running: Mutex::new(HashMap::new()),
            gauge,
        }
    }

    /// Joins the running execution of `request`, or starts one. The receiver sees every result
    /// from now on; keep the `Arc` for as long as the subscription lives.
    pub fn join(
        self: &Arc<Self>,
        start: Start<'_>,
    ) -> (Arc<Execution>, broadcast::Receiver<Arc<Item>>) {
        let key = operation_key(&start.request);
        let mut running = lock(&self.running);
        if let Some(execution) = running.get(&key).and_then(Weak::upgrade) {
            if !execution.finished.load(Ordering::Acquire) {
                let receiver = execution.sender.subscribe();
                return (execution, receiver);
            }
        }
        let (sender, receiver) = broadcast::channel(start.buffer.max(1));
        let context =
            Context::new(Ok(start.claims.clone())).with_events(Arc::new(ConnectionEvents {
                hub: start.hub.clone(),
                // The shared task falling behind the hub ends its stream; subscribers then see
                // the execution complete.
                slow: Arc::new(Notify::new()),
            }));
        let finished = Arc::new(AtomicBool::new(false));
        let last = LastItem {
            registry: Arc::downgrade(self),
            finished: finished.clone(),
            sender: sender.clone(),
        };
        let task = actix_web::rt::spawn(EVENT_AT.scope(
            Cell::new(None),
            drive(start.coordinator.clone(), start.request, context, last),
        ));
        let execution = Arc::new(Execution {
            key: key.clone(),
            sender,
            finished,
            task,
            registry: Arc::downgrade(self),
        });
        running.insert(key, Arc::downgrade(&execution));
        self.gauge.inc();
        (execution, receiver)
    }
}

/// How the task sends its last item: under the registry lock, after marking the execution
/// finished, so a subscriber either joins before (and receives it) or starts a new execution.
struct LastItem {
    registry: Weak<Executions>,
    finished: Arc<AtomicBool>,
    sender: broadcast::Sender<Arc<Item>>,
}

impl LastItem {
    fn send(self, item: Item) {
        let registry = self.registry.upgrade();
        let _guard = registry.as_ref().map(|r| lock(&r.running));
        self.finished.store(true, Ordering::Release);
        let _ = self.sender.send(Arc::new(item));
    }
}

/// Runs the juniper stream once for every subscriber of the operation.
async fn drive(
    coordinator: Arc<Coordinator>,
    request: juniper::http::GraphQLRequest<DefaultScalarValue>,
    context: Context,
    last: LastItem,
) {
    let sender = last.sender.clone();
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
            last.send(Item::Failed {
                errors: errors.to_string().into_boxed_str(),
            });
            return;
        }
    };
    tokio::pin!(stream);
    while let Some(output) = stream.next().await {
        let payload = result_payload(output);
        let event_at = EVENT_AT.try_with(Cell::take).ok().flatten();
        // An error only means that nobody listens at this instant.
        let _ = sender.send(Arc::new(Item::Result { payload, event_at }));
    }
    last.send(Item::Done);
}

/// `{data, errors}` with `errors` left out when empty, as the GraphQL response format asks,
/// serialized once.
fn result_payload(output: ExecutionOutput<DefaultScalarValue>) -> Box<str> {
    let serialized = if output.errors.is_empty() {
        serde_json::to_string(&DataOnly { data: &output.data })
    } else {
        serde_json::to_string(&output)
    };
    serialized
        .unwrap_or_else(|_| r#"{"data":null}"#.to_owned())
        .into_boxed_str()
}

#[derive(serde::Serialize)]
struct DataOnly<'a> {
    data: &'a juniper::Value<DefaultScalarValue>,
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
