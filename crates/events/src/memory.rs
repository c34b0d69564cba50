//! The logs of the embedded single-process mode: a bounded log per event type with the Redis
//! streams' semantics (positions, retention, an epoch), and a broadcast channel that carries
//! each entry, in log order, to the follower (the gateway's hub), which consumes it with the
//! same decoding, dedupe and fan-out as Redis entries.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use chrono::Utc;
use futures_util::future::BoxFuture;
use tokio::sync::broadcast;

use crate::envelope::EventType;
use crate::log::{new_epoch, EventLog, Follower, History, LogError, Revocation, REVOCATION_EVENT};
use crate::position::{Position, Retention};

/// Cheap to clone; every clone is the same logs.
#[derive(Clone)]
pub struct MemoryLog {
    sender: broadcast::Sender<Appended>,
    logs: Arc<Mutex<Logs>>,
    epoch: Arc<str>,
}

/// One entry as it is handed to the follower.
#[derive(Debug, Clone)]
struct Appended {
    /// The event type's name, or [`REVOCATION_EVENT`].
    log: Arc<str>,
    position: Position,
    payload: Arc<str>,
}

struct Logs {
    by_name: HashMap<Arc<str>, OneLog>,
    retention: Retention,
}

#[derive(Default)]
struct OneLog {
    entries: VecDeque<(Position, i64, Arc<str>)>,
    last: Position,
    /// The highest position trimmed away (Redis's `max-deleted-entry-id`).
    trimmed: Position,
}

impl MemoryLog {
    /// `capacity` entries may wait for the follower before it lags.
    pub fn new(capacity: usize) -> Self {
        Self::with_retention(capacity, Retention::default())
    }

    pub fn with_retention(capacity: usize, retention: Retention) -> Self {
        Self {
            sender: broadcast::channel(capacity.max(1)).0,
            logs: Arc::new(Mutex::new(Logs {
                by_name: HashMap::new(),
                retention,
            })),
            epoch: Arc::from(new_epoch()),
        }
    }

    /// Appends `payload` to the log `name` and hands it to the follower. Nobody following is not
    /// an error (as with Redis, where nobody may be reading the stream).
    fn send(&self, name: &str, payload: &str) {
        let mut logs = self.logs.lock().unwrap_or_else(PoisonError::into_inner);
        let retention = match name {
            REVOCATION_EVENT => crate::log::REVOCATION_RETENTION,
            _ => logs.retention,
        };
        let now = Utc::now().timestamp();
        let name: Arc<str> = Arc::from(name);
        let log = logs.by_name.entry(name.clone()).or_default();
        let position = Position {
            ms: 0,
            seq: log.last.seq + 1,
        };
        log.last = position;
        let payload: Arc<str> = Arc::from(payload);
        log.entries.push_back((position, now, payload.clone()));
        let too_old = |at: i64| {
            retention.max_age_secs > 0
                && now.saturating_sub(at)
                    > i64::try_from(retention.max_age_secs).unwrap_or(i64::MAX)
        };
        while log.entries.len() as u64 > retention.count
            || log.entries.front().is_some_and(|(_, at, _)| too_old(*at))
        {
            if let Some((trimmed, _, _)) = log.entries.pop_front() {
                log.trimmed = trimmed;
            }
        }
        // Sent under the lock, so that the follower receives entries in log order.
        let _ = self.sender.send(Appended {
            log: name,
            position,
            payload,
        });
    }

    fn read(&self, name: &str, after: Position) -> History {
        let logs = self.logs.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(log) = logs.by_name.get(name) else {
            return History {
                covered: after == Position::ZERO,
                entries: Vec::new(),
            };
        };
        History {
            covered: log.trimmed <= after && after <= log.last,
            entries: log
                .entries
                .iter()
                .filter(|(position, _, _)| *position > after)
                .map(|(position, _, payload)| (*position, payload.clone()))
                .collect(),
        }
    }
}

impl EventLog for MemoryLog {
    fn append<'a>(
        &'a self,
        event_type: &'a str,
        payload: &'a str,
    ) -> BoxFuture<'a, Result<(), LogError>> {
        self.send(event_type, payload);
        Box::pin(std::future::ready(Ok(())))
    }

    fn history<'a>(
        &'a self,
        event_type: EventType,
        _partition: u16,
        after: Position,
    ) -> BoxFuture<'a, Result<History, LogError>> {
        // One partition: a process's memory is one shard.
        Box::pin(std::future::ready(
            Ok(self.read(event_type.as_str(), after)),
        ))
    }

    fn tip_now(&self, event_type: EventType) -> Option<Position> {
        let logs = self.logs.lock().unwrap_or_else(PoisonError::into_inner);
        Some(
            logs.by_name
                .get(event_type.as_str())
                .map_or(Position::ZERO, |log| log.last),
        )
    }

    /// Every log is in reach from the start: the follower is connected, in this process's
    /// epoch (the logs start empty with every start), before the future runs.
    fn follow(&self, follower: Arc<dyn Follower>) -> BoxFuture<'static, ()> {
        let mut appended = self.sender.subscribe();
        follower.epoch(&self.epoch);
        follower.connected(true);
        Box::pin(async move {
            loop {
                match appended.recv().await {
                    Ok(entry) if &*entry.log == REVOCATION_EVENT => {
                        follower.revoked(Revocation::decode(entry.payload.as_bytes()));
                    }
                    Ok(entry) => {
                        follower.entry(&entry.log, 0, entry.position, entry.payload.as_bytes())
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(
                            missed,
                            "the hub fell behind the in-memory log; events were lost"
                        );
                        // Of which logs is not known: every one read lost some.
                        for (event_type, _) in follower.logs(0) {
                            follower.lost(event_type.as_str(), 0);
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
            follower.connected(false);
        })
    }
}
