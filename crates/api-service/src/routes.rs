//! `/graphql` and `/graphql/` over HTTP, as GraphQL-over-HTTP describes: `POST` with a JSON body
//! (one operation, or a bounded batch as a JSON array), `GET` with `query`, `operationName` and
//! `variables` parameters for queries; a browser's `GET` (Accept: text/html) gets GraphQL
//! Playground, pointed at the same URL for HTTP and websocket. GraphiQL is at `/graphiql`.
//!
//! Responses are `application/json` with status 200 for every well-formed request (errors in
//! `errors`), unless the client accepts `application/graphql-response+json`, which gets 400 for a
//! document that fails to parse or validate. Malformed HTTP requests get 400, 405, 413 or 415.

use service_kit::error::{ErrorCode, Refusal};
use std::sync::Arc;

use actix_web::http::{header, Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use graphql_schema::{Context, Schema, SUBSCRIPTION_OVER_HTTP};
use juniper::http::GraphQLRequest;
use juniper::{DefaultScalarValue, OperationType, ValidatedOperation};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};
use service_kit::error::graphql_error_body;
use service_kit::http::BodyLimits;
use tokens::auth::TokenVerifier;
use tracing::Instrument as _;

/// What the handlers share; built once by [`crate::startup::Application::build`].
pub struct ApiState {
    pub schema: Arc<Schema>,
    /// The store; the schema's resolvers see it as their `DataSource`.
    pub store: store::repository::Store,
    /// How long a write under an `Idempotency-Key` is remembered (IDEMPOTENCY_WINDOW_HOURS).
    pub idempotency_window: chrono::Duration,
    pub verifier: TokenVerifier,
    pub body_limits: BodyLimits,
    pub max_batch_size: usize,
    /// Fields a whole batch may select (MAX_QUERY_FIELDS): without it, a batch of ten
    /// operations each within the document limit did ten documents' work in one request.
    pub max_batch_fields: usize,
    pub playground: bool,
    /// Automatic persisted queries, and trusted documents only when configured.
    pub persisted: graphql_schema::persisted::PersistedQueries,
}

pub fn config(cfg: &mut web::ServiceConfig) {
    for path in ["/graphql", "/graphql/"] {
        cfg.service(
            web::resource(path)
                .route(web::post().to(graphql_post))
                .route(web::get().to(graphql_get))
                .default_service(web::to(method_not_allowed)),
        );
    }
    for path in ["/graphiql", "/graphiql/", "/graphql/graphiql"] {
        cfg.route(path, web::get().to(graphiql));
    }
    crate::ide::config(cfg);
}

const GRAPHQL_RESPONSE_JSON: &str = "application/graphql-response+json";

/// How the response is framed: the legacy `application/json` (always 200 for a well-formed
/// request) or `application/graphql-response+json` (400 when the document is invalid).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    Json,
    GraphQLResponse,
}

fn framing(req: &HttpRequest) -> Framing {
    let accept = header_str(req, header::ACCEPT).unwrap_or("");
    if accept.contains(GRAPHQL_RESPONSE_JSON) {
        Framing::GraphQLResponse
    } else {
        Framing::Json
    }
}

/// The outcome of one operation: its JSON result and what happened to it.
struct Outcome {
    /// The serialized response; built from juniper's values directly (not through
    /// `serde_json::Value`, whose maps are sorted) so fields come in the order the query asked.
    body: String,
    kind: OutcomeKind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum OutcomeKind {
    /// Executed (errors of fields, such as UNAUTHENTICATED, are in the body).
    Executed,
    /// Not executed: the document or the operation was refused.
    RequestError,
    /// Not executed: a mutation sent with GET.
    MutationOverGet,
}

async fn graphql_post(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<ApiState>,
) -> HttpResponse {
    let framing = framing(&req);
    let mime = header_str(&req, header::CONTENT_TYPE)
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    if mime != "application/json" {
        let shown = if mime.is_empty() { "none" } else { &mime };
        return http_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &format!("unsupported Content-Type \"{shown}\": send application/json"),
            ErrorCode::UnsupportedMediaType,
        );
    }
    let body = match service_kit::http::read_body(&req, payload, state.body_limits).await {
        Ok(body) => body,
        Err(err) => return err.graphql_response(),
    };
    let document: Json = match serde_json::from_slice(&body) {
        Ok(document) => document,
        Err(err) => {
            return http_error(
                StatusCode::BAD_REQUEST,
                &format!("the body is not valid JSON: {err}"),
                ErrorCode::BadRequest,
            )
        }
    };
    let key = match idempotency_key(&req, &document) {
        Ok(key) => key,
        Err(message) => {
            return http_error(StatusCode::BAD_REQUEST, &message, ErrorCode::BadRequest);
        }
    };
    let fingerprint = key.as_ref().map(|_| fingerprint(&document));
    let context = context_with(&req, &state, key.as_deref().zip(fingerprint.as_deref())).await;
    match document {
        Json::Array(items) => {
            if state.max_batch_size == 0 {
                return http_error(
                    StatusCode::BAD_REQUEST,
                    "batched requests are not accepted: send one operation per request",
                    ErrorCode::BatchNotAccepted,
                );
            }
            if items.is_empty() || items.len() > state.max_batch_size {
                return http_error(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "a batch must hold 1 to {} operations; this one holds {}",
                        state.max_batch_size,
                        items.len()
                    ),
                    ErrorCode::BatchTooLarge,
                );
            }
            let mut requests: Vec<Result<GraphQLRequest, Refusal>> =
                Vec::with_capacity(items.len());
            for item in items {
                requests.push(match persisted(&state, item).await {
                    Ok(item) => {
                        parse_request(item).map_err(|m| Refusal::new(m, ErrorCode::BadRequest))
                    }
                    Err(refused) => Err(refused),
                });
            }
            let fields: usize = requests
                .iter()
                .flatten()
                .filter_map(|request| {
                    graphql_schema::operation_field_count(
                        &state.schema,
                        &request.query,
                        request.operation_name.as_deref(),
                    )
                })
                .fold(0, usize::saturating_add);
            if fields > state.max_batch_fields {
                return http_error(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "this batch selects {fields} fields in all; a batch may select at most {} \
                         (the limit of one document), so split it into several requests",
                        state.max_batch_fields
                    ),
                    ErrorCode::BatchTooExpensive,
                );
            }
            let mut results = Vec::with_capacity(requests.len());
            for request in requests {
                let outcome = match request {
                    Ok(request) => execute(&state, &request, &context, &Method::POST).await,
                    Err(refused) => Outcome {
                        body: refused.body(),
                        kind: OutcomeKind::RequestError,
                    },
                };
                results.push(outcome.body);
            }
            respond(framing, StatusCode::OK, format!("[{}]", results.join(",")))
        }
        item => {
            let item = match persisted(&state, item).await {
                Ok(item) => item,
                Err(refused) => return refusal_response(refused, framing),
            };
            match parse_request(item) {
                Ok(request) => {
                    let outcome = execute(&state, &request, &context, &Method::POST).await;
                    respond_outcome(framing, outcome)
                }
                Err(message) => {
                    http_error(StatusCode::BAD_REQUEST, &message, ErrorCode::BadRequest)
                }
            }
        }
    }
}

#[derive(Deserialize)]
struct GetParams {
    query: Option<String>,
    #[serde(rename = "operationName")]
    operation_name: Option<String>,
    variables: Option<String>,
    /// JSON, for `persistedQuery` (Apollo's link may send hashed queries by GET).
    extensions: Option<String>,
}

async fn graphql_get(req: HttpRequest, state: web::Data<ApiState>) -> HttpResponse {
    let params = match web::Query::<GetParams>::from_query(req.query_string()) {
        Ok(params) => params.into_inner(),
        Err(err) => {
            return http_error(
                StatusCode::BAD_REQUEST,
                &format!("malformed query string: {err}"),
                ErrorCode::BadRequest,
            )
        }
    };
    let extensions = match params
        .extensions
        .as_deref()
        .map(serde_json::from_str::<Json>)
    {
        None => None,
        Some(Ok(extensions @ Json::Object(_))) => Some(extensions),
        Some(_) => {
            return http_error(
                StatusCode::BAD_REQUEST,
                "`extensions` must be a JSON object",
                ErrorCode::BadRequest,
            )
        }
    };
    let mut params = params;
    if let Some(extensions) = extensions {
        let item = json!({"query": params.query, "extensions": extensions});
        match persisted(&state, item).await {
            Ok(item) => params.query = item["query"].as_str().map(str::to_owned),
            Err(refused) => return refusal_response(refused, framing(&req)),
        }
    } else if let Err(refused) = persisted(&state, json!({"query": params.query})).await {
        return refusal_response(refused, framing(&req));
    }
    let Some(query) = params.query else {
        let accept = header_str(&req, header::ACCEPT).unwrap_or("");
        if state.playground && accept.contains("text/html") {
            return crate::ide::page(crate::ide::playground_page());
        }
        return http_error(
            StatusCode::BAD_REQUEST,
            "missing `query` parameter (open this URL in a browser for GraphQL Playground)",
            ErrorCode::BadRequest,
        );
    };
    let variables = match params
        .variables
        .as_deref()
        .map(serde_json::from_str::<Json>)
    {
        None => None,
        Some(Ok(Json::Null)) => None,
        Some(Ok(variables @ Json::Object(_))) => Some(variables),
        Some(Ok(_)) | Some(Err(_)) => {
            return http_error(
                StatusCode::BAD_REQUEST,
                "`variables` must be a JSON object",
                ErrorCode::BadRequest,
            )
        }
    };
    let request = match parse_request(json!({
        "query": query,
        "operationName": params.operation_name,
        "variables": variables,
    })) {
        Ok(request) => request,
        Err(message) => {
            return http_error(StatusCode::BAD_REQUEST, &message, ErrorCode::BadRequest)
        }
    };
    let context = context(&req, &state).await;
    let outcome = execute(&state, &request, &context, &Method::GET).await;
    if outcome.kind == OutcomeKind::MutationOverGet {
        return HttpResponse::MethodNotAllowed()
            .insert_header((header::ALLOW, "POST"))
            .content_type("application/json")
            .body(outcome.body);
    }
    respond_outcome(framing(&req), outcome)
}

async fn method_not_allowed(req: HttpRequest) -> HttpResponse {
    HttpResponse::MethodNotAllowed()
        .insert_header((header::ALLOW, "GET, POST"))
        .content_type("application/json")
        .body(graphql_error_body(
            &format!(
                "method {} is not allowed: use POST (or GET for queries)",
                req.method()
            ),
            ErrorCode::MethodNotAllowed,
        ))
}

async fn graphiql(state: web::Data<ApiState>) -> HttpResponse {
    if !state.playground {
        return HttpResponse::NotFound()
            .content_type("application/json")
            .body(graphql_error_body("not found", ErrorCode::NotFound));
    }
    crate::ide::page(crate::ide::graphiql_page())
}

/// Verifies the `Authorization` header once per HTTP request; resolvers see the outcome.
async fn context(req: &HttpRequest, state: &ApiState) -> Context {
    context_with(req, state, None).await
}

/// The request's context; with `once` (a key and a digest of the request), every write the
/// signed-in user makes through it is made at most once under that key.
async fn context_with(req: &HttpRequest, state: &ApiState, once: Option<(&str, &str)>) -> Context {
    // A header that is not visible ASCII is malformed, not missing.
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|value| value.to_str().unwrap_or("?"));
    let auth = state.verifier.authenticate(header).await;
    let store = match (once, &auth) {
        (Some((key, fingerprint)), Ok(claims)) => {
            state
                .store
                .idempotent(store::idempotency::IdempotentRequest::new(
                    claims.user_id,
                    key,
                    fingerprint,
                    state.idempotency_window,
                ))
        }
        _ => state.store.clone(),
    };
    Context::new(auth).with_data(Arc::new(store))
}

/// Longest idempotency key accepted.
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// The client's idempotency key: the `Idempotency-Key` header, or `extensions.idempotencyKey`
/// of a single operation (what a websocket client can send, forwarded here by the gateway).
/// `Err`: a malformed key or two that differ, with what to do.
fn idempotency_key(req: &HttpRequest, document: &Json) -> Result<Option<String>, String> {
    let header = match req.headers().get("idempotency-key") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| "the Idempotency-Key header must be visible ASCII".to_owned())?
                .to_owned(),
        ),
    };
    let in_body = match document
        .get("extensions")
        .and_then(|e| e.get("idempotencyKey"))
    {
        None | Some(Json::Null) => None,
        Some(Json::String(key)) => Some(key.clone()),
        Some(_) => return Err("`extensions.idempotencyKey` must be a string".to_owned()),
    };
    let key = match (header, in_body) {
        (Some(header), Some(body)) if header != body => {
            return Err(
                "the Idempotency-Key header and `extensions.idempotencyKey` differ; send one"
                    .to_owned(),
            )
        }
        (header, body) => header.or(body),
    };
    match key {
        Some(key)
            if key.is_empty()
                || key.len() > MAX_IDEMPOTENCY_KEY
                || !key.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Err(format!(
                "an idempotency key is 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters (a \
                 UUID, say), new for each request and the same for its retries"
            ))
        }
        key => Ok(key),
    }
}

/// A digest of what a request asks (its operations, canonically serialized), so that a key
/// reused for another request is told apart from a retry.
fn fingerprint(document: &Json) -> String {
    use sha2::{Digest as _, Sha256};
    let mut document = document.clone();
    if let Some(extensions) = document.get_mut("extensions").and_then(Json::as_object_mut) {
        extensions.remove("idempotencyKey");
    }
    let digest = Sha256::digest(document.to_string().as_bytes());
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A refused request, framed as the client asked (400 with `application/graphql-response+json`,
/// 200 with `application/json`). `PERSISTED_QUERY_NOT_FOUND` is always 200, as Apollo's servers
/// answer it: it is the protocol's first step, after which the client sends the document.
fn refusal_response(refusal: Refusal, framing: Framing) -> HttpResponse {
    let body = refusal.body();
    match refusal.code {
        ErrorCode::PersistedQueryNotFound | ErrorCode::PersistedQueryNotSupported => {
            respond(framing, StatusCode::OK, body)
        }
        ErrorCode::ServiceUnavailable => respond(framing, StatusCode::SERVICE_UNAVAILABLE, body),
        _ => respond_outcome(
            framing,
            Outcome {
                body,
                kind: OutcomeKind::RequestError,
            },
        ),
    }
}

/// The request with its persisted document filled in (`extensions.persistedQuery`), or why it
/// is refused (an unknown hash, a mismatch, a document outside the trusted ones).
async fn persisted(state: &ApiState, item: Json) -> Result<Json, Refusal> {
    let Json::Object(mut map) = item else {
        return Ok(item);
    };
    state.persisted.resolve(&mut map).await?;
    Ok(Json::Object(map))
}

/// A JSON object with a `query` string, optional `operationName` and `variables`.
fn parse_request(item: Json) -> Result<GraphQLRequest, String> {
    let Json::Object(map) = &item else {
        return Err("the request must be a JSON object with a `query` string".into());
    };
    match map.get("query") {
        Some(Json::String(_)) => {}
        None | Some(Json::Null) => return Err("the request has no `query`".into()),
        Some(_) => return Err("`query` must be a string".into()),
    }
    if !matches!(
        map.get("variables"),
        None | Some(Json::Null) | Some(Json::Object(_))
    ) {
        return Err("`variables` must be a JSON object".into());
    }
    if !matches!(
        map.get("operationName"),
        None | Some(Json::Null) | Some(Json::String(_))
    ) {
        return Err("`operationName` must be a string".into());
    }
    serde_json::from_value(item).map_err(|err| format!("malformed request: {err}"))
}

/// Parses (within the document limits), validates and executes one operation.
async fn execute(
    state: &ApiState,
    request: &GraphQLRequest,
    context: &Context,
    method: &Method,
) -> Outcome {
    if let Some(message) = graphql_schema::unknown_variable_type(&state.schema, &request.query) {
        return Outcome {
            body: graphql_error_body(&message, ErrorCode::GraphqlValidationFailed),
            kind: OutcomeKind::RequestError,
        };
    }
    let operation = match ValidatedOperation::new(
        &request.query,
        request.operation_name.as_deref(),
        &state.schema,
    ) {
        Ok(operation) => operation,
        Err(err) => {
            return Outcome {
                body: json!({ "errors": graphql_schema::request_errors(&err) }).to_string(),
                kind: OutcomeKind::RequestError,
            }
        }
    };
    match operation.operation_type() {
        OperationType::Subscription => {
            return Outcome {
                body: graphql_error_body(SUBSCRIPTION_OVER_HTTP, ErrorCode::SubscriptionOverHttp),
                kind: OutcomeKind::RequestError,
            }
        }
        OperationType::Mutation if method == Method::GET => {
            return Outcome {
                body: graphql_error_body(
                    "mutations must be sent with POST",
                    ErrorCode::MethodNotAllowed,
                ),
                kind: OutcomeKind::MutationOverGet,
            }
        }
        _ => {}
    }
    let variables = request.variables();
    let span = service_kit::telemetry::span(|| {
        let kind = match operation.operation_type() {
            OperationType::Mutation => "mutation",
            _ => "query",
        };
        let name = request.operation_name.as_deref().unwrap_or("");
        tracing::info_span!(
            "GraphQL operation",
            otel.name = %format!("{kind} {name}").trim_end(),
            graphql.operation.type = kind,
            graphql.operation.name = name,
            graphql.outcome = tracing::field::Empty,
        )
    });
    let executed = operation
        .execute(&variables, context)
        .instrument(span.clone())
        .await;
    if !span.is_none() {
        // The first error's code, or OK: what the operation came to, for a trace search.
        let code = match &executed {
            Ok((_, errors)) => errors.first().map(|error| {
                serde_json::to_value(error)
                    .ok()
                    .and_then(|e| e["extensions"]["code"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| ErrorCode::InternalServerError.as_str().to_owned())
            }),
            Err(_) => Some(ErrorCode::GraphqlValidationFailed.as_str().to_owned()),
        };
        span.record("graphql.outcome", code.as_deref().unwrap_or("OK"));
        if let Some(code) = &code {
            service_kit::telemetry::set_error(&span, code);
        }
    }
    match executed {
        Ok((data, errors)) => {
            let body = ExecutedBody {
                data: &data,
                errors: &errors,
            };
            Outcome {
                body: serde_json::to_string(&body).unwrap_or_else(|err| {
                    tracing::error!(%err, "cannot serialize a GraphQL response");
                    graphql_error_body("internal server error", ErrorCode::InternalServerError)
                }),
                kind: OutcomeKind::Executed,
            }
        }
        Err(err) => Outcome {
            body: json!({ "errors": graphql_schema::request_errors(&err) }).to_string(),
            kind: OutcomeKind::RequestError,
        },
    }
}

/// `{"data": …, "errors": […]}` of an executed operation, `errors` left out when empty.
#[derive(Serialize)]
struct ExecutedBody<'a> {
    data: &'a juniper::Value<DefaultScalarValue>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    errors: &'a [juniper::ExecutionError<DefaultScalarValue>],
}

/// `{"errors": [{"message": …, "extensions": {"code": …}}]}`, serialized.
fn respond_outcome(framing: Framing, outcome: Outcome) -> HttpResponse {
    let status = if outcome.kind != OutcomeKind::Executed && framing == Framing::GraphQLResponse {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    respond(framing, status, outcome.body)
}

fn respond(framing: Framing, status: StatusCode, body: String) -> HttpResponse {
    let content_type = match framing {
        Framing::Json => "application/json",
        Framing::GraphQLResponse => GRAPHQL_RESPONSE_JSON,
    };
    HttpResponse::build(status)
        .content_type(content_type)
        .body(body)
}

fn http_error(status: StatusCode, message: &str, code: ErrorCode) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("application/json")
        .body(graphql_error_body(message, code))
}

fn header_str(req: &HttpRequest, name: header::HeaderName) -> Option<&str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}
