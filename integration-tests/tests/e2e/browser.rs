//! The walk-through in a real browser: Debian's chromium, driven by playwright-core
//! (`node/browser.mjs`), on GraphQL Playground and on GraphiQL as the stack serves them, through
//! NGINX and in the embedded mode. HTTP headers set in the page, `{ hi }` answered "Hi!", a subscription shown
//! receiving trigger-event's update; and no request to any other host (the IDE's code is served
//! by api-service itself), no page or console error (the Content-Security-Policy refuses what it
//! does not allow, which shows there). Screenshots go to target/e2e/screenshots/<mode>/.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::client::admin_tokens_at;
use crate::embedded::Gqlws;
use crate::stack::{repo_root, Stack};

struct Browser {
    child: Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<Value>,
}

impl Browser {
    fn open(base_url: &str, access: &str, ide: &str, mode: &str) -> Browser {
        let node_dir = repo_root().join("integration-tests/node");
        assert!(
            node_dir.join("node_modules/playwright-core").is_dir(),
            "playwright-core is not installed: run `npm ci` in {} (scripts/test does)",
            node_dir.display()
        );
        let shots = repo_root().join("target/e2e/screenshots").join(mode);
        std::fs::create_dir_all(&shots).unwrap();
        let mut child = Command::new("node")
            .current_dir(&node_dir)
            .arg("browser.mjs")
            .args(["--base", base_url, "--token", access, "--ide", ide])
            .arg("--shots")
            .arg(&shots)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot run node: {err}"));
        let lines = crate::client::json_lines(child.stdout.take().unwrap());
        Browser { child, lines }
    }

    async fn next_within(&mut self, wait: Duration) -> Option<Value> {
        tokio::time::timeout(wait, self.lines.recv())
            .await
            .ok()
            .flatten()
    }

    async fn next(&mut self, what: &str) -> Value {
        self.next_within(Duration::from_secs(90))
            .await
            .unwrap_or_else(|| panic!("the browser said nothing about {what}"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// In `ide`: headers, `{ hi }`, then the subscription shown receiving `trigger`'s updates.
async fn walk_through(base_url: &str, ide: &str, mode: &str, trigger: impl Fn()) {
    let (access, _) = admin_tokens_at(base_url).await;
    let mut browser = Browser::open(base_url, &access, ide, mode);
    let mode = format!("{ide} {mode}");
    let mode = mode.as_str();
    let hi = browser.next("{ hi }").await;
    assert!(
        hi["hi"].as_str().is_some_and(|pane| pane.contains("Hi!")),
        "{mode}: {hi}"
    );
    let listening = browser.next("the subscription").await;
    assert_eq!(listening, json!({"listening": true}), "{mode}");
    // The protocol does not acknowledge a subscription: trigger until the page shows one.
    let mut update = None;
    for _ in 0..30 {
        trigger();
        if let Some(line) = browser.next_within(Duration::from_secs(2)).await {
            update = Some(line);
            break;
        }
    }
    let update = update.unwrap_or_else(|| panic!("{mode}: the page showed no update"));
    let pane = update["update"]
        .as_str()
        .unwrap_or_else(|| panic!("{mode}: {update}"));
    assert!(
        pane.contains(r#""carModelUpdated""#) && pane.contains(r#""model""#),
        "{pane}"
    );
    let end = browser.next("the end").await;
    assert_eq!(end, json!({"offsite": [], "errors": []}), "{mode}");
    assert_eq!(browser.child.wait().unwrap().code(), Some(0), "{mode}");
}

async fn through_nginx(ide: &str) {
    let stack = Stack::shared();
    walk_through(&stack.url, ide, "nginx", || {
        crate::client::trigger_event(stack, 1);
    })
    .await;
}

async fn in_the_embedded_mode(ide: &str) {
    let gqlws = Gqlws::start().await;
    walk_through(&gqlws.url, ide, "embedded", || gqlws.trigger_event(1)).await;
}

#[actix_web::test]
async fn playground_in_chromium_through_nginx() {
    through_nginx("playground").await;
}

#[actix_web::test]
async fn playground_in_chromium_in_the_embedded_mode() {
    in_the_embedded_mode("playground").await;
}

#[actix_web::test]
async fn graphiql_in_chromium_through_nginx() {
    through_nginx("graphiql").await;
}

#[actix_web::test]
async fn graphiql_in_chromium_in_the_embedded_mode() {
    in_the_embedded_mode("graphiql").await;
}

/// The browser's own `EventSource` on the stack's origin, GraphQL over SSE by GET.
#[actix_web::test]
async fn eventsource_in_chromium_through_nginx() {
    through_nginx("eventsource").await;
}

#[actix_web::test]
async fn eventsource_in_chromium_in_the_embedded_mode() {
    in_the_embedded_mode("eventsource").await;
}
