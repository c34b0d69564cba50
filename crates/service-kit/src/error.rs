//! The error every HTTP handler returns. Its variants are the wire contract: each maps once, here,
//! to a status code and a SimpleJWT/DRF-shaped body, and to a stable GraphQL `extensions.code`.
//! Unexpected causes are logged with their detail and reach the client only as an opaque 500.

use std::collections::BTreeMap;

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

/// Every `extensions.code` a GraphQL error of this stack carries, on HTTP, the websocket and the
/// streamed transports alike: clients match on these names, so they are one list, here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// No token, or one that is invalid, expired or revoked.
    Unauthenticated,
    /// Signed in, but not allowed this.
    Forbidden,
    /// No such record (or none the caller may see), or no such path.
    NotFound,
    /// An argument, a variable or a cursor is not acceptable.
    BadUserInput,
    /// The request itself is malformed (not JSON, no `query`, a wrong field type).
    BadRequest,
    /// The write conflicts with what the data holds (a parent whose children refuse its deletion).
    Conflict,
    /// An `Idempotency-Key` used before for another request.
    IdempotencyKeyReused,
    /// A dependency (the database, Redis, the key set) is unreachable; retry.
    ServiceUnavailable,
    /// A fault of the server; the detail is in its log only.
    InternalServerError,
    /// The document does not parse.
    GraphqlParseFailed,
    /// The document does not validate against the schema.
    GraphqlValidationFailed,
    /// The document nests deeper than MAX_QUERY_DEPTH.
    QueryTooDeep,
    /// The document selects more than MAX_QUERY_FIELDS fields.
    QueryTooComplex,
    /// The document has more than MAX_QUERY_TOKENS tokens.
    QueryTooLarge,
    /// An automatic persisted query's hash the server does not hold yet: send the document with it.
    PersistedQueryNotFound,
    /// Persisted queries are off here.
    PersistedQueryNotSupported,
    /// The document sent does not hash to the hash sent with it.
    PersistedQueryHashMismatch,
    /// Only trusted documents are served, and this is none.
    PersistedQueryNotInList,
    /// The body is over its limit.
    PayloadTooLarge,
    /// The body did not arrive in time.
    RequestTimeout,
    /// Too many attempts; retry after the time given.
    RateLimited,
    /// Too much of one kind of work in flight in this process; retry.
    Busy,
    /// A body type other than JSON (or GraphQL's own).
    UnsupportedMediaType,
    /// A method the path does not serve (a mutation over GET).
    MethodNotAllowed,
    /// None of the response types the client accepts is served.
    NotAcceptable,
    /// A batch sent where batches are off.
    BatchNotAccepted,
    /// More operations in a batch than allowed.
    BatchTooLarge,
    /// A batch whose operations add up to more fields than one document may select.
    BatchTooExpensive,
    /// A subscription sent to the plain HTTP endpoint.
    SubscriptionOverHttp,
    /// More subscriptions on one connection than MAX_SUBSCRIPTIONS_PER_CONNECTION.
    TooManySubscriptions,
    /// More streams for a user or an address than allowed.
    TooManyConnections,
    /// The client read its stream too slowly and was cut off; reconnect.
    SlowConsumer,
    /// The process is stopping; reconnect.
    ShuttingDown,
}

impl ErrorCode {
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::BadUserInput => "BAD_USER_INPUT",
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            ErrorCode::ServiceUnavailable => "SERVICE_UNAVAILABLE",
            ErrorCode::InternalServerError => "INTERNAL_SERVER_ERROR",
            ErrorCode::GraphqlParseFailed => "GRAPHQL_PARSE_FAILED",
            ErrorCode::GraphqlValidationFailed => "GRAPHQL_VALIDATION_FAILED",
            ErrorCode::QueryTooDeep => "QUERY_TOO_DEEP",
            ErrorCode::QueryTooComplex => "QUERY_TOO_COMPLEX",
            ErrorCode::QueryTooLarge => "QUERY_TOO_LARGE",
            ErrorCode::PersistedQueryNotFound => "PERSISTED_QUERY_NOT_FOUND",
            ErrorCode::PersistedQueryNotSupported => "PERSISTED_QUERY_NOT_SUPPORTED",
            ErrorCode::PersistedQueryHashMismatch => "PERSISTED_QUERY_HASH_MISMATCH",
            ErrorCode::PersistedQueryNotInList => "PERSISTED_QUERY_NOT_IN_LIST",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::RequestTimeout => "REQUEST_TIMEOUT",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::Busy => "BUSY",
            ErrorCode::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            ErrorCode::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ErrorCode::NotAcceptable => "NOT_ACCEPTABLE",
            ErrorCode::BatchNotAccepted => "BATCH_NOT_ACCEPTED",
            ErrorCode::BatchTooLarge => "BATCH_TOO_LARGE",
            ErrorCode::BatchTooExpensive => "BATCH_TOO_EXPENSIVE",
            ErrorCode::SubscriptionOverHttp => "SUBSCRIPTION_OVER_HTTP",
            ErrorCode::TooManySubscriptions => "TOO_MANY_SUBSCRIPTIONS",
            ErrorCode::TooManyConnections => "TOO_MANY_CONNECTIONS",
            ErrorCode::SlowConsumer => "SLOW_CONSUMER",
            ErrorCode::ShuttingDown => "SHUTTING_DOWN",
        }
    }

    /// Every code, for documentation and tests.
    pub const ALL: [ErrorCode; 33] = [
        ErrorCode::Unauthenticated,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::BadUserInput,
        ErrorCode::BadRequest,
        ErrorCode::Conflict,
        ErrorCode::IdempotencyKeyReused,
        ErrorCode::ServiceUnavailable,
        ErrorCode::InternalServerError,
        ErrorCode::GraphqlParseFailed,
        ErrorCode::GraphqlValidationFailed,
        ErrorCode::QueryTooDeep,
        ErrorCode::QueryTooComplex,
        ErrorCode::QueryTooLarge,
        ErrorCode::PersistedQueryNotFound,
        ErrorCode::PersistedQueryNotSupported,
        ErrorCode::PersistedQueryHashMismatch,
        ErrorCode::PersistedQueryNotInList,
        ErrorCode::PayloadTooLarge,
        ErrorCode::RequestTimeout,
        ErrorCode::RateLimited,
        ErrorCode::Busy,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::MethodNotAllowed,
        ErrorCode::NotAcceptable,
        ErrorCode::BatchNotAccepted,
        ErrorCode::BatchTooLarge,
        ErrorCode::BatchTooExpensive,
        ErrorCode::SubscriptionOverHttp,
        ErrorCode::TooManySubscriptions,
        ErrorCode::TooManyConnections,
        ErrorCode::SlowConsumer,
        ErrorCode::ShuttingDown,
    ];
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no active account found with the given credentials")]
    NoActiveAccount,
    #[error("token is invalid or expired: {0}")]
    /// Why, for the log only: the client is told no more than "invalid or expired".
    TokenNotValid(String),
    #[error("invalid fields: {0:?}")]
    FieldErrors(BTreeMap<String, Vec<String>>),
    #[error("{detail}")]
    BadRequest { detail: String, code: &'static str },
    #[error("request body exceeds {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("rate limited for {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("not found")]
    NotFound,
    /// Too much of one kind of work is in flight in this process (e.g. password checks); not the
    /// client's fault, so 503 rather than 429.
    #[error("busy: {what}")]
    Busy { what: &'static str },
    /// The client did not finish sending the body in time.
    #[error("request body not received within {secs} s")]
    BodyTimeout { secs: u64 },
    #[error("dependency unavailable: {0}")]
    Unavailable(String),
    /// A logout whose cutoff could not be stored: nothing was changed, so the client can try
    /// again with the same refresh token.
    #[error("logout not recorded: {0}")]
    LogoutUnavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn field(name: &str, message: &str) -> Self {
        let mut fields = BTreeMap::new();
        fields.insert(name.to_owned(), vec![message.to_owned()]);
        ApiError::FieldErrors(fields)
    }

    /// The `extensions.code` of the GraphQL error this becomes.
    pub fn graphql_code(&self) -> ErrorCode {
        match self {
            ApiError::NoActiveAccount | ApiError::TokenNotValid(_) => ErrorCode::Unauthenticated,
            ApiError::FieldErrors(_) | ApiError::BadRequest { .. } => ErrorCode::BadUserInput,
            ApiError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            ApiError::RateLimited { .. } => ErrorCode::RateLimited,
            ApiError::NotFound => ErrorCode::NotFound,
            ApiError::Busy { .. } => ErrorCode::Busy,
            ApiError::BodyTimeout { .. } => ErrorCode::RequestTimeout,
            ApiError::Unavailable(_) | ApiError::LogoutUnavailable(_) => {
                ErrorCode::ServiceUnavailable
            }
            ApiError::Internal(_) => ErrorCode::InternalServerError,
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::NoActiveAccount | ApiError::TokenNotValid(_) => StatusCode::UNAUTHORIZED,
            ApiError::FieldErrors(_) | ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unavailable(_) | ApiError::LogoutUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let body = match self {
            ApiError::NoActiveAccount => json!({
                "detail": "No active account found with the given credentials",
                "code": "no_active_account",
            }),
            ApiError::TokenNotValid(reason) => {
                tracing::debug!(%reason, "token refused");
                json!({"detail": "Token is invalid or expired", "code": "token_not_valid"})
            }
            ApiError::FieldErrors(fields) => json!(fields),
            ApiError::BadRequest { detail, code } => json!({"detail": detail, "code": code}),
            ApiError::PayloadTooLarge { limit } => json!({
                "detail": format!("Request body exceeds the limit of {limit} bytes."),
                "code": "payload_too_large",
            }),
            ApiError::RateLimited { retry_after_secs } => json!({
                "detail": format!("Request was throttled. Expected available in {retry_after_secs} seconds."),
                "code": "throttled",
            }),
            ApiError::NotFound => json!({"detail": "Not found.", "code": "not_found"}),
            ApiError::Busy { what } => json!({
                "detail": format!("Too many {what} in progress; try again in a second."),
                "code": "busy",
            }),
            ApiError::BodyTimeout { secs } => json!({
                "detail": format!("The request body was not received within {secs} seconds."),
                "code": "request_timeout",
            }),
            ApiError::Unavailable(cause) => {
                tracing::warn!(%cause, "dependency unavailable");
                json!({"detail": "Service temporarily unavailable, try again later.", "code": "service_unavailable"})
            }
            ApiError::LogoutUnavailable(cause) => {
                tracing::warn!(%cause, "logout not recorded");
                json!({
                    "detail": "Logout failed: the access tokens could not be revoked right now. \
                               Nothing was changed and the refresh token is still valid; \
                               try again in a moment.",
                    "code": "logout_unavailable",
                })
            }
            ApiError::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                json!({"detail": "Internal server error.", "code": "internal_error"})
            }
        };
        self.response().json(body)
    }
}

impl ApiError {
    /// The response's status and headers, whichever shape its body takes.
    fn response(&self) -> actix_web::HttpResponseBuilder {
        let mut response = HttpResponse::build(self.status_code());
        match self {
            ApiError::RateLimited { retry_after_secs } => {
                response.insert_header((header::RETRY_AFTER, retry_after_secs.to_string()));
            }
            ApiError::Busy { .. } | ApiError::LogoutUnavailable(_) => {
                response.insert_header((header::RETRY_AFTER, "1"));
            }
            // The connection carries an unfinished body: it cannot serve another request.
            ApiError::BodyTimeout { .. } => {
                response.insert_header((header::CONNECTION, "close"));
            }
            _ => {}
        }
        response
    }

    /// The same error for a GraphQL endpoint: the same status and headers, with GraphQL's body,
    /// `{"errors":[{"message","extensions":{"code"}}]}`.
    pub fn graphql_response(&self) -> HttpResponse {
        if let ApiError::Internal(cause) = self {
            tracing::error!(%cause, "internal error");
        }
        let message = match self {
            ApiError::Internal(_) => "internal server error".to_owned(),
            other => other.to_string(),
        };
        self.response()
            .content_type("application/json")
            .body(graphql_error_body(&message, self.graphql_code()))
    }
}

/// A GraphQL request refused before it ran: one error's message and code, whichever transport
/// frames it (a response body over HTTP, an `error` message on the socket, a stream's end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub message: String,
    pub code: ErrorCode,
}

impl Refusal {
    pub fn new(message: impl Into<String>, code: ErrorCode) -> Self {
        Self {
            message: message.into(),
            code,
        }
    }

    /// `{"errors":[…]}` of a response that carries the refusal and no data.
    pub fn body(&self) -> String {
        graphql_error_body(&self.message, self.code)
    }
}

/// A GraphQL response carrying one error and no data: `{"errors":[{"message","extensions":
/// {"code"}}]}`, the body of every request-level refusal of a GraphQL endpoint.
pub fn graphql_error_body(message: &str, code: ErrorCode) -> String {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        errors: [Error<'a>; 1],
    }
    #[derive(serde::Serialize)]
    struct Error<'a> {
        message: &'a str,
        extensions: Extensions,
    }
    #[derive(serde::Serialize)]
    struct Extensions {
        code: ErrorCode,
    }
    let body = Body {
        errors: [Error {
            message,
            extensions: Extensions { code },
        }],
    };
    serde_json::to_string(&body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn every_error_code_is_in_the_readme_and_named_once() {
        let readme = include_str!("../../../README.md");
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "{code} named twice");
            assert!(
                readme.contains(&format!("| `{code}` |")),
                "README's table of error codes lacks {code}"
            );
        }
    }
}
