//! Persisted queries over HTTP: Apollo's automatic persisted queries (hash first, then hash and
//! document, then hash only), registered in Redis for every replica; trusted documents only
//! (TRUSTED_DOCUMENTS), which refuses anything else.

#![allow(clippy::unwrap_used)]

use graphql_schema::persisted::sha256_hex;
use serde_json::{json, Value};

use test_support::urlencode;

use crate::helpers::TestApp;

fn persisted(query: &str) -> Value {
    json!({"persistedQuery": {"version": 1, "sha256Hash": sha256_hex(query)}})
}

async fn post(app: &TestApp, token: &str, body: Value) -> (u16, Value) {
    let response = app
        .post_with_headers(
            "/graphql/",
            &[("Authorization".into(), format!("Bearer {token}"))],
            body.to_string().into_bytes(),
        )
        .await;
    (response.status, response.body)
}

fn code(body: &Value) -> &str {
    body["errors"][0]["extensions"]["code"]
        .as_str()
        .unwrap_or_default()
}

#[actix_web::test]
async fn automatic_persisted_queries_round_trip_through_redis() {
    let app = TestApp::spawn(&[]).await;
    let (_, token) = app.user("alice", false).await;
    let query = "{ hi }";
    let (status, body) = post(&app, &token, json!({"extensions": persisted(query)})).await;
    assert_eq!(
        (status, code(&body)),
        (200, "PERSISTED_QUERY_NOT_FOUND"),
        "{body}"
    );
    assert_eq!(body["errors"][0]["message"], "PersistedQueryNotFound");

    // A document that is not the hash's is refused, and not registered.
    let (status, body) = post(
        &app,
        &token,
        json!({"query": "{ me { id } }", "extensions": persisted(query)}),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        // A request error: 200 with application/json, as every request error of that framing.
        (200, "PERSISTED_QUERY_HASH_MISMATCH"),
        "{body}"
    );

    let (status, body) = post(
        &app,
        &token,
        json!({"query": query, "extensions": persisted(query)}),
    )
    .await;
    assert_eq!((status, &body), (200, &json!({"data": {"hi": "Hi!"}})));
    let (status, body) = post(&app, &token, json!({"extensions": persisted(query)})).await;
    assert_eq!((status, &body), (200, &json!({"data": {"hi": "Hi!"}})));

    // Registered in Redis, where every replica and gateway looks it up.
    let redis = deadpool_redis::Config::from_url(test_support::redis_url())
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .unwrap();
    let mut conn = redis.get().await.unwrap();
    let stored: Option<String> = deadpool_redis::redis::cmd("GET")
        .arg(format!("{}apq:{}", app.redis_prefix, sha256_hex(query)))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(stored.as_deref(), Some(query));
    // GET, as Apollo's link may send hashed queries.
    let (status, _, text) = app
        .get(
            &format!(
                "/graphql/?extensions={}",
                urlencode(&persisted(query).to_string())
            ),
            &[("Authorization", &format!("Bearer {token}"))],
        )
        .await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("Hi!"), "{text}");
}

#[actix_web::test]
async fn trusted_documents_only_run_the_manifest() {
    let dir = std::env::temp_dir().join(format!("gqlws-trusted-{}", test_support::random_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = dir.join("manifest.json");
    let hi = "query Hi { hi }";
    std::fs::write(
        &manifest,
        json!({"format": "apollo-persisted-query-manifest", "version": 1, "operations": [
            {"id": sha256_hex(hi), "name": "Hi", "type": "query", "body": hi}]})
        .to_string(),
    )
    .unwrap();
    let app = TestApp::spawn(&[&format!("--trusted-documents={}", manifest.display())]).await;
    let (_, token) = app.user("alice", false).await;
    // By hash, or by its exact text.
    let (status, body) = post(&app, &token, json!({"extensions": persisted(hi)})).await;
    assert_eq!((status, &body), (200, &json!({"data": {"hi": "Hi!"}})));
    let (status, body) = post(&app, &token, json!({"query": hi})).await;
    assert_eq!((status, &body), (200, &json!({"data": {"hi": "Hi!"}})));
    // Anything else, even a valid document, even with its own hash: refused, not registered.
    for body in [
        json!({"query": "{ hi }"}),
        json!({"query": "{ hi }", "extensions": persisted("{ hi }")}),
        json!([{"query": hi}, {"query": "{ me { id } }"}]),
    ] {
        let (status, answer) = post(&app, &token, body.clone()).await;
        let refused = if body.is_array() { &answer[1] } else { &answer };
        assert_eq!(
            code(refused),
            "PERSISTED_QUERY_NOT_IN_LIST",
            "{body}: {answer}"
        );
        assert_eq!(status, 200);
    }
    // With the GraphQL-over-HTTP media type, a request error is a 400 of that type.
    let response = app
        .post_with_headers(
            "/graphql/",
            &[
                ("Authorization".into(), format!("Bearer {token}")),
                ("Accept".into(), "application/graphql-response+json".into()),
            ],
            json!({"extensions": persisted("{ hi }")})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(response.status, 400);
    assert_eq!(code(&response.body), "PERSISTED_QUERY_NOT_IN_LIST");
    assert_eq!(
        response
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/graphql-response+json")
    );
    let _ = std::fs::remove_dir_all(&dir);
}
