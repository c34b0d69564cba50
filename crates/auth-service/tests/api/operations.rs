//! Health, readiness, metrics, the create-user command, and behaviour with Redis gone.

use std::io::Write as _;
use std::process::{Command, Stdio};

use serde_json::json;

use crate::helpers::TestApp;

#[actix_web::test]
async fn healthz_readyz_and_metrics() {
    let app = TestApp::spawn(&[]).await;
    let (status, body) = app.get("/healthz").await;
    assert_eq!(status, 200);
    assert!(body.contains("ok"));
    let (status, body) = app.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        ready["checks"],
        json!({"database": "ok", "redis": "ok", "revocations": "ok"})
    );

    app.create_user("alice", "pw", false).await;
    app.login("alice", "pw").await;
    let _ = app
        .post_json(
            "/api/token/",
            &json!({"username": "alice", "password": "no"}),
        )
        .await;
    let (status, metrics) = app.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"auth_tokens_issued_total{type="access"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"auth_tokens_issued_total{type="refresh"} 1"#));
    assert!(metrics.contains(r#"auth_login_failures_total{reason="wrong_password"} 1"#));
    assert!(metrics.contains(
        r#"http_requests_total{method="POST",route="/api/token/",service="auth-service",status="200"} 1"#
    ));
    assert!(metrics.contains("http_request_duration_seconds_bucket"));
}

#[actix_web::test]
async fn with_redis_unreachable_logins_still_work_and_readyz_says_why() {
    let mut redis = test_support::PrivateRedis::start();
    let url = redis.url();
    let app = TestApp::spawn(&[&format!("--redis-url={url}")]).await;
    app.create_user("alice", "pw", false).await;
    app.login("alice", "pw").await;

    redis.stop();
    let (status, body) = app.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["checks"]["database"], "ok");
    assert_ne!(ready["checks"]["redis"], "ok");
    // The limiter fails open: the service keeps serving.
    app.login("alice", "pw").await;
    let wrong = app
        .post_json(
            "/api/token/",
            &json!({"username": "alice", "password": "no"}),
        )
        .await;
    assert_eq!(wrong.status, 401);

    redis.restart();
    let mut ready_again = false;
    for _ in 0..50 {
        if app.get("/readyz").await.0 == 200 {
            ready_again = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ready_again, "readyz did not recover after Redis came back");
}

#[actix_web::test]
async fn with_the_database_unreachable_requests_get_503_not_a_crash() {
    let app = TestApp::spawn(&[]).await;
    app.create_user("alice", "pw", false).await;
    // Kill the database under the running service.
    let db = app.db.as_ref().unwrap();
    db.drop_now();
    let response = app
        .post_json(
            "/api/token/",
            &json!({"username": "alice", "password": "pw"}),
        )
        .await;
    assert_eq!(response.status, 503, "{:?}", response.body);
    assert_eq!(response.body["code"], "service_unavailable");
    let (status, _) = app.get("/healthz").await;
    assert_eq!(status, 200, "the process must keep running");
    let (status, _) = app.get("/readyz").await;
    assert_eq!(status, 503);
}

#[actix_web::test]
async fn create_user_reads_the_password_from_stdin_and_refuses_duplicates() {
    let app = TestApp::spawn(&[]).await;
    let run = |args: &[&str], stdin: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_auth-service"))
            .env_clear()
            .env("DATABASE_URL", &app.db_url)
            .env("REDIS_URL", test_support::redis_url())
            .env("REDIS_KEY_PREFIX", &app.redis_prefix)
            .env("LOG_LEVEL", "warn")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let created = run(
        &[
            "create-user",
            "--username",
            "carol",
            "--password-stdin",
            "--staff",
        ],
        "c4rol-pw\n",
    );
    assert!(created.status.success(), "{created:?}");
    let (_, staff_access) = app.login("carol", "c4rol-pw").await;
    // The gateway, which has no database, reads private records for staff by this claim.
    assert_eq!(crate::helpers::peek(&staff_access).1["is_staff"], true);
    let user = store::users::find_by_username(&app.pool, "carol".into())
        .await
        .unwrap()
        .unwrap();
    assert!(user.is_staff);
    assert!(user.password_hash.starts_with("$argon2id$"));

    let duplicate = run(
        &["create-user", "--username", "carol", "--password-stdin"],
        "other\n",
    );
    assert_eq!(duplicate.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&duplicate.stderr).contains("already exists"));

    let updated = run(
        &[
            "create-user",
            "--username",
            "carol",
            "--password-stdin",
            "--update",
        ],
        "new-pw\n",
    );
    assert!(updated.status.success(), "{updated:?}");
    assert!(String::from_utf8_lossy(&updated.stdout).contains("access tokens are revoked"));
    // No longer staff (the update sets the flag as given): the token that said so is revoked.
    crate::revocation::until_refused(&app, &staff_access).await;
    let (_, access) = app.login("carol", "new-pw").await;
    assert_eq!(crate::helpers::peek(&access).1.get("is_staff"), None);

    let generated = run(&["create-user", "--username", "dave"], "");
    assert!(generated.status.success());
    let stdout = String::from_utf8_lossy(&generated.stdout);
    let password = stdout
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .unwrap();
    app.login("dave", password).await;
}

#[actix_web::test]
async fn demo_mode_creates_admin_once() {
    let app = TestApp::spawn(&["--demo"]).await;
    app.login("admin", "letmein").await;
    let admin = store::users::find_by_username(&app.pool, "admin".into())
        .await
        .unwrap()
        .unwrap();
    assert!(admin.is_staff);
    // A second start on the same database leaves the user alone.
    let again = TestApp::spawn_on(
        &app.db_url,
        &test_support::unique_prefix("auth"),
        &["--demo"],
    )
    .await;
    again.login("admin", "letmein").await;
}
