//! Subscriptions over streamed HTTP with a client people use: Apollo Client 4 with its HttpLink
//! only (`node/apollo.mjs`), whose subscriptions then go over Apollo's multipart protocol, through
//! NGINX and against the embedded binary; its queries, which ask for `@defer`'s multipart, still
//! reach api-service. (graphql-sse is walked in `resume`, the browser's EventSource in `browser`.)

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::client::{
    admin_tokens_at, json_lines, trigger_event, CAR_1_UPDATED, PATIENCE, TRIGGER_MAKES,
};
use crate::embedded::Gqlws;
use crate::stack::{repo_root, Stack};

/// One run of `node/apollo.mjs`.
struct Apollo {
    child: Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<Value>,
}

impl Apollo {
    fn spawn(base_url: &str, access: &str, query: &str) -> Apollo {
        let mut child = Command::new("node")
            .current_dir(repo_root().join("integration-tests/node"))
            .arg("apollo.mjs")
            .args(["--url", &format!("{base_url}/graphql/"), "--token", access])
            .args(["--query", query, "--count", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot run node: {err}"));
        let lines = json_lines(child.stdout.take().unwrap());
        Apollo { child, lines }
    }

    async fn next_within(&mut self, wait: Duration) -> Option<Value> {
        tokio::time::timeout(wait, self.lines.recv())
            .await
            .ok()
            .flatten()
    }

    fn exit_code(mut self) -> Option<i32> {
        self.child.wait().unwrap().code()
    }
}

impl Drop for Apollo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn apollo_client(base_url: &str, trigger: impl Fn()) {
    let (access, _) = admin_tokens_at(base_url).await;
    // A query: HttpLink asks for multipart (`deferSpec`) and gets api-service's JSON.
    let mut query = Apollo::spawn(base_url, &access, "{ hi }");
    let line = query
        .next_within(PATIENCE)
        .await
        .expect("no answer to { hi }");
    assert_eq!(line, json!({"data": {"hi": "Hi!"}}));
    assert_eq!(query.exit_code(), Some(0));

    let mut subscription = Apollo::spawn(base_url, &access, CAR_1_UPDATED);
    let line = subscription
        .next_within(PATIENCE)
        .await
        .expect("nothing from apollo.mjs");
    assert_eq!(line, json!({"subscribed": true}));
    // Nothing acknowledges a subscription: trigger until a result arrives.
    let mut result = None;
    for _ in 0..30 {
        trigger();
        if let Some(line) = subscription.next_within(Duration::from_secs(2)).await {
            result = Some(line);
            break;
        }
    }
    let result = result.expect("Apollo Client received no update over multipart");
    let make = result["data"]["carModelUpdated"]["make"]
        .as_str()
        .unwrap_or_else(|| panic!("{result}"));
    assert!(TRIGGER_MAKES.contains(&make), "{result}");
    assert_eq!(result["data"]["carModelUpdated"]["id"], "1");
    assert_eq!(subscription.exit_code(), Some(0));
}

#[actix_web::test]
async fn apollo_client_subscribes_over_multipart_through_nginx() {
    let stack = Stack::shared();
    apollo_client(&stack.url, || {
        trigger_event(stack, 1);
    })
    .await;
}

#[actix_web::test]
async fn apollo_client_subscribes_over_multipart_in_the_embedded_mode() {
    let gqlws = Gqlws::start().await;
    apollo_client(&gqlws.url, || gqlws.trigger_event(1)).await;
}
