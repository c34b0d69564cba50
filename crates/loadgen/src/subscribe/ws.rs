//! A bare websocket client: the `--target` resolved once, the HTTP upgrade (the response head
//! parsed with httparse and checked), and frames read and written over a tokio `TcpStream` with
//! actix-http's codec. No pool, no boxed socket, no fixed-size buffers, and a read buffer only
//! while bytes are waiting, so that tens of thousands of idle connections cost little memory and
//! a delivery little of the CPU loadgen shares with the gateway.

use std::future::poll_fn;
use std::net::{SocketAddr, SocketAddrV4, ToSocketAddrs as _};
use std::task::{ready, Context, Poll};

use actix_codec::{Decoder as _, Encoder as _};
use actix_http::ws::{hash_key, Codec, Frame, Message, ProtocolError};
use actix_web::web::BytesMut;
use base64::prelude::{Engine as _, BASE64_STANDARD};
use tokio::io::Interest;
use tokio::net::{TcpSocket, TcpStream};

/// Where `--target` points: resolved once, not per socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    addr: SocketAddr,
    /// `host[:port]` as written, for the `Host` header.
    authority: String,
    /// Path and query of the request line.
    path: String,
}

impl Target {
    pub(super) fn parse(url: &str) -> Result<Target, String> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| format!("--target {url}: only ws:// URLs are supported"))?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(at) if rest[at..].starts_with('?') => (&rest[..at], format!("/{}", &rest[at..])),
            Some(at) => (&rest[..at], rest[at..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        // A port is what follows the last ':' outside an IPv6 literal's brackets.
        let has_port = authority
            .rfind(':')
            .is_some_and(|colon| authority.rfind(']').is_none_or(|bracket| colon > bracket));
        let with_port = if has_port {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        // Every socket is bound to a 127.0.0.x source, so only an IPv4 target can be reached.
        let addr = with_port
            .to_socket_addrs()
            .map_err(|err| format!("--target {url}: {err}"))?
            .find(SocketAddr::is_ipv4)
            .ok_or_else(|| format!("--target {url}: no IPv4 address"))?;
        Ok(Target {
            addr,
            authority: authority.to_owned(),
            path,
        })
    }
}

/// Room asked for per read. A delivery is about 120 bytes, so this holds several; a busier socket
/// just reads again (its readiness is kept when a read fills the room). Small enough for malloc's
/// per-thread cache, since an idle connection's buffer is allocated anew on every delivery.
const READ_CHUNK: usize = 1024;
/// Largest upgrade response head accepted.
const MAX_RESPONSE_HEAD: usize = 8192;
/// Most headers accepted in the upgrade response: the gateway sends a handful, a proxy a few
/// more, and they are parsed into an array of this many on the stack.
const MAX_RESPONSE_HEADERS: usize = 64;

impl Target {
    pub(super) fn path(&self) -> &str {
        &self.path
    }

    pub(super) fn authority(&self) -> &str {
        &self.authority
    }
}

/// A TCP connection to the target from `local` (port 0: one the kernel picks).
pub(super) async fn connect(local: SocketAddrV4, target: &Target) -> Result<TcpStream, String> {
    let io_kind = |err: std::io::Error| connect_error_kind(&err.to_string());
    let socket = TcpSocket::new_v4().map_err(io_kind)?;
    if local.port() != 0 {
        // A subscriber that reconnects binds its port again while the old one waits in
        // TIME_WAIT.
        socket.set_reuseaddr(true).map_err(io_kind)?;
    }
    socket.bind(SocketAddr::V4(local)).map_err(io_kind)?;
    socket.set_nodelay(true).map_err(io_kind)?;
    socket.connect(target.addr).await.map_err(io_kind)
}

/// Connects from `local`, sends the upgrade request and checks the response head. Returns the
/// stream and the bytes read past the head, which are already websocket frames.
pub(super) async fn upgrade(
    local: SocketAddrV4,
    target: &Target,
    protocol: &str,
) -> Result<(TcpStream, BytesMut), String> {
    let io_kind = |err: std::io::Error| connect_error_kind(&err.to_string());
    let stream = connect(local, target).await?;
    let key = BASE64_STANDARD.encode(rand::random::<[u8; 16]>());
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n",
        path = target.path,
        host = target.authority,
    );
    write_all(&stream, request.as_bytes())
        .await
        .map_err(io_kind)?;
    let mut buf = BytesMut::new();
    loop {
        if let Some(end) = check_upgrade(&buf, &key, protocol)? {
            let rest = buf.split_off(end);
            return Ok((stream, rest));
        }
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err("response head too large".into());
        }
        let want = MAX_RESPONSE_HEAD - buf.len();
        match poll_fn(|cx| poll_read_some(&stream, &mut buf, want, cx)).await {
            Ok(0) => return Err("eof during upgrade".into()),
            Ok(_) => {}
            Err(err) => return Err(io_kind(err)),
        }
    }
}

/// Checks what has been read of an upgrade response: `None` while its head is incomplete, else the
/// head's length once it passes the checks (status 101, `Upgrade: websocket`, the accept key
/// derived from ours, and the subprotocol we asked for). Any bytes after the head are frames.
fn check_upgrade(buf: &[u8], key: &str, protocol: &str) -> Result<Option<usize>, String> {
    const MALFORMED: &str = "malformed response head";
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err("too many response headers".into()),
        Err(_) => return Err(MALFORMED.into()),
    };
    // httparse sets the code whenever the head is complete: refused, not unwrapped, all the same.
    let code = response.code.ok_or_else(|| MALFORMED.to_owned())?;
    if code != 101 {
        return Err(format!("HTTP {code}"));
    }
    // A repeated header counts by its last value.
    let (mut upgraded, mut accept, mut agreed) = (false, None, None);
    for header in response.headers.iter() {
        let value = header.value.trim_ascii();
        if header.name.eq_ignore_ascii_case("upgrade") {
            upgraded = value.eq_ignore_ascii_case(b"websocket");
        } else if header.name.eq_ignore_ascii_case("sec-websocket-accept") {
            accept = Some(value);
        } else if header.name.eq_ignore_ascii_case("sec-websocket-protocol") {
            agreed = Some(value);
        }
    }
    if !upgraded {
        return Err("no Upgrade: websocket".into());
    }
    if accept != Some(&hash_key(key.as_bytes())[..]) {
        return Err("wrong Sec-WebSocket-Accept".into());
    }
    if agreed != Some(protocol.as_bytes()) {
        return Err("subprotocol not agreed".into());
    }
    Ok(Some(head_len))
}

/// Reads what the socket has into `buf` once it is readable, asking for at least `want` bytes of
/// room; `Ok(0)` is the end of the stream. A poll function rather than `readable().await`, so a
/// delivery costs no waiter list insertion and removal.
fn poll_read_some(
    stream: &TcpStream,
    buf: &mut BytesMut,
    want: usize,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<usize>> {
    loop {
        ready!(stream.poll_read_ready(cx))?;
        buf.reserve(want);
        let room = buf.capacity() - buf.len();
        match stream.try_read_buf(buf) {
            Ok(n) => {
                // A read that did not fill the room drained the socket (epoll is edge-triggered),
                // so forget the readiness now rather than pay a read that would block to learn it;
                // tokio's own `poll_read` does the same.
                if 0 < n && n < room {
                    let _ = stream.try_io(Interest::READABLE, || {
                        Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
                    });
                }
                return Poll::Ready(Ok(n));
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                // A stale readiness: do not keep the room just reserved while idle.
                if buf.is_empty() {
                    *buf = BytesMut::new();
                }
            }
            Err(err) => return Poll::Ready(Err(err)),
        }
    }
}

async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match stream.try_write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => stream.writable().await?,
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// The next frame among the bytes read so far. An emptied buffer is released, so that idle
/// connections (nearly all of them, nearly all the time) hold no read buffer.
fn decode_buffered(codec: &mut Codec, buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
    let frame = codec.decode(buf);
    if buf.is_empty() && buf.capacity() > 0 {
        *buf = BytesMut::new();
    }
    frame
}

/// A client websocket on a bare TCP stream: no pool, no boxed socket, no fixed-size buffers.
pub(super) struct WsConn {
    stream: TcpStream,
    /// Client mode: frames it encodes are masked, frames it decodes must not be.
    codec: Codec,
    /// Bytes read and not decoded yet.
    buf: BytesMut,
}

impl WsConn {
    pub(super) fn new(stream: TcpStream, leftover: BytesMut) -> Self {
        Self {
            stream,
            codec: Codec::new().client_mode().max_size(1 << 20),
            buf: leftover,
        }
    }

    pub(super) fn buffered_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        decode_buffered(&mut self.codec, &mut self.buf)
    }

    pub(super) fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        poll_read_some(&self.stream, &mut self.buf, READ_CHUNK, cx)
    }

    /// The next frame, reading as needed; `None` at the end of the stream.
    pub(super) async fn next_frame(&mut self) -> Result<Option<Frame>, String> {
        loop {
            if let Some(frame) = self.buffered_frame().map_err(|e| websocket_error(&e))? {
                return Ok(Some(frame));
            }
            let read = poll_fn(|cx| self.poll_read(cx)).await;
            if read.map_err(|e| websocket_error(&e))? == 0 {
                return Ok(None);
            }
        }
    }

    pub(super) async fn send(&mut self, message: Message) -> Result<(), String> {
        let mut out = BytesMut::new();
        self.codec
            .encode(message, &mut out)
            .map_err(|e| websocket_error(&e))?;
        write_all(&self.stream, &out)
            .await
            .map_err(|e| websocket_error(&e))
    }
}

/// Connect errors by kind, without the parts that differ per socket.
/// E.g. "Failed to connect to host: Connection refused (os error 111)" → "Connection refused (os
/// error 111)".
fn connect_error_kind(message: &str) -> String {
    let message = crate::truncate(message);
    match message.rfind(": ") {
        Some(at) => message[at + 2..].to_owned(),
        None => message,
    }
}

pub(super) fn websocket_error(err: &dyn std::fmt::Display) -> String {
    format!("websocket error: {}", crate::truncate(&err.to_string()))
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Duration;

    use super::*;
    use crate::subscribe::messages::{classify, Incoming};

    #[test]
    fn connect_errors_are_grouped_by_their_cause() {
        assert_eq!(
            connect_error_kind("Failed to connect to host: Connection refused (os error 111)"),
            "Connection refused (os error 111)"
        );
        assert_eq!(
            connect_error_kind("Timeout while waiting for response"),
            "Timeout while waiting for response"
        );
    }

    /// A response head as the gateway writes it, for `key`.
    fn response_head(key: &str, protocol: &str) -> String {
        let accept = String::from_utf8_lossy(&hash_key(key.as_bytes())).into_owned();
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
             sec-websocket-accept: {accept}\r\nsec-websocket-protocol: {protocol}\r\n\r\n"
        )
    }

    /// An unmasked server frame with a payload under 126 bytes.
    fn server_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![first, payload.len() as u8];
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn the_upgrade_response_is_checked() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = response_head(key, "graphql-transport-ws");
        assert_eq!(
            check_upgrade(ok.as_bytes(), key, "graphql-transport-ws"),
            Ok(Some(ok.len()))
        );
        // RFC 6455's own example of a key and its accept value.
        let rfc = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: graphql-ws\r\n\r\n";
        assert_eq!(
            check_upgrade(rfc.as_bytes(), key, "graphql-ws"),
            Ok(Some(rfc.len()))
        );
        let other_key = response_head("AAAAAAAAAAAAAAAAAAAAAA==", "graphql-transport-ws");
        assert_eq!(
            check_upgrade(other_key.as_bytes(), key, "graphql-transport-ws"),
            Err("wrong Sec-WebSocket-Accept".into())
        );
        let no_accept = ok.replace("sec-websocket-accept", "x-websocket-accept");
        assert_eq!(
            check_upgrade(no_accept.as_bytes(), key, "graphql-transport-ws"),
            Err("wrong Sec-WebSocket-Accept".into())
        );
        assert_eq!(
            check_upgrade(ok.as_bytes(), key, "graphql-ws"),
            Err("subprotocol not agreed".into())
        );
        let no_protocol = ok.replace("sec-websocket-protocol: graphql-transport-ws\r\n", "");
        assert_eq!(
            check_upgrade(no_protocol.as_bytes(), key, "graphql-transport-ws"),
            Err("subprotocol not agreed".into())
        );
        let not_upgraded = ok.replace("upgrade: websocket", "upgrade: h2c");
        assert_eq!(
            check_upgrade(not_upgraded.as_bytes(), key, "graphql-transport-ws"),
            Err("no Upgrade: websocket".into())
        );
        assert_eq!(
            check_upgrade(
                b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n",
                key,
                "x"
            ),
            Err("HTTP 403".into())
        );
        // Only 101 switches protocols, whatever the headers say.
        let not_switched = ok.replace("101 Switching Protocols", "200 OK");
        assert_eq!(
            check_upgrade(not_switched.as_bytes(), key, "graphql-transport-ws"),
            Err("HTTP 200".into())
        );
        for garbage in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            // Not HTTP is told at once, without waiting for a blank line that may never come.
            b"SSH-2.0-OpenSSH\r\n",
            b"HTTP/1.1 abc\r\n\r\n",
            b"\xff\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nno colon\r\n\r\n",
        ] {
            assert_eq!(
                check_upgrade(garbage, key, "x"),
                Err("malformed response head".into())
            );
        }
        let crowded = ok.replacen("\r\n", &"\r\nx-filler: 1".repeat(MAX_RESPONSE_HEADERS), 1);
        assert_eq!(
            check_upgrade(crowded.as_bytes(), key, "graphql-transport-ws"),
            Err("too many response headers".into())
        );
    }

    #[test]
    fn a_partial_head_is_read_further_however_it_is_split() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let head = response_head(key, "graphql-ws");
        let mut bytes = head.clone().into_bytes();
        bytes.extend_from_slice(&server_frame(0x81, b"{}"));
        for cut in 0..head.len() {
            assert_eq!(
                check_upgrade(&bytes[..cut], key, "graphql-ws"),
                Ok(None),
                "cut at {cut}"
            );
        }
        // The frame behind the head is left for the websocket codec.
        assert_eq!(
            check_upgrade(&bytes, key, "graphql-ws"),
            Ok(Some(head.len()))
        );
    }

    #[test]
    fn frames_are_decoded_and_an_emptied_buffer_released() {
        let mut codec = Codec::new().client_mode().max_size(1 << 20);
        let text = server_frame(0x81, br#"{"type":"next"}"#);
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        buf.extend_from_slice(&text[..5]);
        assert!(matches!(decode_buffered(&mut codec, &mut buf), Ok(None)));
        assert!(buf.capacity() > 0, "a partial frame stays buffered");
        buf.extend_from_slice(&text[5..]);
        match decode_buffered(&mut codec, &mut buf) {
            Ok(Some(Frame::Text(bytes))) => assert_eq!(&bytes[..], br#"{"type":"next"}"#),
            other => panic!("not the text frame: {other:?}"),
        }
        assert_eq!(buf.capacity(), 0);
        // A fragment is reported as what it is, not reassembled.
        let mut buf = BytesMut::from(&server_frame(0x01, b"{")[..]);
        assert!(matches!(
            decode_buffered(&mut codec, &mut buf),
            Ok(Some(Frame::Continuation(_)))
        ));
        // A masked frame from the server is a protocol error.
        let mut buf = BytesMut::from(&[0x81u8, 0x80, 1, 2, 3, 4][..]);
        assert!(decode_buffered(&mut codec, &mut buf).is_err());
    }

    #[test]
    fn targets_are_parsed_into_address_host_and_path() {
        let target = Target::parse("ws://127.0.0.1:18013/graphql/").expect("a valid target");
        assert_eq!(target.addr, "127.0.0.1:18013".parse().expect("an address"));
        assert_eq!(target.authority, "127.0.0.1:18013");
        assert_eq!(target.path, "/graphql/");
        let target = Target::parse("ws://127.0.0.2?x=1").expect("a valid target");
        assert_eq!(target.addr, "127.0.0.2:80".parse().expect("an address"));
        assert_eq!(target.path, "/?x=1");
        assert!(Target::parse("wss://127.0.0.1/graphql").is_err());
        assert!(Target::parse("ws://[::1]:8003/graphql").is_err());
    }

    /// The client against a scripted server: the request it writes, a response head that arrives
    /// in two reads with a frame right behind it, and masked frames going out.
    #[test]
    fn the_client_upgrades_and_frames_over_a_real_socket() {
        use std::io::{Read as _, Write as _};

        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
        let port = listener.local_addr().expect("its address").port();
        let server = std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().expect("a connection");
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") {
                socket.read_exact(&mut byte).expect("the request");
                request.push(byte[0]);
            }
            let request = String::from_utf8(request).expect("a text request");
            let key = request
                .lines()
                .find_map(|line| line.strip_prefix("Sec-WebSocket-Key: "))
                .expect("a key")
                .to_owned();
            let head = response_head(&key, "graphql-transport-ws");
            let split = head.len() - 3;
            socket.write_all(&head.as_bytes()[..split]).expect("write");
            socket.flush().expect("flush");
            std::thread::sleep(Duration::from_millis(50));
            let mut rest = head.as_bytes()[split..].to_vec();
            rest.extend_from_slice(&server_frame(0x81, br#"{"type":"connection_ack"}"#));
            socket.write_all(&rest).expect("write");
            let mut frame = [0u8; 8];
            socket.read_exact(&mut frame).expect("a client frame");
            socket
                .write_all(&server_frame(0x89, b"hi"))
                .expect("a ping");
            let mut pong = [0u8; 8];
            socket.read_exact(&mut pong).expect("the pong");
            (request, frame, pong)
        });

        let target = Target::parse(&format!("ws://127.0.0.1:{port}/graphql/")).expect("a target");
        actix_web::rt::System::new().block_on(async {
            let local = Ipv4Addr::new(127, 0, 0, 7);
            let (stream, leftover) =
                upgrade(SocketAddrV4::new(local, 0), &target, "graphql-transport-ws")
                    .await
                    .expect("an upgrade");
            assert_eq!(
                stream.local_addr().expect("its address").ip(),
                IpAddr::V4(local)
            );
            let mut conn = WsConn::new(stream, leftover);
            match conn.next_frame().await {
                Ok(Some(Frame::Text(bytes))) => {
                    assert_eq!(classify(&bytes), Incoming::Other("connection_ack".into()))
                }
                other => panic!("not the ack: {other:?}"),
            }
            conn.send(Message::Text("{}".into())).await.expect("a send");
            match conn.next_frame().await {
                Ok(Some(Frame::Ping(bytes))) => {
                    conn.send(Message::Pong(bytes)).await.expect("a pong")
                }
                other => panic!("not the ping: {other:?}"),
            }
        });
        let (request, frame, pong) = server.join().expect("the server");
        assert!(request.starts_with("GET /graphql/ HTTP/1.1\r\n"));
        for header in [
            &format!("Host: 127.0.0.1:{port}")[..],
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Version: 13",
            "Sec-WebSocket-Protocol: graphql-transport-ws",
        ] {
            assert!(request.lines().any(|line| line == header), "{header}");
        }
        assert_eq!(
            frame[..2],
            [0x81, 0x80 | 2],
            "a masked text frame of 2 bytes"
        );
        assert_eq!(
            pong[..2],
            [0x8a, 0x80 | 2],
            "a masked pong echoing the ping"
        );
    }
}
