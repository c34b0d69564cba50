//! A type that belongs to another over HTTP, on PostgreSQL and Redis: a car's service visits are
//! written by whoever may change the car and read by whoever may read it; an update that sets
//! nothing answers the record unchanged; deleting a car publishes each visit's deletion and
//! the car's.

#![allow(clippy::unwrap_used)]

use serde_json::{json, Value};

use crate::helpers::{error_of, TestApp};

const VISIT: &str = "id garage mileage notes visitedOn car { id make private owner { username } }";

async fn create_car(app: &TestApp, token: &str, private: bool) -> i64 {
    let response = app
        .graphql(
            Some(token),
            "mutation($input: CarInput!) { createCar(input: $input) { id } }",
            json!({"input": {"make": "Skoda", "model": "Octavia", "private": private}}),
        )
        .await;
    response.body["data"]["createCar"]["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

async fn create_visit(app: &TestApp, token: &str, car: i64, garage: &str) -> Value {
    app.graphql(
        Some(token),
        &format!(
            "mutation($car: ID!, $input: ServiceVisitInput!) {{ \
             createServiceVisit(carPk: $car, input: $input) {{ {VISIT} }} }}"
        ),
        json!({"car": car, "input": {"garage": garage, "mileage": 42000, "visitedOn": "2026-12-04"}}),
    )
    .await
    .body
}

#[actix_web::test]
async fn a_cars_visits_follow_the_cars_rules() {
    let app = TestApp::spawn(&[]).await;
    let (_, alice) = app.user("alice", false).await;
    let (_, bob) = app.user("bob", false).await;
    let public = create_car(&app, &alice, false).await;
    let private = create_car(&app, &alice, true).await;

    // Another user may not add a visit to a car they may not change.
    let refused = create_visit(&app, &bob, public, "Intruder").await;
    assert_eq!(error_of(&refused).0, "FORBIDDEN", "{refused}");
    let refused = create_visit(&app, &bob, private, "Intruder").await;
    assert_eq!(
        error_of(&refused),
        ("NOT_FOUND".to_owned(), "car not found".to_owned())
    );
    let bad = app
        .graphql(
            Some(&alice),
            "mutation { createServiceVisit(carPk: 1, input: {garage: \"G\", mileage: 1, \
             visitedOn: \"2026-13-01\"}) { id } }",
            json!({}),
        )
        .await;
    assert_eq!(error_of(&bad.body).0, "BAD_USER_INPUT", "{:?}", bad.body);

    // The owner may; the visit resolves its car over HTTP.
    let created = create_visit(&app, &alice, public, "Alice's garage").await;
    let visit = &created["data"]["createServiceVisit"];
    assert_eq!(visit["car"]["id"], public.to_string(), "{created}");
    assert_eq!(visit["car"]["owner"]["username"], "alice");
    let id = visit["id"].as_str().unwrap().to_owned();
    create_visit(&app, &alice, private, "Private garage").await;

    // Nor change or delete one.
    let update = format!(
        "mutation {{ updateServiceVisit(pk: {id}, input: {{garage: \"Mine now\"}}) {{ garage }} }}"
    );
    let refused = app.graphql(Some(&bob), &update, json!({})).await;
    assert_eq!(error_of(&refused.body).0, "FORBIDDEN", "{:?}", refused.body);
    let delete = format!("mutation {{ deleteServiceVisit(pk: {id}) {{ id }} }}");
    let refused = app.graphql(Some(&bob), &delete, json!({})).await;
    assert_eq!(error_of(&refused.body).0, "FORBIDDEN", "{:?}", refused.body);

    // Reads: a public car's visits for everyone, a private car's for no one else.
    let list =
        |car: i64| format!("{{ serviceVisits(carPk: {car}) {{ totalCount nodes {{ garage }} }} }}");
    let seen = app.graphql(Some(&bob), &list(public), json!({})).await;
    assert_eq!(
        seen.body["data"]["serviceVisits"]["totalCount"], 1,
        "{:?}",
        seen.body
    );
    let hidden = app.graphql(Some(&bob), &list(private), json!({})).await;
    assert_eq!(
        hidden.body["data"]["serviceVisits"]["totalCount"], 0,
        "{:?}",
        hidden.body
    );
    let own = app.graphql(Some(&alice), &list(private), json!({})).await;
    assert_eq!(
        own.body["data"]["serviceVisits"]["nodes"][0]["garage"],
        "Private garage"
    );

    // An update that sets nothing answers the record unchanged (a visit and a car).
    let unchanged = app
        .graphql(
            Some(&alice),
            &format!("mutation {{ updateServiceVisit(pk: {id}, input: {{}}) {{ {VISIT} }} }}"),
            json!({}),
        )
        .await;
    assert_eq!(
        unchanged.body["data"]["updateServiceVisit"], *visit,
        "{:?}",
        unchanged.body
    );
    let unchanged = app
        .graphql(
            Some(&alice),
            &format!(
                "mutation {{ updateCar(pk: {public}, input: {{}}) {{ make model private }} }}"
            ),
            json!({}),
        )
        .await;
    assert_eq!(
        unchanged.body["data"]["updateCar"],
        json!({"make": "Skoda", "model": "Octavia", "private": false}),
        "{:?}",
        unchanged.body
    );
}

#[actix_web::test]
async fn deleting_a_car_publishes_each_visits_deletion_and_the_cars() {
    let app = TestApp::spawn(&[]).await;
    let (_, alice) = app.user("alice", false).await;
    let car = create_car(&app, &alice, false).await;
    let mut ids = Vec::new();
    for garage in ["First", "Second"] {
        let created = create_visit(&app, &alice, car, garage).await;
        ids.push(
            created["data"]["createServiceVisit"]["id"]
                .as_str()
                .unwrap()
                .parse::<i64>()
                .unwrap(),
        );
    }
    let mut subscriber = app.subscribe().await;
    for _ in 0..3 {
        subscriber.next().await; // the car's creation and its visits'
    }

    let deleted = app
        .graphql(
            Some(&alice),
            &format!("mutation {{ deleteCar(pk: {car}) {{ id }} }}"),
            json!({}),
        )
        .await;
    assert_eq!(
        deleted.body["data"]["deleteCar"]["id"],
        car.to_string(),
        "{:?}",
        deleted.body
    );
    // Each log keeps its order; across logs there is none to keep.
    let mut visits = Vec::new();
    let mut cars = Vec::new();
    for _ in 0..3 {
        let (channel, envelope) = subscriber.next().await;
        if channel == app.channel("service_visit.deleted") {
            assert_eq!(envelope["data"]["car"]["id"], car);
            visits.push(envelope["data"]["id"].as_i64().unwrap());
        } else {
            assert_eq!(channel, app.channel("car.deleted"));
            cars.push(envelope["data"]["id"].as_i64().unwrap());
        }
    }
    assert_eq!((visits, cars), (ids.clone(), vec![car]));
    let gone = app
        .graphql(
            Some(&alice),
            &format!("{{ serviceVisit(pk: {}) {{ id }} }}", ids[0]),
            json!({}),
        )
        .await;
    assert_eq!(
        gone.body["data"]["serviceVisit"],
        Value::Null,
        "{:?}",
        gone.body
    );
}
