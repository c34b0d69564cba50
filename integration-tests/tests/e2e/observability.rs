//! Operations as shipped: Debian's Prometheus scrapes a native stack with
//! `deploy/prometheus/native.yml` (its ports rewritten to the stack's, its interval to a second)
//! and loads the alert rules beside it; after a login, a refused login, a query, a mutation, a
//! delivered subscription result and a closed socket, every query of the shipped Grafana
//! dashboard (`deploy/prometheus/dashboard.json`) returns data.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::{
    admin_tokens, create_car, graphql, http, post_token, update_make, ws_subscribed,
};
use crate::stack::{repo_root, Stack};

/// Prometheus, stopped with the test.
struct Prometheus {
    child: Child,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// The shipped native configuration and rules, pointed at `stack`.
    fn scraping(stack: &Stack) -> Prometheus {
        let shipped = repo_root().join("deploy/prometheus");
        let dir = stack.dir.join("prometheus");
        std::fs::create_dir_all(&dir).unwrap();
        let target = |port: u16| format!("127.0.0.1:{port}");
        let config = std::fs::read_to_string(shipped.join("native.yml"))
            .unwrap()
            .replace("127.0.0.1:8001", &target(stack.auth_port))
            .replace("127.0.0.1:8002", &target(stack.api_ports[0]))
            .replace("127.0.0.1:8012", &target(stack.api_ports[1]))
            .replace("127.0.0.1:8003", &target(stack.gateway_ports[0]))
            .replace("127.0.0.1:8013", &target(stack.gateway_ports[1]))
            .replace("scrape_interval: 15s", "scrape_interval: 1s")
            .replace("evaluation_interval: 15s", "evaluation_interval: 1s");
        std::fs::write(dir.join("native.yml"), config).unwrap();
        std::fs::copy(shipped.join("alerts.yml"), dir.join("alerts.yml")).unwrap();
        let port = test_support::free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("native.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian's package; scripts/test installs it)");
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// The result of an instant query (`data.result`); `Err` with Prometheus's answer.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let url = format!(
            "{}/api/v1/query?query={}",
            self.url,
            test_support::urlencode(expr)
        );
        let mut response = http()
            .get(url)
            .send()
            .await
            .map_err(|err| err.to_string())?;
        let body: Value = response
            .json()
            .limit(1 << 22)
            .await
            .map_err(|err| err.to_string())?;
        match body["data"]["result"].as_array() {
            Some(result) if body["status"] == "success" => Ok(result.clone()),
            _ => Err(body.to_string()),
        }
    }

    /// Waits until `expr` returns at least `count` series.
    async fn until(&self, expr: &str, count: usize) -> Result<Vec<Value>, String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let answer = self.query(expr).await;
            match &answer {
                Ok(result) if result.len() >= count => return answer,
                _ if Instant::now() > deadline => {
                    return Err(format!("{expr}: {answer:?} after 60 s"));
                }
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }
}

/// Every query of the dashboard's panels.
fn dashboard_queries(path: &Path) -> Vec<(String, String)> {
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queries.push((
                panel["title"].as_str().unwrap().to_owned(),
                target["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    queries
}

/// What the panels show: logins (one refused), a query, a car's creation and update, and a
/// subscriber that receives the update and goes away.
async fn traffic(stack: &Stack) {
    let (access, _) = admin_tokens(stack).await;
    let (status, _) = post_token(&stack.url, "admin", "not-the-password").await;
    assert_eq!(status, 401);
    let bearer = format!("Bearer {access}");
    assert_eq!(
        graphql(stack, Some(&bearer), "{ hi }", Value::Null).await["data"]["hi"],
        "Hi!"
    );
    let pk = create_car(stack, &access, "Observed").await;
    let query = format!("subscription {{ carModelUpdated(pk: {pk}) {{ make }} }}");
    let mut client = ws_subscribed(stack, "graphql-transport-ws", &access, &query).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    update_make(stack, &access, &pk, "Observed again").await;
    let next = client.expect_json().await;
    assert_eq!(
        next["payload"]["data"]["carModelUpdated"]["make"], "Observed again",
        "{next}"
    );
    client.send(json!({"id": "1", "type": "complete"})).await;
    drop(client);
}

#[actix_web::test]
async fn prometheus_scrapes_the_stack_and_every_dashboard_query_returns_data() {
    let stack = Stack::shared();
    let prometheus = Prometheus::scraping(stack);
    // Every replica up: one auth, two api, two gateway.
    let up = prometheus.until("up == 1", 5).await.unwrap();
    assert_eq!(up.len(), 5, "{up:?}");
    let rules = http()
        .get(format!("{}/api/v1/rules", prometheus.url))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .limit(1 << 22)
        .await
        .unwrap();
    let groups = rules["data"]["groups"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!groups.is_empty(), "the shipped rules are loaded: {rules}");

    // Twice, a few scrapes apart, so that every rate has two samples to differ by.
    traffic(stack).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    traffic(stack).await;

    let mut failures = Vec::new();
    let queries = dashboard_queries(&repo_root().join("deploy/prometheus/dashboard.json"));
    assert!(queries.len() >= 15, "{queries:?}");
    for (title, expr) in &queries {
        if let Err(err) = prometheus.until(expr, 1).await {
            failures.push(format!("{title}: {err}"));
        }
    }
    assert!(
        failures.is_empty(),
        "dashboard queries without data:\n{}",
        failures.join("\n")
    );
}
