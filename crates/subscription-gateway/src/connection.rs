//! The life of one websocket connection.
//!
//! One task per socket owns the session and runs a `select!` over everything that can happen to
//! it: a client frame, a message ready for the client, the keep-alive tick, the init deadline, the
//! access token's expiry, a revocation of the user's session, the slow-consumer signal and the
//! server's shutdown. Each subscription runs as a task of its own that turns events into protocol
//! messages and hands them to the socket task through a bounded queue; a full queue means the
//! client reads too slowly, and the connection is closed (1013) instead of buffering without bound.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseCode, CloseReason, Session};
use common::auth::{AuthError, TokenVerifier};
use common::graphql::{Context, Mutation, Query, Subscription};
use common::jwt::Claims;
use futures_util::StreamExt as _;
use juniper::DefaultScalarValue;
use serde_json::Value;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::executions::{Executions, Membership, Start, Subscriber};
use crate::hub::Hub;
use crate::metrics::GatewayMetrics;
use crate::protocol::{self, close, ClientMessage, Protocol};

pub type Coordinator =
    juniper_subscriptions::Coordinator<Query, Mutation, Subscription, Context, DefaultScalarValue>;

/// Limits of one connection, from the settings.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub keepalive: Duration,
    pub init_timeout: Duration,
    pub max_subscriptions: usize,
    pub outbound_queue: usize,
    /// Longest wait for one message to be accepted by a client that does not read.
    pub write_timeout: Duration,
}

/// What every connection shares.
pub struct Shared {
    pub coordinator: Arc<Coordinator>,
    pub verifier: TokenVerifier,
    pub hub: Hub,
    /// Subscriptions with the same operation share one execution (see [`crate::executions`]).
    pub executions: Arc<Executions>,
    pub limits: ConnectionLimits,
    pub metrics: GatewayMetrics,
    /// Cancelled when the server starts draining: every socket closes with 1001.
    pub shutdown: CancellationToken,
}

/// A message for the client, from a shared execution.
pub enum Outbound {
    /// A result; `event_at` is the commit time of the event behind it (µs since the epoch).
    Next { text: String, event_at: Option<i64> },
    /// The subscription ended (its stream finished or failed); `text` is the last message.
    Finished { id: String, text: String },
}

/// How the connection ends: a close code and a reason for the client.
struct Closing {
    code: u16,
    reason: String,
}

impl Closing {
    fn new(code: u16, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }

    /// The client is gone already; there is nobody to send a close frame to.
    fn gone() -> Self {
        Self::new(close::NORMAL, "")
    }

    fn slow(metrics: &GatewayMetrics) -> Self {
        metrics.slow_consumers.inc();
        Self::new(
            close::TRY_AGAIN_LATER,
            "slow consumer: too many undelivered messages",
        )
    }

    fn going_away() -> Self {
        Self::new(close::GOING_AWAY, "server shutting down; reconnect")
    }
}

/// How long the close frame may wait to be queued behind undelivered messages.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Writes one message. A client that does not read makes the write wait; that wait is cut short
/// by the slow-consumer signal, the shutdown, or the write timeout, so one stalled client can never
/// hold its connection task (and its subscriptions' memory) forever.
async fn send(
    session: &mut Session,
    text: String,
    shared: &Shared,
    slow: &Notify,
) -> Result<(), Closing> {
    tokio::select! {
        biased;
        written = tokio::time::timeout(shared.limits.write_timeout, session.text(text)) => match written {
            Ok(Ok(())) => {
                shared.metrics.messages_sent.inc();
                Ok(())
            }
            Ok(Err(_closed)) => Err(Closing::gone()),
            Err(_) => Err(Closing::slow(&shared.metrics)),
        },
        _ = slow.notified() => Err(Closing::slow(&shared.metrics)),
        _ = shared.shutdown.cancelled() => Err(Closing::going_away()),
    }
}

struct Active {
    field: String,
    /// Leaving the execution when dropped.
    _membership: Membership,
}

/// Serves one socket until it closes. `header_authorization` is the upgrade request's
/// `Authorization` header, used when `connection_init` carries no token.
pub async fn run(
    shared: Arc<Shared>,
    protocol: Protocol,
    mut session: Session,
    mut messages: AggregatedMessageStream,
    header_authorization: Option<String>,
) {
    shared.metrics.connections_open.inc();
    let (out_tx, mut out_rx) = mpsc::channel::<Outbound>(shared.limits.outbound_queue);
    let slow = Arc::new(Notify::new());
    let mut revocations = shared.hub.revocations();
    let mut claims: Option<Claims> = None;
    let mut active: HashMap<String, Active> = HashMap::new();
    let init_deadline = tokio::time::sleep(shared.limits.init_timeout);
    tokio::pin!(init_deadline);
    // Replaced by the token's expiry once authenticated.
    let expiry = tokio::time::sleep(Duration::from_secs(365 * 24 * 3600));
    tokio::pin!(expiry);
    let mut keepalive = tokio::time::interval(shared.limits.keepalive);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    keepalive.tick().await;

    let closing: Closing = loop {
        tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => break Closing::going_away(),
            _ = slow.notified() => break Closing::slow(&shared.metrics),
            _ = &mut init_deadline, if claims.is_none() => {
                break Closing::new(close::INIT_TIMEOUT, "Connection initialisation timeout");
            }
            _ = &mut expiry, if claims.is_some() => {
                break Closing::new(close::FORBIDDEN, "token expired");
            }
            revoked = revocations.recv(), if claims.is_some() => {
                if let (Ok(revoked), Some(claims)) = (revoked, &claims) {
                    if revoked.user_id == claims.user_id {
                        break Closing::new(close::FORBIDDEN, "token revoked (logged out)");
                    }
                }
            }
            outbound = out_rx.recv() => {
                // The sender half lives in this function, so the queue never ends here.
                let Some(outbound) = outbound else { continue };
                let (text, event_at) = match outbound {
                    Outbound::Next { text, event_at } => (text, event_at),
                    Outbound::Finished { id, text } => {
                        if let Some(done) = active.remove(&id) {
                            shared.metrics.subscriptions_active.with_label_values(&[&done.field]).dec();
                        }
                        (text, None)
                    }
                };
                if let Err(closing) = send(&mut session, text, &shared, &slow).await {
                    break closing;
                }
                if let Some(at) = event_at {
                    let now = chrono::Utc::now().timestamp_micros();
                    shared.metrics.delivery_latency.observe((now - at).max(0) as f64 / 1e6);
                }
            }
            _ = keepalive.tick(), if claims.is_some() => {
                if let Err(closing) = send(&mut session, protocol::keepalive(protocol), &shared, &slow).await {
                    break closing;
                }
            }
            frame = messages.next() => {
                let text = match frame {
                    None => break Closing::new(close::NORMAL, ""),
                    Some(Err(err)) => {
                        let code = match err {
                            actix_ws::ProtocolError::Overflow => close::TOO_BIG,
                            _ => close::BAD_REQUEST,
                        };
                        break Closing::new(code, format!("websocket protocol error: {err}"));
                    }
                    Some(Ok(AggregatedMessage::Text(text))) => text,
                    Some(Ok(AggregatedMessage::Binary(_))) => {
                        break Closing::new(close::UNSUPPORTED_DATA, "binary messages are not supported; send JSON text");
                    }
                    Some(Ok(AggregatedMessage::Ping(bytes))) => {
                        // A websocket-level ping is not a protocol error: answer it.
                        if session.pong(&bytes).await.is_err() {
                            break Closing::gone();
                        }
                        continue;
                    }
                    Some(Ok(AggregatedMessage::Pong(_))) => continue,
                    Some(Ok(AggregatedMessage::Close(_))) => break Closing::new(close::NORMAL, ""),
                };
                let message = match protocol::parse(protocol, &text) {
                    Ok(message) => message,
                    Err(err) => break Closing::new(close::BAD_REQUEST, err.to_string()),
                };
                match message {
                    ClientMessage::Init { payload } => {
                        if claims.is_some() {
                            break Closing::new(close::TOO_MANY_INITS, "Too many initialisation requests");
                        }
                        let token = connection_token(&payload, header_authorization.as_deref());
                        match shared.verifier.authenticate(token.as_deref()).await {
                            Ok(verified) => {
                                let left = verified.exp - chrono::Utc::now().timestamp();
                                expiry.as_mut().reset(
                                    tokio::time::Instant::now() + Duration::from_secs(left.max(0) as u64),
                                );
                                claims = Some(verified);
                                if let Err(closing) = send(&mut session, protocol::connection_ack(), &shared, &slow).await {
                                    break closing;
                                }
                                // The legacy protocol expects a first `ka` right after the ack.
                                if protocol == Protocol::LegacyWs
                                    {
                                    if let Err(closing) = send(&mut session, protocol::keepalive(protocol), &shared, &slow).await {
                                        break closing;
                                    }
                                }
                            }
                            Err(err) => {
                                let reason = auth_reason(&err);
                                if protocol == Protocol::LegacyWs {
                                    let _ = tokio::time::timeout(
                                        shared.limits.write_timeout,
                                        session.text(protocol::connection_error(&reason)),
                                    )
                                    .await;
                                }
                                break Closing::new(close::FORBIDDEN, reason);
                            }
                        }
                    }
                    ClientMessage::Subscribe { id, payload } => {
                        let Some(_) = &claims else {
                            break Closing::new(close::UNAUTHORIZED, "Unauthorized: send connection_init with a token first");
                        };
                        if active.contains_key(&id) {
                            break Closing::new(close::SUBSCRIBER_EXISTS, format!("Subscriber for {id} already exists"));
                        }
                        if active.len() >= shared.limits.max_subscriptions {
                            let errors = protocol::errors(
                                &format!("too many subscriptions on this connection (at most {})", shared.limits.max_subscriptions),
                                "TOO_MANY_SUBSCRIPTIONS",
                            );
                            if let Err(closing) = send(&mut session, protocol::operation_error(&id, errors), &shared, &slow).await {
                                break closing;
                            }
                            continue;
                        }
                        let request = match graphql_request(payload.clone()) {
                            Ok(request) => request,
                            Err(message) => {
                                let errors = protocol::errors(&message, "BAD_REQUEST");
                                if let Err(closing) = send(&mut session, protocol::operation_error(&id, errors), &shared, &slow).await {
                                    break closing;
                                }
                                continue;
                            }
                        };
                        let Some(verified) = &claims else { continue };
                        let membership = shared.executions.join(Start {
                            coordinator: &shared.coordinator,
                            hub: &shared.hub,
                            claims: verified,
                            request,
                            subscriber: Subscriber {
                                protocol,
                                id: id.clone(),
                                out: out_tx.clone(),
                                slow: slow.clone(),
                            },
                        });
                        let field = root_field(&payload);
                        shared.metrics.subscriptions_active.with_label_values(&[&field]).inc();
                        active.insert(id, Active { field, _membership: membership });
                    }
                    ClientMessage::Stop { id } => {
                        if let Some(stopped) = active.remove(&id) {
                            shared.metrics.subscriptions_active.with_label_values(&[&stopped.field]).dec();
                            // graphql-transport-ws: the client's `complete` needs no answer; the
                            // legacy protocol confirms a `stop` with `complete`.
                            if protocol == Protocol::LegacyWs
                                {
                                if let Err(closing) = send(&mut session, protocol::complete(&id), &shared, &slow).await {
                                    break closing;
                                }
                            }
                        }
                    }
                    ClientMessage::Ping { payload } => {
                        if let Err(closing) = send(&mut session, protocol::pong(payload), &shared, &slow).await {
                            break closing;
                        }
                    }
                    ClientMessage::Pong => {}
                    ClientMessage::Terminate => break Closing::new(close::NORMAL, "connection terminated"),
                }
            }
        }
    };

    for (_, done) in active.drain() {
        shared
            .metrics
            .subscriptions_active
            .with_label_values(&[&done.field])
            .dec();
    }
    shared
        .metrics
        .connections_closed
        .with_label_values(&[&closing.code.to_string()])
        .inc();
    shared.metrics.connections_open.dec();
    let reason = CloseReason {
        code: CloseCode::from(closing.code),
        description: Some(protocol::close_reason(&closing.reason)).filter(|r| !r.is_empty()),
    };
    // Dropping the session after the timeout ends the connection even if the frame never fits.
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, session.close(Some(reason))).await;
}

fn graphql_request(
    payload: Value,
) -> Result<juniper::http::GraphQLRequest<DefaultScalarValue>, String> {
    // Only the three standard fields; clients also send `extensions`, which we do not use.
    let Value::Object(mut map) = payload else {
        return Err("payload must be an object".into());
    };
    let mut request = serde_json::Map::new();
    for key in ["query", "operationName", "variables"] {
        if let Some(value) = map.remove(key) {
            if !value.is_null() {
                request.insert(key.to_owned(), value);
            }
        }
    }
    if !request.contains_key("query") {
        return Err("payload has no `query`".into());
    }
    serde_json::from_value(Value::Object(request))
        .map_err(|err| format!("invalid subscription payload: {err}"))
}

/// The metrics label of a subscription: its first root field, or `unknown`. Only the three known
/// field names are used, so clients cannot create label values.
fn root_field(payload: &Value) -> String {
    let query = payload.get("query").and_then(Value::as_str).unwrap_or("");
    ["carModelUpdated", "carCreated", "carDeleted"]
        .into_iter()
        .filter_map(|field| query.find(field).map(|at| (at, field)))
        .min()
        .map(|(_, field)| field.to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The token of a connection: `connectionParams.Authorization` (or `authorization`), as GraphQL
/// Playground and Apollo send it; else the upgrade request's header.
fn connection_token(payload: &Value, header: Option<&str>) -> Option<String> {
    let from_params = ["Authorization", "authorization"]
        .into_iter()
        .find_map(|key| payload.get(key))
        .or_else(|| {
            // Some clients nest headers: `{"headers": {"Authorization": …}}`.
            let headers = payload.get("headers")?;
            ["Authorization", "authorization"]
                .into_iter()
                .find_map(|key| headers.get(key))
        })
        .and_then(Value::as_str)
        .map(str::to_owned);
    from_params.or_else(|| header.map(str::to_owned))
}

/// The close reason of a refused `connection_init` (at most 123 bytes, so kept short).
fn auth_reason(err: &AuthError) -> String {
    match err {
        AuthError::MissingHeader => {
            "Forbidden: no token; set connectionParams {\"Authorization\": \"Bearer <access token>\"}"
                .to_owned()
        }
        AuthError::NotBearer => {
            "Forbidden: malformed Authorization; expected \"Bearer <access token>\"".to_owned()
        }
        other => format!("Forbidden: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_token_comes_from_connection_params_before_the_header() {
        let params = json!({"Authorization": "Bearer a"});
        assert_eq!(
            connection_token(&params, Some("Bearer b")).as_deref(),
            Some("Bearer a")
        );
        let lower = json!({"authorization": "Bearer c"});
        assert_eq!(connection_token(&lower, None).as_deref(), Some("Bearer c"));
        assert_eq!(
            connection_token(&Value::Null, Some("Bearer b")).as_deref(),
            Some("Bearer b")
        );
        assert_eq!(connection_token(&json!({"Authorization": 5}), None), None);
    }

    #[test]
    fn root_fields_are_labelled_from_a_fixed_set() {
        assert_eq!(
            root_field(&json!({"query": "subscription { carCreated { id } }"})),
            "carCreated"
        );
        assert_eq!(
            root_field(&json!({"query": "subscription { evil }"})),
            "unknown"
        );
    }
}
