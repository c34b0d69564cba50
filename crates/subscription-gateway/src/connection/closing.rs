//! How a connection ends: the close code and reason, and the closing handshake.

use std::time::Duration;

use crate::metrics::GatewayMetrics;
use crate::protocol::{self, close};
use crate::socket::{Filled, Inbound, Link, LinkState};

/// How long the close frame may wait behind undelivered messages.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// After our close frame, how long the client has to close its side before the socket is
/// dropped (dropping it with unread input would reset the connection and could lose the frame).
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// How the connection ends: a close code and a reason for the client.
pub(super) struct Closing {
    pub(super) code: u16,
    pub(super) reason: String,
    /// How the metric names it when no close frame is sent: the client is gone.
    gone: Option<&'static str>,
}

impl Closing {
    pub(super) fn new(code: u16, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            gone: None,
        }
    }

    /// The client closed the TCP connection without a close frame (FIN); there is nobody to
    /// send one to.
    pub(super) fn finished() -> Self {
        Self {
            gone: Some("fin"),
            ..Self::new(close::NORMAL, "")
        }
    }

    /// The connection failed (reset, timed out): nobody to send a close frame to either.
    pub(super) fn failed() -> Self {
        Self {
            gone: Some("reset"),
            ..Self::new(close::NORMAL, "")
        }
    }

    /// The metric's label: the close code sent, or how the client went.
    pub(super) fn label(&self) -> std::borrow::Cow<'static, str> {
        match self.gone {
            Some(gone) => gone.into(),
            None => self.code.to_string().into(),
        }
    }

    pub(super) fn slow(metrics: &GatewayMetrics) -> Self {
        metrics.slow_consumers.inc();
        Self::new(
            close::TRY_AGAIN_LATER,
            "slow consumer: too many undelivered messages",
        )
    }

    pub(super) fn going_away() -> Self {
        Self::new(close::GOING_AWAY, "server shutting down; reconnect")
    }

    /// Why the link refused a message, or woke its connection to end it.
    pub(super) fn refused(link: &Link, metrics: &GatewayMetrics) -> Self {
        match link.state() {
            LinkState::Slow => Self::slow(metrics),
            LinkState::Gone => Self::failed(),
            // Woken to close by whoever queued the close frame, or for nothing: no frame now.
            LinkState::Closing | LinkState::Open => Self::finished(),
        }
    }
}

/// Sends the close frame behind whatever still waits (at most [`CLOSE_TIMEOUT`]), closes our
/// side, and gives the client [`CLOSE_LINGER`] to close its own.
pub(super) async fn close_socket(link: &Link, closing: &Closing) {
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
