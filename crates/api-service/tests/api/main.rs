//! api-service integration tests: the real application on real PostgreSQL and Redis.

mod auth;
mod children;
mod config;
mod events;
mod helpers;
mod http;
mod idempotency;
mod jwks;
mod limits;
mod mutations;
mod persisted;
mod queries;
mod schema;
mod visibility;
