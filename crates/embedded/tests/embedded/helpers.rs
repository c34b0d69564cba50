//! `TestApp`: the real embedded application (`Application::build`, as `main` runs it) on port 0
//! with its own SQLite file; `WsClient`: awc's websocket client.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use awc::ws;
use clap::Parser as _;
use embedded::server::Application;
use embedded::settings::Cli;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};

pub struct TestApp {
    pub port: u16,
    pub database_url: String,
    /// The server's own pool.
    pool: common::db::DbPool,
    dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        let dir = std::env::temp_dir().join(format!(
            "gqlws-embedded-test-{}-{}",
            std::process::id(),
            common::jwt::new_jti()
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
            let _ = common::telemetry::init(&cli.settings.log);
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

    pub fn pool(&self) -> &common::db::DbPool {
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

/// What the client saw next.
#[derive(Debug)]
pub enum Incoming {
    Json(Value),
    Close(Option<u16>, String),
}

pub struct WsClient {
    framed: actix_codec::Framed<awc::BoxedSocket, ws::Codec>,
}

impl WsClient {
    pub async fn connect(url: &str, protocol: &str) -> WsClient {
        let (_, framed) = awc::Client::builder()
            .timeout(Duration::from_secs(10))
            .finish()
            .ws(url)
            .protocols([protocol])
            .connect()
            .await
            .unwrap();
        WsClient { framed }
    }

    pub async fn send(&mut self, message: Value) {
        self.framed
            .send(ws::Message::Text(message.to_string().into()))
            .await
            .unwrap();
    }

    /// The next JSON message or close, skipping pings and keep-alives; panics after 10 s.
    pub async fn recv(&mut self) -> Incoming {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), self.framed.next())
                .await
                .expect("no message in time");
            match frame {
                Some(Ok(ws::Frame::Text(bytes))) => {
                    let value: Value = serde_json::from_slice(&bytes).unwrap();
                    if value["type"] == "ping" || value["type"] == "ka" {
                        continue;
                    }
                    return Incoming::Json(value);
                }
                Some(Ok(ws::Frame::Close(reason))) => {
                    return Incoming::Close(
                        reason.as_ref().map(|r| u16::from(r.code)),
                        reason.and_then(|r| r.description).unwrap_or_default(),
                    )
                }
                Some(Ok(ws::Frame::Ping(bytes))) => {
                    let _ = self.framed.send(ws::Message::Pong(bytes)).await;
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => panic!("websocket error: {err}"),
                None => return Incoming::Close(None, "stream ended".into()),
            }
        }
    }

    pub async fn expect_json(&mut self) -> Value {
        match self.recv().await {
            Incoming::Json(value) => value,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    pub async fn expect_close(&mut self) -> (Option<u16>, String) {
        loop {
            if let Incoming::Close(code, reason) = self.recv().await {
                return (code, reason);
            }
        }
    }

    pub async fn init(&mut self, token: &str) -> Value {
        self.send(json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {token}")}}))
            .await;
        self.expect_json().await
    }
}

pub const MODEL_UPDATED: &str = "subscription { carModelUpdated(pk: 1) { id make model } }";
