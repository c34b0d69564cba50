//! Events are never lost: a write commits even when Redis is down, and its event is published
//! once Redis is back; an event another process committed but did not publish is published by
//! this process's relay.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use domain::{Actor, Car, CarChanges};
use serde_json::json;
use store::outbox;
use test_support::PrivateRedis;

use crate::helpers::{Subscriber, TestApp};

#[actix_web::test]
async fn a_mutation_commits_while_redis_is_down_and_its_event_arrives_when_it_is_back() {
    let mut redis = PrivateRedis::start();
    let app = TestApp::spawn_with_redis(&redis.url(), &[]).await;
    let (_, access) = app.user("alice", false).await;
    let mut subscriber = app.subscribe().await;
    let id = app.create_car(&access, "Skoda").await;
    assert_eq!(subscriber.next().await.1["type"], "car.created");

    redis.stop();
    let response = app
        .graphql(
            Some(&access),
            &format!("mutation {{ updateCar(pk: {id}, input: {{make: \"Skoda Autogroup\"}}) {{ make }} }}"),
            json!({}),
        )
        .await;
    assert_eq!(
        response.body["errors"],
        serde_json::Value::Null,
        "{}",
        response.body
    );
    assert_eq!(
        response.body["data"]["updateCar"]["make"],
        "Skoda Autogroup"
    );
    // Committed: readers see it, and its event waits in the outbox.
    let response = app
        .graphql(
            Some(&access),
            &format!("{{ car(pk: {id}) {{ make }} }}"),
            json!({}),
        )
        .await;
    assert_eq!(response.body["data"]["car"]["make"], "Skoda Autogroup");
    // Two more writes during the outage.
    for make in ["Skoda (VAG)", "Skoda"] {
        let response = app
            .graphql(
                Some(&access),
                &format!(
                    "mutation {{ updateCar(pk: {id}, input: {{make: \"{make}\"}}) {{ make }} }}"
                ),
                json!({}),
            )
            .await;
        assert_eq!(response.body["data"]["updateCar"]["make"], make);
    }
    assert_eq!(outbox::pending_count(&app.pool).await.unwrap(), 3);

    // Hold the events back until this test's subscriber is connected to the restarted Redis, so
    // that the test does not depend on who is faster. (A relay attempt under way when the hold
    // is set cannot undo it: a relay releases only the lease it holds.)
    let hold = chrono::Utc::now() + chrono::Duration::hours(1);
    outbox::lease_all(&app.pool, Some(hold)).await.unwrap();

    redis.restart();
    let mut subscriber = Subscriber::connect(&redis.url(), &app.redis_prefix).await;
    assert_eq!(outbox::pending_count(&app.pool).await.unwrap(), 3);
    outbox::lease_all(&app.pool, None).await.unwrap();

    // All three arrive, in the order they were committed.
    for make in ["Skoda Autogroup", "Skoda (VAG)", "Skoda"] {
        let (channel, envelope) = subscriber.next().await;
        assert_eq!(channel, app.channel("car.updated"));
        assert_eq!(envelope["data"]["id"], id);
        assert_eq!(envelope["data"]["make"], make);
    }
    // Published events leave the outbox.
    while outbox::pending_count(&app.pool).await.unwrap() > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_web::test]
async fn the_relay_publishes_what_another_process_committed_but_could_not_publish() {
    let app = TestApp::spawn(&["--demo"]).await;
    let mut subscriber = app.subscribe().await;

    // Another writer whose Redis is unreachable: its write commits, its publish fails.
    let settings = crate::helpers::settings_from(&[
        "api-service".into(),
        format!("--database-url={}", app.db.url),
        format!(
            "--redis-url=redis://127.0.0.1:{}/0",
            test_support::free_port()
        ),
        format!("--redis-key-prefix={}", app.redis_prefix),
    ]);
    let metrics = service_kit::metrics::Metrics::new("other-writer");
    let other_writer = api_service::startup::store(
        &settings,
        store::pool(&settings.database),
        std::sync::Arc::new(events::RedisLog::new(
            service_kit::redis::pool(&settings.redis).unwrap(),
            settings.redis.redis_key_prefix.clone(),
        )),
        &metrics,
    );
    let car: Car = other_writer
        .update(
            Actor::System,
            1,
            CarChanges {
                make: Some("Skoda (VAG)".into()),
                ..CarChanges::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(car.make, "Skoda (VAG)");

    // This app's relay publishes it.
    let (channel, envelope) = subscriber.next().await;
    assert_eq!(channel, app.channel("car.updated"));
    assert_eq!(envelope["data"]["make"], "Skoda (VAG)");
    assert_eq!(envelope["v"], 1);
}

#[actix_web::test]
async fn an_event_whose_writer_died_before_publishing_is_published_when_its_lease_runs_out() {
    let app = TestApp::spawn(&["--demo"]).await;
    let mut subscriber = app.subscribe().await;

    // What a writer leaves behind when it is killed between commit and publish: the change and
    // its outbox row, committed together, leased to the dead writer for a second.
    let (car, pending) = store::records::update::<Car>(
        &app.pool,
        Actor::System,
        2,
        CarChanges {
            year: Some("2008".into()),
            ..CarChanges::default()
        },
        chrono::Duration::seconds(1),
        None,
    )
    .await
    .unwrap();
    assert_eq!(car.year, "2008");
    let [pending] = pending.as_slice() else {
        panic!("one event: {pending:?}");
    };

    let (channel, envelope) = subscriber.next().await;
    assert_eq!(channel, app.channel("car.updated"));
    assert_eq!(envelope["id"], pending.event_id);
    assert_eq!(envelope["data"]["year"], "2008");
}
