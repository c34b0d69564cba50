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
//! ([`SharedReplay`]), each holding a place in its own user's line.
//!
//! Results do not depend on who subscribed: a result shows a record as its event shows it, the
//! same for every reader, and each connection's own token was checked at `connection_init` and
//! is watched for expiry and revocation. That is what makes sharing them, live and replayed,
//! correct. Who may *receive* a result does depend on the subscriber: each result carries the
//! read rule of the record behind it (`Readers`, computed once per event by the hub), and each
//! member's [`Viewer`] is compared with it before the frame is written; a live or replayed
//! result a member may not read is not sent to it, and nothing says that one was withheld. A
//! per-user field in a result would have to be part of the key.

use service_kit::error::ErrorCode;
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::ThreadId;

use bytes::Bytes;
use futures_util::{FutureExt as _, StreamExt as _};
use graphql_schema::{Context, Mutation, Query, Subscription};
use juniper::{DefaultScalarValue, ExecutionOutput, SubscriptionCoordinator as _};
use tokio::sync::{mpsc, watch, Notify};

use events::{Cursor, EventType, Position, Readers, Viewer};

use crate::hub::{ConnectionEvents, Hub, ReplayError, ReplayEvents, ReplayOutcome, CURRENT_EVENT};
use crate::lock;
use crate::metrics::GatewayMetrics;
use crate::protocol::{self, Protocol};
use crate::replays::ReplayAdmission;
use crate::socket::Link;

/// juniper's subscription coordinator over the schema: what an execution drives.
pub type Coordinator =
    juniper_subscriptions::Coordinator<Query, Mutation, Subscription, Context, DefaultScalarValue>;

/// The running executions of this process, by operation key.
pub struct Executions {
    running: Mutex<HashMap<String, Weak<Execution>>>,
    /// Replays not begun yet, by operation and cursor: a subscriber resuming from the same
    /// cursor with the same operation joins one instead of starting its own.
    pending_replays: Mutex<HashMap<String, Weak<SharedReplay>>>,
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
    /// A result: the serialized `{data, errors?, extensions: {cursor}}`, the commit time of
    /// the event behind it (µs since the epoch) and its position.
    Next {
        payload: Arc<str>,
        event_type: Option<EventType>,
        event_at: Option<i64>,
        position: Option<Position>,
        /// The cursor in the payload, again for the SSE event's `id`.
        cursor: Option<Arc<str>>,
        readers: Readers,
        /// A state subscription's: a newer result supersedes it ([`serve_group`]).
        supersedable: bool,
        /// Results skipped right before it, which it supersedes (not in the payload yet: the
        /// group adds them to those it skips itself, [`Group::deliver_batch`]).
        skipped: u64,
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
    /// Set for a subscription that resumes: live results wait behind the replay.
    pub gate: Option<Arc<Gate>>,
    /// Who it is: each result goes out only if its readers admit it.
    pub viewer: Viewer,
}

/// Where a resuming subscriber's live results wait while what it missed is replayed, and what
/// decides afterwards which of them it still needs.
pub struct Gate {
    /// Set once the subscriber is served as every other member is.
    plain: AtomicBool,
    state: Mutex<GateState>,
    /// Live results that may wait (OUTBOUND_QUEUE); more makes the client slow (1013), and it
    /// resumes again from its cursor.
    limit: usize,
}

/// A live result held at a gate: its position, payload and cursor.
type Held = (Option<Position>, Arc<str>, Option<Arc<str>>);

enum GateState {
    /// Replaying: live results wait here.
    Holding(Vec<Held>),
    /// Live results at or before `after` were replayed already; the first one delivered says
    /// `recovered` when that is still to be said.
    Live {
        after: Option<Position>,
        recovered: Option<bool>,
    },
}

/// What the gate does with one live result.
enum Offer {
    /// As for everyone.
    Plain,
    /// This text instead (the first result, carrying `recovered`).
    Send(String),
    /// Nothing now (held, or replayed already).
    Skip,
    /// The subscriber is too far behind.
    Overflow,
}

impl Gate {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            plain: AtomicBool::new(false),
            state: Mutex::new(GateState::Holding(Vec::new())),
            limit: limit.max(1),
        })
    }

    fn offer(
        &self,
        position: Option<Position>,
        payload: &Arc<str>,
        cursor: Option<&Arc<str>>,
    ) -> Offer {
        let mut state = lock(&self.state);
        match &mut *state {
            GateState::Holding(held) => {
                if held.len() >= self.limit {
                    return Offer::Overflow;
                }
                held.push((position, payload.clone(), cursor.cloned()));
                Offer::Skip
            }
            GateState::Live { after, recovered } => {
                if replayed(*after, position) {
                    return Offer::Skip;
                }
                // Results come in log order: once one is past `after`, all later ones are.
                self.plain.store(true, Ordering::Relaxed);
                match recovered.take() {
                    Some(flag) => Offer::Send(with_recovered(payload, flag)),
                    None => Offer::Plain,
                }
            }
        }
    }

    /// Ends the replay: live results after `after` go out from now on (`None`: all of them),
    /// and the first says `recovered` if given. Returns the held results to send first, each
    /// with its cursor.
    fn open(
        &self,
        after: Option<Position>,
        mut recovered: Option<bool>,
    ) -> Vec<(String, Option<Arc<str>>)> {
        let mut state = lock(&self.state);
        let held = match std::mem::replace(&mut *state, GateState::Holding(Vec::new())) {
            GateState::Holding(held) => held,
            GateState::Live { .. } => Vec::new(),
        };
        let mut texts = Vec::new();
        for (position, payload, cursor) in held {
            if replayed(after, position) {
                continue;
            }
            let text = match recovered.take() {
                Some(flag) => with_recovered(&payload, flag),
                None => payload.to_string(),
            };
            texts.push((text, cursor));
        }
        if !texts.is_empty() {
            self.plain.store(recovered.is_none(), Ordering::Relaxed);
        }
        *state = GateState::Live { after, recovered };
        texts
    }
}

/// Whether a live result at `position` was part of a replay that ended at `after`.
fn replayed(after: Option<Position>, position: Option<Position>) -> bool {
    matches!((after, position), (Some(after), Some(position)) if position <= after)
}

/// A result payload built by [`result_payload`] (it ends with its `extensions` object) with
/// `recovered` added to its extensions.
fn with_recovered(payload: &str, recovered: bool) -> String {
    with_extension(payload, "recovered", recovered)
}

/// A result payload built by [`result_payload`] (it ends with its `extensions` object) with
/// `name: value` added last to its extensions.
fn with_extension(payload: &str, name: &str, value: impl std::fmt::Display) -> String {
    match payload.strip_suffix("}}") {
        Some(head) if payload.contains(r#""extensions":{"#) => {
            format!(r#"{head},"{name}":{value}}}}}"#)
        }
        _ => payload.to_owned(),
    }
}

/// A subscription's place in an execution; dropping it leaves.
pub struct Membership {
    _execution: Arc<Execution>,
    group: Arc<Group>,
    slot: u64,
    /// A resuming subscriber's seat in its replay; leaving gives it up.
    replay: Option<ReplaySeat>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        drop(self.replay.take());
        lock(&self.group.members).remove(&self.slot);
    }
}

/// One replay of an operation after a cursor, written to every subscriber that resumed from
/// that cursor with that operation before it began: executed and serialized once. Results do
/// not depend on who subscribed (see the module doc), so the first subscriber's identity serves
/// them all, as a shared execution's does; each result goes to the members its readers admit.
struct SharedReplay {
    members: Mutex<HashMap<u64, ReplayMember>>,
    next_seat: AtomicU64,
    /// Set (under the registry's `pending_replays` lock) when it leaves the pending ones.
    begun: AtomicBool,
    task: Mutex<Option<actix_web::rt::task::JoinHandle<()>>>,
}

/// Where one resuming subscriber's replayed results go.
struct ReplayMember {
    protocol: Protocol,
    id: String,
    link: Arc<Link>,
    gate: Arc<Gate>,
    viewer: Viewer,
    /// Whether a replayed result went to it: the first one it receives says `recovered`.
    replayed: bool,
    /// A member that joined holds a place in its user's line, as one waiting for its own
    /// replay would (the first member's is the replay's turn).
    _place: Option<crate::replays::LinePlace>,
}

/// A subscriber's place in a [`SharedReplay`]; the last one to leave stops it.
struct ReplaySeat {
    replay: Arc<SharedReplay>,
    seat: u64,
}

impl SharedReplay {
    fn seat(self: &Arc<Self>, member: ReplayMember) -> ReplaySeat {
        let seat = self.next_seat.fetch_add(1, Ordering::Relaxed);
        lock(&self.members).insert(seat, member);
        ReplaySeat {
            replay: self.clone(),
            seat,
        }
    }
}

impl Drop for ReplaySeat {
    fn drop(&mut self) {
        let mut members = lock(&self.replay.members);
        members.remove(&self.seat);
        if members.is_empty() {
            if let Some(task) = lock(&self.replay.task).take() {
                task.abort();
            }
        }
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
        let resume = start.resume.zip(start.subscriber.gate.clone());
        let member = resume.as_ref().map(|(_, gate)| ReplayMember {
            protocol: start.subscriber.protocol,
            id: start.subscriber.id.clone(),
            link: start.subscriber.link.clone(),
            gate: gate.clone(),
            viewer: start.subscriber.viewer,
            replayed: false,
            _place: None,
        });
        let replay_key = resume
            .as_ref()
            .map(|((cursor, _), _)| format!("{}\u{0}{cursor}", operation_key(&start.request)));
        let replay = resume.map(|((cursor, admission), _)| Replay {
            admission,
            coordinator: start.coordinator.clone(),
            request: start.request.clone(),
            claims: start.claims.clone(),
            hub: start.hub.clone(),
            cursor,
            metrics: self.metrics.clone(),
        });
        let mut membership = self.join_live(
            start.coordinator,
            start.hub,
            start.claims,
            start.request,
            start.subscriber,
        );
        if let (Some(replay), Some(mut member), Some(key)) = (replay, member, replay_key) {
            let mut pending = lock(&self.pending_replays);
            if let Some(shared) = pending.get(&key).and_then(Weak::upgrade) {
                if !shared.begun.load(Ordering::Acquire) {
                    let replays = &replay.admission.replays;
                    match replays.join_line(replay.admission.user_id) {
                        Some(place) => {
                            self.metrics.replays_shared.inc();
                            member._place = Some(place);
                            membership.replay = Some(shared.seat(member));
                        }
                        // Past its user's line: live at once, saying so.
                        None => open_gate(&member, None, Some(false), &self.metrics),
                    }
                    return membership;
                }
            }
            let shared = Arc::new(SharedReplay {
                members: Mutex::new(HashMap::new()),
                next_seat: AtomicU64::new(0),
                begun: AtomicBool::new(false),
                task: Mutex::new(None),
            });
            pending.insert(key.clone(), Arc::downgrade(&shared));
            drop(pending);
            membership.replay = Some(shared.seat(member));
            let started = membership._execution.started.subscribe();
            let task = actix_web::rt::spawn(CURRENT_EVENT.scope(
                Cell::new(None),
                replay.run(shared.clone(), Arc::downgrade(self), key, started),
            ));
            *lock(&shared.task) = Some(task);
        }
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

/// One resuming subscriber's catch-up: the same operation run once more over the log after its
/// cursor, with its own connection's identity, written to its socket ahead of the live results
/// its [`Gate`] holds meanwhile.
struct Replay {
    admission: ReplayAdmission,
    coordinator: Arc<Coordinator>,
    request: juniper::http::GraphQLRequest<DefaultScalarValue>,
    /// The resuming connection's: replayed events are authorized as live ones.
    claims: tokens::jwt::Claims,
    hub: Hub,
    cursor: Cursor,
    metrics: GatewayMetrics,
}

impl Replay {
    /// Replays for every member of `shared`. `key` is its place among the pending replays of
    /// `registry`, left when it begins; `started`: the live execution's [`Execution::started`].
    async fn run(
        self,
        shared: Arc<SharedReplay>,
        registry: Weak<Executions>,
        key: String,
        mut started: watch::Receiver<bool>,
    ) {
        let turn = self.admission.replays.admit(&self.admission).await;
        // From here on nobody joins: a newcomer would have missed what is written from now.
        if let Some(registry) = registry.upgrade() {
            let mut pending = lock(&registry.pending_replays);
            shared.begun.store(true, Ordering::Release);
            if pending
                .get(&key)
                .is_some_and(|weak| std::ptr::eq(weak.as_ptr(), Arc::as_ptr(&shared)))
            {
                pending.remove(&key);
            }
        }
        let Some(turn) = turn else {
            // Past its user's line: the history is not replayed, which the first live result
            // says, as for a cursor the history no longer covers.
            self.open_gates(&shared, None, Some(false));
            return;
        };
        // Until the live execution reads the hub, events could pass between the two unseen.
        if started.wait_for(|started| *started).await.is_err() {
            return;
        }
        let outcome = Arc::new(Mutex::new(ReplayOutcome::default()));
        let context = Context::new(Ok(self.claims.clone())).with_events(Arc::new(ReplayEvents {
            hub: self.hub.clone(),
            cursor: self.cursor.clone(),
            outcome: outcome.clone(),
        }));
        if let Ok(stream) = self.coordinator.subscribe(&self.request, &context).await {
            tokio::pin!(stream);
            loop {
                // The user's budget (one event, however many share it: its members are bounded
                // by their users' lines), and the worker's live deliveries first.
                turn.pace().await;
                let Some(output) = stream.next().await else {
                    break;
                };
                let mark = CURRENT_EVENT.try_with(Cell::take).ok().flatten();
                let readers = readers_of(mark.as_ref());
                let payload = result_payload(output, mark.as_ref().map(|m| &*m.cursor));
                // Results only come from a log that covered the cursor: a member's first says so.
                let mut first_payload = None;
                // A member whose socket refuses it is cut as slow by its link; it leaves.
                let mut members = lock(&shared.members);
                members.retain(|_, member| {
                    if !readers.admit(member.viewer) {
                        self.metrics.results_withheld.inc();
                        return true;
                    }
                    let payload = if member.replayed {
                        &payload
                    } else {
                        member.replayed = true;
                        first_payload.get_or_insert_with(|| with_recovered(&payload, true))
                    };
                    let frame = protocol::next_frame(
                        member.protocol,
                        &id_json(&member.id),
                        payload,
                        mark.as_ref().map(|m| &*m.cursor),
                    );
                    let pushed = member.link.push(&frame);
                    if pushed {
                        self.metrics.messages_sent.inc();
                    }
                    pushed
                });
                if members.is_empty() {
                    return;
                }
            }
        }
        // (A document that does not start fails the live execution too, which tells the member.)
        let result = lock(&outcome).result.take();
        let (after, recovered) = match result {
            // A member that got no replayed result learns `recovered` from its first live one.
            Some(Ok(replay)) if replay.recovered => (Some(replay.until), Some(true)),
            Some(Ok(_)) => (None, Some(false)),
            Some(Err(err)) => {
                let code = match err {
                    ReplayError::OtherType { .. } => ErrorCode::BadUserInput,
                    ReplayError::Unavailable(_) => ErrorCode::ServiceUnavailable,
                };
                let errors = protocol::errors(&err.to_string(), code).to_string();
                for member in lock(&shared.members).values() {
                    let error =
                        protocol::error_frame(member.protocol, &id_json(&member.id), &errors);
                    if member.link.push(&error) {
                        self.metrics.messages_sent.inc();
                    }
                    member.link.finished(&member.id);
                }
                return;
            }
            None => (None, None),
        };
        drop(turn);
        self.open_gates(&shared, after, recovered);
    }

    /// Ends the replay for every member: what its gate held goes out, then live results as for
    /// every member of the execution.
    fn open_gates(&self, shared: &SharedReplay, after: Option<Position>, recovered: Option<bool>) {
        for member in lock(&shared.members).values() {
            open_gate(member, after, recovered, &self.metrics);
        }
    }
}

/// Ends one member's replay: what its gate held goes out, then live results.
fn open_gate(
    member: &ReplayMember,
    after: Option<Position>,
    recovered: Option<bool>,
    metrics: &GatewayMetrics,
) {
    let id_json = id_json(&member.id);
    let recovered = recovered.filter(|_| !member.replayed);
    for (payload, cursor) in member.gate.open(after, recovered) {
        let frame = protocol::next_frame(member.protocol, &id_json, &payload, cursor.as_deref());
        if !member.link.push(&frame) {
            break;
        }
        metrics.messages_sent.inc();
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

/// Serves one worker's members of an execution: writes each batch to all of them. A state
/// subscription's results supersede one another: when the group is behind (its result older
/// than OVERLOAD_LAG_MS, or its queue half full), only the newest of those waiting is written,
/// saying how many it skipped, so that the group catches up in one round instead of holding
/// its execution (and at last its route) up. Within capacity every result is written.
async fn serve_group(
    group: Arc<Group>,
    mut batches: mpsc::Receiver<Arc<Batch>>,
    metrics: GatewayMetrics,
    pressure: Arc<crate::pressure::Pressure>,
) {
    let mut waiting: Option<Arc<Batch>> = None;
    loop {
        let batch = match waiting.take() {
            Some(batch) => batch,
            None => match batches.recv().await {
                Some(batch) => batch,
                None => return,
            },
        };
        match &*batch {
            Batch::Next { supersedable, .. } => {
                let mut newest = batch.clone();
                let mut superseded = 0u64;
                if *supersedable
                    && pressure.behind(appended_ms(&batch), batches.len(), batches.max_capacity())
                {
                    while let Ok(later) = batches.try_recv() {
                        if let Batch::Next {
                            supersedable: true, ..
                        } = &*later
                        {
                            superseded += 1 + skipped_in(&newest);
                            newest = later;
                        } else {
                            waiting = Some(later);
                            break;
                        }
                    }
                }
                if superseded > 0 {
                    metrics.results_superseded.inc_by(superseded);
                }
                group.deliver_batch(&newest, superseded, &metrics);
                if let Some(appended) = appended_ms(&newest) {
                    let now = chrono::Utc::now().timestamp_millis() as u64;
                    pressure.report(now.saturating_sub(appended));
                }
            }
            Batch::Finish(errors) => group.finish(errors.as_deref(), &metrics),
            // Boxed: its timer would otherwise make every group task's future larger, idle
            // or not, for a path taken once in an execution's life at most.
            Batch::CutOff => Box::pin(group.cut_off_gradually()).await,
        }
    }
}

/// When the event behind a result was appended to its Redis log (ms since the epoch).
fn appended_ms(batch: &Batch) -> Option<u64> {
    match batch {
        // The in-memory bus's positions are counters, not times.
        Batch::Next {
            position: Some(position),
            ..
        } if position.ms > 0 => Some(position.ms),
        _ => None,
    }
}

/// Results a batch says were skipped before it.
fn skipped_in(batch: &Batch) -> u64 {
    match batch {
        Batch::Next { skipped, .. } => *skipped,
        _ => 0,
    }
}

/// How long an execution that missed events takes to close all its members (1013), in equal
/// steps: never all in the same instant, so that their reconnects and resumes come spread over
/// it rather than as one storm.
const CUT_OFF_SPREAD: std::time::Duration = std::time::Duration::from_secs(5);
const CUT_OFF_STEPS: u32 = 20;

impl Group {
    /// A `Next` batch to every member; `superseded`: results the group skipped for it, besides
    /// those the batch says were skipped before it. The payload says how many in all.
    fn deliver_batch(&self, batch: &Batch, superseded: u64, metrics: &GatewayMetrics) {
        let Batch::Next {
            payload,
            event_type,
            event_at,
            position,
            cursor,
            readers,
            skipped,
            supersedable,
        } = batch
        else {
            return;
        };
        let rewritten;
        let raw = payload;
        let payload = if skipped + superseded > 0 {
            rewritten = Arc::from(with_extension(payload, "skipped", skipped + superseded));
            &rewritten
        } else {
            payload
        };
        self.deliver(
            payload,
            Delivery {
                event_type: *event_type,
                event_at: *event_at,
                position: *position,
                cursor: cursor.as_ref(),
                readers: *readers,
                state: supersedable.then_some((raw, skipped + superseded)),
            },
            metrics,
        );
    }

    /// Closes every member as slow (1013), the slowest first (most bytes waiting), a share at
    /// a time over [`CUT_OFF_SPREAD`].
    async fn cut_off_gradually(&self) {
        let mut links: Vec<(usize, Arc<Link>)> = lock(&self.members)
            .values()
            .map(|member| (member.link.pending_bytes(), member.link.clone()))
            .collect();
        links.sort_by_key(|(pending, _)| std::cmp::Reverse(*pending));
        let step = links.len().div_ceil(CUT_OFF_STEPS as usize).max(1);
        let mut chunks = links.chunks(step).peekable();
        while let Some(chunk) = chunks.next() {
            for (_, link) in chunk {
                link.mark_slow();
            }
            if chunks.peek().is_some() {
                tokio::time::sleep(CUT_OFF_SPREAD / CUT_OFF_STEPS).await;
            }
        }
    }

    /// One result to every member: the frame is built once per (protocol, id).
    fn deliver(&self, payload: &Arc<str>, delivery: Delivery<'_>, metrics: &GatewayMetrics) {
        let Delivery {
            event_type,
            event_at,
            position,
            cursor,
            readers,
            state,
        } = delivery;
        let members = lock(&self.members);
        let mut superseded = 0u64;
        let mut frames: Vec<(Protocol, &str, Bytes)> = Vec::with_capacity(2);
        let mut sent = 0u64;
        let mut withheld = 0u64;
        // Resolved once per result, not per frame.
        let label = [event_type.map_or("none", |t| t.as_str())];
        let latency = metrics.delivery_latency.with_label_values(&label).local();
        let published = metrics.publish_latency.with_label_values(&label).local();
        // A Redis position is the append's millisecond; the in-memory bus's are counters (0 ms).
        let published_at = position.filter(|p| p.ms > 0).map(|p| (p.ms * 1000) as i64);
        for member in members.values() {
            // Before the gate: a resuming member holds only what it may read, and the first
            // result it receives is the one that says `recovered`.
            if !readers.admit(member.viewer) {
                withheld += 1;
                continue;
            }
            if let Some(gate) = member
                .gate
                .as_ref()
                .filter(|g| !g.plain.load(Ordering::Relaxed))
            {
                match gate.offer(position, payload, cursor) {
                    Offer::Plain => {}
                    Offer::Skip => continue,
                    Offer::Overflow => {
                        member.link.mark_slow();
                        continue;
                    }
                    Offer::Send(text) => {
                        let frame = protocol::next_frame(
                            member.protocol,
                            &id_json(&member.id),
                            &text,
                            cursor.map(|c| &**c),
                        );
                        if member.link.push(&frame) {
                            sent += 1;
                        }
                        continue;
                    }
                }
            }
            let frame = match frames
                .iter()
                .find(|(protocol, id, _)| *protocol == member.protocol && *id == member.id)
            {
                Some((_, _, frame)) => frame.clone(),
                None => {
                    let frame = protocol::next_frame(
                        member.protocol,
                        &id_json(&member.id),
                        payload,
                        cursor.map(|c| &**c),
                    );
                    frames.push((member.protocol, &member.id, frame.clone()));
                    frame
                }
            };
            let pushed = match state {
                // The member's own socket behind: it keeps the newest, saying what it replaced.
                Some((raw, skipped)) => member
                    .link
                    .push_state(&member.id, &frame, skipped, || {
                        later_frame(member.protocol, &member.id, raw, cursor)
                    })
                    .map(|replaced| superseded += replaced)
                    .is_some(),
                None => member.link.push(&frame),
            };
            if pushed {
                sent += 1;
                if event_at.is_some() || published_at.is_some() {
                    let now = chrono::Utc::now().timestamp_micros();
                    let seconds = |at: i64| (now - at).max(0) as f64 / 1e6;
                    if let Some(at) = event_at {
                        latency.observe(seconds(at));
                    }
                    if let Some(at) = published_at {
                        published.observe(seconds(at));
                    }
                }
            }
        }
        latency.flush();
        published.flush();
        metrics.messages_sent.inc_by(sent);
        if superseded > 0 {
            metrics.results_superseded.inc_by(superseded);
        }
        if withheld > 0 {
            metrics.results_withheld.inc_by(withheld);
        }
    }

    /// The last message to every member, who is told that the subscription ended.
    fn finish(&self, errors: Option<&str>, metrics: &GatewayMetrics) {
        for member in lock(&self.members).values() {
            let frame = match errors {
                Some(errors) => {
                    protocol::error_frame(member.protocol, &id_json(&member.id), errors)
                }
                None => protocol::complete_frame(member.protocol, &member.id),
            };
            if member.link.push_last(&member.id, &frame) {
                metrics.messages_sent.inc();
            }
            member.link.finished(&member.id);
        }
    }
}

/// How a state subscription's result kept by a socket that is behind is written later, saying
/// how many results it stands for.
fn later_frame(
    protocol: Protocol,
    id: &str,
    raw: &Arc<str>,
    cursor: Option<&Arc<str>>,
) -> crate::socket::LaterFrame {
    let (id_json, raw, cursor) = (id_json(id), raw.clone(), cursor.cloned());
    Box::new(move |skipped| {
        let payload = if skipped > 0 {
            std::borrow::Cow::Owned(with_extension(&raw, "skipped", skipped))
        } else {
            std::borrow::Cow::Borrowed(&*raw)
        };
        protocol::next_frame(protocol, &id_json, &payload, cursor.as_deref())
    })
}

/// What a group is told of one result besides its payload.
struct Delivery<'a> {
    event_type: Option<EventType>,
    /// Commit time of the event behind it (µs since the epoch).
    event_at: Option<i64>,
    position: Option<Position>,
    cursor: Option<&'a Arc<str>>,
    readers: Readers,
    /// A state subscription's result: its payload without `skipped`, and how many results it
    /// stands for, so that a member whose socket is behind keeps only the newest
    /// ([`Link::push_state`]).
    state: Option<(&'a Arc<str>, u64)>,
}

/// Runs the juniper stream once for every subscriber of the operation.
async fn drive(
    coordinator: Arc<Coordinator>,
    request: juniper::http::GraphQLRequest<DefaultScalarValue>,
    context: Context,
    execution: Weak<Execution>,
    lagged: Arc<Notify>,
) {
    let subscribed = coordinator.subscribe(&request, &context).await;
    if let Some(execution) = execution.upgrade() {
        execution.started.send_replace(true);
    }
    let stream = match subscribed {
        Ok(stream) => stream,
        Err(err) => {
            let errors = match err {
                juniper::GraphQLError::NotSubscription => protocol::errors(
                    "this operation is not a subscription",
                    ErrorCode::BadRequest,
                ),
                other => graphql_schema::request_errors(&other),
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
        let mark = CURRENT_EVENT.try_with(Cell::take).ok().flatten();
        let Some(execution) = execution.upgrade() else {
            return;
        };
        let skipped = mark.as_ref().map_or(0, |m| m.skipped);
        if skipped > 0 {
            // Superseded while waiting for this execution (its route held the newest); the
            // group says so in the payload, with what it skips itself.
            if let Some(registry) = execution.registry.upgrade() {
                registry.metrics.results_superseded.inc_by(skipped);
            }
        }
        let payload: Arc<str> =
            Arc::from(result_payload(output, mark.as_ref().map(|m| &*m.cursor)));
        // One span per event and execution (not per subscriber), linked to the write's trace.
        let span = mark.as_ref().and_then(|m| {
            let traceparent = m.traceparent.as_deref()?;
            let span = tracing::info_span!(
                "deliver",
                otel.name = %format!("deliver {}", m.event_type.as_str()),
                otel.kind = "consumer",
                gqlws.cursor = &*m.cursor,
            );
            service_kit::telemetry::link(&span, traceparent);
            Some(span)
        });
        let batch = Batch::Next {
            payload,
            event_type: mark.as_ref().map(|m| m.event_type),
            event_at: mark.as_ref().map(|m| m.at),
            readers: readers_of(mark.as_ref()),
            cursor: mark.as_ref().map(|m| m.cursor.clone()),
            supersedable: mark.as_ref().is_some_and(|m| m.supersedable),
            skipped,
            position: mark.map(|m| m.position),
        };
        match span {
            Some(span) => {
                use tracing::Instrument as _;
                execution.broadcast(batch).instrument(span).await;
            }
            None => execution.broadcast(batch).await,
        }
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

/// Who may receive a result: the readers of the event behind it. Every record reaches a
/// subscription through an event, so a result without one carries no record; it goes to staff
/// only all the same, so that a result whose event was not traced cannot show a private record.
fn readers_of(mark: Option<&crate::hub::EventMark>) -> Readers {
    mark.map_or(Readers::Staff, |mark| mark.readers)
}

/// `{data, errors, extensions}` with `errors` left out when empty, as the GraphQL response format
/// asks, and `extensions.cursor` naming the event behind the result; serialized once.
fn result_payload(output: ExecutionOutput<DefaultScalarValue>, cursor: Option<&str>) -> String {
    let payload = Payload {
        data: &output.data,
        errors: (!output.errors.is_empty()).then_some(&output.errors),
        extensions: cursor.map(|cursor| Extensions { cursor }),
    };
    serde_json::to_string(&payload).unwrap_or_else(|_| r#"{"data":null}"#.to_owned())
}

#[derive(serde::Serialize)]
struct Payload<'a> {
    data: &'a juniper::Value<DefaultScalarValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    errors: Option<&'a Vec<juniper::ExecutionError<DefaultScalarValue>>>,
    /// Last, so that [`with_recovered`] can add to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    extensions: Option<Extensions<'a>>,
}

#[derive(serde::Serialize)]
struct Extensions<'a> {
    cursor: &'a str,
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

    thread_local! {
        /// Released by `join_live` right after its lookup, with the registry still locked.
        static LAST_OTHER_REFERENCE: RefCell<Option<Arc<Execution>>> = const { RefCell::new(None) };
    }

    /// Stands for the other workers: the finished execution's last member leaves between
    /// `join_live`'s upgrade and its unlock, which under load is a window of a few instructions.
    pub(super) fn after_lookup() {
        drop(LAST_OTHER_REFERENCE.with(|slot| slot.borrow_mut().take()));
    }

    /// The order the stress test in tests/ws/stress.rs cannot hit reliably, made to happen every
    /// time: `join` finds a finished execution and ends up holding its last reference. With the
    /// guard dropped before that reference this deadlocks (the std mutex is locked twice on one
    /// thread), which the timeout turns into a failure instead of a hung test run.
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
        let batch = |skipped| Batch::Next {
            payload: Arc::from(r#"{"data":{"n":1},"extensions":{"cursor":"c"}}"#),
            event_type: None,
            event_at: None,
            position: None,
            cursor: None,
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
