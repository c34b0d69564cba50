//! How much replay work one user may ask of a gateway process.
//!
//! Resume makes every reconnect lossless, and each resume costs the gateway a read of the log
//! after its cursor and one execution of the subscription per event missed. One account opening
//! thousands of resumes from the oldest cursor used to occupy both workers for seconds, and
//! other users' live events waited behind the replays. So a replay must be admitted:
//!
//! - at most `MAX_REPLAYS_PER_CONNECTION` of a connection's replays run at once, and at most
//!   `MAX_REPLAYS_PER_USER` of a user's, and `MAX_REPLAYS` in the process; the others wait their
//!   turn, in arrival order;
//! - a user's waiting line is bounded (`REPLAY_QUEUE_PER_USER`): a resume past it is answered at
//!   once with `recovered: false` and goes live, the documented path for a history that no
//!   longer covers the cursor (the client refetches its state);
//! - a running replay is paced by its user's budget (`REPLAY_EVENTS_PER_SEC_PER_USER`, a token
//!   bucket holding one second of it) and yields to the worker after every event, so that live
//!   deliveries, which are never paced, run between its events ("live first").
//!
//! A replay whose reader does not read stops at the first event its socket refuses (the link's
//! `OUTBOUND_QUEUE` full: the socket closes 1013), reading nothing further for it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::lock;
use crate::metrics::GatewayMetrics;

/// The limits, from the settings.
#[derive(Debug, Clone, Copy)]
pub struct ReplayLimits {
    pub per_connection: usize,
    pub per_user: usize,
    pub per_process: usize,
    /// A user's replays that may wait for a turn beyond those running.
    pub queue_per_user: usize,
    pub events_per_sec_per_user: u32,
}

/// The process's replays, by user.
pub struct Replays {
    limits: ReplayLimits,
    process: Arc<Semaphore>,
    users: Mutex<HashMap<i64, Arc<UserReplays>>>,
    metrics: GatewayMetrics,
}

/// One user's replays on this process.
struct UserReplays {
    running: Arc<Semaphore>,
    /// Running or waiting.
    admitted: AtomicUsize,
    budget: Mutex<Bucket>,
}

/// Events a user's replays may still execute, refilled continuously.
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A replay's turn: its place in its user's line and in the connection's, the user's and the
/// process's counts of running replays, given back when dropped.
pub struct Turn {
    place: LinePlace,
    _connection: OwnedSemaphorePermit,
    _user: OwnedSemaphorePermit,
    _process: OwnedSemaphorePermit,
}

/// What a connection hands its resuming subscriptions: the process's replays, and its own
/// count.
#[derive(Clone)]
pub struct ReplayAdmission {
    pub replays: Arc<Replays>,
    pub connection: Arc<Semaphore>,
    pub user_id: i64,
}

impl Replays {
    pub fn new(limits: ReplayLimits, metrics: GatewayMetrics) -> Arc<Self> {
        Arc::new(Self {
            limits,
            process: Arc::new(Semaphore::new(limits.per_process.max(1))),
            users: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// A connection's own count of running replays.
    pub fn connection_slots(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(self.limits.per_connection.max(1)))
    }

    /// Waits for the replay's turn; `None` when the user's line is full (answer
    /// `recovered: false` at once). Waiting holds a place in the line, given back if the wait is
    /// abandoned (the subscriber left).
    pub async fn admit(self: &Arc<Self>, admission: &ReplayAdmission) -> Option<Turn> {
        let place = self.join_line(admission.user_id)?;
        let connection = admission.connection.clone().acquire_owned().await.ok()?;
        let user = place.user.running.clone().acquire_owned().await.ok()?;
        let process = self.process.clone().acquire_owned().await.ok()?;
        Some(Turn {
            place,
            _connection: connection,
            _user: user,
            _process: process,
        })
    }

    /// A place in `user_id`'s line: a replay's own while it waits and runs ([`Replays::admit`]),
    /// or that of a subscriber sharing a replay already waiting (its results are written for it
    /// too); `None` when the line is full (answer `recovered: false` at once).
    pub fn join_line(self: &Arc<Self>, user_id: i64) -> Option<LinePlace> {
        let user = self.user(user_id);
        let most = self.limits.per_user + self.limits.queue_per_user;
        if user.admitted.fetch_add(1, Ordering::AcqRel) >= most {
            self.leave(user_id, &user);
            self.metrics.replays_refused.inc();
            return None;
        }
        Some(LinePlace {
            replays: self.clone(),
            user_id,
            user,
        })
    }

    fn user(&self, user_id: i64) -> Arc<UserReplays> {
        let mut users = lock(&self.users);
        users
            .entry(user_id)
            .or_insert_with(|| {
                Arc::new(UserReplays {
                    running: Arc::new(Semaphore::new(self.limits.per_user.max(1))),
                    admitted: AtomicUsize::new(0),
                    budget: Mutex::new(Bucket {
                        tokens: f64::from(self.limits.events_per_sec_per_user),
                        at: Instant::now(),
                    }),
                })
            })
            .clone()
    }

    /// One replay of the user's is over (or was refused): forget the user when it was the last.
    fn leave(&self, user_id: i64, user: &Arc<UserReplays>) {
        if user.admitted.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut users = lock(&self.users);
            if users.get(&user_id).is_some_and(|known| {
                Arc::ptr_eq(known, user) && user.admitted.load(Ordering::Acquire) == 0
            }) {
                users.remove(&user_id);
            }
        }
    }

    /// Users with replays running or waiting (for tests and the metric).
    #[cfg(test)]
    fn users(&self) -> usize {
        lock(&self.users).len()
    }
}

/// A place in a user's line, given back when dropped.
pub struct LinePlace {
    replays: Arc<Replays>,
    user_id: i64,
    user: Arc<UserReplays>,
}

impl Drop for LinePlace {
    fn drop(&mut self) {
        self.replays.leave(self.user_id, &self.user);
    }
}

impl Turn {
    /// Before each replayed event: takes one event of the user's budget (waiting for it when
    /// spent) and lets the worker run what else is ready, live deliveries first.
    pub async fn pace(&self) {
        let replays = &self.place.replays;
        let rate = f64::from(replays.limits.events_per_sec_per_user.max(1));
        let wait = {
            let mut bucket = lock(&self.place.user.budget);
            let now = Instant::now();
            let refilled = now.duration_since(bucket.at).as_secs_f64() * rate;
            bucket.tokens = (bucket.tokens + refilled).min(rate);
            bucket.at = now;
            bucket.tokens -= 1.0;
            if bucket.tokens < 0.0 {
                Duration::from_secs_f64(-bucket.tokens / rate)
            } else {
                Duration::ZERO
            }
        };
        if wait > Duration::ZERO {
            replays.metrics.replay_events_paced.inc();
            tokio::time::sleep(wait).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replays(per_user: usize, queue: usize) -> Arc<Replays> {
        let metrics = GatewayMetrics::register(&service_kit::metrics::Metrics::new("replays-test"));
        Replays::new(
            ReplayLimits {
                per_connection: 100,
                per_user,
                per_process: 100,
                queue_per_user: queue,
                events_per_sec_per_user: 1000,
            },
            metrics,
        )
    }

    fn admission(replays: &Arc<Replays>, user_id: i64) -> ReplayAdmission {
        ReplayAdmission {
            replays: replays.clone(),
            connection: replays.connection_slots(),
            user_id,
        }
    }

    #[tokio::test]
    async fn a_user_runs_its_share_waits_for_its_queue_and_is_refused_past_it() {
        let replays = replays(2, 1);
        let alice = admission(&replays, 1);
        let first = replays.admit(&alice).await.expect("running");
        let second = replays.admit(&alice).await.expect("running");
        // The third waits for a turn; the fourth is past the line.
        let waiting = tokio::spawn({
            let (replays, alice) = (replays.clone(), alice.clone());
            async move { replays.admit(&alice).await.is_some() }
        });
        tokio::task::yield_now().await;
        assert!(replays.admit(&alice).await.is_none(), "past the line");
        assert!(
            replays.join_line(1).is_none(),
            "sharing another's replay takes a place in the line too"
        );
        // Another user is not held up by alice.
        let bob = replays.admit(&admission(&replays, 2)).await;
        assert!(bob.is_some());
        drop(first);
        assert!(waiting.await.expect("joined"), "its turn came");
        drop((second, bob));
        tokio::task::yield_now().await;
        assert_eq!(replays.users(), 0, "users without replays are forgotten");
    }

    // The clock is paused (and advanced to each timer as it falls due): a loaded machine's late
    // wake-ups would refill the bucket and let waiting events through.
    #[tokio::test(start_paused = true)]
    async fn a_users_replays_share_one_budget_of_events() {
        let replays = replays(4, 0);
        let alice = admission(&replays, 1);
        let first = replays.admit(&alice).await.expect("running");
        let second = replays.admit(&alice).await.expect("running");
        // 1,000 events a second, one second of them in the bucket, shared by her replays: of
        // 1,300 events, the first 1,000 go at once and the last 300 each wait for a token.
        for n in 0..1300 {
            if n % 2 == 0 {
                first.pace().await
            } else {
                second.pace().await
            }
        }
        let paced = replays.metrics.replay_events_paced.get();
        assert_eq!(paced, 300, "events that waited");
        // Bob's budget is his own.
        let bob = replays
            .admit(&admission(&replays, 2))
            .await
            .expect("running");
        bob.pace().await;
        assert_eq!(replays.metrics.replay_events_paced.get(), paced);
    }
}
