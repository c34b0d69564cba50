//! `loadgen`: measures the stack from the outside, the way a client sees it.
//!
//! - `loadgen tokens --op issue|refresh|verify`: auth-service's endpoints.
//! - `loadgen query --query '{ hi }'`: GraphQL over HTTP with a bearer token.
//! - `loadgen subscribe`: websocket subscribers on subscription-gateway, events published into
//!   Redis, publish-to-receipt latency per delivery and the gateway's memory per connection
//!   (see `subscribe/mod.rs`).
//!
//! Each run is bounded by `--duration` (at most 10 minutes) and `--max-requests`, talks only to
//! loopback addresses, prints a table and, with `--json`, writes the figures as JSON.

mod subscribe;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Load generator for the JWT + GraphQL stack (loopback targets only)."
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Token endpoints of auth-service.
    Tokens {
        #[command(flatten)]
        common: CommonArgs,
        /// Which endpoint to drive.
        #[arg(long, value_enum, default_value = "verify")]
        op: TokenOp,
        /// Base URL of auth-service (or of NGINX).
        #[arg(long, default_value = "http://127.0.0.1:8001")]
        target: String,
    },
    /// GraphQL queries over HTTP with a valid access token.
    Query {
        #[command(flatten)]
        common: CommonArgs,
        /// The GraphQL endpoint.
        #[arg(long, default_value = "http://127.0.0.1:8002/graphql")]
        target: String,
        /// Where to log in for the access token.
        #[arg(long, default_value = "http://127.0.0.1:8001")]
        auth: String,
        /// The query document.
        #[arg(long, default_value = "{ hi }")]
        query: String,
    },
    /// Websocket subscribers on subscription-gateway and events published into Redis.
    Subscribe(Box<subscribe::SubscribeArgs>),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TokenOp {
    /// `POST /api/token/` (one argon2id verification per request).
    Issue,
    /// `POST /api/token/refresh/`, each client chaining the rotated refresh token.
    Refresh,
    /// `POST /api/token/verify/`.
    Verify,
}

#[derive(Debug, Clone, Args)]
struct CommonArgs {
    /// Concurrent clients (each with one request in flight).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    concurrency: u32,
    /// Client threads the clients are spread over.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    threads: u32,
    /// How long to run, in seconds (at most 600).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    duration: u64,
    /// Warm-up before measuring, in seconds.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Stop after this many measured requests.
    #[arg(long, default_value_t = 10_000_000)]
    max_requests: u64,
    #[arg(long, default_value = "admin")]
    username: String,
    #[arg(long, default_value = "letmein")]
    password: String,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// What one client thread measured.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: std::collections::BTreeMap<String, u64>,
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.mode {
        Mode::Tokens { common, op, target } => {
            ensure_loopback(target);
            run(
                common,
                Workload::Tokens {
                    op: *op,
                    target: target.trim_end_matches('/').to_owned(),
                },
            )
        }
        Mode::Query {
            common,
            target,
            auth,
            query,
        } => {
            ensure_loopback(target);
            ensure_loopback(auth);
            run(
                common,
                Workload::Query {
                    target: target.clone(),
                    auth: auth.trim_end_matches('/').to_owned(),
                    query: query.clone(),
                },
            )
        }
        Mode::Subscribe(args) => subscribe::run(args),
    };
    if let Err(err) = result {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}

#[derive(Clone)]
enum Workload {
    Tokens {
        op: TokenOp,
        target: String,
    },
    Query {
        target: String,
        auth: String,
        query: String,
    },
}

fn ensure_loopback(url: &str) {
    let host = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split(['/', ':']).next())
        .unwrap_or("");
    let loopback = host == "localhost"
        || host == "[" // "[::1]" splits at ':'
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        eprintln!("error: {url} is not a loopback address; loadgen only targets this machine");
        std::process::exit(2);
    }
}

fn run(common: &CommonArgs, workload: Workload) -> Result<(), String> {
    let threads = common.threads.min(common.concurrency);
    let per_thread = split(common.concurrency, threads);
    let started = Instant::now();
    let measure_from = started + Duration::from_secs(common.warmup);
    let deadline = measure_from + Duration::from_secs(common.duration);
    let budget = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(common.max_requests));
    let handles: Vec<_> = per_thread
        .into_iter()
        .map(|clients| {
            let workload = workload.clone();
            let common = common.clone();
            let budget = budget.clone();
            std::thread::spawn(move || {
                actix_web::rt::System::new().block_on(thread_main(
                    clients,
                    workload,
                    common,
                    measure_from,
                    deadline,
                    budget,
                ))
            })
        })
        .collect();
    let mut total = Tally::default();
    for handle in handles {
        let tally = handle
            .join()
            .map_err(|_| "a client thread panicked".to_owned())??;
        total.latencies_us.extend(tally.latencies_us);
        for (kind, n) in tally.errors {
            *total.errors.entry(kind).or_default() += n;
        }
    }
    let elapsed = deadline
        .min(Instant::now())
        .saturating_duration_since(measure_from)
        .as_secs_f64();
    report(common, &workload, &mut total, elapsed)
}

fn split(total: u32, parts: u32) -> Vec<u32> {
    (0..parts)
        .map(|i| total / parts + u32::from(i < total % parts))
        .collect()
}

async fn thread_main(
    clients: u32,
    workload: Workload,
    common: CommonArgs,
    measure_from: Instant,
    deadline: Instant,
    budget: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Result<Tally, String> {
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .connector(awc::Connector::new().limit(clients as usize * 2))
        .finish();
    let tally = Rc::new(RefCell::new(Tally::default()));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut state = ClientState::prepare(&client, &workload, &common).await?;
        let client = client.clone();
        let tally = tally.clone();
        let budget = budget.clone();
        tasks.push(actix_web::rt::spawn(async move {
            while Instant::now() < deadline {
                let sent = Instant::now();
                let outcome = state.request(&client).await;
                if sent < measure_from {
                    continue;
                }
                if budget
                    .fetch_update(
                        std::sync::atomic::Ordering::Relaxed,
                        std::sync::atomic::Ordering::Relaxed,
                        |left| left.checked_sub(1),
                    )
                    .is_err()
                {
                    break;
                }
                let mut tally = tally.borrow_mut();
                match outcome {
                    Ok(()) => tally
                        .latencies_us
                        .push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32),
                    Err(kind) => *tally.errors.entry(kind).or_default() += 1,
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    Rc::try_unwrap(tally)
        .map(RefCell::into_inner)
        .map_err(|_| "client tasks still running".to_owned())
}

/// One client's request loop state: the URL, the body, and the token it carries.
struct ClientState {
    url: String,
    body: Value,
    bearer: Option<String>,
    /// For chained refreshes: which response field replaces the refresh token.
    chain_refresh: bool,
}

impl ClientState {
    async fn prepare(
        client: &awc::Client,
        workload: &Workload,
        common: &CommonArgs,
    ) -> Result<Self, String> {
        let credentials = json!({"username": common.username, "password": common.password});
        match workload {
            Workload::Tokens { op, target } => {
                let login_url = format!("{target}/api/token/");
                Ok(match op {
                    TokenOp::Issue => ClientState {
                        url: login_url,
                        body: credentials,
                        bearer: None,
                        chain_refresh: false,
                    },
                    TokenOp::Refresh => {
                        let pair = post(client, &login_url, &credentials, None).await?;
                        ClientState {
                            url: format!("{target}/api/token/refresh/"),
                            body: json!({"refresh": pair["refresh"]}),
                            bearer: None,
                            chain_refresh: true,
                        }
                    }
                    TokenOp::Verify => {
                        let pair = post(client, &login_url, &credentials, None).await?;
                        ClientState {
                            url: format!("{target}/api/token/verify/"),
                            body: json!({"token": pair["access"]}),
                            bearer: None,
                            chain_refresh: false,
                        }
                    }
                })
            }
            Workload::Query {
                target,
                auth,
                query,
            } => {
                let pair = post(client, &format!("{auth}/api/token/"), &credentials, None).await?;
                let access = pair["access"]
                    .as_str()
                    .ok_or("login returned no access token")?
                    .to_owned();
                Ok(ClientState {
                    url: target.clone(),
                    body: json!({"query": query}),
                    bearer: Some(access),
                    chain_refresh: false,
                })
            }
        }
    }

    async fn request(&mut self, client: &awc::Client) -> Result<(), String> {
        let response = post(client, &self.url, &self.body, self.bearer.as_deref()).await?;
        if let Some(errors) = response.get("errors") {
            return Err(format!("graphql error: {}", truncate(&errors.to_string())));
        }
        if self.chain_refresh {
            match response.get("refresh") {
                Some(next) => self.body = json!({"refresh": next}),
                None => return Err("refresh returned no rotated token".into()),
            }
        }
        Ok(())
    }
}

async fn post(
    client: &awc::Client,
    url: &str,
    body: &Value,
    bearer: Option<&str>,
) -> Result<Value, String> {
    let mut request = client
        .post(url)
        .insert_header(("Content-Type", "application/json"));
    if let Some(token) = bearer {
        request = request.insert_header(("Authorization", format!("Bearer {token}")));
    }
    let mut response = request
        .send_body(body.to_string())
        .await
        .map_err(|err| format!("send: {err}"))?;
    let status = response.status();
    let bytes = response
        .body()
        .limit(1 << 20)
        .await
        .map_err(|err| format!("body: {err}"))?;
    if !status.is_success() {
        return Err(format!("HTTP {}", status.as_u16()));
    }
    serde_json::from_slice(&bytes).map_err(|_| "response is not JSON".to_owned())
}

fn truncate(s: &str) -> String {
    s.chars().take(120).collect()
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    f64::from(sorted[rank.min(sorted.len() - 1)]) / 1000.0
}

fn report(
    common: &CommonArgs,
    workload: &Workload,
    tally: &mut Tally,
    elapsed: f64,
) -> Result<(), String> {
    tally.latencies_us.sort_unstable();
    let ok = tally.latencies_us.len() as u64;
    let errors: u64 = tally.errors.values().sum();
    let name = match workload {
        Workload::Tokens { op, .. } => format!("tokens/{op:?}").to_lowercase(),
        Workload::Query { query, .. } => format!("query {query}"),
    };
    let figures = json!({
        "scenario": name,
        "concurrency": common.concurrency,
        "threads": common.threads,
        "seconds": elapsed,
        "ok": ok,
        "errors": errors,
        "errors_by_kind": tally.errors,
        "requests_per_second": ok as f64 / elapsed.max(1e-9),
        "latency_ms": {
            "p50": percentile(&tally.latencies_us, 50.0),
            "p90": percentile(&tally.latencies_us, 90.0),
            "p99": percentile(&tally.latencies_us, 99.0),
            "max": percentile(&tally.latencies_us, 100.0),
        },
    });
    println!(
        "{:<28} {:>5} {:>9} {:>10} {:>9} {:>9} {:>9} {:>7}",
        "scenario", "conc", "ok", "req/s", "p50 ms", "p99 ms", "max ms", "errors"
    );
    println!(
        "{:<28} {:>5} {:>9} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>7}",
        name,
        common.concurrency,
        ok,
        figures["requests_per_second"].as_f64().unwrap_or(0.0),
        figures["latency_ms"]["p50"].as_f64().unwrap_or(f64::NAN),
        figures["latency_ms"]["p99"].as_f64().unwrap_or(f64::NAN),
        figures["latency_ms"]["max"].as_f64().unwrap_or(f64::NAN),
        errors
    );
    for (kind, n) in &tally.errors {
        println!("  error {kind}: {n}");
    }
    write_figures(common.json.as_deref(), &figures)?;
    Ok(())
}

/// Writes a run's figures as JSON where `--json` says, if it does.
fn write_figures(path: Option<&std::path::Path>, figures: &Value) -> Result<(), String> {
    let Some(path) = path else {
        return Ok(());
    };
    std::fs::write(
        path,
        serde_json::to_string_pretty(figures).unwrap_or_default(),
    )
    .map_err(|err| format!("cannot write {}: {err}", path.display()))
}
