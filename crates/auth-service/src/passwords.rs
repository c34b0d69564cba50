//! argon2id password hashes in PHC string format (`$argon2id$v=19$m=19456,t=2,p=1$…`), with the
//! crate's defaults, which are OWASP's recommended minimum (19 MiB, 2 passes, 1 lane). Hashing is
//! deliberately slow, so callers run it on the blocking pool.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

fn hasher() -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, Params::default())
}

pub fn hash(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    hasher()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|err| format!("cannot hash password: {err}"))
}

/// False for a wrong password and for a stored hash that cannot be parsed (logged), so that a
/// corrupt row locks that account rather than failing requests.
pub fn verify(stored: &str, password: &str) -> bool {
    match PasswordHash::new(stored) {
        Ok(parsed) => hasher()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(err) => {
            tracing::error!(%err, "stored password hash is unreadable");
            false
        }
    }
}

/// Runs `verify` on the blocking pool.
pub async fn verify_blocking(stored: String, password: String) -> bool {
    tokio::task::spawn_blocking(move || verify(&stored, &password))
        .await
        .unwrap_or(false)
}

/// Runs `hash` on the blocking pool.
pub async fn hash_blocking(password: String) -> Result<String, String> {
    tokio::task::spawn_blocking(move || hash(&password))
        .await
        .map_err(|_| "password hashing was cancelled".to_owned())?
}
