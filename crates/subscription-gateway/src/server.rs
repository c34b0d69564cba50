//! The HTTP server of the gateway (and of the embedded mode): actix-web for ordinary requests,
//! and actix-http's upgrade hook for websockets.
//!
//! actix-web's `HttpServer` keeps an upgraded socket inside its HTTP/1 dispatcher, with the
//! dispatcher's two 8 KiB buffers, for as long as the websocket lives. Here the server is built
//! from the same parts `HttpServer` uses, plus an upgrade service: a request carrying
//! `Connection: upgrade` and `Upgrade: websocket` comes to [`accept`] with the TCP stream itself.
//! [`accept`] checks it, answers `101 Switching Protocols` (or an HTTP error) and hands the
//! stream to [`crate::connection::run`] with [`crate::socket`]'s small, on-demand buffers. Every
//! other request goes to the actix-web `App` the caller gives.

use std::convert::Infallible;
use std::fmt;
use std::time::Duration;

use actix_codec::Framed;
use actix_http::body::MessageBody;
use actix_http::{h1, HttpService, KeepAlive, Request, Response};
use actix_service::{
    fn_service, map_config, IntoServiceFactory, ServiceFactory, ServiceFactoryExt as _,
};
use actix_web::dev::{AppConfig, Server};
use actix_web::http::header::{self, HeaderMap};
use actix_web::web;
use bytes::BytesMut;
use serde_json::{json, Value};
use service_kit::http::ServerOptions;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

use crate::protocol::{Protocol, LEGACY_WS, TRANSPORT_WS};
use crate::socket::{Inbound, Link};
use crate::state::GatewayState;

/// Paths that serve subscriptions; other upgrade requests get 404.
const PATHS: [&str; 2] = ["/graphql", "/graphql/"];
/// How long writing the upgrade's answer may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts the server on `listener`: `factory` builds the actix-web app for ordinary requests
/// (as `HttpServer::new`'s does), websocket upgrades go to the gateway in `gateway`. Signals are
/// left to the caller, as with `service_kit::start_server!`.
pub fn serve<F, I, S, B>(
    listener: std::net::TcpListener,
    options: ServerOptions,
    gateway: web::Data<GatewayState>,
    factory: F,
) -> std::io::Result<Server>
where
    F: Fn() -> I + Send + Clone + 'static,
    I: IntoServiceFactory<S, Request>,
    S: ServiceFactory<Request, Config = AppConfig> + 'static,
    S::Error: Into<actix_web::Error> + 'static,
    S::InitError: fmt::Debug,
    S::Response: Into<Response<B>> + 'static,
    S::Service: 'static,
    B: MessageBody + 'static,
{
    let addr = listener.local_addr()?;
    let mut builder = actix_server::Server::build()
        .disable_signals()
        .shutdown_timeout(options.shutdown_timeout_secs)
        .worker_max_blocking_threads(options.blocking_threads_per_worker());
    if options.workers > 0 {
        builder = builder.workers(options.workers);
    }
    builder
        .listen("http", listener, move || {
            let gateway = gateway.clone();
            let upgrade = fn_service(
                move |(request, framed): (Request, Framed<TcpStream, h1::Codec>)| {
                    let gateway = gateway.clone();
                    async move {
                        accept(gateway, request, framed).await;
                        Ok::<_, Infallible>(())
                    }
                },
            );
            let app = factory()
                .into_factory()
                .map_err(|err| err.into().error_response());
            // actix-web's HttpServer defaults, so both kinds of server behave alike.
            HttpService::build()
                .keep_alive(KeepAlive::Timeout(Duration::from_secs(5)))
                .client_request_timeout(Duration::from_secs(5))
                .client_disconnect_timeout(Duration::from_secs(1))
                .local_addr(addr)
                .upgrade(upgrade)
                .finish(map_config(app, |_| AppConfig::default()))
                .tcp()
        })
        .map(|server| server.run())
}

/// An upgrade request: answered, and on success served as a websocket by a task of its own.
async fn accept(
    gateway: web::Data<GatewayState>,
    request: Request,
    framed: Framed<TcpStream, h1::Codec>,
) {
    let parts = framed.into_parts();
    let mut stream = parts.io;
    let checked = check(&gateway, &request).and_then(|accepted| {
        if let Err(retry_after) = gateway.shared.pressure.admit() {
            gateway.shared.metrics.upgrades_shed.inc();
            return Err(overloaded(retry_after));
        }
        let address = service_kit::http::client_address_of(
            request.head().headers(),
            stream.peer_addr().ok().map(|addr| addr.ip()),
            gateway.trust_forwarded_for,
        );
        match gateway.addresses.enter(address) {
            Some(slot) => Ok((accepted, slot)),
            None => Err(refusal(
                429,
                "Too Many Requests",
                json!({
                    "detail": format!(
                        "too many open websockets from this address (at most {})",
                        gateway.addresses.max()
                    ),
                    "code": "too_many_connections",
                }),
            )),
        }
    });
    let ((protocol, key), address_slot) = match checked {
        Ok(accepted) => accepted,
        Err(refusal) => {
            let _ = tokio::time::timeout(ANSWER_TIMEOUT, stream.write_all(&refusal)).await;
            let _ = tokio::time::timeout(ANSWER_TIMEOUT, stream.shutdown()).await;
            return;
        }
    };
    let accept_key = actix_http::ws::hash_key(key.as_bytes());
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
         sec-websocket-accept: {}\r\nsec-websocket-protocol: {}\r\n\r\n",
        String::from_utf8_lossy(&accept_key),
        protocol.name()
    );
    match tokio::time::timeout(ANSWER_TIMEOUT, stream.write_all(head.as_bytes())).await {
        Ok(Ok(())) => {}
        _ => return,
    }
    // Small frames go out at once; fan-out never writes twice to one socket per event.
    let _ = stream.set_nodelay(true);
    if gateway.send_buffer_bytes > 0 {
        // What a client that stops reading holds in the kernel, besides OUTBOUND_QUEUE.
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(gateway.send_buffer_bytes);
    }
    let header_authorization = request
        .head()
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let shared = gateway.shared.clone();
    let link = Link::new(stream, shared.limits.outbound_queue);
    // What the HTTP reader took past the request head is the start of the websocket stream;
    // copied so that the dispatcher's 8 KiB buffer is freed with the request.
    let leftover = BytesMut::from(&parts.read_buf[..]);
    let inbound = Inbound::new(gateway.max_frame_bytes, leftover);
    drop(request);
    // Returning lets actix-http drop everything it held for this connection.
    actix_web::rt::spawn(crate::connection::run(
        shared,
        protocol,
        link,
        inbound,
        header_authorization,
        address_slot,
    ));
}

/// The subprotocol and the client's key of an acceptable upgrade, or the HTTP answer that
/// refuses it.
fn check(gateway: &GatewayState, request: &Request) -> Result<(Protocol, String), Vec<u8>> {
    if !PATHS.contains(&request.path()) {
        return Err(refusal(
            404,
            "Not Found",
            json!({"detail": "Not found.", "code": "not_found"}),
        ));
    }
    if let Err(err) = actix_http::ws::verify_handshake(request.head()) {
        let status = match err {
            actix_http::ws::HandshakeError::GetMethodRequired => (405, "Method Not Allowed"),
            _ => (400, "Bad Request"),
        };
        return Err(refusal(
            status.0,
            status.1,
            json!({"detail": format!("invalid websocket upgrade: {err}"), "code": "bad_handshake"}),
        ));
    }
    let Some(protocol) = offered_protocol(request.head().headers()) else {
        return Err(refusal(
            400,
            "Bad Request",
            json!({
                "detail": format!(
                    "unsupported or missing websocket subprotocol: offer {TRANSPORT_WS} or \
                     {LEGACY_WS} in Sec-WebSocket-Protocol"
                ),
                "code": "subprotocol_not_acceptable",
                "supported": [TRANSPORT_WS, LEGACY_WS],
            }),
        ));
    };
    if gateway.shared.shutdown.is_cancelled() {
        return Err(refusal(
            503,
            "Service Unavailable",
            json!({"detail": "this gateway is shutting down; reconnect", "code": "shutting_down"}),
        ));
    }
    // verify_handshake has checked that the key is present and well formed.
    let key = request
        .head()
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Ok((protocol, key))
}

/// The first subprotocol of the client's list (over all its `Sec-WebSocket-Protocol` headers)
/// that we speak.
fn offered_protocol(headers: &HeaderMap) -> Option<Protocol> {
    let offered: Vec<&str> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .filter_map(|v| v.to_str().ok())
        .collect();
    Protocol::negotiate(&offered.join(","))
}

/// A complete HTTP/1.1 answer with a JSON body, after which the connection closes.
fn refusal(status: u16, reason: &str, body: Value) -> Vec<u8> {
    refusal_with(status, reason, "", body)
}

/// [`refusal`] with more header lines (each ending in CRLF).
fn refusal_with(status: u16, reason: &str, headers: &str, body: Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         {headers}connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The answer to an upgrade shed while deliveries lag ([`crate::pressure`]).
fn overloaded(retry_after: u64) -> Vec<u8> {
    refusal_with(
        503,
        "Service Unavailable",
        &format!("retry-after: {retry_after}\r\n"),
        json!({
            "detail": format!(
                "this gateway is behind on its deliveries and admits few new connections; \
                 retry in {retry_after} s"
            ),
            "code": "overloaded",
            "retryAfter": retry_after,
        }),
    )
}
