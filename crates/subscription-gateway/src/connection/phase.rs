//! Where a connection is in its life, and what its phase's clocks and feeds bring.

use std::pin::Pin;
use std::time::Duration;

use tokens::jwt::Claims;
use tokio::sync::watch;
use tokio::time::Sleep;

use crate::state::Shared;

/// Where a connection is in its life. What a message may do depends on it, and the type says so:
/// only a [`Ready`] connection has claims, an expiry and keep-alives.
pub(super) enum Phase {
    /// Until `connection_init` is accepted; closes at the init deadline (4408).
    AwaitingInit {
        deadline: Pin<Box<Sleep>>,
    },
    Ready(Ready),
}

/// An authenticated connection: its token's claims, when they expire, and its place in the
/// user's count.
pub(super) struct Ready {
    pub(super) claims: Claims,
    /// The `Authorization` value the claims came from, for the operations forwarded to
    /// api-service; replaced by a renewal.
    pub(super) authorization: String,
    /// The token's `exp` plus the verifier's leeway: as long as an HTTP request with the same
    /// token is served.
    pub(super) expiry: Pin<Box<Sleep>>,
    /// Changes whenever a logout's cutoff is raised in this process (an announcement the hub
    /// read, or the poll); the token is then checked again, and a revoked one closes the socket.
    /// `None` when the verifier follows no logouts.
    pub(super) revocations: Option<watch::Receiver<u64>>,
    pub(super) keepalive: tokio::time::Interval,
    pub(super) user_slot: crate::user_sockets::UserSlot,
}

impl Ready {
    pub(super) fn new(
        shared: &Shared,
        claims: Claims,
        authorization: String,
        slot: crate::user_sockets::UserSlot,
    ) -> Self {
        let mut keepalive = tokio::time::interval_at(
            tokio::time::Instant::now() + shared.limits.keepalive,
            shared.limits.keepalive,
        );
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let expiry = Box::pin(tokio::time::sleep_until(expiry_instant(shared, claims.exp)));
        Self {
            claims,
            authorization,
            expiry,
            revocations: shared.verifier.revocations().map(|list| list.changes()),
            keepalive,
            user_slot: slot,
        }
    }

    /// A renewal: the same user's newer token.
    pub(super) fn renew(&mut self, shared: &Shared, claims: Claims, authorization: String) {
        self.expiry
            .as_mut()
            .reset(expiry_instant(shared, claims.exp));
        self.claims = claims;
        self.authorization = authorization;
    }
}

/// Resolves when a logout's cutoff was raised since the last look; never without a feed.
pub(crate) async fn revocations_changed(feed: &mut Option<watch::Receiver<u64>>) {
    match feed {
        Some(receiver) => {
            if receiver.changed().await.is_err() {
                // The list is gone (the process is stopping): nothing more will change.
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

pub(crate) fn expiry_instant(shared: &Shared, exp: i64) -> tokio::time::Instant {
    let left = exp - chrono::Utc::now().timestamp();
    tokio::time::Instant::now()
        + Duration::from_secs(left.max(0) as u64)
        + Duration::from_secs(shared.verifier.leeway_secs())
}

/// What the phase's own clocks and feeds bring.
pub(super) enum PhaseEvent {
    InitTimeout,
    Expired,
    /// A cutoff was raised somewhere: the token may be revoked now.
    RevocationsChanged,
    Keepalive,
}

impl Phase {
    /// The next thing the phase's clocks or feeds have for the connection.
    pub(super) async fn next_event(&mut self) -> PhaseEvent {
        match self {
            Phase::AwaitingInit { deadline } => {
                deadline.as_mut().await;
                PhaseEvent::InitTimeout
            }
            Phase::Ready(ready) => tokio::select! {
                biased;
                () = ready.expiry.as_mut() => PhaseEvent::Expired,
                () = revocations_changed(&mut ready.revocations) => PhaseEvent::RevocationsChanged,
                _ = ready.keepalive.tick() => PhaseEvent::Keepalive,
            },
        }
    }
}
