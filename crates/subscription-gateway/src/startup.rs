//! Building and running the gateway. Tests call [`Application::build`] exactly as `main` does, on
//! port 0, and stop it with a future of their own.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::dev::Server;
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;
use service_kit::config::ConfigError;
use service_kit::http::{healthz, Tally};
use service_kit::metrics::{self, Metrics};
use tokens::jwt::SecretPolicy;
use tokens::revocations::RevokedBefore;
use tokio_util::sync::CancellationToken;

use crate::executions::Coordinator;
use crate::hub::{Hub, HubParts};
use crate::metrics::GatewayMetrics;
use crate::settings::Settings;
use crate::state::{GatewayState, Shared};

pub use service_kit::startup::StartupError;
use service_kit::startup::{serve_until_stopped, Background};

pub struct Application {
    port: u16,
    server: Server,
    state: web::Data<GatewayState>,
    /// Stops the hub's Redis task, after the sockets are closed.
    hub_shutdown: CancellationToken,
    /// The revocation poll, stopped after the server.
    background: Background,
    health: Option<crate::health::HealthServer>,
}

/// What the gateway shares with other processes: the event log the hub follows (Redis, or the
/// in-memory log of the embedded mode; everything downstream of the hub is the same), and where
/// each user's sockets are counted across replicas (none in one process).
pub struct Sources {
    pub log: Arc<dyn events::EventLog>,
    pub user_counts: Option<(service_kit::redis::RedisPool, String)>,
}

/// The gateway's shared state: token verifier, the hub on `source` (its task stops when
/// `hub_shutdown` is cancelled), the schema and the connection limits. Used by
/// [`Application::build`] and by the embedded single-process server.
pub async fn state(
    settings: &Settings,
    sources: Sources,
    metrics: &Metrics,
    hub_shutdown: CancellationToken,
    revoked: Arc<RevokedBefore>,
    persisted: graphql_schema::persisted::PersistedQueries,
) -> Result<web::Data<GatewayState>, StartupError> {
    let policy = if settings.demo {
        SecretPolicy::AllowDemoSecret
    } else {
        SecretPolicy::RequireConfigured
    };
    let verifier = tokens::auth::verifier_from_args(&settings.jwt, &settings.jwks, policy)
        .await?
        .with_revocations(revoked.clone());
    let limits = settings.document_limits();
    let gateway_metrics = GatewayMetrics::register(metrics);
    let buffer = settings.fanout_buffer as usize;
    // A domain type registered twice would mix two types in one log: refused before serving.
    let registry = domain::registry().map_err(StartupError::Other)?;
    let users = crate::user_sockets::UserSockets::new(
        usize::try_from(settings.max_connections_per_user).unwrap_or(0),
        sources.user_counts,
    );
    users.spawn_renewal(hub_shutdown.clone());
    let parts = HubParts {
        registry,
        buffer,
        metrics: gateway_metrics.clone(),
        revoked,
        overload_lag: Duration::from_millis(settings.overload_lag_ms),
    };
    let hub = Hub::start(sources.log, parts, hub_shutdown);
    let pressure = Arc::new(crate::pressure::Pressure::new(
        Duration::from_millis(settings.overload_lag_ms),
        settings.upgrades_per_sec_while_lagging,
    ));
    let shared = Arc::new(Shared {
        coordinator: Arc::new(Coordinator::new(graphql_schema::schema(limits))),
        schema: Arc::new(graphql_schema::schema(limits)),
        users,
        verifier,
        hub,
        executions: Arc::new(crate::executions::Executions::new(
            gateway_metrics.clone(),
            settings.fanout_buffer as usize,
            pressure.clone(),
        )),
        pressure,
        limits: settings.connection_limits(),
        metrics: gateway_metrics.clone(),
        shutdown: CancellationToken::new(),
        replays: crate::replays::Replays::new(settings.replay_limits(), gateway_metrics.clone()),
        upstream: crate::forward::Upstream::new(&settings.api_internal_url)
            .map_err(|err| ConfigError::new("API_INTERNAL_URL", err))?
            .with_forwarding_key(settings.forwarding_key.clone()),
        persisted,
    });
    Ok(web::Data::new(GatewayState {
        shared,
        max_frame_bytes: settings.max_frame_bytes as usize,
        addresses: Tally::new(usize::try_from(settings.max_connections_per_address).unwrap_or(0)),
        trust_forwarded_for: settings.http.trust_forwarded_for,
        drain_timeout: Duration::from_secs(settings.drain_timeout_secs),
        send_buffer_bytes: settings.socket_send_buffer_bytes as usize,
    }))
}

/// Starts the drain: new upgrades get 503, every socket is closed with 1001; waits until they
/// are closed, at most DRAIN_TIMEOUT_SECS.
pub async fn drain(state: &GatewayState) {
    let metrics = &state.shared.metrics;
    tracing::info!(
        open = metrics.connections_open.get(),
        "draining websocket connections"
    );
    state.shared.shutdown.cancel();
    let deadline = Instant::now() + state.drain_timeout;
    while metrics.connections_open.get() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = metrics.connections_open.get();
    if left > 0 {
        tracing::warn!(
            left,
            "drain timeout reached; stopping with sockets still open"
        );
    }
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let metrics = Metrics::new("subscription-gateway");
        let hub_shutdown = CancellationToken::new();
        let redis = service_kit::redis::pool(&settings.redis)?;
        let registry = domain::registry().map_err(StartupError::Other)?;
        let log = events::RedisLog::from_args(redis.clone(), &settings.redis)
            .map_err(|err| ConfigError::new("REDIS_URL", err))?
            .partitioned(settings.layout.event_log_partitions, registry);
        let key_prefix = settings.redis.key_prefix();
        let sources = Sources {
            log: Arc::new(log),
            user_counts: Some((redis.clone(), key_prefix.clone())),
        };
        let revoked = RevokedBefore::new(
            settings.jwt.access_token_lifetime_secs,
            settings.jwt.jwt_leeway_secs,
        );
        tokens::revocations::load_at_start(&redis, &key_prefix, &revoked).await;
        let persisted = graphql_schema::persisted::PersistedQueries::from_args(
            &settings.persisted,
            Some((redis.clone(), &key_prefix)),
        )?;
        let state = state(
            &settings,
            sources,
            &metrics,
            hub_shutdown.clone(),
            revoked.clone(),
            persisted,
        )
        .await?;
        // Logouts' cutoffs, read from Redis until the server stops.
        let mut background = Background::default();
        background
            .spawn_with_stop(|stop| tokens::revocations::poll(redis, key_prefix, revoked, stop));
        let metrics = web::Data::new(metrics);
        let address_limit = web::Data::new(settings.http.address_limit());

        let (listener, port) = service_kit::http::bind(settings.http.listen_addr, "LISTEN_ADDR")?;
        let server_state = state.clone();
        let server = crate::server::serve(
            listener,
            service_kit::http::ServerOptions {
                shutdown_timeout_secs: settings.drain_timeout_secs.max(1),
                ..service_kit::http::ServerOptions::from(&settings.http)
            },
            state.clone(),
            move || {
                service_kit::service_app!(
                    data: [server_state, metrics, address_limit],
                    routes: [crate::streamed::routes, routes],
                )
            },
        )
        .map_err(|err| StartupError::Other(format!("cannot start the server: {err}")))?;
        let health = match settings.health_listen_addr {
            Some(addr) => {
                let (listener, health_port) = service_kit::http::bind(addr, "HEALTH_LISTEN_ADDR")?;
                let health =
                    crate::health::HealthServer::spawn(listener, state.clone()).map_err(|err| {
                        StartupError::Other(format!("cannot start the health listener: {err}"))
                    })?;
                tracing::info!(port = health_port, "health probes served apart");
                Some(health)
            }
            None => None,
        };
        tracing::info!(port, "subscription-gateway listening");
        Ok(Self {
            port,
            server,
            state,
            hub_shutdown,
            background,
            health,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The port of the health listener (HEALTH_LISTEN_ADDR), when there is one.
    pub fn health_port(&self) -> Option<u16> {
        self.health.as_ref().map(crate::health::HealthServer::port)
    }

    /// Serves until `shutdown` resolves, then drains: new upgrades get 503, every socket is closed
    /// with 1001 (clients reconnect, through the load balancer, to another gateway), and the
    /// process waits for them at most DRAIN_TIMEOUT_SECS before it stops.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let state = self.state.clone();
        let stopped = serve_until_stopped(self.server, self.background, shutdown, async move {
            drain(&state).await
        })
        .await;
        self.hub_shutdown.cancel();
        if let Some(health) = &self.health {
            health.stop();
        }
        stopped
    }
}

/// The gateway's own routes besides the streamed subscriptions: what a `GET /graphql` that was
/// not upgraded gets, and its health and metrics.
fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/graphql", web::get().to(not_upgraded))
        .route("/graphql/", web::get().to(not_upgraded))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics::handler));
}

/// `GET /graphql` that actix-http did not hand to the upgrade service ([`crate::server`]): either
/// no websocket upgrade at all (426, with what to do instead) or an incomplete one, e.g.
/// `Upgrade: websocket` without `Connection: upgrade` (400).
pub async fn not_upgraded(req: HttpRequest) -> HttpResponse {
    let wants_websocket = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if wants_websocket {
        let detail = match actix_http::ws::verify_handshake(req.head()) {
            Err(err) => format!("invalid websocket upgrade: {err}"),
            // Complete, yet not upgraded: the `Connection` header lacks `upgrade`.
            Ok(()) => "invalid websocket upgrade: `Connection: upgrade` is required".to_owned(),
        };
        return HttpResponse::BadRequest().json(json!({"detail": detail, "code": "bad_handshake"}));
    }
    HttpResponse::build(actix_web::http::StatusCode::UPGRADE_REQUIRED)
        .insert_header((header::UPGRADE, "websocket"))
        .json(json!({
            "detail": "this endpoint serves GraphQL over websockets only \
                       (graphql-transport-ws or graphql-ws); for plain HTTP, send \
                       queries and mutations to the API",
            "code": "upgrade_required",
        }))
}

/// `GET /readyz`: ready while the Redis event connection is up, once the logout cutoffs
/// written before the start have been read, and not while draining.
async fn readyz(state: web::Data<GatewayState>) -> HttpResponse {
    match crate::health::readiness(&state) {
        (true, body) => HttpResponse::Ok().json(body),
        (false, body) => HttpResponse::ServiceUnavailable().json(body),
    }
}
