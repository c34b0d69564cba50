//! `POST /api/token/`: credentials in, a token pair out, and every way a request can be wrong.

use serde_json::json;

use crate::helpers::{no_active_account, peek, TestApp};

#[actix_web::test]
async fn a_user_gets_an_access_and_a_refresh_token() {
    let app = TestApp::spawn(&[]).await;
    app.create_user("alice", "s3cret-pass", false).await;

    let (refresh, access) = app.login("alice", "s3cret-pass").await;

    let (header, access_claims) = peek(&access);
    assert_eq!(header["alg"], "HS256");
    assert!(header["kid"].as_str().is_some_and(|k| !k.is_empty()));
    assert_eq!(access_claims["token_type"], "access");
    assert_eq!(access_claims["username"], "alice");
    assert!(access_claims["user_id"].as_i64().is_some());
    assert_eq!(
        access_claims["exp"].as_i64().unwrap() - access_claims["iat"].as_i64().unwrap(),
        300,
        "SimpleJWT's default access lifetime is 5 minutes"
    );
    let jti = access_claims["jti"].as_str().unwrap();
    assert_eq!(jti.len(), 32);
    assert!(jti.chars().all(|c| c.is_ascii_hexdigit()));

    let (_, refresh_claims) = peek(&refresh);
    assert_eq!(refresh_claims["token_type"], "refresh");
    assert_eq!(
        refresh_claims["exp"].as_i64().unwrap() - refresh_claims["iat"].as_i64().unwrap(),
        86_400
    );
    assert_ne!(refresh_claims["jti"], access_claims["jti"]);
}

#[actix_web::test]
async fn wrong_password_unknown_user_and_inactive_user_get_the_same_401() {
    let app = TestApp::spawn(&[]).await;
    app.create_user("alice", "right", false).await;
    app.create_user("dormant", "right", false).await;
    store::users::set_active(&app.pool, "dormant".into(), false)
        .await
        .unwrap();

    for (username, password) in [
        ("alice", "wrong"),
        ("nobody", "right"),
        ("dormant", "right"),
    ] {
        let response = app
            .post_json(
                "/api/token/",
                &json!({"username": username, "password": password}),
            )
            .await;
        assert_eq!(response.status, 401, "{username}");
        assert_eq!(response.body, no_active_account(), "{username}");
    }
}

#[actix_web::test]
async fn missing_blank_null_and_non_string_fields_are_named() {
    let app = TestApp::spawn(&[]).await;

    let response = app.post_json("/api/token/", &json!({})).await;
    assert_eq!(response.status, 400);
    assert_eq!(
        response.body,
        json!({"username": ["This field is required."], "password": ["This field is required."]})
    );

    let response = app
        .post_json("/api/token/", &json!({"username": "alice"}))
        .await;
    assert_eq!(response.status, 400);
    assert_eq!(
        response.body,
        json!({"password": ["This field is required."]})
    );

    let response = app
        .post_json("/api/token/", &json!({"username": "", "password": null}))
        .await;
    assert_eq!(response.status, 400);
    assert_eq!(
        response.body,
        json!({"username": ["This field may not be blank."], "password": ["This field may not be null."]})
    );

    let response = app
        .post_json("/api/token/", &json!({"username": 5, "password": ["x"]}))
        .await;
    assert_eq!(response.status, 400);
    assert_eq!(
        response.body,
        json!({"username": ["Not a valid string."], "password": ["Not a valid string."]})
    );
}

#[actix_web::test]
async fn malformed_json_wrong_content_type_and_non_objects_are_400() {
    let app = TestApp::spawn(&[]).await;

    let response = app
        .post_raw(
            "/api/token/",
            "application/json",
            b"{\"username\": ".to_vec(),
        )
        .await;
    assert_eq!(response.status, 400);
    assert_eq!(response.body["code"], "parse_error");
    assert!(response.body["detail"]
        .as_str()
        .unwrap()
        .starts_with("JSON parse error - "));

    let response = app
        .post_raw(
            "/api/token/",
            "text/plain",
            br#"{"username":"a","password":"b"}"#.to_vec(),
        )
        .await;
    assert_eq!(response.status, 400);
    assert_eq!(response.body["code"], "unsupported_media_type");
    assert!(response.body["detail"]
        .as_str()
        .unwrap()
        .contains("text/plain"));

    let response = app
        .post_raw("/api/token/", "application/json", b"[1, 2]".to_vec())
        .await;
    assert_eq!(response.status, 400);
    assert_eq!(
        response.body,
        json!({"non_field_errors": ["Invalid data. Expected a dictionary, but got list."]})
    );
}

#[actix_web::test]
async fn a_body_over_16_kib_is_413() {
    let app = TestApp::spawn(&[]).await;
    let big = "x".repeat(16 * 1024);
    let response = app
        .post_json("/api/token/", &json!({"username": big, "password": "pw"}))
        .await;
    assert_eq!(response.status, 413);
    assert_eq!(response.body["code"], "payload_too_large");
}

#[actix_web::test]
async fn get_is_405_and_unknown_paths_are_json_404() {
    let app = TestApp::spawn(&[]).await;
    let (status, body) = app.get("/api/token/").await;
    assert_eq!(status, 405);
    assert!(body.contains("Method \\\"GET\\\" not allowed."), "{body}");
    let (status, body) = app.get("/nope").await;
    assert_eq!(status, 404);
    assert!(body.contains("not_found"), "{body}");
}

#[actix_web::test]
async fn urls_work_with_and_without_the_trailing_slash() {
    let app = TestApp::spawn(&[]).await;
    app.create_user("alice", "pw", false).await;
    let response = app
        .post_json(
            "/api/token",
            &json!({"username": "alice", "password": "pw"}),
        )
        .await;
    assert_eq!(response.status, 200);
    let response = app
        .post_json(
            "/api/token/verify",
            &json!({"token": response.body["access"]}),
        )
        .await;
    assert_eq!(response.status, 200);
}
