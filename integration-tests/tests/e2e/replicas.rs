//! Two gateway and two api processes behind NGINX, each test on a stack of its own (they count
//! connections and kill a process): subscribers spread over both gateways receive every event of
//! mutations served by either api; a killed gateway's clients reconnect through NGINX and keep
//! receiving.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::client::{
    admin_tokens, create_car, graphql_requests_served, metric_sum, update_make, ws_connect,
    ws_subscribed, WsClient, PATIENCE,
};
use crate::stack::Stack;

const PROTOCOLS: [&str; 2] = ["graphql-transport-ws", "graphql-ws"];

/// A subscriber of one car's updates that, like a real client, reconnects through NGINX and
/// subscribes again when its socket closes.
struct Subscriber {
    client: WsClient,
    protocol: &'static str,
    token: String,
    query: String,
    reconnects: usize,
}

impl Subscriber {
    async fn start(stack: &Stack, protocol: &'static str, token: &str, pk: &str) -> Subscriber {
        let query = format!("subscription {{ carModelUpdated(pk: {pk}) {{ make }} }}");
        Subscriber {
            client: ws_subscribed(stack, protocol, token, &query).await,
            protocol,
            token: token.to_owned(),
            query,
            reconnects: 0,
        }
    }

    /// The make of the next update within `wait`, reconnecting first when the socket closed.
    async fn next_make_within(&mut self, stack: &Stack, wait: Duration) -> Option<String> {
        match self.client.next_payload_within(wait).await {
            Ok(Some(payload)) => Some(
                payload["data"]["carModelUpdated"]["make"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{}: {payload}", self.protocol))
                    .to_owned(),
            ),
            Ok(None) => None,
            Err(_closed) => {
                self.reconnect(stack).await;
                None
            }
        }
    }

    async fn reconnect(&mut self, stack: &Stack) {
        for _ in 0..100 {
            if let Ok(mut client) = ws_connect(stack, self.protocol).await {
                if let crate::client::Incoming::Json(ack) = client.init_answer(&self.token).await {
                    if ack["type"] == "connection_ack" {
                        client.subscribe("1", &self.query).await;
                        self.client = client;
                        self.reconnects += 1;
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("{}: could not reconnect through NGINX", self.protocol);
    }
}

/// Mutates until every subscriber has received an update whose make starts with `tag`.
async fn until_everyone_receives(
    stack: &Stack,
    access: &str,
    pk: &str,
    subscribers: &mut [Subscriber],
    tag: &str,
) {
    let mut done = vec![false; subscribers.len()];
    for round in 0..30 {
        update_make(stack, access, pk, &format!("{tag}-{round}")).await;
        for (subscriber, done) in subscribers.iter_mut().zip(done.iter_mut()) {
            while !*done {
                match subscriber
                    .next_make_within(stack, Duration::from_secs(2))
                    .await
                {
                    Some(make) => *done = make.starts_with(tag),
                    None => break,
                }
            }
        }
        if done.iter().all(|d| *d) {
            return;
        }
    }
    panic!("not every subscriber received a `{tag}` update: {done:?}");
}

async fn open_connections(gateway_port: u16) -> f64 {
    metric_sum(gateway_port, "gateway_connections_open ").await
}

/// Subscribers to car `pk`, opened through NGINX until each gateway holds at least
/// `per_gateway` of them. NGINX (least_conn) sends each to the replica holding fewer, and one
/// still starting refuses it to the other; so the count is checked, not assumed.
async fn spread_subscribers(
    stack: &Stack,
    access: &str,
    pk: &str,
    per_gateway: f64,
) -> Vec<Subscriber> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut subscribers = Vec::new();
    loop {
        let protocol = PROTOCOLS[subscribers.len() % 2];
        subscribers.push(Subscriber::start(stack, protocol, access, pk).await);
        let mut spread = true;
        for port in &stack.gateway_ports {
            spread &= open_connections(*port).await >= per_gateway;
        }
        if spread {
            return subscribers;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "NGINX did not spread {} subscribers over both gateways",
            subscribers.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// GraphQL requests each api process has answered.
async fn served_per_api(stack: &Stack) -> Vec<f64> {
    futures_util::future::join_all(stack.api_ports.iter().map(|p| graphql_requests_served(*p)))
        .await
}

#[actix_web::test]
async fn subscribers_on_both_gateways_receive_mutations_served_by_either_api() {
    let stack = Stack::start("fanout");
    let (access, _) = admin_tokens(&stack).await;
    let pk = create_car(&stack, &access, "fanout").await;
    let mut subscribers = spread_subscribers(&stack, &access, &pk, 3.0).await;
    until_everyone_receives(&stack, &access, &pk, &mut subscribers, "warm-up").await;

    // Mutations through NGINX until each api process has served some of them (it too may
    // keep away from a replica for a few seconds after the start; see spread_subscribers).
    let before = served_per_api(&stack).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut sent = BTreeSet::new();
    loop {
        let make = format!("fan-out-{}", sent.len());
        update_make(&stack, &access, &pk, &make).await;
        sent.insert(make);
        let now = served_per_api(&stack).await;
        if sent.len() >= 4 && now.iter().zip(&before).all(|(now, before)| now > before) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "NGINX did not use both api processes: {before:?} -> {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every subscriber, on either gateway, receives every one of them.
    for (n, subscriber) in subscribers.iter_mut().enumerate() {
        let mut received = BTreeSet::new();
        while !sent.is_subset(&received) {
            let make = subscriber
                .next_make_within(&stack, PATIENCE)
                .await
                .unwrap_or_else(|| panic!("subscriber {n} got only {received:?} of {sent:?}"));
            if make.starts_with("fan-out-") {
                received.insert(make);
            }
        }
        assert_eq!(subscriber.reconnects, 0, "subscriber {n} lost its socket");
    }
}

#[actix_web::test]
async fn a_killed_gateways_clients_reconnect_through_nginx_and_keep_receiving() {
    let stack = Stack::start("failover");
    let (access, _) = admin_tokens(&stack).await;
    let pk = create_car(&stack, &access, "failover").await;
    let mut subscribers = spread_subscribers(&stack, &access, &pk, 2.0).await;
    until_everyone_receives(&stack, &access, &pk, &mut subscribers, "before").await;
    let on_victim = open_connections(stack.gateway_ports[0]).await as usize;
    let on_survivor = open_connections(stack.gateway_ports[1]).await as usize;
    assert_eq!(
        on_victim + on_survivor,
        subscribers.len(),
        "subscribers per gateway: {on_victim} and {on_survivor}"
    );

    // SIGKILL: no drain, no close frame from the gateway.
    let process = "subscription-gateway:subscription-gateway-0";
    let victim = stack.pid_of(process);
    let status = std::process::Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    // Its clients notice, reconnect through NGINX and receive what follows; the others never
    // lose their socket.
    until_everyone_receives(&stack, &access, &pk, &mut subscribers, "after").await;
    let reconnected = subscribers.iter().filter(|s| s.reconnects > 0).count();
    assert_eq!(
        reconnected, on_victim,
        "clients that reconnected vs. clients the killed gateway held"
    );

    // supervisord brought the killed process back.
    let mut restarted = false;
    for _ in 0..100 {
        let out = stack.supervisorctl(&["pid", process]);
        if matches!(out.trim().parse::<u32>(), Ok(pid) if pid != victim && pid != 0) {
            restarted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(restarted, "supervisord did not restart {process}");
}

/// A mutation sent on a websocket is run by api-service (the gateway forwards it), whose event
/// reaches the subscribers of every gateway through Redis, as one sent over HTTP does.
#[actix_web::test]
async fn a_mutation_sent_on_the_socket_reaches_subscribers_on_both_gateways() {
    let stack = Stack::start("socket-mutation");
    let (access, _) = admin_tokens(&stack).await;
    let pk = create_car(&stack, &access, "socket-mutation").await;
    let mut subscribers = spread_subscribers(&stack, &access, &pk, 1.0).await;
    until_everyone_receives(&stack, &access, &pk, &mut subscribers, "warm-up").await;

    let mutation =
        format!(r#"mutation {{ updateCar(pk: {pk}, input: {{make: "via-socket"}}) {{ make }} }}"#);
    let mut node = crate::client::NodeSubscriber::spawn(
        &stack.ws_url(),
        "graphql-ws",
        Some(&access),
        &mutation,
        1,
    );
    assert_eq!(node.next().await, serde_json::json!({"connected": true}));
    let answer = node.next().await;
    assert_eq!(
        answer["payload"]["data"]["updateCar"]["make"], "via-socket",
        "{answer}"
    );
    for (n, subscriber) in subscribers.iter_mut().enumerate() {
        loop {
            let make = subscriber
                .next_make_within(&stack, PATIENCE)
                .await
                .unwrap_or_else(|| panic!("subscriber {n} did not receive the socket's mutation"));
            if make == "via-socket" {
                break;
            }
        }
        assert_eq!(subscriber.reconnects, 0, "subscriber {n} lost its socket");
    }
}
