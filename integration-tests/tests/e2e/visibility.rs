//! Private cars leak nowhere, with the npm clients (`graphql-ws` and
//! `subscriptions-transport-ws`) through NGINX on the shared stack and against the embedded
//! binary: a user who is not the owner never receives a private car over `car`, `cars`,
//! `carModelUpdated`, `carCreated`, `carDeleted`, a resume replay across the moment the car
//! became private, or a query sent on the socket; the owner and staff (`admin`) do. A car made
//! private disappears for the others without a notice; made public, it reaches them again.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::{
    admin_tokens_at, create_user, http, post_token, NodeSubscriber, WsClient, PATIENCE,
    USER_PASSWORD,
};
use crate::embedded::Gqlws;
use crate::stack::Stack;

const CLIENTS: [&str; 2] = ["graphql-ws", "subscriptions-transport-ws"];

/// Where the test runs: the distributed stack behind NGINX, or the embedded binary.
enum Mode<'a> {
    Stack(&'a Stack),
    Embedded(&'a Gqlws),
}

impl Mode<'_> {
    fn url(&self) -> &str {
        match self {
            Mode::Stack(stack) => &stack.url,
            Mode::Embedded(gqlws) => &gqlws.url,
        }
    }

    fn ws_url(&self) -> String {
        match self {
            Mode::Stack(stack) => stack.ws_url(),
            Mode::Embedded(gqlws) => gqlws.ws_url(),
        }
    }

    /// A user of the test's own, made with the operator's command of the mode; its access token.
    async fn new_user(&self, label: &str) -> String {
        let username = format!("{label}-{}", test_support::random_suffix());
        match self {
            Mode::Stack(stack) => create_user(stack, &username, USER_PASSWORD),
            Mode::Embedded(gqlws) => gqlws.create_user(&username, USER_PASSWORD),
        }
        let (status, body) = post_token(self.url(), &username, USER_PASSWORD).await;
        assert_eq!(status, 200, "{body}");
        body["access"].as_str().unwrap().to_owned()
    }

    async fn graphql(&self, access: &str, query: &str, variables: Value) -> Value {
        let mut response = http()
            .post(format!("{}/graphql/", self.url()))
            .insert_header(("Authorization", format!("Bearer {access}")))
            .send_json(&json!({"query": query, "variables": variables}))
            .await
            .unwrap();
        serde_json::from_slice(&response.body().await.unwrap()).unwrap()
    }

    async fn create_car(&self, access: &str, make: &str, private: bool) -> String {
        let answer = self
            .graphql(
                access,
                "mutation($make: String!, $private: Boolean) { createCar(input: \
                 {make: $make, model: \"Octavia\", private: $private}) { id private } }",
                json!({"make": make, "private": private}),
            )
            .await;
        assert_eq!(answer["data"]["createCar"]["private"], private, "{answer}");
        answer["data"]["createCar"]["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn update_car(&self, access: &str, pk: &str, patch: Value) {
        let answer = self
            .graphql(
                access,
                "mutation($pk: ID!, $patch: CarPatch!) { updateCar(pk: $pk, input: $patch) { id } }",
                json!({"pk": pk, "patch": patch}),
            )
            .await;
        assert_eq!(answer["data"]["updateCar"]["id"], pk, "{answer}");
    }

    async fn delete_car(&self, access: &str, pk: &str) {
        let answer = self
            .graphql(
                access,
                "mutation($pk: ID!) { deleteCar(pk: $pk) { id } }",
                json!({"pk": pk}),
            )
            .await;
        assert_eq!(answer["data"]["deleteCar"]["id"], pk, "{answer}");
    }
}

/// An npm client subscribed with `access` to `query`, acknowledged.
async fn subscriber(mode: &Mode<'_>, client: &str, access: &str, query: &str) -> NodeSubscriber {
    let mut node = NodeSubscriber::spawn(&mode.ws_url(), client, Some(access), query, 1000);
    assert_eq!(node.next().await, json!({"connected": true}), "{client}");
    node
}

/// The result object of `field` in the next payload, within `wait`.
async fn next_result(node: &mut NodeSubscriber, field: &str, wait: Duration) -> Option<Value> {
    let line = node.next_within(wait).await?;
    assert!(line.get("payload").is_some(), "{line}");
    Some(line["payload"]["data"][field].clone())
}

/// The makes of the next `count` results of `field` whose id is one of `ids`, skipping others
/// (the shared stack's other tests create and delete cars too).
async fn makes_of(
    node: &mut NodeSubscriber,
    field: &str,
    ids: &[&str],
    count: usize,
) -> Vec<String> {
    let mut makes = Vec::new();
    while makes.len() < count {
        let result = next_result(node, field, PATIENCE)
            .await
            .unwrap_or_else(|| panic!("{field}: {makes:?} and then nothing"));
        if ids.contains(&result["id"].as_str().unwrap_or_default()) {
            makes.push(result["make"].as_str().unwrap().to_owned());
        }
    }
    makes
}

/// Writes with `write(i)` until every subscriber has shown one of them: the protocol does not
/// acknowledge a subscription, so this is how a test knows they all listen. Returns each
/// subscriber's last warm-up cursor.
async fn warm_up<F, Fut>(nodes: &mut [&mut NodeSubscriber], field: &str, write: F) -> Vec<String>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut cursors: Vec<Option<String>> = vec![None; nodes.len()];
    let deadline = Instant::now() + PATIENCE;
    let mut round = 0;
    while cursors.iter().any(Option::is_none) {
        assert!(
            Instant::now() < deadline,
            "the subscribers never all listened"
        );
        write(round).await;
        round += 1;
        for (node, cursor) in nodes.iter_mut().zip(cursors.iter_mut()) {
            while let Some(line) = node.next_within(Duration::from_millis(300)).await {
                let make = line["payload"]["data"][field]["make"]
                    .as_str()
                    .unwrap_or_default();
                if make.starts_with("warm") {
                    *cursor = line["payload"]["extensions"]["cursor"]
                        .as_str()
                        .map(str::to_owned);
                }
            }
        }
    }
    cursors.into_iter().flatten().collect()
}

/// A raw graphql-transport-ws client resuming `query` from `cursor`: the makes of the first
/// `count` results and whether the first said `recovered`; then nothing more within a moment.
async fn resumed(
    mode: &Mode<'_>,
    access: &str,
    query: &str,
    cursor: &str,
    count: usize,
) -> (Vec<String>, Value) {
    let mut client = WsClient::connect(&mode.ws_url(), "graphql-transport-ws").await;
    assert_eq!(client.init(access).await["type"], "connection_ack");
    client
        .send(json!({"id": "1", "type": "subscribe", "payload": {
            "query": query, "extensions": {"resumeFrom": cursor}}}))
        .await;
    let mut makes = Vec::new();
    let mut recovered = Value::Null;
    for index in 0..count {
        let message = client.expect_json().await;
        assert_eq!(message["type"], "next", "{message}");
        if index == 0 {
            recovered = message["payload"]["extensions"]["recovered"].clone();
        }
        makes.push(
            message["payload"]["data"]["carModelUpdated"]["make"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    if let Some(message) = client.answer_within(Duration::from_millis(500)).await {
        panic!("after {makes:?}: {message:?}");
    }
    (makes, recovered)
}

async fn nothing_leaks(mode: Mode<'_>, client: &str) {
    let owner = mode.new_user("owner").await;
    let other = mode.new_user("other").await;
    let (admin, _) = admin_tokens_at(mode.url()).await;

    // carModelUpdated: the owner's car, public while everyone starts listening.
    let pk = mode.create_car(&owner, "start", false).await;
    let query = format!("subscription {{ carModelUpdated(pk: {pk}) {{ id make private }} }}");
    let mut owners = subscriber(&mode, client, &owner, &query).await;
    let mut others = subscriber(&mode, client, &other, &query).await;
    let mut staffs = subscriber(&mode, client, &admin, &query).await;
    let cursors = warm_up(
        &mut [&mut owners, &mut others, &mut staffs],
        "carModelUpdated",
        |i| mode.update_car(&owner, &pk, json!({"make": format!("warm-{i}")})),
    )
    .await;
    mode.update_car(&owner, &pk, json!({"make": "hidden-1", "private": true}))
        .await;
    mode.update_car(&owner, &pk, json!({"make": "hidden-2"}))
        .await;
    mode.update_car(
        &owner,
        &pk,
        json!({"make": "public-again", "private": false}),
    )
    .await;
    let ids = [pk.as_str()];
    let every = ["hidden-1", "hidden-2", "public-again"];
    assert_eq!(
        makes_of(&mut owners, "carModelUpdated", &ids, 3).await,
        every,
        "{client}"
    );
    assert_eq!(
        makes_of(&mut staffs, "carModelUpdated", &ids, 3).await,
        every,
        "{client}"
    );
    assert_eq!(
        makes_of(&mut others, "carModelUpdated", &ids, 1).await,
        ["public-again"],
        "{client}: the other user"
    );

    // A resume from before it became private: the replay withholds what the other may not read.
    let cursor = &cursors[1];
    let (makes, recovered) = resumed(&mode, &other, &query, cursor, 1).await;
    assert_eq!(
        (makes, recovered),
        (vec!["public-again".to_owned()], json!(true))
    );
    let (makes, recovered) = resumed(&mode, &owner, &query, &cursors[0], 3).await;
    assert_eq!(
        (makes, recovered),
        (every.map(str::to_owned).to_vec(), json!(true))
    );

    // carCreated and carDeleted: only the public car reaches the other.
    let mut created = subscriber(
        &mode,
        client,
        &other,
        "subscription { carCreated { id make } }",
    )
    .await;
    let mut deleted = subscriber(
        &mode,
        client,
        &other,
        "subscription { carDeleted { id make } }",
    )
    .await;
    let (mode_ref, owner_ref) = (&mode, &owner);
    warm_up(&mut [&mut created], "carCreated", move |i| async move {
        mode_ref
            .create_car(owner_ref, &format!("warm-created-{i}"), false)
            .await;
    })
    .await;
    warm_up(&mut [&mut deleted], "carDeleted", move |i| async move {
        let pk = mode_ref
            .create_car(owner_ref, &format!("warm-deleted-{i}"), false)
            .await;
        mode_ref.delete_car(owner_ref, &pk).await;
    })
    .await;
    let secret = mode.create_car(&owner, "secret", true).await;
    let open = mode.create_car(&owner, "open", false).await;
    mode.delete_car(&owner, &secret).await;
    mode.delete_car(&owner, &open).await;
    let ids = [secret.as_str(), open.as_str()];
    assert_eq!(
        makes_of(&mut created, "carCreated", &ids, 1).await,
        ["open"],
        "{client}"
    );
    assert_eq!(
        makes_of(&mut deleted, "carDeleted", &ids, 1).await,
        ["open"],
        "{client}"
    );

    // Queries: over HTTP and sent on the socket, the private car is not found for the other.
    mode.update_car(&owner, &pk, json!({"make": "hidden-3", "private": true}))
        .await;
    let read = format!("{{ car(pk: {pk}) {{ make }} }}");
    let page = format!(
        "{{ cars(first: 1, after: \"{}\") {{ nodes {{ id }} }} }}",
        pk.parse::<i64>().unwrap() - 1
    );
    for (access, make) in [
        (&owner, json!("hidden-3")),
        (&admin, json!("hidden-3")),
        (&other, Value::Null),
    ] {
        let answer = mode.graphql(access, &read, json!({})).await;
        assert_eq!(answer["data"]["car"]["make"], make, "{answer}");
        let mut node = NodeSubscriber::spawn(&mode.ws_url(), client, Some(access), &read, 1);
        assert_eq!(node.next().await, json!({"connected": true}), "{client}");
        let line = node.next().await;
        assert_eq!(
            line["payload"]["data"]["car"]["make"], make,
            "{client}: {line}"
        );
    }
    let listed = mode.graphql(&other, &page, json!({})).await;
    assert_ne!(
        listed["data"]["cars"]["nodes"][0]["id"],
        pk.as_str(),
        "{listed}"
    );
    let listed = mode.graphql(&owner, &page, json!({})).await;
    assert_eq!(
        listed["data"]["cars"]["nodes"][0]["id"],
        pk.as_str(),
        "{listed}"
    );
    // Changing it is "not found" for the other, on the socket as over HTTP.
    let change = format!(r#"mutation {{ updateCar(pk: {pk}, input: {{make: "mine"}}) {{ id }} }}"#);
    let mut node = NodeSubscriber::spawn(&mode.ws_url(), client, Some(&other), &change, 1);
    assert_eq!(node.next().await, json!({"connected": true}), "{client}");
    let line = node.next().await;
    assert!(line.to_string().contains("NOT_FOUND"), "{client}: {line}");
    let answer = mode.graphql(&other, &change, json!({})).await;
    assert_eq!(
        answer["errors"][0]["extensions"]["code"], "NOT_FOUND",
        "{answer}"
    );
}

#[actix_web::test]
async fn private_cars_leak_nowhere_through_nginx() {
    for client in CLIENTS {
        nothing_leaks(Mode::Stack(Stack::shared()), client).await;
    }
}

#[actix_web::test]
async fn private_cars_leak_nowhere_in_the_embedded_binary() {
    let gqlws = Gqlws::start().await;
    for client in CLIENTS {
        nothing_leaks(Mode::Embedded(&gqlws), client).await;
    }
}
