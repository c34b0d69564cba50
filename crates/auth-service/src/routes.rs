//! The token endpoints: SimpleJWT's request and response shapes, status codes and messages, so
//! that clients written for the reference stack work unchanged.

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{TimeZone, Utc};
use events::{EventLog, Revocation, REVOCATION_EVENT};
use prometheus::IntCounterVec;
use serde_json::json;
use service_kit::error::ApiError;
use service_kit::http::{client_address, read_json_object, required_strings, BodyLimits};
use store::blacklist::{self, BlacklistEntry};
use store::{users, DbPool};
use tokens::jwt::{new_jti, Claims, JwtKeys, TokenError, TokenType};
use tokens::revocations::RevokedBefore;

use crate::passwords;
use crate::ratelimit::LoginLimiter;

/// Where logouts are recorded: this process's copy of the cutoffs, which it refuses tokens by
/// at once; Redis, where every replica reads them ([`tokens::revocations`]), except in the
/// embedded mode, where this process's list is the record; and the event log, whose
/// announcement makes the gateways close the sockets at once.
pub struct Revocations {
    pub revoked: Arc<RevokedBefore>,
    /// Shared by the replicas; `None` in one process.
    pub cutoffs: Option<service_kit::redis::RedisPool>,
    pub log: Arc<dyn EventLog>,
}

impl Revocations {
    /// The cutoffs this process refuses tokens by.
    pub fn list(&self) -> &Arc<RevokedBefore> {
        &self.revoked
    }
}

/// What the handlers share; built once by [`crate::startup::Application::build`].
pub struct AuthState {
    pub pool: DbPool,
    pub keys: Arc<JwtKeys>,
    pub limiter: LoginLimiter,
    /// Bounds the password checks in flight (each holds ~19 MiB and a blocking thread).
    pub login_gate: LoginGate,
    /// Where logouts are recorded, for this process and every replica.
    pub revocations: Revocations,
    pub access_lifetime_secs: i64,
    pub refresh_lifetime_secs: i64,
    pub rotate_refresh_tokens: bool,
    pub blacklist_after_rotation: bool,
    pub body_limits: BodyLimits,
    pub trust_forwarded_for: bool,
    /// A hash of a random password, verified against when the username is unknown so that the
    /// response time does not reveal which usernames exist.
    pub dummy_hash: String,
    pub tokens_issued: IntCounterVec,
    pub login_failures: IntCounterVec,
}

pub fn config(cfg: &mut web::ServiceConfig) {
    // Both spellings are routed: SimpleJWT's URLs end in a slash, and a client that drops it
    // should not get a redirect it cannot follow with a POST body.
    for (path, handler) in [
        ("/api/token", Handler::Obtain),
        ("/api/token/refresh", Handler::Refresh),
        ("/api/token/verify", Handler::Verify),
        ("/api/token/blacklist", Handler::Blacklist),
    ] {
        for path in [path.to_owned(), format!("{path}/")] {
            let resource = web::resource(path).default_service(web::to(method_not_allowed));
            cfg.service(match handler {
                Handler::Obtain => resource.route(web::post().to(obtain)),
                Handler::Refresh => resource.route(web::post().to(refresh)),
                Handler::Verify => resource.route(web::post().to(verify)),
                Handler::Blacklist => resource.route(web::post().to(blacklist)),
            });
        }
    }
    cfg.route("/api/token/jwks", web::get().to(jwks))
        .route("/api/token/jwks/", web::get().to(jwks));
}

/// How many logins this process evaluates at once, and how many may wait for a turn.
///
/// Each password check is an argon2id computation holding about 19 MiB for ~35 ms. Unbounded,
/// 150 parallel logins took the process to 3 GB. At most `checking` run at once, each on one of
/// `checking` threads of their own ([`passwords::CheckThreads`]); up to `waiting` more wait their
/// turn; a login beyond that is refused at once with 503 and `Retry-After: 1`, before any other
/// work is done. Each check thread keeps its 19 MiB of working memory for its life
/// ([`passwords::verify_with`]), so the memory of checks is `checking` × 19 MiB however many
/// logins come: argon2's own verification allocates it anew each time, and glibc keeps freed
/// buffers of that size in the allocating thread's arena, so checks spread over the 40–70 blocking
/// threads of a busy process had left ~19 MiB in each (780 MiB after 80 logins, 60 MiB now;
/// `scripts/bench/attacks.py --only parallel-logins`).
pub struct LoginGate {
    threads: passwords::CheckThreads,
    admitted: std::sync::atomic::AtomicUsize,
    max_admitted: usize,
}

/// A login that passed [`LoginGate::admit`]; its place is freed when dropped.
pub struct Admitted<'a> {
    gate: &'a LoginGate,
}

impl LoginGate {
    pub fn new(checking: usize, waiting: usize) -> Self {
        let checking = checking.max(1);
        Self {
            threads: passwords::CheckThreads::start(checking),
            admitted: std::sync::atomic::AtomicUsize::new(0),
            max_admitted: checking + waiting,
        }
    }

    pub fn admit(&self) -> Option<Admitted<'_>> {
        use std::sync::atomic::Ordering;
        let previous = self.admitted.fetch_add(1, Ordering::AcqRel);
        if previous >= self.max_admitted {
            self.admitted.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Admitted { gate: self })
    }
}

impl Admitted<'_> {
    /// Checks the password on one of the gate's threads, in turn.
    pub async fn verify(&self, stored_hash: String, password: String) -> bool {
        use tracing::Instrument as _;
        // argon2id's cost (and the wait for a check thread) in the login's trace.
        let span = service_kit::telemetry::span(|| tracing::info_span!("password check"));
        self.gate
            .threads
            .verify(stored_hash, password)
            .instrument(span)
            .await
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.gate
            .admitted
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

#[derive(Clone, Copy)]
enum Handler {
    Obtain,
    Refresh,
    Verify,
    Blacklist,
}

async fn method_not_allowed(req: HttpRequest) -> HttpResponse {
    HttpResponse::MethodNotAllowed()
        .insert_header(("Allow", "POST"))
        .json(json!({
            "detail": format!("Method \"{}\" not allowed.", req.method()),
            "code": "method_not_allowed",
        }))
}

/// `POST /api/token/`: username and password in, a refresh and an access token out.
async fn obtain(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AuthState>,
) -> Result<HttpResponse, ApiError> {
    let body = read_json_object(&req, payload, state.body_limits).await?;
    let [username, password] = required_strings(&body, ["username", "password"])?;
    let address = client_address(&req, state.trust_forwarded_for);

    // Admission first: it costs nothing, and a refused login must not touch Redis or a counter.
    let Some(admitted) = state.login_gate.admit() else {
        state.login_failures.with_label_values(&["busy"]).inc();
        return Err(ApiError::Busy { what: "logins" });
    };
    if let Err(limited) = state.limiter.reserve(&username, address).await {
        state
            .login_failures
            .with_label_values(&["rate_limited"])
            .inc();
        return Err(limited);
    }
    let user = match users::find_by_username(&state.pool, username.clone()).await {
        Ok(user) => user,
        Err(err) => {
            state.limiter.not_evaluated(&username, address).await;
            return Err(err.into());
        }
    };
    let stored_hash = user
        .as_ref()
        .map(|u| u.password_hash.clone())
        .unwrap_or_else(|| state.dummy_hash.clone());
    let password_ok = admitted.verify(stored_hash, password).await;
    let user = match user {
        Some(user) if password_ok && user.is_active => user,
        other => {
            let reason = match other {
                Some(user) if password_ok && !user.is_active => "inactive",
                Some(_) => "wrong_password",
                None => "unknown_user",
            };
            state.login_failures.with_label_values(&[reason]).inc();
            return Err(ApiError::NoActiveAccount);
        }
    };
    state.limiter.succeeded(&username, address).await;
    let issued_at = issue_time_ms(&state, user.id);
    let refresh = sign(&state, &user, TokenType::Refresh, issued_at)?;
    let access = sign(&state, &user, TokenType::Access, issued_at)?;
    Ok(HttpResponse::Ok().json(json!({"refresh": refresh.0, "access": access.0})))
}

/// `POST /api/token/refresh/`: a refresh token in, a new access token (and, with rotation, a new
/// refresh token) out. The old refresh token is blacklisted atomically, so of two concurrent
/// refreshes with one token exactly one succeeds, whichever replica serves them.
async fn refresh(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AuthState>,
) -> Result<HttpResponse, ApiError> {
    let claims = token_in_body(&req, payload, &state, "refresh", Some(TokenType::Refresh)).await?;
    let user = users::find_by_id(&state.pool, claims.user_id)
        .await?
        .filter(|u| u.is_active)
        .ok_or(ApiError::from(TokenError::Revoked))?;

    if state.rotate_refresh_tokens && state.blacklist_after_rotation {
        if !blacklist::blacklist(&state.pool, blacklist_entry(&claims)).await? {
            return Err(ApiError::from(TokenError::Revoked));
        }
    } else if blacklist::is_blacklisted(&state.pool, claims.jti.clone()).await? {
        return Err(ApiError::from(TokenError::Revoked));
    }

    let issued_at = issue_time_ms(&state, user.id);
    let access = sign(&state, &user, TokenType::Access, issued_at)?;
    if state.rotate_refresh_tokens {
        let refresh = sign(&state, &user, TokenType::Refresh, issued_at)?;
        Ok(HttpResponse::Ok().json(json!({"access": access.0, "refresh": refresh.0})))
    } else {
        Ok(HttpResponse::Ok().json(json!({"access": access.0})))
    }
}

/// `POST /api/token/verify/`: any valid token of ours (access or refresh, like SimpleJWT's
/// untyped check); a blacklisted refresh token fails.
async fn verify(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AuthState>,
) -> Result<HttpResponse, ApiError> {
    let claims = token_in_body(&req, payload, &state, "token", None).await?;
    let revoked = match claims.token_type {
        TokenType::Access => state.revocations.list().is_revoked(&claims),
        TokenType::Refresh => blacklist::is_blacklisted(&state.pool, claims.jti).await?,
    };
    if revoked {
        return Err(ApiError::from(TokenError::Revoked));
    }
    Ok(HttpResponse::Ok().json(json!({})))
}

/// `POST /api/token/blacklist/`: logs a refresh token out for good, and with it every access
/// token of the user issued so far.
///
/// The cutoff is stored before the refresh token is blacklisted: when Redis cannot take it the
/// answer is 503 and nothing has changed, so the same request can be sent again. A 200 means
/// this process already refuses the access tokens and every other one will within
/// [`tokens::revocations::POLL_INTERVAL`].
async fn blacklist(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AuthState>,
) -> Result<HttpResponse, ApiError> {
    let claims = token_in_body(&req, payload, &state, "refresh", Some(TokenType::Refresh)).await?;
    if blacklist::is_blacklisted(&state.pool, claims.jti.clone()).await? {
        return Err(ApiError::from(TokenError::Revoked));
    }
    if let Err(err) = revoke_access_tokens(
        &state.revocations,
        &state.limiter.key_prefix,
        claims.user_id,
        &claims.jti,
    )
    .await
    {
        state
            .limiter
            .errors
            .with_label_values(&["write_revocation"])
            .inc();
        return Err(ApiError::LogoutUnavailable(err.to_string()));
    }
    // A concurrent logout with the same token may have blacklisted it meanwhile: one of the two
    // is told the token is no longer valid, as SimpleJWT tells it.
    if !blacklist::blacklist(&state.pool, blacklist_entry(&claims)).await? {
        return Err(ApiError::from(TokenError::Revoked));
    }
    Ok(HttpResponse::Ok().json(json!({})))
}

/// Revokes every access token of the user issued up to now (a logout, or `deactivate-user`):
/// the cutoff is stored in Redis for every replica and recorded in this process's list, then
/// announced on the revocation stream so that the gateways close the sockets it covers at
/// once. `jti` names the session that ended, for the logs. An error means the cutoff was not
/// stored and nothing was revoked; a failed announcement only delays the sockets' closing to
/// the gateways' next poll.
pub async fn revoke_access_tokens(
    revocations: &Revocations,
    key_prefix: &str,
    user_id: i64,
    jti: &str,
) -> Result<(), service_kit::redis::RedisError> {
    // Now, not later: a cutoff in the future would refuse the tokens the user gets next.
    let cutoff_ms = tokens::revocations::now_ms();
    let revoked = &revocations.revoked;
    if let Some(pool) = &revocations.cutoffs {
        tokens::revocations::write(pool, key_prefix, user_id, cutoff_ms, revoked.retention_ms())
            .await?;
    }
    revoked.record(user_id, cutoff_ms);
    let message = Revocation {
        user_id,
        jti: jti.to_owned(),
        cutoff_ms,
    };
    let payload = serde_json::to_string(&message).unwrap_or_default();
    if let Err(err) = revocations.log.append(REVOCATION_EVENT, &payload).await {
        tracing::warn!(%err, "cannot announce the revocation; the gateways' poll will find it");
    }
    Ok(())
}

/// `GET /api/token/jwks/`: the public verification keys (none when only HS256 is configured).
async fn jwks(state: web::Data<AuthState>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header(("Cache-Control", "public, max-age=300"))
        .json(state.keys.verification.jwks())
}

/// Reads the JSON body, takes the token from `field` and verifies it (as `expected`, or of either
/// type when `None`).
async fn token_in_body(
    req: &HttpRequest,
    payload: web::Payload,
    state: &AuthState,
    field: &str,
    expected: Option<TokenType>,
) -> Result<Claims, ApiError> {
    let body = read_json_object(req, payload, state.body_limits).await?;
    let [token] = required_strings(&body, [field])?;
    let verification = &state.keys.verification;
    match expected {
        Some(token_type) => verification.verify(&token, token_type),
        None => verification.verify_untyped(&token),
    }
    .map_err(ApiError::from)
}

/// The issue time of the user's new tokens, in unix milliseconds: now, or just after the
/// user's last logout as this process knows it, so that a login in the logout's own
/// millisecond is not caught by it. A cutoff is the clock of the replica that wrote it at the
/// logout, so this is ahead of this clock by no more than the replicas' clock skew plus one
/// millisecond, whatever a user does.
fn issue_time_ms(state: &AuthState, user_id: i64) -> i64 {
    let now = tokens::revocations::now_ms();
    state
        .revocations
        .list()
        .cutoff(user_id)
        .map_or(now, |cutoff| now.max(cutoff.saturating_add(1)))
}

fn sign(
    state: &AuthState,
    user: &users::User,
    token_type: TokenType,
    now_ms: i64,
) -> Result<(String, Claims), ApiError> {
    let now = now_ms.div_euclid(1000);
    let lifetime = match token_type {
        TokenType::Access => state.access_lifetime_secs,
        TokenType::Refresh => state.refresh_lifetime_secs,
    };
    let claims = Claims {
        token_type,
        exp: now + lifetime,
        iat: now,
        iat_ms: Some(now_ms),
        jti: new_jti(),
        user_id: user.id,
        username: user.username.clone(),
        is_staff: user.is_staff,
    };
    let token = state
        .keys
        .signing
        .sign(&claims)
        .map_err(|err| ApiError::Internal(format!("cannot sign token: {err}")))?;
    state
        .tokens_issued
        .with_label_values(&[&token_type.to_string()])
        .inc();
    Ok((token, claims))
}

fn blacklist_entry(claims: &Claims) -> BlacklistEntry {
    BlacklistEntry {
        jti: claims.jti.clone(),
        user_id: claims.user_id,
        expires_at: Utc
            .timestamp_opt(claims.exp, 0)
            .single()
            .unwrap_or_else(Utc::now),
    }
}
