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
//! A subscriber that resumes gets what it missed first, from a replay of the operation over the
//! log after its cursor; subscribers resuming from one cursor with one operation while the replay
//! waits for its turn ([`crate::replays`]) share it, executed and serialized once
//! ([`resume`]), each holding a place in its own user's line.
//!
//! Results do not depend on who subscribed: a result shows a record as its event shows it, the
//! same for every reader, and each connection's own token was checked at `connection_init` and
//! is watched for expiry and revocation. That is what makes sharing them, live and replayed,
//! correct. Who may *receive* a result does depend on the subscriber: each result carries the
//! read rule of the record behind it (`Readers`, computed once per event by the hub), and each
//! member's [`Viewer`] is compared with it before the frame is written; a live or replayed
//! result a member may not read is not sent to it, and nothing says that one was withheld. A
//! per-user field in a result would have to be part of the key.

mod drive;
mod group;
mod result;
mod resume;

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use graphql_schema::{Context, Mutation, Query, Subscription};
use juniper::DefaultScalarValue;
use tokio::sync::{mpsc, watch, Notify};

use events::{Cursor, Viewer};

use crate::hub::{ConnectionEvents, Hub, CURRENT_EVENT};
use crate::lock;
use crate::metrics::GatewayMetrics;
use crate::protocol::Protocol;
use crate::replays::ReplayAdmission;
use crate::socket::Link;
use drive::{drive, readers_of};
use group::{serve_group, Batch, Group, GroupHandle};
pub use resume::Gate;

/// juniper's subscription coordinator over the schema: what an execution drives.
pub type Coordinator =
    juniper_subscriptions::Coordinator<Query, Mutation, Subscription, Context, DefaultScalarValue>;

/// The running executions of this process, by operation key.
pub struct Executions {
    running: Mutex<HashMap<String, Weak<Execution>>>,
    /// Replays not begun yet, by operation and cursor: a subscriber resuming from the same
    /// cursor with the same operation joins one instead of starting its own.
    pending_replays: Mutex<HashMap<String, Weak<resume::SharedCatchUp>>>,
    metrics: GatewayMetrics,
    /// Results that may wait for one worker's group task (FANOUT_BUFFER); a group that far
    /// behind holds up its execution, which then lags behind the hub and cuts everyone off.
    group_buffer: usize,
    /// Told how late results are written.
    pressure: Arc<crate::pressure::Pressure>,
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
    /// True once the execution's stream reads the hub (or failed to start): from then on every
    /// event the hub takes in reaches its members, which is what a resuming member waits for.
    started: watch::Sender<bool>,
}

/// Where one subscription's messages go.
pub struct Subscriber {
    pub protocol: Protocol,
    /// The subscription's id.
    pub id: String,
    /// Its connection's socket.
    pub link: Arc<Link>,
    /// Set for a subscription that resumes: live results wait behind the replay.
    pub gate: Option<Arc<Gate>>,
    /// Who it is: each result goes out only if its readers admit it.
    pub viewer: Viewer,
}

/// A subscription's place in an execution; dropping it leaves.
pub struct Membership {
    _execution: Arc<Execution>,
    group: Arc<Group>,
    slot: u64,
    /// A resuming subscriber's seat in its catch-up; leaving gives it up.
    replay: Option<resume::CatchUpSeat>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        drop(self.replay.take());
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
    pub claims: &'a tokens::jwt::Claims,
    pub request: juniper::http::GraphQLRequest<DefaultScalarValue>,
    pub subscriber: Subscriber,
    /// `extensions.resumeFrom`: replay what the subscriber missed after it, then go live, when
    /// its turn comes ([`crate::replays`]).
    pub resume: Option<(Cursor, ReplayAdmission)>,
}

impl Executions {
    pub fn new(
        metrics: GatewayMetrics,
        group_buffer: usize,
        pressure: Arc<crate::pressure::Pressure>,
    ) -> Self {
        Self {
            running: Mutex::new(HashMap::new()),
            pending_replays: Mutex::new(HashMap::new()),
            metrics,
            group_buffer: group_buffer.max(1),
            pressure,
        }
    }

    /// Joins the running execution of the request, or starts one. The subscriber receives every
    /// result from now on, for as long as the returned membership lives. Called on the worker
    /// thread that serves the subscriber's connection.
    pub fn join(self: &Arc<Self>, start: Start<'_>) -> Membership {
        let mut membership = self.join_live(
            start.coordinator,
            start.hub,
            start.claims,
            start.request.clone(),
            Subscriber {
                protocol: start.subscriber.protocol,
                id: start.subscriber.id.clone(),
                link: start.subscriber.link.clone(),
                gate: start.subscriber.gate.clone(),
                viewer: start.subscriber.viewer,
            },
        );
        self.catch_up(&mut membership, &start);
        membership
    }

    fn join_live(
        self: &Arc<Self>,
        coordinator: &Arc<Coordinator>,
        hub: &Hub,
        claims: &tokens::jwt::Claims,
        request: juniper::http::GraphQLRequest<DefaultScalarValue>,
        subscriber: Subscriber,
    ) -> Membership {
        let key = operation_key(&request);
        // A finished execution upgraded here may be the last reference to it (its members left
        // on other workers meanwhile): it must be dropped after `running` is unlocked, because
        // `Execution::drop` locks `running` itself, and a std mutex locked twice on one thread
        // deadlocks that worker and every socket on it. Declared before the guard, so that it
        // is dropped after it.
        let _finished: Option<Arc<Execution>>;
        let mut running = lock(&self.running);
        match running.get(&key).and_then(Weak::upgrade) {
            Some(execution) if !execution.finished.load(Ordering::Acquire) => {
                return execution.add(self, subscriber);
            }
            other => _finished = other,
        }
        #[cfg(test)]
        tests::after_lookup();
        // The shared task falling more than FANOUT_BUFFER events behind the hub ends its stream
        // and leaves a permit here; its subscribers' connections are then closed as slow (1013),
        // so that clients reconnect and resume rather than silently miss events.
        let lagged = Arc::new(Notify::new());
        let context = Context::new(Ok(claims.clone())).with_events(Arc::new(ConnectionEvents {
            hub: hub.clone(),
            slow: lagged.clone(),
        }));
        let execution = Arc::new(Execution {
            key: key.clone(),
            groups: Mutex::new(Vec::new()),
            finished: AtomicBool::new(false),
            task: Mutex::new(None),
            registry: Arc::downgrade(self),
            started: watch::channel(false).0,
        });
        let membership = execution.add(self, subscriber);
        let task = actix_web::rt::spawn(CURRENT_EVENT.scope(
            Cell::new(None),
            drive(
                coordinator.clone(),
                request,
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
                actix_web::rt::spawn(serve_group(
                    group.clone(),
                    rx,
                    registry.metrics.clone(),
                    registry.pressure.clone(),
                ));
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
            replay: None,
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

pub(super) fn id_json(id: &str) -> String {
    serde_json::to_string(id).unwrap_or_else(|_| "\"\"".to_owned())
}

/// The operation's identity: document, operation name and variables (serde_json's maps are
/// sorted, so equal variables serialize equally).
pub(super) fn operation_key(request: &juniper::http::GraphQLRequest<DefaultScalarValue>) -> String {
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

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::sync::mpsc as std_mpsc;
    use std::time::Duration;

    use events::MemoryLog;
    use graphql_schema::DocumentLimits;
    use service_kit::metrics::Metrics;
    use tokens::jwt::{Claims, TokenType};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use events::Readers;

    thread_local! {
        /// Released by `join_live` right after its lookup, with the registry still locked.
        static LAST_OTHER_REFERENCE: RefCell<Option<Arc<Execution>>> = const { RefCell::new(None) };
    }

    /// Stands for the other workers: the finished execution's last member leaves between
    /// `join_live`'s upgrade and its unlock, which under load is a window of a few instructions.
    pub(super) fn after_lookup() {
        drop(LAST_OTHER_REFERENCE.with(|slot| slot.borrow_mut().take()));
    }

    /// Results skipped before a batch reached its group and those the group skips itself are
    /// said once, added up.
    #[test]
    fn a_result_says_once_all_it_was_skipped_for() {
        let group = Group {
            thread: std::thread::current().id(),
            members: Mutex::new(HashMap::new()),
            next_slot: AtomicU64::new(0),
        };
        let link = Arc::new(Link::buffered(16));
        lock(&group.members).insert(
            0,
            Subscriber {
                protocol: Protocol::Sse,
                id: "1".into(),
                link: link.clone(),
                gate: None,
                viewer: Viewer {
                    user_id: 1,
                    is_staff: false,
                },
            },
        );
        let result = Arc::new(result::ResultText::of_data(
            &serde_json::json!({"n": 1}),
            Some(Arc::from("c")),
        ));
        let batch = |skipped| Batch::Next {
            result: result.clone(),
            event_type: None,
            event_at: None,
            position: None,
            readers: Readers::Everyone,
            supersedable: true,
            skipped,
        };
        let metrics = GatewayMetrics::register(&Metrics::new("test"));
        group.deliver_batch(&batch(2), 3, &metrics);
        group.deliver_batch(&batch(0), 0, &metrics);
        let written = link.take_pending().unwrap();
        let text = std::str::from_utf8(&written).unwrap();
        assert_eq!(text.matches(r#""skipped""#).count(), 1, "{text}");
        assert!(
            text.contains(r#""extensions":{"cursor":"c","skipped":5}"#),
            "{text}"
        );
    }

    /// The order the stress test in tests/ws/stress.rs cannot hit reliably, made to happen every
    /// time: `join` finds a finished execution and ends up holding its last reference. With the
    /// guard dropped before that reference this deadlocks (the std mutex is locked twice on one
    /// thread), which the timeout turns into a failure instead of a hung test run.
    #[test]
    fn a_finished_execution_whose_last_reference_join_holds_is_dropped_after_the_unlock() {
        let (done, outcome) = std_mpsc::channel();
        std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                done.send(join_over_a_finished_execution().await).ok();
            });
        });
        let joined = outcome
            .recv_timeout(Duration::from_secs(60))
            .expect("join deadlocked: it dropped the finished execution with the registry locked");
        assert_eq!(joined, Ok(()));
    }

    async fn join_over_a_finished_execution() -> Result<(), String> {
        let metrics = GatewayMetrics::register(&Metrics::new("executions-test"));
        let executions = Arc::new(Executions::new(
            metrics.clone(),
            16,
            Arc::new(crate::pressure::Pressure::new(Duration::from_secs(1), 100)),
        ));
        let request = juniper::http::GraphQLRequest::new(
            "subscription { carModelUpdated(pk: 1) { pk } }".to_owned(),
            None,
            None,
        );
        let key = operation_key(&request);
        let finished = Arc::new(Execution {
            key: key.clone(),
            groups: Mutex::new(Vec::new()),
            finished: AtomicBool::new(true),
            task: Mutex::new(None),
            registry: Arc::downgrade(&executions),
            started: watch::channel(true).0,
        });
        metrics.executions_active.inc();
        let finished_weak = Arc::downgrade(&finished);
        lock(&executions.running).insert(key.clone(), finished_weak.clone());
        LAST_OTHER_REFERENCE.with(|slot| *slot.borrow_mut() = Some(finished));

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|err| err.to_string())?;
        let address = listener.local_addr().map_err(|err| err.to_string())?;
        let (_client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(address), listener.accept());
        let (stream, _) = accepted.map_err(|err| err.to_string())?;
        let coordinator = Arc::new(Coordinator::new(graphql_schema::schema(
            DocumentLimits::default(),
        )));
        let shutdown = CancellationToken::new();
        let hub = Hub::start(
            Arc::new(MemoryLog::new(16)),
            crate::hub::HubParts {
                registry: domain::registry().expect("the domain's registry is valid"),
                buffer: 16,
                metrics,
                revoked: tokens::revocations::RevokedBefore::new_loaded(300, 0),
                overload_lag: Duration::from_secs(1),
            },
            shutdown.clone(),
        );
        let claims = Claims {
            token_type: TokenType::Access,
            exp: i64::MAX,
            iat: 0,
            iat_ms: None,
            jti: "test".to_owned(),
            user_id: 1,
            username: "test".to_owned(),
            is_staff: false,
        };
        let membership = executions.join(Start {
            coordinator: &coordinator,
            hub: &hub,
            claims: &claims,
            request,
            subscriber: Subscriber {
                protocol: Protocol::TransportWs,
                id: "1".to_owned(),
                link: Arc::new(Link::new(stream, 16)),
                gate: None,
                viewer: Viewer {
                    user_id: 1,
                    is_staff: false,
                },
            },
            resume: None,
        });

        // The hook ran and `join` held the last reference, so the old execution is gone, and a
        // new one serves the subscriber under the same key.
        let hook_ran = LAST_OTHER_REFERENCE.with(|slot| slot.borrow().is_none());
        let old_gone = finished_weak.upgrade().is_none();
        let new_running = lock(&executions.running)
            .get(&key)
            .is_some_and(|weak| weak.strong_count() == 1);
        drop(membership);
        let left = lock(&executions.running).is_empty();
        shutdown.cancel();
        match (hook_ran, old_gone, new_running, left) {
            (true, true, true, true) => Ok(()),
            other => Err(format!(
                "(hook ran, old execution dropped, new one running, registry empty after leaving) = {other:?}"
            )),
        }
    }
}
