//! Who is calling: the `Authorization: Bearer <access token>` header, checked against the
//! verification keys, which are either configured (shared secret / public keys) or auth-service's
//! JWKS, fetched over HTTP, cached, and fetched again (rate-limited) when a token names an unknown
//! `kid` or the cache is old. Errors say what is wrong in words a person can act on.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::jwt::{Claims, TokenError, TokenType, VerificationKeys};
use crate::revocations::RevokedBefore;

/// Why a request is not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("Authorization header is missing: send `Authorization: Bearer <access token>`")]
    MissingHeader,
    #[error("Authorization header is malformed: expected `Bearer <access token>`")]
    NotBearer,
    #[error("{0}")]
    Token(TokenError),
    #[error(
        "tokens cannot be verified right now: the signing keys of auth-service are unavailable"
    )]
    KeysUnavailable,
}

/// The token of an `Authorization` header value: scheme `Bearer` (any case), one space-separated
/// token.
pub fn bearer_token(header: Option<&str>) -> Result<&str, AuthError> {
    let value = header.ok_or(AuthError::MissingHeader)?.trim();
    if value.is_empty() {
        return Err(AuthError::MissingHeader);
    }
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::NotBearer)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.contains(' ') {
        return Err(AuthError::NotBearer);
    }
    Ok(token)
}

/// Checks access tokens. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct TokenVerifier {
    source: Source,
    /// Logouts' cutoffs ([`crate::revocations`]); none in a process that does not follow them.
    revoked: Option<Arc<RevokedBefore>>,
}

#[derive(Clone)]
enum Source {
    Static(Arc<VerificationKeys>),
    Jwks(Arc<JwksCache>),
}

/// How the JWKS cache behaves.
#[derive(Debug, Clone)]
pub struct JwksSettings {
    /// e.g. `http://auth-service:8001/api/token/jwks/`
    pub url: String,
    pub leeway_secs: u64,
    /// Least time between two fetches, so that tokens with made-up `kid`s cannot make this
    /// process hammer auth-service.
    pub min_refetch_interval: Duration,
    /// Age after which the key set is fetched again on the next request (a key that auth-service
    /// dropped stops verifying within this time).
    pub max_age: Duration,
}

struct JwksCache {
    settings: JwksSettings,
    keys: RwLock<Option<(Arc<VerificationKeys>, Instant)>>,
    /// Held while fetching (one fetch at a time); holds when the last attempt was made.
    last_attempt: tokio::sync::Mutex<Option<Instant>>,
}

impl TokenVerifier {
    pub fn from_keys(keys: VerificationKeys) -> Self {
        Self {
            source: Source::Static(Arc::new(keys)),
            revoked: None,
        }
    }

    /// A verifier over auth-service's JWKS. Tries one fetch now; when auth-service is not up yet
    /// the process starts anyway and fetches on the first request.
    pub async fn from_jwks(settings: JwksSettings) -> Self {
        let cache = Arc::new(JwksCache {
            settings,
            keys: RwLock::new(None),
            last_attempt: tokio::sync::Mutex::new(None),
        });
        cache.refresh(Duration::ZERO).await;
        Self {
            source: Source::Jwks(cache),
            revoked: None,
        }
    }

    /// Seconds a token is still accepted after its `exp`: a socket stays open as long as an HTTP
    /// request with the same token would be served.
    pub fn leeway_secs(&self) -> u64 {
        match &self.source {
            Source::Static(keys) => keys.leeway_secs(),
            Source::Jwks(cache) => cache.settings.leeway_secs,
        }
    }

    /// Verifies the `Authorization` header value as an access token.
    pub async fn authenticate(&self, header: Option<&str>) -> Result<Claims, AuthError> {
        let token = bearer_token(header)?;
        self.verify_access(token).await
    }

    /// Refuses tokens issued before their user's logout, as `list` knows them.
    pub fn with_revocations(mut self, list: Arc<RevokedBefore>) -> Self {
        self.revoked = Some(list);
        self
    }

    /// The logout cutoffs this verifier refuses tokens by, if it follows them.
    pub fn revocations(&self) -> Option<&Arc<RevokedBefore>> {
        self.revoked.as_ref()
    }

    /// Whether `claims`, accepted before, are revoked by now (the gateway asks again for each
    /// open socket when a cutoff is raised).
    pub fn is_revoked(&self, claims: &Claims) -> bool {
        self.revoked
            .as_ref()
            .is_some_and(|list| list.is_revoked(claims))
    }

    pub async fn verify_access(&self, token: &str) -> Result<Claims, AuthError> {
        let claims = match &self.source {
            Source::Static(keys) => keys
                .verify(token, TokenType::Access)
                .map_err(AuthError::Token),
            Source::Jwks(cache) => cache.verify(token).await,
        }?;
        if self.is_revoked(&claims) {
            return Err(AuthError::Token(TokenError::Revoked));
        }
        Ok(claims)
    }
}

impl JwksCache {
    fn current(&self) -> Option<(Arc<VerificationKeys>, Instant)> {
        match self.keys.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let mut current = self.current();
        match &current {
            // No keys yet (auth-service was down at start): this request waits for a fetch.
            None => {
                self.refresh(self.settings.min_refetch_interval).await;
                current = self.current();
            }
            // Old keys: refresh unless a fetch is under way, in which case the old keys serve
            // meanwhile, so a slow auth-service never holds requests up.
            Some((_, fetched)) if fetched.elapsed() >= self.settings.max_age => {
                if let Ok(last_attempt) = self.last_attempt.try_lock() {
                    drop(last_attempt);
                    self.refresh(self.settings.min_refetch_interval).await;
                    current = self.current();
                }
            }
            Some(_) => {}
        }
        let Some((keys, _)) = current else {
            return Err(AuthError::KeysUnavailable);
        };
        match keys.verify(token, TokenType::Access) {
            Err(TokenError::UnknownKey) => {
                // A new key after a rotation, or a made-up kid; the refetch is rate-limited.
                if !self.refresh(self.settings.min_refetch_interval).await {
                    return Err(AuthError::Token(TokenError::UnknownKey));
                }
                let (keys, _) = self.current().ok_or(AuthError::KeysUnavailable)?;
                keys.verify(token, TokenType::Access)
                    .map_err(AuthError::Token)
            }
            other => other.map_err(AuthError::Token),
        }
    }

    /// Fetches the key set unless an attempt was made within `min_interval`. Returns whether the
    /// keys were fetched (by this call, or by a concurrent one it waited for).
    async fn refresh(&self, min_interval: Duration) -> bool {
        let requested = Instant::now();
        let mut last_attempt = self.last_attempt.lock().await;
        if let Some(at) = *last_attempt {
            if at >= requested {
                // Another request fetched while this one waited for the lock.
                return true;
            }
            if at.elapsed() < min_interval {
                return false;
            }
        }
        *last_attempt = Some(Instant::now());
        match fetch_jwks(&self.settings).await {
            Ok(keys) => {
                let fresh = Some((Arc::new(keys), Instant::now()));
                match self.keys.write() {
                    Ok(mut guard) => *guard = fresh,
                    Err(poisoned) => *poisoned.into_inner() = fresh,
                }
                true
            }
            Err(err) => {
                tracing::warn!(url = %self.settings.url, %err, "cannot fetch the JWKS; keeping the cached keys");
                false
            }
        }
    }
}

/// Largest JWKS document accepted.
const JWKS_MAX_BYTES: usize = 64 * 1024;

async fn fetch_jwks(settings: &JwksSettings) -> Result<VerificationKeys, String> {
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(5))
        .finish();
    let mut response = client
        .get(&settings.url)
        .insert_header(("Accept", "application/json"))
        .send()
        .await
        .map_err(|err| err.to_string())?;
    if !response.status().is_success() {
        return Err(format!("status {}", response.status()));
    }
    let body = response
        .body()
        .limit(JWKS_MAX_BYTES)
        .await
        .map_err(|err| err.to_string())?;
    let document: serde_json::Value =
        serde_json::from_slice(&body).map_err(|err| format!("not JSON: {err}"))?;
    VerificationKeys::from_jwks(&document, settings.leeway_secs)
}

/// The verifier of a service that never signs: auth-service's JWKS when `JWKS_URL` is set (no
/// secret or private key needed then), else the `JWT_*` settings, verification side only. Warns
/// when the demo secret is in use.
pub async fn verifier_from_args(
    jwt: &crate::settings::JwtArgs,
    jwks: &crate::settings::JwksArgs,
    policy: crate::jwt::SecretPolicy,
) -> Result<TokenVerifier, service_kit::config::ConfigError> {
    use service_kit::config::ConfigError;
    if let Some(url) = &jwks.jwks_url {
        if url.starts_with("https://") {
            // awc is built without TLS: the JWKS is fetched inside the deployment's network.
            return Err(ConfigError::new(
                "JWKS_URL",
                "https is not supported; use auth-service's internal http:// address",
            ));
        }
        if !url.starts_with("http://") {
            return Err(ConfigError::new("JWKS_URL", "must be an http:// URL"));
        }
        return Ok(TokenVerifier::from_jwks(JwksSettings {
            url: url.clone(),
            leeway_secs: jwt.jwt_leeway_secs,
            min_refetch_interval: Duration::from_secs(jwks.jwks_min_refetch_secs),
            max_age: Duration::from_secs(jwks.jwks_max_age_secs),
        })
        .await);
    }
    let (keys, uses_demo_secret) = crate::jwt::verification_keys_from_args(jwt, policy)?;
    if uses_demo_secret {
        tracing::warn!(
            "demo mode: tokens are verified with the built-in demo secret, which anyone can read \
             in the source; set JWT_SECRET (or JWKS_URL) for any real use"
        );
    }
    Ok(TokenVerifier::from_keys(keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_header_forms() {
        assert_eq!(bearer_token(None), Err(AuthError::MissingHeader));
        assert_eq!(bearer_token(Some("  ")), Err(AuthError::MissingHeader));
        assert_eq!(bearer_token(Some("Token abc")), Err(AuthError::NotBearer));
        assert_eq!(bearer_token(Some("abc")), Err(AuthError::NotBearer));
        assert_eq!(bearer_token(Some("Bearer ")), Err(AuthError::NotBearer));
        assert_eq!(bearer_token(Some("Bearer a b")), Err(AuthError::NotBearer));
        assert_eq!(bearer_token(Some("Bearer abc")), Ok("abc"));
        assert_eq!(bearer_token(Some("bearer  abc ")), Ok("abc"));
    }
}
