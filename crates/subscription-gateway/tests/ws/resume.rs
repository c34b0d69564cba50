//! Nothing lost across a reconnect: every result names its event (`extensions.cursor`), a
//! subscription that resumes from a cursor gets what it missed and then live events, without gap
//! or duplicate; a token is renewed on the open socket.

use crate::helpers::CAR_UPDATED;
use std::time::Duration;

use serde_json::json;
use tokens::jwt::TokenType;

use crate::helpers::{access, car, token, Incoming, TestGateway, WsClient, MODEL_UPDATED};

/// A graphql-transport-ws client subscribed to Car 1's updates, resuming from `cursor` if given.
async fn subscriber(gateway: &TestGateway, resume_from: Option<&str>) -> WsClient {
    let mut client = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    client.init(&access(1)).await;
    let mut payload = json!({"query": MODEL_UPDATED});
    if let Some(cursor) = resume_from {
        payload["extensions"] = json!({"resumeFrom": cursor});
    }
    client
        .send(json!({"id": "s", "type": "subscribe", "payload": payload}))
        .await;
    client
}

/// The next result: (make, cursor, recovered).
async fn next_result(client: &mut WsClient) -> (String, String, Option<bool>) {
    let message = client.expect_json().await;
    assert_eq!(message["type"], "next", "{message}");
    let payload = &message["payload"];
    (
        payload["data"]["carModelUpdated"]["make"]
            .as_str()
            .unwrap()
            .to_owned(),
        payload["extensions"]["cursor"].as_str().unwrap().to_owned(),
        payload["extensions"]["recovered"].as_bool(),
    )
}

/// The cursor of `make`'s result, seen by a subscriber that then goes away.
async fn cursor_of_a_departed_subscriber(gateway: &TestGateway, make: &str) -> String {
    let mut first = subscriber(gateway, None).await;
    gateway.settle().await;
    gateway.publish(CAR_UPDATED, car(1, make)).await;
    let (_, cursor, _) = next_result(&mut first).await;
    cursor
}

#[actix_web::test]
async fn a_resumed_subscription_gets_what_it_missed_then_live_events_once_each() {
    let gateway = TestGateway::spawn(&[]).await;
    let mut first = subscriber(&gateway, None).await;
    gateway.settle().await;
    gateway.publish(CAR_UPDATED, car(1, "m0")).await;
    let (make, cursor, recovered) = next_result(&mut first).await;
    assert_eq!((make.as_str(), recovered), ("m0", None));
    drop(first);

    // Missed while away, with another car's update among them (filtered as live ones are).
    for make in ["m1", "m2"] {
        gateway.publish(CAR_UPDATED, car(1, make)).await;
    }
    gateway.publish(CAR_UPDATED, car(2, "other")).await;
    gateway.publish(CAR_UPDATED, car(1, "m3")).await;

    let mut resumed = subscriber(&gateway, Some(&cursor)).await;
    let mut makes = Vec::new();
    let mut cursors = vec![cursor];
    for _ in 0..3 {
        let (make, cursor, recovered) = next_result(&mut resumed).await;
        assert_eq!(
            recovered,
            makes.is_empty().then_some(true),
            "only the first result says recovered"
        );
        makes.push(make);
        cursors.push(cursor);
    }
    assert_eq!(makes, ["m1", "m2", "m3"]);
    // Then live, after the replay, in order.
    gateway.settle().await;
    gateway.publish(CAR_UPDATED, car(1, "m4")).await;
    let (make, cursor, recovered) = next_result(&mut resumed).await;
    assert_eq!((make.as_str(), recovered), ("m4", None));
    cursors.push(cursor);
    let positions: Vec<_> = cursors
        .iter()
        .map(|c| {
            events::Cursor::parse(c, &domain::registry().unwrap())
                .unwrap()
                .position()
        })
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{cursors:?}");
    // And nothing else: no duplicate of a replayed event.
    resumed.send(json!({"type": "ping"})).await;
    assert_eq!(resumed.expect_json().await["type"], "pong");
}

#[actix_web::test]
async fn a_resume_while_others_share_the_execution_neither_loses_nor_repeats() {
    let gateway = TestGateway::spawn(&[]).await;
    // Someone else keeps the shared execution running all along.
    let mut other = subscriber(&gateway, None).await;
    gateway.settle().await;
    gateway.publish(CAR_UPDATED, car(1, "m0")).await;
    let (_, cursor, _) = next_result(&mut other).await;
    for make in ["m1", "m2"] {
        gateway.publish(CAR_UPDATED, car(1, make)).await;
    }
    let mut resumed = subscriber(&gateway, Some(&cursor)).await;
    // Published while the replay may still run: live, held back behind the replay.
    for make in ["m3", "m4"] {
        gateway.publish(CAR_UPDATED, car(1, make)).await;
    }
    let mut makes = Vec::new();
    for _ in 0..4 {
        makes.push(next_result(&mut resumed).await.0);
    }
    assert_eq!(makes, ["m1", "m2", "m3", "m4"]);
    resumed.send(json!({"type": "ping"})).await;
    assert_eq!(resumed.expect_json().await["type"], "pong");
}

#[actix_web::test]
async fn a_cursor_the_history_no_longer_covers_says_recovered_false_then_goes_live() {
    let gateway = TestGateway::spawn(&[]).await;
    let cursor = cursor_of_a_departed_subscriber(&gateway, "old").await;
    gateway.publish(CAR_UPDATED, car(1, "trimmed")).await;
    // Retention ends: the log is trimmed past the cursor.
    let pool = service_kit::redis::pool(&service_kit::redis::RedisArgs {
        redis_url: gateway.redis_url.clone(),
        redis_key_prefix: gateway.prefix.clone(),
        redis_pool_size: 1,
        redis_cluster: false,
    })
    .unwrap();
    let mut trim = deadpool_redis::redis::cmd("XTRIM");
    trim.arg(events::channel(&gateway.prefix, CAR_UPDATED.as_str()))
        .arg("MAXLEN")
        .arg(0);
    service_kit::redis::query::<i64>(&pool, &trim)
        .await
        .unwrap();

    let mut resumed = subscriber(&gateway, Some(&cursor)).await;
    gateway.settle().await;
    gateway.publish(CAR_UPDATED, car(1, "live")).await;
    let (make, _, recovered) = next_result(&mut resumed).await;
    assert_eq!((make.as_str(), recovered), ("live", Some(false)));
    gateway.publish(CAR_UPDATED, car(1, "live2")).await;
    assert_eq!(next_result(&mut resumed).await.2, None);
}

#[actix_web::test]
async fn a_malformed_or_foreign_cursor_is_an_error_of_that_operation_only() {
    let gateway = TestGateway::spawn(&[]).await;
    let mut client = subscriber(&gateway, Some("not-a-cursor")).await;
    let error = client.expect_json().await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["id"], "s");
    assert_eq!(error["payload"][0]["extensions"]["code"], "BAD_USER_INPUT");
    assert!(
        error["payload"][0]["message"]
            .as_str()
            .unwrap()
            .contains("resumeFrom"),
        "{error}"
    );
    // A cursor of another event type.
    client
        .send(json!({"id": "t", "type": "subscribe", "payload": {
            "query": MODEL_UPDATED,
            "extensions": {"resumeFrom": "00ff:car.created:1-0"}}}))
        .await;
    let error = client.expect_json().await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["id"], "t");
    assert!(
        error["payload"][0]["message"]
            .as_str()
            .unwrap()
            .contains("car.created"),
        "{error}"
    );
    // The socket stays open and serves.
    client.send(json!({"type": "ping"})).await;
    assert_eq!(client.expect_json().await["type"], "pong");
}

#[actix_web::test]
async fn a_socket_renewed_in_band_outlives_its_first_tokens_and_keeps_receiving() {
    let gateway = TestGateway::spawn(&[]).await;
    let mut client = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    // Lifetimes are whole seconds: a 3 s token lives more than 2 s, a 5 s one more than 4 s.
    client.init(&token(1, TokenType::Access, 3)).await;
    client
        .send(json!({"id": "s", "type": "subscribe", "payload": {"query": MODEL_UPDATED}}))
        .await;
    gateway.settle().await;
    let started = tokio::time::Instant::now();
    // Renewed at 1.5 s, 4 s and 6.5 s, each time before the token in force expires.
    for round in 0..3u32 {
        tokio::time::sleep_until(started + Duration::from_millis(1500 + 2500 * u64::from(round)))
            .await;
        let renewal = token(1, TokenType::Access, 5);
        client
            .send(
                json!({"type": "ping", "payload": {"Authorization": format!("Bearer {renewal}")}}),
            )
            .await;
        let pong = client.expect_json().await;
        assert_eq!(pong["type"], "pong", "{pong}");
        let exp = pong["payload"]["exp"].as_i64().unwrap();
        assert!(exp > chrono::Utc::now().timestamp() + 3, "{pong}");
        assert!(
            !pong.to_string().contains(&renewal),
            "a pong never echoes a token"
        );
        gateway
            .publish(CAR_UPDATED, car(1, &format!("round {round}")))
            .await;
        let (make, _, _) = next_result(&mut client).await;
        assert_eq!(make, format!("round {round}"));
    }
    // Past three lifetimes of the first token (9 s), still open and receiving.
    tokio::time::sleep_until(started + Duration::from_millis(9_500)).await;
    gateway.publish(CAR_UPDATED, car(1, "late")).await;
    assert_eq!(next_result(&mut client).await.0, "late");
    // Not renewed again: closed at the last token's expiry.
    match client.recv_within(Duration::from_secs(10)).await {
        Incoming::Close(code, reason) => {
            assert_eq!(code, Some(4403));
            assert!(reason.contains("expired"), "{reason}");
        }
        other => panic!("expected the expiry close, got {other:?}"),
    }
}

#[actix_web::test]
async fn renewal_with_another_users_or_a_bad_token_closes_4403() {
    let gateway = TestGateway::spawn(&[]).await;
    for (renewal, expected) in [
        (access(2), "another user"),
        (token(1, TokenType::Refresh, 300), "Forbidden"),
        ("garbage".to_owned(), "Forbidden"),
    ] {
        let mut client = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
        client.init(&access(1)).await;
        client
            .send(
                json!({"type": "ping", "payload": {"Authorization": format!("Bearer {renewal}")}}),
            )
            .await;
        let (code, reason) = client.expect_close().await;
        assert_eq!(code, Some(4403), "{renewal}");
        assert!(reason.contains(expected), "{reason}");
    }
    // A ping without a token is answered as ever, its payload echoed.
    let mut client = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    client.init(&access(1)).await;
    client
        .send(json!({"type": "ping", "payload": {"n": 1}}))
        .await;
    assert_eq!(
        client.expect_json().await,
        json!({"type": "pong", "payload": {"n": 1}})
    );
}

/// A replica's clients come back together with the same cursor; their reads of the log are
/// shared while they wait for a turn, and must still leave none of them a gap: events are
/// published while they resubscribe, so some land before a shared read and some after. (The rule
/// that makes sharing safe, joining only a read that has not begun, is argued at `Flight` in
/// hub.rs; a read takes well under a millisecond here, so this load seldom tests that window.)
#[actix_web::test]
async fn many_resuming_from_one_cursor_at_once_each_get_every_event_once_in_order() {
    let gateway = TestGateway::spawn(&[]).await;
    let cursor = cursor_of_a_departed_subscriber(&gateway, "m0").await;
    for n in 1..=5 {
        gateway.publish(CAR_UPDATED, car(1, &format!("m{n}"))).await;
    }

    let resuming =
        futures_util::future::join_all((0..40).map(|_| subscriber(&gateway, Some(&cursor))));
    let publishing = async {
        for n in 6..=15 {
            gateway.publish(CAR_UPDATED, car(1, &format!("m{n}"))).await;
            actix_web::rt::time::sleep(Duration::from_millis(3)).await;
        }
    };
    let (mut clients, ()) = futures_util::join!(resuming, publishing);
    let expected: Vec<String> = (1..=15).map(|n| format!("m{n}")).collect();
    for (n, client) in clients.iter_mut().enumerate() {
        let mut makes = Vec::new();
        for _ in 0..15 {
            makes.push(next_result(client).await.0);
        }
        assert_eq!(makes, expected, "client {n}");
        client.send(json!({"type": "ping"})).await;
        assert_eq!(
            client.expect_json().await["type"],
            "pong",
            "client {n}: no more"
        );
    }
}

#[actix_web::test]
async fn a_legacy_start_resumes_from_a_cursor_too() {
    let gateway = TestGateway::spawn(&[]).await;
    let cursor = cursor_of_a_departed_subscriber(&gateway, "m0").await;
    for make in ["m1", "m2"] {
        gateway.publish(CAR_UPDATED, car(1, make)).await;
    }

    let mut legacy = WsClient::connect(&gateway.url(), "graphql-ws").await;
    legacy
        .send(json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {}", access(1))}}))
        .await;
    assert_eq!(legacy.expect_json().await["type"], "connection_ack");
    legacy
        .send(json!({"id": "1", "type": "start", "payload": {
            "query": MODEL_UPDATED, "extensions": {"resumeFrom": cursor}}}))
        .await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match legacy.recv_skip_keepalive().await {
            Incoming::Json(data) => {
                assert_eq!(data["type"], "data", "{data}");
                let payload = &data["payload"];
                seen.push((
                    payload["data"]["carModelUpdated"]["make"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                    payload["extensions"]["recovered"].as_bool(),
                ));
            }
            other => panic!("expected data, got {other:?}"),
        }
    }
    assert_eq!(
        seen,
        [("m1".to_owned(), Some(true)), ("m2".to_owned(), None)]
    );
}

#[actix_web::test]
async fn a_renewed_socket_is_judged_by_its_new_token_at_a_revocation() {
    let gateway = TestGateway::spawn(&[]).await;
    let opened = chrono::Utc::now().timestamp();
    let mut client = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    client.init(&access(1)).await;
    // The renewal is issued at least two whole seconds after `opened`; the first token at most
    // one.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let renewal = token(1, TokenType::Access, 300);
    client
        .send(json!({"type": "ping", "payload": {"Authorization": format!("Bearer {renewal}")}}))
        .await;
    assert_eq!(client.expect_json().await["type"], "pong");
    gateway.settle().await;

    let channel = events::revocation_channel(&gateway.prefix);
    let suffix = channel.trim_start_matches(&gateway.prefix).to_owned();
    let revoke =
        |cutoff_ms: i64| json!({"user_id": 1, "jti": "j", "cutoff_ms": cutoff_ms}).to_string();
    // A logout that covers only the first token: the renewed socket stays.
    gateway
        .publish_raw(&suffix, &revoke((opened + 1) * 1000))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    client.send(json!({"type": "ping"})).await;
    assert_eq!(client.expect_json().await["type"], "pong");
    // A logout that covers the renewal too: closed.
    gateway
        .publish_raw(&suffix, &revoke(chrono::Utc::now().timestamp_millis()))
        .await;
    let (code, reason) = client.expect_close().await;
    assert_eq!(code, Some(4403));
    assert!(reason.contains("revoked"), "{reason}");
}

/// Resumes of one operation from one cursor that wait for their turn together are replayed
/// once: one replay holds the process's only slot (`--max-replays=1`), paced at 10 events a
/// second, while two more resume from the same cursor; when it goes, one replay serves both,
/// and each gets every event once, in order, the first saying `recovered`.
#[actix_web::test]
async fn resumes_of_one_operation_from_one_cursor_share_one_replay() {
    let gateway =
        TestGateway::spawn(&["--max-replays=1", "--replay-events-per-sec-per-user=10"]).await;
    let cursor = cursor_of_a_departed_subscriber(&gateway, "seen").await;
    for n in 0..20 {
        gateway
            .publish(CAR_UPDATED, car(1, &format!("missed {n}")))
            .await;
    }
    let blocker = subscriber(&gateway, Some(&cursor)).await;
    gateway.settle().await;
    let mut first = subscriber(&gateway, Some(&cursor)).await;
    let mut second = subscriber(&gateway, Some(&cursor)).await;
    gateway.settle().await;
    drop(blocker);
    for client in [&mut first, &mut second] {
        for n in 0..20 {
            let (make, _, recovered) = next_result(client).await;
            assert_eq!(make, format!("missed {n}"));
            assert_eq!(recovered, (n == 0).then_some(true));
        }
    }
    let (_, metrics) = gateway.get("/metrics").await;
    assert!(
        metrics.contains("gateway_replays_shared_total 1\n"),
        "{}",
        metrics
            .lines()
            .filter(|line| line.contains("replay"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
