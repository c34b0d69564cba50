//! `TestApp`: the real application, built as `main` builds it, on a free port, with its own
//! database and Redis key prefix; tokens minted here with the same secret through tokens::jwt.

#![allow(clippy::unwrap_used, dead_code)]

use std::time::Duration;

use api_service::settings::{Cli, Settings};
use api_service::startup::Application;
use clap::Parser as _;
use deadpool_redis::redis;
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

/// A reader of every event log of this app (`<prefix>events:<type>`), from its start.
pub struct Subscriber {
    connection: redis::aio::MultiplexedConnection,
    logs: Vec<(String, String)>,
    read: std::collections::VecDeque<(String, Value)>,
}

impl Subscriber {
    pub async fn connect(url: &str, prefix: &str) -> Subscriber {
        let client = redis::Client::open(url).unwrap();
        // XREAD blocks for a second; the connection's default response timeout is shorter.
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        let connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap();
        let registry = domain::registry().unwrap();
        let logs = registry
            .event_types()
            .map(|t| (events::channel(prefix, t.as_str()), "0-0".to_owned()))
            .collect();
        Subscriber {
            connection,
            logs,
            read: Default::default(),
        }
    }

    /// The next event as (log, envelope); fails the test after 30 s without one.
    pub async fn next(&mut self) -> (String, Value) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.read.is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no event within 30 s"
            );
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT")
                .arg(100)
                .arg("BLOCK")
                .arg(1000)
                .arg("STREAMS");
            for (key, _) in &self.logs {
                cmd.arg(key);
            }
            for (_, id) in &self.logs {
                cmd.arg(id);
            }
            type Reply = Option<Vec<(String, Vec<(String, Vec<(String, String)>)>)>>;
            let reply: Reply = cmd.query_async(&mut self.connection).await.unwrap();
            for (key, entries) in reply.unwrap_or_default() {
                for (id, fields) in entries {
                    if let Some(log) = self.logs.iter_mut().find(|(k, _)| *k == key) {
                        log.1 = id.clone();
                    }
                    let payload = fields
                        .into_iter()
                        .find(|(field, _)| field == events::ENTRY_FIELD)
                        .map(|(_, value)| value)
                        .unwrap_or_default();
                    self.read
                        .push_back((key.clone(), serde_json::from_str(&payload).unwrap()));
                }
            }
        }
        self.read.pop_front().unwrap()
    }
}
