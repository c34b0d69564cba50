//! The state the gateway's parts share, in a room of its own so that imports run one way:
//! startup → server → connection → state → executions → replays, hub, socket, protocol. `state` names
//! the types it holds and nothing above it; executions and below never import it.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use graphql_schema::Schema;
use service_kit::http::Tally;
use tokens::auth::TokenVerifier;
use tokio_util::sync::CancellationToken;

use crate::executions::{Coordinator, Executions};
use crate::hub::Hub;
use crate::metrics::GatewayMetrics;

/// Limits of one connection, from the settings.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub keepalive: Duration,
    pub init_timeout: Duration,
    pub max_subscriptions: usize,
    pub outbound_queue: usize,
    /// Longest a client may leave waiting bytes unread before it is disconnected.
    pub write_timeout: Duration,
}

/// What every connection shares.
pub struct Shared {
    pub coordinator: Arc<Coordinator>,
    /// The same schema, for checks before an execution starts (one root field per
    /// subscription) and for metric labels.
    pub schema: Arc<Schema>,
    /// Authenticated sockets per user (MAX_CONNECTIONS_PER_USER), across every process.
    pub users: crate::user_sockets::UserSockets,
    pub verifier: TokenVerifier,
    pub hub: Hub,
    /// Subscriptions with the same operation share one execution (see [`crate::executions`]).
    pub executions: Arc<Executions>,
    pub limits: ConnectionLimits,
    pub metrics: GatewayMetrics,
    /// Cancelled when the server starts draining: every socket closes with 1001.
    pub shutdown: CancellationToken,
    /// Where queries and mutations sent on the socket are executed.
    pub upstream: crate::forward::Upstream,
    /// Replays waiting or running, by user ([`crate::replays`]).
    pub replays: Arc<crate::replays::Replays>,
    /// Whether deliveries lag, and the upgrades admitted meanwhile.
    pub pressure: Arc<crate::pressure::Pressure>,
    /// Persisted queries, shared with api-service (Redis; in memory embedded).
    pub persisted: graphql_schema::persisted::PersistedQueries,
}

/// What the upgrade handler shares (the server reads it as app data).
pub struct GatewayState {
    pub(crate) shared: Arc<Shared>,
    pub(crate) max_frame_bytes: usize,
    /// Open sockets per client address (MAX_CONNECTIONS_PER_ADDRESS), counted from the upgrade.
    pub(crate) addresses: Arc<Tally<IpAddr>>,
    /// Whether the upgrade's `X-Forwarded-For` names the client (behind the repo's NGINX).
    pub(crate) trust_forwarded_for: bool,
    pub(crate) drain_timeout: Duration,
    /// SO_SNDBUF of each websocket (SOCKET_SEND_BUFFER_BYTES); 0: the kernel's.
    pub(crate) send_buffer_bytes: usize,
}
