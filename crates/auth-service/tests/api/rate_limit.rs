//! Failed logins are limited per username and per address, across replicas, through Redis.

use std::time::Duration;

use serde_json::json;
use test_support::{unique_prefix, TestDb};

use crate::helpers::{into_response, no_active_account, Response, ServiceProcess, TestApp};

async fn login_at(client: &awc::Client, port: u16, username: &str, password: &str) -> Response {
    into_response(
        client
            .post(format!("http://127.0.0.1:{port}/api/token/"))
            .insert_header(("Content-Type", "application/json"))
            .send_body(json!({"username": username, "password": password}).to_string())
            .await,
    )
    .await
}

fn assert_limited(response: &Response) {
    assert_eq!(response.status, 429, "{:?}", response.body);
    assert_eq!(response.body["code"], "throttled");
    let retry_after: u64 = response
        .headers
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=600).contains(&retry_after),
        "Retry-After {retry_after}"
    );
}

#[actix_web::test]
async fn failures_counted_by_two_processes_share_one_limit_per_username() {
    let db = TestDb::new();
    let prefix = unique_prefix("ratelimit");
    let env = |extra: (&'static str, String)| {
        vec![
            ("DATABASE_URL", db.url.clone()),
            ("REDIS_URL", test_support::redis_url()),
            ("REDIS_KEY_PREFIX", prefix.clone()),
            ("JWT_SECRET", crate::helpers::SECRET.to_owned()),
            ("LOGIN_MAX_FAILURES_PER_USER", "3".to_owned()),
            ("LOGIN_FAILURE_WINDOW_SECS", "120".to_owned()),
            extra,
        ]
    };
    let first = ServiceProcess::start(&env(("DEMO", "true".to_owned())));
    let second = ServiceProcess::start(&env(("DEMO", "false".to_owned())));
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .finish();

    // Three failures, spread over both processes, exhaust the budget of "admin" (the demo user).
    for port in [first.port, second.port, first.port] {
        let response = login_at(&client, port, "admin", "wrong").await;
        assert_eq!(response.status, 401);
        assert_eq!(response.body, no_active_account());
    }
    // Now both refuse, even the right password, and say when to come back.
    assert_limited(&login_at(&client, second.port, "admin", "letmein").await);
    assert_limited(&login_at(&client, first.port, "admin", "letmein").await);
    // Another username is unaffected.
    let other = login_at(&client, second.port, "someone-else", "x").await;
    assert_eq!(other.status, 401);
}

#[actix_web::test]
async fn one_address_guessing_many_usernames_is_limited() {
    let app = TestApp::spawn(&["--login-max-failures-per-address=4"]).await;
    app.create_user("alice", "pw", false).await;
    for i in 0..4 {
        let response = app
            .post_json(
                "/api/token/",
                &json!({"username": format!("user{i}"), "password": "x"}),
            )
            .await;
        assert_eq!(response.status, 401);
    }
    let response = app
        .post_json(
            "/api/token/",
            &json!({"username": "alice", "password": "pw"}),
        )
        .await;
    assert_limited(&response);
}

#[actix_web::test]
async fn a_successful_login_resets_the_username_counter() {
    let app = TestApp::spawn(&["--login-max-failures-per-user=2"]).await;
    app.create_user("alice", "pw", false).await;
    for _ in 0..3 {
        let wrong = app
            .post_json(
                "/api/token/",
                &json!({"username": "alice", "password": "no"}),
            )
            .await;
        assert_eq!(wrong.status, 401);
        let right = app
            .post_json(
                "/api/token/",
                &json!({"username": "alice", "password": "pw"}),
            )
            .await;
        assert_eq!(right.status, 200, "{:?}", right.body);
    }
}

#[actix_web::test]
async fn the_limit_honours_x_forwarded_for_only_when_told_to_trust_it() {
    let app = TestApp::spawn(&[
        "--login-max-failures-per-address=1",
        "--trust-forwarded-for=true",
    ])
    .await;
    let client = awc::Client::default();
    let attempt = |forwarded: &'static str| {
        let request = client
            .post(format!("{}/api/token/", app.address))
            .insert_header(("Content-Type", "application/json"))
            .insert_header(("X-Forwarded-For", forwarded));
        async move {
            into_response(
                request
                    .send_body(json!({"username": "u", "password": "p"}).to_string())
                    .await,
            )
            .await
        }
    };
    // The last entry is the address the proxy saw; earlier ones are the client's word.
    assert_eq!(attempt("9.9.9.9, 10.0.0.1").await.status, 401);
    assert_limited(&attempt("8.8.8.8, 10.0.0.1").await);
    assert_eq!(attempt("10.0.0.2").await.status, 401);
}
