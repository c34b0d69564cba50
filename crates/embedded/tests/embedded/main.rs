#![allow(clippy::unwrap_used)] // Tests fail loudly at the first surprise.

//! The contract tests against the embedded mode: the whole stack in one process on a temporary
//! SQLite file and the in-memory log, reached the way clients reach NGINX in the distributed
//! stack (one address, `/api/token/…`, `/graphql` with and without a websocket upgrade).

mod graphql;
mod helpers;
mod rest;
mod storage;
mod users;
mod ws;
