//! Abusive input gets a clear error, never a crash: body size, depth, fields and aliases, tokens,
//! batch size; and a subscription over HTTP is refused.

#![allow(clippy::unwrap_used)]

use serde_json::json;

use crate::helpers::{error_of, TestApp};

#[actix_web::test]
async fn an_oversized_body_gets_413() {
    let app = TestApp::spawn(&["--max-body-bytes=1024"]).await;
    let (_, access) = app.user("alice", false).await;
    let query = format!("{{ hi }} # {}", "x".repeat(2000));
    let response = app.graphql(Some(&access), &query, json!({})).await;
    assert_eq!(response.status, 413);
    let (code, message) = error_of(&response.body);
    assert_eq!(code, "PAYLOAD_TOO_LARGE");
    assert!(message.contains("1024 bytes"), "{message}");
}

#[actix_web::test]
async fn too_deep_too_wide_and_too_long_documents_are_refused_before_execution() {
    let app = TestApp::spawn(&[
        "--max-query-depth=24",
        "--max-query-fields=50",
        "--max-query-tokens=2000",
    ])
    .await;
    let (_, access) = app.user("alice", false).await;

    // Depth: introspection types nest without end.
    let mut deep = String::from("name");
    for _ in 0..30 {
        deep = format!("ofType {{ {deep} }}");
    }
    let query = format!("{{ __type(name: \"Car\") {{ {deep} }} }}");
    let response = app.graphql(Some(&access), &query, json!({})).await;
    let (code, message) = error_of(&response.body);
    assert_eq!(code, "QUERY_TOO_DEEP");
    assert!(
        message.contains("nesting exceeds the limit of 24"),
        "{message}"
    );

    // Depth through fragments that spread each other.
    let mut document = String::from("{ __type(name: \"Car\") { ...F0 } }");
    for n in 0..30 {
        document.push_str(&format!(
            " fragment F{n} on __Type {{ ofType {{ ...F{} }} }}",
            n + 1
        ));
    }
    document.push_str(" fragment F30 on __Type { name }");
    let response = app.graphql(Some(&access), &document, json!({})).await;
    assert_eq!(error_of(&response.body).0, "QUERY_TOO_DEEP");

    // Fields, counted with aliases.
    let aliases: String = (0..60).map(|n| format!("a{n}: hi ")).collect();
    let response = app
        .graphql(Some(&access), &format!("{{ {aliases} }}"), json!({}))
        .await;
    let (code, message) = error_of(&response.body);
    assert_eq!(code, "QUERY_TOO_COMPLEX");
    assert!(message.contains("limit of 50 fields"), "{message}");

    // Fields multiplied by fragments that spread one another several times.
    let document = "{ ...A } fragment A on Query { ...B ...B ...B ...B } \
        fragment B on Query { ...C ...C ...C ...C } fragment C on Query { hi hi hi hi }";
    let response = app.graphql(Some(&access), document, json!({})).await;
    assert_eq!(error_of(&response.body).0, "QUERY_TOO_COMPLEX");

    // Tokens.
    let directives: String = (0..400).map(|_| "@skip(if: false) ").collect();
    let response = app
        .graphql(Some(&access), &format!("{{ hi {directives} }}"), json!({}))
        .await;
    assert_eq!(error_of(&response.body).0, "QUERY_TOO_LARGE");

    // The service is still fine.
    let response = app
        .graphql(Some(&access), "{ a: hi b: hi }", json!({}))
        .await;
    assert_eq!(response.body, json!({"data": {"a": "Hi!", "b": "Hi!"}}));
}

#[actix_web::test]
async fn batches_are_bounded() {
    let app = TestApp::spawn(&["--max-batch-size=3"]).await;
    let (_, access) = app.user("alice", false).await;
    let auth = vec![("Authorization".to_owned(), format!("Bearer {access}"))];
    let batch = |n: usize| {
        serde_json::Value::Array((0..n).map(|_| json!({"query": "{ hi }"})).collect())
            .to_string()
            .into_bytes()
    };
    let response = app.post_with_headers("/graphql/", &auth, batch(3)).await;
    assert_eq!(response.status, 200);
    assert_eq!(
        response.body,
        json!([{"data": {"hi": "Hi!"}}, {"data": {"hi": "Hi!"}}, {"data": {"hi": "Hi!"}}])
    );

    let response = app.post_with_headers("/graphql/", &auth, batch(4)).await;
    assert_eq!(response.status, 400);
    let (code, message) = error_of(&response.body);
    assert_eq!(code, "BATCH_TOO_LARGE");
    assert!(message.contains("1 to 3 operations"), "{message}");

    let app = TestApp::spawn(&["--max-batch-size=0"]).await;
    let response = app.post_with_headers("/graphql/", &auth, batch(1)).await;
    assert_eq!(response.status, 400);
    assert_eq!(error_of(&response.body).0, "BATCH_NOT_ACCEPTED");
}

#[actix_web::test]
async fn malformed_requests_get_a_clear_400() {
    let app = TestApp::spawn(&[]).await;
    for (body, expected) in [
        ("{not json", "not valid JSON"),
        ("{}", "has no `query`"),
        (r#"{"query": 1}"#, "`query` must be a string"),
        (
            r#"{"query": "{ hi }", "variables": [1]}"#,
            "`variables` must be a JSON object",
        ),
        ("42", "must be a JSON object"),
    ] {
        let response = app
            .post_with_headers("/graphql/", &[], body.as_bytes().to_vec())
            .await;
        assert_eq!(response.status, 400, "{body}");
        let (code, message) = error_of(&response.body);
        assert_eq!(code, "BAD_REQUEST");
        assert!(message.contains(expected), "{body}: {message}");
    }
    // A syntax error is a GraphQL error (200 under application/json).
    let response = app.graphql(None, "{ hi", json!({})).await;
    assert_eq!(response.status, 200);
    assert_eq!(error_of(&response.body).0, "GRAPHQL_PARSE_FAILED");
    let response = app.graphql(None, "{ nope }", json!({})).await;
    assert_eq!(error_of(&response.body).0, "GRAPHQL_VALIDATION_FAILED");
}

#[actix_web::test]
async fn a_subscription_over_http_is_refused_with_directions() {
    let app = TestApp::spawn(&[]).await;
    let (_, access) = app.user("alice", false).await;
    let response = app
        .graphql(
            Some(&access),
            "subscription { carModelUpdated(pk: 1) { make model } }",
            json!({}),
        )
        .await;
    let (code, message) = error_of(&response.body);
    assert_eq!(code, "SUBSCRIPTION_OVER_HTTP");
    assert!(message.contains("websocket"), "{message}");
    assert_eq!(response.body["data"], serde_json::Value::Null);
}
