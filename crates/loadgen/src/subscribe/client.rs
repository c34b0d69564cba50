//! The subscribers. A client thread opens its share of the connections at its share of the rate,
//! each in a task of its own; a task does the graphql-ws handshake, records its deliveries, renews
//! its token on the open socket (--renew-every-secs) and, with --resume, reconnects from its last
//! cursor whenever its socket closes.

use std::future::{poll_fn, Future};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use actix_http::ws::{CloseCode, Frame, Message};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::args::WsProtocol;
use super::messages::{
    classify, contains, event_index, init_message, result_cursor, result_skipped,
    subscribe_message, Incoming,
};
use super::tally::{merge, Resumed, Tally};
use super::tokens::{Minter, CONNECTIONS_PER_USER};
use super::ws::{upgrade, websocket_error, Target, WsConn};
use super::{Shared, Stop, SubscribeArgs};

/// Source addresses cycle over 127.0.0.1..=127.0.0.250.
const SOURCE_ADDRESSES: u32 = 250;
/// Longest wait for the upgrade, and then for `connection_ack`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One client thread: its share of the connections (every `threads`-th), ramped at its share of
/// the rate, each in a task of its own; returns when all have ended.
#[allow(clippy::too_many_arguments)]
pub(super) async fn client_thread(
    thread: u32,
    threads: u32,
    args: SubscribeArgs,
    shared: Arc<Shared>,
    tokens: Arc<Vec<String>>,
    minter: Option<Arc<Minter>>,
    target: Target,
    stop: Arc<Stop>,
) -> Tally {
    let args = Arc::new(args);
    let target = Arc::new(target);
    let inits: Vec<Arc<String>> = tokens
        .iter()
        .map(|token| Arc::new(init_message(args.protocol, token)))
        .collect();
    let thread_rate = f64::from(args.rate) / f64::from(threads);
    let ramp_start = Instant::now();
    let mut tasks = Vec::new();
    let mut nth = 0u32;
    let mut index = thread;
    while index < args.connections {
        if stop.flag.load(Ordering::Relaxed) {
            break;
        }
        let due = ramp_start + Duration::from_secs_f64(f64::from(nth) / thread_rate);
        tokio::time::sleep_until(due.into()).await;
        let user = (index / CONNECTIONS_PER_USER) as usize % inits.len();
        let pk_index = shared.spread.subscriber(index);
        let is_staff = index < args.staff;
        // Owners and staff get tokens of their own; the others share one per user.
        let (user_id, init, token) = match (&minter, is_staff, args.owners) {
            (Some(minter), true, _) | (Some(minter), false, true) => {
                let user_id = if is_staff {
                    super::tokens::staff_user(index)
                } else {
                    super::tokens::owner_of(args.pks[pk_index])
                };
                match minter.mint(user_id, is_staff) {
                    Ok(token) => (
                        user_id,
                        Arc::new(init_message(args.protocol, &token)),
                        Arc::new(token),
                    ),
                    Err(err) => {
                        eprintln!("{err}");
                        break;
                    }
                }
            }
            _ => (
                user as i64 + 1,
                inits[user].clone(),
                Arc::new(tokens[user].clone()),
            ),
        };
        // Renewals start spread over one period, so that they do not all come at once.
        let renew = args.renew_every_secs.map(|every| {
            let first = Duration::from_secs_f64(
                every as f64 * f64::from(index) / f64::from(args.connections),
            );
            (first, Duration::from_secs(every))
        });
        let run = if args.protocol == WsProtocol::Sse {
            |sub| {
                Box::pin(sse_subscriber(sub))
                    as std::pin::Pin<Box<dyn Future<Output = Tally> + Send>>
            }
        } else {
            |sub| Box::pin(subscriber(sub)) as std::pin::Pin<Box<dyn Future<Output = Tally> + Send>>
        };
        tasks.push(tokio::spawn(run(Subscription {
            local: SocketAddrV4::new(
                Ipv4Addr::new(127, 0, 0, (1 + index % SOURCE_ADDRESSES) as u8),
                args.source_port_base
                    .map_or(0, |base| base + (index / SOURCE_ADDRESSES) as u16),
            ),
            target: target.clone(),
            args: args.clone(),
            init,
            token,
            user_id,
            is_staff,
            reads: !args.private || is_staff || args.owners,
            minter: minter.clone(),
            renew,
            pk_index,
            shared: shared.clone(),
            stop: stop.clone(),
        })));
        nth += 1;
        index += threads;
    }
    let mut tally = Tally::default();
    for task in tasks {
        if let Ok(own) = task.await {
            merge(&mut tally, own);
        }
    }
    tally
}

/// How a connection attempt ended before its subscription started.
enum Handshake {
    Failed(String),
    Closed(String),
}

impl Handshake {
    fn count(self, tally: &mut Tally) {
        match self {
            Handshake::Failed(kind) => *tally.connect_errors.entry(kind).or_insert(0) += 1,
            Handshake::Closed(code) => {
                *tally
                    .closes
                    .entry(format!("{code} before ack"))
                    .or_insert(0) += 1
            }
        }
    }
}

/// What one subscriber task is given.
struct Subscription {
    local: SocketAddrV4,
    target: Arc<Target>,
    args: Arc<SubscribeArgs>,
    init: Arc<String>,
    /// The access token in `init`, for a stream's `Authorization` header.
    token: Arc<String>,
    user_id: i64,
    is_staff: bool,
    /// Whether it may read its car: only then is it expected to receive its events.
    reads: bool,
    minter: Option<Arc<Minter>>,
    /// With --renew-every-secs: the first renewal's delay, then the period.
    renew: Option<(Duration, Duration)>,
    pk_index: usize,
    shared: Arc<Shared>,
    stop: Arc<Stop>,
}

/// What a subscriber carries from one connection to the next.
struct Progress {
    /// The cursor of the last delivery (--resume).
    cursor: Option<String>,
    /// Events received, one bit each, to tell a duplicate from a first delivery.
    seen: Vec<u64>,
    /// `connection_init` with the newest token (a renewed one after a renewal).
    init: Arc<String>,
    next_renewal: Option<Instant>,
}

/// One subscriber: connect, init, subscribe, then record deliveries until told to stop or closed;
/// with --resume, closed is followed by a reconnect that resumes from the last cursor. It keeps a
/// tally of its own, merged when it ends, so that a delivery touches nothing shared but its
/// event's counter.
async fn subscriber(sub: Subscription) -> Tally {
    let shared = &sub.shared;
    let args = &sub.args;
    let mut tally = Tally::default();
    let mut progress = Progress {
        cursor: None,
        seen: vec![0; shared.delivered.len().div_ceil(64)],
        init: sub.init.clone(),
        next_renewal: sub.renew.map(|(first, _)| Instant::now() + first),
    };
    let pk = args.pks[sub.pk_index];
    let began = Instant::now();
    let mut conn = match handshake(
        sub.local,
        &sub.target,
        args.protocol,
        &progress.init,
        subscribe_message(args.protocol, pk, None),
    )
    .await
    {
        Ok(conn) => conn,
        Err(outcome) => {
            outcome.count(&mut tally);
            shared.attempted.fetch_add(1, Ordering::Relaxed);
            return tally;
        }
    };
    established(&sub, began, &mut tally);
    let readers = &shared.live_by_pk[sub.pk_index];

    // One waiter for the subscriber's life, registered before the flag is first read, so a stop
    // between the two still wakes this task; re-polling it costs no new registration.
    let stopped = sub.stop.notify.notified();
    tokio::pin!(stopped);
    stopped.as_mut().enable();
    loop {
        let ended = serve(&sub, &mut conn, &mut progress, &mut tally, stopped.as_mut()).await;
        let Some(kind) = ended else {
            // Our own stop: say goodbye without waiting for the answer.
            let _ = tokio::time::timeout(
                Duration::from_millis(200),
                conn.send(Message::Close(Some(CloseCode::Normal.into()))),
            )
            .await;
            break;
        };
        *tally.closes.entry(kind).or_insert(0) += 1;
        if !args.resume || sub.stop.flag.load(Ordering::Relaxed) {
            if sub.reads {
                readers.fetch_sub(1, Ordering::Relaxed);
            }
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            break;
        }
        let dropped_ns = shared.now_ns();
        match reconnect(&sub, &progress, &mut tally).await {
            Some((again, resubscribed_ns)) => {
                conn = again;
                tally.resumes.push(Resumed {
                    dropped_ns,
                    resubscribed_ns,
                    caught_up_ns: resubscribed_ns,
                });
            }
            None => {
                tally.gave_up += 1;
                if sub.reads {
                    readers.fetch_sub(1, Ordering::Relaxed);
                }
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
    caught_up(&mut tally, shared);
    tally
}

/// Connects again and subscribes from the last cursor; `None` when every attempt failed or the
/// run is stopping.
async fn reconnect(
    sub: &Subscription,
    progress: &Progress,
    tally: &mut Tally,
) -> Option<(WsConn, u64)> {
    let args = &sub.args;
    let pk = args.pks[sub.pk_index];
    for _ in 0..args.reconnect_attempts {
        if sub.stop.flag.load(Ordering::Relaxed) {
            return None;
        }
        let subscribe = subscribe_message(args.protocol, pk, progress.cursor.as_deref());
        match handshake(
            sub.local,
            &sub.target,
            args.protocol,
            &progress.init,
            subscribe,
        )
        .await
        {
            Ok(conn) => return Some((conn, sub.shared.now_ns())),
            Err(outcome) => outcome.count(tally),
        }
        let jitter = rand::random::<u64>() % 100;
        tokio::time::sleep(Duration::from_millis(100 + jitter)).await;
    }
    None
}

/// For every reconnect, when the subscriber held each event published before it subscribed
/// again: the latest receipt, after that moment, of such an event.
fn caught_up(tally: &mut Tally, shared: &Shared) {
    for resumed in &mut tally.resumes {
        let at = resumed.resubscribed_ns;
        resumed.caught_up_ns = tally
            .receipts
            .iter()
            .filter(|(index, received)| {
                let published = shared.published_ns[*index as usize].load(Ordering::Relaxed);
                *received >= at && published > 0 && published <= at
            })
            .map(|(_, received)| *received)
            .max()
            .unwrap_or(at);
    }
}

/// What woke a subscriber waiting on its socket.
enum Wake {
    Read(std::io::Result<usize>),
    Stop,
    Renew,
}

/// Records one connection's deliveries until it ends: `None` for the run's stop, else why.
async fn serve(
    sub: &Subscription,
    conn: &mut WsConn,
    progress: &mut Progress,
    tally: &mut Tally,
    mut stopped: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
) -> Option<String> {
    let shared = &sub.shared;
    let mut renewal = progress
        .next_renewal
        .map(|at| Box::pin(tokio::time::sleep_until(at.into())));
    let mut renewal_sent: Option<Instant> = None;
    // Frames decoded from bytes of the handshake's last read count from the end of the handshake.
    let mut received_ns = shared.now_ns();
    loop {
        let frame = match conn.buffered_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                if sub.stop.flag.load(Ordering::Relaxed) {
                    return None;
                }
                // The socket first: while it has data, the stop is seen through the flag.
                let wake = poll_fn(|cx| {
                    if let Poll::Ready(read) = conn.poll_read(cx) {
                        return Poll::Ready(Wake::Read(read));
                    }
                    if stopped.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Wake::Stop);
                    }
                    match renewal.as_mut() {
                        Some(timer) => timer.as_mut().poll(cx).map(|()| Wake::Renew),
                        None => Poll::Pending,
                    }
                })
                .await;
                match wake {
                    Wake::Read(Ok(0)) => return Some("eof".into()),
                    Wake::Read(Ok(_)) => received_ns = shared.now_ns(),
                    Wake::Read(Err(err)) => return Some(websocket_error(&err)),
                    Wake::Stop => return None,
                    Wake::Renew => {
                        let (_, every) = sub.renew.unwrap_or_default();
                        let next = Instant::now() + every;
                        progress.next_renewal = Some(next);
                        renewal = Some(Box::pin(tokio::time::sleep_until(next.into())));
                        let Some(minter) = &sub.minter else { continue };
                        let token = match minter.mint(sub.user_id, sub.is_staff) {
                            Ok(token) => token,
                            Err(kind) => {
                                *tally.protocol_errors.entry(kind).or_insert(0) += 1;
                                continue;
                            }
                        };
                        let authorization = format!("Bearer {token}");
                        let ping =
                            json!({"type": "ping", "payload": {"Authorization": authorization}});
                        if conn
                            .send(Message::Text(ping.to_string().into()))
                            .await
                            .is_err()
                        {
                            return Some("send failed".into());
                        }
                        // A reconnect after this one opens with the newest token.
                        progress.init = Arc::new(init_message(sub.args.protocol, &token));
                        tally.renewals_sent += 1;
                        renewal_sent = Some(Instant::now());
                    }
                }
                continue;
            }
            Err(err) => return Some(websocket_error(&err)),
        };
        match frame {
            Frame::Text(bytes) => match classify(&bytes) {
                Incoming::Data => match event_index(&bytes, &shared.run) {
                    Some(index) if index < shared.delivered.len() => {
                        tally.skipped_told += result_skipped(&bytes);
                        if sub.args.resume {
                            if let Some(cursor) = result_cursor(&bytes) {
                                progress.cursor = Some(cursor.to_owned());
                            }
                            if contains(&bytes, br#""recovered":false"#) {
                                tally.unrecovered += 1;
                            }
                        }
                        record(&mut progress.seen, index, received_ns, shared, tally);
                    }
                    _ => {
                        // A result of another run's event may stand for this run's: conflation
                        // keeps a subscriber's newest result, whoever published it.
                        tally.skipped_told += result_skipped(&bytes);
                        tally.foreign += 1;
                    }
                },
                Incoming::Ping => {
                    tally.keepalives += 1;
                    let pong = Message::Text(r#"{"type":"pong"}"#.into());
                    if conn.send(pong).await.is_err() {
                        return Some("send failed".into());
                    }
                }
                Incoming::KeepAlive => match renewal_sent.take() {
                    Some(sent) if contains(&bytes, br#""exp":"#) => tally
                        .renewal_us
                        .push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32),
                    other => {
                        renewal_sent = other;
                        tally.keepalives += 1;
                    }
                },
                Incoming::Other(kind) => *tally.protocol_errors.entry(kind).or_insert(0) += 1,
            },
            Frame::Ping(bytes) => {
                if conn.send(Message::Pong(bytes)).await.is_err() {
                    return Some("send failed".into());
                }
            }
            Frame::Close(reason) => {
                return Some(reason.map_or("close without code".into(), |r| {
                    u16::from(r.code).to_string()
                }));
            }
            // The gateway sends small whole frames; a fragment means something else is talking.
            Frame::Continuation(_) => {
                *tally
                    .protocol_errors
                    .entry("continuation frame".into())
                    .or_insert(0) += 1
            }
            Frame::Binary(_) | Frame::Pong(_) => {}
        }
    }
}

/// The upgrade (with the accept key and the subprotocol checked), `connection_init` →
/// `connection_ack`, and the subscription request.
async fn handshake(
    local: SocketAddrV4,
    target: &Target,
    protocol: WsProtocol,
    init: &str,
    subscribe: String,
) -> Result<WsConn, Handshake> {
    let (stream, leftover) = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        upgrade(local, target, protocol.name()),
    )
    .await
    {
        Err(_) => return Err(Handshake::Failed("upgrade timed out".into())),
        Ok(Err(kind)) => return Err(Handshake::Failed(kind)),
        Ok(Ok(parts)) => parts,
    };
    let mut conn = WsConn::new(stream, leftover);
    if conn.send(Message::Text(init.into())).await.is_err() {
        return Err(Handshake::Failed("send failed".into()));
    }
    let acked = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            match conn.next_frame().await {
                Ok(Some(Frame::Text(bytes))) => match classify(&bytes) {
                    Incoming::Other(kind) if kind == "connection_ack" => return Ok(()),
                    Incoming::Other(kind) => return Err(Handshake::Failed(kind)),
                    _ => continue,
                },
                Ok(Some(Frame::Close(reason))) => {
                    return Err(Handshake::Closed(
                        reason.map_or("close".into(), |r| u16::from(r.code).to_string()),
                    ))
                }
                Ok(Some(_)) => continue,
                Ok(None) => return Err(Handshake::Closed("eof".into())),
                Err(kind) => return Err(Handshake::Failed(kind)),
            }
        }
    })
    .await;
    match acked {
        Err(_) => return Err(Handshake::Failed("no connection_ack in time".into())),
        Ok(Err(outcome)) => return Err(outcome),
        Ok(Ok(())) => {}
    }
    if conn.send(Message::Text(subscribe.into())).await.is_err() {
        return Err(Handshake::Failed("send failed".into()));
    }
    Ok(conn)
}

/// A subscriber over GraphQL over SSE: one `POST` with `Accept: text/event-stream`, then the
/// events counted as [`subscriber`] counts deliveries, until told to stop or the stream ends.
/// HTTP/1.0, so that the body comes unchunked, event after event.
async fn sse_subscriber(sub: Subscription) -> Tally {
    let shared = &sub.shared;
    let mut tally = Tally::default();
    let began = Instant::now();
    let pk = sub.args.pks[sub.pk_index];
    let body = json!({
        "query": format!("subscription {{ carModelUpdated(pk: {pk}) {{ id make model }} }}"),
    })
    .to_string();
    let opened = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut stream = super::ws::connect(sub.local, &sub.target).await?;
        let request = format!(
            "POST {path} HTTP/1.0\r\nHost: {host}\r\nAccept: text/event-stream\r\n\
             Authorization: Bearer {token}\r\nContent-Type: application/json\r\n\
             Content-Length: {length}\r\n\r\n{body}",
            path = sub.target.path(),
            host = sub.target.authority(),
            token = sub.token,
            length = body.len(),
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|err| err.to_string())?;
        let mut buf = Vec::new();
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                if !buf.starts_with(b"HTTP/1.1 200") && !buf.starts_with(b"HTTP/1.0 200") {
                    let line = String::from_utf8_lossy(&buf[..buf.len().min(40)]).into_owned();
                    return Err(format!("stream refused: {line}"));
                }
                let rest = buf.split_off(end + 4);
                return Ok((stream, rest));
            }
            let mut chunk = [0u8; 1024];
            match stream.read(&mut chunk).await {
                Ok(0) => return Err("eof before the stream".into()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(err) => return Err(err.to_string()),
            }
        }
    })
    .await;
    let (mut stream, mut buf) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(kind)) => {
            Handshake::Failed(kind).count(&mut tally);
            shared.attempted.fetch_add(1, Ordering::Relaxed);
            return tally;
        }
        Err(_) => {
            Handshake::Failed("no stream in time".into()).count(&mut tally);
            shared.attempted.fetch_add(1, Ordering::Relaxed);
            return tally;
        }
    };
    established(&sub, began, &mut tally);
    let readers = &shared.live_by_pk[sub.pk_index];
    let mut seen = vec![0u64; shared.delivered.len().div_ceil(64)];
    let stopped = sub.stop.notify.notified();
    tokio::pin!(stopped);
    stopped.as_mut().enable();
    let ended = loop {
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            if event.starts_with(b":") {
                tally.keepalives += 1;
                continue;
            }
            match event_index(&event, &shared.run) {
                Some(index) if index < shared.delivered.len() => {
                    record(&mut seen, index, shared.now_ns(), shared, &mut tally);
                }
                _ => tally.foreign += 1,
            }
        }
        if sub.stop.flag.load(Ordering::Relaxed) {
            break None;
        }
        let mut chunk = [0u8; 2048];
        tokio::select! {
            () = stopped.as_mut() => break None,
            read = stream.read(&mut chunk) => match read {
                Ok(0) => break Some("eof".to_owned()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(err) => break Some(websocket_error(&err)),
            },
        }
    };
    if let Some(kind) = ended {
        *tally.closes.entry(kind).or_insert(0) += 1;
        shared.dropped.fetch_add(1, Ordering::Relaxed);
    }
    if sub.reads {
        readers.fetch_sub(1, Ordering::Relaxed);
    }
    let _ = stream.shutdown().await;
    tally
}

/// A connection that got through: its handshake time, and its place in the counts (in its car's
/// readers when it may read the car).
fn established(sub: &Subscription, began: Instant, tally: &mut Tally) {
    let shared = &sub.shared;
    tally
        .handshake_us
        .push(began.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    if sub.reads {
        shared.live_by_pk[sub.pk_index].fetch_add(1, Ordering::Relaxed);
    }
    shared.established.fetch_add(1, Ordering::Relaxed);
    shared
        .last_established_ns
        .fetch_max(shared.now_ns(), Ordering::Relaxed);
    shared.attempted.fetch_add(1, Ordering::Relaxed);
}

/// Delivery of event `index` received at `received_ns`: counted once, a repeat as a duplicate.
fn record(seen: &mut [u64], index: usize, received_ns: u64, shared: &Shared, tally: &mut Tally) {
    let (word, bit) = (index / 64, 1u64 << (index % 64));
    if seen[word] & bit != 0 {
        tally.duplicates += 1;
        return;
    }
    seen[word] |= bit;
    shared.delivered[index].fetch_add(1, Ordering::Relaxed);
    tally.receipts.push((index as u32, received_ns));
}
