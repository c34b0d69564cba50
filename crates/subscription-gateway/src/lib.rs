//! subscription-gateway: GraphQL subscriptions over websockets, fed by Redis.
//!
//! Layout:
//! - [`settings`]: the command line and environment of the binary.
//! - [`startup`]: [`startup::Application`]: builds everything, serves, drains on shutdown; its
//!   `state` and `drain` are also what the embedded single-process server uses.
//! - [`server`]: the HTTP server with actix-http's upgrade hook: websockets leave the HTTP
//!   dispatcher with their bare TCP stream; everything else goes to an actix-web app.
//! - [`socket`]: a websocket's own I/O: frames, small on-demand buffers, the shared write side
//!   that executions write results into.
//! - [`hub`]: the follower of the process's event log (Redis, or the in-memory log of the embedded
//!   mode) and the in-memory fan-out to local subscribers, routed by key; also the revocation
//!   feed.
//! - [`protocol`]: the two subprotocols' messages (`graphql-transport-ws`, legacy `graphql-ws`),
//!   and how every message is framed for them and for the streamed transports.
//! - [`connection`]: the life of one socket: auth at `connection_init`, subscriptions, keep-alive,
//!   expiry, revocation, slow consumers, shutdown.
//! - [`streamed`]: subscriptions over streamed HTTP (GraphQL over SSE, Apollo's multipart), one
//!   operation per request, with the socket's rules.
//! - [`operations`]: starting one operation for either: checks, persisted queries, then the
//!   shared execution (or api-service, for a query or mutation).
//! - [`executions`]: subscriptions with the same operation executed once per event and shared.
//! - [`replays`]: how many resumes a connection, a user and the process may replay at once, and
//!   how fast a user's replays may go.
//! - [`health`]: `/healthz` and `/readyz` on a listener and a thread apart from fan-out.
//! - [`metrics`]: the gateway's Prometheus metrics.
//! - [`pressure`]: whether deliveries lag, and the upgrades admitted meanwhile.
//! - [`user_sockets`]: sockets per user, counted across every gateway process through Redis.
//! - [`state`]: what the parts share (`Shared`, `GatewayState`, the limits, the coordinator),
//!   so that imports run one way: startup → server → connection → executions → replays/hub/
//!   socket/protocol.

pub mod connection;
pub mod executions;
pub mod forward;
pub mod health;
pub mod hub;
pub mod metrics;
pub mod operations;
pub mod pressure;
pub mod protocol;
pub mod replays;
pub mod server;
pub mod settings;
pub mod socket;
pub mod startup;
pub mod state;
pub mod streamed;
pub mod user_sockets;

/// A mutex's guard even if a thread panicked while holding it: every mutex here guards plain
/// data that stays consistent between statements, and one panicking connection must not take
/// the others down with a poisoned lock.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
