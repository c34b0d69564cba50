//! Mutation → event latency: logs in at auth-service, subscribes to the `car.updated` channel,
//! then sends `updateCar` mutations one at a time and measures, for each, the time from sending
//! the request to the response, and to the event arriving on Redis. Loopback targets only.
//!
//! ```sh
//! cargo run --release -p api-service --example event_latency -- \
//!     http://127.0.0.1:8002/graphql http://127.0.0.1:8001 redis://127.0.0.1:6379/0 gqlws: 500
//! ```

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use deadpool_redis::redis;
use futures_util::StreamExt as _;
use serde_json::{json, Value};

#[actix_web::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, target, auth, redis_url, prefix, count] = args.as_slice() else {
        eprintln!("usage: event_latency GRAPHQL_URL AUTH_URL REDIS_URL KEY_PREFIX COUNT");
        std::process::exit(2);
    };
    for url in [target, auth, redis_url] {
        assert!(
            url.contains("127.0.0.1") || url.contains("localhost"),
            "loopback targets only"
        );
    }
    let count: usize = count.parse().unwrap();
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .finish();
    let login: Value = client
        .post(format!("{auth}/api/token/"))
        .send_json(&json!({"username": "admin", "password": "letmein"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let access = login["access"].as_str().unwrap().to_owned();

    let redis_client = redis::Client::open(redis_url.as_str()).unwrap();
    let mut pubsub = redis_client.get_async_pubsub().await.unwrap();
    pubsub
        .subscribe(format!("{prefix}events:car.updated"))
        .await
        .unwrap();
    let mut events = pubsub.into_on_message();

    let mut to_response = Vec::with_capacity(count);
    let mut to_event = Vec::with_capacity(count);
    let started = Instant::now();
    for n in 0..count {
        let make = format!("Skoda {n}");
        let body = json!({
            "query": "mutation($make: String!) { updateCar(pk: 2, input: {make: $make}) { make } }",
            "variables": {"make": make},
        });
        let sent = Instant::now();
        let response: Value = client
            .post(target.as_str())
            .insert_header(("Authorization", format!("Bearer {access}")))
            .send_json(&body)
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        to_response.push(sent.elapsed());
        assert_eq!(response["data"]["updateCar"]["make"], make, "{response}");
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), events.next())
                .await
                .expect("no event within 10 s")
                .unwrap();
            let envelope: Value =
                serde_json::from_str(&message.get_payload::<String>().unwrap()).unwrap();
            if envelope["data"]["make"] == make {
                to_event.push(sent.elapsed());
                break;
            }
        }
    }
    let total = started.elapsed();
    println!(
        "{count} mutations in {:.1} s ({:.0}/s, one at a time)",
        total.as_secs_f64(),
        count as f64 / total.as_secs_f64()
    );
    for (label, samples) in [
        ("send → response", &mut to_response),
        ("send → event", &mut to_event),
    ] {
        samples.sort();
        let pick = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
        println!(
            "{label}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            pick(0.50).as_secs_f64() * 1e3,
            pick(0.99).as_secs_f64() * 1e3,
            samples[samples.len() - 1].as_secs_f64() * 1e3
        );
    }
}
