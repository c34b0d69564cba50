//! Reading a log after a client's cursor, for subscriptions that resume.
//!
//! After a replica's restart its clients come back at once with the same cursor (the last event
//! they all had), so reads for one cursor that wait at the same time are made once ([`Flight`]),
//! and at most [`REPLAY_READS`] reads run at a time. A read covers the whole type's log after
//! the cursor, every partition from where the cursor says it stood; each resuming subscription
//! takes the events of its own key from it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use events::{Cursor, EnvelopeStream, EventSource, EventType, Key, LoggedEvent, Positions};
use futures_util::future::{BoxFuture, Shared};
use futures_util::{FutureExt as _, StreamExt as _};

use super::{mark, Hub};
use crate::lock;

/// Backlog reads under way at once. More would only queue for the pool's connections (and time
/// out there under a reconnect storm); while a read waits for its turn, others for the same
/// cursor join it.
pub(super) const REPLAY_READS: usize = 4;

/// One read of a log after a cursor, shared by the resuming subscriptions that wait for it.
///
/// Sharing is correct only with a subscription whose live part already read the hub when the
/// read begins: an event the read misses then reaches it live. So a subscription joins a flight
/// only while `reading` is still false (set under the `flights` lock); once the read has begun,
/// a newcomer starts a flight of its own.
pub(super) struct Flight {
    reading: AtomicBool,
    result: Shared<BoxFuture<'static, Result<Arc<Backlog>, ReplayError>>>,
}

/// What [`Hub::backlog`] found after a cursor.
#[derive(Debug)]
pub struct Backlog {
    /// Whether the history still covers the cursor; when not, `events` is empty and the
    /// subscriber continues live.
    pub recovered: bool,
    pub events: Vec<Arc<LoggedEvent>>,
    /// Every event after these positions (one per partition) reaches the subscription live:
    /// the last one read in each partition, or the cursor's where there was nothing after it.
    pub until: Positions,
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
    /// The events of `event_type` after `cursor`, for a subscription that resumes. Called once
    /// the subscription's live part reads the log, so that [`Backlog::until`] joins the two
    /// without a gap.
    pub async fn backlog(
        &self,
        event_type: EventType,
        cursor: &Cursor,
    ) -> Result<Arc<Backlog>, ReplayError> {
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
                let result = hub.read_backlog(event_type, &cursor).await.map(Arc::new);
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

    async fn read_backlog(
        &self,
        event_type: EventType,
        cursor: &Cursor,
    ) -> Result<Backlog, ReplayError> {
        let epoch = self.epoch();
        let not_recovered = Backlog {
            recovered: false,
            events: Vec::new(),
            until: Positions::from([]),
        };
        // Another epoch, or a cursor of a log split otherwise (a single-node cursor after the
        // move to a cluster): its positions name nothing here.
        if *epoch != *cursor.epoch || cursor.positions.len() != usize::from(self.inner.partitions) {
            return Ok(not_recovered);
        }
        let log = &self.inner.log;
        let histories = futures_util::future::try_join_all(
            cursor
                .positions
                .iter()
                .enumerate()
                .map(|(partition, after)| log.history(event_type, partition as u16, *after)),
        )
        .await
        .map_err(|err| ReplayError::Unavailable(err.to_string()))?;
        let covered = histories.iter().all(|history| history.covered);
        let read: usize = histories.iter().map(|history| history.entries.len()).sum();
        let metrics = &self.inner.metrics;
        metrics.replay_entries_read.inc_by(read as u64);
        metrics
            .replays
            .with_label_values(&[if covered { "true" } else { "false" }])
            .inc();
        if !covered {
            return Ok(not_recovered);
        }
        // The partitions merged by position (their append times): each is in its own order.
        let mut entries: Vec<_> = histories
            .into_iter()
            .enumerate()
            .flat_map(|(partition, history)| {
                history
                    .entries
                    .into_iter()
                    .map(move |(position, payload)| (position, partition as u16, payload))
            })
            .collect();
        entries.sort_by_key(|(position, partition, _)| (*position, *partition));
        let mut until = cursor.positions.to_vec();
        let mut ids = HashSet::new();
        let mut events = Vec::with_capacity(entries.len());
        for (position, partition, payload) in entries {
            until[usize::from(partition)] = position;
            let Ok(envelope) = self.inner.registry.decode(event_type, payload.as_bytes()) else {
                continue;
            };
            if !ids.insert(envelope.id.clone()) {
                continue;
            }
            let keys = self.inner.registry.keys(event_type, &envelope.data);
            let readers = self.inner.registry.readers(event_type, &envelope.data);
            events.push(Arc::new(LoggedEvent::new(
                event_type,
                partition,
                Positions::from(until.as_slice()),
                &epoch,
                envelope,
                keys,
                readers,
            )));
        }
        Ok(Backlog {
            recovered: true,
            events,
            until: until.into(),
        })
    }
}

/// What a replay ended with, for the task that runs it.
/// How the read behind a [`BacklogEvents`] ended, set once when the log was read: what the
/// runner of the catch-up learns once the stream the resolver made of it has ended.
pub type BacklogOutcome = Arc<OnceLock<Result<BacklogEnd, ReplayError>>>;

/// Where a replay ended (see [`Backlog`]).
#[derive(Debug, Clone)]
pub struct BacklogEnd {
    pub recovered: bool,
    pub until: Positions,
}

/// The log after a cursor as one resuming subscription sees it: a finite stream of the events
/// it missed, through the same resolver as live ones.
pub struct BacklogEvents {
    pub hub: Hub,
    pub cursor: Cursor,
    pub outcome: BacklogOutcome,
}

impl EventSource for BacklogEvents {
    fn subscribe(&self, event_type: EventType, key: Option<Key>) -> EnvelopeStream {
        let hub = self.hub.clone();
        let cursor = self.cursor.clone();
        let outcome = self.outcome.clone();
        Box::pin(
            futures_util::stream::once(async move {
                match hub.backlog(event_type, &cursor).await {
                    Ok(replay) => {
                        let _ = outcome.set(Ok(BacklogEnd {
                            recovered: replay.recovered,
                            until: replay.until.clone(),
                        }));
                        // One read of the type's log serves every key resuming from the cursor;
                        // each subscription takes its own key's events from it.
                        replay
                            .events
                            .iter()
                            .filter(|event| event.is_for(key))
                            .cloned()
                            .collect()
                    }
                    Err(err) => {
                        let _ = outcome.set(Err(err));
                        Vec::new()
                    }
                }
            })
            .flat_map(|events: Vec<Arc<LoggedEvent>>| {
                futures_util::stream::iter(events.into_iter().map(|event| {
                    mark(&event, 0, false);
                    event.envelope.clone()
                }))
            }),
        )
    }
}
