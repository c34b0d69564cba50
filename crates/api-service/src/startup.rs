//! Building and running the server. Tests call [`Application::build`] exactly as `main` does, on
//! port 0, and stop it with a future of their own.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::web;
use events::{EventLog, RedisLog};
use graphql_schema::DocumentLimits;
use service_kit::config::ConfigError;
use service_kit::http::Readiness;
use service_kit::metrics::Metrics;
use store::repository::{OutboxConfig, Store};
use tokens::auth::TokenVerifier;
use tokens::jwt::SecretPolicy;
use tokens::revocations::RevokedBefore;

use crate::routes::{self, ApiState};
use crate::settings::Settings;

pub use service_kit::startup::StartupError;
use service_kit::startup::{serve_until_stopped, Background};

/// How long start-up waits for PostgreSQL before giving up.
const DATABASE_WAIT: Duration = Duration::from_secs(30);

pub struct Application {
    port: u16,
    server: Server,
    store: Store,
    /// Where logouts' cutoffs are read from, for the verifier's copy.
    redis: service_kit::redis::RedisPool,
    key_prefix: String,
    revoked: Arc<RevokedBefore>,
    /// IDEMPOTENCY_WINDOW_HOURS: records older than it are purged.
    idempotency_window: chrono::Duration,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let pool = store::pool(&settings.database);
        let redis = service_kit::redis::pool(&settings.redis)?;
        let metrics = Metrics::new("api-service");
        let bus = Arc::new(event_log(&settings, redis.clone())?);
        let store = store(&settings, pool.clone(), bus, &metrics);
        let revoked = revoked_before(&settings);
        let key_prefix = settings.redis.key_prefix();
        tokens::revocations::load_at_start(&redis, &key_prefix, &revoked).await;
        let persisted = graphql_schema::persisted::PersistedQueries::from_args(
            &settings.persisted,
            Some((redis.clone(), &key_prefix)),
        )?;
        let state = state(&settings, store.clone(), revoked.clone(), persisted).await?;
        if settings.migrate {
            migrate(&settings.database.database_url).await?;
        }
        if settings.demo {
            seed_demo(&pool).await?;
        }
        let readiness = Readiness::default()
            .check("database", store::readiness_probe(pool))
            .redis(redis.clone())
            .check(
                "revocations",
                tokens::revocations::readiness_probe(revoked.clone()),
            );
        let (server, port) = service_kit::startup::http_server(
            "api-service",
            &settings.http,
            state,
            readiness,
            metrics,
            routes::config,
        )?;
        Ok(Self {
            port,
            server,
            store,
            redis,
            key_prefix: settings.redis.key_prefix(),
            revoked,
            idempotency_window: chrono::Duration::hours(settings.idempotency_window_hours as i64),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests finish
    /// (bounded by SHUTDOWN_TIMEOUT_SECS) and stops the outbox relay. Events still in the outbox
    /// are published by the next process that runs a relay.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let mut background = Background::default();
        let store = self.store;
        let pool = store.pool.clone();
        background.spawn_with_stop(|stop| store::repository::run_relay(store, stop));
        let window = self.idempotency_window;
        background.spawn_with_stop(|stop| store::idempotency::run_purge(pool, window, stop));
        let (redis, key_prefix, revoked) = (self.redis, self.key_prefix, self.revoked);
        background
            .spawn_with_stop(|stop| tokens::revocations::poll(redis, key_prefix, revoked, stop));
        serve_until_stopped(self.server, background, shutdown, async {}).await
    }
}

/// The store (database, bus, outbox timing) as `serve` and `trigger-event` use it.
pub fn store(
    settings: &Settings,
    pool: store::DbPool,
    bus: Arc<dyn EventLog>,
    metrics: &Metrics,
) -> Store {
    Store::new(pool, bus, outbox_config(settings), metrics)
}

pub fn outbox_config(settings: &Settings) -> OutboxConfig {
    OutboxConfig {
        relay_interval: Duration::from_millis(settings.outbox_relay_interval_ms),
        lease: Duration::from_secs(settings.outbox_lease_secs),
    }
}

/// What the GraphQL handlers share ([`routes::config`] reads it as app data): the schema with
/// its document limits, the store and the token verifier. Used by [`Application::build`] and by
/// the embedded single-process server. Touches no database.
pub async fn state(
    settings: &Settings,
    store: Store,
    revoked: Arc<RevokedBefore>,
    persisted: graphql_schema::persisted::PersistedQueries,
) -> Result<web::Data<ApiState>, StartupError> {
    let verifier = verifier(settings).await?.with_revocations(revoked);
    let max_body_bytes = usize::try_from(settings.max_body_bytes)
        .map_err(|_| ConfigError::new("MAX_BODY_BYTES", "too large"))?;
    let limits = DocumentLimits {
        max_depth: settings.max_query_depth as usize,
        max_fields: settings.max_query_fields as usize,
        max_tokens: settings.max_query_tokens as usize,
    };
    Ok(web::Data::new(ApiState {
        schema: Arc::new(graphql_schema::schema(limits)),
        store,
        idempotency_window: chrono::Duration::hours(settings.idempotency_window_hours as i64),
        verifier,
        body_limits: settings.http.body_limits(max_body_bytes),
        max_batch_size: settings.max_batch_size,
        max_batch_fields: limits.max_fields,
        playground: settings.playground,
        persisted,
    }))
}

/// The demo user and cars (demo mode).
pub async fn seed_demo(pool: &store::DbPool) -> Result<(), StartupError> {
    store::cars::seed_demo(pool)
        .await
        .map_err(|err| StartupError::Other(format!("cannot create the demo data: {err}")))?;
    tracing::warn!("demo mode: demo user and cars are present");
    Ok(())
}

/// The logout cutoffs this process follows (see [`tokens::revocations`]).
pub fn revoked_before(settings: &Settings) -> Arc<RevokedBefore> {
    RevokedBefore::new(
        settings.jwt.access_token_lifetime_secs,
        settings.jwt.jwt_leeway_secs,
    )
}

/// The token verifier: auth-service's JWKS when JWKS_URL is set (no secret or private key is
/// needed then), else the JWT_* settings, verification side only.
async fn verifier(settings: &Settings) -> Result<TokenVerifier, StartupError> {
    let policy = if settings.demo {
        SecretPolicy::AllowDemoSecret
    } else {
        SecretPolicy::RequireConfigured
    };
    Ok(tokens::auth::verifier_from_args(&settings.jwt, &settings.jwks, policy).await?)
}

pub async fn migrate(database_url: &str) -> Result<(), StartupError> {
    store::migrate_async(database_url, DATABASE_WAIT)
        .await
        .map(|_| ())
        .map_err(StartupError::Other)
}

/// The event logs this service writes, laid out as EVENT_LOG_PARTITIONS says.
pub fn event_log(
    settings: &Settings,
    redis: service_kit::redis::RedisPool,
) -> Result<RedisLog, StartupError> {
    let registry = domain::registry().map_err(StartupError::Other)?;
    Ok(
        RedisLog::new(redis, settings.redis.redis_key_prefix.clone())
            .with_retention(events::Retention::from(&settings.events))
            .partitioned(settings.events.layout.event_log_partitions, registry)
            .acknowledged_by(settings.events.layout.event_log_replica_acks),
    )
}
