//! The third-party clients from npm (`node/subscribe.mjs`) through NGINX, on the shared stack:
//! `graphql-ws` with `connectionParams` returning the token, and `subscriptions-transport-ws`,
//! receiving an update of car 1 made by `trigger-event`; both refused with a bad token.

use serde_json::json;

use crate::client::{
    admin_tokens, bad_tokens, expect_trigger_event_update, trigger_event, NodeSubscriber,
    CAR_1_UPDATED,
};
use crate::stack::Stack;

async fn receives_a_trigger_event_update_of_car_1(client: &str) {
    let stack = Stack::shared();
    let (access, _) = admin_tokens(stack).await;
    let mut subscriber =
        NodeSubscriber::spawn(&stack.ws_url(), client, Some(&access), CAR_1_UPDATED, 1);
    assert_eq!(subscriber.next().await, json!({"connected": true}));

    // As in the reference: trigger-event, then the update shows.
    expect_trigger_event_update(subscriber, client, || {
        trigger_event(stack, 1);
    })
    .await;
}

#[actix_web::test]
async fn graphql_ws_npm_client_receives_the_trigger_event_update_of_car_1() {
    receives_a_trigger_event_update_of_car_1("graphql-ws").await;
}

#[actix_web::test]
async fn subscriptions_transport_ws_npm_client_receives_the_trigger_event_update_of_car_1() {
    receives_a_trigger_event_update_of_car_1("subscriptions-transport-ws").await;
}

#[actix_web::test]
async fn npm_clients_are_refused_with_the_documented_errors_for_bad_tokens() {
    let stack = Stack::shared();
    let (access, refresh) = admin_tokens(stack).await;
    let mut cases: Vec<(&str, Option<String>, &str)> = bad_tokens(&access, &refresh)
        .into_iter()
        .map(|(label, token, word)| (label, Some(token), word))
        .collect();
    cases.push(("no token", None, "no token"));
    for (label, token, word) in cases {
        // graphql-ws: the socket closes with 4403 and the reason.
        let mut subscriber = NodeSubscriber::spawn(
            &stack.ws_url(),
            "graphql-ws",
            token.as_deref(),
            CAR_1_UPDATED,
            1,
        );
        let line = subscriber.next().await;
        let close = &line["error"]["close"];
        assert_eq!(close["code"], 4403, "graphql-ws, {label}: {line}");
        let reason = close["reason"].as_str().unwrap_or_default().to_lowercase();
        assert!(reason.contains(word), "graphql-ws, {label}: {line}");
        assert_eq!(subscriber.wait(), Some(1));

        // subscriptions-transport-ws: connection_error with the message.
        let mut subscriber = NodeSubscriber::spawn(
            &stack.ws_url(),
            "subscriptions-transport-ws",
            token.as_deref(),
            CAR_1_UPDATED,
            1,
        );
        let line = subscriber.next().await;
        let message = line["error"]["connection_error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase();
        assert!(
            message.contains(word),
            "subscriptions-transport-ws, {label}: {line}"
        );
        assert_eq!(subscriber.wait(), Some(1));
    }
}
