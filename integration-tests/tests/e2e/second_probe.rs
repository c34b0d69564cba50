//! The second black-box probe (issue 27), finding by finding: the attack, through NGINX on the
//! shared stack (two api and two gateway replicas) or on the embedded binary, then the
//! documented behaviour. "Every replica" is checked by asking each replica on its own port as
//! well as through NGINX.
//!
//! Waits are a safety net ([`PATIENCE`]); a replica that did not answer the logout refuses its
//! token within its poll (a second), so the tests ask until it does, never timing it.

use std::net::IpAddr;
use std::time::Duration;

use serde_json::{json, Value};

use crate::client::{
    create_car, deactivate_user, graphql, http, new_user, stack_command, tokens_of, update_make,
    Incoming, WsClient, CAR_1_UPDATED, PATIENCE, USER_PASSWORD,
};
use crate::embedded::Gqlws;
use crate::stack::Stack;

async fn logout(base_url: &str, refresh: &str) -> (u16, Value) {
    let mut response = http()
        .post(format!("{base_url}/api/token/blacklist/"))
        .send_json(&json!({"refresh": refresh}))
        .await
        .unwrap();
    let body = response.body().await.unwrap();
    (
        response.status().as_u16(),
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

/// `{ hi }` at one api replica's own port.
async fn hi_at(base_url: &str, access: &str) -> Value {
    let mut response = http()
        .post(format!("{base_url}/graphql/"))
        .insert_header(("Authorization", format!("Bearer {access}")))
        .send_json(&json!({"query": "{ hi }"}))
        .await
        .unwrap();
    response.json().await.unwrap()
}

/// `connection_init` with `access` at one gateway's websocket URL: whether it was acked.
async fn acked_at(ws_url: &str, access: &str) -> Result<(), String> {
    let mut ws = WsClient::connect_or_error(ws_url, "graphql-transport-ws").await?;
    match ws.init_answer(access).await {
        Incoming::Json(ack) if ack["type"] == "connection_ack" => Ok(()),
        Incoming::Close(code, reason) => Err(format!("closed {code:?}: {reason}")),
        other => Err(format!("{other:?}")),
    }
}

/// Every address the token is checked at: NGINX, and each api and gateway replica on its own
/// port; `(HTTP base URLs, websocket URLs)`.
fn every_replica(stack: &Stack) -> (Vec<String>, Vec<String>) {
    let mut http_urls = vec![stack.url.clone()];
    http_urls.extend(
        stack
            .api_ports
            .iter()
            .map(|port| format!("http://127.0.0.1:{port}")),
    );
    let mut ws_urls = vec![stack.ws_url()];
    ws_urls.extend(
        stack
            .gateway_ports
            .iter()
            .map(|port| format!("ws://127.0.0.1:{port}/graphql")),
    );
    (http_urls, ws_urls)
}

/// Waits until every replica refuses `access` on HTTP (UNAUTHENTICATED) and at
/// `connection_init` (4403, "revoked"); panics after [`PATIENCE`] with what still accepts it.
async fn until_refused_everywhere(http_urls: &[String], ws_urls: &[String], access: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let mut accepted = Vec::new();
        for url in http_urls {
            let answer = hi_at(url, access).await;
            if answer["errors"][0]["extensions"]["code"] != "UNAUTHENTICATED" {
                accepted.push(format!("{url}: {answer}"));
            } else {
                let message = answer["errors"][0]["message"].as_str().unwrap_or_default();
                assert!(message.contains("revoked"), "{url}: {answer}");
            }
        }
        for url in ws_urls {
            match acked_at(url, access).await {
                Ok(()) => accepted.push(format!("{url}: acked")),
                Err(reason) => assert!(
                    reason.contains("4403") && reason.contains("revoked"),
                    "{url}: {reason}"
                ),
            }
        }
        if accepted.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the revoked token is still accepted: {accepted:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A process of `binary` with the stack's settings on a free port, started after everything
/// above (a replica added later); killed on drop.
struct LateReplica {
    child: std::process::Child,
    port: u16,
}

impl LateReplica {
    async fn start(stack: &Stack, binary: &str) -> LateReplica {
        let port = test_support::free_port();
        let child = stack_command(stack, binary)
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env(
                "API_INTERNAL_URL",
                format!("http://127.0.0.1:{}/graphql", stack.api_ports[0]),
            )
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let replica = LateReplica { child, port };
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let ready = http()
                .get(format!("http://127.0.0.1:{port}/readyz"))
                .send()
                .await;
            if ready.is_ok_and(|response| response.status() == 200) {
                return replica;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{binary} did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for LateReplica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Finding 1 (and 3): alice's burst of 60 logins and logouts used to push her cutoff ~25 s into
/// the future, so no replica read anyone else's logout for that long and her new tokens
/// outlived their lifetime. Now bob's logout and carol's deactivation hold on every path of
/// every replica, and on replicas started afterwards.
#[actix_web::test]
async fn one_users_burst_of_logouts_leaves_every_other_logout_whole() {
    let stack = Stack::shared();
    let alice = new_user(stack, "alice");
    let bob = new_user(stack, "bob");
    let carol = new_user(stack, "carol");
    let (http_urls, ws_urls) = every_replica(stack);

    for _ in 0..60 {
        let (_, refresh) = tokens_of(stack, &alice, USER_PASSWORD).await;
        assert_eq!(logout(&stack.url, &refresh).await.0, 200);
    }
    // Her next tokens: issued now, for the configured lifetime.
    let (alice_access, _) = tokens_of(stack, &alice, USER_PASSWORD).await;
    let claims = crate::client::claims_of(&alice_access);
    let now_ms = chrono::Utc::now().timestamp_millis();
    assert!(claims["iat_ms"].as_i64().unwrap() <= now_ms, "{claims}");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        300,
        "{claims}"
    );

    // Bob: an open socket, a logout, then his token everywhere.
    let (bob_access, bob_refresh) = tokens_of(stack, &bob, USER_PASSWORD).await;
    let mut bob_socket =
        crate::client::ws_subscribed(stack, "graphql-transport-ws", &bob_access, CAR_1_UPDATED)
            .await;
    assert_eq!(logout(&stack.url, &bob_refresh).await.0, 200);
    match bob_socket.answer().await {
        Incoming::Close(Some(4403), reason) => assert!(reason.contains("revoked"), "{reason}"),
        other => panic!("bob's open socket was not closed: {other:?}"),
    }
    until_refused_everywhere(&http_urls, &ws_urls, &bob_access).await;
    // Renewal with the revoked token, on a socket of his new one: closed as revoked.
    let (bob_new, _) = tokens_of(stack, &bob, USER_PASSWORD).await;
    let mut renewing = crate::client::ws_connect(stack, "graphql-transport-ws")
        .await
        .unwrap();
    assert!(
        matches!(renewing.init_answer(&bob_new).await, Incoming::Json(ack) if ack["type"] == "connection_ack")
    );
    renewing
        .send(json!({"type": "ping", "payload": {"Authorization": format!("Bearer {bob_access}")}}))
        .await;
    match renewing.answer().await {
        Incoming::Close(Some(4403), reason) => assert!(reason.contains("revoked"), "{reason}"),
        other => panic!("a renewal with the revoked token: {other:?}"),
    }

    // Carol: deactivated by the operator while her socket is open.
    let (carol_access, _) = tokens_of(stack, &carol, USER_PASSWORD).await;
    let mut carol_socket =
        crate::client::ws_subscribed(stack, "graphql-ws", &carol_access, CAR_1_UPDATED).await;
    deactivate_user(stack, &carol);
    match carol_socket.answer().await {
        Incoming::Close(Some(4403), reason) => assert!(reason.contains("revoked"), "{reason}"),
        other => panic!("carol's open socket was not closed: {other:?}"),
    }
    until_refused_everywhere(&http_urls, &ws_urls, &carol_access).await;
    // (A query forwarded on a socket carries the connection's token to an api replica, which
    // refuses it as above; and her sockets are closed.)

    // Replicas started now refuse both at once, once ready.
    let api = LateReplica::start(stack, "api-service").await;
    let gateway = LateReplica::start(stack, "subscription-gateway").await;
    for access in [&bob_access, &carol_access] {
        let answer = hi_at(&format!("http://127.0.0.1:{}", api.port), access).await;
        assert_eq!(
            answer["errors"][0]["extensions"]["code"], "UNAUTHENTICATED",
            "{answer}"
        );
        let refused = acked_at(&format!("ws://127.0.0.1:{}/graphql", gateway.port), access).await;
        assert!(refused.is_err_and(|reason| reason.contains("revoked")));
    }
    // And they serve the tokens nobody revoked.
    let answer = hi_at(&format!("http://127.0.0.1:{}", api.port), &bob_new).await;
    assert_eq!(answer["data"]["hi"], "Hi!", "{answer}");
    assert_eq!(
        acked_at(
            &format!("ws://127.0.0.1:{}/graphql", gateway.port),
            &alice_access
        )
        .await,
        Ok(())
    );
}

/// Finding 4: sockets that finished `connection_init` in the moment around a logout used to be
/// acked and never closed. Sockets are opened with the token before, during and after the
/// logout; every one ends refused or closed with 4403, none stays open.
#[actix_web::test]
async fn sockets_opened_around_a_logout_are_all_closed() {
    let stack = Stack::shared();
    let user = new_user(stack, "racer");
    let (access, refresh) = tokens_of(stack, &user, USER_PASSWORD).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut openers = Vec::new();
    for _ in 0..4 {
        let (url, access, stop) = (stack.ws_url(), access.clone(), stop.clone());
        openers.push(actix_web::rt::spawn(async move {
            let mut acked = Vec::new();
            let mut refused = 0;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                // Paced, so that the sockets kept open stay under MAX_CONNECTIONS_PER_USER.
                tokio::time::sleep(Duration::from_millis(25)).await;
                let mut ws = WsClient::connect_or_error(&url, "graphql-transport-ws")
                    .await
                    .unwrap();
                match ws.init_answer(&access).await {
                    Incoming::Json(ack) if ack["type"] == "connection_ack" => acked.push(ws),
                    Incoming::Close(Some(4403), _) => refused += 1,
                    other => panic!("{other:?}"),
                }
            }
            (acked, refused)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(logout(&stack.url, &refresh).await.0, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    let (mut acked, mut refused) = (Vec::new(), 0);
    for opener in openers {
        let (sockets, count) = opener.await.unwrap();
        acked.extend(sockets);
        refused += count;
    }
    assert!(refused > 0, "no socket was opened after the logout");
    assert!(!acked.is_empty(), "no socket was opened before the logout");
    for mut ws in acked {
        match ws.answer().await {
            Incoming::Close(Some(4403), reason) => assert!(reason.contains("revoked"), "{reason}"),
            other => panic!("a socket of the revoked token stayed open: {other:?}"),
        }
    }
}

/// Finding 2: every distinct HTTP method used to become a label value, so random methods grew
/// `/metrics` without bound. 20,000 requests with random methods (and random paths) through
/// NGINX, and 2,000 at the embedded binary: every service's `/metrics` stays small, the methods
/// are counted as `other`.
#[actix_web::test]
async fn random_methods_and_paths_do_not_grow_the_metrics() {
    let stack = Stack::shared();
    let before = metrics_pages(&stack.url).await;
    send_random_methods(
        &stack.url,
        20_000,
        &["/api/token/", "/graphql/", "/api/token/"],
    )
    .await;
    let after = metrics_pages(&stack.url).await;
    for ((service, before), (_, after)) in before.iter().zip(&after) {
        let series = after
            .lines()
            .filter(|l| l.starts_with("http_request"))
            .count();
        assert!(series < 400, "{service}: {series} series");
        assert!(
            after.len() < before.len() + 64 * 1024,
            "{service}: /metrics grew from {} to {} bytes",
            before.len(),
            after.len()
        );
        assert!(
            !after.contains("method=\"Q"),
            "{service}: a random method is a label"
        );
    }
    assert!(
        after
            .iter()
            .any(|(_, page)| page.contains("method=\"other\"")),
        "the random methods were not counted"
    );

    let gqlws = Gqlws::start().await;
    send_random_methods(&gqlws.url, 2_000, &["/api/token/", "/graphql/", "/nowhere"]).await;
    let mut response = http()
        .get(format!("{}/metrics", gqlws.url))
        .send()
        .await
        .unwrap();
    let page =
        String::from_utf8_lossy(&response.body().limit(64 << 20).await.unwrap()).into_owned();
    let series = page
        .lines()
        .filter(|l| l.starts_with("http_request"))
        .count();
    assert!(series < 400, "gqlws: {series} series");
    assert!(page.contains("method=\"other\""));
    assert!(!page.contains("method=\"Q"));
}

/// Each service's `/metrics` through NGINX's private locations.
async fn metrics_pages(base_url: &str) -> Vec<(&'static str, String)> {
    let mut pages = Vec::new();
    for service in ["auth", "api", "gateway"] {
        let mut response = http()
            .get(format!("{base_url}/_/{service}/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{service}");
        let body = response.body().limit(512 << 20).await.unwrap();
        pages.push((service, String::from_utf8_lossy(&body).into_owned()));
    }
    pages
}

/// `count` requests with random methods ("Q" and 40 random capitals), 16 at a time, spread
/// over `paths` and random paths.
async fn send_random_methods(base_url: &str, count: usize, paths: &[&str]) {
    let client = awc::Client::builder().timeout(PATIENCE).finish();
    // xorshift64*, seeded from the clock: random enough for method names.
    let mut state = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(1) as u64 | 1;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut sent = 0;
    while sent < count {
        let batch: Vec<_> = (0..16.min(count - sent))
            .map(|n| {
                let method: String = std::iter::once('Q')
                    .chain((0..40).map(|_| (b'A' + (next() % 26) as u8) as char))
                    .collect();
                let path = if n % 4 == 3 {
                    format!("/api/token/{}", next())
                } else {
                    paths[(sent + n) % paths.len()].to_owned()
                };
                let method = awc::http::Method::from_bytes(method.as_bytes()).unwrap();
                client.request(method, format!("{base_url}{path}")).send()
            })
            .collect();
        for response in futures_util::future::join_all(batch).await {
            let response = response.unwrap();
            assert!(response.status().is_client_error(), "{}", response.status());
        }
        sent += 16;
    }
}

/// The epoch of the stack's event logs, from a real cursor.
async fn epoch_of(stack: &Stack, access: &str, pk: &str) -> String {
    let mut ws = crate::client::ws_subscribed(
        stack,
        "graphql-transport-ws",
        access,
        &format!("subscription {{ carModelUpdated(pk: {pk}) {{ id make }} }}"),
    )
    .await;
    for attempt in 0..20 {
        update_make(stack, access, pk, &format!("Epoch {attempt}")).await;
        if let Some(Incoming::Json(message)) = ws.answer_within(Duration::from_secs(2)).await {
            let cursor = message["payload"]["extensions"]["cursor"].as_str().unwrap();
            return cursor.split(':').next().unwrap().to_owned();
        }
    }
    panic!("no event reached the subscription");
}

/// Findings 6 and 8: forged far-past cursors each made the gateway read the whole retained log;
/// the largest cursor answered SERVICE_UNAVAILABLE with Redis's text. Now a position the log
/// does not hold is `recovered: false` without reading the log, and the largest one is
/// BAD_USER_INPUT.
#[actix_web::test]
async fn forged_cursors_are_answered_without_reading_the_log() {
    let stack = Stack::shared();
    let user = new_user(stack, "cursor");
    let (access, _) = tokens_of(stack, &user, USER_PASSWORD).await;
    let pk = create_car(stack, &access, "Forged").await;
    let epoch = epoch_of(stack, &access, &pk).await;
    // A log of some length to read, if the gateway read it.
    for n in 0..50 {
        update_make(stack, &access, &pk, &format!("Fill {n}")).await;
    }

    let entries_read = || async {
        let mut sum = 0.0;
        for port in &stack.gateway_ports {
            sum += crate::client::metric_sum(*port, "gateway_replay_entries_read_total").await;
        }
        sum
    };
    let read_before = entries_read().await;
    let query = format!("subscription {{ carModelUpdated(pk: {pk}) {{ id make }} }}");
    let mut sockets = Vec::new();
    for socket in 0..4 {
        let mut ws = crate::client::ws_connect(stack, "graphql-transport-ws")
            .await
            .unwrap();
        assert!(
            matches!(ws.init_answer(&access).await, Incoming::Json(ack) if ack["type"] == "connection_ack")
        );
        for n in 0..50 {
            let k = socket * 50 + n + 1;
            ws.send(
                json!({"id": format!("f{k}"), "type": "subscribe", "payload": {
                    "query": query,
                    "extensions": {"resumeFrom": format!("{epoch}:car.updated:0-{k}")},
                }}),
            )
            .await;
        }
        sockets.push(ws);
    }
    // The first result of each says the history did not cover it.
    let mut answered = 0;
    for attempt in 0..20 {
        update_make(stack, &access, &pk, &format!("Live {attempt}")).await;
        for ws in &mut sockets {
            while let Some(Incoming::Json(message)) =
                ws.answer_within(Duration::from_millis(300)).await
            {
                assert_eq!(message["type"], "next", "{message}");
                if message["payload"]["extensions"].get("recovered").is_some() {
                    assert_eq!(
                        message["payload"]["extensions"]["recovered"], false,
                        "{message}"
                    );
                    answered += 1;
                }
            }
        }
        if answered == 200 {
            break;
        }
    }
    assert_eq!(answered, 200, "forged cursors answered recovered: false");
    assert_eq!(
        entries_read().await - read_before,
        0.0,
        "the gateways read the log for forged cursors"
    );

    // The largest position: refused as the client's mistake.
    let ws = &mut sockets[0];
    ws.send(json!({"id": "max", "type": "subscribe", "payload": {
        "query": query,
        "extensions": {"resumeFrom": format!(
            "{epoch}:car.updated:18446744073709551615-18446744073709551615"
        )},
    }}))
    .await;
    loop {
        match ws.answer().await {
            Incoming::Json(message) if message["id"] == "max" => {
                assert_eq!(message["type"], "error", "{message}");
                assert_eq!(
                    message["payload"][0]["extensions"]["code"], "BAD_USER_INPUT",
                    "{message}"
                );
                break;
            }
            Incoming::Json(_) => {}
            other => panic!("{other:?}"),
        }
    }
}

/// Finding 8: a NUL in a string was INTERNAL_SERVER_ERROR on PostgreSQL and stored on SQLite;
/// now BAD_USER_INPUT on both.
#[actix_web::test]
async fn a_nul_in_a_string_is_bad_user_input_on_both_backends() {
    let mutation =
        "mutation($make: String!) { createCar(input: {make: $make, model: \"X\"}) { id } }";
    let variables = json!({"make": "Sko\u{0}da"});
    let stack = Stack::shared();
    let (access, _) = crate::client::admin_tokens(stack).await;
    let answer = graphql(
        stack,
        Some(&format!("Bearer {access}")),
        mutation,
        variables.clone(),
    )
    .await;
    assert_eq!(
        answer["errors"][0]["extensions"]["code"], "BAD_USER_INPUT",
        "{answer}"
    );

    let gqlws = Gqlws::start().await;
    let (access, _) = crate::client::admin_tokens_at(&gqlws.url).await;
    let mut response = http()
        .post(format!("{}/graphql/", gqlws.url))
        .insert_header(("Authorization", format!("Bearer {access}")))
        .send_json(&json!({"query": mutation, "variables": variables}))
        .await
        .unwrap();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer["errors"][0]["extensions"]["code"], "BAD_USER_INPUT",
        "{answer}"
    );
}

/// Finding 7: in the embedded mode, operations forwarded from the socket used to count against
/// 127.0.0.1 (the process's own address), so one user's load got another user's `{ hi }` a 429.
/// With `MAX_REQUESTS_PER_ADDRESS=4`, one client floods its socket with queries that wait for
/// the database (so that many are in flight at once) while another, from another address, asks
/// `{ hi }` on its own socket: the other is always served, the flood is limited.
#[actix_web::test]
async fn embedded_forwarded_operations_are_counted_per_client_address() {
    let gqlws = Gqlws::start_with(&[("MAX_REQUESTS_PER_ADDRESS", "4")]).await;
    let (access, _) = crate::client::admin_tokens_at(&gqlws.url).await;
    let ws_url = gqlws.ws_url();
    let attacker: IpAddr = "127.0.0.21".parse().unwrap();
    let victim: IpAddr = "127.0.0.22".parse().unwrap();

    let mut flood = WsClient::connect_from(&ws_url, "graphql-transport-ws", attacker).await;
    assert!(
        matches!(flood.init_answer(&access).await, Incoming::Json(ack) if ack["type"] == "connection_ack")
    );
    let mut calm = WsClient::connect_from(&ws_url, "graphql-transport-ws", victim).await;
    assert!(
        matches!(calm.init_answer(&access).await, Incoming::Json(ack) if ack["type"] == "connection_ack")
    );

    let mut attacker_limited = 0;
    for round in 0..10 {
        for n in 0..60 {
            flood
                .send(json!({"id": format!("a{round}-{n}"), "type": "subscribe",
                    "payload": {"query": "{ me { username } cars(first: 100) { totalCount } }"}}))
                .await;
        }
        calm.send(json!({"id": format!("v{round}"), "type": "subscribe",
            "payload": {"query": "{ hi }"}}))
            .await;
        loop {
            match calm.answer().await {
                Incoming::Json(message) if message["type"] == "next" => {
                    assert_eq!(message["payload"]["data"]["hi"], "Hi!", "{message}");
                }
                Incoming::Json(message) if message["type"] == "complete" => break,
                other => panic!("the calm client was refused: {other:?}"),
            }
        }
        // Drain the flood's answers: its own address is the one limited.
        let mut done = 0;
        while done < 60 {
            match flood.answer().await {
                Incoming::Json(message)
                    if message["type"] == "complete" || message["type"] == "error" =>
                {
                    if message["type"] == "error" {
                        attacker_limited += 1;
                    }
                    done += 1;
                }
                Incoming::Json(message) if message["type"] == "next" => {
                    if message["payload"]["errors"][0]["extensions"]["code"] == "RATE_LIMITED" {
                        attacker_limited += 1;
                    }
                }
                other => panic!("{other:?}"),
            }
        }
    }
    assert!(
        attacker_limited > 0,
        "the flood never reached the limit, so the test showed nothing"
    );
}
