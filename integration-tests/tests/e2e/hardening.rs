//! The attacks a black-box probe used to take the service down, each run against the real
//! embedded binary (`gqlws`, the one-port mode a newcomer exposes), with the bound that now
//! holds and a normal client served at the same time. Memory, threads and descriptors are read
//! from `/proc/<pid>` of the server process.
//!
//! Bounds are asserted as amounts (bytes, threads, descriptors, counts of answers), never as
//! durations: waits are only a safety net ([`PATIENCE`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::client::{
    admin_tokens_at, create_user, deactivate_user, expect_trigger_event_update, graphql,
    post_token, resigned_with, ws_connect, ws_subscribed, Incoming, NodeSubscriber, WsClient,
    CAR_1_UPDATED, PATIENCE,
};
use crate::embedded::Gqlws;
use crate::stack::Stack;

/// A line of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, `Threads`), as a number (kB for sizes).
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// A TCP connection to `server` from the loopback address `from` (each test's attacker gets
/// addresses of its own, so per-address bounds apply to it alone).
async fn connect_from(from: IpAddr, server: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(server).await.unwrap()
}

/// An HTTP client whose connections come from `from`.
fn http_from(from: IpAddr) -> awc::Client {
    awc::Client::builder()
        .connector(awc::Connector::new().local_address(from))
        .timeout(PATIENCE)
        .finish()
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// The normal client of every test: a fresh token, and `{ hi }` with it.
async fn normal_client_is_served(gqlws: &Gqlws) {
    let (access, _) = admin_tokens_at(&gqlws.url).await;
    let body = hi_with(gqlws, &access).await;
    assert_eq!(body["data"]["hi"], "Hi!", "{body}");
}

/// A normal client served while an attack runs: `{ hi }` with a token it got before, and
/// `/healthz`, from 127.0.0.1, again and again until [`Bystander::served_throughout`].
struct Bystander {
    stop: Arc<AtomicBool>,
    task: actix_web::rt::task::JoinHandle<(usize, Vec<String>)>,
}

impl Bystander {
    async fn start(gqlws: &Gqlws) -> Bystander {
        let (access, _) = admin_tokens_at(&gqlws.url).await;
        let url = gqlws.url.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = actix_web::rt::spawn(async move {
            let client = http_from(ip("127.0.0.1"));
            let (mut served, mut failures) = (0, Vec::new());
            while !stopped.load(Ordering::Acquire) {
                let hi = client
                    .post(format!("{url}/graphql/"))
                    .insert_header(("Authorization", format!("Bearer {access}")))
                    .send_json(&json!({"query": "{ hi }"}))
                    .await;
                match hi {
                    Ok(mut response) => match response.json::<Value>().await {
                        Ok(body) if body["data"]["hi"] == "Hi!" => served += 1,
                        other => failures.push(format!("{other:?}")),
                    },
                    Err(err) => failures.push(err.to_string()),
                }
                match client.get(format!("{url}/healthz")).send().await {
                    Ok(response) if response.status() == 200 => served += 1,
                    other => failures.push(format!("healthz: {:?}", other.map(|r| r.status()))),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (served, failures)
        });
        Bystander { stop, task }
    }

    /// Stops it and checks that every request was served.
    async fn served_throughout(self) {
        self.stop.store(true, Ordering::Release);
        let (served, failures) = self.task.await.unwrap();
        assert!(
            failures.is_empty(),
            "the normal client was refused: {failures:?}"
        );
        assert!(served > 0, "the normal client was never served");
    }
}

/// `{ hi }` over HTTP with `token`; the JSON answer.
async fn hi_with(gqlws: &Gqlws, token: &str) -> Value {
    let mut response = http_from(ip("127.0.0.1"))
        .post(format!("{}/graphql/", gqlws.url))
        .insert_header(("Authorization", format!("Bearer {token}")))
        .send_json(&json!({"query": "{ hi }"}))
        .await
        .unwrap();
    response.json().await.unwrap()
}

/// A websocket spoken by hand: the upgrade request and masked frames written as bytes, the
/// server's frames parsed as they come.
struct RawWs {
    stream: TcpStream,
    read: Vec<u8>,
}

/// What the server sent on a raw websocket.
#[derive(Debug, PartialEq)]
enum RawFrame {
    Text(String),
    Ping,
    Close(u16),
    /// The connection ended without a close frame.
    End,
}

impl RawWs {
    /// The upgrade's status line and the socket, upgraded when it says 101.
    async fn connect(from: IpAddr, server: SocketAddr, protocol: &str) -> (String, RawWs) {
        let mut stream = connect_from(from, server).await;
        let request = format!(
            "GET /graphql/ HTTP/1.1\r\nHost: {server}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut read = Vec::new();
        let head_end = loop {
            if let Some(at) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(PATIENCE, stream.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "the server closed during the upgrade");
            read.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&read[..head_end]).into_owned();
        let status = head.lines().next().unwrap_or_default().to_owned();
        read.drain(..head_end);
        (status, RawWs { stream, read })
    }

    /// A masked client frame (RFC 6455 §5.2) whose header declares `declared` payload bytes.
    fn frame_header(opcode: u8, declared: u64) -> Vec<u8> {
        let mut frame = vec![0x80 | opcode];
        match declared {
            0..=125 => frame.push(0x80 | declared as u8),
            126..=0xFFFF => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(declared as u16).to_be_bytes());
            }
            _ => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&declared.to_be_bytes());
            }
        }
        // A zero mask: the payload goes as it is.
        frame.extend_from_slice(&[0, 0, 0, 0]);
        frame
    }

    async fn send_text(&mut self, text: &str) {
        let mut frame = RawWs::frame_header(0x1, text.len() as u64);
        frame.extend_from_slice(text.as_bytes());
        self.stream.write_all(&frame).await.unwrap();
    }

    /// The next frame from the server, within `wait`.
    async fn next_frame(&mut self, wait: Duration) -> Option<RawFrame> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.read) {
                self.read.drain(..used);
                return Some(frame);
            }
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => return Some(RawFrame::End),
                Ok(Ok(n)) => self.read.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Frames until a close frame or the end; the close code.
    async fn close_code(&mut self, wait: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_frame(left).await? {
                RawFrame::Close(code) => return Some(code),
                RawFrame::End => return None,
                RawFrame::Text(_) | RawFrame::Ping => {}
            }
        }
    }

    /// `connection_init` with the token; waits for the ack.
    async fn init(&mut self, access: &str) {
        self.send_text(
            &json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {access}")}})
                .to_string(),
        )
        .await;
        match self.next_frame(PATIENCE).await {
            Some(RawFrame::Text(text)) if text.contains("connection_ack") => {}
            other => panic!("expected connection_ack, got {other:?}"),
        }
    }
}

/// One unmasked server frame at the start of `bytes`, and how many bytes it took.
fn parse_server_frame(bytes: &[u8]) -> Option<(RawFrame, usize)> {
    let (&first, &second) = (bytes.first()?, bytes.get(1)?);
    let (len, start) = match second & 0x7F {
        126 => (
            u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?]) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        short => (short as usize, 2),
    };
    let payload = bytes.get(start..start + len)?;
    let frame = match first & 0x0F {
        0x1 => RawFrame::Text(String::from_utf8_lossy(payload).into_owned()),
        0x8 => RawFrame::Close(if payload.len() >= 2 {
            u16::from_be_bytes([payload[0], payload[1]])
        } else {
            1005
        }),
        0x9 => RawFrame::Ping,
        _ => RawFrame::Text(String::new()),
    };
    Some((frame, start + len))
}

/// Finding 1: a frame header declaring 2^63-1 bytes, then payload streamed behind it, before and
/// after `connection_init`. The server must answer 1009 from the header alone, not buffer what
/// follows: the test streams 64 MiB and the server must have closed long before it is through.
#[actix_web::test]
async fn a_huge_declared_frame_is_refused_from_its_header() {
    let gqlws = Gqlws::start().await;
    let pid = gqlws.pid();
    let (access, _) = admin_tokens_at(&gqlws.url).await;
    // Started first: its login's password check holds 19 MiB for the life of the check thread.
    let bystander = Bystander::start(&gqlws).await;
    let rss_before = proc_status(pid, "VmRSS");
    const STREAMED: usize = 64 << 20;
    for authenticated in [false, true] {
        let (status, mut ws) =
            RawWs::connect(ip("127.0.0.11"), gqlws.addr(), "graphql-transport-ws").await;
        assert!(status.contains("101"), "{status}");
        if authenticated {
            ws.init(&access).await;
        }
        let header = RawWs::frame_header(0x1, i64::MAX as u64);
        ws.stream.write_all(&header).await.unwrap();
        let (mut reader, mut writer) = ws.stream.into_split();
        // Set once the close frame is read: the server's lingering read after its close would
        // otherwise swallow the rest of the stream.
        let closed = Arc::new(AtomicBool::new(false));
        let seen = closed.clone();
        let streaming = tokio::spawn(async move {
            let chunk = vec![b'x'; 64 << 10];
            let mut sent = 0;
            while sent < STREAMED && !seen.load(Ordering::Acquire) {
                if writer.write_all(&chunk).await.is_err() {
                    break;
                }
                sent += chunk.len();
            }
            sent
        });
        let mut read = ws.read;
        let code = tokio::time::timeout(PATIENCE, async {
            loop {
                if let Some((RawFrame::Close(code), _)) = parse_server_frame(&read) {
                    closed.store(true, Ordering::Release);
                    return Some(code);
                }
                if let Some((_, used)) = parse_server_frame(&read) {
                    read.drain(..used);
                    continue;
                }
                let mut chunk = [0u8; 4096];
                match reader.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => read.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .unwrap_or(None);
        let sent = streaming.await.unwrap();
        assert_eq!(code, Some(1009), "authenticated: {authenticated}");
        assert!(
            sent < STREAMED,
            "the close came only after all {sent} bytes (authenticated: {authenticated})"
        );
    }
    let grown_kib = proc_status(pid, "VmRSS").saturating_sub(rss_before);
    assert!(
        grown_kib < 16 * 1024,
        "the server grew by {grown_kib} KiB under two oversized frames"
    );
    bystander.served_throughout().await;
}

/// Finding 2: 30 logins at once, for unknown users from 30 addresses. At most LOGIN_CONCURRENCY
/// password checks run and LOGIN_QUEUE wait; the rest get 503 at once, so memory stays bounded.
#[actix_web::test]
async fn concurrent_logins_are_bounded() {
    let gqlws = Gqlws::start_with(&[("LOGIN_CONCURRENCY", "1"), ("LOGIN_QUEUE", "2")]).await;
    let pid = gqlws.pid();
    let bystander = Bystander::start(&gqlws).await;
    let rss_before = proc_status(pid, "VmRSS");
    let logins = (0..30).map(|n| {
        let url = format!("{}/api/token/", gqlws.url);
        async move {
            let mut response = http_from(ip(&format!("127.0.2.{}", n + 1)))
                .post(url)
                .send_json(&json!({"username": format!("nobody-{n}"), "password": "guess"}))
                .await
                .unwrap();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (response.status().as_u16(), body)
        }
    });
    let answers = futures_util::future::join_all(logins).await;
    let busy = answers.iter().filter(|(status, _)| *status == 503).count();
    for (status, body) in &answers {
        match status {
            401 => assert_eq!(body["code"], "no_active_account", "{body}"),
            503 => assert_eq!(body["code"], "busy", "{body}"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(busy > 0, "no login was refused: {answers:?}");
    // One check at a time holds one argon2 buffer (19 MiB); 30 would hold 570 MiB.
    let grown_kib = proc_status(pid, "VmHWM").saturating_sub(rss_before);
    assert!(grown_kib < 96 * 1024, "peak memory grew by {grown_kib} KiB");
    bystander.served_throughout().await;
}

/// Finding 3: 40 wrong guesses for one user at once, and the right password with them. Counting
/// and checking are one step, so no more attempts are evaluated than the limit allows (5).
#[actix_web::test]
async fn parallel_guesses_cannot_outrun_the_login_limit() {
    let gqlws = Gqlws::start().await;
    let bystander = Bystander::start(&gqlws).await;
    let attacker = ip("127.0.0.12");
    let mut attempts: Vec<_> = (0..40)
        .map(|n| (format!("wrong-{n}"), gqlws.url.clone()))
        .collect();
    attempts.push(("letmein".to_owned(), gqlws.url.clone()));
    let answers =
        futures_util::future::join_all(attempts.into_iter().map(|(password, url)| async move {
            let response = http_from(attacker)
                .post(format!("{url}/api/token/"))
                .send_json(&json!({"username": "admin", "password": password}))
                .await
                .unwrap();
            response.status().as_u16()
        }))
        .await;
    let evaluated = answers.iter().filter(|s| **s == 401 || **s == 200).count();
    let limited = answers.iter().filter(|s| **s == 429).count();
    assert!(
        evaluated <= 5,
        "{evaluated} attempts evaluated: {answers:?}"
    );
    assert_eq!(evaluated + limited, answers.len(), "{answers:?}");
    // The limit is per user and per address: another address's login of another user is
    // unaffected, and so is a plain request.
    let (status, body) = post_token(&gqlws.url, "nobody", "x").await;
    assert_eq!(status, 401, "{body}");
    bystander.served_throughout().await;
    let mut health = http_from(ip("127.0.0.1"))
        .get(format!("{}/healthz", gqlws.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200, "{:?}", health.body().await);
}

/// Finding 4: 200 requests from one address that declare a 100-byte body and send one byte.
/// MAX_REQUESTS_PER_ADDRESS are let in and cut at BODY_TIMEOUT_SECS (408); the rest get 429 at
/// once; every connection is closed by the server, and the descriptors come back.
#[actix_web::test]
async fn slow_bodies_are_timed_out_and_capped_per_address() {
    let gqlws = Gqlws::start_with(&[
        ("BODY_TIMEOUT_SECS", "2"),
        ("MAX_REQUESTS_PER_ADDRESS", "20"),
    ])
    .await;
    let pid = gqlws.pid();
    let descriptors_before = open_descriptors(pid);
    let attacker = ip("127.0.0.13");
    let mut connections = Vec::new();
    for _ in 0..200 {
        let mut stream = connect_from(attacker, gqlws.addr()).await;
        stream
            .write_all(
                b"POST /api/token/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                  Content-Length: 100\r\n\r\n{",
            )
            .await
            .unwrap();
        connections.push(stream);
    }
    // Served meanwhile, from another address.
    normal_client_is_served(&gqlws).await;
    let answers =
        futures_util::future::join_all(connections.into_iter().map(|mut stream| async move {
            let mut answer = Vec::new();
            // The whole answer, up to the server's close.
            let read = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer)).await;
            assert!(read.is_ok(), "the server kept a slow request open");
            let answer = String::from_utf8_lossy(&answer).into_owned();
            answer.split(' ').nth(1).unwrap_or_default().to_owned()
        }))
        .await;
    let timed_out = answers.iter().filter(|status| *status == "408").count();
    let refused = answers.iter().filter(|status| *status == "429").count();
    assert_eq!(timed_out + refused, 200, "{answers:?}");
    assert!(timed_out <= 20, "{timed_out} requests were let in");
    assert!(refused >= 180, "{answers:?}");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while open_descriptors(pid) > descriptors_before + 4 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        open_descriptors(pid) <= descriptors_before + 4,
        "{} descriptors open, {descriptors_before} before",
        open_descriptors(pid)
    );
    normal_client_is_served(&gqlws).await;
}

/// Finding 5: a batch is held to one document's field limit in all, and a burst of documents
/// that each resolve 100 fields from the database holds a bounded number of threads.
#[actix_web::test]
async fn batches_share_one_budget_and_database_calls_hold_bounded_threads() {
    let gqlws = Gqlws::start().await;
    let pid = gqlws.pid();
    let (access, _) = admin_tokens_at(&gqlws.url).await;
    let bearer = format!("Bearer {access}");
    let sixty_his: String = (0..60).map(|n| format!("a{n}: hi ")).collect();
    let batch: Vec<Value> = (0..10)
        .map(|_| json!({"query": format!("{{ {sixty_his} }}")}))
        .collect();
    let mut response = http_from(ip("127.0.0.1"))
        .post(format!("{}/graphql/", gqlws.url))
        .insert_header(("Authorization", bearer.as_str()))
        .send_json(&batch)
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(response.status(), 400, "{body}");
    assert_eq!(
        body["errors"][0]["extensions"]["code"], "BATCH_TOO_EXPENSIVE",
        "{body}"
    );
    // Within the budget, a batch is answered.
    let small = json!([{"query": "{ hi }"}, {"query": "{ a: hi b: hi }"}]);
    let mut response = http_from(ip("127.0.0.1"))
        .post(format!("{}/graphql/", gqlws.url))
        .insert_header(("Authorization", bearer.as_str()))
        .send_json(&small)
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body[1]["data"]["b"], "Hi!", "{body}");

    let bystander = Bystander::start(&gqlws).await;
    let threads_before = proc_status(pid, "Threads");
    let cars: String = (0..100)
        .map(|n| format!("c{n}: car(pk: 1) {{ id }} "))
        .collect();
    let query = json!({"query": format!("{{ {cars} }}")});
    let sampling = tokio::spawn(async move {
        let mut peak = 0;
        for _ in 0..400 {
            peak = peak.max(proc_status(pid, "Threads"));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        peak
    });
    let requests = (0..20).map(|n| {
        let (url, bearer, query) = (gqlws.url.clone(), bearer.clone(), query.clone());
        async move {
            let mut response = http_from(ip(&format!("127.0.3.{}", n + 1)))
                .post(format!("{url}/graphql/"))
                .insert_header(("Authorization", bearer))
                .send_json(&query)
                .await
                .unwrap();
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["data"]["c99"]["id"], "1", "{body}");
        }
    });
    futures_util::future::join_all(requests).await;
    let peak = sampling.await.unwrap();
    assert!(
        peak <= threads_before + 64 + 8,
        "{peak} threads at the peak, {threads_before} before"
    );
    bystander.served_throughout().await;
}

/// Finding 6: after a logout, the access token of that session is refused everywhere: the open
/// socket closes, a new socket is refused, and HTTP says UNAUTHENTICATED. A login right after
/// the logout (in the same second) works.
#[actix_web::test]
async fn logout_revokes_the_access_token_on_http_and_sockets() {
    let gqlws = Gqlws::start().await;
    let (access, refresh) = admin_tokens_at(&gqlws.url).await;
    let mut open = WsClient::connect_or_error(&gqlws.ws_url(), "graphql-transport-ws")
        .await
        .unwrap();
    assert!(
        matches!(open.init_answer(&access).await, Incoming::Json(ack) if ack["type"] == "connection_ack")
    );
    open.subscribe("1", CAR_1_UPDATED).await;

    let mut response = http_from(ip("127.0.0.1"))
        .post(format!("{}/api/token/blacklist/", gqlws.url))
        .send_json(&json!({"refresh": refresh}))
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.body().await);

    match open.answer().await {
        Incoming::Close(Some(4403), reason) => assert!(reason.contains("revoked"), "{reason}"),
        other => panic!("the open socket was not closed: {other:?}"),
    }
    let mut again = WsClient::connect_or_error(&gqlws.ws_url(), "graphql-transport-ws")
        .await
        .unwrap();
    match again.init_answer(&access).await {
        Incoming::Close(Some(4403), reason) => assert!(reason.contains("revoked"), "{reason}"),
        other => panic!("a new socket with the revoked token: {other:?}"),
    }
    let body = hi_with(&gqlws, &access).await;
    assert_eq!(
        body["errors"][0]["extensions"]["code"], "UNAUTHENTICATED",
        "{body}"
    );
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("revoked"),
        "{body}"
    );
    normal_client_is_served(&gqlws).await;
}

/// Finding 7: sockets per address and per user are bounded, and a socket that answers nothing
/// is closed after two keep-alive intervals, while a client that answers stays and is served.
#[actix_web::test]
async fn sockets_are_bounded_and_half_open_ones_are_closed() {
    let gqlws = Gqlws::start_with(&[
        ("MAX_CONNECTIONS_PER_ADDRESS", "5"),
        ("MAX_CONNECTIONS_PER_USER", "3"),
        ("KEEPALIVE_SECS", "1"),
    ])
    .await;
    let (access, _) = admin_tokens_at(&gqlws.url).await;

    // Per address: five upgrades without init are held (until the init timeout), the sixth
    // is refused.
    let mut held = Vec::new();
    for _ in 0..5 {
        let (status, ws) =
            RawWs::connect(ip("127.0.0.14"), gqlws.addr(), "graphql-transport-ws").await;
        assert!(status.contains("101"), "{status}");
        held.push(ws);
    }
    let (status, _) = RawWs::connect(ip("127.0.0.14"), gqlws.addr(), "graphql-transport-ws").await;
    assert!(status.contains("429"), "{status}");
    drop(held);

    // Per user: three sockets authenticated with one user's token, the fourth closed (1008).
    // The user is one of the test's own (the gateway counts by `user_id`), so the admin's
    // sockets below are counted apart.
    let user_999 = resigned_with(&access, json!({"user_id": 999}), None);
    let mut users_sockets = Vec::new();
    for n in 0..3 {
        let from = ip(&format!("127.0.4.{}", n + 1));
        let (_, mut ws) = RawWs::connect(from, gqlws.addr(), "graphql-transport-ws").await;
        ws.init(&user_999).await;
        users_sockets.push(ws);
    }
    let (_, mut fourth) =
        RawWs::connect(ip("127.0.4.9"), gqlws.addr(), "graphql-transport-ws").await;
    fourth
        .send_text(
            &json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {user_999}")}})
                .to_string(),
        )
        .await;
    assert_eq!(fourth.close_code(PATIENCE).await, Some(1008));

    // Half-open: a socket that authenticates, then never answers a ping. An npm client that
    // answers them stays connected and is served.
    let subscriber = NodeSubscriber::spawn(
        &gqlws.ws_url(),
        "graphql-ws",
        Some(&access),
        CAR_1_UPDATED,
        1,
    );
    let (_, mut silent) =
        RawWs::connect(ip("127.0.0.15"), gqlws.addr(), "graphql-transport-ws").await;
    silent.init(&access).await;
    // Four keep-alive intervals without a word from the client.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(silent.close_code(PATIENCE).await, Some(1001));
    let mut subscriber = subscriber;
    assert_eq!(subscriber.next().await, json!({"connected": true}));
    expect_trigger_event_update(subscriber, "graphql-ws", || gqlws.trigger_event(1)).await;
}

/// Finding 8: `nbf` in the future is refused; a socket lives as long as HTTP accepts its token
/// (the expiry plus the leeway); a subscription selecting two root fields is a validation error.
#[actix_web::test]
async fn nbf_leeway_and_one_root_field() {
    let gqlws = Gqlws::start().await;
    let (access, _) = admin_tokens_at(&gqlws.url).await;
    let now = chrono::Utc::now().timestamp();

    let not_yet = resigned_with(&access, json!({"nbf": now + 3600}), None);
    let body = hi_with(&gqlws, &not_yet).await;
    assert_eq!(
        body["errors"][0]["extensions"]["code"], "UNAUTHENTICATED",
        "{body}"
    );
    let mut ws = WsClient::connect_or_error(&gqlws.ws_url(), "graphql-transport-ws")
        .await
        .unwrap();
    assert!(matches!(
        ws.init_answer(&not_yet).await,
        Incoming::Close(Some(4403), _)
    ));

    // Expires in 2 s; the leeway (JWT_LEEWAY_SECS, 5 s) keeps it valid a little longer, on
    // HTTP and on the socket alike.
    let short = resigned_with(&access, json!({"exp": now + 2, "iat": now}), None);
    let mut ws = WsClient::connect_or_error(&gqlws.ws_url(), "graphql-transport-ws")
        .await
        .unwrap();
    assert!(
        matches!(ws.init_answer(&short).await, Incoming::Json(ack) if ack["type"] == "connection_ack")
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Past `exp`, within the leeway: nothing has come, no close either.
    let early = ws.answer_within(Duration::from_millis(300)).await;
    assert!(
        early.is_none(),
        "closed before the leeway ran out: {early:?}"
    );
    match ws.answer_within(PATIENCE).await {
        Some(Incoming::Close(Some(4403), reason)) => {
            assert!(reason.contains("expired"), "{reason}")
        }
        other => panic!("expected the expiry close, got {other:?}"),
    }

    let mut ws = WsClient::connect_or_error(&gqlws.ws_url(), "graphql-transport-ws")
        .await
        .unwrap();
    assert!(
        matches!(ws.init_answer(&access).await, Incoming::Json(ack) if ack["type"] == "connection_ack")
    );
    ws.subscribe(
        "two",
        "subscription { carCreated { id } carDeleted { id } }",
    )
    .await;
    match ws.answer().await {
        Incoming::Json(message) => {
            assert_eq!(message["type"], "error", "{message}");
            assert_eq!(message["id"], "two", "{message}");
            assert_eq!(
                message["payload"][0]["extensions"]["code"], "GRAPHQL_VALIDATION_FAILED",
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    // The socket stays open for the next operation.
    ws.subscribe("one", CAR_1_UPDATED).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut got = None;
    while tokio::time::Instant::now() < deadline && got.is_none() {
        gqlws.trigger_event(1);
        got = ws
            .next_payload_within(Duration::from_secs(2))
            .await
            .unwrap();
    }
    assert!(got.is_some(), "no update after the refused subscription");
}

/// Finding 6 through NGINX, with two api and two gateway replicas: the logout's cutoff goes
/// through Redis to every replica, so the revoked access token is refused on HTTP by whichever
/// api serves it and at `connection_init` by whichever gateway, while the user's new token works.
#[actix_web::test]
async fn logout_reaches_every_replica_through_redis() {
    logout_reaches_every_replica(Stack::shared()).await;
}

/// The logout's cutoff and announcement reach every api and gateway replica of `stack` (also
/// run on a Redis Cluster: cluster.rs).
pub async fn logout_reaches_every_replica(stack: &Stack) {
    // A user of this test's own: revoking the admin's tokens would touch the other tests.
    let username = format!("logout-{}", test_support::random_suffix());
    create_user(stack, &username, "s3cret-pass");
    let (status, tokens) = post_token(&stack.url, &username, "s3cret-pass").await;
    assert_eq!(status, 200, "{tokens}");
    let access = tokens["access"].as_str().unwrap().to_owned();
    let refresh = tokens["refresh"].as_str().unwrap().to_owned();
    let mut open = ws_subscribed(stack, "graphql-ws", &access, CAR_1_UPDATED).await;

    let mut response = crate::client::http()
        .post(format!("{}/api/token/blacklist/", stack.url))
        .send_json(&json!({"refresh": refresh}))
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.body().await);
    match open.answer().await {
        Incoming::Close(Some(4403), reason) => assert!(reason.contains("revoked"), "{reason}"),
        other => panic!("the open socket was not closed: {other:?}"),
    }

    // Each replica reads the cutoff from Redis within a second; both api replicas are asked
    // (NGINX alternates), and both gateways.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut refused = (0, 0);
    while (refused.0 < 4 || refused.1 < 4) && tokio::time::Instant::now() < deadline {
        let answer = graphql(
            stack,
            Some(&format!("Bearer {access}")),
            "{ hi }",
            Value::Null,
        )
        .await;
        if answer["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED" {
            refused.0 += 1;
        } else {
            assert_eq!(answer["data"]["hi"], "Hi!", "{answer}");
            refused.0 = 0;
        }
        let mut ws = ws_connect(stack, "graphql-transport-ws").await.unwrap();
        match ws.init_answer(&access).await {
            Incoming::Close(Some(4403), reason) => {
                assert!(reason.contains("revoked"), "{reason}");
                refused.1 += 1;
            }
            _ => refused.1 = 0,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        refused.0 >= 4 && refused.1 >= 4,
        "refused in a row: {refused:?}"
    );

    // The user logs in again: the new token works everywhere.
    let (status, tokens) = post_token(&stack.url, &username, "s3cret-pass").await;
    assert_eq!(status, 200, "{tokens}");
    let fresh = tokens["access"].as_str().unwrap();
    for _ in 0..4 {
        let answer = graphql(
            stack,
            Some(&format!("Bearer {fresh}")),
            "{ hi }",
            Value::Null,
        )
        .await;
        assert_eq!(answer["data"]["hi"], "Hi!", "{answer}");
        let mut ws = ws_connect(stack, "graphql-transport-ws").await.unwrap();
        assert!(
            matches!(ws.init_answer(fresh).await, Incoming::Json(ack) if ack["type"] == "connection_ack")
        );
    }

    // Deactivating the user (the operator's command) revokes its tokens the same way.
    let mut open = ws_subscribed(stack, "graphql-transport-ws", fresh, CAR_1_UPDATED).await;
    deactivate_user(stack, &username);
    match open.answer().await {
        Incoming::Close(Some(4403), reason) => assert!(reason.contains("revoked"), "{reason}"),
        other => panic!("the deactivated user's socket was not closed: {other:?}"),
    }
    let (status, body) = post_token(&stack.url, &username, "s3cret-pass").await;
    assert_eq!(status, 401, "{body}");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut refused_in_a_row = 0;
    while refused_in_a_row < 4 && tokio::time::Instant::now() < deadline {
        let answer = graphql(
            stack,
            Some(&format!("Bearer {fresh}")),
            "{ hi }",
            Value::Null,
        )
        .await;
        if answer["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED" {
            refused_in_a_row += 1;
        } else {
            refused_in_a_row = 0;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        refused_in_a_row, 4,
        "the deactivated user's token is still served"
    );
}

/// Found by the `graphql_limits` fuzz target: juniper's validation panics on a variable of an
/// unknown type with a default value, and a ring of fragments spreading each other made the
/// document walks run for minutes. Both are now answered at once with a validation error, on
/// HTTP (alone and in a batch) and on the socket, and the server goes on serving.
#[actix_web::test]
async fn documents_found_by_fuzzing_are_refused_cleanly() {
    let gqlws = Gqlws::start().await;
    let (access, _) = admin_tokens_at(&gqlws.url).await;
    let bearer = format!("Bearer {access}");
    let ring: String = (0..11)
        .map(|n| {
            let others: String = (0..11)
                .filter(|m| *m != n)
                .map(|m| format!("...F{m} "))
                .collect();
            format!("fragment F{n} on Query {{ {others} }} ")
        })
        .collect();
    let ring_query = format!("{{ ...F0 }} {ring}");
    for body in [
        json!({"query": "query($i: I = D) { hi }"}),
        json!([{"query": ring_query}, {"query": "{ hi }"}]),
    ] {
        let mut response = http_from(ip("127.0.0.1"))
            .post(format!("{}/graphql/", gqlws.url))
            .insert_header(("Authorization", bearer.as_str()))
            .send_json(&body)
            .await
            .unwrap();
        let answer: Value = response.json().await.unwrap();
        let first = if answer.is_array() {
            &answer[0]
        } else {
            &answer
        };
        assert!(first["errors"][0]["message"].is_string(), "{answer}");
        assert!(first.get("data").is_none_or(Value::is_null), "{answer}");
    }
    let mut ws = WsClient::connect_or_error(&gqlws.ws_url(), "graphql-transport-ws")
        .await
        .unwrap();
    assert!(
        matches!(ws.init_answer(&access).await, Incoming::Json(ack) if ack["type"] == "connection_ack")
    );
    ws.subscribe("v", "subscription($i: I = D) { carCreated { id } }")
        .await;
    match ws.answer().await {
        Incoming::Json(message) => {
            assert_eq!(message["type"], "error", "{message}");
            assert_eq!(
                message["payload"][0]["extensions"]["code"], "GRAPHQL_VALIDATION_FAILED",
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    normal_client_is_served(&gqlws).await;
}
