//! JSON Web Tokens: the claims (SimpleJWT's, plus `username`), the signing key of auth-service,
//! the verification key set every service holds, and the JWKS document that publishes it.
//!
//! Verification never trusts the token's header for anything but choosing among configured keys:
//! the accepted algorithms come from configuration, every key is pinned to one algorithm, and the
//! header's `alg` must equal the pinned one. That is what makes `alg: none` and HS/EdDSA confusion
//! (an EdDSA public key used as an HMAC secret) fail.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::settings::JwtArgs;
use service_kit::config::ConfigError;

/// A secret that anyone reading the source knows; only the demo/embedded mode may use it.
pub const DEMO_SECRET: &str = "demo-secret-do-not-use-in-production-0123456789";

/// Shortest HS256 secret accepted: RFC 7518 §3.2 asks for a key at least as long as the hash.
const MIN_SECRET_BYTES: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenType {
    Access,
    Refresh,
}

impl fmt::Display for TokenType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenType::Access => "access",
            TokenType::Refresh => "refresh",
        })
    }
}

/// The payload of every token this project issues. Field names follow SimpleJWT so that clients
/// written for the reference stack can read them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub token_type: TokenType,
    pub exp: i64,
    pub iat: i64,
    /// `iat` in milliseconds, a claim of ours: a logout revokes the tokens issued up to its
    /// millisecond ([`crate::revocations`]), and a token issued a moment later, even in the same
    /// second, must not be caught by it. Absent from tokens of other issuers: then `iat` counts,
    /// as the start of its second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat_ms: Option<i64>,
    pub jti: String,
    pub user_id: i64,
    pub username: String,
    /// A claim of ours: the user was staff when the token was issued. The gateway, which has no
    /// database, reads private records for staff by it; a change of a user's staff rights
    /// revokes its access tokens, so no token outlives the rights it states. Absent (false)
    /// from tokens of other issuers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub is_staff: bool,
}

impl Claims {
    /// When the token was issued, in unix milliseconds.
    pub fn issued_at_ms(&self) -> i64 {
        self.iat_ms.unwrap_or_else(|| self.iat.saturating_mul(1000))
    }
}

/// Why a token was refused. The REST endpoints answer every variant with SimpleJWT's single
/// `token_not_valid` body; GraphQL and websocket errors show the message, which says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token claims are malformed or incomplete")]
    BadClaims,
    #[error("token algorithm {0} is not accepted")]
    AlgorithmNotAllowed(String),
    #[error("token is signed by an unknown key")]
    UnknownKey,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf is in the future)")]
    NotYetValid,
    #[error("{found} token used where an {expected} token is required")]
    WrongType {
        expected: TokenType,
        found: TokenType,
    },
    #[error("token has been revoked")]
    Revoked,
}

/// The key auth-service signs with. Only auth-service builds one.
pub struct SigningKey {
    algorithm: Algorithm,
    kid: String,
    key: EncodingKey,
}

impl fmt::Debug for SigningKey {
    // The key material is deliberately left out so a debug log can never print a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("algorithm", &self.algorithm)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    pub fn sign(&self, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key)
    }
}

struct VerifyKey {
    algorithm: Algorithm,
    key: DecodingKey,
    /// The public JWK, for EdDSA keys only: an HMAC secret is never published.
    jwk: Option<serde_json::Value>,
}

/// The keys a service accepts, by `kid`, each pinned to one algorithm.
pub struct VerificationKeys {
    keys: HashMap<String, VerifyKey>,
    accepted: Vec<Algorithm>,
    leeway_secs: u64,
}

impl fmt::Debug for VerificationKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kids: Vec<_> = self.keys.keys().collect();
        kids.sort();
        f.debug_struct("VerificationKeys")
            .field("kids", &kids)
            .field("accepted", &self.accepted)
            .field("leeway_secs", &self.leeway_secs)
            .finish()
    }
}

impl VerificationKeys {
    /// Seconds a token is still accepted after its `exp` (and before its `nbf`).
    pub fn leeway_secs(&self) -> u64 {
        self.leeway_secs
    }

    /// Checks signature, algorithm, key, expiry and the token type.
    pub fn verify(&self, token: &str, expected: TokenType) -> Result<Claims, TokenError> {
        let claims = self.verify_untyped(token)?;
        if claims.token_type != expected {
            return Err(TokenError::WrongType {
                expected,
                found: claims.token_type,
            });
        }
        Ok(claims)
    }

    /// Checks everything but the token type, as SimpleJWT's `/api/token/verify/` does.
    pub fn verify_untyped(&self, token: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|err| match err.kind() {
            // `alg: none` (and any name jsonwebtoken does not know) fails to parse here.
            ErrorKind::InvalidAlgorithmName => TokenError::AlgorithmNotAllowed("none".into()),
            _ => TokenError::Malformed,
        })?;
        if !self.accepted.contains(&header.alg) {
            return Err(TokenError::AlgorithmNotAllowed(format!("{:?}", header.alg)));
        }
        let key = match &header.kid {
            Some(kid) => self.keys.get(kid).ok_or(TokenError::UnknownKey)?,
            // Tokens from SimpleJWT carry no `kid`; accept them only when the choice is unambiguous.
            None => {
                let mut candidates = self.keys.values().filter(|k| k.algorithm == header.alg);
                match (candidates.next(), candidates.next()) {
                    (Some(only), None) => only,
                    _ => return Err(TokenError::UnknownKey),
                }
            }
        };
        if key.algorithm != header.alg {
            return Err(TokenError::AlgorithmNotAllowed(format!("{:?}", header.alg)));
        }
        let mut validation = Validation::new(key.algorithm);
        validation.leeway = self.leeway_secs;
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_exp = true;
        // `nbf` is optional (our tokens carry none), but a token that says it is not valid yet
        // is refused, within the same leeway as `exp`.
        validation.validate_nbf = true;
        let data =
            jsonwebtoken::decode::<Claims>(token, &key.key, &validation).map_err(
                |err| match err.kind() {
                    ErrorKind::ExpiredSignature => TokenError::Expired,
                    ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                    ErrorKind::InvalidSignature => TokenError::BadSignature,
                    ErrorKind::InvalidAlgorithm => {
                        TokenError::AlgorithmNotAllowed(format!("{:?}", header.alg))
                    }
                    ErrorKind::Json(_)
                    | ErrorKind::MissingRequiredClaim(_)
                    | ErrorKind::InvalidClaimFormat(_) => TokenError::BadClaims,
                    _ => TokenError::Malformed,
                },
            )?;
        // A signed `iat_ms` that disagrees with `iat` was not written by auth-service.
        if data
            .claims
            .iat_ms
            .is_some_and(|ms| ms.div_euclid(1000) != data.claims.iat)
        {
            return Err(TokenError::BadClaims);
        }
        Ok(data.claims)
    }

    /// The public keys as a JWKS document (RFC 7517). HMAC secrets are never included.
    pub fn jwks(&self) -> serde_json::Value {
        let mut keys: Vec<(&String, &serde_json::Value)> = self
            .keys
            .iter()
            .filter_map(|(kid, key)| key.jwk.as_ref().map(|jwk| (kid, jwk)))
            .collect();
        keys.sort_by(|a, b| a.0.cmp(b.0));
        serde_json::json!({ "keys": keys.into_iter().map(|(_, jwk)| jwk).collect::<Vec<_>>() })
    }

    /// Builds the verification side from a JWKS document fetched from auth-service, so services
    /// other than auth-service never hold a signing key.
    pub fn from_jwks(jwks: &serde_json::Value, leeway_secs: u64) -> Result<Self, String> {
        let entries = jwks
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or("JWKS has no `keys` array")?;
        let mut keys = HashMap::new();
        for entry in entries {
            let kid = entry.get("kid").and_then(|v| v.as_str());
            let x = entry.get("x").and_then(|v| v.as_str());
            let (Some(kid), Some(x), Some("OKP"), Some("Ed25519")) = (
                kid,
                x,
                entry.get("kty").and_then(|v| v.as_str()),
                entry.get("crv").and_then(|v| v.as_str()),
            ) else {
                // Skipping keys of other types keeps a newer auth-service compatible.
                continue;
            };
            let key = DecodingKey::from_ed_components(x)
                .map_err(|err| format!("JWKS key {kid} is not a valid Ed25519 key: {err}"))?;
            keys.insert(
                kid.to_owned(),
                VerifyKey {
                    algorithm: Algorithm::EdDSA,
                    key,
                    jwk: Some(entry.clone()),
                },
            );
        }
        if keys.is_empty() {
            return Err("JWKS holds no Ed25519 key".into());
        }
        Ok(Self {
            keys,
            accepted: vec![Algorithm::EdDSA],
            leeway_secs,
        })
    }
}

/// The verification side alone, for services that never sign (api-service, the gateway).
/// HS256: the shared `JWT_SECRET` (which could sign, by the nature of HMAC). EdDSA: only the public
/// keys of `JWT_VERIFY_KEYS`; no private key is read. Returns whether the demo secret is in use.
pub fn verification_keys_from_args(
    args: &JwtArgs,
    policy: SecretPolicy,
) -> Result<(VerificationKeys, bool), ConfigError> {
    let algorithm = parse_algorithm(&args.jwt_algorithm)
        .map_err(|msg| ConfigError::new("JWT_ALGORITHM", msg))?;
    if algorithm == Algorithm::HS256 {
        let (keys, uses_demo_secret) = JwtKeys::from_args(args, policy)?;
        return Ok((keys.verification, uses_demo_secret));
    }
    let mut keys = HashMap::new();
    add_verify_keys(&mut keys, &args.jwt_verify_keys)?;
    if keys.is_empty() {
        return Err(ConfigError::new(
            "JWT_VERIFY_KEYS",
            "required for EdDSA when JWKS_URL is not set (KID=PATH of each public key)",
        ));
    }
    Ok((
        VerificationKeys {
            keys,
            accepted: vec![Algorithm::EdDSA],
            leeway_secs: args.jwt_leeway_secs,
        },
        false,
    ))
}

/// Everything the JWT settings produce: the signing key (when this process signs) and the keys
/// that verify.
#[derive(Debug)]
pub struct JwtKeys {
    pub signing: SigningKey,
    pub verification: VerificationKeys,
}

/// Whether the process may fall back to [`DEMO_SECRET`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretPolicy {
    RequireConfigured,
    AllowDemoSecret,
}

impl JwtKeys {
    /// Builds the keys from settings, naming the setting at fault when one is missing or unusable.
    /// Returns whether the demo secret is in use so that the caller can warn about it.
    pub fn from_args(args: &JwtArgs, policy: SecretPolicy) -> Result<(Self, bool), ConfigError> {
        let signing_algorithm = parse_algorithm(&args.jwt_algorithm)
            .map_err(|msg| ConfigError::new("JWT_ALGORITHM", msg))?;
        let mut keys = HashMap::new();
        let (signing, uses_demo_secret) = match signing_algorithm {
            Algorithm::HS256 => hs256_keys(args, policy, &mut keys)?,
            Algorithm::EdDSA => (eddsa_keys(args, &mut keys)?, false),
            other => {
                return Err(ConfigError::new(
                    "JWT_ALGORITHM",
                    format!("{other:?} cannot sign tokens here"),
                ))
            }
        };
        add_verify_keys(&mut keys, &args.jwt_verify_keys)?;
        let accepted = accepted_algorithms(args, &keys)?;
        if !accepted.contains(&signing.algorithm) {
            return Err(ConfigError::new(
                "JWT_ACCEPTED_ALGORITHMS",
                format!(
                    "must include the signing algorithm {:?}, or new tokens would be refused",
                    signing.algorithm
                ),
            ));
        }
        Ok((
            JwtKeys {
                signing,
                verification: VerificationKeys {
                    keys,
                    accepted,
                    leeway_secs: args.jwt_leeway_secs,
                },
            },
            uses_demo_secret,
        ))
    }
}

/// The HS256 signing key (and its verification key, added to `keys`), and whether it is the
/// demo secret.
fn hs256_keys(
    args: &JwtArgs,
    policy: SecretPolicy,
    keys: &mut HashMap<String, VerifyKey>,
) -> Result<(SigningKey, bool), ConfigError> {
    let mut uses_demo_secret = false;
    let secret = match (&args.jwt_secret, policy) {
        (Some(secret), _) => secret.clone(),
        (None, SecretPolicy::AllowDemoSecret) => {
            uses_demo_secret = true;
            DEMO_SECRET.to_owned()
        }
        (None, SecretPolicy::RequireConfigured) => {
            return Err(ConfigError::new(
                "JWT_SECRET",
                "required for HS256 (or run in demo mode, or use JWT_ALGORITHM=EdDSA)",
            ))
        }
    };
    if secret.len() < MIN_SECRET_BYTES {
        return Err(ConfigError::new(
            "JWT_SECRET",
            format!("must be at least {MIN_SECRET_BYTES} bytes long"),
        ));
    }
    let kid = args
        .jwt_key_id
        .clone()
        .unwrap_or_else(|| hmac_kid(secret.as_bytes()));
    keys.insert(
        kid.clone(),
        VerifyKey {
            algorithm: Algorithm::HS256,
            key: DecodingKey::from_secret(secret.as_bytes()),
            jwk: None,
        },
    );
    let signing = SigningKey {
        algorithm: Algorithm::HS256,
        kid,
        key: EncodingKey::from_secret(secret.as_bytes()),
    };
    Ok((signing, uses_demo_secret))
}

/// The EdDSA signing key from JWT_PRIVATE_KEY_FILE (and its verification key, added to `keys`).
fn eddsa_keys(
    args: &JwtArgs,
    keys: &mut HashMap<String, VerifyKey>,
) -> Result<SigningKey, ConfigError> {
    let path = args
        .jwt_private_key_file
        .as_ref()
        .ok_or_else(|| ConfigError::new("JWT_PRIVATE_KEY_FILE", "required for EdDSA"))?;
    let pem = read_pem(path, "JWT_PRIVATE_KEY_FILE")?;
    let private = ed25519_dalek::SigningKey::from_pkcs8_pem(&pem).map_err(|_| {
        ConfigError::new(
            "JWT_PRIVATE_KEY_FILE",
            format!("{} is not a PKCS#8 PEM Ed25519 private key", path.display()),
        )
    })?;
    let public = private.verifying_key();
    let kid = args
        .jwt_key_id
        .clone()
        .unwrap_or_else(|| ed25519_thumbprint(&public));
    keys.insert(kid.clone(), ed25519_verify_key(&kid, &public)?);
    let key = EncodingKey::from_ed_pem(pem.as_bytes())
        .map_err(|err| ConfigError::new("JWT_PRIVATE_KEY_FILE", format!("unusable key: {err}")))?;
    Ok(SigningKey {
        algorithm: Algorithm::EdDSA,
        kid,
        key,
    })
}

/// JWT_ACCEPTED_ALGORITHMS, or by default the algorithms of the verification keys.
fn accepted_algorithms(
    args: &JwtArgs,
    keys: &HashMap<String, VerifyKey>,
) -> Result<Vec<Algorithm>, ConfigError> {
    if args.jwt_accepted_algorithms.is_empty() {
        let mut algorithms: Vec<Algorithm> = keys.values().map(|k| k.algorithm).collect();
        algorithms.sort_by_key(|a| format!("{a:?}"));
        algorithms.dedup();
        return Ok(algorithms);
    }
    args.jwt_accepted_algorithms
        .iter()
        .map(|name| parse_algorithm(name.trim()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|msg| ConfigError::new("JWT_ACCEPTED_ALGORITHMS", msg))
}

/// The algorithms this project supports. Others are refused at configuration time so that an
/// operator cannot enable, say, RS256 without keys of that type.
pub fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    match name {
        "HS256" => Ok(Algorithm::HS256),
        "EdDSA" => Ok(Algorithm::EdDSA),
        other => Err(format!(
            "unsupported algorithm `{other}` (use HS256 or EdDSA)"
        )),
    }
}

/// A new random Ed25519 key as PKCS#8 PEM, for `auth-service generate-key` and the tests.
pub fn generate_ed25519_pem() -> Result<(String, String), String> {
    use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
    use rand::RngCore as _;
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let private = key
        .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
        .map_err(|err| err.to_string())?;
    let public = key
        .verifying_key()
        .to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
        .map_err(|err| err.to_string())?;
    Ok((private.to_string(), public))
}

/// A random token id: 32 hex characters, the shape of SimpleJWT's `uuid4().hex`.
pub fn new_jti() -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Adds the public keys of `JWT_VERIFY_KEYS` (`KID=PATH` entries) to `keys`.
fn add_verify_keys(
    keys: &mut HashMap<String, VerifyKey>,
    entries: &[String],
) -> Result<(), ConfigError> {
    for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
        let (kid, path) = entry.split_once('=').ok_or_else(|| {
            ConfigError::new("JWT_VERIFY_KEYS", format!("`{entry}` is not KID=PATH"))
        })?;
        let pem = read_pem(Path::new(path), "JWT_VERIFY_KEYS")?;
        let public = ed25519_dalek::VerifyingKey::from_public_key_pem(&pem).map_err(|_| {
            ConfigError::new(
                "JWT_VERIFY_KEYS",
                format!("{path} is not an SPKI PEM Ed25519 public key"),
            )
        })?;
        if keys.contains_key(kid) {
            return Err(ConfigError::new(
                "JWT_VERIFY_KEYS",
                format!("key id {kid} is listed twice"),
            ));
        }
        keys.insert(kid.to_owned(), ed25519_verify_key(kid, &public)?);
    }
    Ok(())
}

fn read_pem(path: &Path, setting: &'static str) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|err| ConfigError::new(setting, format!("cannot read {}: {err}", path.display())))
}

fn ed25519_verify_key(
    kid: &str,
    public: &ed25519_dalek::VerifyingKey,
) -> Result<VerifyKey, ConfigError> {
    let x = URL_SAFE_NO_PAD.encode(public.as_bytes());
    let key = DecodingKey::from_ed_components(&x)
        .map_err(|err| ConfigError::new("JWT_VERIFY_KEYS", format!("unusable key: {err}")))?;
    Ok(VerifyKey {
        algorithm: Algorithm::EdDSA,
        key,
        jwk: Some(serde_json::json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "x": x,
            "kid": kid,
            "alg": "EdDSA",
            "use": "sig",
        })),
    })
}

/// RFC 7638 thumbprint: stable for a key, so every replica derives the same `kid`.
fn ed25519_thumbprint(public: &ed25519_dalek::VerifyingKey) -> String {
    let x = URL_SAFE_NO_PAD.encode(public.as_bytes());
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

// A digest of a high-entropy secret reveals nothing useful, and lets replicas agree on the kid.
fn hmac_kid(secret: &[u8]) -> String {
    let digest = Sha256::digest(secret);
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("hs256-{hex}")
}
