//! HTTP pieces every service uses: the JSON body reader with its limits and DRF-shaped errors, and
//! the health endpoints.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt as _;
use serde_json::{json, Map, Value};

use crate::config::ConfigError;
use crate::db::{self, DbPool};
use crate::error::ApiError;
use crate::redis::{self, RedisPool};

/// Reads a JSON object body, refusing a wrong content type, a body over `limit` bytes (413, checked
/// against `Content-Length` first and then while streaming, so an oversized body is never buffered
/// whole), malformed JSON, and JSON that is not an object.
pub async fn read_json_object(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Map<String, Value>, ApiError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    if !(mime.eq_ignore_ascii_case("application/json") || mime.ends_with("+json")) {
        let shown = if mime.is_empty() { "none" } else { mime };
        return Err(ApiError::BadRequest {
            detail: format!(
                "Unsupported media type \"{shown}\" in request; send Content-Type: application/json."
            ),
            code: "unsupported_media_type",
        });
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|err| ApiError::BadRequest {
            detail: format!("Could not read the request body: {err}"),
            code: "bad_request",
        })?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    let value: Value = serde_json::from_slice(&body).map_err(|err| ApiError::BadRequest {
        detail: format!("JSON parse error - {err}"),
        code: "parse_error",
    })?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(ApiError::field(
            "non_field_errors",
            &format!(
                "Invalid data. Expected a dictionary, but got {}.",
                json_type_name(&other)
            ),
        )),
    }
}

/// Takes the named string fields out of a JSON object, with DRF's messages for each field that is
/// missing, null, blank or not a string; all faulty fields are reported at once.
pub fn required_strings<const N: usize>(
    body: &Map<String, Value>,
    names: [&str; N],
) -> Result<[String; N], ApiError> {
    let mut errors = std::collections::BTreeMap::new();
    let mut values: [String; N] = std::array::from_fn(|_| String::new());
    for (slot, name) in values.iter_mut().zip(names) {
        let message = match body.get(name) {
            None => "This field is required.",
            Some(Value::Null) => "This field may not be null.",
            Some(Value::String(s)) if s.trim().is_empty() => "This field may not be blank.",
            Some(Value::String(s)) => {
                *slot = s.clone();
                continue;
            }
            Some(_) => "Not a valid string.",
        };
        errors.insert(name.to_owned(), vec![message.to_owned()]);
    }
    if errors.is_empty() {
        Ok(values)
    } else {
        Err(ApiError::FieldErrors(errors))
    }
}

fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

/// What `/readyz` checks; a service registers the dependencies it has.
#[derive(Clone, Default)]
pub struct Readiness {
    pub database: Option<DbPool>,
    pub redis: Option<RedisPool>,
}

const READINESS_TIMEOUT: Duration = Duration::from_secs(3);

/// `GET /healthz`: the process is alive and serving.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// `GET /readyz`: 200 when every dependency answers, else 503 naming the one that does not.
pub async fn readyz(readiness: web::Data<Readiness>) -> HttpResponse {
    let mut checks = Map::new();
    let mut ready = true;
    if let Some(pool) = &readiness.database {
        let outcome = tokio::time::timeout(READINESS_TIMEOUT, db::ping(pool)).await;
        let status = match outcome {
            Ok(Ok(())) => "ok".to_owned(),
            Ok(Err(err)) => err.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        ready &= status == "ok";
        checks.insert("database".into(), Value::String(status));
    }
    if let Some(pool) = &readiness.redis {
        let status = match redis::ping(pool).await {
            Ok(()) => "ok".to_owned(),
            Err(err) => err.to_string(),
        };
        ready &= status == "ok";
        checks.insert("redis".into(), Value::String(status));
    }
    let body = json!({"status": if ready { "ready" } else { "not ready" }, "checks": checks});
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// The JSON 404 every service answers for an unknown path.
pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound)
}

/// Registers `/healthz`, `/readyz` and `/metrics`.
pub fn health_routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(crate::metrics::handler));
}

/// Pending connections the kernel queues for `accept` (capped by `net.core.somaxconn`). Rust's
/// `TcpListener::bind` asks for 128, which a burst of reconnects overflows: the kernel then drops
/// SYNs and each dropped client waits a second for its retransmission (measured with loadgen:
/// handshake p99 over 1 s at 20,000 new sockets/s). A gateway whose neighbour died sees exactly
/// such a burst.
const LISTEN_BACKLOG: i32 = 4096;

/// Binds the listening socket and reports its port (the real one when the address says port 0,
/// as tests do). `setting` is the variable the address came from, for the error line.
pub fn bind(addr: SocketAddr, setting: &'static str) -> Result<(TcpListener, u16), ConfigError> {
    let failed =
        |err: std::io::Error| ConfigError::new(setting, format!("cannot listen on {addr}: {err}"));
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(failed)?;
    // As std's bind does: a restarted service can take its port while old connections linger.
    socket.set_reuse_address(true).map_err(failed)?;
    socket.bind(&addr.into()).map_err(failed)?;
    socket.listen(LISTEN_BACKLOG).map_err(failed)?;
    let listener = TcpListener::from(socket);
    let port = listener
        .local_addr()
        .map_err(|err| ConfigError::new(setting, format!("cannot read the bound address: {err}")))?
        .port();
    Ok((listener, port))
}

/// How every service's HTTP server runs.
#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    /// Worker threads; 0 means one per core (actix's default).
    pub workers: usize,
    /// How long a graceful stop waits for in-flight requests.
    pub shutdown_timeout_secs: u64,
}

impl From<&crate::config::HttpArgs> for ServerOptions {
    fn from(http: &crate::config::HttpArgs) -> Self {
        Self {
            workers: http.http_workers,
            shutdown_timeout_secs: http.shutdown_timeout_secs,
        }
    }
}

/// Starts an `HttpServer` on a listener with [`ServerOptions`]: `start_server!(server, listener,
/// options)` gives `std::io::Result<actix_web::dev::Server>`. actix's own signal handling is off:
/// each service stops when the shutdown future given to its `run_until_stopped` resolves, so tests
/// can stop it too. A macro rather than a function because `HttpServer`'s methods sit behind
/// bounds on actix-service and actix-http types, which would make those crates dependencies here.
#[macro_export]
macro_rules! start_server {
    ($server:expr, $listener:expr, $options:expr) => {{
        let options: $crate::http::ServerOptions = $options;
        let server = $server
            .disable_signals()
            .shutdown_timeout(options.shutdown_timeout_secs);
        let server = match options.workers {
            0 => server,
            workers => server.workers(workers),
        };
        server.listen($listener).map(|server| server.run())
    }};
}
