//! Subscriptions over streamed HTTP with a client people use: Apollo Client 4 with its HttpLink
//! only (`node/apollo.mjs`), whose subscriptions then go over Apollo's multipart protocol, through
//! NGINX and against the embedded binary; its queries, which ask for `@defer`'s multipart, still
//! reach api-service. And Apollo's persisted-queries link (automatic persisted queries): the
//! hash first, the document only when asked, then the hash alone for every later client.
//! (graphql-sse is walked in `resume`, the browser's EventSource in `browser`.)

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
        Self::spawn_with(base_url, access, query, &[])
    }

    fn spawn_with(base_url: &str, access: &str, query: &str, options: &[&str]) -> Apollo {
        let mut child = Command::new("node")
            .current_dir(repo_root().join("integration-tests/node"))
            .arg("apollo.mjs")
            .args(["--url", &format!("{base_url}/graphql/"), "--token", access])
            .args(["--query", query, "--count", "1"])
            .args(options)
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

/// The requests Apollo's persisted-queries link made, and the result.
async fn persisted(base_url: &str, access: &str, query: &str) -> (Value, Value) {
    let mut apollo = Apollo::spawn_with(base_url, access, query, &["--persisted"]);
    let requests = apollo
        .next_within(PATIENCE)
        .await
        .expect("nothing from apollo.mjs");
    let result = apollo.next_within(PATIENCE).await.expect("no result");
    assert_eq!(apollo.exit_code(), Some(0), "{requests} {result}");
    (requests["requests"].clone(), result)
}

async fn persisted_queries(base_url: &str) {
    let (access, _) = admin_tokens_at(base_url).await;
    // Documents of this run only, so that no earlier run registered them.
    let run = test_support::random_suffix();
    let query = format!("query Hi{run} {{ hi }}");
    let mutation = format!(
        "mutation Model{run} {{ updateCar(pk: 2, input: {{variant: \"apq-{run}\"}}) {{ variant }} }}"
    );
    let asked_then_sent = json!([
        {"hashOnly": true, "code": "PERSISTED_QUERY_NOT_FOUND"},
        {"hashOnly": false, "code": null}
    ]);
    for (document, field, value) in [
        (&query, "hi", json!("Hi!")),
        (
            &mutation,
            "updateCar",
            json!({"__typename": "Car", "variant": format!("apq-{run}")}),
        ),
    ] {
        let (requests, result) = persisted(base_url, &access, document).await;
        assert_eq!(requests, asked_then_sent, "{document}");
        assert_eq!(result["data"][field], value, "{result}");
        // A later client (another process) sends the hash alone, and it is known.
        let (requests, result) = persisted(base_url, &access, document).await;
        assert_eq!(
            requests,
            json!([{"hashOnly": true, "code": null}]),
            "{document}"
        );
        assert_eq!(result["data"][field], value, "{result}");
    }
}

#[actix_web::test]
async fn apollo_persisted_queries_link_through_nginx() {
    persisted_queries(&Stack::shared().url).await;
}

#[actix_web::test]
async fn apollo_persisted_queries_link_in_the_embedded_mode() {
    let gqlws = Gqlws::start().await;
    persisted_queries(&gqlws.url).await;
}

/// A manifest of one operation, `query Hi { hi }` as Apollo's link prints it; its path.
fn trusted_manifest(dir: &std::path::Path) -> std::path::PathBuf {
    let hi = "query Hi {\n  hi\n}";
    let manifest = dir.join("manifest.json");
    std::fs::write(
        &manifest,
        json!({"format": "apollo-persisted-query-manifest", "version": 1, "operations": [
            {"id": graphql_schema::persisted::sha256_hex(hi), "name": "Hi", "type": "query", "body": hi}]})
        .to_string(),
    )
    .unwrap();
    manifest
}

/// Trusted documents only: the manifest's operation runs by hash alone, anything else is
/// refused, with Apollo's persisted-queries link as the client.
async fn trusted_only(base_url: &str) {
    let (access, _) = admin_tokens_at(base_url).await;
    let (requests, result) = persisted(base_url, &access, "query Hi { hi }").await;
    assert_eq!(requests, json!([{"hashOnly": true, "code": null}]));
    assert_eq!(result["data"]["hi"], "Hi!");
    let mut refused =
        Apollo::spawn_with(base_url, &access, "{ me { username } }", &["--persisted"]);
    let line = refused
        .next_within(PATIENCE)
        .await
        .expect("nothing from apollo.mjs");
    assert!(
        line["error"]
            .as_str()
            .is_some_and(|e| e.contains("trusted documents only")),
        "{line}"
    );
    assert_eq!(refused.exit_code(), Some(1));
}

#[actix_web::test]
async fn trusted_documents_only_through_nginx() {
    let dir = std::env::temp_dir().join(format!(
        "gqlws-trusted-e2e-{}",
        test_support::random_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = trusted_manifest(&dir);
    let stack = Stack::start_with(
        "trusted",
        &test_support::redis_url(),
        &[("TRUSTED_DOCUMENTS", manifest.to_str().unwrap())],
    );
    trusted_only(&stack.url).await;
    drop(stack);
    let _ = std::fs::remove_dir_all(&dir);
}

#[actix_web::test]
async fn trusted_documents_only_in_the_embedded_mode() {
    let dir = std::env::temp_dir().join(format!(
        "gqlws-trusted-e2e-{}",
        test_support::random_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = trusted_manifest(&dir);
    let gqlws = Gqlws::start_with(&[("TRUSTED_DOCUMENTS", manifest.to_str().unwrap())]).await;
    trusted_only(&gqlws.url).await;
    drop(gqlws);
    let _ = std::fs::remove_dir_all(&dir);
}
