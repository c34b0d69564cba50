//! Subscriptions over streamed HTTP responses, for clients and networks that cannot keep a
//! websocket: GraphQL over Server-Sent Events (the `graphql-sse` protocol, "distinct
//! connections" mode: one request, one operation) and Apollo's multipart subscriptions.
//!
//! `POST /graphql/` (or `GET` with the operation in the query string, as a browser's
//! `EventSource` sends it) with `Accept: text/event-stream`, or with
//! `Accept: multipart/mixed;subscriptionSpec="1.0"`, comes here instead of to api-service. The
//! request is one operation: a subscription joins the shared execution of its operation beside
//! the websocket subscribers (one execution serves both transports), a query or a mutation is
//! forwarded to api-service as one sent on a socket is, and its one result is streamed.
//!
//! A stream is a connection as a websocket is: its token (the `Authorization` header; for an
//! `EventSource`, which cannot set headers, the `access_token` query parameter of RFC 6750) is
//! checked as at `connection_init`, it takes a place in the per-user and per-address counts,
//! its results wait in a [`Link`] bounded by `OUTBOUND_QUEUE` (past it the client is too slow
//! and the stream ends), it gets a keep-alive every `KEEPALIVE_SECS`, and it ends with an error
//! result and no `complete` when its token expires or is revoked or the gateway drains, so that
//! the client reconnects. Every SSE `next` carries the result's cursor as its `id`: a
//! reconnecting `EventSource` sends it back as `Last-Event-ID` (other clients send the header
//! themselves, or `extensions.resumeFrom`), and the stream resumes as a websocket does: what was
//! missed, without gap or duplicate, the first result saying `recovered`.

use service_kit::error::ErrorCode;
use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use actix_web::http::header::{self, HeaderMap};
use actix_web::{guard, web, HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use serde_json::{json, Map, Value};
use service_kit::http::Counted;
use tokens::jwt::Claims;
use tokio::sync::watch;
use tokio::time::Sleep;

use crate::connection::{expiry_instant, revocations_changed};
use crate::operations::{self, Active, Caller};
use crate::protocol::{self, Protocol};
use crate::socket::{Link, LinkState};
use crate::state::{GatewayState, Shared};
use crate::user_sockets::UserSlot;

/// The operation's id in forwarded operations' bookkeeping: a stream carries one.
const OPERATION_ID: &str = "1";

/// `POST` and `GET` of `/graphql` and `/graphql/` asking for an event stream or Apollo's
/// multipart subscriptions; other requests of those paths are left to the routes after these.
/// Also `/graphql/stream`: the path of its own that a Kubernetes ingress, which cannot route by
/// `Accept`, sends to the gateway (deploy/kubernetes/base/ingress.yaml).
pub fn routes(cfg: &mut web::ServiceConfig) {
    for path in ["/graphql", "/graphql/", "/graphql/stream"] {
        cfg.service(
            web::resource(path)
                .guard(guard::Any(guard::Post()).or(guard::Get()))
                .guard(guard::fn_guard(|ctx| {
                    transport_of(ctx.head().headers()).is_some()
                }))
                .to(serve),
        );
    }
}

/// The streamed transport the `Accept` header asks for, if any. Apollo Client sends
/// `multipart/mixed;deferSpec=…` with its queries too: only `subscriptionSpec` asks for this.
pub fn transport_of(headers: &HeaderMap) -> Option<Protocol> {
    let accept = headers
        .get_all(header::ACCEPT)
        .filter_map(|value| value.to_str().ok())
        .collect::<Vec<_>>()
        .join(",")
        .to_ascii_lowercase();
    if accept.contains("text/event-stream") {
        Some(Protocol::Sse)
    } else if accept.contains("multipart/mixed") && accept.contains("subscriptionspec") {
        Some(Protocol::Multipart)
    } else {
        None
    }
}

async fn serve(
    request: HttpRequest,
    body: web::Payload,
    gateway: web::Data<GatewayState>,
) -> HttpResponse {
    match admit(&request, body, &gateway).await {
        Ok(admitted) => respond(gateway.shared.clone(), admitted).await,
        Err(refused) => refused,
    }
}

/// A stream let in: its transport, operation and caller, and its places in the counts.
struct Admitted {
    protocol: Protocol,
    payload: Value,
    authorization: Option<String>,
    claims: Claims,
    address: IpAddr,
    address_slot: Counted<IpAddr>,
    user_slot: UserSlot,
}

/// The checks before a stream opens, in the order of their cost; a refusal is its status and
/// a GraphQL error.
async fn admit(
    request: &HttpRequest,
    body: web::Payload,
    gateway: &GatewayState,
) -> Result<Admitted, HttpResponse> {
    let Some(protocol) = transport_of(request.headers()) else {
        return Err(refusal(
            406,
            ErrorCode::NotAcceptable,
            "ask for text/event-stream or multipart/mixed",
        ));
    };
    let shared = &gateway.shared;
    if shared.shutdown.is_cancelled() {
        return Err(refusal(
            503,
            ErrorCode::ShuttingDown,
            "this gateway is shutting down; retry",
        )
        .with_retry_after());
    }
    let address = service_kit::http::client_address_of(
        request.headers(),
        request.peer_addr().map(|addr| addr.ip()),
        gateway.trust_forwarded_for,
    );
    let Some(address_slot) = gateway.addresses.enter(address) else {
        let message = format!(
            "too many open connections from this address (at most {})",
            gateway.addresses.max()
        );
        return Err(refusal(429, ErrorCode::TooManyConnections, &message).with_retry_after());
    };
    let (payload, query_token) = match operation_of(request, body, gateway.max_frame_bytes).await {
        Ok(parsed) => parsed,
        Err(message) => return Err(refusal(400, ErrorCode::BadRequest, &message)),
    };
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
        .or(query_token.map(|token| format!("Bearer {token}")));
    let claims = match Box::pin(shared.verifier.authenticate(authorization.as_deref())).await {
        Ok(claims) if !shared.verifier.is_revoked(&claims) => claims,
        Ok(_) => {
            return Err(refusal(
                401,
                ErrorCode::Unauthenticated,
                "token has been revoked",
            ))
        }
        Err(tokens::auth::AuthError::KeysUnavailable) => {
            return Err(refusal(
                503,
                ErrorCode::ServiceUnavailable,
                "the token cannot be checked right now",
            )
            .with_retry_after())
        }
        Err(err) => return Err(refusal(401, ErrorCode::Unauthenticated, &err.to_string())),
    };
    let Some(user_slot) = Box::pin(shared.users.enter(claims.user_id)).await else {
        let message = format!(
            "too many connections for this user (at most {})",
            shared.users.max()
        );
        return Err(refusal(429, ErrorCode::TooManyConnections, &message).with_retry_after());
    };
    Ok(Admitted {
        protocol,
        payload,
        authorization,
        claims,
        address,
        address_slot,
        user_slot,
    })
}

/// Starts the operation and streams its results.
async fn respond(shared: Arc<Shared>, admitted: Admitted) -> HttpResponse {
    let Admitted {
        protocol,
        payload,
        authorization,
        claims,
        address,
        address_slot,
        user_slot,
    } = admitted;
    let link = Arc::new(Link::buffered(shared.limits.outbound_queue));
    if protocol == Protocol::Multipart {
        link.push(protocol::MULTIPART_PREAMBLE.as_bytes());
    }
    let replay_slots = shared.replays.connection_slots();
    let caller = Caller {
        claims: &claims,
        authorization: authorization.as_deref().unwrap_or_default(),
        address,
        replay_slots: &replay_slots,
    };
    let started = operations::start(&shared, protocol, &link, OPERATION_ID, payload, caller);
    let active = match started.await {
        Ok(active) => Some(active),
        Err(refusal) => {
            // Refused before it started: the protocol's way is a result with the errors, then
            // the end, on the accepted stream (a 400 would tell an EventSource nothing).
            link.push(&protocol::error_frame(
                protocol,
                "\"1\"",
                &protocol::errors(&refusal.message, refusal.code).to_string(),
            ));
            link.finished(OPERATION_ID);
            None
        }
    };
    let open = shared
        .metrics
        .streams_open
        .with_label_values(&[protocol.name()]);
    open.inc();
    let mut keepalive = tokio::time::interval_at(
        tokio::time::Instant::now() + shared.limits.keepalive,
        shared.limits.keepalive,
    );
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stream = Streaming {
        expiry: Box::pin(tokio::time::sleep_until(expiry_instant(
            &shared, claims.exp,
        ))),
        revocations: shared.verifier.revocations().map(|list| list.changes()),
        keepalive,
        protocol,
        link,
        active,
        claims,
        ended: false,
        _replay_slots: replay_slots,
        _user_slot: user_slot,
        _address_slot: address_slot,
        _open: OpenGauge(open),
        shared,
    };
    let content_type = match protocol {
        Protocol::Multipart => protocol::MULTIPART_CONTENT_TYPE,
        _ => "text/event-stream",
    };
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        // NGINX passes each chunk on at once (its buffering is off for these routes too).
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(futures_util::stream::unfold(stream, next_chunk).boxed_local())
}

/// One stream's state, held by its response body; dropping it (the client went away, or the
/// stream ended) leaves the execution and gives back the stream's places in the counts.
struct Streaming {
    shared: Arc<Shared>,
    protocol: Protocol,
    link: Arc<Link>,
    active: Option<Active>,
    claims: Claims,
    expiry: Pin<Box<Sleep>>,
    revocations: Option<watch::Receiver<u64>>,
    keepalive: tokio::time::Interval,
    /// Set once the last bytes are decided: the body ends after what waits.
    ended: bool,
    _replay_slots: Arc<tokio::sync::Semaphore>,
    _user_slot: UserSlot,
    _address_slot: Counted<IpAddr>,
    _open: OpenGauge,
}

struct OpenGauge(prometheus::IntGauge);

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Streaming {
    /// Ends the stream with `frame` after what waits: the operation is left at once.
    fn end_with(mut self, frame: Bytes) -> Option<(Result<Bytes, Infallible>, Streaming)> {
        self.active = None;
        self.ended = true;
        let mut bytes = BytesMut::new();
        if let Some(waiting) = self.link.take_pending() {
            bytes.extend_from_slice(&waiting);
        }
        bytes.extend_from_slice(&frame);
        Some((Ok(bytes.freeze()), self))
    }

    fn transport_error(
        self,
        message: &str,
        code: ErrorCode,
    ) -> Option<(Result<Bytes, Infallible>, Self)> {
        let frame = protocol::transport_error_frame(self.protocol, message, code);
        self.end_with(frame)
    }
}

/// The next bytes of a stream's body: what the execution wrote, a keep-alive, or the end.
async fn next_chunk(mut stream: Streaming) -> Option<(Result<Bytes, Infallible>, Streaming)> {
    loop {
        if let Some(bytes) = stream.link.take_pending() {
            return Some((Ok(bytes), stream));
        }
        if stream.ended {
            return None;
        }
        if !stream.link.take_finished().is_empty() {
            // The operation ended on the server's side; its last frame is written already.
            stream.active = None;
            stream.ended = true;
            continue;
        }
        match stream.link.state() {
            LinkState::Open => {}
            LinkState::Slow => {
                stream.shared.metrics.slow_consumers.inc();
                return stream.transport_error(
                    "the client reads too slowly; reconnect and resume from the last event id",
                    ErrorCode::SlowConsumer,
                );
            }
            LinkState::Closing | LinkState::Gone => return None,
        }
        tokio::select! {
            biased;
            () = stream.shared.shutdown.cancelled() => {
                return stream.transport_error(
                    "this gateway is shutting down; reconnect and resume from the last event id",
                    ErrorCode::ShuttingDown,
                );
            }
            () = stream.link.woken() => {}
            () = stream.expiry.as_mut() => {
                return stream.transport_error(
                    "token has expired; reconnect with a new token and resume from the last event id",
                    ErrorCode::Unauthenticated,
                );
            }
            () = revocations_changed(&mut stream.revocations) => {
                if stream.shared.verifier.is_revoked(&stream.claims) {
                    return stream.transport_error("token has been revoked", ErrorCode::Unauthenticated);
                }
            }
            _ = stream.keepalive.tick() => {
                return Some((Ok(protocol::keepalive_frame(stream.protocol)), stream));
            }
        }
    }
}

/// The operation (`{query, operationName?, variables?, extensions?}`) of a request, with the
/// `Last-Event-ID` header as `extensions.resumeFrom` when the request names none, and the
/// `access_token` query parameter of a `GET`.
async fn operation_of(
    request: &HttpRequest,
    mut body: web::Payload,
    max_bytes: usize,
) -> Result<(Value, Option<String>), String> {
    let (mut operation, token) = if request.method() == actix_web::http::Method::GET {
        let params = web::Query::<std::collections::HashMap<String, String>>::from_query(
            request.query_string(),
        )
        .map_err(|err| format!("malformed query string: {err}"))?
        .into_inner();
        let mut operation = Map::new();
        for (name, json_text) in [
            ("variables", true),
            ("extensions", true),
            ("query", false),
            ("operationName", false),
        ] {
            let Some(text) = params.get(name) else {
                continue;
            };
            let value = if json_text {
                serde_json::from_str(text).map_err(|err| format!("`{name}` is not JSON: {err}"))?
            } else {
                Value::String(text.clone())
            };
            operation.insert(name.to_owned(), value);
        }
        (operation, params.get("access_token").cloned())
    } else {
        let mut bytes = BytesMut::new();
        while let Some(chunk) = body.next().await {
            let chunk =
                chunk.map_err(|err| format!("the request body could not be read: {err}"))?;
            if bytes.len() + chunk.len() > max_bytes {
                return Err(format!("the request body is over {max_bytes} bytes"));
            }
            bytes.extend_from_slice(&chunk);
        }
        match serde_json::from_slice(&bytes) {
            Ok(Value::Object(operation)) => (operation, None),
            Ok(_) => return Err("the request body must be a JSON object".to_owned()),
            Err(err) => return Err(format!("the request body is not valid JSON: {err}")),
        }
    };
    let last_event_id = request
        .headers()
        .get("last-event-id")
        .and_then(|value| value.to_str().ok())
        .filter(|value| !value.is_empty());
    if let Some(cursor) = last_event_id {
        let extensions = operation
            .entry("extensions")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(extensions) = extensions {
            extensions
                .entry("resumeFrom")
                .or_insert_with(|| Value::String(cursor.to_owned()));
        }
    }
    Ok((Value::Object(operation), token))
}

/// A request refused before its stream starts, as a GraphQL error list with a code.
fn refusal(status: u16, code: ErrorCode, message: &str) -> HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(status)
        .unwrap_or(actix_web::http::StatusCode::BAD_REQUEST);
    HttpResponse::build(status)
        .content_type("application/json")
        .json(json!({"errors": [{"message": message, "extensions": {"code": code.as_str()}}]}))
}

trait RetryAfter {
    fn with_retry_after(self) -> HttpResponse;
}

impl RetryAfter for HttpResponse {
    fn with_retry_after(mut self) -> HttpResponse {
        self.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(accept: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            header::HeaderValue::from_str(accept).expect("valid header"),
        );
        headers
    }

    #[test]
    fn the_accept_header_picks_the_transport() {
        assert_eq!(
            transport_of(&headers("text/event-stream")),
            Some(Protocol::Sse)
        );
        assert_eq!(
            transport_of(&headers(
                "multipart/mixed;boundary=\"graphql\";subscriptionSpec=1.0,application/json"
            )),
            Some(Protocol::Multipart)
        );
        // Apollo's queries ask for @defer's multipart; api-service answers them with JSON.
        assert_eq!(
            transport_of(&headers(
                "multipart/mixed;deferSpec=20220824,application/json"
            )),
            None
        );
        assert_eq!(transport_of(&headers("application/json")), None);
    }
}
