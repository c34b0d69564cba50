//! The one server: the three services' routes in one actix app, the outbox relay, the hub over the
//! in-memory log, and the blacklist purge, run until a shutdown signal. Tests call
//! [`Application::build`] on port 0 exactly as `main` does.

use std::future::Future;
use std::sync::Arc;

use actix_web::dev::Server;
use actix_web::http::header;
use actix_web::{guard, web};
use events::MemoryLog;
use service_kit::config::ConfigError;
use service_kit::http::{health_routes, not_found, Readiness};
use service_kit::metrics::Metrics;
use store::repository::Store;
use store::settings::DatabaseArgs;
use store::DbPool;
use subscription_gateway::startup::Sources;
use subscription_gateway::state::GatewayState;
use tokio_util::sync::CancellationToken;

use crate::settings::Settings;

pub use service_kit::startup::StartupError;
use service_kit::startup::{serve_until_stopped, Background};

/// Entries the in-memory log holds for its one follower, the hub, before it lags.
const LOG_CAPACITY: usize = 4096;
/// How long start-up waits for the database.
const DATABASE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Application {
    port: u16,
    server: Server,
    /// Publishes events committed by other processes (and any an inline publish missed).
    store: Store,
    auth: web::Data<auth_service::routes::AuthState>,
    gateway: web::Data<GatewayState>,
    /// Stops the hub's task, after the sockets are closed.
    hub_shutdown: CancellationToken,
}

impl Application {
    pub async fn build(settings: &Settings) -> Result<Self, StartupError> {
        let mut services = settings.services()?;
        let database_url = settings.database_url.clone();
        store::Backend::of_url(&database_url)
            .map_err(|err| ConfigError::new("GQLWS_DATABASE_URL", err))?;
        store::migrate_async(&database_url, DATABASE_WAIT)
            .await
            .map_err(StartupError::Other)?;
        let pool = store::pool(&DatabaseArgs {
            database_url: settings.database_url.clone(),
            ..services.api.database.clone()
        });
        // The demo user `admin`/`letmein` and the cars 1 and 2.
        api_service::startup::seed_demo(&pool).await?;

        let metrics = Metrics::new("gqlws");
        let log =
            MemoryLog::with_retention(LOG_CAPACITY, events::Retention::from(&services.api.events));
        // One process: logouts are recorded where the verifiers read them.
        let revoked = api_service::startup::revoked_before(&services.api);
        let auth = auth_service::startup::state(
            &services.auth,
            auth_service::startup::Backends {
                pool: pool.clone(),
                counters: auth_service::ratelimit::Counters::memory(),
                revocations: auth_service::routes::Revocations {
                    revoked: revoked.clone(),
                    cutoffs: None,
                    log: Arc::new(log.clone()),
                },
            },
            &metrics,
        )
        .await?;
        let store = Store::new(
            pool.clone(),
            Arc::new(log.clone()),
            api_service::startup::outbox_config(&services.api),
            &metrics,
        );
        // One registry of persisted queries in memory, for the API and the gateway alike.
        let persisted =
            graphql_schema::persisted::PersistedQueries::from_args(&services.api.persisted, None)?;
        let api = api_service::startup::state(
            &services.api,
            store.clone(),
            revoked.clone(),
            persisted.clone(),
        )
        .await?;
        let (listener, port) = service_kit::http::bind(settings.listen_addr, "GQLWS_LISTEN_ADDR")?;
        // Queries and mutations sent on the socket go to this same server's /graphql, on
        // loopback when it listens on every address.
        let own_ip = match settings.listen_addr.ip() {
            ip if ip.is_unspecified() && ip.is_ipv4() => std::net::Ipv4Addr::LOCALHOST.into(),
            ip if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
            ip => ip,
        };
        services.gateway.api_internal_url =
            format!("http://{}/graphql", std::net::SocketAddr::new(own_ip, port));
        // Forwarded operations come from this process's own address: without the key, one
        // user's operations would count against every other user's on the per-address limit.
        let forwarding_key = subscription_gateway::forward::new_forwarding_key();
        services.gateway.forwarding_key = Some(forwarding_key.clone());
        let hub_shutdown = CancellationToken::new();
        let gateway = subscription_gateway::startup::state(
            &services.gateway,
            Sources {
                log: Arc::new(log),
                user_counts: None,
            },
            &metrics,
            hub_shutdown.clone(),
            revoked,
            persisted,
        )
        .await?;
        let readiness =
            web::Data::new(Readiness::default().check("database", store::readiness_probe(pool)));
        let metrics = web::Data::new(metrics);
        let address_limit = web::Data::new(
            services
                .api
                .http
                .address_limit()
                .with_forwarding_key(forwarding_key),
        );

        let (auth_data, gateway_data) = (auth.clone(), gateway.clone());
        // Websocket upgrades of `/graphql` go straight to the gateway (as NGINX sends them);
        // everything else to the app, with NGINX's routes.
        let server = subscription_gateway::server::serve(
            listener,
            service_kit::http::ServerOptions::from(&services.api.http),
            gateway.clone(),
            move || {
                // NGINX's rules: `/api/token/…` → auth; `/graphql` → api; subscriptions over
                // SSE and multipart → the gateway. An incomplete websocket upgrade gets the
                // gateway's answer rather than the API's.
                service_kit::service_app!(
                    data: [auth_data, api, gateway_data, readiness, metrics, address_limit],
                    routes: [
                        auth_service::routes::config,
                        subscription_gateway::streamed::routes,
                        websocket_routes,
                        metrics_from_loopback_only,
                        api_service::routes::config,
                        health_routes,
                    ],
                )
            },
        )
        .map_err(|err| StartupError::Other(format!("cannot start the server: {err}")))?;
        tracing::info!(port, "gqlws (embedded) listening");
        Ok(Self {
            port,
            server,
            store,
            auth,
            gateway,
            hub_shutdown,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pool(&self) -> &DbPool {
        &self.store.pool
    }

    /// Serves until `shutdown` resolves, then drains the websockets (1001), stops accepting,
    /// lets in-flight requests finish and stops the background tasks.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let mut background = Background::default();
        let store = self.store;
        background.spawn_with_stop(|stop| store::repository::run_relay(store, stop));
        background.spawn(auth_service::startup::purge_blacklist(self.auth));
        let gateway = self.gateway.clone();
        let stopped = serve_until_stopped(self.server, background, shutdown, async move {
            subscription_gateway::startup::drain(&gateway).await;
        })
        .await;
        self.hub_shutdown.cancel();
        stopped
    }
}

/// `GET /graphql` and `/graphql/` carrying `Upgrade: websocket` that actix-http did not upgrade
/// (no `Connection: upgrade`) get the gateway's explanation.
fn websocket_routes(cfg: &mut web::ServiceConfig) {
    for path in ["/graphql", "/graphql/"] {
        cfg.service(
            web::resource(path)
                .guard(guard::Get())
                .guard(guard::fn_guard(|ctx| {
                    ctx.head()
                        .headers()
                        .get(header::UPGRADE)
                        .and_then(|value| value.to_str().ok())
                        .is_some_and(|value| value.eq_ignore_ascii_case("websocket"))
                }))
                .to(subscription_gateway::startup::not_upgraded),
        );
    }
}

/// This one port is the public one (there is no NGINX in front keeping `/metrics` to private
/// addresses), so `/metrics` answers only clients on this machine; others get the JSON 404.
fn metrics_from_loopback_only(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/metrics")
            .guard(guard::fn_guard(|ctx| {
                !ctx.head()
                    .peer_addr
                    .is_some_and(|addr| addr.ip().is_loopback())
            }))
            .to(not_found),
    );
}

/// What a newcomer needs to follow the walk-through, printed once the server listens.
pub fn banner(settings: &Settings, port: u16) -> String {
    let host = match settings.listen_addr.ip() {
        ip if ip.is_unspecified() || ip.is_loopback() => "localhost".to_owned(),
        ip => ip.to_string(),
    };
    let base = format!("http://{host}:{port}");
    let token = format!(
        "curl -s -X POST -H 'Content-Type: application/json' \
         -d '{{\"username\":\"admin\",\"password\":\"letmein\"}}' {base}/api/token/"
    );
    [
        String::new(),
        "gqlws is running: auth, GraphQL API and subscriptions in one process (embedded mode)"
            .to_owned(),
        format!("  database:   {}", settings.database_url),
        "  event bus:  in memory".to_owned(),
        String::new(),
        "  1. a token for the demo user admin/letmein:".to_owned(),
        format!("     {token}"),
        format!("  2. GraphQL Playground: {base}/graphql/"),
        "     HTTP HEADERS {\"Authorization\": \"Bearer <access>\"}, then run { hi }".to_owned(),
        "  3. subscription { carModelUpdated(pk: 1) { make model } } with the same header, then:"
            .to_owned(),
        "     cargo run --release -- trigger-event".to_owned(),
        String::new(),
        "  Stop with Ctrl-C.".to_owned(),
    ]
    .join("\n")
}

#[cfg(test)]
mod tests {
    use actix_web::test::{call_service, init_service, TestRequest};
    use actix_web::App;

    use super::*;

    #[actix_web::test]
    async fn metrics_answer_only_this_machine() {
        let app = init_service(
            App::new()
                .configure(metrics_from_loopback_only)
                .route("/metrics", web::get().to(|| async { "metrics" })),
        )
        .await;
        for (peer, status) in [
            ("127.0.0.1:5000", 200),
            ("[::1]:5000", 200),
            ("192.0.2.7:5000", 404),
        ] {
            let request = TestRequest::get()
                .uri("/metrics")
                .peer_addr(peer.parse().expect("an address"))
                .to_request();
            assert_eq!(call_service(&app, request).await.status(), status, "{peer}");
        }
    }
}
