//! Everything the services share, and nothing that listens on a socket.
//!
//! Layout:
//! - [`config`]: command-line/environment settings shared by every binary, and the one-line
//!   "bad setting" exit path.
//! - [`jwt`]: token claims, signing keys, verification keys, JWKS.
//! - [`db`]: the diesel schema, models, embedded migrations and the connection pool, over
//!   PostgreSQL or SQLite (the embedded mode) through one `MultiConnection`.
//! - [`db::cars`], [`db::outbox`]: the cars and the events waiting to be published.
//! - [`redis`]: the Redis connection pool.
//! - [`events`]: the event envelope, its Redis channels, the event bus (Redis, or in memory for
//!   the embedded mode) and the event source.
//! - [`repository`]: the one write path for cars: change and event in one transaction, publish
//!   after commit, and the relay that publishes what did not get out.
//! - [`auth`]: the `Authorization: Bearer` check against configured keys or a cached JWKS.
//! - [`revocations`]: per-user logout cutoffs that revoke access tokens on every replica.
//! - [`graphql`]: the one GraphQL schema (juniper) shared by api-service and the gateway.
//! - [`error`]: the error type every HTTP handler returns, mapped once to status codes and bodies.
//! - [`http`]: request-body reading with limits and a timeout, per-address request limits, the
//!   listening socket, and the `/healthz`, `/readyz`, `/metrics` handlers.
//! - [`metrics`]: the Prometheus registry and the request-metrics middleware.
//! - [`telemetry`]: tracing set-up (pretty or JSON logs).
//! - [`shutdown`]: the future that resolves on SIGINT/SIGTERM.

pub mod auth;
pub mod config;
pub mod db;
pub mod error;
pub mod events;
pub mod graphql;
pub mod http;
pub mod jwt;
pub mod metrics;
pub mod redis;
pub mod repository;
pub mod revocations;
pub mod shutdown;
pub mod telemetry;
