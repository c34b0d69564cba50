//! `me`, `car(pk)` and `cars` (pagination and its bounds).

#![allow(clippy::unwrap_used)]

use serde_json::json;

use crate::helpers::{error_of, TestApp};

#[actix_web::test]
async fn me_is_the_signed_in_user() {
    let app = TestApp::spawn(&[]).await;
    let (id, access) = app.user("alice", true).await;
    let response = app
        .graphql(Some(&access), "{ me { id username isStaff } }", json!({}))
        .await;
    assert_eq!(
        response.body,
        json!({"data": {"me": {"id": id.to_string(), "username": "alice", "isStaff": true}}})
    );
}

#[actix_web::test]
async fn demo_cars_are_readable_by_any_user_with_pk_as_int_or_string() {
    let app = TestApp::spawn(&["--demo"]).await;
    let (_, access) = app.user("reader", false).await;
    for query in [
        "{ car(pk: 1) { id make model variant year owner { username } } }",
        r#"{ car(pk: "1") { id make model variant year owner { username } } }"#,
    ] {
        let response = app.graphql(Some(&access), query, json!({})).await;
        assert_eq!(
            response.body,
            json!({"data": {"car": {"id": "1", "make": "Skoda", "model": "Octavia",
                "variant": "Scout", "year": "2011", "owner": null}}})
        );
    }
    let response = app
        .graphql(
            Some(&access),
            "{ car(pk: 2) { variant year owner { username isStaff } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        response.body["data"]["car"],
        json!({"variant": "Tour", "year": "2007", "owner": {"username": "admin", "isStaff": true}})
    );
    let response = app
        .graphql(Some(&access), "{ car(pk: 999) { id } }", json!({}))
        .await;
    assert_eq!(response.body, json!({"data": {"car": null}}));
}

#[actix_web::test]
async fn cars_are_paginated_with_a_bounded_page_size() {
    let app = TestApp::spawn(&[]).await;
    let (_, access) = app.user("alice", false).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(app.create_car(&access, &format!("Make {n}")).await);
    }
    let page = "query($after: ID) { cars(first: 2, after: $after) { totalCount nodes { id make } pageInfo { hasNextPage endCursor } } }";
    let mut after = serde_json::Value::Null;
    let mut seen = Vec::new();
    loop {
        let response = app
            .graphql(Some(&access), page, json!({"after": after}))
            .await;
        let cars = &response.body["data"]["cars"];
        assert_eq!(cars["totalCount"], 5, "{}", response.body);
        for node in cars["nodes"].as_array().unwrap() {
            seen.push(node["id"].as_str().unwrap().parse::<i64>().unwrap());
        }
        if cars["pageInfo"]["hasNextPage"] != true {
            break;
        }
        after = cars["pageInfo"]["endCursor"].clone();
    }
    assert_eq!(seen, ids);

    for first in [0, 101] {
        let response = app
            .graphql(
                Some(&access),
                "query($first: Int!) { cars(first: $first) { totalCount } }",
                json!({"first": first}),
            )
            .await;
        let (code, message) = error_of(&response.body);
        assert_eq!(code, "BAD_USER_INPUT");
        assert!(message.contains("between 1 and 100"), "{message}");
    }
}
