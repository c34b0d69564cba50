//! A websocket client for tests (awc's), speaking JSON text messages: what the gateway's and the
//! embedded mode's tests drive the real servers with.

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
        let mut request = awc::Client::builder()
            .timeout(Duration::from_secs(10))
            .finish()
            .ws(url)
            .max_frame_size(1 << 20);
        if let Some(protocol) = protocol {
            request = request.protocols([protocol]);
        }
        if let Some(value) = authorization {
            request = request.header("Authorization", value);
        }
        match request.connect().await {
            Ok((_, framed)) => Ok(WsClient { framed }),
            Err(awc::error::WsClientError::InvalidResponseStatus(status)) => Err(status.as_u16()),
            Err(err) => panic!("websocket connect failed: {err}"),
        }
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
}
