//! Building and running the server. Tests call [`Application::build`] exactly as `main` does, on
//! port 0, and stop it with a future of their own.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::web;
use service_kit::config::ConfigError;
use service_kit::http::Readiness;
use service_kit::metrics::Metrics;
use store::DbPool;
use tokens::jwt::{JwtKeys, SecretPolicy};
use tokens::revocations::RevokedBefore;

use crate::ratelimit::{Counters, LoginLimiter};
use crate::routes::{self, AuthState, LoginGate, Revocations};
use crate::settings::Settings;

pub use service_kit::startup::StartupError;
use service_kit::startup::{serve_until_stopped, Background};

/// How long start-up waits for PostgreSQL before giving up.
const DATABASE_WAIT: Duration = Duration::from_secs(30);

pub struct Application {
    port: u16,
    server: Server,
    state: web::Data<AuthState>,
    redis: service_kit::redis::RedisPool,
    key_prefix: String,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let pool = store::pool(&settings.database);
        let redis = service_kit::redis::pool(&settings.redis)?;
        let metrics = Metrics::new("auth-service");
        let revoked = RevokedBefore::new(
            settings.jwt.access_token_lifetime_secs,
            settings.jwt.jwt_leeway_secs,
        );
        let backends = Backends {
            pool: pool.clone(),
            counters: Counters::Redis(redis.clone()),
            revocations: Revocations {
                revoked: revoked.clone(),
                cutoffs: Some(redis.clone()),
                log: Arc::new(events::RedisLog::new(
                    redis.clone(),
                    settings.redis.redis_key_prefix.clone(),
                )),
            },
        };
        tokens::revocations::load_at_start(&redis, &settings.redis.key_prefix(), &revoked).await;
        let state = state(&settings, backends, &metrics).await?;
        if settings.migrate {
            migrate(&settings.database.database_url).await?;
        }
        if settings.demo {
            crate::users::ensure_demo_user(&pool)
                .await
                .map_err(StartupError::Other)?;
        }
        let readiness = Readiness::default()
            .check("database", store::readiness_probe(pool))
            .redis(redis.clone())
            .check("revocations", tokens::revocations::readiness_probe(revoked));
        let (server, port) = service_kit::startup::http_server(
            "auth-service",
            &settings.http,
            state.clone(),
            readiness,
            metrics,
            routes::config,
        )?;
        Ok(Self {
            port,
            server,
            state,
            redis,
            key_prefix: settings.redis.key_prefix(),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests finish
    /// (bounded by SHUTDOWN_TIMEOUT_SECS) and stops the background purge of the blacklist.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let mut background = Background::default();
        background.spawn(purge_blacklist(self.state.clone()));
        // Logouts answered by other replicas (and `deactivate-user`), for `/api/token/verify/`
        // and the issue time of new tokens.
        let (redis, key_prefix) = (self.redis, self.key_prefix);
        let revoked = self.state.revocations.list().clone();
        background
            .spawn_with_stop(|stop| tokens::revocations::poll(redis, key_prefix, revoked, stop));
        serve_until_stopped(self.server, background, shutdown, async {}).await
    }
}

/// The outside parts auth-service works with: Redis for the distributed stack, this process's
/// memory in the embedded mode.
pub struct Backends {
    pub pool: DbPool,
    pub counters: Counters,
    pub revocations: Revocations,
}

/// Everything the token endpoints share ([`routes::config`] reads it as app data): keys (with
/// the demo-secret warning), the limiter and the metrics. Touches no database, so a bad setting
/// is reported before any wait for one. Used by
/// [`Application::build`] and by the embedded single-process server.
pub async fn state(
    settings: &Settings,
    backends: Backends,
    metrics: &Metrics,
) -> Result<web::Data<AuthState>, StartupError> {
    let policy = if settings.demo {
        SecretPolicy::AllowDemoSecret
    } else {
        SecretPolicy::RequireConfigured
    };
    let (keys, uses_demo_secret) = JwtKeys::from_args(&settings.jwt, policy)?;
    if uses_demo_secret {
        tracing::warn!(
            "demo mode: tokens are signed with the built-in demo secret, which anyone can read \
             in the source; set JWT_SECRET (or JWT_ALGORITHM=EdDSA) for any real use"
        );
    }
    if settings.max_body_bytes == 0 {
        return Err(ConfigError::new("MAX_BODY_BYTES", "must be greater than 0").into());
    }
    let tokens_issued = metrics.counter_vec(
        "auth_tokens_issued_total",
        "Tokens issued, by token type.",
        &["type"],
    );
    let login_failures = metrics.counter_vec(
        "auth_login_failures_total",
        "Refused logins, by reason.",
        &["reason"],
    );
    let limiter_errors = metrics.counter_vec(
        "auth_ratelimit_redis_errors_total",
        "Redis errors of the login rate limiter (while failing, logins are not limited) and of revocation announcements.",
        &["operation"],
    );
    let dummy_hash = crate::passwords::hash_blocking(tokens::jwt::new_jti())
        .await
        .map_err(StartupError::Other)?;
    Ok(web::Data::new(AuthState {
        pool: backends.pool,
        keys: Arc::new(keys),
        limiter: LoginLimiter {
            counters: backends.counters,
            key_prefix: settings.redis.key_prefix(),
            max_per_user: settings.login_max_failures_per_user,
            max_per_address: settings.login_max_failures_per_address,
            window_secs: settings.login_failure_window_secs,
            errors: limiter_errors,
        },
        login_gate: LoginGate::new(
            match settings.login_concurrency {
                0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
                n => n,
            },
            settings.login_queue,
        ),
        revocations: backends.revocations,
        access_lifetime_secs: lifetime(settings.jwt.access_token_lifetime_secs)?,
        refresh_lifetime_secs: lifetime(settings.jwt.refresh_token_lifetime_secs)?,
        rotate_refresh_tokens: settings.rotate_refresh_tokens,
        blacklist_after_rotation: settings.blacklist_after_rotation,
        body_limits: settings.http.body_limits(settings.max_body_bytes),
        trust_forwarded_for: settings.http.trust_forwarded_for,
        dummy_hash,
        tokens_issued,
        login_failures,
    }))
}

async fn migrate(database_url: &str) -> Result<(), StartupError> {
    store::migrate_async(database_url, DATABASE_WAIT)
        .await
        .map(|_| ())
        .map_err(StartupError::Other)
}

fn lifetime(secs: u64) -> Result<i64, StartupError> {
    i64::try_from(secs).map_err(|_| {
        StartupError::Config(ConfigError::new("TOKEN_LIFETIME", "lifetime is too large"))
    })
}

/// Expired tokens need no blacklist entry (they fail on `exp`), so the table is kept small.
pub async fn purge_blacklist(state: web::Data<AuthState>) {
    let mut interval = tokio::time::interval(Duration::from_secs(3600));
    loop {
        interval.tick().await;
        match store::blacklist::purge_expired(&state.pool).await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "purged expired blacklist entries"),
            Err(err) => tracing::warn!(%err, "cannot purge expired blacklist entries"),
        }
    }
}
