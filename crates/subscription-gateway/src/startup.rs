//! Building and running the gateway. Tests call [`Application::build`] exactly as `main` does, on
//! port 0, and stop it with a future of their own.

use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::dev::Server;
use actix_web::http::header;
use actix_web::{middleware, web, App, HttpRequest, HttpResponse, HttpServer};
use common::config::ConfigError;
use common::graphql::DocumentLimits;
use common::http::{healthz, not_found};
use common::jwt::SecretPolicy;
use common::metrics::{self, Metrics};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::connection::{self, ConnectionLimits, Coordinator, Shared};
use crate::hub::Hub;
use crate::metrics::GatewayMetrics;
use crate::protocol::{Protocol, LEGACY_WS, TRANSPORT_WS};
use crate::settings::Settings;

/// Why the gateway could not start. Configuration errors exit with status 2, the rest with 1.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Other(String),
}

pub struct Application {
    port: u16,
    server: Server,
    shared: Arc<Shared>,
    /// Stops the hub's Redis task, after the sockets are closed.
    hub_shutdown: CancellationToken,
    drain_timeout: Duration,
}

struct State {
    shared: Arc<Shared>,
    max_frame_bytes: usize,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let policy = if settings.demo {
            SecretPolicy::AllowDemoSecret
        } else {
            SecretPolicy::RequireConfigured
        };
        let verifier =
            common::auth::verifier_from_args(&settings.jwt, &settings.jwks, policy).await?;
        let limits = DocumentLimits {
            max_depth: settings.max_query_depth as usize,
            max_fields: settings.max_query_fields as usize,
            max_tokens: settings.max_query_tokens as usize,
        };
        let metrics = Metrics::new("subscription-gateway");
        let gateway_metrics = GatewayMetrics::register(&metrics);
        let hub_shutdown = CancellationToken::new();
        let hub = Hub::start(
            &settings.redis.redis_url,
            &settings.redis.redis_key_prefix,
            settings.fanout_buffer as usize,
            gateway_metrics.clone(),
            hub_shutdown.clone(),
        )
        .map_err(|err| ConfigError::new("REDIS_URL", err))?;
        let shared = Arc::new(Shared {
            coordinator: Arc::new(Coordinator::new(common::graphql::schema(limits))),
            verifier,
            hub,
            executions: Arc::new(crate::executions::Executions::new(
                gateway_metrics.executions_active.clone(),
            )),
            limits: ConnectionLimits {
                keepalive: Duration::from_secs(settings.keepalive_secs),
                init_timeout: Duration::from_secs(settings.init_timeout_secs),
                max_subscriptions: settings.max_subscriptions_per_connection as usize,
                outbound_queue: settings.outbound_queue as usize,
                write_timeout: Duration::from_secs(settings.write_timeout_secs),
            },
            metrics: gateway_metrics,
            shutdown: CancellationToken::new(),
        });
        let state = web::Data::new(State {
            shared: shared.clone(),
            max_frame_bytes: settings.max_frame_bytes as usize,
        });
        let metrics = web::Data::new(metrics);

        let listener = TcpListener::bind(settings.http.listen_addr).map_err(|err| {
            ConfigError::new(
                "LISTEN_ADDR",
                format!("cannot listen on {}: {err}", settings.http.listen_addr),
            )
        })?;
        let port = listener
            .local_addr()
            .map_err(|err| StartupError::Other(err.to_string()))?
            .port();
        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .app_data(metrics.clone())
                .wrap(middleware::from_fn(metrics::record))
                .route("/graphql", web::get().to(upgrade))
                .route("/graphql/", web::get().to(upgrade))
                .route("/healthz", web::get().to(healthz))
                .route("/readyz", web::get().to(readyz))
                .route("/metrics", web::get().to(metrics::handler))
                .default_service(web::to(not_found))
        })
        .disable_signals()
        .shutdown_timeout(settings.drain_timeout_secs.max(1));
        if settings.http.http_workers > 0 {
            server = server.workers(settings.http.http_workers);
        }
        let server = server
            .listen(listener)
            .map_err(|err| StartupError::Other(format!("cannot start the server: {err}")))?
            .run();
        tracing::info!(port, "subscription-gateway listening");
        Ok(Self {
            port,
            server,
            shared,
            hub_shutdown,
            drain_timeout: Duration::from_secs(settings.drain_timeout_secs),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until `shutdown` resolves, then drains: new upgrades get 503, every socket is closed
    /// with 1001 (clients reconnect, through the load balancer, to another gateway), and the
    /// process waits for them at most DRAIN_TIMEOUT_SECS before it stops.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let handle = self.server.handle();
        let server = tokio::spawn(self.server);
        shutdown.await;
        let open = self.shared.metrics.connections_open.get();
        tracing::info!(open, "draining websocket connections");
        self.shared.shutdown.cancel();
        let deadline = Instant::now() + self.drain_timeout;
        while self.shared.metrics.connections_open.get() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.shared.metrics.connections_open.get();
        if left > 0 {
            tracing::warn!(
                left,
                "drain timeout reached; stopping with sockets still open"
            );
        }
        handle.stop(true).await;
        self.hub_shutdown.cancel();
        match server.await {
            Ok(result) => result,
            Err(err) => Err(std::io::Error::other(err)),
        }
    }
}

/// `GET /graphql`: the websocket upgrade, with the subprotocol negotiated from the client's list.
async fn upgrade(req: HttpRequest, body: web::Payload, state: web::Data<State>) -> HttpResponse {
    let is_upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !is_upgrade {
        return HttpResponse::build(actix_web::http::StatusCode::UPGRADE_REQUIRED)
            .insert_header((header::UPGRADE, "websocket"))
            .json(json!({
                "detail": "this endpoint serves GraphQL subscriptions over websockets \
                           (graphql-transport-ws or graphql-ws); send queries and mutations \
                           with HTTP POST to the API",
                "code": "upgrade_required",
            }));
    }
    let offered: Vec<&str> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .filter_map(|v| v.to_str().ok())
        .collect();
    let Some(protocol) = Protocol::negotiate(&offered.join(",")) else {
        return HttpResponse::BadRequest().json(json!({
            "detail": format!(
                "unsupported or missing websocket subprotocol: offer {TRANSPORT_WS} or {LEGACY_WS} \
                 in Sec-WebSocket-Protocol"
            ),
            "code": "subprotocol_not_acceptable",
            "supported": [TRANSPORT_WS, LEGACY_WS],
        }));
    };
    if state.shared.shutdown.is_cancelled() {
        return HttpResponse::ServiceUnavailable().json(json!({
            "detail": "this gateway is shutting down; reconnect",
            "code": "shutting_down",
        }));
    }
    let header_authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (response, session, messages) =
        match actix_ws::handle_with_protocols(&req, body, &[protocol.name()]) {
            Ok(parts) => parts,
            Err(err) => return actix_web::ResponseError::error_response(err.as_response_error()),
        };
    let messages = messages
        .max_frame_size(state.max_frame_bytes)
        .aggregate_continuations()
        .max_continuation_size(state.max_frame_bytes);
    actix_web::rt::spawn(connection::run(
        state.shared.clone(),
        protocol,
        session,
        messages,
        header_authorization,
    ));
    response
}

/// `GET /readyz`: ready while the Redis subscriber connection is up.
async fn readyz(state: web::Data<State>) -> HttpResponse {
    let (ready, redis) = if state.shared.hub.is_connected() {
        (true, "ok")
    } else {
        (
            false,
            "subscriber connection to Redis is down; reconnecting",
        )
    };
    let draining = state.shared.shutdown.is_cancelled();
    let body = json!({
        "status": if ready && !draining { "ready" } else { "not ready" },
        "checks": {"redis": redis, "draining": draining},
    });
    if ready && !draining {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}
