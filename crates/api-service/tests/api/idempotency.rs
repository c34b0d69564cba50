//! Safe retries: a mutation sent again with the same idempotency key (the `Idempotency-Key`
//! header, or `extensions.idempotencyKey`) is answered with what the first one committed,
//! without writing or publishing again; a key reused for another request is refused.

use serde_json::{json, Value};

use crate::helpers::{error_of, Response, TestApp};

const CREATE: &str = "mutation($input: CarInput!) { createCar(input: $input) { id make } }";

fn create_body(make: &str) -> Vec<u8> {
    json!({"query": CREATE, "variables": {"input": {"make": make, "model": "Octavia"}}})
        .to_string()
        .into_bytes()
}

async fn post(app: &TestApp, token: &str, key: Option<&str>, body: Vec<u8>) -> Response {
    let mut headers = vec![("Authorization".to_owned(), format!("Bearer {token}"))];
    if let Some(key) = key {
        headers.push(("Idempotency-Key".to_owned(), key.to_owned()));
    }
    app.post_with_headers("/graphql/", &headers, body).await
}

/// How many cars with this make there are, as the database has them.
async fn cars_named(app: &TestApp, token: &str, make: &str) -> usize {
    let response = app
        .graphql(
            Some(token),
            "{ cars(first: 100) { nodes { make } } }",
            json!({}),
        )
        .await;
    response.body["data"]["cars"]["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("{}", response.body))
        .iter()
        .filter(|car| car["make"] == make)
        .count()
}

#[actix_web::test]
async fn a_retried_create_commits_once_and_answers_the_same() {
    let app = TestApp::spawn(&[]).await;
    let (_, token) = app.user("retrier", false).await;
    let mut events = app.subscribe().await;
    let first = post(&app, &token, Some("k-create-1"), create_body("Once")).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.body["errors"], Value::Null, "{}", first.body);
    let (_, event) = events.next().await;
    assert_eq!(event["type"], "car.created");

    for _ in 0..3 {
        let again = post(&app, &token, Some("k-create-1"), create_body("Once")).await;
        assert_eq!(
            again.body, first.body,
            "a retry is answered as the first request was"
        );
    }
    assert_eq!(cars_named(&app, &token, "Once").await, 1);

    // A new key is a new request.
    let other = post(&app, &token, Some("k-create-2"), create_body("Once")).await;
    assert_ne!(
        other.body["data"]["createCar"]["id"],
        first.body["data"]["createCar"]["id"]
    );
    assert_eq!(cars_named(&app, &token, "Once").await, 2);
    // Only the two writes published events: the retries published none.
    let (_, event) = events.next().await;
    assert_eq!(
        event["data"]["id"]
            .as_i64()
            .map(|id| id.to_string())
            .as_deref(),
        other.body["data"]["createCar"]["id"].as_str()
    );
    // Without a key, nothing is remembered.
    post(&app, &token, None, create_body("Once")).await;
    post(&app, &token, None, create_body("Once")).await;
    assert_eq!(cars_named(&app, &token, "Once").await, 4);
}

#[actix_web::test]
async fn a_key_is_one_users_and_one_requests() {
    let app = TestApp::spawn(&[]).await;
    let (_, alice) = app.user("alice-idem", false).await;
    let (_, bob) = app.user("bob-idem", false).await;
    let first = post(&app, &alice, Some("shared-key"), create_body("Alice's")).await;
    // Another user's key of the same name is theirs.
    let bobs = post(&app, &bob, Some("shared-key"), create_body("Bob's")).await;
    assert_eq!(
        bobs.body["data"]["createCar"]["make"], "Bob's",
        "{}",
        bobs.body
    );
    // The same key for another request of the same user is refused, and writes nothing.
    let reused = post(
        &app,
        &alice,
        Some("shared-key"),
        create_body("Something else"),
    )
    .await;
    let (code, message) = error_of(&reused.body);
    assert_eq!(code, "IDEMPOTENCY_KEY_REUSED", "{}", reused.body);
    assert!(message.contains("another request"), "{message}");
    assert_eq!(cars_named(&app, &alice, "Something else").await, 0);
    assert_eq!(first.body["data"]["createCar"]["make"], "Alice's");
}

#[actix_web::test]
async fn updates_and_deletes_are_made_once_and_a_request_with_several_mutations_replays_each() {
    let app = TestApp::spawn(&[]).await;
    let (_, token) = app.user("several", false).await;
    let pk = app.create_car(&token, "Before").await;
    let both = json!({
        "query": "mutation($pk: ID!, $input: CarInput!) { \
                  a: updateCar(pk: $pk, input: {make: \"Renamed\"}) { id make } \
                  b: createCar(input: $input) { id make } }",
        "variables": {"pk": pk.to_string(), "input": {"make": "Second", "model": "Octavia"}},
    })
    .to_string()
    .into_bytes();
    let first = post(&app, &token, Some("k-both"), both.clone()).await;
    assert_eq!(first.body["data"]["a"]["make"], "Renamed", "{}", first.body);
    // Renamed again by another request meanwhile: the retry still answers what its own
    // update committed, and writes nothing.
    let later = json!({"query": "mutation($pk: ID!) { updateCar(pk: $pk, input: {make: \"Later\"}) { make } }", "variables": {"pk": pk.to_string()}});
    post(&app, &token, None, later.to_string().into_bytes()).await;
    let again = post(&app, &token, Some("k-both"), both).await;
    assert_eq!(again.body, first.body);
    assert_eq!(cars_named(&app, &token, "Second").await, 1);
    assert_eq!(cars_named(&app, &token, "Later").await, 1);

    let delete = json!({"query": "mutation($pk: ID!) { deleteCar(pk: $pk) { id make } }", "variables": {"pk": pk.to_string()}})
        .to_string()
        .into_bytes();
    let deleted = post(&app, &token, Some("k-delete"), delete.clone()).await;
    assert_eq!(
        deleted.body["data"]["deleteCar"]["make"], "Later",
        "{}",
        deleted.body
    );
    let again = post(&app, &token, Some("k-delete"), delete).await;
    assert_eq!(
        again.body, deleted.body,
        "not NOT_FOUND: the deletion it made"
    );
}

#[actix_web::test]
async fn concurrent_requests_with_one_key_write_once() {
    let app = TestApp::spawn(&[]).await;
    let (_, token) = app.user("racer", false).await;
    let answers = futures_util::future::join_all(
        (0..8).map(|_| post(&app, &token, Some("k-race"), create_body("Raced"))),
    )
    .await;
    let ids: std::collections::HashSet<String> = answers
        .iter()
        .map(|answer| {
            answer.body["data"]["createCar"]["id"]
                .as_str()
                .unwrap_or_else(|| panic!("{}", answer.body))
                .to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(cars_named(&app, &token, "Raced").await, 1);
}

#[actix_web::test]
async fn a_key_in_the_extensions_works_as_the_header_and_bad_keys_are_refused() {
    let app = TestApp::spawn(&[]).await;
    let (_, token) = app.user("extended", false).await;
    let with_key = |key: Value| {
        json!({"query": CREATE, "variables": {"input": {"make": "Ext", "model": "Octavia"}}, "extensions": {"idempotencyKey": key}})
            .to_string()
            .into_bytes()
    };
    let first = post(&app, &token, None, with_key(json!("k-ext"))).await;
    let again = post(&app, &token, Some("k-ext"), with_key(json!("k-ext"))).await;
    assert_eq!(again.body, first.body);
    assert_eq!(cars_named(&app, &token, "Ext").await, 1);

    for (header, body, why) in [
        (Some("a b"), create_body("x"), "visible ASCII"),
        (Some(""), create_body("x"), "visible ASCII"),
        (None, with_key(json!(5)), "must be a string"),
        (Some("one"), with_key(json!("two")), "differ"),
    ] {
        let refused = post(&app, &token, header, body).await;
        assert_eq!(refused.status, 400, "{}", refused.body);
        let (code, message) = error_of(&refused.body);
        assert_eq!(code, "BAD_REQUEST");
        assert!(message.contains(why), "{message}");
    }
    let long = "k".repeat(256);
    let refused = post(&app, &token, Some(&long), create_body("x")).await;
    assert_eq!(refused.status, 400);
    assert_eq!(cars_named(&app, &token, "x").await, 0);
}
