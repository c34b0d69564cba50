//! Queries and mutations sent on the websocket. The graphql-transport-ws protocol carries any
//! operation (one `next`, then `complete`), and clients that use one socket for everything rely
//! on it. The gateway never opens PostgreSQL, so it runs none itself: it POSTs the operation to
//! api-service (API_INTERNAL_URL, not through NGINX) with the connection's current token, and
//! sends back api-service's answer as it is, errors and `extensions.code` included. A mutation's
//! event is therefore published exactly as over HTTP, through Redis to every gateway.

use service_kit::error::ErrorCode;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tracing::Instrument as _;

use crate::protocol::{self, Protocol};
use crate::socket::Link;

/// Longest wait for api-service's answer.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer relayed (api-service's own answers are far smaller; this bounds a stranger).
const MAX_ANSWER_BYTES: usize = 4 << 20;

thread_local! {
    /// One client per worker thread (awc's client is not `Send`), keeping its connections to
    /// api-service alive between operations.
    static CLIENT: awc::Client = awc::Client::builder()
        .timeout(TIMEOUT)
        .disable_redirects()
        .finish();
}

/// Where to send operations, checked once at start.
#[derive(Debug, Clone)]
pub struct Upstream {
    url: Arc<str>,
    /// Sent as [`service_kit::http::FORWARDED_BY_HEADER`] when set (the embedded mode): the
    /// API then counts the operation against the client's address, not the gateway's.
    forwarding_key: Option<Arc<str>>,
}

impl Upstream {
    pub fn new(url: &str) -> Result<Upstream, String> {
        let parsed: awc::http::Uri = url
            .parse()
            .map_err(|err| format!("{url:?} is not a URL: {err}"))?;
        if parsed.scheme_str() != Some("http") || parsed.host().is_none() {
            return Err(format!(
                "{url:?}: give api-service's GraphQL endpoint as http://host:port/graphql"
            ));
        }
        Ok(Upstream {
            url: Arc::from(url),
            forwarding_key: None,
        })
    }

    pub fn with_forwarding_key(mut self, key: Option<Arc<str>>) -> Self {
        self.forwarding_key = key;
        self
    }
}

/// A new secret for [`Upstream::with_forwarding_key`] and
/// `service_kit::http::AddressLimit::with_forwarding_key`.
pub fn new_forwarding_key() -> Arc<str> {
    Arc::from(tokens::jwt::new_jti())
}

/// One forwarded operation.
pub struct Operation {
    pub protocol: Protocol,
    pub id: String,
    /// `{query, operationName?, variables?}` as the client sent it.
    pub request: Value,
    /// The connection's `Authorization` value (the renewed token once renewed).
    pub authorization: String,
    /// The client's address, for api-service's per-address limits (X-Forwarded-For).
    pub client: IpAddr,
}

/// Runs `operation` at api-service and writes its result, then `complete`, to the socket; an
/// api-service that cannot answer is an `error` for this operation, and the socket stays open.
pub async fn run(upstream: Upstream, link: Arc<Link>, operation: Operation) {
    let id_json = serde_json::to_string(&operation.id).unwrap_or_else(|_| "\"\"".into());
    // The forwarded request carries this span's context, so api-service's spans are its
    // children.
    let span = service_kit::telemetry::span(|| {
        tracing::info_span!("socket operation", otel.kind = "client")
    });
    match execute(&upstream, &operation).instrument(span).await {
        Ok(Answer::Result(result)) => {
            let next = protocol::next_frame(operation.protocol, &id_json, &result, None);
            if link.push(&next) {
                link.push(&protocol::complete_frame(operation.protocol, &operation.id));
            }
        }
        Ok(Answer::RequestError(errors)) => {
            link.push(&protocol::error_frame(
                operation.protocol,
                &id_json,
                &errors,
            ));
        }
        Err(message) => {
            let errors = protocol::errors(&message, ErrorCode::ServiceUnavailable);
            link.push(&protocol::error_frame(
                operation.protocol,
                &id_json,
                &errors.to_string(),
            ));
        }
    }
    link.finished(&operation.id);
}

/// What api-service answered, as JSON text.
enum Answer {
    /// An executed operation's result (`data`, maybe with `errors`): one `next`, then `complete`.
    Result(String),
    /// A request that was not executed (it did not parse or validate: `errors` without `data`,
    /// as the GraphQL over HTTP spec tells them apart): an `error` with the list, as the gateway
    /// answers such a subscription.
    RequestError(String),
}

async fn execute(upstream: &Upstream, operation: &Operation) -> Result<Answer, String> {
    let request = CLIENT.with(|client| {
        let mut request = client
            .post(&*upstream.url)
            .insert_header(("Authorization", operation.authorization.as_str()))
            .insert_header(("X-Forwarded-For", operation.client.to_string()));
        if let Some(key) = &upstream.forwarding_key {
            request = request.insert_header((service_kit::http::FORWARDED_BY_HEADER, &**key));
        }
        if let Some(traceparent) = service_kit::telemetry::traceparent() {
            request = request.insert_header(("traceparent", traceparent));
        }
        request.send_json(&operation.request)
    });
    let mut response = request.await.map_err(|err| {
        tracing::warn!(%err, url = %upstream.url, "api-service unreachable for a websocket operation");
        "the GraphQL API cannot be reached right now; retry".to_owned()
    })?;
    let body = response
        .body()
        .limit(MAX_ANSWER_BYTES)
        .await
        .map_err(|err| format!("the GraphQL API's answer could not be read: {err}"))?;
    // Any GraphQL response (with `data`, `errors` or both) is the operation's result, whatever
    // the status that came with it (api-service answers 401 for a token it refuses).
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(result)) if result.contains_key("data") => {
            Ok(Answer::Result(Value::Object(result).to_string()))
        }
        Ok(Value::Object(mut result)) if result.get("errors").is_some_and(Value::is_array) => {
            let errors = result.remove("errors").unwrap_or_default();
            Ok(Answer::RequestError(errors.to_string()))
        }
        _ => Err(format!(
            "the GraphQL API answered HTTP {} without a GraphQL result",
            response.status().as_u16()
        )),
    }
}
