//! Events reach the right subscribers, once, in both protocols; Redis restarts are survived.

use crate::helpers::{CAR_CREATED, CAR_DELETED, CAR_UPDATED};
use std::time::Duration;

use events::Envelope;
use serde_json::json;

use crate::helpers::{access, car, Incoming, TestGateway, WsClient, MODEL_UPDATED};

/// The message with its result's `extensions` taken out, after checking that they name the
/// event's position: `<epoch>:car.updated:<ms>-<seq>`, which a client sends back to resume.
fn without_cursor(mut message: serde_json::Value) -> serde_json::Value {
    let extensions = message["payload"]
        .as_object_mut()
        .and_then(|payload| payload.remove("extensions"))
        .unwrap_or_else(|| panic!("no extensions in {message}"));
    let cursor = extensions["cursor"].as_str().unwrap_or_default();
    let parsed = events::Cursor::parse(cursor, &domain::registry().unwrap())
        .unwrap_or_else(|err| panic!("cursor {cursor:?}: {err}"));
    assert_eq!(parsed.event_type, CAR_UPDATED);
    assert!(parsed.position() > events::Position::ZERO, "{cursor}");
    message
}

#[actix_web::test]
async fn graphql_transport_ws_receives_updates_of_its_car_only() {
    let gateway = TestGateway::spawn(&[]).await;
    let mut client = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    client.init(&access(1)).await;
    client
        .send(json!({"id": "a", "type": "subscribe", "payload": {"query": MODEL_UPDATED}}))
        .await;
    gateway.settle().await;

    gateway.publish(CAR_UPDATED, car(2, "Other car")).await;
    gateway.publish(CAR_UPDATED, car(1, "Skoda (VAG)")).await;
    let next = without_cursor(client.expect_json().await);
    assert_eq!(
        next,
        json!({"id": "a", "type": "next", "payload": {"data": {"carModelUpdated": {"id": "1", "make": "Skoda (VAG)", "model": "Octavia"}}}})
    );

    // `complete` stops it: a later event is not delivered, the connection stays usable.
    client.send(json!({"id": "a", "type": "complete"})).await;
    gateway.settle().await;
    gateway.publish(CAR_UPDATED, car(1, "Skoda")).await;
    client.send(json!({"type": "ping"})).await;
    assert_eq!(client.expect_json().await["type"], "pong");
}

#[actix_web::test]
async fn legacy_graphql_ws_receives_data_and_keepalives() {
    let gateway = TestGateway::spawn(&[]).await;
    let mut client = WsClient::connect(&gateway.url(), "graphql-ws").await;
    client
        .send(json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {}", access(1))}}))
        .await;
    assert_eq!(client.expect_json().await["type"], "connection_ack");
    // subscriptions-transport-ws expects a first `ka` right after the ack.
    match client.recv().await {
        Incoming::Json(ka) => assert_eq!(ka["type"], "ka"),
        other => panic!("{other:?}"),
    }
    client
        .send(json!({"id": "1", "type": "start", "payload": {"query": "subscription { carModelUpdated(pk: \"1\") { make } }"}}))
        .await;
    gateway.settle().await;
    gateway
        .publish(CAR_UPDATED, car(1, "Skoda Autogroup"))
        .await;
    assert_eq!(
        without_cursor(client.expect_json().await),
        json!({"id": "1", "type": "data", "payload": {"data": {"carModelUpdated": {"make": "Skoda Autogroup"}}}})
    );
    client.send(json!({"id": "1", "type": "stop"})).await;
    assert_eq!(
        client.expect_json().await,
        json!({"id": "1", "type": "complete"})
    );
}

#[actix_web::test]
async fn created_and_deleted_events_reach_their_subscriptions() {
    let gateway = TestGateway::spawn(&[]).await;
    let mut client = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    client.init(&access(1)).await;
    client
        .send(json!({"id": "c", "type": "subscribe", "payload": {"query": "subscription { carCreated { id make } }"}}))
        .await;
    client
        .send(json!({"id": "d", "type": "subscribe", "payload": {"query": "subscription { carDeleted { id } }"}}))
        .await;
    gateway.settle().await;
    gateway.publish(CAR_CREATED, car(7, "New")).await;
    let created = client.expect_json().await;
    assert_eq!(created["id"], "c");
    assert_eq!(
        created["payload"]["data"]["carCreated"],
        json!({"id": "7", "make": "New"})
    );
    gateway.publish(CAR_DELETED, car(7, "New")).await;
    let deleted = client.expect_json().await;
    assert_eq!(deleted["id"], "d");
    assert_eq!(deleted["payload"]["data"]["carDeleted"], json!({"id": "7"}));
}

#[actix_web::test]
async fn a_republished_event_is_delivered_once() {
    let gateway = TestGateway::spawn(&[]).await;
    let mut client = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    client.init(&access(1)).await;
    client
        .send(json!({"id": "a", "type": "subscribe", "payload": {"query": MODEL_UPDATED}}))
        .await;
    gateway.settle().await;
    let first = Envelope::new(CAR_UPDATED, car(1, "Once"));
    gateway.publish_envelope(&first).await;
    gateway.publish_envelope(&first).await; // the outbox relay may publish twice
    gateway.publish(CAR_UPDATED, car(1, "Twice")).await;
    assert_eq!(
        client.expect_json().await["payload"]["data"]["carModelUpdated"]["make"],
        "Once"
    );
    assert_eq!(
        client.expect_json().await["payload"]["data"]["carModelUpdated"]["make"],
        "Twice"
    );
}

#[actix_web::test]
async fn malformed_messages_on_the_channel_are_skipped() {
    let gateway = TestGateway::spawn(&[]).await;
    let mut client = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    client.init(&access(1)).await;
    client
        .send(json!({"id": "a", "type": "subscribe", "payload": {"query": MODEL_UPDATED}}))
        .await;
    gateway.settle().await;
    gateway.publish_raw("events:car.updated", "not json").await;
    gateway
        .publish_raw(
            "events:car.updated",
            r#"{"v":1,"id":"x","type":"car.deleted"}"#,
        )
        .await;
    gateway.publish(CAR_UPDATED, car(1, "Fine")).await;
    assert_eq!(
        client.expect_json().await["payload"]["data"]["carModelUpdated"]["make"],
        "Fine"
    );
    let (_, metrics) = gateway.get("/metrics").await;
    assert!(
        metrics.contains("gateway_events_malformed_total 2"),
        "{metrics}"
    );
}

#[actix_web::test]
async fn subscribers_survive_a_redis_restart() {
    let mut redis = test_support::PrivateRedis::start();
    let gateway = TestGateway::spawn_on(&redis.url(), &[]).await;
    let mut client = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    client.init(&access(1)).await;
    client
        .send(json!({"id": "a", "type": "subscribe", "payload": {"query": MODEL_UPDATED}}))
        .await;
    gateway.settle().await;
    gateway.publish(CAR_UPDATED, car(1, "Before")).await;
    assert_eq!(
        client.expect_json().await["payload"]["data"]["carModelUpdated"]["make"],
        "Before"
    );

    redis.stop();
    let mut noticed = false;
    for _ in 0..200 {
        if gateway.get("/readyz").await.0 == 503 {
            noticed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(noticed, "readyz kept saying ready with Redis gone");

    redis.restart();
    gateway.wait_ready().await;
    gateway.publish(CAR_UPDATED, car(1, "After")).await;
    assert_eq!(
        client.expect_json().await["payload"]["data"]["carModelUpdated"]["make"],
        "After",
        "the socket stayed open and the subscription was renewed"
    );
}

#[actix_web::test]
async fn subscribers_of_one_operation_share_one_execution() {
    let gateway = TestGateway::spawn(&[]).await;
    let mut clients = Vec::new();
    for (user, protocol, kind) in [
        (1, "graphql-transport-ws", "subscribe"),
        (2, "graphql-transport-ws", "subscribe"),
        (3, "graphql-ws", "start"),
    ] {
        let mut client = WsClient::connect(&gateway.url(), protocol).await;
        if protocol == "graphql-ws" {
            client
                .send(json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {}", access(user))}}))
                .await;
            assert_eq!(client.expect_json().await["type"], "connection_ack");
        } else {
            client.init(&access(user)).await;
        }
        client
            .send(json!({"id": format!("s{user}"), "type": kind, "payload": {"query": MODEL_UPDATED}}))
            .await;
        clients.push(client);
    }
    let mut other = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    other.init(&access(4)).await;
    other
        .send(json!({"id": "o", "type": "subscribe", "payload": {"query": "subscription { carModelUpdated(pk: 2) { make } }"}}))
        .await;
    gateway.settle().await;
    let (_, metrics) = gateway.get("/metrics").await;
    assert!(metrics.contains("gateway_executions_active 2"), "{metrics}");

    gateway.publish(CAR_UPDATED, car(1, "Shared")).await;
    for (n, client) in clients.iter_mut().enumerate() {
        let message = client.expect_json().await;
        assert_eq!(
            message["id"],
            format!("s{}", n + 1),
            "each subscriber gets its own id"
        );
        assert_eq!(
            message["payload"]["data"]["carModelUpdated"]["make"],
            "Shared"
        );
    }

    // Stopping every subscriber of an operation ends its execution.
    for (n, client) in clients.iter_mut().enumerate() {
        let kind = if n == 2 { "stop" } else { "complete" };
        client
            .send(json!({"id": format!("s{}", n + 1), "type": kind}))
            .await;
    }
    gateway.settle().await;
    let (_, metrics) = gateway.get("/metrics").await;
    assert!(metrics.contains("gateway_executions_active 1"), "{metrics}");
}
