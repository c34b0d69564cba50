//! `TestApp`: the real application, built as `main` builds it, on a free port, with its own
//! database and Redis key prefix; tokens minted here with the same secret through tokens::jwt.

#![allow(clippy::unwrap_used, dead_code)]

use std::time::Duration;

use api_service::settings::{Cli, Settings};
use api_service::startup::Application;
use clap::Parser as _;
use serde_json::{json, Value};
use store::users::{self, NewUser};
use store::DbPool;
use test_support::{unique_prefix, TestDb};
use tokens::jwt::TokenType;

pub const SECRET: &str = "test-secret-0123456789-0123456789-0123456789";

pub struct TestApp {
    pub address: String,
    pub db: TestDb,
    pub pool: DbPool,
    pub redis_url: String,
    pub redis_prefix: String,
    client: awc::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

pub use test_support::{into_response, Response};

impl TestApp {
    /// An app on HS256 with `SECRET` and the shared Redis; `extra` are further arguments.
    pub async fn spawn(extra: &[&str]) -> TestApp {
        Self::spawn_with_redis(&test_support::redis_url(), extra).await
    }

    pub async fn spawn_with_redis(redis_url: &str, extra: &[&str]) -> TestApp {
        let db = TestDb::new();
        let redis_prefix = unique_prefix("api");
        let mut args: Vec<String> = vec![
            "api-service".into(),
            "--listen-addr=127.0.0.1:0".into(),
            format!("--database-url={}", db.url),
            format!("--redis-url={redis_url}"),
            format!("--redis-key-prefix={redis_prefix}"),
            "--http-workers=1".into(),
            "--log-level=warn".into(),
            "--jwt-leeway-secs=0".into(),
            format!("--jwt-secret={SECRET}"),
            "--outbox-relay-interval-ms=100".into(),
        ];
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
            db,
            pool,
            redis_url: redis_url.to_owned(),
            redis_prefix,
            client: awc::Client::builder()
                .timeout(Duration::from_secs(30))
                .finish(),
            stop: Some(stop),
        }
    }

    /// POSTs `{"query": …, "variables": …}` with an optional bearer token.
    pub async fn graphql(&self, token: Option<&str>, query: &str, variables: Value) -> Response {
        let mut headers = Vec::new();
        if let Some(token) = token {
            headers.push(("Authorization".to_owned(), format!("Bearer {token}")));
        }
        self.post_with_headers(
            "/graphql/",
            &headers,
            json!({"query": query, "variables": variables})
                .to_string()
                .into_bytes(),
        )
        .await
    }

    pub async fn post_with_headers(
        &self,
        path: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> Response {
        let mut request = self
            .client
            .post(format!("{}{path}", self.address))
            .insert_header(("Content-Type", "application/json"));
        for (name, value) in headers {
            request = request.insert_header((name.as_str(), value.as_str()));
        }
        into_response(request.send_body(body).await).await
    }

    /// GET with headers; returns status, content type and body text.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
        let mut request = self.client.get(format!("{}{path}", self.address));
        for (name, value) in headers {
            request = request.insert_header((*name, *value));
        }
        let mut response = request.send().await.unwrap();
        let body = response.body().limit(16 << 20).await.unwrap();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        (
            response.status().as_u16(),
            content_type,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    /// Creates a user directly in the database (its password is never used: tokens are minted
    /// here) and returns its id and an access token.
    pub async fn user(&self, username: &str, staff: bool) -> (i64, String) {
        let user = users::create(
            &self.pool,
            NewUser {
                username: username.to_owned(),
                password_hash: "unused".into(),
                is_active: true,
                is_staff: staff,
            },
        )
        .await
        .unwrap()
        .unwrap();
        (user.id, token(user.id, username, TokenType::Access, 300))
    }

    /// A car created through the API by the owner of `token`; returns its id.
    pub async fn create_car(&self, token: &str, make: &str) -> i64 {
        let response = self
            .graphql(
                Some(token),
                "mutation($input: CarInput!) { createCar(input: $input) { id } }",
                json!({"input": {"make": make, "model": "Octavia", "variant": "Scout", "year": "2011"}}),
            )
            .await;
        assert_eq!(response.body["errors"], Value::Null, "{:?}", response.body);
        response.body["data"]["createCar"]["id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// A Redis subscriber to every event channel of this app.
    pub async fn subscribe(&self) -> Subscriber {
        Subscriber::connect(&self.redis_url, &self.redis_prefix).await
    }

    pub fn channel(&self, event_type: &str) -> String {
        format!("{}events:{event_type}", self.redis_prefix)
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

/// Signs a token as auth-service does, with `SECRET` (or `secret`), expiring in `exp_in` seconds.
pub fn token(user_id: i64, username: &str, token_type: TokenType, exp_in: i64) -> String {
    token_with_secret(SECRET, user_id, username, token_type, exp_in)
}

pub fn token_with_secret(
    secret: &str,
    user_id: i64,
    username: &str,
    token_type: TokenType,
    exp_in: i64,
) -> String {
    test_support::tokens::hs256(secret, user_id, username, token_type, exp_in)
}

/// The single error of a response: (code, message).
pub fn error_of(body: &Value) -> (String, String) {
    let errors = body["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors in {body}"));
    assert_eq!(errors.len(), 1, "{body}");
    (
        errors[0]["extensions"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned(),
        errors[0]["message"].as_str().unwrap_or("").to_owned(),
    )
}

/// A reader of every event log of this app (`<prefix>events:<type>`), from its start: a
/// follower of the app's [`events::RedisLog`], as a gateway's hub is.
pub struct Subscriber {
    prefix: String,
    events: tokio::sync::mpsc::UnboundedReceiver<(String, Value)>,
    following: tokio::task::JoinHandle<()>,
}

struct Collector {
    /// Every log, and where this reader stands in each.
    positions: std::sync::Mutex<Vec<(events::EventType, events::Position)>>,
    sender: tokio::sync::mpsc::UnboundedSender<(String, Value)>,
}

impl events::Follower for Collector {
    // One partition: the app's logs are laid out as by default.
    fn logs(&self, _: u16) -> Vec<(events::EventType, Option<events::Position>)> {
        let positions = self.positions.lock().unwrap();
        positions.iter().map(|(t, at)| (*t, Some(*at))).collect()
    }
    fn start(&self, _: events::EventType, _: u16, _: events::Position) {}
    fn changed(&self, _: u16) -> futures_util::future::BoxFuture<'_, ()> {
        Box::pin(std::future::pending())
    }
    fn entry(&self, event_type: &str, _: u16, position: events::Position, payload: &[u8]) {
        for (t, at) in self.positions.lock().unwrap().iter_mut() {
            if t.as_str() == event_type {
                *at = position;
            }
        }
        let envelope = serde_json::from_slice(payload).unwrap();
        let _ = self.sender.send((event_type.to_owned(), envelope));
    }
    fn revoked(&self, _: Result<events::Revocation, String>) {}
    fn epoch(&self, _: &str) -> bool {
        false
    }
    fn connected(&self, _: bool) {}
    // Surfaces in the test as an event of no log it expects: these tests lose nothing.
    fn lost(&self, event_type: &str, _: u16) {
        let _ = self
            .sender
            .send((format!("entries of {event_type} lost"), Value::Null));
    }
}

impl Subscriber {
    pub async fn connect(url: &str, prefix: &str) -> Subscriber {
        let args = service_kit::redis::RedisArgs {
            redis_url: url.to_owned(),
            redis_key_prefix: prefix.to_owned(),
            redis_pool_size: 2,
            redis_cluster: false,
        };
        let pool = service_kit::redis::pool(&args).unwrap();
        let log = events::RedisLog::from_args(pool, &args).unwrap();
        let (sender, events) = tokio::sync::mpsc::unbounded_channel();
        let positions = domain::registry()
            .unwrap()
            .event_types()
            .map(|t| (t, events::Position::ZERO))
            .collect();
        let following = tokio::spawn(events::EventLog::follow(
            &log,
            std::sync::Arc::new(Collector {
                positions: std::sync::Mutex::new(positions),
                sender,
            }),
        ));
        Subscriber {
            prefix: prefix.to_owned(),
            events,
            following,
        }
    }

    /// The next event as (log, envelope); fails the test after 30 s without one.
    pub async fn next(&mut self) -> (String, Value) {
        let (event_type, envelope) =
            tokio::time::timeout(Duration::from_secs(30), self.events.recv())
                .await
                .expect("no event within 30 s")
                .expect("the follower ended");
        (events::channel(&self.prefix, &event_type), envelope)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.following.abort();
    }
}
