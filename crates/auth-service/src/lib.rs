//! auth-service: users, passwords and JSON Web Tokens over SimpleJWT's REST contract.
//!
//! Layout:
//! - [`settings`]: the command line and environment of the binary.
//! - [`startup`]: [`startup::Application`], which builds everything and serves until told to stop;
//!   its `state` is also what the embedded single-process server uses.
//! - [`routes`]: the four token endpoints and the JWKS document.
//! - [`passwords`]: argon2id hashing and verification.
//! - [`ratelimit`]: failed-login counters in Redis, shared by every replica (in memory in the
//!   embedded mode).
//! - [`users`]: the `create-user` command and the demo user.

pub mod passwords;
pub mod ratelimit;
pub mod routes;
pub mod settings;
pub mod startup;
pub mod users;
