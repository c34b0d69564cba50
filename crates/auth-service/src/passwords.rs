//! argon2id password hashes in PHC string format (`$argon2id$v=19$m=19456,t=2,p=1$…`), with the
//! crate's defaults, which are OWASP's recommended minimum (19 MiB, 2 passes, 1 lane). Hashing is
//! deliberately slow: logins check on threads of their own ([`CheckThreads`]), other callers
//! hash on the blocking pool.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{Output, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};

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

/// Threads that only check passwords, taking checks in turn from one queue (see
/// [`crate::routes::LoginGate`] for why they are threads of their own). They end when this value
/// is dropped.
pub struct CheckThreads {
    checks: std::sync::Mutex<std::sync::mpsc::Sender<Check>>,
}

struct Check {
    stored: String,
    password: String,
    answer: tokio::sync::oneshot::Sender<bool>,
}

impl CheckThreads {
    pub fn start(threads: usize) -> Self {
        let (checks, queue) = std::sync::mpsc::channel::<Check>();
        let queue = std::sync::Arc::new(std::sync::Mutex::new(queue));
        for n in 0..threads.max(1) {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("password-check-{n}"))
                .spawn(move || {
                    // This thread's working memory, kept for its whole life.
                    let mut memory = Vec::new();
                    loop {
                        let next = match queue.lock() {
                            Ok(queue) => queue.recv(),
                            Err(poisoned) => poisoned.into_inner().recv(),
                        };
                        let Ok(check) = next else {
                            return;
                        };
                        let ok = verify_with(&mut memory, &check.stored, &check.password);
                        let _ = check.answer.send(ok);
                    }
                });
            if let Err(err) = spawned {
                tracing::error!(%err, "cannot start a password-check thread");
            }
        }
        Self {
            checks: std::sync::Mutex::new(checks),
        }
    }

    /// False for a wrong password, and when no check thread could take it.
    pub async fn verify(&self, stored: String, password: String) -> bool {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let sent = match self.checks.lock() {
            Ok(checks) => checks.send(Check {
                stored,
                password,
                answer,
            }),
            Err(poisoned) => poisoned.into_inner().send(Check {
                stored,
                password,
                answer,
            }),
        };
        sent.is_ok() && answered.await.unwrap_or(false)
    }
}

/// [`verify`] with the caller's working memory: `memory` is grown to the hash's `m` once and
/// used for every later check, so a check allocates nothing. (argon2's own `verify_password`
/// allocates its 19 MiB anew each time, and malloc keeps freed buffers of that size in the
/// thread's arena rather than giving them back.)
pub fn verify_with(memory: &mut Vec<Block>, stored: &str, password: &str) -> bool {
    let parsed = match PasswordHash::new(stored) {
        Ok(parsed) => parsed,
        Err(err) => {
            tracing::error!(%err, "stored password hash is unreadable");
            return false;
        }
    };
    let computed = (|| -> Result<bool, String> {
        let algorithm = Algorithm::try_from(parsed.algorithm).map_err(|e| e.to_string())?;
        let version = parsed
            .version
            .map(Version::try_from)
            .transpose()
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        let params = Params::try_from(&parsed).map_err(|e| e.to_string())?;
        let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
            return Err("no salt or no hash".into());
        };
        let mut salt_buf = [0u8; 64];
        let salt = salt.decode_b64(&mut salt_buf).map_err(|e| e.to_string())?;
        let blocks = params.block_count();
        if memory.len() < blocks {
            memory.resize(blocks, Block::default());
        }
        let mut out = vec![0u8; expected.len()];
        Argon2::new(algorithm, version, params)
            .hash_password_into_with_memory(
                password.as_bytes(),
                salt,
                &mut out,
                &mut memory[..blocks],
            )
            .map_err(|e| e.to_string())?;
        // `Output`'s comparison is constant-time.
        Ok(Output::new(&out).is_ok_and(|out| out == expected))
    })();
    computed.unwrap_or_else(|err| {
        tracing::error!(%err, "stored password hash cannot be checked");
        false
    })
}

/// Runs `hash` on the blocking pool.
pub async fn hash_blocking(password: String) -> Result<String, String> {
    tokio::task::spawn_blocking(move || hash(&password))
        .await
        .map_err(|_| "password hashing was cancelled".to_owned())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_with_kept_memory_agree_with_the_crate() {
        let stored = hash("correct horse").expect("hashed");
        let mut memory = Vec::new();
        assert!(verify_with(&mut memory, &stored, "correct horse"));
        assert!(!verify_with(&mut memory, &stored, "wrong horse"));
        assert!(verify(&stored, "correct horse"));
        let kept = memory.capacity();
        assert!(verify_with(&mut memory, &stored, "correct horse"));
        assert_eq!(
            memory.capacity(),
            kept,
            "the memory is used again, not grown"
        );
        assert!(!verify_with(&mut memory, "not a hash", "x"));
        // Django's older PBKDF2 hashes are not argon2: refused, not a panic.
        assert!(!verify_with(
            &mut memory,
            "pbkdf2_sha256$260000$salt$hash",
            "x"
        ));
    }
}
