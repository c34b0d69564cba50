//! `TestGateway`: the real application on a free port. The websocket client is
//! `test_support::ws::WsClient`.

#![allow(dead_code)]

use std::time::Duration;

use clap::Parser as _;
use domain::Car;
use domain::Record as _;
use events::{Envelope, EventLog as _, EventType, RedisLog};
use subscription_gateway::settings::Cli;
use subscription_gateway::startup::Application;
pub use test_support::ws::{Incoming, WsClient};
use tokens::jwt::TokenType;

pub const CAR_CREATED: EventType = Car::EVENTS.created;
pub const CAR_UPDATED: EventType = Car::EVENTS.updated;
pub const CAR_DELETED: EventType = Car::EVENTS.deleted;

pub const SECRET: &str = "gateway-test-secret-0123456789-0123456789";

pub struct TestGateway {
    pub port: u16,
    /// HEALTH_LISTEN_ADDR's port, when the gateway was given one.
    pub health_port: Option<u16>,
    pub prefix: String,
    pub redis_url: String,
    bus: RedisLog,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub stopped: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl TestGateway {
    pub async fn spawn(extra: &[&str]) -> TestGateway {
        Self::spawn_on(&test_support::redis_url(), extra).await
    }

    pub async fn spawn_on(redis_url: &str, extra: &[&str]) -> TestGateway {
        let prefix = test_support::unique_prefix("gw");
        let mut args: Vec<String> = vec![
            "subscription-gateway".into(),
            "--listen-addr=127.0.0.1:0".into(),
            format!("--redis-url={redis_url}"),
            format!("--redis-key-prefix={prefix}"),
            format!("--jwt-secret={SECRET}"),
            "--jwt-leeway-secs=0".into(),
            "--http-workers=1".into(),
            "--log-level=warn".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let settings = Cli::try_parse_from(&args).unwrap().settings;
        if std::env::var("TEST_LOG").is_ok() {
            let _ = service_kit::telemetry::init(&settings.log, "test");
        }
        let redis = service_kit::redis::pool(&settings.redis).unwrap();
        let app = Application::build(settings).await.unwrap();
        let port = app.port();
        let health_port = app.health_port();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        actix_web::rt::spawn(async move {
            let _ = app
                .run_until_stopped(async {
                    let _ = stop_rx.await;
                })
                .await;
            let _ = done_tx.send(());
        });
        let gateway = TestGateway {
            port,
            health_port,
            bus: RedisLog::new(redis, prefix.clone()),
            prefix,
            redis_url: redis_url.to_owned(),
            stop: Some(stop),
            stopped: Some(done_rx),
        };
        gateway.wait_ready().await;
        gateway
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/graphql/", self.port)
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let mut response = awc::Client::default()
            .get(format!("http://127.0.0.1:{}{path}", self.port))
            .send()
            .await
            .unwrap();
        let body = response.body().await.unwrap();
        (
            response.status().as_u16(),
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    /// Waits until the Redis subscriber is up (so no published event is missed).
    pub async fn wait_ready(&self) {
        for _ in 0..200 {
            if self.get("/readyz").await.0 == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("gateway did not become ready");
    }

    /// Starts the drain as SIGTERM would.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Publishes an event as api-service's write path does.
    pub async fn publish(&self, event_type: EventType, car: Car) -> Envelope<Car> {
        let envelope = Envelope::new(event_type, car);
        self.publish_envelope(&envelope).await;
        envelope
    }

    pub async fn publish_envelope(&self, envelope: &Envelope<Car>) {
        let payload = serde_json::to_string(envelope).unwrap();
        self.bus
            .append(&envelope.event_type, &payload)
            .await
            .unwrap();
    }

    /// Publishes `cars` in one pipeline, as fast as Redis takes them: the hub reads them in
    /// large batches, as it does under a burst of writes.
    pub async fn publish_burst(&self, event_type: EventType, cars: Vec<Car>) {
        self.burst(event_type, cars, None).await;
    }

    /// Car `pk`'s burst of `count` updates and a trim of the log to its newest `keep`, in one
    /// transaction: what a hub that is behind by the retention finds when it reads on.
    pub async fn burst_trimmed(&self, pk: i64, count: i64, keep: u64) {
        let cars = (0..count).map(|n| car(pk, &format!("m{n}"))).collect();
        self.burst(CAR_UPDATED, cars, Some(keep)).await;
    }

    /// `cars` appended in one pipeline; with `trim_to`, then trimmed, all in one transaction.
    async fn burst(&self, event_type: EventType, cars: Vec<Car>, trim_to: Option<u64>) {
        let pool = service_kit::redis::pool(&redis_args(&self.redis_url)).unwrap();
        let key = events::channel(&self.prefix, event_type.as_str());
        let mut pipe = deadpool_redis::redis::pipe();
        for car in cars {
            let payload = serde_json::to_string(&Envelope::new(event_type, car)).unwrap();
            pipe.cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg(events::ENTRY_FIELD)
                .arg(payload)
                .ignore();
        }
        if let Some(keep) = trim_to {
            pipe.atomic();
            pipe.cmd("XTRIM").arg(&key).arg("MAXLEN").arg(keep).ignore();
        }
        service_kit::redis::query::<()>(&pool, &pipe).await.unwrap();
    }

    /// Car `pk`'s burst of `count` updates, as [`TestGateway::publish_burst`].
    pub async fn burst_on(&self, pk: i64, count: i64) {
        let cars = (0..count).map(|n| car(pk, &format!("m{n}"))).collect();
        self.publish_burst(CAR_UPDATED, cars).await;
    }

    pub async fn publish_raw(&self, channel_suffix: &str, payload: &str) {
        let pool = service_kit::redis::pool(&redis_args(&self.redis_url)).unwrap();
        let append = events::append_command(
            &format!("{}{channel_suffix}", self.prefix),
            payload,
            events::Retention::default(),
        );
        service_kit::redis::query::<(String,)>(&pool, &append)
            .await
            .unwrap();
    }

    /// Lets the hub start reading a log after a client subscribed (it is asynchronous).
    pub async fn settle(&self) {
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.begin_shutdown();
    }
}

fn redis_args(url: &str) -> service_kit::redis::RedisArgs {
    Cli::try_parse_from(["x", &format!("--redis-url={url}")])
        .unwrap()
        .settings
        .redis
}

pub fn car(id: i64, make: &str) -> Car {
    Car {
        id,
        make: make.into(),
        model: "Octavia".into(),
        variant: "Scout".into(),
        year: "2011".into(),
        private: false,
        owner: None,
    }
}

/// A token as auth-service would issue it, expiring `lifetime_secs` from now.
pub fn token(user_id: i64, token_type: TokenType, lifetime_secs: i64) -> String {
    test_support::tokens::hs256(
        SECRET,
        user_id,
        &format!("user{user_id}"),
        token_type,
        lifetime_secs,
    )
}

pub fn access(user_id: i64) -> String {
    token(user_id, TokenType::Access, 300)
}

pub const MODEL_UPDATED: &str = "subscription { carModelUpdated(pk: 1) { id make model } }";

/// Reads results until the socket closes; the close code.
pub async fn close_code_after_results(client: &mut WsClient) -> Option<u16> {
    loop {
        match client.answer().await {
            Incoming::Json(message) if message["type"] == "next" => {}
            Incoming::Close(code, _) => return code,
            other => panic!("{other:?}"),
        }
    }
}
