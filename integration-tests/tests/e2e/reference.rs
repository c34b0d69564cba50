//! The reference's walk-through (README, DESIGN steps 2–6) with the Rust client, on the shared
//! stack: token, `{ hi }`, `carModelUpdated(pk: 1)` in both subprotocols, `trigger-event`; bad
//! tokens on queries and on subscriptions.

use std::time::Duration;

use serde_json::{json, Value};

use crate::client::{
    admin_tokens, bad_tokens, graphql, post_token, trigger_event, ws_connect, ws_subscribed,
    Incoming, CAR_1_UPDATED, TRIGGER_MAKES,
};
use crate::stack::Stack;

#[actix_web::test]
async fn token_hi_subscription_and_trigger_event_through_nginx() {
    walk_through(Stack::shared()).await;
}

/// Steps 2–5 of the walk-through on `stack` (also run on a Redis Cluster: cluster.rs).
pub async fn walk_through(stack: &Stack) {
    // 2. A token pair over REST.
    let (access, _refresh) = admin_tokens(stack).await;

    // 3. `{ hi }` with the token.
    let answer = graphql(
        stack,
        Some(&format!("Bearer {access}")),
        "{ hi }",
        Value::Null,
    )
    .await;
    assert_eq!(answer, json!({"data": {"hi": "Hi!"}}));

    // 4. The subscription with the token in connectionParams, in both subprotocols.
    let mut clients = Vec::new();
    for protocol in ["graphql-transport-ws", "graphql-ws"] {
        clients.push(ws_subscribed(stack, protocol, &access, CAR_1_UPDATED).await);
    }

    // 5. trigger-event; every subscriber sees the update. The gateway subscribes to Redis
    // asynchronously after `subscribe`, so an event may go out before it listens: trigger
    // again until each client has one.
    let mut received: Vec<Option<Value>> = vec![None, None];
    for _ in 0..20 {
        trigger_event(stack, 1);
        for (client, slot) in clients.iter_mut().zip(received.iter_mut()) {
            if slot.is_none() {
                *slot = client
                    .next_payload_within(Duration::from_secs(2))
                    .await
                    .unwrap_or_else(|err| panic!("{}: {err}", client.protocol));
            }
        }
        if received.iter().all(Option::is_some) {
            break;
        }
    }
    for (client, payload) in clients.iter().zip(&received) {
        let payload = payload
            .as_ref()
            .unwrap_or_else(|| panic!("{}: no update of car 1 arrived", client.protocol));
        let car = &payload["data"]["carModelUpdated"];
        assert_eq!(car["id"], "1", "{payload}");
        assert_eq!(car["model"], "Octavia", "{payload}");
        assert!(
            TRIGGER_MAKES.contains(&car["make"].as_str().unwrap_or_default()),
            "{payload}"
        );
    }
}

#[actix_web::test]
async fn bad_credentials_and_tokens_fail_on_queries_with_unauthenticated() {
    let stack = Stack::shared();
    let (status, body) = post_token(&stack.url, "admin", "wrong password").await;
    assert_eq!(status, 401);
    assert_eq!(body["code"], "no_active_account", "{body}");

    let (access, refresh) = admin_tokens(stack).await;
    let mut cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no header", None, "missing"),
        ("not Bearer", Some("Token abc".to_owned()), "malformed"),
    ];
    for (label, token, word) in bad_tokens(&access, &refresh) {
        cases.push((label, Some(format!("Bearer {token}")), word));
    }
    for (label, header, word) in cases {
        let answer = graphql(stack, header.as_deref(), "{ hi }", Value::Null).await;
        let error = &answer["errors"][0];
        assert_eq!(
            error["extensions"]["code"], "UNAUTHENTICATED",
            "{label}: {answer}"
        );
        let message = error["message"].as_str().unwrap_or_default();
        assert!(
            message.to_lowercase().contains(word),
            "{label}: `{message}` does not say `{word}`"
        );
        assert!(
            answer["data"].is_null() || answer["data"]["hi"].is_null(),
            "{label}: {answer}"
        );
    }
}

#[actix_web::test]
async fn bad_tokens_fail_on_subscriptions_with_4403_or_connection_error() {
    let stack = Stack::shared();
    let (access, refresh) = admin_tokens(stack).await;
    let mut cases = bad_tokens(&access, &refresh);
    cases.push(("no token", String::new(), "no token"));
    for (label, token, word) in cases {
        let payload = if token.is_empty() {
            json!({})
        } else {
            json!({"Authorization": format!("Bearer {token}")})
        };

        // graphql-ws (graphql-transport-ws): close 4403 with the reason.
        let mut client = ws_connect(stack, "graphql-transport-ws").await.unwrap();
        client
            .send(json!({"type": "connection_init", "payload": payload}))
            .await;
        match client.answer().await {
            Incoming::Close(code, reason) => {
                assert_eq!(code, Some(4403), "{label}: {reason}");
                assert!(
                    reason.to_lowercase().contains(word),
                    "{label}: `{reason}` does not say `{word}`"
                );
            }
            other => panic!("{label}: expected close 4403, got {other:?}"),
        }

        // subscriptions-transport-ws (graphql-ws): connection_error with the message, then close.
        let mut client = ws_connect(stack, "graphql-ws").await.unwrap();
        client
            .send(json!({"type": "connection_init", "payload": payload}))
            .await;
        match client.answer().await {
            Incoming::Json(error) => {
                assert_eq!(error["type"], "connection_error", "{label}: {error}");
                let message = error["payload"]["message"].as_str().unwrap_or_default();
                assert!(
                    message.to_lowercase().contains(word),
                    "{label}: `{message}` does not say `{word}`"
                );
            }
            other => panic!("{label}: expected connection_error, got {other:?}"),
        }
        match client.answer().await {
            Incoming::Close(code, _) => assert_eq!(code, Some(4403), "{label}"),
            other => panic!("{label}: expected the close, got {other:?}"),
        }
    }
}
