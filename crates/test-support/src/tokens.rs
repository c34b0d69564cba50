//! The one token minter of the test crates: tokens signed as auth-service signs them (the same
//! claims, `iat` now, a fresh `jti`), with the keys a service configured the same way holds; and
//! [`forge_hs256`], for the tests that sign what auth-service never would.

use tokens::jwt::{new_jti, Claims, JwtKeys, SecretPolicy, TokenType};
use tokens::settings::JwtArgs;

/// The keys of a service started with `JWT_SECRET=secret` (HS256) and nothing else set.
pub fn hs256_keys(secret: &str) -> JwtKeys {
    let args = JwtArgs {
        jwt_algorithm: "HS256".to_owned(),
        jwt_secret: Some(secret.to_owned()),
        jwt_private_key_file: None,
        jwt_key_id: None,
        jwt_verify_keys: Vec::new(),
        jwt_accepted_algorithms: Vec::new(),
        access_token_lifetime_secs: 300,
        refresh_token_lifetime_secs: 86_400,
        jwt_leeway_secs: 5,
    };
    JwtKeys::from_args(&args, SecretPolicy::RequireConfigured)
        .unwrap()
        .0
}

/// A token for `user_id`/`username`, expiring `lifetime_secs` from now (negative: already
/// expired), signed with `keys`.
pub fn sign(
    keys: &JwtKeys,
    user_id: i64,
    username: &str,
    token_type: TokenType,
    lifetime_secs: i64,
) -> String {
    sign_as(keys, user_id, username, false, token_type, lifetime_secs)
}

/// [`sign`], for a staff user when `is_staff` (the claim auth-service sets).
pub fn sign_as(
    keys: &JwtKeys,
    user_id: i64,
    username: &str,
    is_staff: bool,
    token_type: TokenType,
    lifetime_secs: i64,
) -> String {
    let now = chrono::Utc::now().timestamp();
    keys.signing
        .sign(&Claims {
            token_type,
            exp: now + lifetime_secs,
            iat: now,
            iat_ms: None,
            jti: new_jti(),
            user_id,
            username: username.to_owned(),
            is_staff,
        })
        .unwrap()
}

/// [`sign`] with the HS256 keys of `secret`.
pub fn hs256(
    secret: &str,
    user_id: i64,
    username: &str,
    token_type: TokenType,
    lifetime_secs: i64,
) -> String {
    sign(
        &hs256_keys(secret),
        user_id,
        username,
        token_type,
        lifetime_secs,
    )
}

/// Arbitrary `claims` signed with HS256, `secret` and `kid`: what an attacker (or a test of a
/// claim's handling) signs, whatever the claims say.
pub fn forge_hs256(secret: &[u8], kid: Option<&str>, claims: &serde_json::Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}
