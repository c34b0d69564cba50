//! createCar, updateCar, deleteCar: results, owner/staff rules, input checks, and the envelope a
//! Redis subscriber sees for each.

#![allow(clippy::unwrap_used)]

use serde_json::{json, Value};

use crate::helpers::{error_of, TestApp};

const CAR_FIELDS: &str = "id make model variant year owner { username }";

#[actix_web::test]
async fn each_mutation_publishes_its_envelope() {
    let app = TestApp::spawn(&[]).await;
    let (owner_id, access) = app.user("alice", false).await;
    let mut subscriber = app.subscribe().await;

    let response = app
        .graphql(
            Some(&access),
            &format!("mutation($input: CarInput!) {{ createCar(input: $input) {{ {CAR_FIELDS} }} }}"),
            json!({"input": {"make": "Skoda", "model": "Fabia", "variant": "Combi", "year": "2020"}}),
        )
        .await;
    let created = &response.body["data"]["createCar"];
    assert_eq!(
        created,
        &json!({"id": created["id"], "make": "Skoda", "model": "Fabia", "variant": "Combi",
            "year": "2020", "owner": {"username": "alice"}})
    );
    let id: i64 = created["id"].as_str().unwrap().parse().unwrap();
    let (channel, envelope) = subscriber.next().await;
    assert_eq!(channel, app.channel("car.created"));
    assert_envelope(&envelope, "car.created");
    assert_eq!(
        envelope["data"],
        json!({"id": id, "make": "Skoda", "model": "Fabia", "variant": "Combi", "year": "2020",
            "private": false, "owner": {"id": owner_id, "username": "alice", "is_staff": false}})
    );
    let created_event_id = envelope["id"].clone();

    let response = app
        .graphql(
            Some(&access),
            &format!("mutation {{ updateCar(pk: {id}, input: {{make: \"Skoda (VAG)\"}}) {{ {CAR_FIELDS} }} }}"),
            json!({}),
        )
        .await;
    assert_eq!(response.body["data"]["updateCar"]["make"], "Skoda (VAG)");
    assert_eq!(response.body["data"]["updateCar"]["model"], "Fabia");
    let (channel, envelope) = subscriber.next().await;
    assert_eq!(channel, app.channel("car.updated"));
    assert_envelope(&envelope, "car.updated");
    assert_eq!(envelope["data"]["make"], "Skoda (VAG)");
    assert_ne!(envelope["id"], created_event_id);

    let response = app
        .graphql(
            Some(&access),
            &format!("mutation {{ deleteCar(pk: \"{id}\") {{ {CAR_FIELDS} }} }}"),
            json!({}),
        )
        .await;
    assert_eq!(response.body["data"]["deleteCar"]["make"], "Skoda (VAG)");
    let (channel, envelope) = subscriber.next().await;
    assert_eq!(channel, app.channel("car.deleted"));
    assert_envelope(&envelope, "car.deleted");
    assert_eq!(envelope["data"]["id"], id);

    let response = app
        .graphql(
            Some(&access),
            &format!("{{ car(pk: {id}) {{ id }} }}"),
            json!({}),
        )
        .await;
    assert_eq!(response.body["data"]["car"], Value::Null);
    assert_eq!(store::outbox::pending_count(&app.pool).await.unwrap(), 0);
}

fn assert_envelope(envelope: &Value, event_type: &str) {
    assert_eq!(envelope["v"], 1);
    assert_eq!(envelope["type"], event_type);
    assert_eq!(envelope["id"].as_str().unwrap().len(), 32);
    let at = envelope["at"].as_str().unwrap();
    assert!(chrono::DateTime::parse_from_rfc3339(at).is_ok(), "{at}");
}

#[actix_web::test]
async fn only_the_owner_or_staff_may_change_a_car() {
    let app = TestApp::spawn(&["--demo"]).await;
    let (_, owner) = app.user("owner", false).await;
    let (_, other) = app.user("other", false).await;
    let (_, staff) = app.user("staff", true).await;
    let id = app.create_car(&owner, "Skoda").await;

    // Anyone signed in may read it.
    let response = app
        .graphql(
            Some(&other),
            &format!("{{ car(pk: {id}) {{ make }} }}"),
            json!({}),
        )
        .await;
    assert_eq!(response.body["data"]["car"]["make"], "Skoda");

    let update =
        format!("mutation {{ updateCar(pk: {id}, input: {{year: \"1999\"}}) {{ year }} }}");
    let delete = format!("mutation {{ deleteCar(pk: {id}) {{ id }} }}");
    for query in [&update, &delete] {
        let response = app.graphql(Some(&other), query, json!({})).await;
        let (code, message) = error_of(&response.body);
        assert_eq!(code, "FORBIDDEN", "{}", response.body);
        assert_eq!(
            message,
            "only the owner or a staff user may change this car"
        );
    }
    let response = app.graphql(Some(&owner), &update, json!({})).await;
    assert_eq!(response.body["data"]["updateCar"]["year"], "1999");
    let response = app
        .graphql(
            Some(&staff),
            &format!("mutation {{ updateCar(pk: {id}, input: {{year: \"2001\"}}) {{ year }} }}"),
            json!({}),
        )
        .await;
    assert_eq!(response.body["data"]["updateCar"]["year"], "2001");

    // The demo's Car 1 has no owner: only staff may change it.
    let response = app
        .graphql(
            Some(&owner),
            r#"mutation { updateCar(pk: 1, input: {make: "x"}) { id } }"#,
            json!({}),
        )
        .await;
    assert_eq!(error_of(&response.body).0, "FORBIDDEN");
    let response = app
        .graphql(
            Some(&staff),
            "mutation { deleteCar(pk: 1) { id } }",
            json!({}),
        )
        .await;
    assert_eq!(response.body["data"]["deleteCar"]["id"], "1");

    let response = app.graphql(Some(&staff), &delete, json!({})).await;
    assert_eq!(response.body["data"]["deleteCar"]["id"], id.to_string());
    let response = app.graphql(Some(&staff), &delete, json!({})).await;
    assert_eq!(error_of(&response.body).0, "NOT_FOUND");
    // A refused write publishes nothing and leaves nothing in the outbox.
    assert_eq!(store::outbox::pending_count(&app.pool).await.unwrap(), 0);
}

#[actix_web::test]
async fn car_input_is_checked() {
    let app = TestApp::spawn(&[]).await;
    let (_, access) = app.user("alice", false).await;
    let long = "x".repeat(101);
    for (input, expected) in [
        (
            json!({"make": " ", "model": "Octavia"}),
            "`make` may not be blank",
        ),
        (
            json!({"make": "Skoda", "model": long}),
            "`model` must be at most 100 characters",
        ),
    ] {
        let response = app
            .graphql(
                Some(&access),
                "mutation($input: CarInput!) { createCar(input: $input) { id } }",
                json!({"input": input}),
            )
            .await;
        let (code, message) = error_of(&response.body);
        assert_eq!(code, "BAD_USER_INPUT");
        assert_eq!(message, expected);
    }
    let response = app
        .graphql(
            Some(&access),
            r#"mutation { updateCar(pk: "abc", input: {make: "x"}) { id } }"#,
            json!({}),
        )
        .await;
    assert_eq!(error_of(&response.body).0, "BAD_USER_INPUT");
}

#[actix_web::test]
async fn trigger_event_sets_a_random_make_through_the_same_path() {
    let app = TestApp::spawn(&["--demo"]).await;
    let mut subscriber = app.subscribe().await;
    let settings = crate::helpers::settings_from(&[
        "api-service".into(),
        format!("--database-url={}", app.db.url),
        format!("--redis-url={}", app.redis_url),
        format!("--redis-key-prefix={}", app.redis_prefix),
    ]);
    let metrics = service_kit::metrics::Metrics::new("trigger-event");
    let store = api_service::startup::store(
        &settings,
        store::pool(&settings.database),
        std::sync::Arc::new(events::RedisLog::new(
            service_kit::redis::pool(&settings.redis).unwrap(),
            settings.redis.redis_key_prefix.clone(),
        )),
        &metrics,
    );
    let (before, after) = api_service::trigger::trigger_event(&store, 1)
        .await
        .unwrap();
    assert_eq!(before.id, 1);
    assert!(api_service::trigger::MAKES.contains(&after.make.as_str()));
    let (channel, envelope) = subscriber.next().await;
    assert_eq!(channel, app.channel("car.updated"));
    assert_eq!(envelope["data"]["id"], 1);
    assert_eq!(envelope["data"]["make"], after.make);
    assert_eq!(envelope["data"]["model"], "Octavia");

    let missing = api_service::trigger::trigger_event(&store, 999).await;
    assert_eq!(missing.unwrap_err(), "car 999 does not exist");
}
