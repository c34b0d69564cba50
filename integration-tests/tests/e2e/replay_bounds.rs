//! Resume must not become a weapon (issue 25), through NGINX on the shared stack (two gateways):
//! one account's thousands of resumes from the oldest cursor, never read, while another user's
//! subscriber gets its live updates and an honest resumer loses nothing; and a user's sockets
//! counted across both gateways.
//!
//! What is asserted is amounts (updates received, resumes refused, events recovered); the
//! latency of the live updates under the attack is printed here and recorded, with the figures
//! before the change, in docs/BENCHMARKS.md ("Replays under attack").

use std::time::{Duration, Instant};

use deadpool_redis::redis;
use serde_json::{json, Value};

use crate::client::{
    create_car, metric_sum, new_user, tokens_of, update_make, Incoming, WsClient, USER_PASSWORD,
};
use crate::stack::Stack;

fn model_updated(pk: &str) -> String {
    format!("subscription {{ carModelUpdated(pk: {pk}) {{ id make }} }}")
}

async fn connected(url: &str, access: &str) -> WsClient {
    let mut ws = WsClient::connect_or_error(url, "graphql-transport-ws")
        .await
        .unwrap();
    match ws.init_answer(access).await {
        Incoming::Json(ack) if ack["type"] == "connection_ack" => ws,
        other => panic!("{url}: {other:?}"),
    }
}

async fn subscribe(ws: &mut WsClient, id: &str, query: &str, resume_from: Option<&str>) {
    let mut payload = json!({"query": query});
    if let Some(cursor) = resume_from {
        payload["extensions"] = json!({"resumeFrom": cursor});
    }
    ws.send(json!({"id": id, "type": "subscribe", "payload": payload}))
        .await;
}

/// The next result's car make and cursor.
async fn next_make(ws: &mut WsClient) -> (String, String, Value) {
    match ws.answer().await {
        Incoming::Json(message) if message["type"] == "next" => {
            let payload = &message["payload"];
            (
                payload["data"]["carModelUpdated"]["make"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
                payload["extensions"]["cursor"].as_str().unwrap().to_owned(),
                payload["extensions"]["recovered"].clone(),
            )
        }
        other => panic!("{other:?}"),
    }
}

/// Subscribes `ws` to car `pk`'s updates and updates the car until a result arrives (the
/// protocol does not acknowledge a subscription); the cursor of the last result it got.
async fn subscribed_cursor(stack: &Stack, access: &str, pk: &str, ws: &mut WsClient) -> String {
    subscribe(ws, "s", &model_updated(pk), None).await;
    let mut cursor = None;
    for attempt in 0..20 {
        update_make(stack, access, pk, &format!("before {attempt}")).await;
        if let Some(Incoming::Json(message)) = ws.answer_within(Duration::from_secs(2)).await {
            cursor = message["payload"]["extensions"]["cursor"]
                .as_str()
                .map(str::to_owned);
            break;
        }
    }
    // A late delivery of an earlier attempt may still come: the cursor is the last one seen.
    while let Some(Incoming::Json(message)) = ws.answer_within(Duration::from_millis(500)).await {
        cursor = message["payload"]["extensions"]["cursor"]
            .as_str()
            .map(str::to_owned);
    }
    cursor.expect("the subscription never delivered")
}

/// `count` events of car `pk` appended to the stack's log as api-service appends them.
async fn fill_log(stack: &Stack, pk: &str, count: usize) {
    let client = redis::Client::open(stack.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = events::channel(&stack.redis_prefix, "car.updated");
    for chunk in 0..count.div_ceil(1000) {
        let mut pipe = redis::pipe();
        for n in chunk * 1000..((chunk + 1) * 1000).min(count) {
            let envelope = json!({
                "v": 1,
                "id": format!("{:032x}", (chunk as u128) << 64 | n as u128 | 0xf11 << 100),
                "type": "car.updated",
                "at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "data": {"id": pk.parse::<i64>().unwrap(), "make": format!("old {n}"),
                         "model": "Octavia", "variant": "", "year": "", "owner": null},
            });
            pipe.cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg(events::ENTRY_FIELD)
                .arg(envelope.to_string())
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await.unwrap();
    }
}

/// The first entry of the car.updated log, as a cursor of the stack's epoch.
async fn oldest_cursor(stack: &Stack, epoch: &str) -> String {
    let client = redis::Client::open(stack.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let first: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(events::channel(&stack.redis_prefix, "car.updated"))
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    format!("{epoch}:car.updated:{}", first[0].0)
}

async fn replays_refused(stack: &Stack) -> f64 {
    let mut sum = 0.0;
    for port in &stack.gateway_ports {
        sum += metric_sum(*port, "gateway_replays_refused_total").await;
    }
    sum
}

#[actix_web::test]
async fn one_accounts_resume_flood_leaves_live_updates_and_honest_resumes_whole() {
    let stack = Stack::shared();
    let attacker = new_user(stack, "flooder");
    let victim = new_user(stack, "watcher");
    let honest = new_user(stack, "resumer");
    let (attacker_access, _) = tokens_of(stack, &attacker, USER_PASSWORD).await;
    let (victim_access, _) = tokens_of(stack, &victim, USER_PASSWORD).await;
    let (honest_access, _) = tokens_of(stack, &honest, USER_PASSWORD).await;

    // The victim's car and subscriber, and the epoch from its first result.
    let victim_car = create_car(stack, &victim_access, "Watched").await;
    let mut watcher = connected(&stack.ws_url(), &victim_access).await;
    let epoch = subscribed_cursor(stack, &victim_access, &victim_car, &mut watcher)
        .await
        .split(':')
        .next()
        .unwrap()
        .to_owned();

    // 10,000 retained events of the attacker's target car, then the flood: 80 sockets × 100
    // resumes from the oldest cursor, through NGINX (both gateways), never read.
    let target = "987654321";
    fill_log(stack, target, 10_000).await;
    let oldest = oldest_cursor(stack, &epoch).await;
    // An honest client's place in the log, just before the flood: it will resume from here.
    // (After the 10,000: a cursor older than the retention is rightly not recovered.)
    let honest_car = create_car(stack, &honest_access, "Honest").await;
    let mut first_life = connected(&stack.ws_url(), &honest_access).await;
    let honest_cursor =
        subscribed_cursor(stack, &honest_access, &honest_car, &mut first_life).await;
    drop(first_life);
    let refused_before = replays_refused(stack).await;
    let mut flood = Vec::new();
    for socket in 0..80 {
        let mut ws = connected(&stack.ws_url(), &attacker_access).await;
        for n in 0..100 {
            subscribe(
                &mut ws,
                &format!("a{socket}-{n}"),
                &model_updated(target),
                Some(&oldest),
            )
            .await;
        }
        flood.push(ws);
    }

    // While it runs: the victim's live updates all arrive, and the honest client, away during
    // three of them, resumes and gets exactly what it missed.
    let mut latencies_ms = Vec::new();
    for n in 0..10 {
        let make = format!("live {n}");
        let sent = Instant::now();
        update_make(stack, &victim_access, &victim_car, &make).await;
        loop {
            let (got, _, _) = next_make(&mut watcher).await;
            if got == make {
                break;
            }
        }
        latencies_ms.push(sent.elapsed().as_secs_f64() * 1000.0);
        if n == 3 {
            for missed in 0..3 {
                update_make(
                    stack,
                    &honest_access,
                    &honest_car,
                    &format!("missed {missed}"),
                )
                .await;
            }
        }
    }
    latencies_ms.sort_by(f64::total_cmp);
    eprintln!(
        "live updates during the resume flood, mutation to delivery: median {:.1} ms, max {:.1} ms",
        latencies_ms[latencies_ms.len() / 2],
        latencies_ms[latencies_ms.len() - 1]
    );
    let mut back = connected(&stack.ws_url(), &honest_access).await;
    subscribe(
        &mut back,
        "h",
        &model_updated(&honest_car),
        Some(&honest_cursor),
    )
    .await;
    let mut recovered = Vec::new();
    for n in 0..3 {
        let (make, _, flag) = next_make(&mut back).await;
        recovered.push(make);
        if n == 0 {
            assert_eq!(flag, true, "the honest resume was not recovered");
        }
    }
    assert_eq!(recovered, ["missed 0", "missed 1", "missed 2"]);

    // The flood's excess was answered `recovered: false` rather than replayed: counted once the
    // gateways have read all 8,000 (on a loaded machine they may still be reading them here).
    let deadline = Instant::now() + crate::client::PATIENCE;
    let mut refused = replays_refused(stack).await - refused_before;
    while refused < 7_000.0 && Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        refused = replays_refused(stack).await - refused_before;
    }
    assert!(
        refused >= 7_000.0,
        "of 8,000 resumes, only {refused} were refused (at most 8 run and 256 wait per user and gateway)"
    );
    drop(flood);
}

#[actix_web::test]
async fn a_user_at_the_socket_cap_on_one_gateway_is_refused_on_the_other() {
    let stack = Stack::shared();
    let user = new_user(stack, "capped");
    let (access, _) = tokens_of(stack, &user, USER_PASSWORD).await;
    let [first, second] = [stack.gateway_ports[0], stack.gateway_ports[1]]
        .map(|port| format!("ws://127.0.0.1:{port}/graphql"));
    // MAX_CONNECTIONS_PER_USER is 100 (the default): all of them on the first gateway.
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(connected(&first, &access).await);
    }
    let mut refused = WsClient::connect_or_error(&second, "graphql-transport-ws")
        .await
        .unwrap();
    match refused.init_answer(&access).await {
        Incoming::Close(Some(1008), reason) => {
            assert!(reason.contains("too many connections"), "{reason}")
        }
        other => panic!("the 101st socket, on the other gateway: {other:?}"),
    }
    // One closed on the first: the other takes one (its entry is removed as the socket closes).
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut ws = WsClient::connect_or_error(&second, "graphql-transport-ws")
            .await
            .unwrap();
        match ws.init_answer(&access).await {
            Incoming::Json(ack) if ack["type"] == "connection_ack" => break,
            Incoming::Close(Some(1008), _) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("after one closed: {other:?}"),
        }
    }
}
