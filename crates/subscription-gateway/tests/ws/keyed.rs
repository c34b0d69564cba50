//! Events routed by key: a subscription to one car is handed that car's events only, a burst of
//! events for other cars never makes it fall behind, and a resume replays its own car's events
//! only, without gap or duplicate.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{access, car, close_code_after_results, TestGateway, WsClient, CAR_UPDATED};

fn model_updated(pk: i64) -> String {
    format!("subscription {{ carModelUpdated(pk: {pk}) {{ id make }} }}")
}

/// A graphql-transport-ws client subscribed to car `pk`'s updates (from `cursor`, if given).
async fn subscribed(gateway: &TestGateway, pk: i64, cursor: Option<&str>) -> WsClient {
    let mut client = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    client.init(&access(1)).await;
    let mut payload = json!({"query": model_updated(pk)});
    if let Some(cursor) = cursor {
        payload["extensions"] = json!({"resumeFrom": cursor});
    }
    client
        .send(json!({"id": "s", "type": "subscribe", "payload": payload}))
        .await;
    client
}

/// The next result: (car id, make, cursor, recovered).
async fn next_result(client: &mut WsClient) -> (String, String, String, Option<bool>) {
    let message = client.expect_json().await;
    assert_eq!(message["type"], "next", "{message}");
    let payload = &message["payload"];
    let car = &payload["data"]["carModelUpdated"];
    (
        car["id"].as_str().unwrap().to_owned(),
        car["make"].as_str().unwrap().to_owned(),
        payload["extensions"]["cursor"].as_str().unwrap().to_owned(),
        payload["extensions"]["recovered"].as_bool(),
    )
}

/// Nothing within a short wait (the events it must not get were published before).
async fn assert_nothing(client: &mut WsClient, who: &str) {
    if let Some(message) = client.answer_within(Duration::from_millis(300)).await {
        panic!("{who} received {message:?}");
    }
}

#[actix_web::test]
async fn a_keyed_subscriber_gets_its_own_cars_events_in_order_and_no_others() {
    let gateway = TestGateway::spawn(&[]).await;
    let mut one = subscribed(&gateway, 1, None).await;
    let mut two = subscribed(&gateway, 2, None).await;
    gateway.settle().await;
    for (pk, make) in [
        (1, "a"),
        (2, "x"),
        (3, "nobody"),
        (1, "b"),
        (2, "y"),
        (1, "c"),
    ] {
        gateway.publish(CAR_UPDATED, car(pk, make)).await;
    }
    for make in ["a", "b", "c"] {
        let (id, got, _, _) = next_result(&mut one).await;
        assert_eq!((id.as_str(), got.as_str()), ("1", make));
    }
    for make in ["x", "y"] {
        let (id, got, _, _) = next_result(&mut two).await;
        assert_eq!((id.as_str(), got.as_str()), ("2", make));
    }
    assert_nothing(&mut one, "car 1's subscriber").await;
    assert_nothing(&mut two, "car 2's subscriber").await;
}

/// FANOUT_BUFFER is 16 here; 2,000 events for 2,000 other cars arrive as fast as Redis takes
/// them. Before routing by key, every execution of the type received (and filtered) each one,
/// fell 16 behind, and closed its members as slow.
#[actix_web::test]
async fn a_burst_over_other_keys_far_longer_than_the_buffer_closes_no_subscriber() {
    let gateway = TestGateway::spawn(&["--fanout-buffer=16"]).await;
    let mut subscribers = Vec::new();
    for pk in 1..=20 {
        subscribers.push(subscribed(&gateway, pk, None).await);
    }
    gateway.settle().await;
    gateway
        .publish_burst(
            CAR_UPDATED,
            (0..2_000)
                .map(|n| car(1_000 + n, &format!("burst {n}")))
                .collect(),
        )
        .await;
    for pk in 1..=20 {
        gateway
            .publish(CAR_UPDATED, car(pk, &format!("own {pk}")))
            .await;
    }
    for (index, subscriber) in subscribers.iter_mut().enumerate() {
        let pk = index + 1;
        let (id, make, _, _) = next_result(subscriber).await;
        assert_eq!(id, pk.to_string());
        assert_eq!(make, format!("own {pk}"));
    }
    let (_, metrics) = gateway.get("/metrics").await;
    let slow = metrics
        .lines()
        .find(|line| line.starts_with("gateway_slow_consumers_total"))
        .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok());
    assert_eq!(slow, Some(0.0), "{metrics}");
    assert!(
        !metrics.contains("gateway_connections_closed_total{code=\"1013\"}"),
        "a subscriber was closed as slow"
    );
}

/// An execution that really falls behind is still cut off: a burst on its own car, which the hub
/// reads in batches far longer than FANOUT_BUFFER (4 here); another car's subscriber is not.
#[actix_web::test]
async fn a_burst_on_a_subscribers_own_key_longer_than_the_buffer_still_cuts_it_off() {
    let gateway = TestGateway::spawn(&["--fanout-buffer=4", "--outbound-queue=4"]).await;
    let mut stuck = subscribed(&gateway, 1, None).await;
    let mut other = subscribed(&gateway, 2, None).await;
    gateway.settle().await;
    gateway.burst_on(1, 5_000).await;
    gateway.publish(CAR_UPDATED, car(2, "fine")).await;
    let (_, make, _, _) = next_result(&mut other).await;
    assert_eq!(make, "fine");
    let closed = close_code_after_results(&mut stuck).await;
    assert_eq!(closed, Some(1013));
}

#[actix_web::test]
async fn a_resumed_keyed_subscription_replays_its_own_cars_events_only() {
    let gateway = TestGateway::spawn(&[]).await;
    let mut first = subscribed(&gateway, 1, None).await;
    gateway.settle().await;
    gateway.publish(CAR_UPDATED, car(1, "seen")).await;
    let (_, _, cursor, _) = next_result(&mut first).await;
    drop(first);

    // While it is away: its car's events among another car's.
    for (pk, make) in [
        (2, "x1"),
        (1, "missed 1"),
        (2, "x2"),
        (1, "missed 2"),
        (2, "x3"),
    ] {
        gateway.publish(CAR_UPDATED, car(pk, make)).await;
    }
    let mut resumed = subscribed(&gateway, 1, Some(&cursor)).await;
    let (id, make, _, recovered) = next_result(&mut resumed).await;
    assert_eq!(
        (id.as_str(), make.as_str(), recovered),
        ("1", "missed 1", Some(true))
    );
    let (id, make, _, recovered) = next_result(&mut resumed).await;
    assert_eq!(
        (id.as_str(), make.as_str(), recovered),
        ("1", "missed 2", None)
    );
    gateway.settle().await;
    gateway.publish(CAR_UPDATED, car(2, "x4")).await;
    gateway.publish(CAR_UPDATED, car(1, "live")).await;
    let (id, make, _, _) = next_result(&mut resumed).await;
    assert_eq!((id.as_str(), make.as_str()), ("1", "live"));
    assert_nothing(&mut resumed, "the resumed subscriber").await;
}
