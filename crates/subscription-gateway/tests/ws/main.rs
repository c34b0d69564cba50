#![allow(clippy::unwrap_used)] // Tests fail loudly at the first surprise.

//! Integration tests of the gateway against real Redis, with a Rust websocket client (awc) for both
//! subprotocols. Events are published with the same bus code api-service uses.

mod auth;
mod delivery;
mod helpers;
mod keyed;
mod lifecycle;
mod resume;
mod streamed;
mod stress;
mod visibility;
