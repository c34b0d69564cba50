//! Events routed by key: a subscription to one car is handed that car's events only, a burst of
//! events for other cars never makes it fall behind, and a resume replays its own car's events
//! only, without gap or duplicate.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{
    access, car, close_code_after_results, TestGateway, WsClient, CAR_CREATED, CAR_UPDATED,
};

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

/// A state subscription that really falls behind (a burst on its own car, which the hub reads
/// in batches far longer than FANOUT_BUFFER, 4 here) is not cut off: it gets results in order
/// and at last the car's newest state, each result saying how many older ones it stands for
/// (`extensions.skipped`), so that what was delivered and what was skipped add up to the burst.
#[actix_web::test]
async fn a_burst_on_a_state_subscriptions_own_key_is_conflated_to_the_newest() {
    let gateway = TestGateway::spawn(&["--fanout-buffer=4", "--outbound-queue=64"]).await;
    let mut state = subscribed(&gateway, 1, None).await;
    let mut other = subscribed(&gateway, 2, None).await;
    gateway.settle().await;
    gateway.burst_on(1, 5_000).await;
    gateway.publish(CAR_UPDATED, car(2, "fine")).await;
    let (_, make, _, _) = next_result(&mut other).await;
    assert_eq!(make, "fine");
    let mut accounted = 0u64;
    let mut last = -1i64;
    let mut any_skipped = false;
    while accounted < 5_000 {
        let message = state.expect_json().await;
        assert_eq!(message["type"], "next", "{message}");
        let payload = &message["payload"];
        let make = payload["data"]["carModelUpdated"]["make"].as_str().unwrap();
        let n: i64 = make.trim_start_matches('m').parse().unwrap();
        assert!(n > last, "results in order: m{n} after m{last}");
        let skipped = payload["extensions"]["skipped"].as_u64().unwrap_or(0);
        any_skipped |= skipped > 0;
        assert_eq!(
            n - last - 1,
            skipped as i64,
            "`skipped` counts exactly the results between m{last} and m{n}"
        );
        last = n;
        accounted += 1 + skipped;
    }
    assert_eq!(last, 4_999, "the newest state arrives");
    assert!(
        any_skipped,
        "a burst of 5,000 over a queue of 4 is conflated"
    );
    assert_nothing(&mut state, "the conflated subscriber").await;
    let (_, metrics) = gateway.get("/metrics").await;
    assert!(
        !metrics.contains("gateway_connections_closed_total{code=\"1013\"}"),
        "a state subscriber was closed as slow"
    );
    assert!(
        !metrics.contains("gateway_results_superseded_total 0"),
        "superseded results are counted"
    );
}

/// A subscription that cannot skip an event (every car created) and falls behind is cut off,
/// and its members are closed a share at a time, not all at once; another car's subscriber
/// is not. (The members read all the while, and their own queues are large: only the
/// execution's cut-off closes them.)
#[actix_web::test]
async fn a_burst_an_event_stream_cannot_keep_up_with_cuts_its_members_off_gradually() {
    let gateway = TestGateway::spawn(&["--fanout-buffer=4", "--outbound-queue=100000"]).await;
    let mut created = Vec::new();
    for user in 1..=40 {
        let mut client = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
        client.init(&access(user)).await;
        client
            .send(json!({"id": "c", "type": "subscribe", "payload": {"query": "subscription { carCreated { id make } }"}}))
            .await;
        created.push(client);
    }
    let mut other = subscribed(&gateway, 2, None).await;
    gateway.settle().await;
    gateway
        .publish_burst(
            CAR_CREATED,
            (0..5_000)
                .map(|n| car(1_000 + n, &format!("new {n}")))
                .collect(),
        )
        .await;
    gateway.publish(CAR_UPDATED, car(2, "fine")).await;
    let (_, make, _, _) = next_result(&mut other).await;
    assert_eq!(make, "fine");
    let closes = futures_util::future::join_all(created.iter_mut().map(|client| async move {
        let code = close_code_after_results(client).await;
        (code, std::time::Instant::now())
    }))
    .await;
    assert!(
        closes.iter().all(|(code, _)| *code == Some(1013)),
        "{:?}",
        closes.iter().map(|(code, _)| code).collect::<Vec<_>>()
    );
    let first = closes.iter().map(|(_, at)| *at).min().unwrap();
    let last = closes.iter().map(|(_, at)| *at).max().unwrap();
    assert!(
        last - first >= Duration::from_secs(2),
        "40 members closed within {:?}: all at once",
        last - first
    );
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

/// Events trimmed from the log before the hub read them (it fell behind by the retention):
/// the subscribers of the type are not handed what follows as if nothing were missing. They
/// are closed as slow consumers (1013), the gap is counted, and a resume from the cursor the
/// subscriber had says `recovered: false`.
#[actix_web::test]
async fn events_trimmed_before_the_hub_read_them_close_the_subscribers_who_resume_unrecovered() {
    let gateway = TestGateway::spawn(&[]).await;
    let mut state = subscribed(&gateway, 1, None).await;
    gateway.settle().await;
    gateway.publish(CAR_UPDATED, car(1, "before")).await;
    let (_, make, cursor, _) = next_result(&mut state).await;
    assert_eq!(make, "before");
    // 600 updates and a trim to the newest 520, at once: the hub's next read is a full page
    // (512) after an entry that is gone, as are the 80 updates after it.
    gateway.burst_trimmed(1, 600, 520).await;
    assert_eq!(close_code_after_results(&mut state).await, Some(1013));
    let (_, metrics) = gateway.get("/metrics").await;
    assert!(
        metrics.contains("gateway_log_gaps_total{type=\"car.updated\"} 1"),
        "{metrics}"
    );
    let mut resumed = subscribed(&gateway, 1, Some(&cursor)).await;
    gateway.settle().await;
    gateway.publish(CAR_UPDATED, car(1, "after")).await;
    let (_, make, _, recovered) = next_result(&mut resumed).await;
    assert_eq!(make, "after", "then live");
    assert_eq!(
        recovered,
        Some(false),
        "the events after the cursor are gone"
    );
}
