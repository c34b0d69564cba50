//! Test harness shared by the integration tests of every service. Real services only:
//!
//! - `TestDb` (feature `database`, which the gateway's tests leave off, so that
//!   `cargo test -p subscription-gateway` builds no diesel): a PostgreSQL database of its own per test, cloned from a template that is migrated
//!   once per migration set (`CREATE DATABASE … TEMPLATE …` takes milliseconds), dropped on `Drop`.
//! - [`redis_url`] and [`unique_prefix`]: the shared Redis, with a key prefix per test.
//! - [`PrivateRedis`]: a `redis-server` process of the test's own on a free port, for tests that
//!   stop and restart Redis.
//! - [`Response`] and [`into_response`]: an HTTP answer read whole, its body as JSON.
//! - [`tokens`]: tokens signed as auth-service signs them.
//! - [`ws::WsClient`]: a websocket client (awc's) for the servers that speak the subscription
//!   protocols.
//!
//! Settings: `TEST_DATABASE_URL` (an admin connection, default
//! `postgres://postgres@127.0.0.1:5432/postgres`), `TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379/0`), `REDIS_SERVER` (the binary, default `redis-server`).

#![allow(clippy::unwrap_used)] // A test harness should fail loudly and at once.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[cfg(feature = "database")]
mod database;
pub mod tokens;
pub mod ws;

#[cfg(feature = "database")]
pub use database::{with_database, TestDb};

/// The admin connection, with `sslmode=disable` added when the URL names no `sslmode`.
///
/// Why: libpq's default (`prefer`) negotiates TLS with a server that offers it (Debian's does),
/// which initialises OpenSSL and registers its `atexit` clean-up. A test process ends with r2d2's
/// worker threads of earlier tests still retrying connections to databases those tests dropped;
/// one of them inside a TLS handshake while `exit` frees OpenSSL's state aborted a CI run with
/// "double free or corruption". Loopback test connections gain nothing from TLS.
pub fn admin_url() -> String {
    let url = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    without_tls(url)
}

fn without_tls(url: String) -> String {
    if url.contains("sslmode=") || url.starts_with("sqlite:") {
        return url;
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}sslmode=disable")
}

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_owned())
}

/// A key prefix no other test uses, so tests can share one Redis.
pub fn unique_prefix(label: &str) -> String {
    format!("test:{label}:{}:", random_suffix())
}

pub fn random_suffix() -> String {
    use rand::Rng as _;
    let n: u64 = rand::thread_rng().gen();
    format!("{n:016x}")
}

/// `text` percent-encoded for a URL's query string (everything but RFC 3986's unreserved
/// characters).
pub fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A port that was free a moment ago (for processes that must be told a port up front).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` of the test's own. Killed on drop.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
    /// Where a persistent one keeps its snapshot (`None`: nothing survives a restart).
    dir: Option<std::path::PathBuf>,
}

impl PrivateRedis {
    pub fn start() -> Self {
        let port = free_port();
        let mut redis = Self {
            port,
            child: None,
            dir: None,
        };
        redis.restart();
        redis
    }

    /// One that saves its data on `SHUTDOWN` and loads it at start, as a packaged Redis does.
    pub fn start_persistent() -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("redis-{port}-{}", random_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = Self {
            port,
            child: None,
            dir: Some(dir),
        };
        redis.restart();
        redis
    }

    /// `SHUTDOWN SAVE` (what `systemctl restart redis` does), `down` without a server, then
    /// the server again on the same port with the saved data.
    pub fn restart_gracefully(&mut self, down: Duration) {
        let _ = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "SHUTDOWN", "SAVE"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        std::thread::sleep(down);
        self.restart();
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (SIGKILL: the harshest way Redis goes away).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and waits until it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
        let mut command = Command::new(&binary);
        command.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--appendonly",
            "no",
        ]);
        match &self.dir {
            Some(dir) => command.arg("--dir").arg(dir).args(["--save", "3600 1"]),
            None => command.args(["--save", ""]),
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {binary}: {err}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An HTTP answer read whole: status, headers and the body parsed as JSON (`Null` when empty).
pub struct Response {
    pub status: u16,
    pub headers: actix_web::http::header::HeaderMap,
    pub body: serde_json::Value,
}

/// Reads an awc response into a [`Response`]; panics with the body when it is not JSON.
pub async fn into_response(
    response: Result<awc::ClientResponse, awc::error::SendRequestError>,
) -> Response {
    let mut response = response.unwrap();
    let bytes = response.body().limit(1 << 20).await.unwrap();
    let body = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("response is not JSON: {}", String::from_utf8_lossy(&bytes)))
    };
    Response {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body,
    }
}
