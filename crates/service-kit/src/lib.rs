//! What every service process needs, and nothing of the domain: no database, no GraphQL, no
//! tokens. Cargo keeps it so: this crate depends on none of diesel, juniper or jsonwebtoken.
//!
//! Layout:
//! - [`config`]: command-line/environment settings shared by every binary, and the one-line
//!   "bad setting" exit path.
//! - [`redis`]: the Redis connection pool.
//! - [`error`]: the error every HTTP handler returns, mapped once to status codes and bodies.
//! - [`http`]: request-body reading with limits and a timeout, per-address request limits, the
//!   listening socket, the server's start ([`start_server!`]), and the `/healthz`, `/readyz`,
//!   `/metrics` handlers.
//! - [`metrics`]: the Prometheus registry and the request-metrics middleware.
//! - [`telemetry`]: tracing set-up (pretty or JSON logs).
//! - [`shutdown`]: the future that resolves on SIGINT/SIGTERM.
//! - [`startup`]: the error a start-up ends with, and the one way a service runs until stopped.

pub mod config;
pub mod error;
pub mod http;
pub mod metrics;
pub mod redis;
pub mod shutdown;
pub mod startup;
pub mod telemetry;
