//! Every way a request can fail to authenticate gets UNAUTHENTICATED and a message that says why.

#![allow(clippy::unwrap_used)]

use serde_json::json;
use tokens::jwt::TokenType;

use crate::helpers::{error_of, token, token_with_secret, TestApp};

async fn hi_with_header(app: &TestApp, header: Option<String>) -> (String, String) {
    let headers: Vec<(String, String)> = header
        .into_iter()
        .map(|value| ("Authorization".to_owned(), value))
        .collect();
    let response = app
        .post_with_headers(
            "/graphql/",
            &headers,
            json!({"query": "{ hi }"}).to_string().into_bytes(),
        )
        .await;
    assert_eq!(response.status, 200);
    assert_eq!(response.body["data"], serde_json::Value::Null);
    error_of(&response.body)
}

#[actix_web::test]
async fn hi_answers_a_valid_access_token() {
    let app = TestApp::spawn(&[]).await;
    let (_, access) = app.user("alice", false).await;
    let response = app.graphql(Some(&access), "{ hi }", json!({})).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.body, json!({"data": {"hi": "Hi!"}}));
}

#[actix_web::test]
async fn hi_refuses_each_bad_header_with_a_reason() {
    let app = TestApp::spawn(&[]).await;
    let (id, _) = app.user("alice", false).await;

    let (code, message) = hi_with_header(&app, None).await;
    assert_eq!(code, "UNAUTHENTICATED");
    assert!(
        message.contains("Authorization header is missing"),
        "{message}"
    );

    let valid = token(id, "alice", TokenType::Access, 300);
    let (code, message) = hi_with_header(&app, Some(format!("Token {valid}"))).await;
    assert_eq!(code, "UNAUTHENTICATED");
    assert!(
        message.contains("expected `Bearer <access token>`"),
        "{message}"
    );

    let (code, message) = hi_with_header(&app, Some(valid.clone())).await;
    assert_eq!(code, "UNAUTHENTICATED");
    assert!(message.contains("malformed"), "{message}");

    let (_, message) = hi_with_header(&app, Some("Bearer not-a-jwt".into())).await;
    assert_eq!(message, "token is malformed");

    let forged = token_with_secret(
        "another-secret-0123456789-0123456789-01234",
        id,
        "alice",
        TokenType::Access,
        300,
    );
    // Same algorithm, other secret: the kid differs, so the key is unknown; strip the kid to
    // reach the signature check.
    let (_, message) = hi_with_header(&app, Some(format!("Bearer {forged}"))).await;
    assert!(
        message == "token is signed by an unknown key" || message == "token signature is invalid",
        "{message}"
    );
    let tampered = {
        let mut parts: Vec<String> = valid.split('.').map(str::to_owned).collect();
        parts[2] = forged.split('.').nth(2).unwrap().to_owned();
        parts.join(".")
    };
    let (_, message) = hi_with_header(&app, Some(format!("Bearer {tampered}"))).await;
    assert_eq!(message, "token signature is invalid");

    let expired = token(id, "alice", TokenType::Access, -10);
    let (code, message) = hi_with_header(&app, Some(format!("Bearer {expired}"))).await;
    assert_eq!(code, "UNAUTHENTICATED");
    assert_eq!(message, "token has expired");

    let refresh = token(id, "alice", TokenType::Refresh, 300);
    let (code, message) = hi_with_header(&app, Some(format!("Bearer {refresh}"))).await;
    assert_eq!(code, "UNAUTHENTICATED");
    assert_eq!(
        message,
        "refresh token used where an access token is required"
    );
}

#[actix_web::test]
async fn every_car_operation_needs_a_token() {
    let app = TestApp::spawn(&["--demo"]).await;
    for query in [
        "{ car(pk: 1) { id } }",
        "{ cars { totalCount } }",
        "{ me { id } }",
        r#"mutation { createCar(input: {make: "a", model: "b"}) { id } }"#,
        r#"mutation { updateCar(pk: 1, input: {make: "a"}) { id } }"#,
        "mutation { deleteCar(pk: 1) { id } }",
        // Authentication is checked before the input: a stranger learns nothing of what a
        // valid input or id would be.
        r#"mutation { createCar(input: {make: " ", model: ""}) { id } }"#,
        r#"mutation { updateCar(pk: "x", input: {make: ""}) { id } }"#,
        r#"mutation { deleteCar(pk: "-1") { id } }"#,
        "{ cars(first: 0) { totalCount } }",
    ] {
        let response = app.graphql(None, query, json!({})).await;
        let (code, message) = error_of(&response.body);
        assert_eq!(code, "UNAUTHENTICATED", "{query}: {}", response.body);
        assert!(
            message.contains("Authorization header is missing"),
            "{message}"
        );
    }
    // Nothing was changed by the refused mutations.
    let (_, access) = app.user("reader", false).await;
    let response = app
        .graphql(Some(&access), "{ car(pk: 1) { make } }", json!({}))
        .await;
    assert_eq!(response.body["data"]["car"]["make"], "Skoda");
}

#[actix_web::test]
async fn a_deleted_users_token_cannot_write_or_ask_who_it_is() {
    let app = TestApp::spawn(&[]).await;
    // A token for a user id that does not exist (deleted after the token was issued).
    let ghost = token(987_654, "ghost", TokenType::Access, 300);
    let response = app.graphql(Some(&ghost), "{ me { id } }", json!({})).await;
    assert_eq!(error_of(&response.body).0, "UNAUTHENTICATED");
    let response = app
        .graphql(
            Some(&ghost),
            r#"mutation { createCar(input: {make: "a", model: "b"}) { id } }"#,
            json!({}),
        )
        .await;
    let (code, message) = error_of(&response.body);
    assert_eq!(code, "UNAUTHENTICATED");
    assert!(message.contains("no longer exists"), "{message}");
    // Reading needs only a valid token.
    let response = app.graphql(Some(&ghost), "{ hi }", json!({})).await;
    assert_eq!(response.body["data"]["hi"], "Hi!");
}
