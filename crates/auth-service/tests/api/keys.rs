//! EdDSA signing, JWKS, key rotation, and algorithm confusion.

use std::path::PathBuf;

use serde_json::json;

use crate::helpers::{claims, forge_hs256, kid_of, peek, token_not_valid, TestApp};

struct KeyPair {
    private: PathBuf,
    public: PathBuf,
    public_pem: String,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn key_pair() -> KeyPair {
    let dir = std::env::temp_dir().join(format!("auth-keys-{}", test_support::random_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let (private_pem, public_pem) = tokens::jwt::generate_ed25519_pem().unwrap();
    let private = dir.join("key.pem");
    let public = dir.join("key.pub.pem");
    std::fs::write(&private, private_pem).unwrap();
    std::fs::write(&public, &public_pem).unwrap();
    KeyPair {
        private,
        public,
        public_pem,
        _dir: TempDir(dir),
    }
}

fn eddsa_args(key: &KeyPair) -> Vec<String> {
    vec![
        "--jwt-algorithm=EdDSA".into(),
        format!("--jwt-private-key-file={}", key.private.display()),
    ]
}

async fn spawn(args: &[String]) -> TestApp {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    TestApp::spawn(&args).await
}

#[actix_web::test]
async fn eddsa_tokens_carry_a_kid_that_the_jwks_publishes() {
    let key = key_pair();
    let app = spawn(&eddsa_args(&key)).await;
    app.create_user("alice", "pw", false).await;
    let (refresh, access) = app.login("alice", "pw").await;
    let (header, _) = peek(&access);
    assert_eq!(header["alg"], "EdDSA");
    let kid = kid_of(&access);

    let (status, body) = app.get("/api/token/jwks/").await;
    assert_eq!(status, 200);
    let jwks: serde_json::Value = serde_json::from_str(&body).unwrap();
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["kid"], kid.as_str());
    assert_eq!(keys[0]["kty"], "OKP");
    assert_eq!(keys[0]["crv"], "Ed25519");
    assert!(
        keys[0].get("d").is_none(),
        "the private part must never be published"
    );

    // A service holding only the JWKS verifies the tokens and still tells the types apart.
    let verifier = tokens::jwt::VerificationKeys::from_jwks(&jwks, 0).unwrap();
    let claims = verifier
        .verify(&access, tokens::jwt::TokenType::Access)
        .unwrap();
    assert_eq!(claims.username, "alice");
    assert!(verifier
        .verify(&refresh, tokens::jwt::TokenType::Access)
        .is_err());
}

#[actix_web::test]
async fn the_jwks_of_an_hs256_deployment_publishes_no_secret() {
    let app = TestApp::spawn(&[]).await;
    let (status, body) = app.get("/api/token/jwks/").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        json!({"keys": []})
    );
}

#[actix_web::test]
async fn hs256_signed_with_the_public_key_is_refused_by_an_eddsa_deployment() {
    let key = key_pair();
    let app = spawn(&eddsa_args(&key)).await;
    app.create_user("alice", "pw", false).await;
    let kid = kid_of(&app.login("alice", "pw").await.1);
    // The classic confusion: the verifier's public key used as an HMAC secret.
    for secret in [
        key.public_pem.as_bytes().to_vec(),
        raw_public(&key.public_pem),
    ] {
        let forged = forge_hs256(&secret, Some(&kid), &claims("access", 60));
        let response = app
            .post_json("/api/token/verify/", &json!({"token": forged}))
            .await;
        assert_eq!(response.status, 401);
        assert_eq!(response.body, token_not_valid());
    }
}

#[actix_web::test]
async fn with_both_algorithms_accepted_each_key_still_only_verifies_its_own() {
    let key = key_pair();
    let mut args = eddsa_args(&key);
    args.push("--jwt-accepted-algorithms=EdDSA,HS256".into());
    let app = spawn(&args).await;
    app.create_user("alice", "pw", false).await;
    let kid = kid_of(&app.login("alice", "pw").await.1);
    let forged = forge_hs256(
        &raw_public(&key.public_pem),
        Some(&kid),
        &claims("access", 60),
    );
    let response = app
        .post_json("/api/token/verify/", &json!({"token": forged}))
        .await;
    assert_eq!(response.status, 401);
}

#[actix_web::test]
async fn after_rotation_old_tokens_verify_while_the_old_key_is_listed() {
    let old = key_pair();
    let new = key_pair();
    let before = spawn(&eddsa_args(&old)).await;
    before.create_user("alice", "pw", false).await;
    let (old_refresh, old_access) = before.login("alice", "pw").await;
    let old_kid = kid_of(&old_access);

    // Sign with the new key, keep verifying the old one.
    let mut rotating = eddsa_args(&new);
    rotating.push(format!(
        "--jwt-verify-keys={old_kid}={}",
        old.public.display()
    ));
    let args: Vec<&str> = rotating.iter().map(String::as_str).collect();
    let during =
        TestApp::spawn_on(&before.db_url, &test_support::unique_prefix("auth"), &args).await;
    let response = during
        .post_json("/api/token/verify/", &json!({"token": old_access}))
        .await;
    assert_eq!(response.status, 200, "old token must survive the rotation");
    let refreshed = during
        .post_json("/api/token/refresh/", &json!({"refresh": old_refresh}))
        .await;
    assert_eq!(refreshed.status, 200);
    let new_access = refreshed.body["access"].as_str().unwrap().to_owned();
    assert_ne!(
        kid_of(&new_access),
        old_kid,
        "new tokens are signed with the new key"
    );
    let (_, jwks) = during.get("/api/token/jwks/").await;
    let jwks: serde_json::Value = serde_json::from_str(&jwks).unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);

    // Once the old key is dropped from the list, its tokens stop working.
    let after = spawn(&eddsa_args(&new)).await;
    let response = after
        .post_json("/api/token/verify/", &json!({"token": old_access}))
        .await;
    assert_eq!(response.status, 401);
    assert_eq!(response.body, token_not_valid());
}

fn raw_public(pem: &str) -> Vec<u8> {
    use ed25519_dalek::pkcs8::DecodePublicKey as _;
    ed25519_dalek::VerifyingKey::from_public_key_pem(pem)
        .unwrap()
        .to_bytes()
        .to_vec()
}
