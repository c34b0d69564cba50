//! The one start-up and stop path of every service: the error a start-up ends with, and
//! [`serve_until_stopped`], which runs a server and its background tasks until the shutdown
//! signal and then stops them in order.

use std::future::Future;

use actix_web::dev::Server;
use actix_web::{web, HttpServer};
use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;
use crate::http::HttpArgs;
use crate::http::{health_routes, Readiness};
use crate::metrics::Metrics;

/// Why a service could not start. Configuration errors exit with status 2, the rest with 1.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Other(String),
}

impl StartupError {
    /// How a `main` ends on it: a configuration error's one line and status 2, anything else
    /// `error: …` and status 1.
    pub fn exit(self) -> std::process::ExitCode {
        match self {
            StartupError::Config(err) => err.exit(),
            StartupError::Other(msg) => {
                eprintln!("error: {msg}");
                std::process::ExitCode::FAILURE
            }
        }
    }
}

/// The HTTP server of a service that serves plain HTTP (auth-service, api-service): its routes
/// over `state`, with `/healthz`, `/readyz` (over `readiness`), `/metrics`, the request metrics,
/// the per-address request limit and the JSON 404, bound to `LISTEN_ADDR`. Returns it, not yet
/// running, and the port it listens on.
pub fn http_server<S: Send + Sync + 'static>(
    name: &'static str,
    http: &HttpArgs,
    state: web::Data<S>,
    readiness: Readiness,
    metrics: Metrics,
    routes: fn(&mut web::ServiceConfig),
) -> Result<(Server, u16), StartupError> {
    let readiness = web::Data::new(readiness);
    let metrics = web::Data::new(metrics);
    let address_limit = web::Data::new(http.address_limit());
    let (listener, port) = crate::http::bind(http.listen_addr, "LISTEN_ADDR")?;
    let server = crate::start_server!(
        HttpServer::new(move || {
            crate::service_app!(
                data: [state, readiness, metrics, address_limit],
                routes: [routes, health_routes],
            )
        }),
        listener,
        crate::http::ServerOptions::from(http)
    )
    .map_err(|err| StartupError::Other(format!("cannot start the server: {err}")))?;
    tracing::info!(port, "{name} listening");
    Ok((server, port))
}

/// The tasks that run beside a server (the outbox relay, the blacklist purge, the revocation
/// poll) and stop after it.
#[derive(Default)]
pub struct Background {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Background {
    /// A task given the stop signal, so that it ends at a point of its choosing (the relay
    /// finishes its pass); it is awaited.
    pub fn spawn_with_stop<F, Fut>(&mut self, task: F)
    where
        F: FnOnce(BoxFuture<'static, ()>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = self.stop.clone();
        self.tasks.push(tokio::spawn(task(Box::pin(async move {
            stop.cancelled().await;
        }))));
    }

    /// A task that may be dropped at any await point when the service stops.
    pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.tasks.push(tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = task => {}
            }
        }));
    }

    async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Serves until `shutdown` resolves; then runs `drain` (the gateway closes its websockets),
/// stops accepting and lets in-flight requests finish (within the server's shutdown timeout),
/// and stops the background tasks.
pub async fn serve_until_stopped(
    server: Server,
    background: Background,
    shutdown: impl Future<Output = ()>,
    drain: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let handle = server.handle();
    let server = tokio::spawn(server);
    shutdown.await;
    drain.await;
    handle.stop(true).await;
    background.stop().await;
    match server.await {
        Ok(result) => result,
        Err(err) => Err(std::io::Error::other(err)),
    }
}
