//! JWKS_URL: tokens are verified with auth-service's published Ed25519 keys, fetched, cached, and
//! fetched again (rate-limited) for a `kid` the cache does not know, as after a key rotation.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use actix_web::{web, App, HttpResponse, HttpServer};
use serde_json::json;
use tokens::jwt::{JwtKeys, SecretPolicy, TokenType};

use crate::helpers::{error_of, TestApp};

/// A stand-in for auth-service's `GET /api/token/jwks/`, serving whatever keys the test sets and
/// counting the fetches.
struct JwksServer {
    url: String,
    document: Arc<Mutex<serde_json::Value>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    fn start(document: serde_json::Value) -> JwksServer {
        Self::start_on(0, document)
    }

    fn start_on(port: u16, document: serde_json::Value) -> JwksServer {
        let document = Arc::new(Mutex::new(document));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (served, counted) = (document.clone(), fetches.clone());
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = HttpServer::new(move || {
            let (served, counted) = (served.clone(), counted.clone());
            App::new().route(
                "/api/token/jwks/",
                web::get().to(move || {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let body = served.lock().unwrap().clone();
                    async move { HttpResponse::Ok().json(body) }
                }),
            )
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        actix_web::rt::spawn(server);
        JwksServer {
            url: format!("http://127.0.0.1:{port}/api/token/jwks/"),
            document,
            fetches,
        }
    }
}

/// A new Ed25519 signing key, as auth-service would hold it.
fn ed25519_keys(dir: &std::path::Path, name: &str) -> JwtKeys {
    let (private, _) = tokens::jwt::generate_ed25519_pem().unwrap();
    let path = dir.join(format!("{name}.pem"));
    std::fs::write(&path, private).unwrap();
    #[derive(clap::Parser)]
    struct JwtOnly {
        #[command(flatten)]
        jwt: tokens::settings::JwtArgs,
    }
    let args = <JwtOnly as clap::Parser>::try_parse_from([
        "jwt".to_owned(),
        "--jwt-algorithm=EdDSA".to_owned(),
        format!("--jwt-private-key-file={}", path.display()),
    ])
    .unwrap()
    .jwt;
    JwtKeys::from_args(&args, SecretPolicy::RequireConfigured)
        .unwrap()
        .0
}

fn sign(keys: &JwtKeys, token_type: TokenType) -> String {
    test_support::tokens::sign(keys, 1, "alice", token_type, 300)
}

#[actix_web::test]
async fn tokens_are_verified_with_the_jwks_and_a_rotated_key_is_fetched() {
    let dir = std::env::temp_dir().join(format!("api-jwks-{}", test_support::random_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let old = ed25519_keys(&dir, "old");
    let new = ed25519_keys(&dir, "new");
    let jwks = JwksServer::start(old.verification.jwks());

    let app = TestApp::spawn(&[
        &format!("--jwks-url={}", jwks.url),
        "--jwks-min-refetch-secs=0",
    ])
    .await;
    let response = app
        .graphql(Some(&sign(&old, TokenType::Access)), "{ hi }", json!({}))
        .await;
    assert_eq!(response.body, json!({"data": {"hi": "Hi!"}}));
    let response = app
        .graphql(Some(&sign(&old, TokenType::Refresh)), "{ hi }", json!({}))
        .await;
    assert_eq!(
        error_of(&response.body).1,
        "refresh token used where an access token is required"
    );
    // An HS256 token (the shared secret is not configured here) is refused.
    let hs256 = crate::helpers::token(1, "alice", TokenType::Access, 300);
    let response = app.graphql(Some(&hs256), "{ hi }", json!({})).await;
    assert_eq!(error_of(&response.body).0, "UNAUTHENTICATED");

    // auth-service rotates: the JWKS now has both keys; a token of the new key makes the
    // service fetch the JWKS again.
    let mut both = old.verification.jwks();
    let new_jwk = new.verification.jwks()["keys"][0].clone();
    both["keys"].as_array_mut().unwrap().push(new_jwk);
    *jwks.document.lock().unwrap() = both;
    let before = jwks.fetches.load(Ordering::SeqCst);
    let response = app
        .graphql(Some(&sign(&new, TokenType::Access)), "{ hi }", json!({}))
        .await;
    assert_eq!(response.body, json!({"data": {"hi": "Hi!"}}));
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), before + 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[actix_web::test]
async fn unknown_kids_do_not_make_the_service_hammer_auth_service() {
    let dir = std::env::temp_dir().join(format!("api-jwks-{}", test_support::random_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let published = ed25519_keys(&dir, "published");
    let stranger = ed25519_keys(&dir, "stranger");
    let jwks = JwksServer::start(published.verification.jwks());
    let app = TestApp::spawn(&[
        &format!("--jwks-url={}", jwks.url),
        "--jwks-min-refetch-secs=3600",
    ])
    .await;
    let fetched_at_start = jwks.fetches.load(Ordering::SeqCst);
    for _ in 0..5 {
        let response = app
            .graphql(
                Some(&sign(&stranger, TokenType::Access)),
                "{ hi }",
                json!({}),
            )
            .await;
        let (code, message) = error_of(&response.body);
        assert_eq!(code, "UNAUTHENTICATED");
        assert_eq!(message, "token is signed by an unknown key");
    }
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), fetched_at_start);
    let _ = std::fs::remove_dir_all(&dir);
}

#[actix_web::test]
async fn the_service_starts_while_auth_service_is_down_and_verifies_once_it_is_up() {
    let dir = std::env::temp_dir().join(format!("api-jwks-{}", test_support::random_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = ed25519_keys(&dir, "key");
    let port = test_support::free_port();
    let app = TestApp::spawn(&[
        &format!("--jwks-url=http://127.0.0.1:{port}/api/token/jwks/"),
        "--jwks-min-refetch-secs=0",
    ])
    .await;
    let token = sign(&keys, TokenType::Access);
    let response = app.graphql(Some(&token), "{ hi }", json!({})).await;
    let (code, message) = error_of(&response.body);
    // Not UNAUTHENTICATED: the client's token may well be valid.
    assert_eq!(code, "SERVICE_UNAVAILABLE");
    assert!(
        message.contains("signing keys of auth-service are unavailable"),
        "{message}"
    );

    let _jwks = JwksServer::start_on(port, keys.verification.jwks());
    let response = app.graphql(Some(&token), "{ hi }", json!({})).await;
    assert_eq!(response.body, json!({"data": {"hi": "Hi!"}}));
    let _ = std::fs::remove_dir_all(&dir);
}
