//! Tokens: JWT claims and keys ([`jwt`]), the `Authorization: Bearer` check against configured
//! keys or a cached JWKS ([`auth`]), and the per-user logout cutoffs that revoke access tokens
//! on every replica ([`revocations`]). auth-service issues what this crate verifies; the
//! gateway and api-service only verify.

pub mod auth;
pub mod jwt;
pub mod revocations;
pub mod settings;

impl From<jwt::TokenError> for service_kit::error::ApiError {
    fn from(err: jwt::TokenError) -> Self {
        service_kit::error::ApiError::TokenNotValid(err.to_string())
    }
}
