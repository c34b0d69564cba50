//! The token settings: the keys that sign and verify (JWT_*), and where a verifier without keys
//! of its own fetches them (JWKS_*).

use std::path::PathBuf;

use clap::Args;

/// Settings of the JWT keys. Which of them are required depends on the algorithm; [`crate::jwt`]
/// checks them and reports the missing one by name.
#[derive(Debug, Clone, Args)]
pub struct JwtArgs {
    /// Signing algorithm of new tokens: `HS256` (shared secret) or `EdDSA` (Ed25519 private key).
    #[arg(long, env = "JWT_ALGORITHM", default_value = "HS256")]
    pub jwt_algorithm: String,
    /// Shared HS256 secret (at least 32 bytes). Required for HS256 unless `--demo`.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM file of the Ed25519 (PKCS#8) private key that signs tokens, for EdDSA.
    #[arg(long, env = "JWT_PRIVATE_KEY_FILE")]
    pub jwt_private_key_file: Option<PathBuf>,
    /// Key id (`kid`) written into every token's header. Defaults to a fingerprint of the key.
    #[arg(long, env = "JWT_KEY_ID")]
    pub jwt_key_id: Option<String>,
    /// Further Ed25519 public keys that verify tokens, as `KID=PATH.pem`, comma-separated: the keys
    /// of previous signing keys during a rotation.
    #[arg(long, env = "JWT_VERIFY_KEYS", value_delimiter = ',')]
    pub jwt_verify_keys: Vec<String>,
    /// Algorithms accepted on verification, comma-separated. Defaults to the signing algorithm
    /// (plus EdDSA when verification keys are given). Never taken from the token.
    #[arg(long, env = "JWT_ACCEPTED_ALGORITHMS", value_delimiter = ',')]
    pub jwt_accepted_algorithms: Vec<String>,
    /// Lifetime of access tokens, in seconds.
    #[arg(long, env = "ACCESS_TOKEN_LIFETIME_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub access_token_lifetime_secs: u64,
    /// Lifetime of refresh tokens, in seconds.
    #[arg(long, env = "REFRESH_TOKEN_LIFETIME_SECS", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    pub refresh_token_lifetime_secs: u64,
    /// Clock skew tolerated when checking `exp`, in seconds (jsonwebtoken's default of 60 would keep
    /// expired tokens alive for a minute).
    #[arg(long, env = "JWT_LEEWAY_SECS", default_value_t = 5)]
    pub jwt_leeway_secs: u64,
}

/// Where services other than auth-service get verification keys when they use auth-service's
/// JWKS instead of configured keys.
#[derive(Debug, Clone, Args)]
pub struct JwksArgs {
    /// auth-service's JWKS URL (e.g. `http://127.0.0.1:8001/api/token/jwks/`). When set, tokens
    /// are verified with its public keys and no JWT secret or key file is needed.
    #[arg(long, env = "JWKS_URL")]
    pub jwks_url: Option<String>,
    /// Least time between two JWKS fetches triggered by unknown key ids, in seconds.
    #[arg(long, env = "JWKS_MIN_REFETCH_SECS", default_value_t = 10)]
    pub jwks_min_refetch_secs: u64,
    /// Age after which the cached JWKS is fetched again, in seconds.
    #[arg(long, env = "JWKS_MAX_AGE_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub jwks_max_age_secs: u64,
}
