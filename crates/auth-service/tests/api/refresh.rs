//! Refresh, verify and blacklist: rotation, reuse, revocation.

use serde_json::json;

use crate::helpers::{token_not_valid, TestApp};

#[actix_web::test]
async fn refresh_rotates_and_a_used_refresh_token_is_refused() {
    let app = TestApp::spawn(&[]).await;
    app.create_user("alice", "pw", false).await;
    let (refresh, _) = app.login("alice", "pw").await;

    let first = app
        .post_json("/api/token/refresh/", &json!({"refresh": refresh}))
        .await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let new_access = first.body["access"].as_str().unwrap();
    let new_refresh = first.body["refresh"].as_str().unwrap();
    assert_ne!(new_refresh, refresh);
    let verified = app
        .post_json("/api/token/verify/", &json!({"token": new_access}))
        .await;
    assert_eq!(verified.status, 200);
    assert_eq!(verified.body, json!({}));

    let reused = app
        .post_json("/api/token/refresh/", &json!({"refresh": refresh}))
        .await;
    assert_eq!(reused.status, 401);
    assert_eq!(reused.body, token_not_valid());

    let second = app
        .post_json("/api/token/refresh/", &json!({"refresh": new_refresh}))
        .await;
    assert_eq!(second.status, 200);
}

#[actix_web::test]
async fn without_rotation_refresh_returns_only_an_access_token_and_stays_usable() {
    let app = TestApp::spawn(&["--rotate-refresh-tokens=false"]).await;
    app.create_user("alice", "pw", false).await;
    let (refresh, _) = app.login("alice", "pw").await;
    for _ in 0..2 {
        let response = app
            .post_json("/api/token/refresh/", &json!({"refresh": refresh}))
            .await;
        assert_eq!(response.status, 200);
        let keys: Vec<_> = response.body.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["access"]);
    }
}

#[actix_web::test]
async fn two_concurrent_refreshes_with_one_token_let_exactly_one_through() {
    let app = TestApp::spawn(&[]).await;
    app.create_user("alice", "pw", false).await;
    let (refresh, _) = app.login("alice", "pw").await;
    let body = json!({"refresh": refresh});
    let (a, b) = futures_util::join!(
        app.post_json("/api/token/refresh/", &body),
        app.post_json("/api/token/refresh/", &body)
    );
    let mut statuses = [a.status, b.status];
    statuses.sort();
    assert_eq!(statuses, [200, 401]);
}

#[actix_web::test]
async fn blacklisted_refresh_token_fails_refresh_verify_and_a_second_blacklist() {
    let app = TestApp::spawn(&[]).await;
    app.create_user("alice", "pw", false).await;
    let (refresh, _) = app.login("alice", "pw").await;

    let response = app
        .post_json("/api/token/blacklist/", &json!({"refresh": refresh}))
        .await;
    assert_eq!(response.status, 200);
    assert_eq!(response.body, json!({}));

    for (path, body) in [
        ("/api/token/refresh/", json!({"refresh": refresh})),
        ("/api/token/verify/", json!({"token": refresh})),
        ("/api/token/blacklist/", json!({"refresh": refresh})),
    ] {
        let response = app.post_json(path, &body).await;
        assert_eq!(response.status, 401, "{path}");
        assert_eq!(response.body, token_not_valid(), "{path}");
    }
}

#[actix_web::test]
async fn an_access_token_is_refused_where_a_refresh_token_belongs() {
    let app = TestApp::spawn(&[]).await;
    app.create_user("alice", "pw", false).await;
    let (_, access) = app.login("alice", "pw").await;
    for path in ["/api/token/refresh/", "/api/token/blacklist/"] {
        let response = app.post_json(path, &json!({"refresh": access})).await;
        assert_eq!(response.status, 401, "{path}");
        assert_eq!(response.body, token_not_valid());
    }
}

#[actix_web::test]
async fn a_refresh_token_is_refused_where_an_access_token_belongs() {
    // auth-service itself has no endpoint that wants an access token; the check every other
    // service makes is `VerificationKeys::verify(token, Access)`, with the keys built the same way.
    let app = TestApp::spawn(&[]).await;
    app.create_user("alice", "pw", false).await;
    let (refresh, access) = app.login("alice", "pw").await;
    let settings = crate::helpers::settings_from(&[
        "auth-service".into(),
        "--database-url=unused".into(),
        format!("--jwt-secret={}", crate::helpers::SECRET),
    ]);
    let (keys, _) = tokens::jwt::JwtKeys::from_args(
        &settings.jwt,
        tokens::jwt::SecretPolicy::RequireConfigured,
    )
    .unwrap();
    let verifier = &keys.verification;
    assert!(verifier
        .verify(&access, tokens::jwt::TokenType::Access)
        .is_ok());
    assert_eq!(
        verifier.verify(&refresh, tokens::jwt::TokenType::Access),
        Err(tokens::jwt::TokenError::WrongType {
            expected: tokens::jwt::TokenType::Access,
            found: tokens::jwt::TokenType::Refresh,
        })
    );
}

#[actix_web::test]
async fn a_deactivated_users_refresh_token_is_refused() {
    let app = TestApp::spawn(&[]).await;
    app.create_user("alice", "pw", false).await;
    let (refresh, _) = app.login("alice", "pw").await;
    store::users::set_active(&app.pool, "alice".into(), false)
        .await
        .unwrap();
    let response = app
        .post_json("/api/token/refresh/", &json!({"refresh": refresh}))
        .await;
    assert_eq!(response.status, 401);
    assert_eq!(response.body, token_not_valid());
}

#[actix_web::test]
async fn missing_fields_of_refresh_verify_and_blacklist_are_named() {
    let app = TestApp::spawn(&[]).await;
    for (path, field) in [
        ("/api/token/refresh/", "refresh"),
        ("/api/token/verify/", "token"),
        ("/api/token/blacklist/", "refresh"),
    ] {
        let response = app.post_json(path, &json!({})).await;
        assert_eq!(response.status, 400, "{path}");
        assert_eq!(response.body, json!({field: ["This field is required."]}));
    }
}

#[actix_web::test]
async fn blacklisting_announces_the_revocation_to_the_gateways() {
    let app = TestApp::spawn(&[]).await;
    app.create_user("alice", "pw", false).await;
    let (refresh, _) = app.login("alice", "pw").await;
    let (_, claims) = crate::helpers::peek(&refresh);

    let client = deadpool_redis::redis::Client::open(test_support::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let stream = events::revocation_channel(&app.redis_prefix);

    let response = app
        .post_json("/api/token/blacklist/", &json!({"refresh": refresh}))
        .await;
    assert_eq!(response.status, 200);
    // Read the revocation stream as a gateway does.
    let entries: Vec<(String, Vec<(String, String)>)> = deadpool_redis::redis::cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(entries.len(), 1, "one announcement: {entries:?}");
    let (field, payload) = &entries[0].1[0];
    assert_eq!(field, events::ENTRY_FIELD);
    let revocation: events::Revocation = serde_json::from_str(payload).unwrap();
    assert_eq!(revocation.user_id, claims["user_id"].as_i64().unwrap());
    assert_eq!(revocation.jti, claims["jti"].as_str().unwrap());
}
