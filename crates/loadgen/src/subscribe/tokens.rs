//! The access tokens the subscribers present: minted and signed as auth-service signs them (one
//! user per [`CONNECTIONS_PER_USER`] connections, and a fresh token per renewal), or, with
//! `--auth`, the one obtained by logging in.

use std::time::Duration;

use clap::Parser;
use serde_json::json;
use tokens::jwt::{new_jti, Claims, JwtKeys, SecretPolicy, TokenType};

use super::SubscribeArgs;

/// Connections that share one minted user, within the gateway's default
/// MAX_CONNECTIONS_PER_USER (100). With `--auth` every connection is the one logged-in user, so
/// that gateway needs MAX_CONNECTIONS_PER_USER=0 (or at least `--connections`).
pub(super) const CONNECTIONS_PER_USER: u32 = 100;

/// The access tokens the connections use: with `--auth` the one from logging in; else one
/// minted per [`CONNECTIONS_PER_USER`] connections, each for a user of its own.
pub(super) async fn obtain_tokens(
    args: &SubscribeArgs,
    minter: Option<&Minter>,
) -> Result<Vec<String>, String> {
    if let Some(auth) = &args.auth {
        let client = awc::Client::builder()
            .timeout(Duration::from_secs(30))
            .finish();
        let credentials = json!({"username": args.username, "password": args.password});
        let pair = crate::post(
            &client,
            &format!("{}/api/token/", auth.trim_end_matches('/')),
            &credentials,
            None,
        )
        .await?;
        return pair["access"]
            .as_str()
            .map(|token| vec![token.to_owned()])
            .ok_or_else(|| "login returned no access token".to_owned());
    }
    let minter = minter.ok_or("give --jwt-secret (or JWT_SECRET), --demo-secret, or --auth")?;
    let users = args.connections.div_ceil(CONNECTIONS_PER_USER).max(1);
    (1..=i64::from(users))
        .map(|user_id| minter.mint(user_id, false))
        .collect()
}

/// Signs access tokens as auth-service would: the first ones, and with --renew-every-secs the
/// renewals.
pub(super) struct Minter {
    keys: JwtKeys,
    lifetime_secs: u64,
}

/// The minter, unless the tokens come from logging in (--auth).
pub(super) fn minter(args: &SubscribeArgs) -> Result<Option<Minter>, String> {
    if args.auth.is_some() {
        return Ok(None);
    }
    let secret = match (&args.jwt_secret, args.demo_secret) {
        (Some(secret), _) => secret.clone(),
        (None, true) => tokens::jwt::DEMO_SECRET.to_owned(),
        (None, false) => return Ok(None),
    };
    let settings = JwtOnly::try_parse_from([
        "loadgen",
        "--jwt-algorithm=HS256",
        &format!("--jwt-secret={secret}"),
    ])
    .map_err(|err| format!("JWT settings: {err}"))?;
    let (keys, _) = JwtKeys::from_args(&settings.jwt, SecretPolicy::RequireConfigured)
        .map_err(|err| err.to_string())?;
    Ok(Some(Minter {
        keys,
        lifetime_secs: args.token_lifetime_secs.unwrap_or(args.max_seconds + 600),
    }))
}

/// The JWT settings as the services parse them, so the key id is derived exactly as the gateway
/// derives it.
#[derive(Parser)]
struct JwtOnly {
    #[command(flatten)]
    jwt: tokens::settings::JwtArgs,
}

/// The user that owns car `pk` in `--owners` runs: ids of their own, apart from the users
/// minted per [`CONNECTIONS_PER_USER`] connections.
pub(super) fn owner_of(pk: i64) -> i64 {
    1_000_000 + pk
}

/// The staff user of subscriber `index` in `--staff` runs.
pub(super) fn staff_user(index: u32) -> i64 {
    2_000_000 + i64::from(index / CONNECTIONS_PER_USER)
}

impl Minter {
    pub(super) fn mint(&self, user_id: i64, is_staff: bool) -> Result<String, String> {
        let now = chrono_now();
        self.keys
            .signing
            .sign(&Claims {
                token_type: TokenType::Access,
                exp: now + self.lifetime_secs as i64,
                iat: now,
                iat_ms: None,
                jti: new_jti(),
                user_id,
                username: format!("loadgen-{user_id}"),
                is_staff,
            })
            .map_err(|err| format!("cannot sign the token: {err}"))
    }
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
