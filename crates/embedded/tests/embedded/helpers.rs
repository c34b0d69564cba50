//! `TestApp`: the real embedded application (`Application::build`, as `main` runs it) on port 0
//! with its own SQLite file. The websocket client is `test_support::ws::WsClient`.

#![allow(dead_code)]

use std::path::PathBuf;

use clap::Parser as _;
use embedded::server::Application;
use embedded::settings::Cli;
use serde_json::{json, Value};
pub use test_support::ws::{Incoming, WsClient};

pub struct TestApp {
    pub port: u16,
    pub database_url: String,
    /// The server's own pool.
    pool: store::DbPool,
    dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        let dir = std::env::temp_dir().join(format!(
            "gqlws-embedded-test-{}-{}",
            std::process::id(),
            tokens::jwt::new_jti()
        ));
        // The directory does not exist yet: the application creates it, as it does `./data/`.
        let database_url = format!("sqlite://{}/gqlws.db", dir.display());
        let cli = Cli::try_parse_from([
            "gqlws".to_owned(),
            "--listen-addr=127.0.0.1:0".to_owned(),
            format!("--database-url={database_url}"),
            "--outbox-relay-interval-ms=50".to_owned(),
            "--log-level=warn".to_owned(),
        ])
        .unwrap();
        if std::env::var("TEST_LOG").is_ok() {
            let _ = service_kit::telemetry::init(&cli.settings.log, "test");
        }
        let app = Application::build(&cli.settings).await.unwrap();
        let port = app.port();
        let pool = app.pool().clone();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        actix_web::rt::spawn(async move {
            let _ = app
                .run_until_stopped(async {
                    let _ = stop_rx.await;
                })
                .await;
        });
        TestApp {
            port,
            database_url,
            pool,
            dir,
            stop: Some(stop),
        }
    }

    pub fn pool(&self) -> &store::DbPool {
        &self.pool
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/graphql/", self.port)
    }

    /// POSTs JSON; returns the status and the JSON body (`null` when it is not JSON).
    pub async fn post(&self, path: &str, body: Value, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut request = awc::Client::default().post(self.url(path));
        for (name, value) in headers {
            request = request.insert_header((*name, *value));
        }
        let mut response = request.send_json(&body).await.unwrap();
        let bytes = response.body().await.unwrap();
        (
            response.status().as_u16(),
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let mut request = awc::Client::default().get(self.url(path));
        for (name, value) in headers {
            request = request.insert_header((*name, *value));
        }
        let mut response = request.send().await.unwrap();
        let bytes = response.body().limit(1 << 22).await.unwrap();
        (
            response.status().as_u16(),
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    /// A token pair for the demo user, through `POST /api/token/`.
    pub async fn login(&self) -> (String, String) {
        let (status, body) = self
            .post(
                "/api/token/",
                json!({"username": "admin", "password": "letmein"}),
                &[],
            )
            .await;
        assert_eq!(status, 200, "{body}");
        (
            body["access"].as_str().unwrap().to_owned(),
            body["refresh"].as_str().unwrap().to_owned(),
        )
    }

    /// Runs a GraphQL document over HTTP with the bearer token.
    pub async fn graphql(&self, token: Option<&str>, query: &str) -> Value {
        let authorization = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = authorization
            .as_deref()
            .map(|value| vec![("Authorization", value)])
            .unwrap_or_default();
        let (status, body) = self
            .post("/graphql/", json!({"query": query}), &headers)
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// `gqlws <args>` as a separate process on this app's database, with `stdin`; its stdout.
    pub fn gqlws(&self, args: &[&str], stdin: &str) -> String {
        use std::io::Write as _;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gqlws"))
            .arg(format!("--database-url={}", self.database_url))
            .arg("--log-level=warn")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "gqlws {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// A token pair for `username`, through `POST /api/token/`.
    pub async fn login_as(&self, username: &str, password: &str) -> (String, String) {
        let (status, body) = self
            .post(
                "/api/token/",
                json!({"username": username, "password": password}),
                &[],
            )
            .await;
        assert_eq!(status, 200, "{body}");
        (
            body["access"].as_str().unwrap().to_owned(),
            body["refresh"].as_str().unwrap().to_owned(),
        )
    }

    /// `gqlws trigger-event` as a separate process on this app's database, as an operator runs it.
    pub fn trigger_event(&self) -> String {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_gqlws"))
            .arg(format!("--database-url={}", self.database_url))
            .arg("--log-level=warn")
            .arg("trigger-event")
            .arg("--pk=1")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub const MODEL_UPDATED: &str = "subscription { carModelUpdated(pk: 1) { id make model } }";
