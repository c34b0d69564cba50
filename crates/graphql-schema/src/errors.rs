//! Errors of resolvers and of whole requests, each with a stable `extensions.code`.

use domain::{StoreError, WriteError};
use juniper::{FieldError, IntoFieldError, Object, ScalarValue, Value};
use service_kit::error::ErrorCode;

/// Errors of resolvers, each with a stable `extensions.code`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GraphQLError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadUserInput(String),
    /// The write conflicts with what the data holds (a parent whose children refuse its deletion).
    #[error("{0}")]
    Conflict(String),
    /// An `Idempotency-Key` used before for another request.
    #[error("{0}")]
    IdempotencyKeyReused(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("service temporarily unavailable, try again later")]
    Unavailable,
    #[error("{0}")]
    KeysUnavailable(String),
    #[error("internal server error")]
    Internal,
}

impl GraphQLError {
    pub fn code(&self) -> ErrorCode {
        match self {
            GraphQLError::Unauthenticated(_) => ErrorCode::Unauthenticated,
            GraphQLError::Forbidden(_) => ErrorCode::Forbidden,
            GraphQLError::NotFound(_) => ErrorCode::NotFound,
            GraphQLError::BadUserInput(_) => ErrorCode::BadUserInput,
            GraphQLError::Conflict(_) => ErrorCode::Conflict,
            GraphQLError::IdempotencyKeyReused(_) => ErrorCode::IdempotencyKeyReused,
            GraphQLError::BadRequest(_) => ErrorCode::BadRequest,
            GraphQLError::Unavailable | GraphQLError::KeysUnavailable(_) => {
                ErrorCode::ServiceUnavailable
            }
            GraphQLError::Internal => ErrorCode::InternalServerError,
        }
    }
}

/// juniper's request-level errors (the document did not parse, passed a limit or did not
/// validate) as a GraphQL `errors` list, each with an `extensions.code`. One function for HTTP
/// (api-service) and the socket (the gateway), so that a refused document reads the same on both.
pub fn request_errors(err: &juniper::GraphQLError) -> serde_json::Value {
    use juniper::{GraphQLError as Refused, ParseError};
    let code = match err {
        Refused::ParseError(parse) => match parse.item {
            ParseError::DepthLimitExceeded(_) => ErrorCode::QueryTooDeep,
            ParseError::FieldLimitExceeded(_) => ErrorCode::QueryTooComplex,
            ParseError::TokenLimitExceeded(_) => ErrorCode::QueryTooLarge,
            _ => ErrorCode::GraphqlParseFailed,
        },
        Refused::ValidationError(_) => ErrorCode::GraphqlValidationFailed,
        _ => ErrorCode::BadRequest,
    };
    let mut errors = serde_json::to_value(err)
        .ok()
        .filter(serde_json::Value::is_array)
        .unwrap_or_else(|| serde_json::json!([{"message": err.to_string()}]));
    if let serde_json::Value::Array(items) = &mut errors {
        for item in items {
            if let serde_json::Value::Object(map) = item {
                map.insert(
                    "extensions".into(),
                    serde_json::json!({ "code": code.as_str() }),
                );
            }
        }
    }
    errors
}

/// `{"code": "<CODE>"}`, the `extensions` of an error.
pub fn extensions<S: ScalarValue>(code: ErrorCode) -> Value<S> {
    let mut object = Object::with_capacity(1);
    object.add_field("code", Value::scalar(code.as_str().to_owned()));
    Value::Object(object)
}

impl<S: ScalarValue> IntoFieldError<S> for GraphQLError {
    fn into_field_error(self) -> FieldError<S> {
        FieldError::new(self.to_string(), extensions(self.code()))
    }
}

impl From<StoreError> for GraphQLError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(cause) => {
                tracing::warn!(%cause, "database unavailable");
                GraphQLError::Unavailable
            }
            other => {
                tracing::error!(error = %other, "database error");
                GraphQLError::Internal
            }
        }
    }
}

impl From<WriteError> for GraphQLError {
    fn from(err: WriteError) -> Self {
        match err {
            WriteError::NotFound(_) => GraphQLError::NotFound(err.to_string()),
            WriteError::Forbidden(_) => GraphQLError::Forbidden(err.to_string()),
            WriteError::UnknownUser => GraphQLError::Unauthenticated(err.to_string()),
            WriteError::HasChildren { .. } => GraphQLError::Conflict(err.to_string()),
            WriteError::IdempotencyKeyReused => GraphQLError::IdempotencyKeyReused(err.to_string()),
            WriteError::Store(cause) => cause.into(),
        }
    }
}
