//! Everything the services share, and nothing that listens on a socket.
//!
//! Layout:
//! - [`config`]: command-line/environment settings shared by every binary, and the one-line
//!   "bad setting" exit path.
//! - [`jwt`]: token claims, signing keys, verification keys, JWKS.
//! - [`db`]: the diesel schema, models, embedded migrations and the connection pool.
//! - [`redis`]: the Redis connection pool.
//! - [`error`]: the error type every HTTP handler returns, mapped once to status codes and bodies.
//! - [`http`]: request-body reading with limits, and the `/healthz`, `/readyz`, `/metrics` handlers.
//! - [`metrics`]: the Prometheus registry and the request-metrics middleware.
//! - [`telemetry`]: tracing set-up (pretty or JSON logs).
//! - [`shutdown`]: the future that resolves on SIGINT/SIGTERM.

pub mod config;
pub mod db;
pub mod error;
pub mod http;
pub mod jwt;
pub mod metrics;
pub mod redis;
pub mod shutdown;
pub mod telemetry;
