//! The embedded mode's binary, `gqlws` (what the README's `cargo run --release` runs), walked
//! with the npm clients a user of GraphQL Playground or Apollo would bring: a token from
//! `/api/token/`, a subscription with `connectionParams`, `gqlws trigger-event` from a second
//! process, the update arriving; a bad token refused as the distributed stack refuses it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::client::{
    admin_tokens_at, expect_trigger_event_update, http, NodeSubscriber, CAR_1_UPDATED, PATIENCE,
};
use crate::stack::bin_dir;

/// One `gqlws` process on a free port with an SQLite file of its own; killed when dropped.
pub struct Gqlws {
    child: Child,
    pub url: String,
    database_url: String,
    dir: PathBuf,
}

impl Gqlws {
    pub async fn start() -> Gqlws {
        Gqlws::start_with(&[]).await
    }

    /// With more settings in its environment (`("KEEPALIVE_SECS", "1")`, …).
    pub async fn start_with(settings: &[(&str, &str)]) -> Gqlws {
        let binary = bin_dir().join("gqlws");
        assert!(
            binary.is_file(),
            "{} is missing: cargo build --release -p embedded (scripts/test does)",
            binary.display()
        );
        let dir = std::env::temp_dir().join(format!("gqlws-e2e-{}", test_support::random_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let database_url = format!("sqlite://{}/gqlws.db", dir.display());
        // A free port can be taken between the probe and gqlws's bind; then try another.
        for _ in 0..3 {
            let port = test_support::free_port();
            let mut child = Command::new(&binary)
                .env("GQLWS_LISTEN_ADDR", format!("127.0.0.1:{port}"))
                .env("GQLWS_DATABASE_URL", &database_url)
                .env("OUTBOX_RELAY_INTERVAL_MS", "100")
                .env("LOG_LEVEL", "warn")
                .envs(settings.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap_or_else(|err| panic!("cannot run {}: {err}", binary.display()));
            let url = format!("http://127.0.0.1:{port}");
            let deadline = Instant::now() + PATIENCE;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                let ready = http().get(format!("{url}/readyz")).send().await;
                if ready.is_ok_and(|response| response.status().is_success()) {
                    return Gqlws {
                        child,
                        url,
                        database_url,
                        dir,
                    };
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("gqlws did not become ready (see its log above)");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.url.trim_start_matches("http://").parse().unwrap()
    }

    pub fn ws_url(&self) -> String {
        format!("{}/graphql/", self.url.replacen("http://", "ws://", 1))
    }

    /// `gqlws create-user`, a second process on the server's SQLite file.
    pub fn create_user(&self, username: &str, password: &str) {
        use std::io::Write as _;
        let mut create = Command::new(bin_dir().join("gqlws"))
            .args(["create-user", "--username", username, "--password-stdin"])
            .env("GQLWS_DATABASE_URL", &self.database_url)
            .env("LOG_LEVEL", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        {
            let mut stdin = create.stdin.take().unwrap();
            writeln!(stdin, "{password}").unwrap();
        }
        assert!(
            create.wait().unwrap().success(),
            "gqlws create-user {username}"
        );
    }

    /// `gqlws trigger-event`: a second process that commits the change to the SQLite file; the
    /// server's relay publishes it.
    pub fn trigger_event(&self, pk: i64) {
        let output = Command::new(bin_dir().join("gqlws"))
            .args(["trigger-event", "--pk", &pk.to_string()])
            .env("GQLWS_DATABASE_URL", &self.database_url)
            .env("LOG_LEVEL", "warn")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "gqlws trigger-event failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Gqlws {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[actix_web::test]
async fn npm_clients_receive_trigger_event_updates_from_the_embedded_binary() {
    let gqlws = Gqlws::start().await;
    let (access, _) = admin_tokens_at(&gqlws.url).await;
    for client in ["graphql-ws", "subscriptions-transport-ws"] {
        let mut subscriber =
            NodeSubscriber::spawn(&gqlws.ws_url(), client, Some(&access), CAR_1_UPDATED, 1);
        assert_eq!(
            subscriber.next().await,
            json!({"connected": true}),
            "{client}"
        );
        expect_trigger_event_update(subscriber, client, || gqlws.trigger_event(1)).await;
    }

    // A token that is not one: graphql-ws sees 4403 with the reason.
    let mut refused = NodeSubscriber::spawn(
        &gqlws.ws_url(),
        "graphql-ws",
        Some("not.a.jwt"),
        CAR_1_UPDATED,
        1,
    );
    let line = refused.next().await;
    assert_eq!(line["error"]["close"]["code"], 4403, "{line}");
    assert_eq!(refused.wait(), Some(1));
}
