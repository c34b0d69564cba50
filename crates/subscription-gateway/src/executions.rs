//! Shared executions: subscriptions with the same document, operation name and variables on one
//! gateway process are executed once per event, not once per subscriber.
//!
//! The first subscriber of an operation starts an [`Execution`]: one task that runs the juniper
//! stream (resolvers, filtering, the selection set) and serializes each result once. Its
//! subscribers are kept in one [`Group`] per worker thread, each served by a task on that worker,
//! so a large fan-out is written by all workers at once. For every result, each group's task builds
//! the frame once per distinct (protocol, subscription id) — most clients use the id `"1"` — and
//! writes it straight into every member's socket ([`Link::push`]): per delivery the cost is one
//! non-blocking `send`, without a task wake-up or a copy. A member whose socket is full gets the
//! frame queued on its link; a member too far behind is told to close (1013) and the others are
//! not held up. The last subscriber to leave drops the execution, which stops its tasks and,
//! through the hub's guard, unsubscribes the Redis channel when nobody else needs it.
//!
//! Results do not depend on who subscribed (any signed-in user may read every car, and each
//! connection's own token was checked at `connection_init` and is watched for expiry and
//! revocation), which is what makes sharing them correct. A per-user field would have to be
//! part of the key.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::ThreadId;

use bytes::Bytes;
use common::graphql::Context;
use futures_util::{FutureExt as _, StreamExt as _};
use juniper::{DefaultScalarValue, ExecutionOutput, SubscriptionCoordinator as _};
use serde_json::Value;
use tokio::sync::{mpsc, Notify};

use crate::connection::Coordinator;
use crate::hub::{ConnectionEvents, Hub, EVENT_AT};
use crate::lock;
use crate::metrics::GatewayMetrics;
use crate::protocol::{self, Protocol};
use crate::socket::{text_frame, Link};

/// The running executions of this process, by operation key.
pub struct Executions {
    running: Mutex<HashMap<String, Weak<Execution>>>,
    metrics: GatewayMetrics,
    /// Results that may wait for one worker's group task (FANOUT_BUFFER); a group that far
    /// behind holds up its execution, which then lags behind the hub and cuts everyone off.
    group_buffer: usize,
}

/// One shared execution. Dropping the last [`Membership`] stops it.
pub struct Execution {
    key: String,
    /// One group per worker thread that has subscribers; dropping the senders ends the tasks.
    groups: Mutex<Vec<GroupHandle>>,
    /// Set (under the registry lock) when the task has delivered its last message, so that
    /// nobody joins an execution that will never send again.
    finished: AtomicBool,
    task: Mutex<Option<actix_web::rt::task::JoinHandle<()>>>,
    registry: Weak<Executions>,
}

/// A group and the queue of its task.
type GroupHandle = (Arc<Group>, mpsc::Sender<Arc<Batch>>);

/// The subscribers of one execution on one worker thread.
pub struct Group {
    thread: ThreadId,
    members: Mutex<HashMap<u64, Subscriber>>,
    next_slot: AtomicU64,
}

/// What the execution hands to its groups.
enum Batch {
    /// A result: the serialized `{data, errors?}` and the commit time of the event behind it
    /// (µs since the epoch).
    Next {
        payload: String,
        event_at: Option<i64>,
    },
    /// The last message: an error list, or `complete` when `None`.
    Finish(Option<String>),
    /// The execution missed events: every member's connection closes as slow.
    CutOff,
}

/// Where one subscription's messages go.
pub struct Subscriber {
    pub protocol: Protocol,
    /// The subscription's id.
    pub id: String,
    /// Its connection's socket.
    pub link: Arc<Link>,
}

/// A subscription's place in an execution; dropping it leaves.
pub struct Membership {
    _execution: Arc<Execution>,
    group: Arc<Group>,
    slot: u64,
}

impl Drop for Membership {
    fn drop(&mut self) {
        lock(&self.group.members).remove(&self.slot);
    }
}

impl Drop for Execution {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
        if let Some(registry) = self.registry.upgrade() {
            registry.metrics.executions_active.dec();
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
    pub fn new(metrics: GatewayMetrics, group_buffer: usize) -> Self {
        Self {
            running: Mutex::new(HashMap::new()),
            metrics,
            group_buffer: group_buffer.max(1),
        }
    }

    /// Joins the running execution of the request, or starts one. The subscriber receives every
    /// result from now on, for as long as the returned membership lives. Called on the worker
    /// thread that serves the subscriber's connection.
    pub fn join(self: &Arc<Self>, start: Start<'_>) -> Membership {
        let key = operation_key(&start.request);
        // A finished execution upgraded here may be the last reference to it (its members left
        // on other workers meanwhile): it must be dropped after `running` is unlocked, because
        // `Execution::drop` locks `running` itself, and a std mutex locked twice on one thread
        // deadlocks that worker and every socket on it. Declared before the guard, so that it
        // is dropped after it.
        let _finished: Option<Arc<Execution>>;
        let mut running = lock(&self.running);
        match running.get(&key).and_then(Weak::upgrade) {
            Some(execution) if !execution.finished.load(Ordering::Acquire) => {
                return execution.add(self, start.subscriber);
            }
            other => _finished = other,
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
            groups: Mutex::new(Vec::new()),
            finished: AtomicBool::new(false),
            task: Mutex::new(None),
            registry: Arc::downgrade(self),
        });
        let membership = execution.add(self, start.subscriber);
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
        self.metrics.executions_active.inc();
        membership
    }
}

impl Execution {
    /// Adds the subscriber to this thread's group, starting the group (and its task on this
    /// worker) if it is the thread's first.
    fn add(self: &Arc<Self>, registry: &Executions, subscriber: Subscriber) -> Membership {
        let thread = std::thread::current().id();
        let mut groups = lock(&self.groups);
        let group = match groups.iter().find(|(group, _)| group.thread == thread) {
            Some((group, _)) => group.clone(),
            None => {
                let group = Arc::new(Group {
                    thread,
                    members: Mutex::new(HashMap::new()),
                    next_slot: AtomicU64::new(0),
                });
                let (tx, rx) = mpsc::channel(registry.group_buffer);
                actix_web::rt::spawn(serve_group(group.clone(), rx, registry.metrics.clone()));
                groups.push((group.clone(), tx));
                group
            }
        };
        drop(groups);
        let slot = group.next_slot.fetch_add(1, Ordering::Relaxed);
        lock(&group.members).insert(slot, subscriber);
        Membership {
            _execution: self.clone(),
            group,
            slot,
        }
    }

    /// Hands a batch to every group, in order. A group's queue being full holds this execution
    /// up (and with it, eventually, its place in the hub's buffer) rather than dropping results.
    async fn broadcast(&self, batch: Batch) {
        let senders: Vec<mpsc::Sender<Arc<Batch>>> = lock(&self.groups)
            .iter()
            .map(|(_, tx)| tx.clone())
            .collect();
        let batch = Arc::new(batch);
        for tx in senders {
            // A closed queue means its group's task is gone with the execution.
            let _ = tx.send(batch.clone()).await;
        }
    }

    /// Marks the execution finished under the registry lock, so that nobody joins afterwards.
    fn mark_finished(&self) {
        let registry = self.registry.upgrade();
        let _guard = registry.as_ref().map(|r| lock(&r.running));
        self.finished.store(true, Ordering::Release);
    }
}

/// Serves one worker's members of an execution: writes each batch to all of them.
async fn serve_group(
    group: Arc<Group>,
    mut batches: mpsc::Receiver<Arc<Batch>>,
    metrics: GatewayMetrics,
) {
    while let Some(batch) = batches.recv().await {
        match &*batch {
            Batch::Next { payload, event_at } => group.deliver(payload, *event_at, &metrics),
            Batch::Finish(errors) => group.finish(errors.as_deref(), &metrics),
            Batch::CutOff => {
                for member in lock(&group.members).values() {
                    member.link.mark_slow();
                }
            }
        }
    }
}

impl Group {
    /// One result to every member: the frame is built once per (protocol, id).
    fn deliver(&self, payload: &str, event_at: Option<i64>, metrics: &GatewayMetrics) {
        let members = lock(&self.members);
        let mut frames: Vec<(Protocol, &str, Bytes)> = Vec::with_capacity(2);
        let mut sent = 0u64;
        let latency = metrics.delivery_latency.local();
        for member in members.values() {
            let frame = match frames
                .iter()
                .find(|(protocol, id, _)| *protocol == member.protocol && *id == member.id)
            {
                Some((_, _, frame)) => frame.clone(),
                None => {
                    let frame = text_frame(&protocol::next_raw(
                        member.protocol,
                        &id_json(&member.id),
                        payload,
                    ));
                    frames.push((member.protocol, &member.id, frame.clone()));
                    frame
                }
            };
            if member.link.push(&frame) {
                sent += 1;
                if let Some(at) = event_at {
                    let now = chrono::Utc::now().timestamp_micros();
                    latency.observe((now - at).max(0) as f64 / 1e6);
                }
            }
        }
        latency.flush();
        metrics.messages_sent.inc_by(sent);
    }

    /// The last message to every member, who is told that the subscription ended.
    fn finish(&self, errors: Option<&str>, metrics: &GatewayMetrics) {
        for member in lock(&self.members).values() {
            let text = match errors {
                Some(errors) => protocol::operation_error_raw(&id_json(&member.id), errors),
                None => protocol::complete(&member.id),
            };
            if member.link.push_text(&text) {
                metrics.messages_sent.inc();
            }
            member.link.finished(&member.id);
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
                execution.mark_finished();
                execution
                    .broadcast(Batch::Finish(Some(errors.to_string())))
                    .await;
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
        execution.broadcast(Batch::Next { payload, event_at }).await;
    }
    let Some(execution) = execution.upgrade() else {
        return;
    };
    execution.mark_finished();
    if lagged.notified().now_or_never().is_some() {
        execution.broadcast(Batch::CutOff).await;
    } else {
        execution.broadcast(Batch::Finish(None)).await;
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
