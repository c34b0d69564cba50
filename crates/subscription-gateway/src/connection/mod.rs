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

mod closing;
mod messages;
mod phase;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use service_kit::http::Counted;
use tokio::sync::Semaphore;

use crate::operations::Active;
use crate::protocol::{self, close, Protocol};
use crate::socket::{
    ping_frame, pong_frame, Filled, Inbound, Incoming, Link, LinkState, ReadError,
};
use crate::state::Shared;
use closing::{close_socket, Closing};
pub(crate) use phase::{expiry_instant, revocations_changed};
use phase::{Phase, PhaseEvent};

/// One socket as its task serves it.
struct Connection<'a> {
    shared: &'a Shared,
    protocol: Protocol,
    link: Arc<Link>,
    phase: Phase,
    /// The operations running, by the client's id.
    active: HashMap<String, Active>,
    /// The upgrade request's `Authorization`, used when `connection_init` carries no token.
    header_authorization: Option<String>,
    /// The client's address (behind NGINX, the one it forwarded).
    address: IpAddr,
    /// This connection's replays running (MAX_REPLAYS_PER_CONNECTION).
    replay_slots: Arc<Semaphore>,
    /// When the client last sent anything: a socket silent for two keep-alive intervals (whose
    /// pings would each have been answered) is taken for half-open and closed, instead of
    /// holding its descriptor and memory until the kernel gives up on it, hours later.
    last_heard: tokio::time::Instant,
}

/// Serves one socket until it closes. `header_authorization` is the upgrade request's
/// `Authorization` header, used when `connection_init` carries no token.
pub async fn run(
    shared: Arc<Shared>,
    protocol: Protocol,
    link: Link,
    mut inbound: Inbound,
    header_authorization: Option<String>,
    address_slot: Counted<IpAddr>,
) {
    let link = Arc::new(link);
    let Some(socket) = link.stream() else {
        // Only a websocket's link is served here; a streamed response's has no socket.
        return;
    };
    shared.metrics.connections_open.inc();
    let mut connection = Connection {
        shared: &shared,
        protocol,
        link: link.clone(),
        phase: Phase::AwaitingInit {
            deadline: Box::pin(tokio::time::sleep(shared.limits.init_timeout)),
        },
        active: HashMap::new(),
        header_authorization,
        address: *address_slot.key(),
        replay_slots: shared.replays.connection_slots(),
        last_heard: tokio::time::Instant::now(),
    };
    let closing = connection.serve(socket, &mut inbound).await;
    connection.active.clear();
    shared
        .metrics
        .connections_closed
        .with_label_values(&[&closing.label()])
        .inc();
    // The user's place is given back when the close is decided, not once it has drained: a
    // client cut (1013, 1001) that reconnects at once must not find its own closing socket
    // still counted (1008). Boxed: a Redis round trip, once per socket. Before the open count
    // drops, which a draining process waits for, so that the close frame still goes out.
    if let Phase::Ready(ready) = connection.phase {
        Box::pin(ready.user_slot.release()).await;
    }
    shared.metrics.connections_open.dec();
    close_socket(&link, &closing).await;
    drop(address_slot);
}

impl Connection<'_> {
    /// Everything that can happen to the socket, until it has to close.
    async fn serve(&mut self, socket: &tokio::net::TcpStream, inbound: &mut Inbound) -> Closing {
        let shared = self.shared;
        // Reset whenever queued bytes make progress; firing means the client stopped reading.
        let stalled = tokio::time::sleep(shared.limits.write_timeout);
        tokio::pin!(stalled);
        let mut flushing = false;
        // Bytes that arrived with the upgrade request are handled before the first read.
        let mut ready_input = true;
        loop {
            if std::mem::take(&mut ready_input) {
                if let Err(closing) = self.read_messages(inbound).await {
                    return closing;
                }
            }
            if !flushing && self.link.has_pending() {
                flushing = true;
                stalled
                    .as_mut()
                    .reset(tokio::time::Instant::now() + shared.limits.write_timeout);
            }
            let step = tokio::select! {
                biased;
                _ = shared.shutdown.cancelled() => Err(Closing::going_away()),
                () = self.link.woken() => self.woken(),
                writable = socket.writable(), if flushing => match writable {
                    Err(_) => Err(Closing::failed()),
                    Ok(()) => match self.link.flush() {
                        Ok(true) => {
                            flushing = false;
                            Ok(())
                        }
                        Ok(false) => {
                            stalled
                                .as_mut()
                                .reset(tokio::time::Instant::now() + shared.limits.write_timeout);
                            Ok(())
                        }
                        Err(_) => Err(Closing::failed()),
                    },
                },
                () = &mut stalled, if flushing => Err(Closing::slow(&shared.metrics)),
                event = self.phase.next_event() => self.phase_event(event),
                readable = socket.readable() => match readable {
                    Err(_) => Err(Closing::failed()),
                    Ok(()) => match inbound.fill(socket) {
                        Filled::Data => {
                            ready_input = true;
                            self.last_heard = tokio::time::Instant::now();
                            Ok(())
                        }
                        Filled::Closed => Err(Closing::finished()),
                        Filled::Failed => Err(Closing::failed()),
                    },
                },
            };
            if let Err(closing) = step {
                return closing;
            }
        }
    }

    /// Handles every whole message read so far.
    async fn read_messages(&mut self, inbound: &mut Inbound) -> Result<(), Closing> {
        loop {
            let message = match inbound.next_message() {
                Ok(Some(message)) => message,
                Ok(None) => return Ok(()),
                Err(ReadError::TooBig(_)) => {
                    return Err(Closing::new(close::TOO_BIG, "message too big"))
                }
                Err(err) => return Err(Closing::new(close::BAD_REQUEST, err.to_string())),
            };
            let text = match message {
                Incoming::Text(text) => text,
                Incoming::Binary => {
                    return Err(Closing::new(
                        close::UNSUPPORTED_DATA,
                        "binary messages are not supported; send JSON text",
                    ));
                }
                Incoming::Ping(bytes) => {
                    // A websocket-level ping is not a protocol error: answer it.
                    if !self.link.push(&pong_frame(&bytes)) {
                        return Err(self.refused());
                    }
                    continue;
                }
                Incoming::Pong => continue,
                Incoming::Close => return Err(Closing::new(close::NORMAL, "")),
            };
            let Ok(text) = std::str::from_utf8(&text) else {
                return Err(Closing::new(
                    close::BAD_REQUEST,
                    "text message is not UTF-8",
                ));
            };
            let message = protocol::parse(self.protocol, text)
                .map_err(|err| Closing::new(close::BAD_REQUEST, err.to_string()))?;
            self.handle(message).await?;
        }
    }

    /// The link woke the task: operations that finished, or a link that is to close.
    fn woken(&mut self) -> Result<(), Closing> {
        for id in self.link.take_finished() {
            self.active.remove(&id);
        }
        if self.link.state() != LinkState::Open {
            return Err(self.refused());
        }
        Ok(())
    }

    fn phase_event(&mut self, event: PhaseEvent) -> Result<(), Closing> {
        match (event, &self.phase) {
            (PhaseEvent::InitTimeout, _) => Err(Closing::new(
                close::INIT_TIMEOUT,
                "Connection initialisation timeout",
            )),
            (PhaseEvent::Expired, _) => Err(Closing::new(close::FORBIDDEN, "token expired")),
            (PhaseEvent::RevocationsChanged, Phase::Ready(ready)) => {
                if self.shared.verifier.is_revoked(&ready.claims) {
                    return Err(Closing::new(close::FORBIDDEN, "token revoked (logged out)"));
                }
                Ok(())
            }
            (PhaseEvent::RevocationsChanged, _) => Ok(()),
            (PhaseEvent::Keepalive, _) => self.keepalive(),
        }
    }

    /// The keep-alive tick: a client silent too long is closed, any other pinged.
    fn keepalive(&mut self) -> Result<(), Closing> {
        let shared = self.shared;
        if self.last_heard.elapsed() >= 2 * shared.limits.keepalive {
            // Silent with bytes waiting: a client that stopped reading, not one whose
            // connection vanished.
            if self.link.has_pending() {
                return Err(Closing::slow(&shared.metrics));
            }
            return Err(Closing::new(
                close::GOING_AWAY,
                "no answer to keep-alive pings",
            ));
        }
        if !self.link.push_text(&protocol::keepalive(self.protocol)) {
            return Err(self.refused());
        }
        // The legacy protocol's `ka` asks for no answer; a websocket ping gets one from every
        // client's websocket layer.
        if self.protocol == Protocol::LegacyWs && !self.link.push(&ping_frame()) {
            return Err(self.refused());
        }
        shared.metrics.messages_sent.inc();
        Ok(())
    }

    /// Writes one protocol message; an error when the link refuses it.
    fn send(&self, text: String) -> Result<(), Closing> {
        if self.link.push_text(&text) {
            self.shared.metrics.messages_sent.inc();
            Ok(())
        } else {
            Err(self.refused())
        }
    }

    fn refused(&self) -> Closing {
        Closing::refused(&self.link, &self.shared.metrics)
    }
}
