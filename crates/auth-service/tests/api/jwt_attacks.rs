//! Forged, tampered, expired and malformed tokens: every one gets the contract's 401.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::helpers::{claims, forge_hs256, kid_of, token_not_valid, TestApp, SECRET};

async fn assert_refused(app: &TestApp, token: &str, what: &str) {
    let response = app
        .post_json("/api/token/verify/", &json!({"token": token}))
        .await;
    assert_eq!(response.status, 401, "{what} was accepted");
    assert_eq!(response.body, token_not_valid(), "{what}");
}

async fn issued_access(app: &TestApp) -> String {
    app.create_user("alice", "pw", false).await;
    app.login("alice", "pw").await.1
}

#[actix_web::test]
async fn a_correctly_forged_token_is_accepted_so_the_refusals_below_mean_something() {
    let app = TestApp::spawn(&[]).await;
    let kid = kid_of(&issued_access(&app).await);
    let token = forge_hs256(SECRET.as_bytes(), Some(&kid), &claims("access", 60));
    let response = app
        .post_json("/api/token/verify/", &json!({"token": token}))
        .await;
    assert_eq!(response.status, 200);
}

#[actix_web::test]
async fn expired_access_and_refresh_tokens_are_refused() {
    let app = TestApp::spawn(&[]).await;
    let kid = kid_of(&issued_access(&app).await);
    let expired_access = forge_hs256(SECRET.as_bytes(), Some(&kid), &claims("access", -1));
    let expired_refresh = forge_hs256(SECRET.as_bytes(), Some(&kid), &claims("refresh", -1));
    assert_refused(&app, &expired_access, "expired access token").await;
    assert_refused(&app, &expired_refresh, "expired refresh token").await;
    let response = app
        .post_json("/api/token/refresh/", &json!({"refresh": expired_refresh}))
        .await;
    assert_eq!(response.status, 401);
    assert_eq!(response.body, token_not_valid());
}

#[actix_web::test]
async fn tokens_issued_with_a_one_second_lifetime_expire() {
    let app = TestApp::spawn(&[
        "--access-token-lifetime-secs=1",
        "--refresh-token-lifetime-secs=1",
    ])
    .await;
    app.create_user("alice", "pw", false).await;
    let (refresh, access) = app.login("alice", "pw").await;
    // exp is whole seconds and the leeway is 0: two seconds later both are past.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    assert_refused(&app, &access, "expired access token").await;
    let response = app
        .post_json("/api/token/refresh/", &json!({"refresh": refresh}))
        .await;
    assert_eq!(response.status, 401);
}

#[actix_web::test]
async fn alg_none_is_refused() {
    let app = TestApp::spawn(&[]).await;
    let kid = kid_of(&issued_access(&app).await);
    for alg in ["none", "None", "NONE"] {
        let header =
            URL_SAFE_NO_PAD.encode(json!({"alg": alg, "typ": "JWT", "kid": kid}).to_string());
        let payload = URL_SAFE_NO_PAD.encode(claims("access", 60).to_string());
        assert_refused(&app, &format!("{header}.{payload}."), alg).await;
    }
}

#[actix_web::test]
async fn wrong_signature_and_tampered_payload_are_refused() {
    let app = TestApp::spawn(&[]).await;
    let access = issued_access(&app).await;
    let kid = kid_of(&access);
    let other_secret = forge_hs256(
        b"another-secret-of-sufficient-length-0123456789",
        Some(&kid),
        &claims("access", 60),
    );
    assert_refused(&app, &other_secret, "token signed with another secret").await;

    let mut parts: Vec<String> = access.split('.').map(str::to_owned).collect();
    let mut payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
    payload["user_id"] = json!(999);
    parts[1] = URL_SAFE_NO_PAD.encode(payload.to_string());
    assert_refused(&app, &parts.join("."), "tampered payload").await;

    let mut truncated = access.clone();
    truncated.truncate(access.len() - 3);
    assert_refused(&app, &truncated, "truncated signature").await;
}

#[actix_web::test]
async fn an_unknown_kid_is_refused() {
    let app = TestApp::spawn(&[]).await;
    let _ = issued_access(&app).await;
    let token = forge_hs256(
        SECRET.as_bytes(),
        Some("some-other-key"),
        &claims("access", 60),
    );
    assert_refused(&app, &token, "unknown kid").await;
}

#[actix_web::test]
async fn tokens_without_exp_or_with_wrong_claims_are_refused() {
    let app = TestApp::spawn(&[]).await;
    let kid = kid_of(&issued_access(&app).await);
    let mut no_exp = claims("access", 60);
    no_exp.as_object_mut().unwrap().remove("exp");
    assert_refused(
        &app,
        &forge_hs256(SECRET.as_bytes(), Some(&kid), &no_exp),
        "token without exp",
    )
    .await;

    let mut bad_type = claims("access", 60);
    bad_type["token_type"] = json!("id");
    assert_refused(
        &app,
        &forge_hs256(SECRET.as_bytes(), Some(&kid), &bad_type),
        "unknown token_type",
    )
    .await;

    let mut string_exp = claims("access", 60);
    string_exp["exp"] = json!("tomorrow");
    assert_refused(
        &app,
        &forge_hs256(SECRET.as_bytes(), Some(&kid), &string_exp),
        "non-numeric exp",
    )
    .await;

    for garbage in ["abc", "a.b.c", ".....", "eyJhbGciOiJIUzI1NiJ9.e30.x"] {
        assert_refused(&app, garbage, "garbage").await;
    }
    let blank = app
        .post_json("/api/token/verify/", &json!({"token": ""}))
        .await;
    assert_eq!(blank.status, 400);
    assert_eq!(
        blank.body,
        json!({"token": ["This field may not be blank."]})
    );
}

#[actix_web::test]
async fn a_token_without_kid_is_accepted_only_when_one_key_could_have_signed_it() {
    // SimpleJWT writes no kid; with a single HS256 key the choice is unambiguous.
    let app = TestApp::spawn(&[]).await;
    let _ = issued_access(&app).await;
    let token = forge_hs256(SECRET.as_bytes(), None, &claims("access", 60));
    let response = app
        .post_json("/api/token/verify/", &json!({"token": token}))
        .await;
    assert_eq!(response.status, 200);
}
