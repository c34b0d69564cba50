//! The embedded mode: auth-service, api-service and the subscription gateway in one process, on
//! SQLite and the in-memory event bus, routed on one address exactly as NGINX routes the
//! distributed stack. It builds each service from that service's own library (its state and route
//! functions); nothing here re-implements a service.
//!
//! Layout:
//! - [`settings`]: the `gqlws` command line, and the three services' settings derived from it.
//! - [`server`]: [`server::Application`], which builds the one actix app and runs it with the
//!   outbox relay and the hub until a shutdown signal; and the start-up banner.

pub mod server;
pub mod settings;
