//! HTTP pieces every service uses: the JSON body reader with its limits and DRF-shaped errors, and
//! the health endpoints.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError as _};
use futures_util::future::BoxFuture;
use futures_util::StreamExt as _;
use serde_json::{json, Map, Value};

use crate::config::ConfigError;
use crate::error::ApiError;
use crate::redis::{self, RedisPool};
use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct HttpArgs {
    /// Address to listen on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8001")]
    pub listen_addr: SocketAddr,
    /// Number of HTTP worker threads (0 = one per core).
    #[arg(long, env = "HTTP_WORKERS", default_value_t = 0)]
    pub http_workers: usize,
    /// How long in-flight requests may take to finish after SIGTERM, in seconds.
    #[arg(long, env = "SHUTDOWN_TIMEOUT_SECS", default_value_t = 10)]
    pub shutdown_timeout_secs: u64,
    /// Trust the `X-Forwarded-For` header for the client address (set this only behind a proxy
    /// such as the repo's NGINX, which overwrites it; otherwise clients could spoof it).
    #[arg(long, env = "TRUST_FORWARDED_FOR", default_value_t = false, action = clap::ArgAction::Set)]
    pub trust_forwarded_for: bool,
    /// Longest a client may take to send a request body, in seconds (then 408 and the connection
    /// closes).
    #[arg(long, env = "BODY_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub body_timeout_secs: u64,
    /// Blocking threads (database calls, password checks) of the process, shared by its HTTP
    /// workers; more work waits for one.
    #[arg(long, env = "BLOCKING_THREADS", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub blocking_threads: u64,
    /// Requests one client address may have in flight at once; more get 429.
    #[arg(long, env = "MAX_REQUESTS_PER_ADDRESS", default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_requests_per_address: u64,
}

impl HttpArgs {
    pub fn body_limits(&self, max_bytes: usize) -> BodyLimits {
        BodyLimits {
            max_bytes,
            timeout: std::time::Duration::from_secs(self.body_timeout_secs),
        }
    }

    pub fn address_limit(&self) -> AddressLimit {
        AddressLimit::new(
            usize::try_from(self.max_requests_per_address).unwrap_or(usize::MAX),
            self.trust_forwarded_for,
        )
    }
}

/// How much of a request body a service reads, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_bytes: usize,
    /// From when the handler starts reading to the body's last byte. The server cuts slow heads
    /// itself (after 5 s), but not slow bodies: 19,980 requests that each declared 100 bytes and
    /// sent one held 19,980 descriptors until the process could accept nothing else.
    pub timeout: Duration,
}

/// Reads a whole body: 413 when it exceeds the limit (checked against `Content-Length` first and
/// then while streaming, so an oversized body is never buffered whole), 408 when it has not
/// arrived within the timeout.
pub async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limits: BodyLimits,
) -> Result<web::BytesMut, ApiError> {
    let limit = limits.max_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let read = async {
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
        Ok(body)
    };
    tokio::time::timeout(limits.timeout, read)
        .await
        .unwrap_or(Err(ApiError::BodyTimeout {
            secs: limits.timeout.as_secs(),
        }))
}

/// Reads a JSON object body, refusing a wrong content type, what [`read_body`] refuses,
/// malformed JSON, and JSON that is not an object.
pub async fn read_json_object(
    req: &HttpRequest,
    payload: web::Payload,
    limits: BodyLimits,
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
    let body = read_body(req, payload, limits).await?;
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

/// The client's address: the peer, or with `trust_forwarded_for` the last `X-Forwarded-For`
/// entry (the one the repo's NGINX appends; earlier entries are the client's own claims).
pub fn client_address(req: &HttpRequest, trust_forwarded_for: bool) -> IpAddr {
    client_address_of(
        req.headers(),
        req.peer_addr().map(|addr| addr.ip()),
        trust_forwarded_for,
    )
}

/// [`client_address`] from a request's parts (the gateway's upgrade has no `HttpRequest`).
pub fn client_address_of(
    headers: &header::HeaderMap,
    peer: Option<IpAddr>,
    trust_forwarded_for: bool,
) -> IpAddr {
    let peer = peer.unwrap_or(IpAddr::from([0, 0, 0, 0]));
    if !trust_forwarded_for {
        return peer;
    }
    headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(peer)
}

/// Counts of things in flight per key (requests per address, sockets per user), each bounded by
/// the same maximum. A counted thing holds a [`Counted`] guard, which gives its place back when
/// dropped, whichever way it ends.
pub struct Tally<K: Eq + Hash + Clone> {
    max: usize,
    counts: Mutex<HashMap<K, usize>>,
}

impl<K: Eq + Hash + Clone> Tally<K> {
    /// `max` of 0 means no bound.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// Counts one more for `key`, or `None` when it has the maximum already.
    pub fn enter(self: &Arc<Self>, key: K) -> Option<Counted<K>> {
        let mut counts = lock(&self.counts);
        let count = counts.entry(key.clone()).or_insert(0);
        // A full count is at least 1, so refusing never leaves an empty entry behind.
        if self.max > 0 && *count >= self.max {
            return None;
        }
        *count += 1;
        Some(Counted {
            tally: self.clone(),
            key,
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

/// One counted thing; its place is given back when dropped.
pub struct Counted<K: Eq + Hash + Clone> {
    tally: Arc<Tally<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> Counted<K> {
    /// What is counted: the address or the user this slot belongs to.
    pub fn key(&self) -> &K {
        &self.key
    }
}

impl<K: Eq + Hash + Clone> Drop for Counted<K> {
    fn drop(&mut self) {
        let mut counts = lock(&self.tally.counts);
        if let Some(count) = counts.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// Requests in flight per client address, each service's own (registered as app data; the
/// [`limit_per_address`] middleware applies it). One address cannot hold more than the maximum
/// of requests open at once, however slowly it sends them; the others are answered 429 at once.
pub struct AddressLimit {
    in_flight: Arc<Tally<IpAddr>>,
    trust_forwarded_for: bool,
    /// A secret the process's own gateway sends with the operations it forwards
    /// ([`FORWARDED_BY_HEADER`]): such a request is counted by the client address it names in
    /// `X-Forwarded-For`, not by the gateway's, even where `X-Forwarded-For` is not trusted.
    forwarding_key: Option<Arc<str>>,
}

/// The header that carries [`AddressLimit`]'s forwarding key.
pub const FORWARDED_BY_HEADER: &str = "x-gateway-forwarding-key";

impl AddressLimit {
    pub fn new(max: usize, trust_forwarded_for: bool) -> Self {
        Self {
            in_flight: Tally::new(max),
            trust_forwarded_for,
            forwarding_key: None,
        }
    }

    /// Counts the requests that carry `key` by the address they were forwarded for (the
    /// embedded mode, where the gateway forwards to its own process on loopback).
    pub fn with_forwarding_key(mut self, key: Arc<str>) -> Self {
        self.forwarding_key = Some(key);
        self
    }

    fn address_of(&self, req: &HttpRequest) -> IpAddr {
        let forwarded_by_gateway = self.forwarding_key.as_deref().is_some_and(|key| {
            req.headers()
                .get(FORWARDED_BY_HEADER)
                .is_some_and(|value| constant_time_eq(value.as_bytes(), key.as_bytes()))
        });
        client_address(req, self.trust_forwarded_for || forwarded_by_gateway)
    }
}

/// Whether two secrets are equal, in a time that does not depend on where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Middleware: refuses a request with 429 while its address has [`AddressLimit`]'s maximum in
/// flight. Without an `AddressLimit` in the app data it lets everything through.
pub async fn limit_per_address(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let Some(limit) = req.app_data::<web::Data<AddressLimit>>().cloned() else {
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_boxed_body);
    };
    let address = limit.address_of(req.request());
    let Some(_in_flight) = limit.in_flight.enter(address) else {
        let response = ApiError::RateLimited {
            retry_after_secs: 1,
        }
        .error_response();
        let mut response = req.into_response(response);
        // The body the client may still be sending is not read: the connection cannot carry
        // another request.
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        return Ok(response);
    };
    next.call(req)
        .await
        .map(ServiceResponse::map_into_boxed_body)
}

/// A poisoned lock only means another thread panicked while counting; the counts are still usable.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A dependency `/readyz` asks: `Ok` when it answers, else why not.
pub type Probe = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// What `/readyz` checks; a service registers the dependencies it has, each under the name its
/// answer shows (`database`, `redis`).
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Vec<(&'static str, Probe)>,
}

impl Readiness {
    pub fn check(mut self, name: &'static str, probe: Probe) -> Self {
        self.checks.push((name, probe));
        self
    }

    pub fn redis(self, pool: RedisPool) -> Self {
        self.check(
            "redis",
            Arc::new(move || {
                let pool = pool.clone();
                Box::pin(async move { redis::ping(&pool).await.map_err(|err| err.to_string()) })
            }),
        )
    }
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
    for (name, probe) in &readiness.checks {
        let status = match tokio::time::timeout(READINESS_TIMEOUT, probe()).await {
            Ok(Ok(())) => "ok".to_owned(),
            Ok(Err(err)) => err,
            Err(_) => "timed out".to_owned(),
        };
        ready &= status == "ok";
        checks.insert((*name).into(), Value::String(status));
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
    /// Blocking threads (database calls, password checks) of all workers together; each worker
    /// gets its share. actix's default is 512, and it was reached: one GraphQL document with 100
    /// aliased `car` fields resolves them concurrently, and 20 such requests took 522 threads.
    /// Past the database pool's size more threads only wait for a connection; work beyond the
    /// bound waits in the pool's queue instead, which costs no thread.
    pub blocking_threads: usize,
}

impl ServerOptions {
    /// Each worker's share of [`ServerOptions::blocking_threads`], at least one.
    pub fn blocking_threads_per_worker(&self) -> usize {
        let workers = match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        (self.blocking_threads / workers).max(1)
    }
}

impl From<&HttpArgs> for ServerOptions {
    fn from(http: &HttpArgs) -> Self {
        Self {
            workers: http.http_workers,
            shutdown_timeout_secs: http.shutdown_timeout_secs,
            blocking_threads: usize::try_from(http.blocking_threads).unwrap_or(usize::MAX),
        }
    }
}

/// The `App` of every server of the stack, built in one place: `service_app!(data: [a, b],
/// routes: [f, g])` gives an app with each `web::Data`, the per-address request limit and the
/// request metrics around the routes (each a `fn(&mut web::ServiceConfig)`), and the JSON 404
/// for anything else. A macro because each `wrap` changes the app's type, which a function
/// would have to name.
#[macro_export]
macro_rules! service_app {
    (data: [$($data:expr),* $(,)?], routes: [$($routes:expr),* $(,)?] $(,)?) => {
        ::actix_web::App::new()
            $(.app_data($data.clone()))*
            .wrap(::actix_web::middleware::from_fn($crate::http::limit_per_address))
            .wrap(::actix_web::middleware::from_fn($crate::metrics::record))
            $(.configure($routes))*
            .default_service(::actix_web::web::to($crate::http::not_found))
    };
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
            .shutdown_timeout(options.shutdown_timeout_secs)
            .worker_max_blocking_threads(options.blocking_threads_per_worker());
        let server = match options.workers {
            0 => server,
            workers => server.workers(workers),
        };
        server.listen($listener).map(|server| server.run())
    }};
}
