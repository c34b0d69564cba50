//! Subscriptions over streamed HTTP: GraphQL over SSE (graphql-sse's distinct connections mode)
//! and Apollo's multipart subscriptions, on the gateway's `/graphql/`: each result with its
//! cursor as the SSE event's `id`, a resume by `Last-Event-ID` without gap or duplicate, one
//! execution shared with websocket subscribers, errors of a refused operation on the accepted
//! stream, an expired token ending the stream with an error and no `complete`, and requests
//! refused before a stream starts.

use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt as _;
use serde_json::{json, Value};
use tokens::jwt::TokenType;

use crate::helpers::{access, car, token, TestGateway, WsClient, CAR_UPDATED, MODEL_UPDATED};

const SSE: &str = "text/event-stream";
const MULTIPART: &str = "multipart/mixed;subscriptionSpec=\"1.0\", application/json";

type Body = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<bytes::Bytes, awc::error::PayloadError>>>,
>;

/// One streamed response, read as it comes.
struct Streamed {
    status: u16,
    content_type: String,
    body: Body,
    buffer: BytesMut,
}

async fn open(
    gateway: &TestGateway,
    accept: &str,
    token: Option<&str>,
    operation: Value,
    last_event_id: Option<&str>,
) -> Streamed {
    let mut request = awc::Client::builder()
        .timeout(Duration::from_secs(60))
        .finish()
        .post(format!("http://127.0.0.1:{}/graphql/", gateway.port))
        .insert_header(("Accept", accept));
    if let Some(token) = token {
        request = request.insert_header(("Authorization", format!("Bearer {token}")));
    }
    if let Some(id) = last_event_id {
        request = request.insert_header(("Last-Event-ID", id));
    }
    let response = request.send_json(&operation).await.unwrap();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Streamed {
        status: response.status().as_u16(),
        content_type,
        body: Box::pin(response),
        buffer: BytesMut::new(),
    }
}

impl Streamed {
    /// The text up to and including the next `separator`; `None` when the body ended first.
    async fn until(&mut self, separator: &[u8]) -> Option<String> {
        loop {
            if let Some(at) = self
                .buffer
                .windows(separator.len())
                .position(|window| window == separator)
            {
                let taken = self.buffer.split_to(at + separator.len());
                return Some(String::from_utf8(taken.to_vec()).unwrap());
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.body.next())
                .await
                .expect("nothing streamed within 10 s");
            match chunk {
                Some(Ok(bytes)) => self.buffer.extend_from_slice(&bytes),
                Some(Err(err)) => panic!("{err}"),
                None => return None,
            }
        }
    }

    /// The next SSE event that is not a keep-alive comment: (event, id, data).
    async fn event(&mut self) -> Option<(String, Option<String>, String)> {
        loop {
            let block = self.until(b"\n\n").await?;
            let (mut event, mut id, mut data) = (String::new(), None, String::new());
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    event = value.to_owned();
                } else if let Some(value) = line.strip_prefix("id: ") {
                    id = Some(value.to_owned());
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data = value.to_owned();
                }
            }
            if !event.is_empty() {
                return Some((event, id, data));
            }
        }
    }

    /// The next `next` event's payload and id.
    async fn next(&mut self) -> (Value, Option<String>) {
        let (event, id, data) = self.event().await.expect("the stream ended");
        assert_eq!(event, "next", "{data}");
        (serde_json::from_str(&data).unwrap(), id)
    }

    /// Whether the body ends within a short wait (after what it held).
    async fn ends(&mut self) -> bool {
        matches!(
            tokio::time::timeout(Duration::from_secs(5), async {
                while let Some(chunk) = self.body.next().await {
                    chunk.unwrap();
                }
            })
            .await,
            Ok(())
        )
    }
}

fn model_updated(pk: i64) -> Value {
    json!({"query": format!("subscription {{ carModelUpdated(pk: {pk}) {{ id make }} }}")})
}

/// Publishes until the stream's first result arrives (the protocol has no acknowledgement).
async fn first_result(
    gateway: &TestGateway,
    stream: &mut Streamed,
    pk: i64,
) -> (Value, Option<String>) {
    let publisher = async {
        for i in 0.. {
            gateway
                .publish(CAR_UPDATED, car(pk, &format!("warm-{i}")))
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        result = stream.next() => result,
        () = publisher => unreachable!(),
    }
}

#[actix_web::test]
async fn sse_streams_results_with_their_cursor_and_resumes_from_last_event_id() {
    let gateway = TestGateway::spawn(&[]).await;
    let mut stream = open(&gateway, SSE, Some(&access(1)), model_updated(3), None).await;
    assert_eq!(stream.status, 200);
    assert!(
        stream.content_type.starts_with("text/event-stream"),
        "{}",
        stream.content_type
    );
    let (payload, id) = first_result(&gateway, &mut stream, 3).await;
    let cursor = payload["extensions"]["cursor"].as_str().unwrap().to_owned();
    assert_eq!(
        id.as_deref(),
        Some(cursor.as_str()),
        "the event's id is the result's cursor"
    );
    // Let the warm-up's stragglers through, then the events of the test.
    while tokio::time::timeout(Duration::from_millis(300), stream.next())
        .await
        .is_ok()
    {}
    drop(stream);

    // Missed while disconnected, then resumed by Last-Event-ID: every one, once, in order.
    let (payload, _) = {
        let mut probe = open(&gateway, SSE, Some(&access(1)), model_updated(3), None).await;
        first_result(&gateway, &mut probe, 3).await
    };
    let resume_from = payload["extensions"]["cursor"].as_str().unwrap().to_owned();
    for make in ["a", "b", "c"] {
        gateway.publish(CAR_UPDATED, car(3, make)).await;
    }
    let mut resumed = open(
        &gateway,
        SSE,
        Some(&access(1)),
        model_updated(3),
        Some(&resume_from),
    )
    .await;
    let mut makes = Vec::new();
    let mut recovered = None;
    let mut first = true;
    while makes.len() < 3 {
        let (payload, id) = resumed.next().await;
        let make = payload["data"]["carModelUpdated"]["make"]
            .as_str()
            .unwrap()
            .to_owned();
        // The resumed stream's first result says whether the history covered the cursor.
        if first {
            recovered = payload["extensions"]["recovered"].as_bool();
            first = false;
        }
        if make.starts_with("warm") {
            continue;
        }
        assert_eq!(id.as_deref(), payload["extensions"]["cursor"].as_str());
        makes.push(make);
    }
    assert_eq!(makes, ["a", "b", "c"]);
    assert_eq!(recovered, Some(true));
    // And live after the replay.
    gateway.publish(CAR_UPDATED, car(3, "live")).await;
    let (payload, _) = resumed.next().await;
    assert_eq!(payload["data"]["carModelUpdated"]["make"], "live");
}

#[actix_web::test]
async fn one_execution_serves_websocket_and_sse_subscribers() {
    let gateway = TestGateway::spawn(&[]).await;
    let mut socket = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    socket.init(&access(1)).await;
    socket.subscribe("1", MODEL_UPDATED).await;
    let mut stream = open(
        &gateway,
        SSE,
        Some(&access(2)),
        json!({"query": MODEL_UPDATED}),
        None,
    )
    .await;
    first_result(&gateway, &mut stream, 1).await;
    let (_, metrics) = gateway.get("/metrics").await;
    assert!(
        metrics.contains("gateway_executions_active 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gateway_streams_open{transport=\"graphql-sse\"} 1"),
        "{metrics}"
    );
    // Both get the next one.
    while tokio::time::timeout(Duration::from_millis(300), stream.next())
        .await
        .is_ok()
    {}
    while socket
        .answer_within(Duration::from_millis(100))
        .await
        .is_some()
    {}
    gateway.publish(CAR_UPDATED, car(1, "both")).await;
    let (payload, _) = stream.next().await;
    assert_eq!(payload["data"]["carModelUpdated"]["make"], "both");
    let message = socket.expect_json().await;
    assert_eq!(
        message["payload"]["data"]["carModelUpdated"]["make"],
        "both"
    );
}

#[actix_web::test]
async fn multipart_streams_payload_parts_and_heartbeats() {
    let gateway = TestGateway::spawn(&["--keepalive-secs=1"]).await;
    let mut stream = open(
        &gateway,
        MULTIPART,
        Some(&access(1)),
        model_updated(4),
        None,
    )
    .await;
    assert_eq!(stream.status, 200);
    assert!(
        stream.content_type.starts_with("multipart/mixed")
            && stream.content_type.contains("boundary=\"graphql\""),
        "{}",
        stream.content_type
    );
    assert_eq!(
        stream.until(b"--graphql").await.as_deref(),
        Some("\r\n--graphql")
    );
    // A heartbeat part within the keep-alive interval.
    let part = stream.until(b"--graphql").await.unwrap();
    assert_eq!(
        part,
        "\r\ncontent-type: application/json\r\n\r\n{}\r\n--graphql"
    );
    gateway.publish(CAR_UPDATED, car(4, "multi")).await;
    loop {
        let part = stream.until(b"--graphql").await.unwrap();
        let json_text = part
            .split("\r\n\r\n")
            .nth(1)
            .unwrap()
            .trim_end_matches("\r\n--graphql");
        let part: Value = serde_json::from_str(json_text).unwrap();
        if part == json!({}) {
            continue;
        }
        assert_eq!(
            part["payload"]["data"]["carModelUpdated"]["make"], "multi",
            "{part}"
        );
        break;
    }
}

#[actix_web::test]
async fn an_expired_token_ends_the_stream_with_an_error_and_no_complete() {
    let gateway = TestGateway::spawn(&[]).await;
    let short = token(1, TokenType::Access, 2);
    let mut stream = open(&gateway, SSE, Some(&short), model_updated(5), None).await;
    assert_eq!(stream.status, 200);
    let (event, _, data) = tokio::time::timeout(Duration::from_secs(10), stream.event())
        .await
        .expect("the stream should end within its token's life")
        .expect("an error event before the end");
    assert_eq!(event, "next");
    let data: Value = serde_json::from_str(&data).unwrap();
    assert_eq!(
        data["errors"][0]["extensions"]["code"], "UNAUTHENTICATED",
        "{data}"
    );
    assert!(stream.ends().await);
    assert!(stream.buffer.is_empty(), "no complete after the error");
}

#[actix_web::test]
async fn refusals_before_and_after_the_stream_starts() {
    let gateway = TestGateway::spawn(&[]).await;
    // No token or a bad one: 401 with a GraphQL error, as api-service answers.
    for bad in [None, Some("not.a.jwt")] {
        let mut refused = open(&gateway, SSE, bad, model_updated(1), None).await;
        assert_eq!(refused.status, 401);
        let body = refused.until(b"}]}").await.unwrap();
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["errors"][0]["extensions"]["code"], "UNAUTHENTICATED");
    }
    // A document that does not validate: a result with the errors, then `complete`, on the
    // accepted stream (graphql-sse's rule: a 400 would tell an EventSource nothing).
    let mut invalid = open(
        &gateway,
        SSE,
        Some(&access(1)),
        json!({"query": "subscription { nope }"}),
        None,
    )
    .await;
    assert_eq!(invalid.status, 200);
    let (payload, _) = invalid.next().await;
    assert!(payload["errors"][0]["message"].is_string(), "{payload}");
    let (event, _, _) = invalid.event().await.unwrap();
    assert_eq!(event, "complete");
    assert!(invalid.ends().await);
    // A bad cursor is the client's error, as on the websocket.
    let mut bad_cursor = open(
        &gateway,
        SSE,
        Some(&access(1)),
        model_updated(1),
        Some("nope"),
    )
    .await;
    let (payload, _) = bad_cursor.next().await;
    assert_eq!(
        payload["errors"][0]["extensions"]["code"], "BAD_USER_INPUT",
        "{payload}"
    );
}

/// A subscription by hash (Apollo's automatic persisted queries), on the socket and on a
/// stream: unknown at first, registered with its document, then known to the others.
#[actix_web::test]
async fn persisted_subscriptions_by_hash() {
    let gateway = TestGateway::spawn(&[]).await;
    let query = "subscription ByHash { carModelUpdated(pk: 6) { id make } }";
    let hash = graphql_schema::persisted::sha256_hex(query);
    let extensions = json!({"persistedQuery": {"version": 1, "sha256Hash": hash}});
    let mut socket = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    socket.init(&access(1)).await;
    socket
        .send(json!({"id": "a", "type": "subscribe", "payload": {"extensions": extensions}}))
        .await;
    let refused = socket.expect_json().await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(
        refused["payload"][0]["extensions"]["code"],
        "PERSISTED_QUERY_NOT_FOUND"
    );
    socket
        .send(json!({"id": "b", "type": "subscribe",
                     "payload": {"query": query, "extensions": extensions}}))
        .await;
    // Registered: a stream by hash alone runs it.
    let mut stream = open(
        &gateway,
        SSE,
        Some(&access(2)),
        json!({"extensions": extensions}),
        None,
    )
    .await;
    let (payload, _) = first_result(&gateway, &mut stream, 6).await;
    assert!(
        payload["data"]["carModelUpdated"]["make"].is_string(),
        "{payload}"
    );
    let message = socket.expect_json().await;
    assert_eq!(
        (message["type"].as_str(), message["id"].as_str()),
        (Some("next"), Some("b"))
    );
}

#[actix_web::test]
async fn trusted_documents_only_on_the_socket_and_the_streams() {
    let dir = std::env::temp_dir().join(format!(
        "gqlws-trusted-gw-{}",
        test_support::random_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = dir.join("manifest.json");
    let trusted = "subscription Trusted { carModelUpdated(pk: 7) { id make } }";
    std::fs::write(
        &manifest,
        json!({"operations": [{"id": graphql_schema::persisted::sha256_hex(trusted), "body": trusted}]})
            .to_string(),
    )
    .unwrap();
    let gateway =
        TestGateway::spawn(&[&format!("--trusted-documents={}", manifest.display())]).await;
    let mut socket = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    socket.init(&access(1)).await;
    socket.subscribe("1", MODEL_UPDATED).await;
    let refused = socket.expect_json().await;
    assert_eq!(
        refused["payload"][0]["extensions"]["code"],
        "PERSISTED_QUERY_NOT_IN_LIST"
    );
    let mut refused = open(
        &gateway,
        SSE,
        Some(&access(1)),
        json!({"query": MODEL_UPDATED}),
        None,
    )
    .await;
    let (payload, _) = refused.next().await;
    assert_eq!(
        payload["errors"][0]["extensions"]["code"],
        "PERSISTED_QUERY_NOT_IN_LIST"
    );
    // The manifest's own document runs.
    let mut stream = open(
        &gateway,
        SSE,
        Some(&access(1)),
        json!({"query": trusted}),
        None,
    )
    .await;
    let (payload, _) = first_result(&gateway, &mut stream, 7).await;
    assert!(
        payload["data"]["carModelUpdated"]["make"].is_string(),
        "{payload}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Streams count as sockets do: one user's stream and websocket share MAX_CONNECTIONS_PER_USER.
#[actix_web::test]
async fn streams_and_sockets_share_the_per_user_count() {
    let gateway = TestGateway::spawn(&["--max-connections-per-user=1"]).await;
    let mut stream = open(&gateway, SSE, Some(&access(1)), model_updated(9), None).await;
    assert_eq!(stream.status, 200);
    first_result(&gateway, &mut stream, 9).await;
    let mut second = open(
        &gateway,
        MULTIPART,
        Some(&access(1)),
        model_updated(9),
        None,
    )
    .await;
    assert_eq!(second.status, 429);
    let body = second.until(b"}]}").await.unwrap();
    assert!(body.contains("TOO_MANY_CONNECTIONS"), "{body}");
    let mut socket = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    socket
        .send(json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {}", access(1))}}))
        .await;
    let (code, _) = socket.expect_close().await;
    assert_eq!(code, Some(1008));
    // Another user is not affected.
    let other = open(&gateway, SSE, Some(&access(2)), model_updated(9), None).await;
    assert_eq!(other.status, 200);
}

/// A client that does not read: once its kernel buffers and OUTBOUND_QUEUE (4 here) are full,
/// the stream ends with a SLOW_CONSUMER error and no `complete`, and the client resumes.
#[actix_web::test]
async fn a_stream_that_is_not_read_ends_as_slow() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let gateway = TestGateway::spawn(&["--outbound-queue=4", "--fanout-buffer=200000"]).await;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let address: std::net::SocketAddr = format!("127.0.0.1:{}", gateway.port).parse().unwrap();
    socket.connect(&address.into()).unwrap();
    socket.set_nonblocking(true).unwrap();
    let mut client = tokio::net::TcpStream::from_std(socket.into()).unwrap();
    let body = model_updated(8).to_string();
    let request = format!(
        "POST /graphql/ HTTP/1.0\r\nAccept: text/event-stream\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        access(1),
        body.len()
    );
    client.write_all(request.as_bytes()).await.unwrap();
    gateway.settle().await;
    gateway.settle().await;
    gateway.burst_on(8, 40_000).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), client.read_to_end(&mut received))
        .await
        .expect("the stream should end")
        .unwrap();
    let text = String::from_utf8_lossy(&received);
    let results = text.matches("event: next").count();
    assert!(
        text.contains("SLOW_CONSUMER"),
        "{}",
        &text[text.len().saturating_sub(400)..]
    );
    assert!(!text.contains("event: complete"));
    assert!(
        results < 40_000,
        "{results} results: the client was never found slow"
    );
    let (_, metrics) = gateway.get("/metrics").await;
    assert!(
        metrics.contains("gateway_slow_consumers_total 1"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("slow"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
