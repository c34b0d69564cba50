//! The error every HTTP handler returns. Its variants are the wire contract: each maps once, here,
//! to a status code and a SimpleJWT/DRF-shaped body, and to a stable GraphQL `extensions.code`.
//! Unexpected causes are logged with their detail and reach the client only as an opaque 500.

use std::collections::BTreeMap;

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

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
    pub fn graphql_code(&self) -> &'static str {
        match self {
            ApiError::NoActiveAccount | ApiError::TokenNotValid(_) => "UNAUTHENTICATED",
            ApiError::FieldErrors(_) | ApiError::BadRequest { .. } => "BAD_USER_INPUT",
            ApiError::PayloadTooLarge { .. } => "PAYLOAD_TOO_LARGE",
            ApiError::RateLimited { .. } => "RATE_LIMITED",
            ApiError::NotFound => "NOT_FOUND",
            ApiError::Busy { .. } => "BUSY",
            ApiError::BodyTimeout { .. } => "REQUEST_TIMEOUT",
            ApiError::Unavailable(_) | ApiError::LogoutUnavailable(_) => "SERVICE_UNAVAILABLE",
            ApiError::Internal(_) => "INTERNAL_SERVER_ERROR",
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

/// A GraphQL response carrying one error and no data: `{"errors":[{"message","extensions":
/// {"code"}}]}`, the body of every request-level refusal of a GraphQL endpoint.
pub fn graphql_error_body(message: &str, code: &str) -> String {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        errors: [Error<'a>; 1],
    }
    #[derive(serde::Serialize)]
    struct Error<'a> {
        message: &'a str,
        extensions: Extensions<'a>,
    }
    #[derive(serde::Serialize)]
    struct Extensions<'a> {
        code: &'a str,
    }
    let body = Body {
        errors: [Error {
            message,
            extensions: Extensions { code },
        }],
    };
    serde_json::to_string(&body).unwrap_or_default()
}
