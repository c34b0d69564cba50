//! The members of an execution on one worker thread ([`Group`]), and how each result is
//! written to them: a frame built once per (protocol, subscription id) and pushed straight into
//! each member's socket; past capacity, a state subscription's newest result stands for those
//! it supersedes, and an execution that missed events cuts its members off a share at a time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use bytes::Bytes;
use events::{At, EventType, Readers};
use tokio::sync::mpsc;

use super::result::{ResultText, Told};
use super::resume::Offer;
use super::{id_json, Subscriber};
use crate::lock;
use crate::metrics::GatewayMetrics;
use crate::protocol::{self, Protocol};
use crate::socket::Link;

/// A group and the queue of its task.
pub(super) type GroupHandle = (Arc<Group>, mpsc::Sender<Arc<Batch>>);

/// The subscribers of one execution on one worker thread.
pub struct Group {
    pub(super) thread: ThreadId,
    pub(super) members: Mutex<HashMap<u64, Subscriber>>,
    pub(super) next_slot: AtomicU64,
}

/// What the execution hands to its groups.
pub(super) enum Batch {
    /// A result (serialized once, with its cursor), the commit time of the event behind it (µs
    /// since the epoch) and its position.
    Next {
        result: Arc<ResultText>,
        event_type: Option<EventType>,
        event_at: Option<i64>,
        position: Option<At>,
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

/// Serves one worker's members of an execution: writes each batch to all of them. A state
/// subscription's results supersede one another: when the group is behind (its result older
/// than OVERLOAD_LAG_MS, or its queue half full), only the newest of those waiting is written,
/// saying how many it skipped, so that the group catches up in one round instead of holding
/// its execution (and at last its route) up. Within capacity every result is written.
pub(super) async fn serve_group(
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
        // The in-memory log's positions are counters, not times.
        Batch::Next {
            position: Some(At { position, .. }),
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
    /// those the batch says were skipped before it. The result says how many in all.
    pub(super) fn deliver_batch(&self, batch: &Batch, superseded: u64, metrics: &GatewayMetrics) {
        let Batch::Next {
            result,
            event_type,
            event_at,
            position,
            readers,
            skipped,
            supersedable,
        } = batch
        else {
            return;
        };
        self.deliver(
            Delivery {
                result,
                event_type: *event_type,
                event_at: *event_at,
                position: *position,
                readers: *readers,
                skipped: skipped + superseded,
                state: *supersedable,
            },
            metrics,
        );
    }

    /// Closes every member as slow (1013), the slowest first (most bytes waiting), a share at
    /// a time over [`CUT_OFF_SPREAD`].
    pub(super) async fn cut_off_gradually(&self) {
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
    fn deliver(&self, delivery: Delivery<'_>, metrics: &GatewayMetrics) {
        let text: Arc<str> = match delivery.skipped {
            0 => delivery.result.text().clone(),
            skipped => Arc::from(delivery.result.telling(Told {
                recovered: None,
                skipped,
            })),
        };
        let members = lock(&self.members);
        let mut tally = Tally::default();
        let mut frames: Vec<(Protocol, &str, Bytes)> = Vec::with_capacity(2);
        // Resolved once per result, not per frame.
        let label = [delivery.event_type.map_or("none", |t| t.as_str())];
        let latency = metrics.delivery_latency.with_label_values(&label).local();
        let published = metrics.publish_latency.with_label_values(&label).local();
        // A Redis position is the append's millisecond; the in-memory log's are counters (0 ms).
        let published_at = delivery
            .position
            .map(|at| at.position)
            .filter(|p| p.ms > 0)
            .map(|p| (p.ms * 1000) as i64);
        for member in members.values() {
            if !self.deliver_to(member, &delivery, &text, &mut frames, &mut tally) {
                continue;
            }
            if delivery.event_at.is_some() || published_at.is_some() {
                let now = chrono::Utc::now().timestamp_micros();
                let seconds = |at: i64| (now - at).max(0) as f64 / 1e6;
                if let Some(at) = delivery.event_at {
                    latency.observe(seconds(at));
                }
                if let Some(at) = published_at {
                    published.observe(seconds(at));
                }
            }
        }
        latency.flush();
        published.flush();
        metrics.messages_sent.inc_by(tally.sent);
        if tally.superseded > 0 {
            metrics.results_superseded.inc_by(tally.superseded);
        }
        if tally.withheld > 0 {
            metrics.results_withheld.inc_by(tally.withheld);
        }
    }

    /// One result to one member; true when a frame went to it as to everyone (the latency it
    /// was delivered with counts).
    fn deliver_to<'m>(
        &self,
        member: &'m Subscriber,
        delivery: &Delivery<'_>,
        text: &Arc<str>,
        frames: &mut Vec<(Protocol, &'m str, Bytes)>,
        tally: &mut Tally,
    ) -> bool {
        let cursor = delivery.result.cursor().map(|c| &**c);
        // Before the gate: a resuming member holds only what it may read, and the first result
        // it receives is the one that says `recovered`.
        if !delivery.readers.admit(member.viewer) {
            tally.withheld += 1;
            return false;
        }
        if let Some(gate) = member
            .gate
            .as_ref()
            .filter(|g| !g.plain.load(Ordering::Relaxed))
        {
            match gate.offer(delivery.position, delivery.result, delivery.skipped) {
                Offer::Plain => {}
                Offer::Skip => return false,
                Offer::Overflow => {
                    member.link.mark_slow();
                    return false;
                }
                Offer::Send(told) => {
                    let frame =
                        protocol::next_frame(member.protocol, &id_json(&member.id), &told, cursor);
                    if member.link.push(&frame) {
                        tally.sent += 1;
                    }
                    return false;
                }
            }
        }
        let frame = match frames
            .iter()
            .find(|(protocol, id, _)| *protocol == member.protocol && *id == member.id)
        {
            Some((_, _, frame)) => frame.clone(),
            None => {
                let frame =
                    protocol::next_frame(member.protocol, &id_json(&member.id), text, cursor);
                frames.push((member.protocol, &member.id, frame.clone()));
                frame
            }
        };
        let pushed = if delivery.state {
            // The member's own socket behind: it keeps the newest, saying what it replaced.
            let result = delivery.result;
            member
                .link
                .push_state(&member.id, &frame, delivery.skipped, || {
                    later_frame(member.protocol, &member.id, result)
                })
                .map(|replaced| tally.superseded += replaced)
                .is_some()
        } else {
            member.link.push(&frame)
        };
        if pushed {
            tally.sent += 1;
        }
        pushed
    }

    /// The last message to every member, who is told that the subscription ended.
    pub(super) fn finish(&self, errors: Option<&str>, metrics: &GatewayMetrics) {
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

/// What one result came to, over the members of a group.
#[derive(Default)]
struct Tally {
    sent: u64,
    superseded: u64,
    withheld: u64,
}

/// How a state subscription's result kept by a socket that is behind is written later, saying
/// how many results it stands for.
fn later_frame(
    protocol: Protocol,
    id: &str,
    result: &Arc<ResultText>,
) -> crate::socket::LaterFrame {
    let (id_json, result) = (id_json(id), result.clone());
    Box::new(move |skipped| {
        let told = Told {
            recovered: None,
            skipped,
        };
        let cursor = result.cursor().map(|c| &**c);
        protocol::next_frame(protocol, &id_json, &result.telling(told), cursor)
    })
}

/// What a group is told of one result.
struct Delivery<'a> {
    result: &'a Arc<ResultText>,
    event_type: Option<EventType>,
    /// Commit time of the event behind it (µs since the epoch).
    event_at: Option<i64>,
    position: Option<At>,
    readers: Readers,
    /// Results it stands for besides itself: said in its `extensions.skipped`.
    skipped: u64,
    /// A state subscription's result: a member whose socket is behind keeps only the newest
    /// ([`Link::push_state`]).
    state: bool,
}
