//! Resuming: a subscriber that names a cursor gets what it missed first, from a catch-up (the
//! operation run once more over the log after the cursor, [`CatchUp`]), while its live results
//! wait at its [`Gate`]; then the gate opens and it is served as every other member. Subscribers
//! resuming from one cursor with one operation while the catch-up waits for its turn
//! ([`crate::replays`]) share it, executed and serialized once ([`SharedCatchUp`]), each holding
//! a place in its own user's line. The first result a resumed subscriber receives says
//! `recovered`: whether the history still covered its cursor.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use events::{At, Cursor, Positions, Viewer};
use futures_util::StreamExt as _;
use graphql_schema::Context;
use juniper::{DefaultScalarValue, ExecutionOutput, SubscriptionCoordinator as _};
use service_kit::error::ErrorCode;
use tokio::sync::watch;

use super::result::{ResultText, Told};
use super::{id_json, operation_key, readers_of, Coordinator, Executions, Membership, Start};
use crate::hub::{BacklogEvents, BacklogOutcome, Hub, ReplayError, CURRENT_EVENT};
use crate::lock;
use crate::metrics::GatewayMetrics;
use crate::protocol::{self, Protocol};
use crate::replays::ReplayAdmission;
use crate::socket::Link;

/// Where a resuming subscriber's live results wait while what it missed is replayed, and what
/// decides afterwards which of them it still needs.
pub struct Gate {
    /// Set once the subscriber is served as every other member is.
    pub(super) plain: AtomicBool,
    state: Mutex<GateState>,
    /// Live results that may wait (OUTBOUND_QUEUE); more makes the client slow (1013), and it
    /// resumes again from its cursor.
    limit: usize,
}

/// A live result held at a gate: its position, the result and how many it supersedes.
type Held = (Option<At>, Arc<ResultText>, u64);

enum GateState {
    /// Replaying: live results wait here.
    Holding(Vec<Held>),
    /// Live results at or before `after` were replayed already; the first one delivered says
    /// `recovered` when that is still to be said.
    Live {
        after: Option<Positions>,
        recovered: Option<bool>,
    },
}

/// What the gate does with one live result.
pub(super) enum Offer {
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

    pub(super) fn offer(
        &self,
        position: Option<At>,
        result: &Arc<ResultText>,
        skipped: u64,
    ) -> Offer {
        let mut state = lock(&self.state);
        match &mut *state {
            GateState::Holding(held) => {
                if held.len() >= self.limit {
                    return Offer::Overflow;
                }
                held.push((position, result.clone(), skipped));
                Offer::Skip
            }
            GateState::Live { after, recovered } => {
                if replayed(after.as_deref(), position) {
                    return Offer::Skip;
                }
                // Results come in log order: once one is past `after`, all later ones are; with
                // several partitions only in each partition's order, so the gate stays.
                self.plain
                    .store(one_order(after.as_deref()), Ordering::Relaxed);
                match recovered.take() {
                    Some(flag) => Offer::Send(
                        result
                            .telling(Told {
                                recovered: Some(flag),
                                skipped,
                            })
                            .into_owned(),
                    ),
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
        after: Option<Positions>,
        mut recovered: Option<bool>,
    ) -> Vec<(String, Option<Arc<str>>)> {
        let mut state = lock(&self.state);
        let held = match std::mem::replace(&mut *state, GateState::Holding(Vec::new())) {
            GateState::Holding(held) => held,
            GateState::Live { .. } => Vec::new(),
        };
        let mut texts = Vec::new();
        for (position, result, skipped) in held {
            if replayed(after.as_deref(), position) {
                continue;
            }
            let told = Told {
                recovered: recovered.take(),
                skipped,
            };
            texts.push((result.telling(told).into_owned(), result.cursor().cloned()));
        }
        if !texts.is_empty() {
            self.plain.store(
                recovered.is_none() && one_order(after.as_deref()),
                Ordering::Relaxed,
            );
        }
        *state = GateState::Live { after, recovered };
        texts
    }
}

/// Whether a live result at `at` was part of a replay that ended at `after` (a position per
/// partition).
fn replayed(after: Option<&[events::Position]>, at: Option<At>) -> bool {
    let (Some(after), Some(at)) = (after, at) else {
        return false;
    };
    after
        .get(usize::from(at.partition))
        .is_some_and(|after| at.position <= *after)
}

/// Whether live results after `after` come in one order (a log of one partition).
fn one_order(after: Option<&[events::Position]>) -> bool {
    after.is_none_or(|after| after.len() <= 1)
}

/// One replay of an operation after a cursor, written to every subscriber that resumed from
/// that cursor with that operation before it began: executed and serialized once. Results do
/// not depend on who subscribed (see the module doc), so the first subscriber's identity serves
/// them all, as a shared execution's does; each result goes to the members its readers admit.
pub(super) struct SharedCatchUp {
    members: Mutex<HashMap<u64, CatchUpMember>>,
    next_seat: AtomicU64,
    /// Set (under the registry's `pending_replays` lock) when it leaves the pending ones.
    begun: AtomicBool,
    task: Mutex<Option<actix_web::rt::task::JoinHandle<()>>>,
}

/// Where one resuming subscriber's replayed results go.
struct CatchUpMember {
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

/// A subscriber's place in a [`SharedCatchUp`]; the last one to leave stops it.
pub(super) struct CatchUpSeat {
    replay: Arc<SharedCatchUp>,
    seat: u64,
}

impl SharedCatchUp {
    fn seat(self: &Arc<Self>, member: CatchUpMember) -> CatchUpSeat {
        let seat = self.next_seat.fetch_add(1, Ordering::Relaxed);
        lock(&self.members).insert(seat, member);
        CatchUpSeat {
            replay: self.clone(),
            seat,
        }
    }
}

impl Drop for CatchUpSeat {
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

impl Executions {
    /// Seats a resuming subscriber (already a member of the live execution, behind its gate) in
    /// a catch-up: one not begun yet for the same operation and cursor, or a new one.
    pub(super) fn catch_up(self: &Arc<Self>, membership: &mut Membership, start: &Start<'_>) {
        let (Some((cursor, admission)), Some(gate)) =
            (start.resume.clone(), start.subscriber.gate.clone())
        else {
            return;
        };
        let mut member = CatchUpMember {
            protocol: start.subscriber.protocol,
            id: start.subscriber.id.clone(),
            link: start.subscriber.link.clone(),
            gate,
            viewer: start.subscriber.viewer,
            replayed: false,
            _place: None,
        };
        let key = format!("{}\u{0}{cursor}", operation_key(&start.request));
        let mut pending = lock(&self.pending_replays);
        if let Some(shared) = pending.get(&key).and_then(Weak::upgrade) {
            if !shared.begun.load(Ordering::Acquire) {
                match admission.replays.join_line(admission.user_id) {
                    Some(place) => {
                        self.metrics.replays_shared.inc();
                        member._place = Some(place);
                        membership.replay = Some(shared.seat(member));
                    }
                    // Past its user's line: live at once, saying so.
                    None => open_gate(&member, None, Some(false), &self.metrics),
                }
                return;
            }
        }
        let shared = Arc::new(SharedCatchUp {
            members: Mutex::new(HashMap::new()),
            next_seat: AtomicU64::new(0),
            begun: AtomicBool::new(false),
            task: Mutex::new(None),
        });
        pending.insert(key.clone(), Arc::downgrade(&shared));
        drop(pending);
        membership.replay = Some(shared.seat(member));
        let catch_up = CatchUp {
            admission,
            coordinator: start.coordinator.clone(),
            request: start.request.clone(),
            claims: start.claims.clone(),
            hub: start.hub.clone(),
            cursor,
            metrics: self.metrics.clone(),
        };
        let started = membership._execution.started.subscribe();
        let task = actix_web::rt::spawn(CURRENT_EVENT.scope(
            Cell::new(None),
            catch_up.run(shared.clone(), Arc::downgrade(self), key, started),
        ));
        *lock(&shared.task) = Some(task);
    }
}

/// One resuming subscriber's catch-up: the same operation run once more over the log after its
/// cursor, with its own connection's identity, written to its socket ahead of the live results
/// its [`Gate`] holds meanwhile.
struct CatchUp {
    admission: ReplayAdmission,
    coordinator: Arc<Coordinator>,
    request: juniper::http::GraphQLRequest<DefaultScalarValue>,
    /// The resuming connection's: replayed events are authorized as live ones.
    claims: tokens::jwt::Claims,
    hub: Hub,
    cursor: Cursor,
    metrics: GatewayMetrics,
}

impl CatchUp {
    /// Replays for every member of `shared`. `key` is its place among the pending replays of
    /// `registry`, left when it begins; `started`: the live execution's [`Execution::started`].
    async fn run(
        self,
        shared: Arc<SharedCatchUp>,
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
        let outcome = BacklogOutcome::default();
        let context = Context::new(Ok(self.claims.clone())).with_events(Arc::new(BacklogEvents {
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
                if !self.write(&shared, &output) {
                    return;
                }
            }
        }
        // (A document that does not start fails the live execution too, which tells the member.)
        let (after, recovered) = match outcome.get().cloned() {
            // A member that got no replayed result learns `recovered` from its first live one.
            Some(Ok(end)) if end.recovered => (Some(end.until), Some(true)),
            Some(Ok(_)) => (None, Some(false)),
            Some(Err(err)) => return self.fail(&shared, &err),
            None => (None, None),
        };
        drop(turn);
        self.open_gates(&shared, after, recovered);
    }

    /// One replayed result to every member that may read it; false once none is left (a member
    /// whose socket refuses it is cut as slow by its link, and leaves).
    fn write(&self, shared: &SharedCatchUp, output: &ExecutionOutput<DefaultScalarValue>) -> bool {
        let mark = CURRENT_EVENT.try_with(Cell::take).ok().flatten();
        let readers = readers_of(mark.as_ref());
        let result = ResultText::new(output, mark.as_ref().map(|m| m.cursor.clone()));
        // Results only come from a log that covered the cursor: a member's first says so.
        let mut first = None;
        let mut members = lock(&shared.members);
        members.retain(|_, member| {
            if !readers.admit(member.viewer) {
                self.metrics.results_withheld.inc();
                return true;
            }
            let payload: &str = if member.replayed {
                result.text()
            } else {
                member.replayed = true;
                first.get_or_insert_with(|| {
                    let told = Told {
                        recovered: Some(true),
                        skipped: 0,
                    };
                    result.telling(told).into_owned()
                })
            };
            let id = id_json(&member.id);
            let frame =
                protocol::next_frame(member.protocol, &id, payload, result.cursor().map(|c| &**c));
            let pushed = member.link.push(&frame);
            if pushed {
                self.metrics.messages_sent.inc();
            }
            pushed
        });
        !members.is_empty()
    }

    /// The history could not be read, or the cursor is of another type: every member is told,
    /// and its subscription ends.
    fn fail(&self, shared: &SharedCatchUp, err: &ReplayError) {
        let code = match err {
            ReplayError::OtherType { .. } => ErrorCode::BadUserInput,
            ReplayError::Unavailable(_) => ErrorCode::ServiceUnavailable,
        };
        let errors = protocol::errors(&err.to_string(), code).to_string();
        for member in lock(&shared.members).values() {
            let error = protocol::error_frame(member.protocol, &id_json(&member.id), &errors);
            if member.link.push(&error) {
                self.metrics.messages_sent.inc();
            }
            member.link.finished(&member.id);
        }
    }

    /// Ends the replay for every member: what its gate held goes out, then live results as for
    /// every member of the execution.
    fn open_gates(
        &self,
        shared: &SharedCatchUp,
        after: Option<Positions>,
        recovered: Option<bool>,
    ) {
        for member in lock(&shared.members).values() {
            open_gate(member, after.clone(), recovered, &self.metrics);
        }
    }
}

/// Ends one member's replay: what its gate held goes out, then live results.
fn open_gate(
    member: &CatchUpMember,
    after: Option<Positions>,
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
