//! The one websocket client of the tests (awc's), speaking JSON text messages: the gateway's and
//! the embedded mode's tests drive the servers with it, and the end-to-end suite drives NGINX
//! and the binaries. Two ways to read: as a protocol test does (`recv…`, `expect…`: every
//! message, keep-alives included, a timeout fails the test), and as a client does (`answer…`:
//! protocol pings answered, keep-alives skipped, a timeout is `None`).

use std::time::Duration;

use actix_web::web::Bytes;
use awc::ws;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};

/// What the client saw next.
#[derive(Debug)]
pub enum Incoming {
    Json(Value),
    Close(Option<u16>, String),
}

pub struct WsClient {
    /// The subprotocol asked for (`graphql-transport-ws`, `graphql-ws`).
    pub protocol: String,
    framed: actix_codec::Framed<awc::BoxedSocket, ws::Codec>,
}

impl WsClient {
    pub async fn connect(url: &str, protocol: &str) -> WsClient {
        Self::try_connect(url, Some(protocol), None).await.unwrap()
    }

    pub async fn try_connect(
        url: &str,
        protocol: Option<&str>,
        authorization: Option<&str>,
    ) -> Result<WsClient, u16> {
        match Self::handshake(url, protocol, authorization, None).await {
            Ok(client) => Ok(client),
            Err(awc::error::WsClientError::InvalidResponseStatus(status)) => Err(status.as_u16()),
            Err(err) => panic!("websocket connect failed: {err}"),
        }
    }

    /// Connects with `protocol`; `Err` with the reason when the handshake fails.
    pub async fn connect_or_error(url: &str, protocol: &str) -> Result<WsClient, String> {
        Self::handshake(url, Some(protocol), None, None)
            .await
            .map_err(|err| err.to_string())
    }

    /// [`WsClient::connect`] from the local address `from` (a loopback address of the test's
    /// own, so that per-address bounds apply to it alone).
    pub async fn connect_from(url: &str, protocol: &str, from: std::net::IpAddr) -> WsClient {
        Self::handshake(url, Some(protocol), None, Some(from))
            .await
            .unwrap()
    }

    async fn handshake(
        url: &str,
        protocol: Option<&str>,
        authorization: Option<&str>,
        from: Option<std::net::IpAddr>,
    ) -> Result<WsClient, awc::error::WsClientError> {
        // A safety net only: no test asserts on how fast a handshake is.
        let builder = awc::Client::builder().timeout(Duration::from_secs(30));
        let client = match from {
            Some(from) => builder
                .connector(awc::Connector::new().local_address(from))
                .finish(),
            None => builder.finish(),
        };
        let mut request = client.ws(url).max_frame_size(1 << 20);
        if let Some(protocol) = protocol {
            request = request.protocols([protocol]);
        }
        if let Some(value) = authorization {
            request = request.header("Authorization", value);
        }
        let (_, framed) = request.connect().await?;
        Ok(WsClient {
            protocol: protocol.unwrap_or_default().to_owned(),
            framed,
        })
    }

    pub async fn send(&mut self, message: Value) {
        self.framed
            .send(ws::Message::Text(message.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_frame(&mut self, message: ws::Message) {
        self.framed.send(message).await.unwrap();
    }

    /// The next JSON message or close, skipping websocket pings; panics after `wait`.
    pub async fn recv_within(&mut self, wait: Duration) -> Incoming {
        loop {
            let frame = tokio::time::timeout(wait, self.framed.next())
                .await
                .expect("no message from the gateway in time");
            match frame {
                Some(Ok(ws::Frame::Text(bytes))) => {
                    return Incoming::Json(serde_json::from_slice(&bytes).unwrap())
                }
                Some(Ok(ws::Frame::Close(reason))) => {
                    return Incoming::Close(
                        reason.as_ref().map(|r| u16::from(r.code)),
                        reason.and_then(|r| r.description).unwrap_or_default(),
                    )
                }
                Some(Ok(ws::Frame::Ping(bytes))) => {
                    let _ = self.framed.send(ws::Message::Pong(bytes)).await;
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => panic!("websocket error: {err}"),
                None => return Incoming::Close(None, "stream ended".into()),
            }
        }
    }

    pub async fn recv(&mut self) -> Incoming {
        self.recv_within(Duration::from_secs(10)).await
    }

    /// The next message that is not a keep-alive (`ping`, `ka`).
    pub async fn recv_skip_keepalive(&mut self) -> Incoming {
        loop {
            match self.recv().await {
                Incoming::Json(v) if v["type"] == "ping" || v["type"] == "ka" => continue,
                other => return other,
            }
        }
    }

    pub async fn expect_json(&mut self) -> Value {
        match self.recv_skip_keepalive().await {
            Incoming::Json(v) => v,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    pub async fn expect_close(&mut self) -> (Option<u16>, String) {
        loop {
            match self.recv().await {
                Incoming::Close(code, reason) => return (code, reason),
                Incoming::Json(_) => continue,
            }
        }
    }

    /// Sends `connection_init` with the token and expects the ack, which it returns.
    pub async fn init(&mut self, token: &str) -> Value {
        self.send(json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {token}")}}))
            .await;
        let ack = self.expect_json().await;
        assert_eq!(ack["type"], "connection_ack", "{ack}");
        ack
    }

    pub async fn raw_ping(&mut self) {
        self.framed
            .send(ws::Message::Ping(Bytes::from_static(b"hi")))
            .await
            .unwrap();
    }

    /// As a client reads: the next JSON message or close within `wait` (`None` when nothing
    /// came), answering websocket pings and graphql-transport-ws `ping`s, skipping keep-alives.
    pub async fn answer_within(&mut self, wait: Duration) -> Option<Incoming> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.framed.next())
                .await
                .ok()?;
            match frame {
                Some(Ok(ws::Frame::Text(bytes))) => {
                    let message: Value = serde_json::from_slice(&bytes).unwrap();
                    match message["type"].as_str() {
                        Some("ping") => self.send(json!({"type": "pong"})).await,
                        Some("pong") | Some("ka") => {}
                        _ => return Some(Incoming::Json(message)),
                    }
                }
                Some(Ok(ws::Frame::Close(reason))) => {
                    return Some(Incoming::Close(
                        reason.as_ref().map(|r| u16::from(r.code)),
                        reason.and_then(|r| r.description).unwrap_or_default(),
                    ))
                }
                Some(Ok(ws::Frame::Ping(bytes))) => {
                    let _ = self.framed.send(ws::Message::Pong(bytes)).await;
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => return Some(Incoming::Close(None, err.to_string())),
                None => return Some(Incoming::Close(None, "stream ended".into())),
            }
        }
    }

    /// [`WsClient::answer_within`] 30 s, a safety net only.
    pub async fn answer(&mut self) -> Incoming {
        self.answer_within(Duration::from_secs(30))
            .await
            .expect("nothing from the server in time")
    }

    /// Sends `connection_init` with `{"Authorization": "Bearer <token>"}` (the Playground/Apollo
    /// way) and returns the answer, whatever it is.
    pub async fn init_answer(&mut self, token: &str) -> Incoming {
        self.send(json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {token}")}}))
            .await;
        self.answer().await
    }

    /// `subscribe` (legacy `start`) of `query` as `id`.
    pub async fn subscribe(&mut self, id: &str, query: &str) {
        let kind = if self.protocol == "graphql-ws" {
            "start"
        } else {
            "subscribe"
        };
        self.send(json!({"id": id, "type": kind, "payload": {"query": query}}))
            .await;
    }

    /// The next result's `payload` within `wait`: `Ok(None)` when nothing came, `Err` when the
    /// socket closed or the server sent anything but a result.
    pub async fn next_payload_within(&mut self, wait: Duration) -> Result<Option<Value>, String> {
        match self.answer_within(wait).await {
            None => Ok(None),
            Some(Incoming::Json(message))
                if message["type"] == "next" || message["type"] == "data" =>
            {
                Ok(Some(message["payload"].clone()))
            }
            Some(Incoming::Json(message)) => Err(format!("unexpected message {message}")),
            Some(Incoming::Close(code, reason)) => Err(format!("closed {code:?} {reason}")),
        }
    }
}
