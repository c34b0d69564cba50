//! The websocket's own I/O, after the upgrade has taken the TCP stream out of actix-http.
//!
//! Two reasons for owning the socket instead of keeping it inside actix-http's dispatcher:
//! - Memory: the dispatcher keeps an 8 KiB read and an 8 KiB write buffer for the life of every
//!   upgraded connection. Here an idle connection holds no buffer at all: the read buffer exists
//!   only while a frame is incomplete, the write buffer only while the kernel refuses bytes.
//! - Fan-out cost: a shared execution writes a result straight into each subscriber's socket
//!   ([`Link::push`]: one `send` system call, no task wake-up, no copy into a queue). Only when the
//!   kernel's buffer is full do bytes wait in [`Link`]'s queue, for the connection's own task to
//!   write once the socket is writable again.
//!
//! Writers are serialized by the link's mutex, so frames never interleave; it is held only for
//! one non-blocking `send`, never across an `.await`.

use std::io;
use std::sync::Mutex;

use actix_http::ws::{CloseCode, CloseReason, Codec, Frame, Item, OpCode, Parser, ProtocolError};
use bytes::{Buf as _, Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::lock;

/// Bytes read from the socket per read call.
const READ_CHUNK: usize = 8 * 1024;
/// Most bytes taken from the socket before the received frames are handled; the rest waits for
/// the next turn of the connection's loop, so one flooding client cannot hold a worker.
const READ_BUDGET: usize = 64 * 1024;

/// The write side of one connection, shared by its task and by the executions it subscribes to.
/// A websocket's link writes to its socket; a streamed HTTP response's ([`Link::buffered`]) only
/// queues, for the response body to take ([`Link::take_pending`]) as actix-web writes it.
pub struct Link {
    stream: Option<TcpStream>,
    out: Mutex<Outgoing>,
    /// Wakes the connection's task: bytes wait to be written, a subscription ended, or the
    /// connection has to close.
    wake: Notify,
    /// Most messages that may wait in `pending` (OUTBOUND_QUEUE).
    max_queued: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Open,
    /// The client reads too slowly: more than `max_queued` messages wait. Nothing more is
    /// accepted except the close frame.
    Slow,
    /// The close frame is queued: nothing may follow it.
    Closing,
    /// The socket failed; the client is gone.
    Gone,
}

struct Outgoing {
    /// What the kernel has not taken yet, oldest first.
    pending: BytesMut,
    /// Messages added to `pending` since it was last empty.
    queued: usize,
    state: LinkState,
    /// Subscriptions whose execution ended; their last message is already written or queued.
    finished: Vec<String>,
    /// State subscriptions' newest results kept while the client is behind
    /// ([`Link::push_state`]), written once `pending` has gone out.
    newest: Vec<Newest>,
}

/// How to write a state subscription's result later, saying how many results it stands for:
/// given that count, the frame.
pub type LaterFrame = Box<dyn Fn(u64) -> Bytes + Send + Sync>;

/// A state subscription's newest result, kept instead of queued while the client is behind.
struct Newest {
    id: String,
    /// Results it replaced here, with all they stood for.
    replaced: u64,
    /// Results it stood for already (skipped before it reached this link).
    skipped: u64,
    frame: LaterFrame,
}

impl Link {
    pub fn new(stream: TcpStream, max_queued: usize) -> Self {
        Self::with_stream(Some(stream), max_queued)
    }

    /// A link whose bytes wait for a streamed response body to take them.
    pub fn buffered(max_queued: usize) -> Self {
        Self::with_stream(None, max_queued)
    }

    fn with_stream(stream: Option<TcpStream>, max_queued: usize) -> Self {
        Self {
            stream,
            out: Mutex::new(Outgoing {
                pending: BytesMut::new(),
                queued: 0,
                state: LinkState::Open,
                finished: Vec::new(),
                newest: Vec::new(),
            }),
            wake: Notify::new(),
            max_queued: max_queued.max(1),
        }
    }

    /// The socket; `None` for a [`Link::buffered`] one.
    pub fn stream(&self) -> Option<&TcpStream> {
        self.stream.as_ref()
    }

    /// Resolves when the connection's task has something to do (see [`Link::wake`]).
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    pub fn state(&self) -> LinkState {
        lock(&self.out).state
    }

    /// Writes one whole frame, or queues it behind the bytes still waiting. `false` when the
    /// frame was refused: the connection is slow or gone and its task has been told.
    pub fn push(&self, frame: &[u8]) -> bool {
        let mut out = lock(&self.out);
        if out.state != LinkState::Open {
            return false;
        }
        let stream = match &self.stream {
            Some(stream) if out.pending.is_empty() => stream,
            waiting => {
                // Behind bytes still waiting, or a buffered link (its response body takes
                // them): queued, `queued` bounding what waits.
                if out.queued >= self.max_queued {
                    out.state = LinkState::Slow;
                    drop(out);
                    self.wake.notify_one();
                    return false;
                }
                out.pending.extend_from_slice(frame);
                out.queued += 1;
                // A socket's task is flushing already; a response body must be told.
                let buffered = waiting.is_none();
                drop(out);
                if buffered {
                    self.wake.notify_one();
                }
                return true;
            }
        };
        let written = match stream.try_write(frame) {
            Ok(n) if n == frame.len() => return true,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => 0,
            Err(_) => {
                out.state = LinkState::Gone;
                drop(out);
                self.wake.notify_one();
                return false;
            }
        };
        out.pending.extend_from_slice(&frame[written..]);
        out.queued = 1;
        drop(out);
        self.wake.notify_one();
        true
    }

    /// [`Link::push`] for a result of a state subscription `id`, whose newer results supersede
    /// older ones: while the client is behind by more than half of OUTBOUND_QUEUE, the result
    /// is kept as the subscription's newest instead of queued (replacing one kept before), and
    /// written, saying how many results it stands for (`skipped`), once the queue has gone out.
    /// A client that reads slowly thus gets its records' latest states rather than being cut
    /// off. `None` when refused (see [`Link::push`]); else how many results were replaced.
    pub fn push_state(
        &self,
        id: &str,
        frame: &[u8],
        skipped: u64,
        later: impl FnOnce() -> LaterFrame,
    ) -> Option<u64> {
        let mut out = lock(&self.out);
        let behind = self.stream.is_some()
            && out.state == LinkState::Open
            && (out.queued >= self.max_queued.div_ceil(2)
                || out.newest.iter().any(|kept| kept.id == id));
        if !behind {
            drop(out);
            return self.push(frame).then_some(0);
        }
        let frame = later();
        let kept = match out.newest.iter_mut().find(|kept| kept.id == id) {
            Some(kept) => {
                let replaced = kept.replaced + kept.skipped + 1;
                *kept = Newest {
                    id: kept.id.clone(),
                    replaced,
                    skipped,
                    frame,
                };
                1
            }
            None => {
                out.newest.push(Newest {
                    id: id.to_owned(),
                    replaced: 0,
                    skipped,
                    frame,
                });
                0
            }
        };
        Some(kept)
    }

    /// [`Link::push`] of a subscription's last message, after the newest result kept for it.
    pub fn push_last(&self, id: &str, frame: &[u8]) -> bool {
        let kept = {
            let mut out = lock(&self.out);
            let index = out.newest.iter().position(|kept| kept.id == id);
            index.map(|index| out.newest.remove(index))
        };
        if let Some(kept) = kept {
            self.push(&(kept.frame)(kept.replaced + kept.skipped));
        }
        self.push(frame)
    }

    /// [`Link::push`] of a text message.
    pub fn push_text(&self, text: &str) -> bool {
        self.push(&text_frame(text))
    }

    /// Queues the close frame even when the connection is slow (it is the last frame).
    pub fn push_close(&self, code: u16, reason: &str) {
        let mut frame = BytesMut::new();
        let reason = CloseReason {
            code: CloseCode::from(code),
            description: Some(reason.to_owned()).filter(|r| !r.is_empty()),
        };
        Parser::write_close(&mut frame, Some(reason), false);
        let mut out = lock(&self.out);
        if matches!(out.state, LinkState::Gone | LinkState::Closing) {
            return;
        }
        out.pending.extend_from_slice(&frame);
        out.queued += 1;
        out.state = LinkState::Closing;
    }

    /// Marks the connection as too slow (an execution it subscribes to fell behind).
    pub fn mark_slow(&self) {
        let mut out = lock(&self.out);
        if out.state == LinkState::Open {
            out.state = LinkState::Slow;
        }
        drop(out);
        self.wake.notify_one();
    }

    /// Tells the connection that subscription `id` has ended on the server's side.
    pub fn finished(&self, id: &str) {
        lock(&self.out).finished.push(id.to_owned());
        self.wake.notify_one();
    }

    pub fn take_finished(&self) -> Vec<String> {
        std::mem::take(&mut lock(&self.out).finished)
    }

    pub fn has_pending(&self) -> bool {
        !lock(&self.out).pending.is_empty()
    }

    /// Bytes waiting for the client to read (beyond what the kernel took).
    pub fn pending_bytes(&self) -> usize {
        lock(&self.out).pending.len()
    }

    /// Writes as much of the queue as the kernel takes. `Ok(true)` when it is empty; an error
    /// means the client is gone.
    pub fn flush(&self) -> io::Result<bool> {
        let mut out = lock(&self.out);
        let Some(stream) = &self.stream else {
            return Ok(out.pending.is_empty());
        };
        loop {
            while !out.pending.is_empty() {
                match stream.try_write(&out.pending) {
                    Ok(n) => out.pending.advance(n),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(err) => {
                        out.state = LinkState::Gone;
                        return Err(err);
                    }
                }
            }
            // Caught up: the newest results kept meanwhile go out now, after what was queued.
            if out.newest.is_empty() || out.state != LinkState::Open {
                break;
            }
            out.queued = 0;
            for kept in std::mem::take(&mut out.newest) {
                let frame = (kept.frame)(kept.replaced + kept.skipped);
                out.pending.extend_from_slice(&frame);
                out.queued += 1;
            }
        }
        // Give the buffer back: an idle connection holds none.
        out.pending = BytesMut::new();
        out.queued = 0;
        Ok(true)
    }
}

impl Link {
    /// What waits to be written, taken all at once (a buffered link's response body).
    pub fn take_pending(&self) -> Option<Bytes> {
        let mut out = lock(&self.out);
        if out.pending.is_empty() {
            return None;
        }
        out.queued = 0;
        Some(std::mem::take(&mut out.pending).freeze())
    }
}

/// One unmasked text frame (servers never mask).
pub fn text_frame(text: &str) -> Bytes {
    let mut frame = BytesMut::with_capacity(text.len() + 10);
    Parser::write_message(&mut frame, text, OpCode::Text, true, false);
    frame.freeze()
}

/// One empty websocket-level ping (every client's websocket layer answers it with a pong).
pub fn ping_frame() -> Bytes {
    let mut frame = BytesMut::with_capacity(2);
    Parser::write_message(&mut frame, &b""[..], OpCode::Ping, true, false);
    frame.freeze()
}

/// One pong frame answering a websocket-level ping.
pub fn pong_frame(payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(payload.len() + 2);
    Parser::write_message(&mut frame, payload, OpCode::Pong, true, false);
    frame.freeze()
}

/// A whole message from the client, fragments reassembled.
#[derive(Debug)]
pub enum Incoming {
    Text(Bytes),
    Binary,
    Ping(Bytes),
    Pong,
    Close,
}

/// Why the client's bytes are not a websocket stream we accept.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("message larger than {0} bytes")]
    TooBig(usize),
    #[error("websocket protocol error: {0}")]
    Protocol(ProtocolError),
}

/// What one read turn found.
pub enum Filled {
    /// Bytes were read (or the budget was reached); decode them with [`Inbound::next_message`].
    Data,
    /// The client closed its side of the TCP connection (FIN).
    Closed,
    /// The connection failed: reset by the client, or timed out.
    Failed,
}

/// The read side: frame decoding with the size limit and reassembly of fragmented messages.
pub struct Inbound {
    codec: Codec,
    buf: BytesMut,
    /// A fragmented message being reassembled: is it text, and its bytes so far.
    partial: Option<(bool, BytesMut)>,
    max_bytes: usize,
}

impl Inbound {
    /// `leftover` is what the upgrade request's reader had already taken past the request head.
    pub fn new(max_bytes: usize, leftover: BytesMut) -> Self {
        Self {
            codec: Codec::new().max_size(max_bytes),
            buf: leftover,
            partial: None,
            max_bytes,
        }
    }

    /// Reads what the kernel has, up to [`READ_BUDGET`], without waiting.
    pub fn fill(&mut self, stream: &TcpStream) -> Filled {
        let mut chunk = [0u8; READ_CHUNK];
        let mut taken = 0;
        while taken < READ_BUDGET {
            match stream.try_read(&mut chunk) {
                Ok(0) => return Filled::Closed,
                Ok(n) => {
                    self.push_bytes(&chunk[..n]);
                    taken += n;
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Filled::Failed,
            }
        }
        Filled::Data
    }

    /// Reads and drops what the kernel has (the client's last words after our close frame).
    pub fn discard(stream: &TcpStream) -> Filled {
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            match stream.try_read(&mut chunk) {
                Ok(0) => return Filled::Closed,
                Ok(_) => continue,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Filled::Data,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Filled::Failed,
            }
        }
    }

    /// Takes bytes as [`Inbound::fill`] takes them from the socket: the fuzz target feeds
    /// frames in pieces through it, as reads deliver them.
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes this reader holds (its read buffer and a message being reassembled), for tests
    /// and fuzzing that check the limit bounds memory.
    pub fn held_bytes(&self) -> usize {
        self.buf.capacity()
            + self
                .partial
                .as_ref()
                .map_or(0, |(_, so_far)| so_far.capacity())
    }

    /// The next whole message in what was read, if any.
    pub fn next_message(&mut self) -> Result<Option<Incoming>, ReadError> {
        loop {
            let frame = match actix_codec::Decoder::decode(&mut self.codec, &mut self.buf) {
                Ok(Some(frame)) => frame,
                // actix-http's parser checks its size limit only once the whole frame has
                // arrived, and until then keeps buffering: a header declaring 2^63 bytes
                // followed by a stream of payload would grow this buffer without bound. The
                // declared length of the frame it waits for is checked here, as soon as the
                // header is in. (After the parser, not before, so that a header with other
                // faults is refused for those however its bytes arrive: found by fuzzing.)
                Ok(None)
                    if declared_length(&self.buf)
                        .is_some_and(|len| len > self.max_bytes as u64) =>
                {
                    return Err(ReadError::TooBig(self.max_bytes));
                }
                Ok(None) => {
                    // Give the buffer back when nothing is half-read: an idle connection holds
                    // no read buffer.
                    if self.buf.is_empty() && self.buf.capacity() > 0 {
                        self.buf = BytesMut::new();
                    }
                    return Ok(None);
                }
                Err(ProtocolError::Overflow) => return Err(ReadError::TooBig(self.max_bytes)),
                Err(err) => return Err(ReadError::Protocol(err)),
            };
            return Ok(Some(match frame {
                Frame::Text(bytes) => Incoming::Text(bytes),
                Frame::Binary(_) => Incoming::Binary,
                Frame::Ping(bytes) => Incoming::Ping(bytes),
                Frame::Pong(_) => Incoming::Pong,
                Frame::Close(_) => Incoming::Close,
                Frame::Continuation(item) => match self.continuation(item)? {
                    Some(message) => message,
                    None => continue,
                },
            }));
        }
    }

    fn continuation(&mut self, item: Item) -> Result<Option<Incoming>, ReadError> {
        let (first, bytes, last) = match item {
            Item::FirstText(bytes) => (Some(true), bytes, false),
            Item::FirstBinary(bytes) => (Some(false), bytes, false),
            Item::Continue(bytes) => (None, bytes, false),
            Item::Last(bytes) => (None, bytes, true),
        };
        if let Some(text) = first {
            self.partial = Some((text, BytesMut::new()));
        }
        let Some((text, so_far)) = self.partial.as_mut() else {
            return Err(ReadError::Protocol(ProtocolError::ContinuationNotStarted));
        };
        if so_far.len() + bytes.len() > self.max_bytes {
            return Err(ReadError::TooBig(self.max_bytes));
        }
        so_far.extend_from_slice(&bytes);
        if !last {
            return Ok(None);
        }
        let text = *text;
        let Some((_, whole)) = self.partial.take() else {
            return Ok(None);
        };
        Ok(Some(if text {
            Incoming::Text(whole.freeze())
        } else {
            Incoming::Binary
        }))
    }
}

/// The payload length a frame's header declares, once the header's length bytes are in
/// (RFC 6455 §5.2: 7 bits, or 126 + 16 bits, or 127 + 64 bits).
fn declared_length(buf: &[u8]) -> Option<u64> {
    let short = u64::from(*buf.get(1)? & 0x7F);
    match short {
        126 => Some(u64::from(u16::from_be_bytes(
            buf.get(2..4)?.try_into().ok()?,
        ))),
        127 => Some(u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?)),
        len => Some(len),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(op: OpCode, fin: bool, payload: &[u8]) -> BytesMut {
        let mut frame = BytesMut::new();
        Parser::write_message(&mut frame, payload, op, fin, true);
        frame
    }

    #[test]
    fn fragments_are_reassembled_within_the_limit() {
        let mut bytes = masked(OpCode::Text, false, b"{\"type\":");
        bytes.extend_from_slice(&masked(OpCode::Continue, false, b"\"connection"));
        bytes.extend_from_slice(&masked(OpCode::Ping, true, b"hi"));
        bytes.extend_from_slice(&masked(OpCode::Continue, true, b"_init\"}"));
        let mut inbound = Inbound::new(1024, bytes);
        assert!(matches!(inbound.next_message(), Ok(Some(Incoming::Ping(p))) if &p[..] == b"hi"));
        match inbound.next_message() {
            Ok(Some(Incoming::Text(text))) => {
                assert_eq!(&text[..], b"{\"type\":\"connection_init\"}")
            }
            other => panic!("expected the whole text, got {other:?}"),
        }
        assert!(matches!(inbound.next_message(), Ok(None)));
        assert_eq!(inbound.buf.capacity(), 0, "an idle reader keeps no buffer");
    }

    #[test]
    fn oversized_messages_are_refused_whole_or_in_pieces() {
        let mut whole = Inbound::new(16, masked(OpCode::Text, true, &[b'x'; 17]));
        assert!(matches!(whole.next_message(), Err(ReadError::TooBig(16))));
        let mut bytes = masked(OpCode::Text, false, &[b'x'; 10]);
        bytes.extend_from_slice(&masked(OpCode::Continue, true, &[b'x'; 10]));
        let mut pieces = Inbound::new(16, bytes);
        assert!(matches!(pieces.next_message(), Err(ReadError::TooBig(16))));
    }

    #[test]
    fn a_huge_declared_length_is_refused_before_the_payload_arrives() {
        // FIN + text, masked, 64-bit length 2^63 - 1, a mask key, and a little payload.
        let mut bytes = BytesMut::from(&[0x81u8, 0xFF][..]);
        bytes.extend_from_slice(&(i64::MAX as u64).to_be_bytes());
        bytes.extend_from_slice(&[1, 2, 3, 4]);
        bytes.extend_from_slice(&[b'x'; 100]);
        let mut inbound = Inbound::new(1024, bytes);
        assert!(matches!(
            inbound.next_message(),
            Err(ReadError::TooBig(1024))
        ));
        // Just over the limit with the 16-bit form, before any payload byte.
        let mut inbound = Inbound::new(1024, BytesMut::from(&[0x81u8, 0xFE, 0x04, 0x01][..]));
        assert!(matches!(
            inbound.next_message(),
            Err(ReadError::TooBig(1024))
        ));
        // At the limit it waits for the payload, holding no more than the frame.
        let mut inbound = Inbound::new(1024, BytesMut::from(&[0x81u8, 0xFE, 0x04, 0x00][..]));
        assert!(matches!(inbound.next_message(), Ok(None)));
        assert!(inbound.held_bytes() <= 1024 + 14);
    }

    #[test]
    fn unmasked_client_frames_are_a_protocol_error() {
        let mut bytes = BytesMut::new();
        Parser::write_message(&mut bytes, b"{}", OpCode::Text, true, false);
        let mut inbound = Inbound::new(1024, bytes);
        assert!(matches!(
            inbound.next_message(),
            Err(ReadError::Protocol(_))
        ));
    }

    #[test]
    fn an_incomplete_frame_waits_for_more() {
        let frame = masked(OpCode::Text, true, b"{\"type\":\"ping\"}");
        let mut inbound = Inbound::new(1024, BytesMut::from(&frame[..5]));
        assert!(matches!(inbound.next_message(), Ok(None)));
        inbound.buf.extend_from_slice(&frame[5..]);
        assert!(matches!(
            inbound.next_message(),
            Ok(Some(Incoming::Text(_)))
        ));
    }
}
