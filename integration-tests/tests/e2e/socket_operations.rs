//! Queries and mutations sent on the websocket, with the npm clients (`node/subscribe.mjs`:
//! `graphql-ws` and `subscriptions-transport-ws`), through NGINX and against the embedded binary:
//! `{ hi }`, `me`, a mutation, a query error and a document past the limits, each answered as
//! over HTTP. The gateway runs none
//! of them itself; it forwards them to api-service with the connection's token
//! (subscription-gateway's forward.rs), so a mutation's event goes out as over HTTP.

use serde_json::{json, Value};

use crate::client::{admin_tokens, http, post_token, NodeSubscriber};
use crate::embedded::Gqlws;
use crate::stack::Stack;

const CLIENTS: [&str; 2] = ["graphql-ws", "subscriptions-transport-ws"];

/// The one result of `query` sent on a socket by the npm `client`.
async fn on_the_socket(ws_url: &str, client: &str, access: &str, query: &str) -> Value {
    let mut node = NodeSubscriber::spawn(ws_url, client, Some(access), query, 1);
    assert_eq!(node.next().await, json!({"connected": true}), "{client}");
    let line = node.next().await;
    assert!(
        line.get("payload").is_some(),
        "{client}: `{query}` gave no result: {line}"
    );
    line["payload"].clone()
}

/// The GraphQL errors of a request that the server refused before executing it (the client's
/// `error` callback).
async fn refused_on_the_socket(ws_url: &str, client: &str, access: &str, query: &str) -> Value {
    let mut node = NodeSubscriber::spawn(ws_url, client, Some(access), query, 1);
    assert_eq!(node.next().await, json!({"connected": true}), "{client}");
    let line = node.next().await;
    // subscriptions-transport-ws hands its error callback the first error of the list.
    match &line["error"]["graphql"] {
        Value::Array(errors) => Value::Array(errors.clone()),
        Value::Object(error) if client == "subscriptions-transport-ws" => {
            json!([Value::Object(error.clone())])
        }
        _ => panic!("{client}: `{query}` was not refused with GraphQL errors: {line}"),
    }
}

/// The same query over HTTP POST.
async fn over_http(base_url: &str, access: &str, query: &str) -> Value {
    let mut response = http()
        .post(format!("{base_url}/graphql/"))
        .insert_header(("Authorization", format!("Bearer {access}")))
        .send_json(&json!({ "query": query }))
        .await
        .unwrap();
    let body = response.body().await.unwrap();
    serde_json::from_slice(&body).unwrap()
}

async fn operations_are_answered_as_over_http(ws_url: &str, base_url: &str, access: &str) {
    for client in CLIENTS {
        let hi = on_the_socket(ws_url, client, access, "{ hi }").await;
        assert_eq!(hi, json!({"data": {"hi": "Hi!"}}), "{client}");

        let me = on_the_socket(ws_url, client, access, "{ me { username } }").await;
        assert_eq!(me["data"]["me"]["username"], "admin", "{client}: {me}");

        let model = format!("socket-{client}");
        let mutation = format!(
            r#"mutation {{ updateCar(pk: 1, input: {{model: "{model}"}}) {{ id model }} }}"#
        );
        let updated = on_the_socket(ws_url, client, access, &mutation).await;
        assert_eq!(
            updated["data"]["updateCar"],
            json!({"id": "1", "model": model}),
            "{client}: {updated}"
        );
        // Committed: HTTP reads it back.
        let read = over_http(base_url, access, "{ car(pk: 1) { model } }").await;
        assert_eq!(read["data"]["car"]["model"], model.as_str(), "{read}");

        // Errors are the same list, with the same `extensions.code`, as over HTTP: a resolver's
        // (the operation ran: a result with `data: null` and `errors`)…
        let failing = "mutation { deleteCar(pk: 999999) { id } }";
        let on_socket = on_the_socket(ws_url, client, access, failing).await;
        let on_http = over_http(base_url, access, failing).await;
        assert_eq!(
            on_socket["errors"][0]["extensions"]["code"], "NOT_FOUND",
            "{client}: {on_socket}"
        );
        assert_eq!(on_socket, on_http, "{client}");
        // …and a document's that does not validate (it never ran: an `error` message).
        let invalid = "{ car(pk: 1) { noSuchField } }";
        let refused = refused_on_the_socket(ws_url, client, access, invalid).await;
        let on_http = over_http(base_url, access, invalid).await;
        assert_eq!(
            refused[0]["extensions"]["code"], "GRAPHQL_VALIDATION_FAILED",
            "{client}: {refused}"
        );
        assert_eq!(refused, on_http["errors"], "{client}");
        // …and one past the document limits (MAX_QUERY_DEPTH, 24 by default): the same bound.
        let mut deep = String::from("name");
        for _ in 0..30 {
            deep = format!("ofType {{ {deep} }}");
        }
        let deep = format!("{{ __type(name: \"Car\") {{ {deep} }} }}");
        let refused = refused_on_the_socket(ws_url, client, access, &deep).await;
        let on_http = over_http(base_url, access, &deep).await;
        assert_eq!(
            refused[0]["extensions"]["code"], "QUERY_TOO_DEEP",
            "{client}: {refused}"
        );
        assert_eq!(refused, on_http["errors"], "{client}");
    }
}

#[actix_web::test]
async fn queries_mutations_and_errors_on_the_socket_through_nginx() {
    let stack = Stack::shared();
    let (access, _) = admin_tokens(stack).await;
    operations_are_answered_as_over_http(&stack.ws_url(), &stack.url, &access).await;
}

#[actix_web::test]
async fn queries_mutations_and_errors_on_the_socket_in_the_embedded_mode() {
    let gqlws = Gqlws::start().await;
    let (status, tokens) = post_token(&gqlws.url, "admin", "letmein").await;
    assert_eq!(status, 200, "{tokens}");
    let access = tokens["access"].as_str().unwrap();
    operations_are_answered_as_over_http(&gqlws.ws_url(), &gqlws.url, access).await;
}
