//! Logouts under attack: one user's burst of logouts moves nothing of anyone else's, cutoffs are
//! never in the future, every change reaches every replica (one started later included), and a
//! logout that cannot be recorded says so.

use std::time::Duration;

use deadpool_redis::redis;
use serde_json::json;
use test_support::{unique_prefix, PrivateRedis, TestDb};

use crate::helpers::{peek, TestApp};

/// Longest the tests wait for a replica's poll; only a safety net (the poll is every second).
const PATIENCE: Duration = Duration::from_secs(20);

async fn logout(app: &TestApp, refresh: &str) -> crate::helpers::Response {
    app.post_json("/api/token/blacklist/", &json!({"refresh": refresh}))
        .await
}

async fn verify_status(app: &TestApp, token: &str) -> u16 {
    app.post_json("/api/token/verify/", &json!({"token": token}))
        .await
        .status
}

/// Waits until `app` refuses `token` at `/api/token/verify/`; panics after [`PATIENCE`].
pub async fn until_refused(app: &TestApp, token: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while verify_status(app, token).await != 401 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the revoked token is still accepted by {}",
            app.address
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn redis_connection() -> redis::aio::MultiplexedConnection {
    redis::Client::open(test_support::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[actix_web::test]
async fn a_burst_of_one_users_logouts_leaves_every_other_logout_working() {
    let db = TestDb::new();
    let prefix = unique_prefix("revocation");
    let first = TestApp::spawn_on(&db.url, &prefix, &[]).await;
    let second = TestApp::spawn_on(&db.url, &prefix, &[]).await;
    first.create_user("alice", "pw", false).await;
    first.create_user("bob", "pw", false).await;

    // Alice logs in and out as fast as the service lets her, on both replicas.
    for round in 0..60 {
        let app = if round % 2 == 0 { &first } else { &second };
        let (refresh, _) = app.login("alice", "pw").await;
        assert_eq!(logout(app, &refresh).await.status, 200);
    }

    // Her next tokens are issued now, for the configured lifetime: no logout pushed her clock.
    let (refresh, access) = first.login("alice", "pw").await;
    let now = chrono::Utc::now().timestamp();
    for token in [&refresh, &access] {
        let claims = peek(token).1;
        let iat = claims["iat"].as_i64().unwrap();
        assert!(iat <= now, "iat {iat} is after now {now}");
        let iat_ms = claims["iat_ms"].as_i64().unwrap();
        assert_eq!(iat_ms.div_euclid(1000), iat);
    }
    assert_eq!(
        peek(&access).1["exp"].as_i64().unwrap() - peek(&access).1["iat"].as_i64().unwrap(),
        300
    );
    assert_eq!(verify_status(&first, &access).await, 200);
    assert_eq!(verify_status(&second, &access).await, 200);

    // Bob logs out on one replica: that one refuses his access token before answering, the other
    // within its poll.
    let (bob_refresh, bob_access) = second.login("bob", "pw").await;
    assert_eq!(verify_status(&first, &bob_access).await, 200);
    assert_eq!(logout(&second, &bob_refresh).await.status, 200);
    assert_eq!(verify_status(&second, &bob_access).await, 401);
    until_refused(&first, &bob_access).await;
    // And his next login works everywhere at once.
    let (_, bob_again) = first.login("bob", "pw").await;
    assert_eq!(verify_status(&first, &bob_again).await, 200);
    assert_eq!(verify_status(&second, &bob_again).await, 200);

    // In Redis: one cutoff per user, none in the future.
    let mut conn = redis_connection().await;
    let [cutoffs_key, changes_key, _] = tokens::revocations::keys(&prefix);
    let cutoffs: Vec<(i64, i64)> = redis::cmd("HGETALL")
        .arg(&cutoffs_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(cutoffs.len(), 2, "{cutoffs:?}");
    let now_ms = chrono::Utc::now().timestamp_millis();
    assert!(
        cutoffs.iter().all(|(_, cutoff)| *cutoff <= now_ms),
        "{cutoffs:?}"
    );
    let changes: i64 = redis::cmd("ZCARD")
        .arg(&changes_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(changes, 2);
}

#[actix_web::test]
async fn a_replica_started_after_a_flood_of_logouts_refuses_every_live_one() {
    let db = TestDb::new();
    let prefix = unique_prefix("revocation");
    let redis_pool = service_kit::redis::pool(&service_kit::redis::RedisArgs {
        redis_url: test_support::redis_url(),
        redis_key_prefix: prefix.clone(),
        redis_pool_size: 2,
        redis_cluster: false,
    })
    .unwrap();
    let retention_ms = 305_000;
    // A logout of long ago (as if written 400 s back): the oldest change, out of retention.
    let long_ago = tokens::revocations::now_ms() - 400_000;
    tokens::revocations::write(&redis_pool, &prefix, 7, long_ago, retention_ms)
        .await
        .unwrap();

    let first = TestApp::spawn_on(&db.url, &prefix, &[]).await;
    first.create_user("bob", "pw", false).await;
    let (bob_refresh, bob_access) = first.login("bob", "pw").await;
    assert_eq!(logout(&first, &bob_refresh).await.status, 200);

    // A flood of other users' logouts, written as auth-service writes them (logins would take
    // minutes of argon2): each trims the oldest changes, but only those out of retention.
    for user in 1000..1500 {
        tokens::revocations::write(
            &redis_pool,
            &prefix,
            user,
            tokens::revocations::now_ms(),
            retention_ms,
        )
        .await
        .unwrap();
    }
    let mut conn = redis_connection().await;
    let [cutoffs_key, _, _] = tokens::revocations::keys(&prefix);
    let count: usize = redis::cmd("HLEN")
        .arg(&cutoffs_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(count, 1 + 500, "bob and the flood; user 7 trimmed");

    // A replica started now is ready only once it read them all, and then refuses bob's token.
    let late = TestApp::spawn_on(&db.url, &prefix, &[]).await;
    let (status, body) = late.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(verify_status(&late, &bob_access).await, 401);
    let list = tokens::revocations::RevokedBefore::new(300, 5);
    tokens::revocations::catch_up(&redis_pool, &prefix, &list, &mut 0)
        .await
        .unwrap();
    assert!(list.cutoff(1000).is_some() && list.cutoff(1499).is_some());
    assert!(list.cutoff(7).is_none());
}

#[actix_web::test]
async fn a_logout_that_cannot_be_recorded_is_503_and_changes_nothing() {
    let mut redis = PrivateRedis::start();
    let app = TestApp::spawn(&[&format!("--redis-url={}", redis.url())]).await;
    app.create_user("carol", "pw", false).await;
    let (refresh, access) = app.login("carol", "pw").await;

    redis.stop();
    let response = logout(&app, &refresh).await;
    assert_eq!(response.status, 503, "{:?}", response.body);
    assert_eq!(response.body["code"], "logout_unavailable");
    let detail = response.body["detail"].as_str().unwrap();
    assert!(detail.contains("try again"), "{detail}");
    assert!(response.headers.contains_key("retry-after"));
    // Nothing changed: the access token still verifies, the refresh token still refreshes.
    assert_eq!(verify_status(&app, &access).await, 200);
    let refreshed = app
        .post_json("/api/token/refresh/", &json!({"refresh": refresh}))
        .await;
    assert_eq!(refreshed.status, 200, "{:?}", refreshed.body);
    // (Rotation is on: the refresh took the old token's place.)
    let refresh = refreshed.body["refresh"].as_str().unwrap().to_owned();
    let newer_access = refreshed.body["access"].as_str().unwrap().to_owned();

    // With Redis back, the logout works and holds.
    redis.restart();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let response = logout(&app, &refresh).await;
        if response.status == 200 {
            break;
        }
        assert_eq!(response.status, 503, "{:?}", response.body);
        assert!(
            tokio::time::Instant::now() < deadline,
            "Redis did not come back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(verify_status(&app, &access).await, 401);
    assert_eq!(verify_status(&app, &newer_access).await, 401);
    assert_eq!(logout(&app, &refresh).await.status, 401);
}

#[actix_web::test]
async fn a_login_with_a_nul_in_the_username_is_an_unknown_user() {
    let app = TestApp::spawn(&[]).await;
    let response = app
        .post_json(
            "/api/token/",
            &json!({"username": "ali\u{0}ce", "password": "pw"}),
        )
        .await;
    assert_eq!(response.status, 401, "{:?}", response.body);
    assert_eq!(response.body, crate::helpers::no_active_account());
}
