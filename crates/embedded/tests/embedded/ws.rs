//! GraphQL subscriptions over websockets on the embedded server: `/graphql` with an upgrade is
//! the gateway, fed by the in-memory log.

use serde_json::json;

use crate::helpers::{Incoming, TestApp, WsClient, MODEL_UPDATED};

#[actix_web::test]
async fn a_subscriber_sees_a_mutation_and_a_separate_trigger_event_process() {
    let app = TestApp::spawn().await;
    let (access, _) = app.login().await;
    let mut client = WsClient::connect(&app.ws_url(), "graphql-transport-ws").await;
    let ack = client.init(&access).await;
    assert_eq!(ack["type"], "connection_ack", "{ack}");
    client
        .send(json!({"id": "1", "type": "subscribe", "payload": {"query": MODEL_UPDATED}}))
        .await;
    // The subscription is registered asynchronously; give it a moment before writing.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let body = app
        .graphql(
            Some(&access),
            r#"mutation { updateCar(pk: 1, input: {make: "Skoda (VAG)"}) { make } }"#,
        )
        .await;
    assert_eq!(body["data"]["updateCar"]["make"], "Skoda (VAG)", "{body}");
    let next = client.expect_json().await;
    assert_eq!(next["type"], "next", "{next}");
    assert_eq!(next["id"], "1");
    assert_eq!(
        next["payload"]["data"]["carModelUpdated"]["make"],
        "Skoda (VAG)"
    );

    // Another process commits to the same SQLite file; the server's relay publishes the event.
    let printed = app.trigger_event();
    assert!(printed.starts_with("car 1: make"), "{printed}");
    let next = client.expect_json().await;
    assert_eq!(next["type"], "next", "{next}");
    let make = next["payload"]["data"]["carModelUpdated"]["make"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        ["Skoda", "Skoda Autogroup", "Skoda (VAG)"].contains(&make.as_str()),
        "{next}"
    );
    assert!(
        printed.contains(&format!("-> {make:?}")),
        "{printed} / {make}"
    );
}

#[actix_web::test]
async fn the_legacy_protocol_works_and_a_bad_token_is_refused() {
    let app = TestApp::spawn().await;
    let (access, _) = app.login().await;

    let mut legacy = WsClient::connect(&app.ws_url(), "graphql-ws").await;
    let ack = legacy.init(&access).await;
    assert_eq!(ack["type"], "connection_ack", "{ack}");
    legacy
        .send(json!({"id": "a", "type": "start", "payload": {"query": MODEL_UPDATED}}))
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    app.graphql(
        Some(&access),
        r#"mutation { updateCar(pk: 1, input: {make: "Skoda Autogroup"}) { make } }"#,
    )
    .await;
    let data = legacy.expect_json().await;
    assert_eq!(data["type"], "data", "{data}");
    assert_eq!(
        data["payload"]["data"]["carModelUpdated"]["make"],
        "Skoda Autogroup"
    );

    let mut modern = WsClient::connect(&app.ws_url(), "graphql-transport-ws").await;
    modern
        .send(json!({"type": "connection_init", "payload": {"Authorization": "Bearer nope"}}))
        .await;
    let (code, _) = modern.expect_close().await;
    assert_eq!(code, Some(4403));
}

#[actix_web::test]
async fn logging_out_closes_the_users_sockets() {
    let app = TestApp::spawn().await;
    let (access, refresh) = app.login().await;
    let mut client = WsClient::connect(&app.ws_url(), "graphql-transport-ws").await;
    assert_eq!(client.init(&access).await["type"], "connection_ack");
    let (status, _) = app
        .post("/api/token/blacklist/", json!({"refresh": refresh}), &[])
        .await;
    assert_eq!(status, 200);
    match client.recv_skip_keepalive().await {
        Incoming::Close(code, reason) => {
            assert_eq!(code, Some(4403));
            assert!(reason.contains("revoked"), "{reason}");
        }
        other => panic!("expected the socket to close, got {other:?}"),
    }
}

/// A type that belongs to a car, in subscriptions: results resolve the relation (`car`, its
/// owner) with no database behind the gateway, are routed by the car, and deleting the car
/// tells a `serviceVisitDeleted` subscriber of each of its visits.
#[actix_web::test]
async fn a_cars_visits_reach_their_subscribers_with_their_car() {
    let app = TestApp::spawn().await;
    let (access, _) = app.login().await;
    let mut client = WsClient::connect(&app.ws_url(), "graphql-transport-ws").await;
    let ack = client.init(&access).await;
    assert_eq!(ack["type"], "connection_ack", "{ack}");
    let selection = "{ id garage car { id make owner { username } } }";
    for (id, field) in [
        ("created", "serviceVisitCreated"),
        ("deleted", "serviceVisitDeleted"),
    ] {
        let query = format!("subscription {{ {field}(carPk: 2) {selection} }}");
        client
            .send(json!({"id": id, "type": "subscribe", "payload": {"query": query}}))
            .await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    // A visit of another car is not this subscription's; car 2's is, with its car.
    let mut visits = Vec::new();
    for (car, garage) in [(1, "Elsewhere"), (2, "Skoda Service"), (2, "Tyres")] {
        let body = app
            .graphql(
                Some(&access),
                &format!(
                    "mutation {{ createServiceVisit(carPk: {car}, input: {{garage: \"{garage}\", \
                     mileage: 90000, visitedOn: \"2026-12-04\"}}) {{ id }} }}"
                ),
            )
            .await;
        let id = body["data"]["createServiceVisit"]["id"].clone();
        assert!(id.is_string(), "{body}");
        if car == 2 {
            visits.push(id);
        }
    }
    for id in &visits {
        let next = client.expect_json().await;
        assert_eq!(
            (&next["type"], &next["id"]),
            (&json!("next"), &json!("created")),
            "{next}"
        );
        let visit = &next["payload"]["data"]["serviceVisitCreated"];
        assert_eq!(&visit["id"], id, "{next}");
        assert_eq!(
            visit["car"],
            json!({"id": "2", "make": "Skoda", "owner": {"username": "admin"}}),
            "{next}"
        );
    }

    let body = app
        .graphql(Some(&access), "mutation { deleteCar(pk: 2) { id } }")
        .await;
    assert_eq!(body["data"]["deleteCar"]["id"], "2", "{body}");
    for id in &visits {
        let next = client.expect_json().await;
        assert_eq!(
            (&next["type"], &next["id"]),
            (&json!("next"), &json!("deleted")),
            "{next}"
        );
        assert_eq!(
            &next["payload"]["data"]["serviceVisitDeleted"]["id"], id,
            "{next}"
        );
    }
}
