//! The end-to-end suite lives in `tests/e2e` (one test binary); this library is empty.
//!
//! Layout:
//! - `tests/e2e/stack.rs`: `Stack`, the real stack started with `scripts/stack up` on free ports
//!   (its own database and Redis key prefix), stopped with `scripts/stack down`.
//! - `tests/e2e/client.rs`: HTTP helpers, the Rust websocket client (awc, both subprotocols),
//!   the npm clients of `node/` as child processes, `trigger-event`, bad tokens.
//! - `tests/e2e/reference.rs`, `npm_clients.rs`, `replicas.rs`: the tests.
