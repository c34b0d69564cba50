//! `gqlws create-user` and `deactivate-user` beside the running server, and a private car
//! walked through with them: its owner and staff see it over HTTP and on the socket, another
//! user does not; a deactivation reaches the running server through its outbox relay.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{Incoming, TestApp, WsClient};

fn create_user(app: &TestApp, username: &str) {
    let out = app.gqlws(
        &["create-user", "--username", username, "--password-stdin"],
        &format!("{username}-pw\n"),
    );
    assert!(out.contains(&format!("created user {username}")), "{out}");
}

async fn subscribed(app: &TestApp, token: &str, pk: &str) -> WsClient {
    let mut client = WsClient::connect(&app.ws_url(), "graphql-transport-ws").await;
    assert_eq!(client.init(token).await["type"], "connection_ack");
    client
        .subscribe(
            "1",
            &format!("subscription {{ carModelUpdated(pk: {pk}) {{ id make private }} }}"),
        )
        .await;
    client
}

#[actix_web::test]
async fn a_private_car_with_users_made_by_gqlws() {
    let app = TestApp::spawn().await;
    create_user(&app, "bob");
    create_user(&app, "carol");
    let (bob, _) = app.login_as("bob", "bob-pw").await;
    let (carol, carol_refresh) = app.login_as("carol", "carol-pw").await;
    let (admin, _) = app.login().await;

    let created = app
        .graphql(
            Some(&bob),
            r#"mutation { createCar(input: {make: "Tatra", model: "603", private: true}) { id private } }"#,
        )
        .await;
    let pk = created["data"]["createCar"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let car = format!("{{ car(pk: {pk}) {{ make }} cars {{ totalCount }} }}");
    assert_eq!(
        app.graphql(Some(&bob), &car).await["data"]["car"]["make"],
        "Tatra"
    );
    assert_eq!(
        app.graphql(Some(&admin), &car).await["data"]["car"]["make"],
        "Tatra"
    );
    let seen_by_carol = app.graphql(Some(&carol), &car).await;
    assert_eq!(seen_by_carol["data"]["car"], Value::Null);
    // The demo's two public cars only.
    assert_eq!(seen_by_carol["data"]["cars"]["totalCount"], 2);

    let mut watching_bob = subscribed(&app, &bob, &pk).await;
    let mut watching_carol = subscribed(&app, &carol, &pk).await;
    let mut watching_admin = subscribed(&app, &admin, &pk).await;
    // Let the subscriptions start before the write.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let update =
        format!(r#"mutation {{ updateCar(pk: {pk}, input: {{make: "Tatra T3"}}) {{ make }} }}"#);
    assert_eq!(
        app.graphql(Some(&bob), &update).await["data"]["updateCar"]["make"],
        "Tatra T3"
    );
    for client in [&mut watching_bob, &mut watching_admin] {
        let payload = client
            .next_payload_within(Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(payload["data"]["carModelUpdated"]["make"], "Tatra T3");
    }
    // Carol may not change it either, and is told it does not exist.
    let refused = app.graphql(Some(&carol), &update).await;
    assert_eq!(
        refused["errors"][0]["extensions"]["code"], "NOT_FOUND",
        "{refused}"
    );
    if let Some(message) = watching_carol
        .answer_within(Duration::from_millis(300))
        .await
    {
        panic!("carol received {message:?}");
    }

    // Deactivated by an operator beside the server: her socket is closed and her token refused.
    let out = app.gqlws(&["deactivate-user", "--username", "carol"], "");
    assert!(out.contains("access tokens are revoked"), "{out}");
    match watching_carol.recv_skip_keepalive().await {
        Incoming::Close(code, reason) => {
            assert_eq!(code, Some(4403), "{reason}");
        }
        other => panic!("expected carol's socket to close, got {other:?}"),
    }
    let refused = app.graphql(Some(&carol), "{ hi }").await;
    assert_eq!(
        refused["errors"][0]["extensions"]["code"], "UNAUTHENTICATED",
        "{refused}"
    );
    let (status, _) = app
        .post(
            "/api/token/refresh/",
            json!({"refresh": carol_refresh}),
            &[],
        )
        .await;
    assert_eq!(status, 401);
    let (status, _) = app
        .post(
            "/api/token/",
            json!({"username": "carol", "password": "carol-pw"}),
            &[],
        )
        .await;
    assert_eq!(status, 401);
    // Bob's socket is untouched.
    assert_eq!(app.graphql(Some(&bob), "{ hi }").await["data"]["hi"], "Hi!");
}
