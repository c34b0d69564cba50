//! GraphQL over HTTP beyond POST: GET for queries, the browser pages, media types, health.

#![allow(clippy::unwrap_used)]

use serde_json::{json, Value};

use test_support::urlencode;

use crate::helpers::{error_of, TestApp};

#[actix_web::test]
async fn get_runs_queries_but_not_mutations() {
    let app = TestApp::spawn(&["--demo"]).await;
    let (_, access) = app.user("alice", false).await;
    let bearer = format!("Bearer {access}");
    let auth = [
        ("Authorization", bearer.as_str()),
        ("Accept", "application/json"),
    ];

    let path = format!(
        "/graphql?query={}&variables={}",
        urlencode("query($pk: ID!) { car(pk: $pk) { make } }"),
        urlencode(r#"{"pk": 1}"#)
    );
    let (status, _, body) = app.get(&path, &auth).await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"data": {"car": {"make": "Skoda"}}})
    );

    // Fields come in the order the query asked for them, not sorted.
    let path = format!(
        "/graphql?query={}",
        urlencode("{ hi car(pk: 1) { year make } }")
    );
    let (_, _, body) = app.get(&path, &auth).await;
    assert_eq!(
        body,
        r#"{"data":{"hi":"Hi!","car":{"year":"2011","make":"Skoda"}}}"#
    );

    let path = format!(
        "/graphql/?query={}",
        urlencode("mutation { deleteCar(pk: 1) { id } }")
    );
    let (status, _, body) = app.get(&path, &auth).await;
    assert_eq!(status, 405);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(error_of(&body).1.contains("POST"));
    // Still there.
    let response = app
        .graphql(Some(&access), "{ car(pk: 1) { id } }", json!({}))
        .await;
    assert_eq!(response.body["data"]["car"]["id"], "1");
}

#[actix_web::test]
async fn a_browser_gets_playground_and_graphiql_from_this_server_only() {
    let app = TestApp::spawn(&[]).await;
    let client = awc::Client::default();
    let mut assets = Vec::new();
    for (path, title) in [
        ("/graphql", "GraphQL Playground"),
        ("/graphql/", "GraphQL Playground"),
        ("/graphiql", "GraphiQL"),
    ] {
        let mut response = client
            .get(format!("{}{path}", app.address))
            .insert_header(("Accept", "text/html,application/xhtml+xml,*/*;q=0.8"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        assert!(header("content-type").starts_with("text/html"), "{path}");
        let policy = header("content-security-policy");
        assert!(
            policy.contains("default-src 'self'") && policy.contains("script-src 'self';"),
            "{path}: {policy}"
        );
        let body = String::from_utf8(response.body().await.unwrap().to_vec()).unwrap();
        assert!(body.contains(&format!("<title>{title}</title>")), "{body}");
        // Every script and style is a file of this server: no other host, nothing inline.
        assert!(!body.contains("http"), "{path}: {body}");
        assert!(!body.contains("<script>"), "{path}: {body}");
        for part in body.split('"') {
            if part.starts_with("/graphql/assets/") {
                assets.push(part.to_owned());
            }
        }
    }
    assert!(assets.len() >= 7, "{assets:?}");
    for asset in &assets {
        let (status, content_type, body) = app.get(asset, &[]).await;
        assert_eq!(status, 200, "{asset}");
        assert!(!body.is_empty(), "{asset}");
        let expected = match asset.rsplit('.').next() {
            Some("js") => "text/javascript",
            Some("css") => "text/css",
            Some("png") => "image/png",
            other => panic!("{asset}: {other:?}"),
        };
        assert!(
            content_type.starts_with(expected),
            "{asset}: {content_type}"
        );
    }
    let (status, _, _) = app.get("/graphql/assets/nope.js", &[]).await;
    assert_eq!(status, 404);
    // Not a browser: a JSON error saying what is missing.
    let (status, _, body) = app
        .get("/graphql/", &[("Accept", "application/json")])
        .await;
    assert_eq!(status, 400);
    assert!(body.contains("missing `query`"));
}

#[actix_web::test]
async fn media_types_follow_graphql_over_http() {
    let app = TestApp::spawn(&[]).await;
    let response = app
        .post_with_headers(
            "/graphql/",
            &[("Content-Type".into(), "text/plain".into())],
            b"{ hi }".to_vec(),
        )
        .await;
    assert_eq!(response.status, 415);
    assert_eq!(error_of(&response.body).0, "UNSUPPORTED_MEDIA_TYPE");

    let accept = vec![(
        "Accept".to_owned(),
        "application/graphql-response+json".to_owned(),
    )];
    let response = app
        .post_with_headers(
            "/graphql",
            &accept,
            json!({"query": "{ nope }"}).to_string().into_bytes(),
        )
        .await;
    assert_eq!(response.status, 400);
    assert_eq!(
        response.headers.get("content-type").unwrap(),
        "application/graphql-response+json"
    );
    // An auth failure is a field error: the request itself was fine.
    let response = app
        .post_with_headers(
            "/graphql",
            &accept,
            json!({"query": "{ hi }"}).to_string().into_bytes(),
        )
        .await;
    assert_eq!(response.status, 200);
    assert_eq!(error_of(&response.body).0, "UNAUTHENTICATED");
}

#[actix_web::test]
async fn health_readiness_and_metrics() {
    let app = TestApp::spawn(&[]).await;
    let (status, _, _) = app.get("/healthz", &[]).await;
    assert_eq!(status, 200);
    let (status, _, body) = app.get("/readyz", &[]).await;
    assert_eq!(status, 200, "{body}");
    let _ = app.graphql(None, "{ hi }", json!({})).await;
    let (status, _, body) = app.get("/metrics", &[]).await;
    assert_eq!(status, 200);
    assert!(body.contains("http_requests_total"), "{body}");
    assert!(body.contains("outbox_pending_events"), "{body}");
}

#[actix_web::test]
async fn run_until_stopped_returns_when_told_to_stop() {
    let db = test_support::TestDb::new();
    let settings = crate::helpers::settings_from(&[
        "api-service".into(),
        "--listen-addr=127.0.0.1:0".into(),
        format!("--database-url={}", db.url),
        format!("--jwt-secret={}", crate::helpers::SECRET),
        "--log-level=warn".into(),
    ]);
    let app = api_service::startup::Application::build(settings)
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = actix_web::rt::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    stop.send(()).unwrap();
    // The server and the outbox relay both stop; the future completes.
    running.await.unwrap().unwrap();
}
