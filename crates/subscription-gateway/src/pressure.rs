//! Whether the gateway is behind on its deliveries, and what it admits meanwhile.
//!
//! Every shared execution's group reports, once per result it writes, how long after the
//! event's append to the log it wrote it. While the latest report (at most [`FRESH`] old) is
//! over `OVERLOAD_LAG_MS`, the process is *lagging*: a websocket upgrade is admitted only
//! within `UPGRADES_PER_SEC_WHILE_LAGGING`, and the others are answered 503 with a
//! `Retry-After` of one to five seconds, spread, so that a crowd of reconnecting clients does
//! not come back in the same second. Each one admitted costs the workers a handshake, a token
//! check and a subscription (and a replay, for a resume) that the subscribers already there
//! would pay for in latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::lock;

/// How long a report of the delivery lag stands; without a newer one the gateway is taken to
/// have caught up (no events, no lag).
const FRESH: Duration = Duration::from_secs(2);

pub struct Pressure {
    /// Lag over which the gateway is behind (OVERLOAD_LAG_MS).
    threshold_ms: u64,
    /// Upgrades admitted per second while behind.
    rate: f64,
    start: Instant,
    /// The last lag reported, and when (ms since `start`).
    lag_ms: AtomicU64,
    reported_at_ms: AtomicU64,
    /// Upgrades that may still be admitted, and when it was last refilled.
    bucket: Mutex<(f64, Instant)>,
}

impl Pressure {
    pub fn new(threshold: Duration, upgrades_per_sec: u32) -> Self {
        let rate = f64::from(upgrades_per_sec.max(1));
        Self {
            threshold_ms: threshold.as_millis() as u64,
            rate,
            start: Instant::now(),
            lag_ms: AtomicU64::new(0),
            reported_at_ms: AtomicU64::new(0),
            bucket: Mutex::new((rate, Instant::now())),
        }
    }

    /// A result was written `lag_ms` after its event's append.
    pub fn report(&self, lag_ms: u64) {
        self.lag_ms.store(lag_ms, Ordering::Relaxed);
        // Plus one: 0 means "never".
        self.reported_at_ms.store(
            self.start.elapsed().as_millis() as u64 + 1,
            Ordering::Relaxed,
        );
    }

    /// Whether a group holding a result of an event appended at `appended_ms` (ms since the
    /// epoch; `None` on the in-memory log), with `waiting` of `capacity` results queued behind
    /// it, is past capacity: the result is older than the threshold, or the queue half full.
    pub fn behind(&self, appended_ms: Option<u64>, waiting: usize, capacity: usize) -> bool {
        if waiting == 0 {
            return false;
        }
        if waiting >= capacity.div_ceil(2) {
            return true;
        }
        appended_ms.is_some_and(|appended| {
            let now = chrono::Utc::now().timestamp_millis() as u64;
            now.saturating_sub(appended) > self.threshold_ms
        })
    }

    /// True while the last report, a fresh one, is over the threshold.
    pub fn lagging(&self) -> bool {
        let now = self.start.elapsed().as_millis() as u64 + 1;
        let reported = self.reported_at_ms.load(Ordering::Relaxed);
        reported > 0
            && now.saturating_sub(reported) <= FRESH.as_millis() as u64
            && self.lag_ms.load(Ordering::Relaxed) > self.threshold_ms
    }

    /// Admits one upgrade, or says after how many seconds to try again.
    pub fn admit(&self) -> Result<(), u64> {
        if !self.lagging() {
            return Ok(());
        }
        let mut bucket = lock(&self.bucket);
        let (tokens, refilled) = &mut *bucket;
        let now = Instant::now();
        *tokens =
            (*tokens + now.duration_since(*refilled).as_secs_f64() * self.rate).min(self.rate);
        *refilled = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            return Ok(());
        }
        Err(1 + u64::from(rand::random::<u8>() % 5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrades_are_admitted_at_the_rate_only_while_lagging() {
        let pressure = Pressure::new(Duration::from_millis(500), 3);
        for _ in 0..100 {
            assert_eq!(pressure.admit(), Ok(()), "not lagging: every upgrade");
        }
        pressure.report(100);
        assert!(!pressure.lagging(), "under the threshold");
        pressure.report(800);
        assert!(pressure.lagging());
        let admitted = (0..100).filter(|_| pressure.admit().is_ok()).count();
        assert_eq!(admitted, 3, "one second's worth at once, then none");
        let retry = pressure.admit().unwrap_err();
        assert!((1..=5).contains(&retry), "{retry}");
        pressure.report(10);
        assert_eq!(pressure.admit(), Ok(()), "caught up");
    }
}
