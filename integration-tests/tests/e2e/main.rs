#![allow(clippy::unwrap_used)] // Tests fail loudly at the first surprise.

//! The end-to-end suite: the real stack (PostgreSQL and Redis of this machine, the release
//! binaries under supervisord with the repo's `supervisord.conf`, NGINX with the repo's
//! `nginx.conf`) on free ports, walked through NGINX only, as the reference's users walk it: a
//! token over REST, `{ hi }`, a subscription with the token in `connectionParams`,
//! `trigger-event`, the update arriving; bad tokens refused on queries and subscriptions; two
//! gateway and two api processes; a gateway killed under its clients. Clients: the Rust one
//! (awc) and the npm packages `graphql-ws` and `subscriptions-transport-ws` (`node/`). The npm
//! clients also walk the embedded mode's binary, `gqlws` (`embedded`).
//!
//! Needs: the release binaries (`cargo build --release -p auth-service -p api-service
//! -p subscription-gateway -p embedded`), `npm ci` in `integration-tests/node`, nginx, supervisord and psql
//! on the PATH; scripts/test prepares all of it.

mod browser;
mod client;
mod cluster;
mod embedded;
mod hardening;
mod npm_clients;
mod observability;
mod readiness;
mod reference;
mod replay_bounds;
mod replicas;
mod resume;
mod safe_retries;
mod second_probe;
mod socket_operations;
mod stack;
mod streamed;
mod traces;
mod visibility;
