#![allow(clippy::unwrap_used)] // Tests fail loudly at the first surprise.

//! Integration tests of auth-service against real PostgreSQL and Redis. All modules compile into
//! one binary so the crate is linked once.

mod config;
mod helpers;
mod jwt_attacks;
mod keys;
mod obtain;
mod operations;
mod rate_limit;
mod refresh;
mod revocation;
