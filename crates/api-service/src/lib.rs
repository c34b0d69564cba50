//! api-service: the GraphQL schema over HTTP (queries and mutations), the Playground page, and the
//! outbox relay that makes sure every committed event reaches Redis.
//!
//! Layout:
//! - [`settings`]: the command line and environment of the binary.
//! - [`startup`]: [`startup::Application`], which builds everything and serves until told to stop;
//!   its `state`, `outbox_config` and `seed_demo` are also what the embedded server uses.
//! - [`routes`]: `/graphql` (POST and GET, GraphQL-over-HTTP), the Playground and GraphiQL pages.
//! - [`trigger`]: the `trigger-event` command (the reference's `trigger_event.py`).

pub mod ide;
pub mod routes;
pub mod settings;
pub mod startup;
pub mod trigger;
