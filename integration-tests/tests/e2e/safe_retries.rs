//! Safe retries across a crash: a mutation sent with an `Idempotency-Key` whose api replica is
//! SIGKILLed right after it committed (the answer lost or not, as a crash decides) is retried
//! through NGINX with the same key until an api answers, and is committed once.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::{admin_tokens, graphql, http, ws_subscribed};
use crate::stack::Stack;

const CREATE: &str = "mutation($input: CarInput!) { createCar(input: $input) { id make } }";

/// POSTs the mutation with the key; the status and body, or the transport error.
async fn create_with_key(
    stack: &Stack,
    access: &str,
    key: &str,
    make: &str,
) -> Result<(u16, Value), String> {
    let mut response = http()
        .post(format!("{}/graphql/", stack.url))
        .insert_header(("Authorization", format!("Bearer {access}")))
        .insert_header(("Idempotency-Key", key))
        .timeout(Duration::from_secs(20))
        .send_json(
            &json!({"query": CREATE, "variables": {"input": {"make": make, "model": "Octavia"}}}),
        )
        .await
        .map_err(|err| err.to_string())?;
    let body = response.body().await.map_err(|err| err.to_string())?;
    Ok((
        response.status().as_u16(),
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    ))
}

#[actix_web::test]
async fn a_mutation_retried_with_its_key_after_its_api_replica_is_killed_commits_once() {
    let stack = Stack::start("safe-retries");
    let (access, _) = admin_tokens(&stack).await;
    let make = format!("retried-{}", test_support::random_suffix());
    let key = format!("key-{}", test_support::random_suffix());
    let mut created = ws_subscribed(
        &stack,
        "graphql-transport-ws",
        &access,
        "subscription { carCreated { id make } }",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The write's event is published right after its commit: then every api replica is killed,
    // whichever served it, before or after its answer went out.
    let apis = ["api-service:api-service-0", "api-service:api-service-1"];
    let victims: Vec<u32> = apis.iter().map(|process| stack.pid_of(process)).collect();
    let (first, committed_id) =
        futures_util::future::join(create_with_key(&stack, &access, &key, &make), async {
            loop {
                let message = created.expect_json().await;
                let car = &message["payload"]["data"]["carCreated"];
                if car["make"] == make.as_str() {
                    for pid in &victims {
                        let _ = std::process::Command::new("kill")
                            .args(["-KILL", &pid.to_string()])
                            .status();
                    }
                    return car["id"].as_str().unwrap().to_owned();
                }
            }
        })
        .await;

    // Retried with the same key until a (restarted) api answers.
    let deadline = Instant::now() + Duration::from_secs(60);
    let retried = loop {
        match create_with_key(&stack, &access, &key, &make).await {
            Ok((200, body)) if body["data"]["createCar"]["id"].is_string() => break body,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "no api answered the retry: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    assert_eq!(
        retried["data"]["createCar"]["id"],
        committed_id.as_str(),
        "the retry is answered with the committed car: {retried}"
    );
    if let Ok((200, body)) = &first {
        assert_eq!(
            body, &retried,
            "the first answer, when it got out, is the retry's"
        );
    }
    let cars = graphql(
        &stack,
        Some(&format!("Bearer {access}")),
        "{ cars(first: 100) { nodes { make } } }",
        json!({}),
    )
    .await;
    let named = cars["data"]["cars"]["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("{cars}"))
        .iter()
        .filter(|car| car["make"] == make.as_str())
        .count();
    assert_eq!(named, 1, "committed once (first attempt: {first:?})");
    // No second event either: the retry wrote nothing.
    if let Some(message) = created.answer_within(Duration::from_millis(500)).await {
        panic!("a second carCreated after the retry: {message:?}");
    }
}
