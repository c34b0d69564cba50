//! Private cars on the socket: members of one shared execution each receive only the results
//! whose record they may read (owner, staff, or anyone when public), live and replayed, and a
//! car made private or public while subscribed behaves as documented: those who may no longer
//! read it get nothing more of it, with no notice; once public it reaches everyone again.

use std::time::Duration;

use domain::{Car, Owner};
use serde_json::{json, Value};
use tokens::jwt::TokenType;

use crate::helpers::{access, car, TestGateway, WsClient, CAR_CREATED, CAR_UPDATED, SECRET};

const OWNER: i64 = 10;
const OTHER: i64 = 11;
const STAFF: i64 = 12;

fn staff_token(user_id: i64) -> String {
    test_support::tokens::sign_as(
        &test_support::tokens::hs256_keys(SECRET),
        user_id,
        "root",
        true,
        TokenType::Access,
        300,
    )
}

/// Car `pk` with `make`, owned by OWNER, private or not.
fn owned(pk: i64, make: &str, private: bool) -> Car {
    Car {
        private,
        owner: Some(Owner {
            id: OWNER,
            username: "owner".into(),
            is_staff: false,
        }),
        ..car(pk, make)
    }
}

async fn subscribed(
    gateway: &TestGateway,
    token: &str,
    query: &str,
    cursor: Option<&str>,
) -> WsClient {
    let mut client = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    client.init(token).await;
    let mut payload = json!({"query": query});
    if let Some(cursor) = cursor {
        payload["extensions"] = json!({"resumeFrom": cursor});
    }
    client
        .send(json!({"id": "1", "type": "subscribe", "payload": payload}))
        .await;
    client
}

/// The makes of the next `count` results, with the first result's `recovered`.
async fn makes(client: &mut WsClient, field: &str, count: usize) -> (Vec<String>, Option<bool>) {
    let mut makes = Vec::new();
    let mut recovered = None;
    for index in 0..count {
        let message = client.expect_json().await;
        assert_eq!(message["type"], "next", "{message}");
        if index == 0 {
            recovered = message["payload"]["extensions"]["recovered"].as_bool();
        }
        makes.push(
            message["payload"]["data"][field]["make"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    (makes, recovered)
}

async fn assert_nothing(client: &mut WsClient, who: &str) {
    if let Some(message) = client.answer_within(Duration::from_millis(300)).await {
        panic!("{who} received {message:?}");
    }
}

fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|line| line.starts_with(name))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

const UPDATED_5: &str = "subscription { carModelUpdated(pk: 5) { id make private } }";

#[actix_web::test]
async fn one_shared_execution_delivers_each_result_to_whoever_may_read_it() {
    let gateway = TestGateway::spawn(&[]).await;
    let mut owner = subscribed(&gateway, &access(OWNER), UPDATED_5, None).await;
    let mut other = subscribed(&gateway, &access(OTHER), UPDATED_5, None).await;
    let mut staff = subscribed(&gateway, &staff_token(STAFF), UPDATED_5, None).await;
    gateway.settle().await;
    // Public, then made private (those who may no longer read it get nothing, and no notice),
    // changed while private, then made public again (everyone from then on).
    for (make, private) in [("a", false), ("b", true), ("c", true), ("d", false)] {
        gateway.publish(CAR_UPDATED, owned(5, make, private)).await;
    }
    let every = vec!["a", "b", "c", "d"];
    assert_eq!(makes(&mut owner, "carModelUpdated", 4).await.0, every);
    assert_eq!(makes(&mut staff, "carModelUpdated", 4).await.0, every);
    assert_eq!(makes(&mut other, "carModelUpdated", 2).await.0, ["a", "d"]);
    assert_nothing(&mut other, "the other user").await;

    let (_, metrics) = gateway.get("/metrics").await;
    assert_eq!(
        metric(&metrics, "gateway_executions_active"),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "gateway_results_withheld_total"),
        2.0,
        "{metrics}"
    );
}

#[actix_web::test]
async fn a_stream_of_every_car_shows_others_only_their_public_ones() {
    let gateway = TestGateway::spawn(&[]).await;
    let query = "subscription { carCreated { id make private owner { id } } }";
    let mut other = subscribed(&gateway, &access(OTHER), query, None).await;
    let mut owner = subscribed(&gateway, &access(OWNER), query, None).await;
    gateway.settle().await;
    gateway.publish(CAR_CREATED, owned(7, "hidden", true)).await;
    let unowned_private = Car {
        private: true,
        ..car(8, "staff only")
    };
    gateway.publish(CAR_CREATED, unowned_private).await;
    gateway.publish(CAR_CREATED, owned(9, "shown", false)).await;
    assert_eq!(makes(&mut other, "carCreated", 1).await.0, ["shown"]);
    assert_eq!(
        makes(&mut owner, "carCreated", 2).await.0,
        ["hidden", "shown"]
    );
    assert_nothing(&mut other, "the other user").await;
    assert_nothing(&mut owner, "the owner").await;
}

/// A resume replays what was missed by the same rule; the first result a subscriber receives
/// says `recovered`, even when the first one replayed was not for it.
#[actix_web::test]
async fn a_replay_across_the_moment_a_car_became_private_withholds_what_followed() {
    let gateway = TestGateway::spawn(&[]).await;
    let mut watcher = subscribed(&gateway, &staff_token(STAFF), UPDATED_5, None).await;
    gateway.settle().await;
    gateway.publish(CAR_UPDATED, owned(5, "start", false)).await;
    let first = watcher.expect_json().await;
    let cursor = first["payload"]["extensions"]["cursor"]
        .as_str()
        .unwrap()
        .to_owned();
    for (make, private) in [("private 1", true), ("private 2", true), ("public", false)] {
        gateway.publish(CAR_UPDATED, owned(5, make, private)).await;
    }
    assert_eq!(makes(&mut watcher, "carModelUpdated", 3).await.0.len(), 3);

    let mut other = subscribed(&gateway, &access(OTHER), UPDATED_5, Some(&cursor)).await;
    let (got, recovered) = makes(&mut other, "carModelUpdated", 1).await;
    assert_eq!((got, recovered), (vec!["public".to_owned()], Some(true)));
    let mut owner = subscribed(&gateway, &access(OWNER), UPDATED_5, Some(&cursor)).await;
    let (got, recovered) = makes(&mut owner, "carModelUpdated", 3).await;
    assert_eq!(got, ["private 1", "private 2", "public"]);
    assert_eq!(recovered, Some(true));

    // Live again for both, by the same rule.
    gateway
        .publish(CAR_UPDATED, owned(5, "private 3", true))
        .await;
    gateway
        .publish(CAR_UPDATED, owned(5, "public 2", false))
        .await;
    assert_eq!(
        makes(&mut owner, "carModelUpdated", 2).await.0,
        ["private 3", "public 2"]
    );
    assert_eq!(
        makes(&mut other, "carModelUpdated", 1).await.0,
        ["public 2"]
    );
    assert_nothing(&mut other, "the other user").await;
}

/// The private results that arrive while a resume is being replayed wait at its gate only if
/// the subscriber may read them; the first it gets after an empty replay says `recovered`.
#[actix_web::test]
async fn a_resume_with_nothing_readable_to_replay_says_recovered_on_its_first_live_result() {
    let gateway = TestGateway::spawn(&[]).await;
    let mut watcher = subscribed(&gateway, &staff_token(STAFF), UPDATED_5, None).await;
    gateway.settle().await;
    gateway.publish(CAR_UPDATED, owned(5, "start", false)).await;
    let first: Value = watcher.expect_json().await;
    let cursor = first["payload"]["extensions"]["cursor"]
        .as_str()
        .unwrap()
        .to_owned();
    gateway
        .publish(CAR_UPDATED, owned(5, "private", true))
        .await;
    assert_eq!(
        makes(&mut watcher, "carModelUpdated", 1).await.0,
        ["private"]
    );

    let mut other = subscribed(&gateway, &access(OTHER), UPDATED_5, Some(&cursor)).await;
    assert_nothing(&mut other, "the other user").await;
    gateway
        .publish(CAR_UPDATED, owned(5, "private again", true))
        .await;
    gateway
        .publish(CAR_UPDATED, owned(5, "public", false))
        .await;
    let (got, recovered) = makes(&mut other, "carModelUpdated", 1).await;
    assert_eq!((got, recovered), (vec!["public".to_owned()], Some(true)));
}
