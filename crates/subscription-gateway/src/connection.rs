//! The life of one websocket connection.
//!
//! One task per socket runs a `select!` over everything that can happen to it: bytes from the
//! client, the link waking it (bytes wait to be written, a subscription ended, the client is too
//! slow), the socket becoming writable again, the server's shutdown, and what its [`Phase`]
//! brings: before `connection_init` is accepted, the init deadline; once [`Ready`], the access
//! token's expiry, a revocation of the user's session and the keep-alive tick. Only a `Ready`
//! connection has claims, so a message that needs them matches the phase instead of checking
//! an option. Results of
//! subscriptions do not pass through this task: the shared executions write them straight into
//! the socket through the [`Link`]. When the kernel's buffer is full they wait in the link's
//! queue, which this task writes out; more than OUTBOUND_QUEUE waiting messages, or no progress
//! for WRITE_TIMEOUT_SECS, means the client reads too slowly and the connection closes (1013)
//! instead of buffering without bound.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Sleep;

use serde_json::Value;
use service_kit::http::Counted;
use tokens::auth::AuthError;
use tokens::jwt::{Claims, TokenError};

use crate::metrics::GatewayMetrics;
use crate::operations::{start, Active, Caller};
use crate::protocol::{self, close, ClientMessage, Protocol};
use crate::socket::{
    ping_frame, pong_frame, Filled, Inbound, Incoming, Link, LinkState, ReadError,
};
use crate::state::Shared;

/// How the connection ends: a close code and a reason for the client.
struct Closing {
    code: u16,
    reason: String,
    /// How the metric names it when no close frame is sent: the client is gone.
    gone: Option<&'static str>,
}

impl Closing {
    fn new(code: u16, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            gone: None,
        }
    }

    /// The client closed the TCP connection without a close frame (FIN); there is nobody to
    /// send one to.
    fn finished() -> Self {
        Self {
            gone: Some("fin"),
            ..Self::new(close::NORMAL, "")
        }
    }

    /// The connection failed (reset, timed out): nobody to send a close frame to either.
    fn failed() -> Self {
        Self {
            gone: Some("reset"),
            ..Self::new(close::NORMAL, "")
        }
    }

    /// The metric's label: the close code sent, or how the client went.
    fn label(&self) -> std::borrow::Cow<'static, str> {
        match self.gone {
            Some(gone) => gone.into(),
            None => self.code.to_string().into(),
        }
    }

    fn slow(metrics: &GatewayMetrics) -> Self {
        metrics.slow_consumers.inc();
        Self::new(
            close::TRY_AGAIN_LATER,
            "slow consumer: too many undelivered messages",
        )
    }

    fn going_away() -> Self {
        Self::new(close::GOING_AWAY, "server shutting down; reconnect")
    }

    /// Why the link refused a message, or woke its connection to end it.
    fn refused(link: &Link, metrics: &GatewayMetrics) -> Self {
        match link.state() {
            LinkState::Slow => Self::slow(metrics),
            LinkState::Gone => Self::failed(),
            // Woken to close by whoever queued the close frame, or for nothing: no frame now.
            LinkState::Closing | LinkState::Open => Self::finished(),
        }
    }
}

/// How long the close frame may wait behind undelivered messages.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// After our close frame, how long the client has to close its side before the socket is
/// dropped (dropping it with unread input would reset the connection and could lose the frame).
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Where a connection is in its life. What a message may do depends on it, and the type says so:
/// only a [`Ready`] connection has claims, an expiry and keep-alives.
enum Phase {
    /// Until `connection_init` is accepted; closes at the init deadline (4408).
    AwaitingInit {
        deadline: Pin<Box<Sleep>>,
    },
    Ready(Ready),
}

/// An authenticated connection: its token's claims, when they expire, and its place in the
/// user's count.
struct Ready {
    claims: Claims,
    /// The `Authorization` value the claims came from, for the operations forwarded to
    /// api-service; replaced by a renewal.
    authorization: String,
    /// The token's `exp` plus the verifier's leeway: as long as an HTTP request with the same
    /// token is served.
    expiry: Pin<Box<Sleep>>,
    /// Changes whenever a logout's cutoff is raised in this process (an announcement the hub
    /// read, or the poll); the token is then checked again, and a revoked one closes the socket.
    /// `None` when the verifier follows no logouts.
    revocations: Option<watch::Receiver<u64>>,
    keepalive: tokio::time::Interval,
    _user_slot: crate::user_sockets::UserSlot,
}

impl Ready {
    fn new(
        shared: &Shared,
        claims: Claims,
        authorization: String,
        slot: crate::user_sockets::UserSlot,
    ) -> Self {
        let mut keepalive = tokio::time::interval_at(
            tokio::time::Instant::now() + shared.limits.keepalive,
            shared.limits.keepalive,
        );
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let expiry = Box::pin(tokio::time::sleep_until(expiry_instant(shared, claims.exp)));
        Self {
            claims,
            authorization,
            expiry,
            revocations: shared.verifier.revocations().map(|list| list.changes()),
            keepalive,
            _user_slot: slot,
        }
    }

    /// A renewal: the same user's newer token.
    fn renew(&mut self, shared: &Shared, claims: Claims, authorization: String) {
        self.expiry
            .as_mut()
            .reset(expiry_instant(shared, claims.exp));
        self.claims = claims;
        self.authorization = authorization;
    }
}

/// Resolves when a logout's cutoff was raised since the last look; never without a feed.
pub(crate) async fn revocations_changed(feed: &mut Option<watch::Receiver<u64>>) {
    match feed {
        Some(receiver) => {
            if receiver.changed().await.is_err() {
                // The list is gone (the process is stopping): nothing more will change.
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

pub(crate) fn expiry_instant(shared: &Shared, exp: i64) -> tokio::time::Instant {
    let left = exp - chrono::Utc::now().timestamp();
    tokio::time::Instant::now()
        + Duration::from_secs(left.max(0) as u64)
        + Duration::from_secs(shared.verifier.leeway_secs())
}

/// What the phase's own clocks and feeds bring.
enum PhaseEvent {
    InitTimeout,
    Expired,
    /// A cutoff was raised somewhere: the token may be revoked now.
    RevocationsChanged,
    Keepalive,
}

impl Phase {
    /// The next thing the phase's clocks or feeds have for the connection.
    async fn next_event(&mut self) -> PhaseEvent {
        match self {
            Phase::AwaitingInit { deadline } => {
                deadline.as_mut().await;
                PhaseEvent::InitTimeout
            }
            Phase::Ready(ready) => tokio::select! {
                biased;
                () = ready.expiry.as_mut() => PhaseEvent::Expired,
                () = revocations_changed(&mut ready.revocations) => PhaseEvent::RevocationsChanged,
                _ = ready.keepalive.tick() => PhaseEvent::Keepalive,
            },
        }
    }
}

/// Serves one socket until it closes. `header_authorization` is the upgrade request's
/// `Authorization` header, used when `connection_init` carries no token.
pub async fn run(
    shared: Arc<Shared>,
    protocol: Protocol,
    link: Link,
    mut inbound: Inbound,
    header_authorization: Option<String>,
    _address_slot: Counted<IpAddr>,
) {
    let link = Arc::new(link);
    let Some(socket) = link.stream() else {
        // Only a websocket's link is served here; a streamed response's has no socket.
        return;
    };
    shared.metrics.connections_open.inc();
    let mut phase = Phase::AwaitingInit {
        deadline: Box::pin(tokio::time::sleep(shared.limits.init_timeout)),
    };
    let mut active: HashMap<String, Active> = HashMap::new();
    // Reset whenever queued bytes make progress; firing means the client stopped reading.
    let stalled = tokio::time::sleep(shared.limits.write_timeout);
    tokio::pin!(stalled);
    let mut flushing = false;
    // When the client last sent anything: a socket silent for two keep-alive intervals (whose
    // pings would each have been answered) is taken for half-open and closed, instead of
    // holding its descriptor and memory until the kernel gives up on it, hours later.
    let mut last_heard = tokio::time::Instant::now();
    // Bytes that arrived with the upgrade request are handled before the first read.
    let mut ready_input = true;
    let replay_slots = shared.replays.connection_slots();

    let closing: Closing = 'serve: loop {
        if ready_input {
            ready_input = false;
            loop {
                let message = match inbound.next_message() {
                    Ok(Some(message)) => message,
                    Ok(None) => break,
                    Err(ReadError::TooBig(_)) => {
                        break 'serve Closing::new(close::TOO_BIG, "message too big");
                    }
                    Err(err) => break 'serve Closing::new(close::BAD_REQUEST, err.to_string()),
                };
                let text = match message {
                    Incoming::Text(text) => text,
                    Incoming::Binary => {
                        break 'serve Closing::new(
                            close::UNSUPPORTED_DATA,
                            "binary messages are not supported; send JSON text",
                        );
                    }
                    Incoming::Ping(bytes) => {
                        // A websocket-level ping is not a protocol error: answer it.
                        if !link.push(&pong_frame(&bytes)) {
                            break 'serve Closing::refused(&link, &shared.metrics);
                        }
                        continue;
                    }
                    Incoming::Pong => continue,
                    Incoming::Close => break 'serve Closing::new(close::NORMAL, ""),
                };
                let Ok(text) = std::str::from_utf8(&text) else {
                    break 'serve Closing::new(close::BAD_REQUEST, "text message is not UTF-8");
                };
                let message = match protocol::parse(protocol, text) {
                    Ok(message) => message,
                    Err(err) => break 'serve Closing::new(close::BAD_REQUEST, err.to_string()),
                };
                let handled = handle(
                    &shared,
                    protocol,
                    &link,
                    message,
                    &mut phase,
                    &mut active,
                    Peer {
                        header_authorization: header_authorization.as_deref(),
                        address: *_address_slot.key(),
                        replay_slots: &replay_slots,
                    },
                )
                .await;
                if let Err(closing) = handled {
                    break 'serve closing;
                }
            }
        }
        if !flushing && link.has_pending() {
            flushing = true;
            stalled
                .as_mut()
                .reset(tokio::time::Instant::now() + shared.limits.write_timeout);
        }
        tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => break Closing::going_away(),
            () = link.woken() => {
                for id in link.take_finished() {
                    active.remove(&id);
                }
                if link.state() != LinkState::Open {
                    break Closing::refused(&link, &shared.metrics);
                }
            }
            writable = socket.writable(), if flushing => {
                if writable.is_err() {
                    break Closing::failed();
                }
                match link.flush() {
                    Ok(true) => flushing = false,
                    Ok(false) => stalled
                        .as_mut()
                        .reset(tokio::time::Instant::now() + shared.limits.write_timeout),
                    Err(_) => break Closing::failed(),
                }
            }
            () = &mut stalled, if flushing => break Closing::slow(&shared.metrics),
            event = phase.next_event() => match (event, &phase) {
                (PhaseEvent::InitTimeout, _) => {
                    break Closing::new(close::INIT_TIMEOUT, "Connection initialisation timeout");
                }
                (PhaseEvent::Expired, _) => break Closing::new(close::FORBIDDEN, "token expired"),
                (PhaseEvent::RevocationsChanged, Phase::Ready(ready)) => {
                    if shared.verifier.is_revoked(&ready.claims) {
                        break Closing::new(close::FORBIDDEN, "token revoked (logged out)");
                    }
                }
                (PhaseEvent::RevocationsChanged, _) => {}
                (PhaseEvent::Keepalive, _) => {
                    if last_heard.elapsed() >= 2 * shared.limits.keepalive {
                        // Silent with bytes waiting: a client that stopped reading, not one
                        // whose connection vanished.
                        if link.has_pending() {
                            break Closing::slow(&shared.metrics);
                        }
                        break Closing::new(close::GOING_AWAY, "no answer to keep-alive pings");
                    }
                    if !link.push_text(&protocol::keepalive(protocol)) {
                        break Closing::refused(&link, &shared.metrics);
                    }
                    // The legacy protocol's `ka` asks for no answer; a websocket ping gets one
                    // from every client's websocket layer.
                    if protocol == Protocol::LegacyWs && !link.push(&ping_frame()) {
                        break Closing::refused(&link, &shared.metrics);
                    }
                    shared.metrics.messages_sent.inc();
                }
            },
            readable = socket.readable() => {
                if readable.is_err() {
                    break Closing::failed();
                }
                match inbound.fill(socket) {
                    Filled::Data => {
                        ready_input = true;
                        last_heard = tokio::time::Instant::now();
                    }
                    Filled::Closed => break Closing::finished(),
                    Filled::Failed => break Closing::failed(),
                }
            }
        }
    };

    active.clear();
    shared
        .metrics
        .connections_closed
        .with_label_values(&[&closing.label()])
        .inc();
    // The user's place is given back when the close is decided, not once it has drained: a
    // client cut (1013, 1001) that reconnects at once must not find its own closing socket
    // still counted (1008). Boxed: a Redis round trip, once per socket. Before the open count
    // drops, which a draining process waits for, so that the close frame still goes out.
    if let Phase::Ready(ready) = phase {
        Box::pin(ready._user_slot.release()).await;
    }
    shared.metrics.connections_open.dec();
    close_socket(&link, &closing).await;
}

/// Sends the close frame behind whatever still waits (at most [`CLOSE_TIMEOUT`]), closes our
/// side, and gives the client [`CLOSE_LINGER`] to close its own.
async fn close_socket(link: &Link, closing: &Closing) {
    let Some(socket) = link.stream() else {
        return;
    };
    if link.state() == LinkState::Gone {
        return;
    }
    link.push_close(closing.code, &protocol::close_reason(&closing.reason));
    let flushed = tokio::time::timeout(CLOSE_TIMEOUT, async {
        loop {
            match link.flush() {
                Ok(true) => return true,
                Ok(false) => {
                    if socket.writable().await.is_err() {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
    })
    .await;
    if !matches!(flushed, Ok(true)) {
        return;
    }
    let _ = socket2::SockRef::from(socket).shutdown(std::net::Shutdown::Write);
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        loop {
            if socket.readable().await.is_err() {
                return;
            }
            if let Filled::Closed | Filled::Failed = Inbound::discard(socket) {
                return;
            }
        }
    })
    .await;
}

/// Who is at the other end of a socket, as the upgrade request said.
struct Peer<'a> {
    /// The upgrade request's `Authorization`, used when `connection_init` carries no token.
    header_authorization: Option<&'a str>,
    /// The client's address (behind NGINX, the one it forwarded).
    address: IpAddr,
    /// This connection's replays running (MAX_REPLAYS_PER_CONNECTION).
    replay_slots: &'a Arc<tokio::sync::Semaphore>,
}

/// One message from the client; an error when the connection has to close.
async fn handle(
    shared: &Shared,
    protocol: Protocol,
    link: &Arc<Link>,
    message: ClientMessage,
    phase: &mut Phase,
    active: &mut HashMap<String, Active>,
    peer: Peer<'_>,
) -> Result<(), Closing> {
    let header_authorization = peer.header_authorization;
    let send = |text: String| -> Result<(), Closing> {
        if link.push_text(&text) {
            shared.metrics.messages_sent.inc();
            Ok(())
        } else {
            Err(Closing::refused(link, &shared.metrics))
        }
    };
    match message {
        ClientMessage::Init { payload } => {
            if let Phase::Ready(_) = phase {
                return Err(Closing::new(
                    close::TOO_MANY_INITS,
                    "Too many initialisation requests",
                ));
            }
            let token = connection_token(&payload, header_authorization);
            let authorization = token.clone().unwrap_or_default();
            // Boxed: the verifier's future (a JWKS fetch, possibly) is large and rare, and
            // would otherwise make every idle connection's task as large as it.
            match Box::pin(shared.verifier.authenticate(token.as_deref())).await {
                Ok(verified) => {
                    // Boxed too: the Redis round trip's future is large, and is awaited once.
                    let Some(user_slot) = Box::pin(shared.users.enter(verified.user_id)).await
                    else {
                        let reason = format!(
                            "too many connections for this user (at most {})",
                            shared.users.max()
                        );
                        if protocol == Protocol::LegacyWs {
                            let _ = send(protocol::connection_error(&reason));
                        }
                        return Err(Closing::new(close::POLICY_VIOLATION, reason));
                    };
                    let ready = Ready::new(shared, verified, authorization, user_slot);
                    // Checked again now that the connection watches the cutoffs: a logout
                    // recorded since the token was verified would otherwise wake no one.
                    if shared.verifier.is_revoked(&ready.claims) {
                        let reason = auth_reason(&AuthError::Token(TokenError::Revoked));
                        if protocol == Protocol::LegacyWs {
                            let _ = send(protocol::connection_error(&reason));
                        }
                        return Err(Closing::new(close::FORBIDDEN, reason));
                    }
                    *phase = Phase::Ready(ready);
                    send(protocol::connection_ack())?;
                    // The legacy protocol expects a first `ka` right after the ack.
                    if protocol == Protocol::LegacyWs {
                        send(protocol::keepalive(protocol))?;
                    }
                    Ok(())
                }
                Err(err) => {
                    let reason = auth_reason(&err);
                    if protocol == Protocol::LegacyWs {
                        let _ = send(protocol::connection_error(&reason));
                    }
                    Err(Closing::new(close::FORBIDDEN, reason))
                }
            }
        }
        ClientMessage::Subscribe { id, payload } => {
            let Phase::Ready(auth) = &*phase else {
                return Err(Closing::new(
                    close::UNAUTHORIZED,
                    "Unauthorized: send connection_init with a token first",
                ));
            };
            if active.contains_key(&id) {
                return Err(Closing::new(
                    close::SUBSCRIBER_EXISTS,
                    format!("Subscriber for {id} already exists"),
                ));
            }
            if active.len() >= shared.limits.max_subscriptions {
                let errors = protocol::errors(
                    &format!(
                        "too many subscriptions on this connection (at most {})",
                        shared.limits.max_subscriptions
                    ),
                    "TOO_MANY_SUBSCRIPTIONS",
                );
                send(protocol::operation_error(&id, errors))?;
                return Ok(());
            }
            let caller = Caller {
                claims: &auth.claims,
                authorization: &auth.authorization,
                address: peer.address,
                replay_slots: peer.replay_slots,
            };
            match start(shared, protocol, link, &id, payload, caller).await {
                Ok(started) => {
                    active.insert(id, started);
                    Ok(())
                }
                Err(errors) => send(protocol::operation_error(&id, errors)),
            }
        }
        ClientMessage::Stop { id } => {
            if active.remove(&id).is_some() {
                // graphql-transport-ws: the client's `complete` needs no answer; the legacy
                // protocol confirms a `stop` with `complete`.
                if protocol == Protocol::LegacyWs {
                    send(protocol::complete(&id))?;
                }
            }
            Ok(())
        }
        ClientMessage::Ping { payload } => {
            let token = payload
                .as_ref()
                .and_then(|payload| connection_token(payload, None));
            let (Some(token), Phase::Ready(auth)) = (token, &mut *phase) else {
                // A payload is echoed (the protocol allows it), but never one carrying a token
                // (before `connection_init`, a token renews nothing).
                let echoed = payload.filter(|payload| connection_token(payload, None).is_none());
                send(protocol::pong(echoed))?;
                return Ok(());
            };
            // Renewal on the open socket: the new token is checked as at `connection_init`,
            // must be the same user's, and moves the connection's expiry to its own.
            match Box::pin(shared.verifier.authenticate(Some(&token))).await {
                Ok(renewed) if renewed.user_id == auth.claims.user_id => {
                    let exp = renewed.exp;
                    auth.renew(shared, renewed, token);
                    send(protocol::pong(Some(serde_json::json!({ "exp": exp }))))?;
                    Ok(())
                }
                Ok(_) => Err(Closing::new(
                    close::FORBIDDEN,
                    "Forbidden: the renewal token belongs to another user",
                )),
                Err(err) => Err(Closing::new(close::FORBIDDEN, auth_reason(&err))),
            }
        }
        ClientMessage::Pong => Ok(()),
        ClientMessage::Terminate => Err(Closing::new(close::NORMAL, "connection terminated")),
    }
}

/// The token of a connection: `connectionParams.Authorization` (or `authorization`), as GraphQL
/// Playground and Apollo send it; else the upgrade request's header.
fn connection_token(payload: &Value, header: Option<&str>) -> Option<String> {
    let from_params = ["Authorization", "authorization"]
        .into_iter()
        .find_map(|key| payload.get(key))
        .or_else(|| {
            // Some clients nest headers: `{"headers": {"Authorization": …}}`.
            let headers = payload.get("headers")?;
            ["Authorization", "authorization"]
                .into_iter()
                .find_map(|key| headers.get(key))
        })
        .and_then(Value::as_str)
        .map(str::to_owned);
    from_params.or_else(|| header.map(str::to_owned))
}

/// The close reason of a refused `connection_init` (at most 123 bytes, so kept short).
fn auth_reason(err: &AuthError) -> String {
    match err {
        AuthError::MissingHeader => {
            "Forbidden: no token; set connectionParams {\"Authorization\": \"Bearer <access token>\"}"
                .to_owned()
        }
        AuthError::NotBearer => {
            "Forbidden: malformed Authorization; expected \"Bearer <access token>\"".to_owned()
        }
        other => format!("Forbidden: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_token_comes_from_connection_params_before_the_header() {
        let params = json!({"Authorization": "Bearer a"});
        assert_eq!(
            connection_token(&params, Some("Bearer b")).as_deref(),
            Some("Bearer a")
        );
        let lower = json!({"authorization": "Bearer c"});
        assert_eq!(connection_token(&lower, None).as_deref(), Some("Bearer c"));
        assert_eq!(
            connection_token(&Value::Null, Some("Bearer b")).as_deref(),
            Some("Bearer b")
        );
        assert_eq!(connection_token(&json!({"Authorization": 5}), None), None);
    }
}
