//! What the tests do to a stack, through NGINX only: REST and GraphQL over HTTP (awc), the Rust
//! websocket client (awc, both subprotocols), the npm clients of `node/` as child processes, and
//! `trigger-event` as the operator runs it.

use std::io::BufRead as _;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::stack::{bin_dir, repo_root, Stack};

/// The reference's subscription (step 4).
pub const CAR_1_UPDATED: &str = "subscription { carModelUpdated(pk: 1) { id make model } }";

/// The makes `trigger-event` picks from (the reference's `trigger_event.py`).
pub const TRIGGER_MAKES: [&str; 3] = ["Skoda", "Skoda Autogroup", "Skoda (VAG)"];

/// A safety net only: no test asserts on how fast anything is.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub fn http() -> awc::Client {
    awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .finish()
}

/// `POST /api/token/` on `base_url` (a stack's NGINX, or gqlws): the status and the JSON body.
pub async fn post_token(base_url: &str, username: &str, password: &str) -> (u16, Value) {
    let mut response = http()
        .post(format!("{base_url}/api/token/"))
        .send_json(&json!({"username": username, "password": password}))
        .await
        .unwrap();
    let body = response.body().await.unwrap();
    (
        response.status().as_u16(),
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

/// A release binary of the stack's (`api-service`, `auth-service`, `subscription-gateway`)
/// with the stack's database, Redis and key prefix, as an operator runs one beside it.
pub fn stack_command(stack: &Stack, binary: &str) -> Command {
    let mut command = Command::new(bin_dir().join(binary));
    command
        .env("DATABASE_URL", &stack.database_url)
        .env("REDIS_URL", &stack.redis_url)
        .env("REDIS_KEY_PREFIX", &stack.redis_prefix)
        .env("DEMO", "true")
        .env("MIGRATE", "false")
        .env("LOG_LEVEL", "warn")
        .envs(stack.settings.iter().map(|(n, v)| (n, v)));
    command
}

/// The password of the users [`new_user`] creates.
pub const USER_PASSWORD: &str = "e2e-user-pass-1";

/// A user of the test's own (`label-<random>`, password [`USER_PASSWORD`]), so that what a test
/// does to it (a logout, a flood) touches no other test.
pub fn new_user(stack: &Stack, label: &str) -> String {
    let username = format!("{label}-{}", test_support::random_suffix());
    create_user(stack, &username, USER_PASSWORD);
    username
}

/// `auth-service create-user` with the stack's database (the operator's command).
pub fn create_user(stack: &Stack, username: &str, password: &str) {
    use std::io::Write as _;
    let mut create = stack_command(stack, "auth-service")
        .args(["create-user", "--username", username, "--password-stdin"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = create.stdin.take().unwrap();
        writeln!(stdin, "{password}").unwrap();
    }
    assert!(create.wait().unwrap().success(), "create-user {username}");
}

/// `auth-service deactivate-user` with the stack's database and Redis.
pub fn deactivate_user(stack: &Stack, username: &str) {
    let output = stack_command(stack, "auth-service")
        .args(["deactivate-user", "--username", username])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
}

/// A user's token pair through NGINX: `(access, refresh)`.
pub async fn tokens_of(stack: &Stack, username: &str, password: &str) -> (String, String) {
    let (status, body) = post_token(&stack.url, username, password).await;
    assert_eq!(status, 200, "{body}");
    (
        body["access"].as_str().unwrap().to_owned(),
        body["refresh"].as_str().unwrap().to_owned(),
    )
}

/// The demo user's token pair (step 2 of the reference): `(access, refresh)`.
pub async fn admin_tokens(stack: &Stack) -> (String, String) {
    admin_tokens_at(&stack.url).await
}

/// [`admin_tokens`] from any server with the token endpoints.
pub async fn admin_tokens_at(base_url: &str) -> (String, String) {
    let (status, body) = post_token(base_url, "admin", "letmein").await;
    assert_eq!(status, 200, "{body}");
    (
        body["access"].as_str().unwrap().to_owned(),
        body["refresh"].as_str().unwrap().to_owned(),
    )
}

/// `POST /graphql/` with an optional `Authorization` header value; the JSON answer.
pub async fn graphql(
    stack: &Stack,
    authorization: Option<&str>,
    query: &str,
    variables: Value,
) -> Value {
    let mut request = http().post(format!("{}/graphql/", stack.url));
    if let Some(value) = authorization {
        request = request.insert_header(("Authorization", value));
    }
    let mut response = request
        .send_json(&json!({"query": query, "variables": variables}))
        .await
        .unwrap();
    let body = response.body().await.unwrap();
    serde_json::from_slice(&body).unwrap_or_else(|err| {
        panic!(
            "{} from /graphql/ is not JSON ({err}): {}",
            response.status(),
            String::from_utf8_lossy(&body)
        )
    })
}

/// A car of the test's own, so that its events are not mixed with another test's.
pub async fn create_car(stack: &Stack, access: &str, make: &str) -> String {
    let answer = graphql(
        stack,
        Some(&format!("Bearer {access}")),
        "mutation($make: String!) { createCar(input: {make: $make, model: \"Octavia\"}) { id } }",
        json!({"make": make}),
    )
    .await;
    answer["data"]["createCar"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("createCar: {answer}"))
        .to_owned()
}

pub async fn update_make(stack: &Stack, access: &str, pk: &str, make: &str) {
    let answer = graphql(
        stack,
        Some(&format!("Bearer {access}")),
        "mutation($pk: ID!, $make: String!) { updateCar(pk: $pk, input: {make: $make}) { id make } }",
        json!({"pk": pk, "make": make}),
    )
    .await;
    assert_eq!(answer["data"]["updateCar"]["make"], make, "{answer}");
}

/// `api-service trigger-event --pk <pk>`, the real binary with the stack's settings (step 5).
pub fn trigger_event(stack: &Stack, pk: i64) -> String {
    succeeded(
        "trigger-event",
        stack_command(stack, "api-service").args(["trigger-event", "--pk", &pk.to_string()]),
    )
}

/// Runs `command` to its end; its standard output, or a panic naming `what` with everything
/// it printed.
pub fn succeeded(what: &str, command: &mut Command) -> String {
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Tokens the stack must refuse, with a word its error message contains: `(label, token, word)`.
/// `refresh` is a real refresh token (never accepted where an access token belongs).
pub fn bad_tokens(access: &str, refresh: &str) -> Vec<(&'static str, String, &'static str)> {
    vec![
        ("garbage", "not.a.jwt".to_owned(), "malformed"),
        ("expired", resigned(access, -600, None), "expired"),
        (
            "wrongly signed",
            resigned(
                access,
                300,
                Some("another-secret-0123456789-0123456789-xyz"),
            ),
            "signature",
        ),
        ("refresh token", refresh.to_owned(), "refresh"),
    ]
}

/// `access` with its lifetime moved to `exp_in_secs` from now, signed with the demo secret
/// (what the stack verifies with) or with `secret`.
fn resigned(access: &str, exp_in_secs: i64, secret: Option<&str>) -> String {
    let now = chrono::Utc::now().timestamp();
    resigned_with(
        access,
        json!({"exp": now + exp_in_secs, "iat": now + exp_in_secs - 300}),
        secret,
    )
}

/// The claims of a token, read without verifying it.
pub fn claims_of(token: &str) -> Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// `access` with the claims in `changes` replaced, signed with the demo secret or `secret`.
pub fn resigned_with(access: &str, changes: Value, secret: Option<&str>) -> String {
    use base64::Engine as _;
    let decode = |part: &str| -> Value {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    };
    let mut parts = access.split('.');
    let header = decode(parts.next().unwrap());
    let mut claims = decode(parts.next().unwrap());
    for (name, value) in changes.as_object().unwrap() {
        claims[name] = value.clone();
    }
    let secret = secret.unwrap_or(tokens::jwt::DEMO_SECRET);
    test_support::tokens::forge_hs256(secret.as_bytes(), header["kid"].as_str(), &claims)
}

pub use test_support::ws::{Incoming, WsClient};

/// Connects through NGINX; `Err` with the reason when the handshake fails.
pub async fn ws_connect(stack: &Stack, protocol: &str) -> Result<WsClient, String> {
    WsClient::connect_or_error(&stack.ws_url(), protocol).await
}

/// Connects through NGINX, authenticates and subscribes; panics when any step is refused.
pub async fn ws_subscribed(stack: &Stack, protocol: &str, token: &str, query: &str) -> WsClient {
    let mut client = ws_connect(stack, protocol).await.unwrap();
    match client.init_answer(token).await {
        Incoming::Json(ack) if ack["type"] == "connection_ack" => {}
        other => panic!("{protocol}: expected connection_ack, got {other:?}"),
    }
    client.subscribe("1", query).await;
    client
}

/// A node script's output, a JSON object a line, delivered as the lines come (a line that is
/// not JSON as `{"unparsed": line}`).
pub fn json_lines(
    stdout: std::process::ChildStdout,
) -> tokio::sync::mpsc::UnboundedReceiver<Value> {
    let (sender, lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let value = serde_json::from_str(&line).unwrap_or(json!({"unparsed": line}));
            if sender.send(value).is_err() {
                break;
            }
        }
    });
    lines
}

/// One run of `node/subscribe.mjs` (an npm client), its output lines delivered as they come.
pub struct NodeSubscriber {
    child: Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<Value>,
}

impl NodeSubscriber {
    /// `client` is `graphql-ws` or `subscriptions-transport-ws`; `token` `None` sends no
    /// connectionParams.
    pub fn spawn(
        ws_url: &str,
        client: &str,
        token: Option<&str>,
        query: &str,
        count: usize,
    ) -> NodeSubscriber {
        let node_dir = repo_root().join("integration-tests/node");
        assert!(
            node_dir.join("node_modules/graphql-ws").is_dir(),
            "the npm clients are not installed: run `npm ci` in {} (scripts/test does)",
            node_dir.display()
        );
        let mut command = Command::new("node");
        command
            .current_dir(&node_dir)
            .arg("subscribe.mjs")
            .args(["--url", ws_url, "--client", client])
            .args(["--query", query, "--count", &count.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(token) = token {
            command.args(["--token", token]);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot run node: {err}"));
        let lines = json_lines(child.stdout.take().unwrap());
        NodeSubscriber { child, lines }
    }

    /// The next line within `wait`; `None` when nothing came; `{"exited": …}` after the end.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Value> {
        match tokio::time::timeout(wait, self.lines.recv()).await {
            Err(_) => None,
            Ok(Some(line)) => Some(line),
            Ok(None) => Some(json!({"exited": true})),
        }
    }

    pub async fn next(&mut self) -> Value {
        self.next_within(PATIENCE)
            .await
            .expect("nothing from the node client in time")
    }

    /// Waits for the process to end; its exit code.
    pub fn wait(mut self) -> Option<i32> {
        self.child.wait().unwrap().code()
    }
}

/// Runs `trigger` (a `trigger-event` for car 1) until `subscriber` prints the update, then checks
/// it is car 1 with one of trigger-event's makes and that the client exits cleanly. Triggered
/// again and again because the protocol does not acknowledge a subscription: the client's
/// `subscribe` may reach the server after an event went out.
pub async fn expect_trigger_event_update(
    mut subscriber: NodeSubscriber,
    client: &str,
    trigger: impl Fn(),
) {
    let mut line = None;
    for _ in 0..20 {
        trigger();
        line = subscriber.next_within(Duration::from_secs(2)).await;
        if line.is_some() {
            break;
        }
    }
    let line = line.unwrap_or_else(|| panic!("{client}: no update of car 1 arrived"));
    let car = &line["payload"]["data"]["carModelUpdated"];
    assert_eq!(car["id"], "1", "{client}: {line}");
    assert!(
        TRIGGER_MAKES.contains(&car["make"].as_str().unwrap_or_default()),
        "{client}: {line}"
    );
    assert_eq!(subscriber.wait(), Some(0), "{client} did not exit cleanly");
}

impl Drop for NodeSubscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A value of a Prometheus text-format sample summed over every series whose line starts with
/// `prefix` (a metric name and, optionally, the start of its labels).
pub async fn metric_sum(port: u16, prefix: &str) -> f64 {
    let mut response = http()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap();
    let body = response.body().limit(16 << 20).await.unwrap();
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// GraphQL requests one api-service replica has answered.
pub async fn graphql_requests_served(api_port: u16) -> f64 {
    metric_sum(
        api_port,
        "http_request_duration_seconds_count{method=\"POST\",route=\"/graphql",
    )
    .await
}
