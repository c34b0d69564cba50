//! The token REST contract (SimpleJWT's), on the embedded server.

use serde_json::json;

use crate::helpers::TestApp;

#[actix_web::test]
async fn obtain_verify_refresh_and_blacklist_follow_simplejwt() {
    let app = TestApp::spawn().await;

    let (access, refresh) = app.login().await;
    let (status, body) = app
        .post("/api/token/verify/", json!({"token": access}), &[])
        .await;
    assert_eq!((status, body), (200, json!({})));

    let (status, body) = app
        .post(
            "/api/token/",
            json!({"username": "admin", "password": "wrong"}),
            &[],
        )
        .await;
    assert_eq!(status, 401);
    assert_eq!(
        body,
        json!({"detail": "No active account found with the given credentials", "code": "no_active_account"})
    );

    let (status, body) = app
        .post("/api/token/", json!({"password": "letmein"}), &[])
        .await;
    assert_eq!(status, 400);
    assert_eq!(body, json!({"username": ["This field is required."]}));

    let invalid = json!({"detail": "Token is invalid or expired", "code": "token_not_valid"});
    let (status, body) = app
        .post("/api/token/verify/", json!({"token": "not.a.token"}), &[])
        .await;
    assert_eq!((status, body), (401, invalid.clone()));
    // A refresh token is not accepted where an access token belongs, and the reverse.
    let (status, _) = app
        .post("/api/token/refresh/", json!({"refresh": access}), &[])
        .await;
    assert_eq!(status, 401);

    // Rotation: a new pair, and the old refresh token is refused from now on.
    let (status, body) = app
        .post("/api/token/refresh/", json!({"refresh": refresh}), &[])
        .await;
    assert_eq!(status, 200, "{body}");
    let rotated = body["refresh"].as_str().unwrap().to_owned();
    assert!(body["access"].is_string());
    let (status, body) = app
        .post("/api/token/refresh/", json!({"refresh": refresh}), &[])
        .await;
    assert_eq!((status, body), (401, invalid.clone()));

    // Logout.
    let (status, body) = app
        .post("/api/token/blacklist/", json!({"refresh": rotated}), &[])
        .await;
    assert_eq!((status, body), (200, json!({})));
    let (status, body) = app
        .post("/api/token/refresh/", json!({"refresh": rotated}), &[])
        .await;
    assert_eq!((status, body), (401, invalid));
}

#[actix_web::test]
async fn failed_logins_are_rate_limited_in_process() {
    let app = TestApp::spawn().await;
    for _ in 0..5 {
        let (status, _) = app
            .post(
                "/api/token/",
                json!({"username": "admin", "password": "wrong"}),
                &[],
            )
            .await;
        assert_eq!(status, 401);
    }
    let (status, body) = app
        .post(
            "/api/token/",
            json!({"username": "admin", "password": "letmein"}),
            &[],
        )
        .await;
    assert_eq!(status, 429, "{body}");
}

#[actix_web::test]
async fn health_readiness_and_metrics_are_served() {
    let app = TestApp::spawn().await;
    assert_eq!(app.get("/healthz", &[]).await.0, 200);
    let (status, body) = app.get("/readyz", &[]).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = app.get("/metrics", &[]).await;
    assert_eq!(status, 200);
    assert!(body.contains("http_requests_total"), "{body}");
    assert_eq!(app.get("/nowhere", &[]).await.0, 404);
}
