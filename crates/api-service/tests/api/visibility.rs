//! Private cars over HTTP: `car`, `cars` and its `totalCount`, and the writes that return a car,
//! for the owner, another user and staff; staff rights come from the database, not the token.

#![allow(clippy::unwrap_used)]

use serde_json::{json, Value};

use crate::helpers::{error_of, TestApp};

async fn create(app: &TestApp, token: &str, make: &str, private: bool) -> i64 {
    let response = app
        .graphql(
            Some(token),
            "mutation($input: CarInput!) { createCar(input: $input) { id private owner { username } } }",
            json!({"input": {"make": make, "model": "Octavia", "private": private}}),
        )
        .await;
    let car = &response.body["data"]["createCar"];
    assert_eq!(car["private"], private, "{:?}", response.body);
    car["id"].as_str().unwrap().parse().unwrap()
}

/// The ids of `cars` (all pages of 2) and the total, as `token` sees them.
async fn listed(app: &TestApp, token: &str) -> (Vec<i64>, i64) {
    let mut ids = Vec::new();
    let mut after = Value::Null;
    loop {
        let response = app
            .graphql(
                Some(token),
                "query($after: ID) { cars(first: 2, after: $after) { totalCount nodes { id } \
                 pageInfo { hasNextPage endCursor } } }",
                json!({"after": after}),
            )
            .await;
        let page = &response.body["data"]["cars"];
        ids.extend(
            page["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|node| node["id"].as_str().unwrap().parse::<i64>().unwrap()),
        );
        if page["pageInfo"]["hasNextPage"] != true {
            return (ids, page["totalCount"].as_i64().unwrap());
        }
        after = page["pageInfo"]["endCursor"].clone();
    }
}

async fn car(app: &TestApp, token: &str, id: i64) -> Value {
    let response = app
        .graphql(
            Some(token),
            &format!("{{ car(pk: {id}) {{ id make private }} }}"),
            json!({}),
        )
        .await;
    assert_eq!(response.body["errors"], Value::Null, "{:?}", response.body);
    response.body["data"]["car"].clone()
}

#[actix_web::test]
async fn a_private_car_is_its_owners_and_staffs_only() {
    let app = TestApp::spawn(&[]).await;
    let (_, alice) = app.user("alice", false).await;
    let (_, bob) = app.user("bob", false).await;
    let (_, root) = app.user("root", true).await;
    let public = create(&app, &alice, "Public", false).await;
    let private = create(&app, &alice, "Private", true).await;
    let bobs = create(&app, &bob, "Bob's", true).await;

    let (all, total) = listed(&app, &root).await;
    assert_eq!(all, [public, private, bobs]);
    assert_eq!(total, 3);
    assert_eq!(listed(&app, &alice).await, (vec![public, private], 2));
    assert_eq!(listed(&app, &bob).await, (vec![public, bobs], 2));

    assert_eq!(car(&app, &alice, private).await["make"], "Private");
    assert_eq!(car(&app, &root, private).await["make"], "Private");
    assert_eq!(car(&app, &bob, private).await, Value::Null);
    assert_eq!(car(&app, &bob, public).await["make"], "Public");

    // Changing another's car: forbidden when it is visible, not found when it is private, so
    // that the answer does not tell bob it exists.
    for (id, code) in [
        (public, "FORBIDDEN"),
        (private, "NOT_FOUND"),
        (i64::from(i32::MAX), "NOT_FOUND"),
    ] {
        for mutation in [
            format!("mutation {{ updateCar(pk: {id}, input: {{make: \"Tatra\"}}) {{ id }} }}"),
            format!("mutation {{ deleteCar(pk: {id}) {{ id }} }}"),
        ] {
            let response = app.graphql(Some(&bob), &mutation, json!({})).await;
            assert_eq!(
                error_of(&response.body).0,
                code,
                "{mutation}: {:?}",
                response.body
            );
        }
    }
    assert_eq!(car(&app, &alice, private).await["make"], "Private");

    // Made public by its owner: everyone sees it; made private again: bob no longer does.
    let response = app
        .graphql(
            Some(&alice),
            &format!("mutation {{ updateCar(pk: {private}, input: {{private: false}}) {{ private make }} }}"),
            json!({}),
        )
        .await;
    assert_eq!(
        response.body["data"]["updateCar"],
        json!({"private": false, "make": "Private"})
    );
    assert_eq!(car(&app, &bob, private).await["private"], false);
    assert_eq!(listed(&app, &bob).await.1, 3);
    let response = app
        .graphql(
            Some(&root),
            &format!(
                "mutation {{ updateCar(pk: {private}, input: {{private: true}}) {{ private }} }}"
            ),
            json!({}),
        )
        .await;
    assert_eq!(
        response.body["data"]["updateCar"]["private"], true,
        "staff may change it"
    );
    assert_eq!(car(&app, &bob, private).await, Value::Null);
}

#[actix_web::test]
async fn staff_rights_are_the_databases_not_the_tokens() {
    let app = TestApp::spawn(&[]).await;
    let (_, alice) = app.user("alice", false).await;
    let (bob_id, _) = app.user("bob", false).await;
    let private = create(&app, &alice, "Private", true).await;
    // A token that says staff, for a user the database does not: the API reads the database.
    let claims_staff = test_support::tokens::sign_as(
        &test_support::tokens::hs256_keys(crate::helpers::SECRET),
        bob_id,
        "bob",
        true,
        tokens::jwt::TokenType::Access,
        300,
    );
    assert_eq!(car(&app, &claims_staff, private).await, Value::Null);
    assert_eq!(listed(&app, &claims_staff).await.1, 0);
}
