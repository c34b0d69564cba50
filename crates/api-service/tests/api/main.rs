//! api-service integration tests: the real application on real PostgreSQL and Redis.

mod auth;
mod events;
mod helpers;
mod http;
mod limits;
mod mutations;
mod queries;
mod schema;
