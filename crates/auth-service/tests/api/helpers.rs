//! `TestApp`: the real application, built as `main` builds it, on a free port, with its own
//! database and Redis key prefix.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use auth_service::settings::{Cli, Settings};
use auth_service::startup::Application;
use clap::Parser as _;
use serde_json::{json, Value};
use store::DbPool;
use test_support::{unique_prefix, TestDb};

pub const SECRET: &str = "test-secret-0123456789-0123456789-0123456789";

pub struct TestApp {
    pub address: String,
    /// The database this app owns, if it owns one (see [`TestApp::spawn_on`]).
    pub db: Option<TestDb>,
    pub db_url: String,
    pub pool: DbPool,
    pub redis_prefix: String,
    client: awc::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

pub use test_support::{into_response, Response};

impl TestApp {
    /// An app on HS256 with `SECRET`; `extra` are further command-line arguments.
    pub async fn spawn(extra: &[&str]) -> TestApp {
        let db = TestDb::new();
        let url = db.url.clone();
        let mut app = Self::spawn_on(&url, &unique_prefix("auth"), extra).await;
        app.db = Some(db);
        app
    }

    /// An app on an existing database (another app's, for tests of several instances).
    pub async fn spawn_on(db_url: &str, redis_prefix: &str, extra: &[&str]) -> TestApp {
        let mut args: Vec<String> = vec![
            "auth-service".into(),
            "--listen-addr=127.0.0.1:0".into(),
            format!("--database-url={db_url}"),
            format!("--redis-url={}", test_support::redis_url()),
            format!("--redis-key-prefix={redis_prefix}"),
            "--http-workers=1".into(),
            "--log-level=warn".into(),
            "--jwt-leeway-secs=0".into(),
        ];
        if !extra.iter().any(|a| a.starts_with("--jwt-algorithm=EdDSA")) {
            args.push(format!("--jwt-secret={SECRET}"));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let settings = settings_from(&args);
        if std::env::var("TEST_LOG").is_ok() {
            let _ = service_kit::telemetry::init(&settings.log, "test");
        }
        let pool = store::pool(&settings.database);
        let app = Application::build(settings).await.unwrap();
        let address = format!("http://127.0.0.1:{}", app.port());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        actix_web::rt::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        TestApp {
            address,
            db: None,
            db_url: db_url.to_owned(),
            pool,
            redis_prefix: redis_prefix.to_owned(),
            client: awc::Client::builder()
                .timeout(Duration::from_secs(30))
                .finish(),
            stop: Some(stop),
        }
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.post_raw(path, "application/json", body.to_string().into_bytes())
            .await
    }

    pub async fn post_raw(&self, path: &str, content_type: &str, body: Vec<u8>) -> Response {
        let response = self
            .client
            .post(format!("{}{path}", self.address))
            .insert_header(("Content-Type", content_type))
            .send_body(body)
            .await;
        into_response(response).await
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let mut response = self
            .client
            .get(format!("{}{path}", self.address))
            .send()
            .await
            .unwrap();
        let body = response.body().limit(1 << 20).await.unwrap();
        (
            response.status().as_u16(),
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    pub async fn create_user(&self, username: &str, password: &str, staff: bool) {
        let created =
            auth_service::users::create_user(&self.pool, username, password, staff, false)
                .await
                .unwrap();
        assert_eq!(created, auth_service::users::Created::Created);
    }

    /// Logs in and returns (refresh, access).
    pub async fn login(&self, username: &str, password: &str) -> (String, String) {
        let response = self
            .post_json(
                "/api/token/",
                &json!({"username": username, "password": password}),
            )
            .await;
        assert_eq!(response.status, 200, "login failed: {:?}", response.body);
        (
            response.body["refresh"].as_str().unwrap().to_owned(),
            response.body["access"].as_str().unwrap().to_owned(),
        )
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub fn settings_from(args: &[String]) -> Settings {
    Cli::try_parse_from(args).unwrap().settings
}

/// The contract's body for every refused token.
pub fn token_not_valid() -> Value {
    json!({"detail": "Token is invalid or expired", "code": "token_not_valid"})
}

pub fn no_active_account() -> Value {
    json!({"detail": "No active account found with the given credentials", "code": "no_active_account"})
}

/// Splits a JWT and decodes its header and payload without verifying anything.
pub fn peek(token: &str) -> (Value, Value) {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    let mut parts = token.split('.');
    let header = URL_SAFE_NO_PAD.decode(parts.next().unwrap()).unwrap();
    let payload = URL_SAFE_NO_PAD.decode(parts.next().unwrap()).unwrap();
    (
        serde_json::from_slice(&header).unwrap(),
        serde_json::from_slice(&payload).unwrap(),
    )
}

pub use test_support::tokens::forge_hs256;

/// Claims as auth-service writes them, for `user_id` 1, expiring `exp_in` seconds from now.
pub fn claims(token_type: &str, exp_in: i64) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({
        "token_type": token_type,
        "exp": now + exp_in,
        "iat": now,
        "jti": tokens::jwt::new_jti(),
        "user_id": 1,
        "username": "alice",
    })
}

/// The kid auth-service derives for `SECRET`, read from a token it issued.
pub fn kid_of(token: &str) -> String {
    peek(token).0["kid"].as_str().unwrap().to_owned()
}

/// Starts the real binary (for tests that need separate processes) and waits until it serves.
pub struct ServiceProcess {
    pub port: u16,
    child: std::process::Child,
}

impl ServiceProcess {
    pub fn start(envs: &[(&str, String)]) -> ServiceProcess {
        let port = test_support::free_port();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_auth-service"))
            .env_clear()
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("LOG_LEVEL", "warn")
            .env("HTTP_WORKERS", "1")
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "auth-service did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        ServiceProcess { port, child }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
