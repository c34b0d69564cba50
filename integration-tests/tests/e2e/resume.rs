//! Nothing lost across reconnects, with the README's client recipe (`node/resume.mjs`: the npm
//! `graphql-ws` client retrying forever, a fresh token at each connect, resuming from the last
//! `extensions.cursor`): Car 1 is updated over HTTP every 50 ms for over 30 s while the stack is
//! disrupted, and the subscriber must have received every committed update exactly once.
//!
//! (a) 10 s access tokens (the socket closes 4403 at each expiry), against the embedded binary
//! and through NGINX;
//! (b) rolling SIGTERM of the two gateway replicas behind NGINX; (c) Redis restarted twice
//! (3 s down each) with mutations committed during the outages; (d) the gateways' Redis event
//! connections killed (`CLIENT KILL`); (a) and (b) also over GraphQL over SSE with the npm
//! `graphql-sse` client (`node/resume-sse.mjs`, `Last-Event-ID`). Also with that client: in-band renewal, a cursor older
//! than the retention (`recovered: false`, then live), and another user's token at renewal (4403).

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::{http, post_token, PATIENCE};
use crate::embedded::Gqlws;
use crate::stack::{repo_root, Stack};

/// How long each scenario keeps writing.
const RUN: Duration = Duration::from_secs(32);
const EVERY: Duration = Duration::from_millis(50);

/// `node/resume.mjs`, its output lines collected as they come.
pub struct Resumer {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Resumer {
    fn spawn(ws_url: &str, http_url: &str, renew: bool) -> Resumer {
        Self::spawn_with(ws_url, http_url, renew, &[])
    }

    /// With more of resume.mjs's options (`--resume-from`, `--renew-with`).
    fn spawn_with(ws_url: &str, http_url: &str, renew: bool, options: &[&str]) -> Resumer {
        Self::spawn_script("resume.mjs", ws_url, http_url, renew, options)
    }

    /// `script` (resume.mjs, or resume-sse.mjs: the same subscriber over GraphQL over SSE),
    /// subscribing at `url` and logging in at `http_url`.
    fn spawn_script(
        script: &str,
        url: &str,
        http_url: &str,
        renew: bool,
        options: &[&str],
    ) -> Resumer {
        let node_dir = repo_root().join("integration-tests/node");
        let mut command = Command::new("node");
        command
            .current_dir(&node_dir)
            .arg(script)
            .args(["--url", url, "--http", http_url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if renew {
            command.arg("--renew");
        }
        command.args(options);
        let mut child = command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot run node: {err}"));
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let value = serde_json::from_str(&line).unwrap_or(json!({"unparsed": line}));
                sink.lock().unwrap().push(value);
            }
        });
        Resumer { child, lines }
    }

    pub fn lines(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    fn makes(&self) -> Vec<String> {
        self.results().into_iter().map(|(make, _)| make).collect()
    }

    /// Each result's make, and how many results before it it stands for (`extensions.skipped`:
    /// a state subscription's results conflated while it was behind).
    fn results(&self) -> Vec<(String, usize)> {
        self.lines()
            .iter()
            .filter_map(|line| {
                let make = line["make"].as_str()?.to_owned();
                Some((make, line["skipped"].as_u64().unwrap_or(0) as usize))
            })
            .collect()
    }

    pub fn count(&self, key: &str) -> usize {
        self.lines()
            .iter()
            .filter(|line| !line[key].is_null())
            .count()
    }

    async fn until(&self, what: &str, done: impl Fn(&Resumer) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "{what}; the client printed:\n{}",
                tail(&self.lines())
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Resumer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(lines: &[Value]) -> String {
    lines[lines.len().saturating_sub(40)..]
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Updates Car 1 to `u-<n>` every [`EVERY`] until stopped; the makes whose mutation answered.
struct Writer {
    committed: Arc<Mutex<Vec<String>>>,
    failed: Arc<Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: actix_web::rt::task::JoinHandle<()>,
}

impl Writer {
    fn start(base_url: &str) -> Writer {
        let committed = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = actix_web::rt::spawn(write(
            base_url.to_owned(),
            committed.clone(),
            failed.clone(),
            stop.clone(),
        ));
        Writer {
            committed,
            failed,
            stop,
            task,
        }
    }

    async fn finish(self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.task.await;
        let failed = self.failed.lock().unwrap().clone();
        // A mutation whose answer was lost may still have committed; none is expected here.
        assert!(failed.is_empty(), "mutations that failed: {failed:?}");
        self.committed.lock().unwrap().clone()
    }
}

async fn write(
    base_url: String,
    committed: Arc<Mutex<Vec<String>>>,
    failed: Arc<Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut ticker = tokio::time::interval(EVERY);
    let mut access = String::new();
    let mut login_at = Instant::now() - Duration::from_secs(60);
    for n in 0.. {
        ticker.tick().await;
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        // Tokens may be short-lived here (scenario a): a fresh one every 3 s.
        if login_at.elapsed() > Duration::from_secs(3) {
            let (status, body) = post_token(&base_url, "admin", "letmein").await;
            assert_eq!(status, 200, "{body}");
            access = body["access"].as_str().unwrap().to_owned();
            login_at = Instant::now();
        }
        let make = format!("u-{n}");
        let answer = http()
            .post(format!("{base_url}/graphql/"))
            .insert_header(("Authorization", format!("Bearer {access}")))
            .send_json(&json!({
                "query": "mutation($make: String!) { updateCar(pk: 1, input: {make: $make}) { make } }",
                "variables": {"make": make},
            }))
            .await;
        let ok = match answer {
            Ok(mut response) => response
                .json::<Value>()
                .await
                .is_ok_and(|body| body["data"]["updateCar"]["make"] == make.as_str()),
            Err(_) => false,
        };
        if ok {
            committed.lock().unwrap().push(make);
        } else {
            failed.lock().unwrap().push(make);
        }
    }
}

/// Whether results must come in commit order: not when writes wait in the outbox for Redis
/// (they are appended after newer ones published inline once Redis is back).
#[derive(PartialEq)]
pub enum Order {
    Commit,
    Any,
}

/// Runs `disrupt` while the writer writes for [`RUN`], then checks that the client received
/// every committed make exactly once (in commit order where `order` says so). Returns the
/// client, for further checks.
pub async fn run_scenario(
    name: &str,
    ws_url: &str,
    http_url: &str,
    order: Order,
    disrupt: impl std::future::Future<Output = ()>,
) -> Resumer {
    run_scenario_with(
        Resumer::spawn(ws_url, http_url, false),
        name,
        http_url,
        order,
        disrupt,
    )
    .await
}

/// [`run_scenario`] with a client already started (resume-sse.mjs for GraphQL over SSE).
async fn run_scenario_with(
    client: Resumer,
    name: &str,
    http_url: &str,
    order: Order,
    disrupt: impl std::future::Future<Output = ()>,
) -> Resumer {
    client
        .until(&format!("{name}: the client never connected"), |c| {
            c.count("connected") > 0
        })
        .await;
    // The subscription is not acknowledged by the protocol: write until one result arrived, and
    // count from the first make received.
    let writer = Writer::start(http_url);
    client
        .until(&format!("{name}: no first result"), |c| {
            !c.makes().is_empty()
        })
        .await;
    let started = Instant::now();
    let run = async {
        disrupt.await;
        let left = RUN.saturating_sub(started.elapsed());
        tokio::time::sleep(left).await;
    };
    run.await;
    let committed = writer.finish().await;
    let last = committed.last().cloned().unwrap();
    client
        .until(
            &format!("{name}: the last committed update {last} never arrived"),
            |c| c.makes().contains(&last),
        )
        .await;
    let received = client.makes();
    // The first make the client received, in commit order (with Order::Any the earliest).
    let from = committed.iter().position(|m| received.contains(m)).unwrap();
    let expected = &committed[from..];
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for make in &received {
        *seen.entry(make).or_default() += 1;
    }
    let missing: Vec<&String> = expected
        .iter()
        .filter(|m| !seen.contains_key(m.as_str()))
        .collect();
    // A state subscription that fell behind (an event read more than OVERLOAD_LAG_MS after its
    // append, as after a failover) skips to the newest and says how many it skipped: those
    // are told, not lost. In commit order each count covers the missing makes right before
    // its result; otherwise only the total can be matched.
    let results = client.results();
    let told: usize = results.iter().map(|(_, skipped)| skipped).sum();
    let lost: Vec<&String> = match order {
        Order::Commit => {
            let mut covered = std::collections::HashSet::new();
            for (make, skipped) in &results {
                let Some(at) = expected.iter().position(|m| m == make) else {
                    continue;
                };
                covered.extend(
                    expected[..at]
                        .iter()
                        .rev()
                        .filter(|m| !seen.contains_key(m.as_str()))
                        .take(*skipped),
                );
            }
            missing
                .iter()
                .copied()
                .filter(|m| !covered.contains(m))
                .collect()
        }
        Order::Any if missing.len() <= told => Vec::new(),
        Order::Any => missing.clone(),
    };
    let duplicated: Vec<(&&str, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "{name}: {} committed, {} received, {} skipped and told, {} lost, {} duplicated, {} connections",
        expected.len(),
        received.len(),
        told,
        lost.len(),
        duplicated.len(),
        client.count("connected")
    );
    assert!(
        lost.is_empty() && duplicated.is_empty(),
        "{name}: lost {lost:?} (missing {missing:?}, {told} told), duplicated {duplicated:?}; \
         the client printed:\n{}",
        tail(&client.lines())
    );
    if order == Order::Commit {
        let in_order: Vec<String> = expected
            .iter()
            .filter(|m| seen.contains_key(m.as_str()))
            .cloned()
            .collect();
        assert_eq!(received, in_order, "{name}: out of commit order");
    }
    client
}

#[actix_web::test]
async fn embedded_token_expiry_reconnects_lose_nothing() {
    let gqlws = Gqlws::start_with(&SHORT_TOKENS).await;
    let client = run_scenario(
        "embedded, 10 s tokens",
        &gqlws.ws_url(),
        &gqlws.url,
        Order::Commit,
        async {},
    )
    .await;
    assert_resumed_after_expiries(&client);
}

#[actix_web::test]
async fn token_expiry_reconnects_through_nginx_lose_nothing() {
    let stack = Stack::start_with("resume-expiry", &test_support::redis_url(), &SHORT_TOKENS);
    let client = run_scenario(
        "NGINX, 10 s tokens",
        &stack.ws_url(),
        &stack.url,
        Order::Commit,
        async {},
    )
    .await;
    assert_resumed_after_expiries(&client);
}

/// Access tokens of 10 s, checked to the second: a socket closes (4403) every 10 s.
const SHORT_TOKENS: [(&str, &str); 2] = [
    ("ACCESS_TOKEN_LIFETIME_SECS", "10"),
    ("JWT_LEEWAY_SECS", "0"),
];

/// The client was closed at its tokens' expiry more than once, and resumed each time.
fn assert_resumed_after_expiries(client: &Resumer) {
    let closes: Vec<Value> = client
        .lines()
        .into_iter()
        .filter(|line| line["closed"] == 4403)
        .collect();
    assert!(
        closes.len() >= 2,
        "expected token-expiry closes over 32 s of 10 s tokens: {closes:?}"
    );
    let resumed = client
        .lines()
        .iter()
        .filter(|line| line["recovered"] == true)
        .count();
    assert!(resumed >= 2, "resumed subscriptions: {resumed}");
}

#[actix_web::test]
async fn embedded_in_band_renewal_keeps_one_socket_past_expiry() {
    // 10 s tokens and renewal 30 s before expiry: renewed at once, again and again.
    let gqlws = Gqlws::start_with(&[
        ("ACCESS_TOKEN_LIFETIME_SECS", "10"),
        ("JWT_LEEWAY_SECS", "0"),
    ])
    .await;
    let client = Resumer::spawn(&gqlws.ws_url(), &gqlws.url, true);
    client
        .until("no renewal answered", |c| c.count("renewed") > 0)
        .await;
    // 32 s of writes: the one socket outlives three 10 s token lifetimes.
    let writer = Writer::start(&gqlws.url);
    tokio::time::sleep(Duration::from_secs(32)).await;
    let committed = writer.finish().await;
    let last = committed.last().cloned().unwrap();
    client
        .until("the last update never arrived", |c| {
            c.makes().contains(&last)
        })
        .await;
    assert_eq!(
        client.count("connected"),
        1,
        "renewed in band, the socket must outlive 3 token lifetimes: {}",
        tail(&client.lines())
    );
    assert_eq!(client.count("closed"), 0);
    assert!(
        client.count("renewed") >= 3,
        "renewals answered: {}",
        client.count("renewed")
    );
}

#[actix_web::test]
async fn embedded_cursor_older_than_the_retention_says_recovered_false_then_goes_live() {
    let gqlws = Gqlws::start_with(&[("EVENT_RETENTION_COUNT", "10")]).await;
    // A client that saved a cursor, then was away while more than the retention was written.
    let first = Resumer::spawn(&gqlws.ws_url(), &gqlws.url, false);
    first
        .until("the first client never connected", |c| {
            c.count("connected") > 0
        })
        .await;
    let writer = Writer::start(&gqlws.url);
    first
        .until("no first result", |c| !c.makes().is_empty())
        .await;
    let cursor = first
        .lines()
        .iter()
        .find_map(|line| line["cursor"].as_str().map(str::to_owned))
        .unwrap();
    drop(first);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let away = writer.finish().await;
    assert!(away.len() > 20, "written while away: {}", away.len());

    let back = Resumer::spawn_with(
        &gqlws.ws_url(),
        &gqlws.url,
        false,
        &["--resume-from", &cursor],
    );
    back.until("the returning client never connected", |c| {
        c.count("connected") > 0
    })
    .await;
    let writer = Writer::start(&gqlws.url);
    back.until("no live result after the stale cursor", |c| {
        c.makes().len() >= 3
    })
    .await;
    let live = writer.finish().await;
    let lines = back.lines();
    let results: Vec<&Value> = lines.iter().filter(|l| !l["make"].is_null()).collect();
    assert_eq!(
        results[0]["recovered"],
        false,
        "the first result after a cursor the history lost: {}",
        tail(&lines)
    );
    assert!(
        results[1..].iter().all(|r| r["recovered"].is_null()),
        "only the first result says recovered: {}",
        tail(&lines)
    );
    // Nothing of the lost history was replayed: every result is a live write.
    for result in &results {
        let make = result["make"].as_str().unwrap();
        assert!(live.iter().any(|m| m == make), "{make} is not a live write");
    }
    assert_eq!(back.count("closed"), 0);
}
#[actix_web::test]
async fn embedded_renewal_with_another_users_token_closes_4403_and_the_client_resumes() {
    let gqlws = Gqlws::start().await;
    let (status, admin) = post_token(&gqlws.url, "admin", "letmein").await;
    assert_eq!(status, 200, "{admin}");
    let other = crate::client::resigned_with(
        admin["access"].as_str().unwrap(),
        json!({"user_id": 424242, "username": "someone-else"}),
        None,
    );
    let client = Resumer::spawn_with(
        &gqlws.ws_url(),
        &gqlws.url,
        false,
        &["--renew-with", &other],
    );
    client
        .until("another user's renewal was not refused with 4403", |c| {
            c.lines().iter().any(|line| line["closed"] == 4403)
        })
        .await;
    // The recipe reconnects with its own token and goes on receiving.
    let writer = Writer::start(&gqlws.url);
    client
        .until("no result after the refused renewal", |c| {
            c.count("connected") >= 2 && !c.makes().is_empty()
        })
        .await;
    writer.finish().await;
    assert_eq!(client.count("renewed"), 0, "{}", tail(&client.lines()));
}

/// The stack's gateway replicas, as supervisord names them.
const GATEWAYS: [&str; 2] = [
    "subscription-gateway:subscription-gateway-0",
    "subscription-gateway:subscription-gateway-1",
];

/// SIGTERM to each gateway replica in turn, 8 s apart, three times.
pub async fn rolling_restarts(stack: &Stack) {
    for round in 0..3 {
        tokio::time::sleep(Duration::from_secs(8)).await;
        let process = GATEWAYS[round % 2];
        let pid = stack.pid_of(process);
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

#[actix_web::test]
async fn rolling_gateway_restarts_lose_nothing() {
    let stack = Stack::start("resume-rolling");
    let client = run_scenario(
        "rolling SIGTERM",
        &stack.ws_url(),
        &stack.url,
        Order::Commit,
        rolling_restarts(&stack),
    )
    .await;
    assert!(
        client.count("closed") >= 1,
        "no client socket was closed by the restarts"
    );
}

/// The same over GraphQL over SSE with the npm `graphql-sse` client (resume-sse.mjs): each
/// stream the restarts end is resumed by `Last-Event-ID` on the other replica.
#[actix_web::test]
async fn graphql_sse_loses_nothing_across_rolling_gateway_restarts() {
    let stack = Stack::start("resume-sse-rolling");
    let url = format!("{}/graphql/", stack.url);
    let client = run_scenario_with(
        Resumer::spawn_script("resume-sse.mjs", &url, &stack.url, false, &[]),
        "graphql-sse, rolling SIGTERM",
        &stack.url,
        Order::Commit,
        rolling_restarts(&stack),
    )
    .await;
    assert!(
        client.count("reconnecting") >= 1,
        "no stream was ended by the restarts"
    );
    let resumed = client
        .lines()
        .iter()
        .filter(|line| line["recovered"] == true)
        .count();
    assert!(resumed >= 1, "resumed streams: {resumed}");
}

/// graphql-sse with 10 s tokens in the embedded mode: each stream ends at its token's expiry
/// with an error, and the client reconnects with a fresh token and its last id.
#[actix_web::test]
async fn graphql_sse_loses_nothing_across_token_expiry_reconnects() {
    let gqlws = Gqlws::start_with(&SHORT_TOKENS).await;
    let url = format!("{}/graphql/", gqlws.url);
    let client = run_scenario_with(
        Resumer::spawn_script("resume-sse.mjs", &url, &gqlws.url, false, &[]),
        "graphql-sse, embedded, 10 s tokens",
        &gqlws.url,
        Order::Commit,
        async {},
    )
    .await;
    let expiries = client
        .lines()
        .iter()
        .filter(|line| line["error"].to_string().contains("token has expired"))
        .count();
    assert!(expiries >= 2, "streams ended by expiry: {expiries}");
    let resumed = client
        .lines()
        .iter()
        .filter(|line| line["recovered"] == true)
        .count();
    assert!(resumed >= 2, "resumed streams: {resumed}");
}

#[actix_web::test]
async fn redis_restarts_with_writes_during_the_outage_lose_nothing() {
    let redis = Arc::new(Mutex::new(test_support::PrivateRedis::start_persistent()));
    let url = redis.lock().unwrap().url();
    let stack = Stack::start_on("resume-redis", &url);
    run_scenario(
        "Redis restarted",
        &stack.ws_url(),
        &stack.url,
        Order::Any,
        async {
            for _ in 0..2 {
                tokio::time::sleep(Duration::from_secs(6)).await;
                // Blocking, so on a thread of its own: mutations keep committing meanwhile.
                let redis = redis.clone();
                actix_web::rt::task::spawn_blocking(move || {
                    redis
                        .lock()
                        .unwrap()
                        .restart_gracefully(Duration::from_secs(3));
                })
                .await
                .unwrap();
            }
        },
    )
    .await;
}

#[actix_web::test]
async fn killed_redis_event_connections_lose_nothing() {
    let stack = Stack::start("resume-client-kill");
    let name = events::events_connection_name(&stack.redis_prefix);
    let redis = deadpool_redis::redis::Client::open(stack.redis_url.as_str()).unwrap();
    run_scenario(
        "CLIENT KILL",
        &stack.ws_url(),
        &stack.url,
        Order::Commit,
        async {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(6)).await;
                let mut connection = redis.get_multiplexed_async_connection().await.unwrap();
                let list: String = deadpool_redis::redis::cmd("CLIENT")
                    .arg("LIST")
                    .query_async(&mut connection)
                    .await
                    .unwrap();
                let ids: Vec<&str> = list
                    .lines()
                    .filter(|line| line.split(' ').any(|field| field == format!("name={name}")))
                    .filter_map(|line| line.split(' ').find_map(|f| f.strip_prefix("id=")))
                    .collect();
                assert_eq!(ids.len(), 2, "one event connection per gateway: {list}");
                for id in ids {
                    let _: i64 = deadpool_redis::redis::cmd("CLIENT")
                        .arg("KILL")
                        .arg("ID")
                        .arg(id)
                        .query_async(&mut connection)
                        .await
                        .unwrap();
                }
            }
        },
    )
    .await;
}
