//! Negotiation, limits, keep-alive, slow consumers and the SIGTERM drain.

use crate::helpers::CAR_UPDATED;
use std::time::Duration;

use awc::ws;
use serde_json::json;

use crate::helpers::{
    access, car, close_code_after_results, Incoming, TestGateway, WsClient, CAR_CREATED,
    MODEL_UPDATED,
};

#[actix_web::test]
async fn a_request_without_a_known_subprotocol_is_refused_with_the_supported_ones() {
    let gateway = TestGateway::spawn(&[]).await;
    for protocol in [None, Some("mqtt")] {
        let refused = WsClient::try_connect(&gateway.url(), protocol, None).await;
        assert_eq!(
            refused.as_ref().err(),
            Some(&400),
            "{protocol:?} was accepted"
        );
    }
    // A plain GET is told to upgrade (awc reads no body from a 426 that carries `Upgrade`).
    let (status, _) = gateway.get("/graphql").await;
    assert_eq!(status, 426);
}

#[actix_web::test]
async fn init_timeout_is_4408_and_a_second_init_is_4429() {
    let gateway = TestGateway::spawn(&["--init-timeout-secs=1"]).await;
    let mut idle = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    assert_eq!(idle.expect_close().await.0, Some(4408));

    let mut twice = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    twice.init(&access(1)).await;
    twice
        .send(json!({"type": "connection_init", "payload": {}}))
        .await;
    assert_eq!(twice.expect_close().await.0, Some(4429));
}

#[actix_web::test]
async fn duplicate_ids_are_4409_and_the_subscription_limit_is_an_error() {
    let gateway = TestGateway::spawn(&["--max-subscriptions-per-connection=2"]).await;
    let mut client = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    client.init(&access(1)).await;
    for id in ["1", "2"] {
        client
            .send(json!({"id": id, "type": "subscribe", "payload": {"query": MODEL_UPDATED}}))
            .await;
    }
    client
        .send(json!({"id": "3", "type": "subscribe", "payload": {"query": MODEL_UPDATED}}))
        .await;
    let error = client.expect_json().await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["id"], "3");
    assert_eq!(
        error["payload"][0]["extensions"]["code"],
        "TOO_MANY_SUBSCRIPTIONS"
    );

    client
        .send(json!({"id": "1", "type": "subscribe", "payload": {"query": MODEL_UPDATED}}))
        .await;
    let (code, reason) = client.expect_close().await;
    assert_eq!(code, Some(4409));
    assert!(reason.contains("already exists"));
}

#[actix_web::test]
async fn invalid_documents_and_queries_api_service_cannot_answer_get_an_error_for_that_operation() {
    // Queries and mutations go to api-service (forward.rs); here nothing listens where it
    // should be. (Answered ones are tested end to end: integration-tests' socket_operations.)
    let api = format!(
        "--api-internal-url=http://127.0.0.1:{}/graphql",
        test_support::free_port()
    );
    let gateway = TestGateway::spawn(&[&api]).await;
    let mut client = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    client.init(&access(1)).await;
    client
        .send(json!({"id": "q", "type": "subscribe", "payload": {"query": "{ hi }"}}))
        .await;
    let error = client.expect_json().await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["id"], "q");
    assert_eq!(
        error["payload"][0]["extensions"]["code"],
        "SERVICE_UNAVAILABLE"
    );
    assert!(error["payload"][0]["message"]
        .as_str()
        .unwrap()
        .contains("cannot be reached"));
    client
        .send(
            json!({"id": "s", "type": "subscribe", "payload": {"query": "subscription { nope }"}}),
        )
        .await;
    let error = client.expect_json().await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["id"], "s");
    // The connection is still fine.
    client.send(json!({"type": "ping"})).await;
    assert_eq!(client.expect_json().await["type"], "pong");
}

#[actix_web::test]
async fn invalid_messages_close_with_4400_and_big_frames_with_1009() {
    let gateway = TestGateway::spawn(&["--max-frame-bytes=1024"]).await;
    let mut client = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    client.send(json!({"type": "bogus"})).await;
    assert_eq!(client.expect_close().await.0, Some(4400));

    let mut big = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    big.send(json!({"type": "connection_init", "payload": {"pad": "x".repeat(4096)}}))
        .await;
    assert_eq!(big.expect_close().await.0, Some(1009));
}

#[actix_web::test]
async fn keepalives_flow_and_a_client_that_never_pings_stays_connected() {
    let gateway = TestGateway::spawn(&["--keepalive-secs=1"]).await;
    let mut client = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    client.init(&access(1)).await;
    // The graphql-ws npm client sends no pings by default; the server must not drop it.
    for _ in 0..3 {
        match client.recv_within(Duration::from_secs(5)).await {
            Incoming::Json(ping) => {
                assert_eq!(ping["type"], "ping");
                client.send(json!({"type": "pong"})).await;
            }
            other => panic!("expected a ping, got {other:?}"),
        }
    }
    // A websocket-level Ping frame is answered, not treated as an error.
    client.raw_ping().await;
    client
        .send(json!({"id": "a", "type": "subscribe", "payload": {"query": MODEL_UPDATED}}))
        .await;
    gateway.settle().await;
    gateway.publish(CAR_UPDATED, car(1, "Alive")).await;
    let data = client.expect_json().await;
    assert_eq!(data["payload"]["data"]["carModelUpdated"]["make"], "Alive");
}

#[actix_web::test]
async fn a_slow_reader_is_cut_off_while_others_keep_receiving() {
    let gateway = TestGateway::spawn(&["--outbound-queue=64", "--fanout-buffer=1000000"]).await;
    let mut fast = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    fast.init(&access(1)).await;
    // Every car created: a stream that cannot skip an event, so a reader too slow for it is
    // cut off (a state subscription's reader would keep its newest results instead).
    fast.send(json!({"id": "a", "type": "subscribe", "payload": {"query": "subscription { carCreated { id make } }"}}))
        .await;
    let mut slow = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    slow.init(&access(2)).await;
    slow.send(json!({"id": "a", "type": "subscribe", "payload": {"query": "subscription { carCreated { id make model variant year } }"}}))
        .await;
    gateway.settle().await;

    // The slow client reads nothing while events are published; once the kernel's socket
    // buffers are full its queue fills and the gateway must cut it off. The fast client reads
    // every event.
    let big_make = "m".repeat(100);
    let mut received = 0usize;
    let mut published = 0usize;
    let mut slow_cut = false;
    while published < 60_000 && !slow_cut {
        // Batches smaller than the queue, read in between: the fast reader never falls behind.
        for _ in 0..50 {
            for _ in 0..32 {
                gateway.publish(CAR_CREATED, car(1, &big_make)).await;
                published += 1;
            }
            while received < published {
                let message =
                    match tokio::time::timeout(Duration::from_secs(3), fast.expect_json()).await {
                        Ok(m) => m,
                        Err(_) => {
                            let (_, metrics) = gateway.get("/metrics").await;
                            panic!(
                                "stuck at {received}/{published}: {}",
                                metrics
                                    .lines()
                                    .filter(|l| l.starts_with("gateway_"))
                                    .collect::<Vec<_>>()
                                    .join("\n")
                            );
                        }
                    };
                assert_eq!(message["type"], "next", "{message}");
                received += 1;
            }
        }
        let (_, metrics) = gateway.get("/metrics").await;
        slow_cut = metrics.contains("gateway_slow_consumers_total 1");
    }
    assert!(
        slow_cut,
        "the slow reader was never cut off ({published} events)"
    );
    assert_eq!(received, published, "the fast reader missed events");
    let (code, reason) = slow.expect_close().await;
    assert_eq!(code, Some(1013));
    assert!(reason.contains("slow consumer"), "{reason}");
}

#[actix_web::test]
async fn shutdown_closes_every_socket_with_1001_and_refuses_new_ones() {
    let mut gateway = TestGateway::spawn(&["--drain-timeout-secs=5"]).await;
    let mut modern = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    modern.init(&access(1)).await;
    let mut legacy = WsClient::connect(&gateway.url(), "graphql-ws").await;
    gateway.begin_shutdown();
    assert_eq!(modern.expect_close().await.0, Some(1001));
    assert_eq!(legacy.expect_close().await.0, Some(1001));
    let stopped = gateway.stopped.take().unwrap();
    tokio::time::timeout(Duration::from_secs(20), stopped)
        .await
        .expect("the gateway did not stop after draining")
        .unwrap();
    let _ = ws::Message::Nop;
}

#[actix_web::test]
async fn the_binary_drains_on_sigterm_and_exits_0() {
    let port = test_support::free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_subscription-gateway"))
        .env_clear()
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("REDIS_URL", test_support::redis_url())
        .env("REDIS_KEY_PREFIX", test_support::unique_prefix("gw-bin"))
        .env("JWT_SECRET", crate::helpers::SECRET)
        .env("LOG_LEVEL", "warn")
        .env("DRAIN_TIMEOUT_SECS", "5")
        .spawn()
        .unwrap();
    let url = format!("ws://127.0.0.1:{port}/graphql");
    let mut client = None;
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            client = Some(WsClient::connect(&url, "graphql-transport-ws").await);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = client.expect("the gateway did not start");
    client.init(&access(1)).await;

    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(client.expect_close().await.0, Some(1001));
    // Bounded by the drain timeout; the loop only guards against a hang.
    let mut exited = None;
    for _ in 0..400 {
        if let Some(status) = child.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match exited {
        Some(status) => assert_eq!(status.code(), Some(0), "{status:?}"),
        None => {
            let _ = child.kill();
            panic!("the gateway did not exit after SIGTERM");
        }
    }
}

/// Sends `request` on a fresh TCP connection and returns everything the gateway writes within a
/// short while (or until it closes).
async fn raw_exchange(port: u16, request: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream.write_all(request).await.unwrap();
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(500), stream.read(&mut chunk)).await
    {
        if n == 0 {
            break;
        }
        received.extend_from_slice(&chunk[..n]);
    }
    received
}

fn upgrade_request(path: &str, extra_headers: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: graphql-transport-ws\r\n{extra_headers}\r\n"
    )
}

#[actix_web::test]
async fn upgrades_are_checked_and_bytes_sent_with_the_request_are_not_lost() {
    let gateway = TestGateway::spawn(&[]).await;
    // A client may send its first frame in the same packet as the upgrade request: the bytes
    // after the head belong to the websocket and must reach it.
    let mut request =
        upgrade_request("/graphql", "Upgrade: websocket\r\nConnection: Upgrade\r\n").into_bytes();
    let init = json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {}", access(1))}});
    let mut frame = actix_web::web::BytesMut::new();
    actix_http::ws::Parser::write_message(
        &mut frame,
        init.to_string(),
        actix_http::ws::OpCode::Text,
        true,
        true,
    );
    request.extend_from_slice(&frame);
    let answer = raw_exchange(gateway.port, &request).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 101 "), "{text}");
    // RFC 6455's own example key and answer.
    assert!(
        text.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
        "{text}"
    );
    assert!(
        text.contains("sec-websocket-protocol: graphql-transport-ws\r\n"),
        "{text}"
    );
    let head_end = text.find("\r\n\r\n").unwrap() + 4;
    let mut frames = actix_web::web::BytesMut::from(&answer[head_end..]);
    let decoded =
        actix_codec::Decoder::decode(&mut actix_http::ws::Codec::new().client_mode(), &mut frames)
            .unwrap();
    match decoded {
        Some(actix_http::ws::Frame::Text(bytes)) => {
            assert_eq!(&bytes[..], br#"{"type":"connection_ack"}"#)
        }
        other => panic!("expected the ack, got {other:?}"),
    }

    // Elsewhere than /graphql: 404, as for any unknown path.
    let answer = raw_exchange(
        gateway.port,
        upgrade_request("/other", "Upgrade: websocket\r\nConnection: Upgrade\r\n").as_bytes(),
    )
    .await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 404 "), "{text}");

    // An unsupported websocket version: 400 naming the problem.
    let answer = raw_exchange(
        gateway.port,
        upgrade_request("/graphql", "Upgrade: websocket\r\nConnection: Upgrade\r\n")
            .replace("Version: 13", "Version: 8")
            .as_bytes(),
    )
    .await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(text.contains("bad_handshake"), "{text}");

    // `Upgrade: websocket` without `Connection: upgrade` is not an upgrade: 400, not a hang.
    let answer = raw_exchange(
        gateway.port,
        upgrade_request(
            "/graphql",
            "Upgrade: websocket\r\nConnection: keep-alive\r\n",
        )
        .as_bytes(),
    )
    .await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(text.contains("connection upgrade is expected"), "{text}");
}

#[test]
fn a_bad_api_internal_url_stops_the_start_with_a_line_that_names_it() {
    for url in ["ftp://api:8002/graphql", "not a url"] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_subscription-gateway"))
            .env_clear()
            .env(
                "LISTEN_ADDR",
                format!("127.0.0.1:{}", test_support::free_port()),
            )
            .env("REDIS_URL", test_support::redis_url())
            .env("JWT_SECRET", crate::helpers::SECRET)
            .env("API_INTERNAL_URL", url)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{url}: it started");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("API_INTERNAL_URL") && stderr.contains("http://host:port/graphql")
                || stderr.contains("API_INTERNAL_URL") && stderr.contains("not a URL"),
            "{url}: {stderr}"
        );
    }
}

/// A client cut as slow (1013) that reconnects the moment it reads the close frame, while its
/// old connection is still open on its side, gets a place: the user's count (1 here, shared
/// with every gateway through Redis) was given back when the close was decided, not once the
/// closing handshake had drained.
#[actix_web::test]
async fn a_client_cut_as_slow_reconnects_at_once_without_1008() {
    let gateway = TestGateway::spawn(&[
        "--max-connections-per-user=1",
        "--fanout-buffer=4",
        "--outbound-queue=4",
    ])
    .await;
    let mut cut = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    cut.init(&access(1)).await;
    // Every car created: a stream that cannot skip an event, so falling behind cuts it off (a
    // car's updates would be conflated instead).
    cut.send(json!({"id": "s", "type": "subscribe", "payload": {"query": "subscription { carCreated { id } }"}}))
        .await;
    gateway.settle().await;
    gateway
        .publish_burst(
            CAR_CREATED,
            (0..5_000).map(|n| car(n + 1, "burst")).collect(),
        )
        .await;
    let code = close_code_after_results(&mut cut).await;
    assert_eq!(code, Some(1013));
    // `cut` is still open on this side: the reconnect comes before its closing handshake ends.
    let mut again = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    again
        .send(json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {}", access(1))}}))
        .await;
    let answer = again.answer().await;
    assert!(
        matches!(&answer, Incoming::Json(ack) if ack["type"] == "connection_ack"),
        "{answer:?}"
    );
    drop(cut);
}

/// `/healthz` and `/readyz` on HEALTH_LISTEN_ADDR, served by a thread of its own: the same
/// answers as the main listener's, nothing else, and the listener closes with the gateway.
#[actix_web::test]
async fn probes_are_answered_on_a_listener_of_their_own() {
    let mut gateway = TestGateway::spawn(&["--health-listen-addr=127.0.0.1:0"]).await;
    let port = gateway.health_port.expect("a health listener");
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
    let answer = |bytes: Vec<u8>| String::from_utf8(bytes).unwrap();
    let healthz = answer(raw_exchange(port, get("/healthz").as_bytes()).await);
    assert!(healthz.starts_with("HTTP/1.1 200 OK\r\n"), "{healthz}");
    assert!(healthz.ends_with(r#"{"status":"ok"}"#), "{healthz}");
    let readyz = answer(raw_exchange(port, get("/readyz?verbose=1").as_bytes()).await);
    assert!(readyz.starts_with("HTTP/1.1 200 OK\r\n"), "{readyz}");
    assert!(readyz.contains(r#""status":"ready""#), "{readyz}");
    let (_, main) = gateway.get("/readyz").await;
    assert!(
        readyz.ends_with(&main),
        "the main listener's answer: {main}"
    );
    let other = answer(raw_exchange(port, get("/metrics").as_bytes()).await);
    assert!(other.starts_with("HTTP/1.1 404 "), "{other}");
    let post =
        answer(raw_exchange(port, b"POST /healthz HTTP/1.1\r\ncontent-length: 0\r\n\r\n").await);
    assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
    let junk = answer(raw_exchange(port, b"\x16\x03\x01 not http\r\n\r\n").await);
    assert!(junk.starts_with("HTTP/1.1 400 "), "{junk}");

    gateway.begin_shutdown();
    let stopped = gateway.stopped.take().unwrap();
    tokio::time::timeout(Duration::from_secs(20), stopped)
        .await
        .expect("the gateway did not stop")
        .unwrap();
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "the health listener outlived the gateway");
}

/// A reader too slow for a state subscription (a car's updates) is not cut off: while its socket
/// is behind by more than half of OUTBOUND_QUEUE it keeps only the newest result, and when it
/// reads again it gets what was queued, then that newest one saying how many it stands for.
#[actix_web::test]
async fn a_slow_reader_of_a_state_subscription_keeps_the_newest_instead_of_being_cut() {
    let gateway = TestGateway::spawn(&["--outbound-queue=16", "--fanout-buffer=1000000"]).await;
    let mut slow = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    slow.init(&access(2)).await;
    slow.send(json!({"id": "a", "type": "subscribe", "payload": {"query": "subscription { carModelUpdated(pk: 1) { id make model variant year } }"}}))
        .await;
    gateway.settle().await;
    // Far more than the kernel's buffers and the queue hold, read by nobody meanwhile.
    let big_make = "m".repeat(2_000);
    let total = 3_000usize;
    for n in 0..total {
        gateway
            .publish(CAR_UPDATED, car(1, &format!("{n}-{big_make}")))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut accounted = 0u64;
    let mut last = -1i64;
    let mut any_skipped = false;
    while accounted < total as u64 {
        let message = slow.expect_json().await;
        assert_eq!(message["type"], "next", "{message}");
        let make = message["payload"]["data"]["carModelUpdated"]["make"]
            .as_str()
            .unwrap();
        let n: i64 = make.split('-').next().unwrap().parse().unwrap();
        let skipped = message["payload"]["extensions"]["skipped"]
            .as_u64()
            .unwrap_or(0);
        assert_eq!(n - last - 1, skipped as i64, "m{n} after m{last}");
        any_skipped |= skipped > 0;
        last = n;
        accounted += 1 + skipped;
    }
    assert_eq!(last, total as i64 - 1, "the newest state arrives");
    assert!(
        any_skipped,
        "the slow reader kept the newest instead of every result"
    );
    let (_, metrics) = gateway.get("/metrics").await;
    assert!(
        metrics.contains("gateway_slow_consumers_total 0"),
        "a state subscription's reader was cut off"
    );
}
