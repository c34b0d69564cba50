//! The two websocket subprotocols: what a client may send, what the server writes, and the close
//! codes; and how each message is framed on the wire for them and for the two streamed HTTP
//! transports ([`next_frame`] and its siblings). Both subprotocols carry the same operations;
//! only the names differ:
//!
//! | | `graphql-transport-ws` (graphql-ws library) | `graphql-ws` (subscriptions-transport-ws) |
//! |---|---|---|
//! | start | `subscribe` | `start` |
//! | result | `next` | `data` |
//! | stop (client) | `complete` | `stop` |
//! | keep-alive | `ping` / `pong` | `ka` (server only) |
//! | bad init | close 4403 | `connection_error`, then close 4403 |

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use serde_json::{json, Value};
use service_kit::error::ErrorCode;

use crate::socket::text_frame;

pub const TRANSPORT_WS: &str = "graphql-transport-ws";
pub const LEGACY_WS: &str = "graphql-ws";

/// Close codes (graphql-transport-ws's, used for both protocols).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const TRY_AGAIN_LATER: u16 = 1013;
    pub const BAD_REQUEST: u16 = 4400;
    pub const UNAUTHORIZED: u16 = 4401;
    pub const FORBIDDEN: u16 = 4403;
    pub const INIT_TIMEOUT: u16 = 4408;
    pub const SUBSCRIBER_EXISTS: u16 = 4409;
    pub const TOO_MANY_INITS: u16 = 4429;
}

/// How a subscriber's messages are framed: one of the two websocket subprotocols, or one of the
/// two streamed HTTP responses ([`crate::streamed`]), which carry one operation each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    TransportWs,
    LegacyWs,
    /// GraphQL over Server-Sent Events (the `graphql-sse` protocol, distinct connections mode):
    /// `event: next` with the result's cursor as the event's `id`, then `event: complete`.
    Sse,
    /// Apollo's multipart subscriptions (`multipart/mixed;subscriptionSpec="1.0"`): one
    /// `{"payload": …}` part per result, `{}` parts as heartbeats, boundary `graphql`.
    Multipart,
}

/// The multipart response's content type, and what opens its body: every part then ends with
/// the boundary, and the last is closed by [`complete_frame`]'s `--`.
pub const MULTIPART_CONTENT_TYPE: &str =
    "multipart/mixed;boundary=\"graphql\";subscriptionSpec=\"1.0\"";
pub const MULTIPART_PREAMBLE: &str = "\r\n--graphql";

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::TransportWs => TRANSPORT_WS,
            Protocol::LegacyWs => LEGACY_WS,
            Protocol::Sse => "graphql-sse",
            Protocol::Multipart => "multipart",
        }
    }

    /// The first protocol the client offers that we speak, honouring the client's order.
    pub fn negotiate(offered: &str) -> Option<Protocol> {
        offered.split(',').map(str::trim).find_map(|p| match p {
            TRANSPORT_WS => Some(Protocol::TransportWs),
            LEGACY_WS => Some(Protocol::LegacyWs),
            _ => None,
        })
    }
}

/// A message from the client, already told apart by protocol.
#[derive(Debug)]
pub enum ClientMessage {
    Init { payload: Value },
    Subscribe { id: String, payload: Value },
    Stop { id: String },
    Ping { payload: Option<Value> },
    Pong,
    Terminate,
}

/// Why a text frame is not a message of the protocol; the connection closes with 4400 and this.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("invalid message: not a JSON object with a string `type`")]
    NotAMessage,
    #[error("invalid message: unknown type `{0}`")]
    UnknownType(String),
    #[error("invalid message: `{0}` needs a non-empty string `id`")]
    MissingId(String),
    #[error("invalid message: `{0}` needs an object `payload`")]
    MissingPayload(String),
}

pub fn parse(protocol: Protocol, text: &str) -> Result<ClientMessage, ParseError> {
    let value: Value = serde_json::from_str(text).map_err(|_| ParseError::NotAMessage)?;
    let kind = value
        .get("type")
        .and_then(Value::as_str)
        .ok_or(ParseError::NotAMessage)?;
    let id = || {
        value
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| ParseError::MissingId(kind.to_owned()))
    };
    let payload = || match value.get("payload") {
        Some(Value::Object(map)) => Ok(Value::Object(map.clone())),
        _ => Err(ParseError::MissingPayload(kind.to_owned())),
    };
    Ok(match (protocol, kind) {
        // A null or absent init payload means "no connection parameters", not an error (the
        // reference's server crashed on it).
        (_, "connection_init") => ClientMessage::Init {
            payload: value.get("payload").cloned().unwrap_or(Value::Null),
        },
        (Protocol::TransportWs, "subscribe") | (Protocol::LegacyWs, "start") => {
            ClientMessage::Subscribe {
                id: id()?,
                payload: payload()?,
            }
        }
        (Protocol::TransportWs, "complete") | (Protocol::LegacyWs, "stop") => {
            ClientMessage::Stop { id: id()? }
        }
        (Protocol::TransportWs, "ping") => ClientMessage::Ping {
            payload: value.get("payload").cloned(),
        },
        (Protocol::TransportWs, "pong") => ClientMessage::Pong,
        (Protocol::LegacyWs, "connection_terminate") => ClientMessage::Terminate,
        (_, other) => return Err(ParseError::UnknownType(other.to_owned())),
    })
}

#[derive(Serialize)]
struct Message<'a, P: Serialize> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<P>,
}

fn encode<P: Serialize>(kind: &str, id: Option<&str>, payload: Option<P>) -> String {
    serde_json::to_string(&Message { kind, id, payload })
        // Serializing our own message types cannot fail; an empty object keeps the socket valid.
        .unwrap_or_else(|_| "{}".to_owned())
}

pub fn connection_ack() -> String {
    encode::<()>("connection_ack", None, None)
}

/// Keep-alive on a websocket: `ping` (modern) or `ka` (legacy).
pub fn keepalive(protocol: Protocol) -> String {
    match protocol {
        Protocol::LegacyWs => encode::<()>("ka", None, None),
        _ => encode::<()>("ping", None, None),
    }
}

/// Keep-alive as the protocol writes it on the wire: a websocket message, an SSE comment, or an
/// empty multipart part (Apollo's heartbeat).
pub fn keepalive_frame(protocol: Protocol) -> Bytes {
    match protocol {
        Protocol::Sse => Bytes::from_static(b":\n\n"),
        Protocol::Multipart => multipart_part("{}"),
        _ => text_frame(&keepalive(protocol)),
    }
}

/// One result as the protocol writes it on the wire, around the payload every subscriber of the
/// execution shares. `cursor` names the event behind it: the SSE event's `id`, which a browser's
/// `EventSource` sends back as `Last-Event-ID`.
pub fn next_frame(protocol: Protocol, id_json: &str, payload: &str, cursor: Option<&str>) -> Bytes {
    match protocol {
        Protocol::Sse => {
            let id = cursor
                .map(|cursor| format!("id: {cursor}\n"))
                .unwrap_or_default();
            Bytes::from(format!("event: next\n{id}data: {payload}\n\n"))
        }
        Protocol::Multipart => multipart_part(&format!(r#"{{"payload":{payload}}}"#)),
        _ => text_frame(&next_raw(protocol, id_json, payload)),
    }
}

/// An operation that failed before producing results, and ends: `error` on a websocket; a
/// result carrying only the errors, then the end, on a stream.
pub fn error_frame(protocol: Protocol, id_json: &str, errors: &str) -> Bytes {
    match protocol {
        Protocol::Sse => Bytes::from(format!(
            "event: next\ndata: {{\"errors\":{errors}}}\n\nevent: complete\ndata: \n\n"
        )),
        Protocol::Multipart => {
            let mut part = BytesMut::from(
                &multipart_part(&format!(r#"{{"payload":{{"errors":{errors}}}}}"#))[..],
            );
            part.extend_from_slice(&complete_frame(protocol, ""));
            part.freeze()
        }
        _ => text_frame(&operation_error_raw(id_json, errors)),
    }
}

/// The operation's end: `complete` on a websocket and over SSE; the closing boundary of a
/// multipart response.
pub fn complete_frame(protocol: Protocol, id: &str) -> Bytes {
    match protocol {
        Protocol::Sse => Bytes::from_static(b"event: complete\ndata: \n\n"),
        Protocol::Multipart => Bytes::from_static(b"--\r\n"),
        _ => text_frame(&complete(id)),
    }
}

/// A stream's end for a reason of the transport (an expired or revoked token, a client too
/// slow, the gateway draining), with no `complete`: graphql-sse and Apollo's clients then
/// reconnect, and resume from the last cursor they saw. Over SSE a result with the error;
/// over multipart Apollo's transport error (`payload: null` with `errors`), then the end.
pub fn transport_error_frame(protocol: Protocol, message: &str, code: ErrorCode) -> Bytes {
    let errors = errors(message, code).to_string();
    match protocol {
        Protocol::Multipart => {
            let mut part = BytesMut::from(
                &multipart_part(&format!(r#"{{"payload":null,"errors":{errors}}}"#))[..],
            );
            part.extend_from_slice(&complete_frame(protocol, ""));
            part.freeze()
        }
        _ => Bytes::from(format!("event: next\ndata: {{\"errors\":{errors}}}\n\n")),
    }
}

/// One JSON part of a multipart response, ending with the boundary that the next part (or the
/// final `--`) follows.
fn multipart_part(json: &str) -> Bytes {
    Bytes::from(format!(
        "\r\ncontent-type: application/json\r\n\r\n{json}\r\n--graphql"
    ))
}

pub fn pong(payload: Option<Value>) -> String {
    encode("pong", None, payload)
}

/// One result of a subscription: `next` / `data` with `{data, errors?}`.
pub fn next<P: Serialize>(protocol: Protocol, id: &str, result: &P) -> String {
    let kind = match protocol {
        Protocol::LegacyWs => "data",
        _ => "next",
    };
    encode(kind, Some(id), Some(result))
}

/// [`next`] around an already serialized payload, shared by every subscriber of an execution:
/// only the id differs, so nothing is serialized per subscriber.
pub fn next_raw(protocol: Protocol, id_json: &str, payload: &str) -> String {
    let kind = match protocol {
        Protocol::LegacyWs => "data",
        _ => "next",
    };
    format!(r#"{{"type":"{kind}","id":{id_json},"payload":{payload}}}"#)
}

/// [`operation_error`] around an already serialized error list.
pub fn operation_error_raw(id_json: &str, errors: &str) -> String {
    format!(r#"{{"type":"error","id":{id_json},"payload":{errors}}}"#)
}

/// An operation that failed before producing results (a bad document, too many subscriptions):
/// `error` with a list of GraphQL errors, in both protocols.
pub fn operation_error(id: &str, errors: Value) -> String {
    encode("error", Some(id), Some(errors))
}

pub fn complete(id: &str) -> String {
    encode::<()>("complete", Some(id), None)
}

/// Legacy protocol's answer to a refused `connection_init`.
pub fn connection_error(message: &str) -> String {
    encode(
        "connection_error",
        None,
        Some(json!({ "message": message })),
    )
}

/// A GraphQL error list with one message and a code.
pub fn errors(message: &str, code: ErrorCode) -> Value {
    json!([{ "message": message, "extensions": { "code": code.as_str() } }])
}

/// Close reasons are limited to 123 bytes by RFC 6455; cut on a character boundary.
pub fn close_reason(text: &str) -> String {
    let mut end = text.len().min(123);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_honours_the_clients_order_and_refuses_strangers() {
        assert_eq!(Protocol::negotiate("graphql-ws"), Some(Protocol::LegacyWs));
        assert_eq!(
            Protocol::negotiate("graphql-transport-ws, graphql-ws"),
            Some(Protocol::TransportWs)
        );
        assert_eq!(
            Protocol::negotiate("foo,graphql-ws,graphql-transport-ws"),
            Some(Protocol::LegacyWs)
        );
        assert_eq!(Protocol::negotiate("graphql-wss"), None);
        assert_eq!(Protocol::negotiate(""), None);
    }

    #[test]
    fn messages_are_told_apart_per_protocol() {
        assert!(matches!(
            parse(
                Protocol::TransportWs,
                r#"{"type":"connection_init","payload":null}"#
            ),
            Ok(ClientMessage::Init {
                payload: Value::Null
            })
        ));
        assert!(matches!(
            parse(
                Protocol::LegacyWs,
                r#"{"type":"start","id":"1","payload":{"query":"x"}}"#
            ),
            Ok(ClientMessage::Subscribe { .. })
        ));
        assert!(matches!(
            parse(
                Protocol::TransportWs,
                r#"{"type":"start","id":"1","payload":{}}"#
            ),
            Err(ParseError::UnknownType(_))
        ));
        assert!(matches!(
            parse(
                Protocol::TransportWs,
                r#"{"type":"subscribe","payload":{}}"#
            ),
            Err(ParseError::MissingId(_))
        ));
        assert!(matches!(
            parse(
                Protocol::TransportWs,
                r#"{"type":"subscribe","id":"1","payload":null}"#
            ),
            Err(ParseError::MissingPayload(_))
        ));
        assert!(matches!(
            parse(Protocol::LegacyWs, "[1]"),
            Err(ParseError::NotAMessage)
        ));
        assert!(matches!(
            parse(Protocol::LegacyWs, "nope"),
            Err(ParseError::NotAMessage)
        ));
    }

    #[test]
    fn raw_messages_equal_the_serialized_ones() {
        let id = "a\"b";
        let id_json = serde_json::to_string(id).unwrap_or_default();
        let payload = json!({"data": {"x": 1}});
        for protocol in [Protocol::TransportWs, Protocol::LegacyWs] {
            let raw: Value =
                serde_json::from_str(&next_raw(protocol, &id_json, &payload.to_string()))
                    .unwrap_or_default();
            let typed: Value =
                serde_json::from_str(&next(protocol, id, &payload)).unwrap_or_default();
            assert_eq!(raw, typed);
        }
        let errors = errors("bad", ErrorCode::BadRequest);
        let raw: Value = serde_json::from_str(&operation_error_raw(&id_json, &errors.to_string()))
            .unwrap_or_default();
        let typed: Value = serde_json::from_str(&operation_error(id, errors)).unwrap_or_default();
        assert_eq!(raw, typed);
    }

    #[test]
    fn close_reasons_fit_the_frame() {
        let long = "é".repeat(100);
        let cut = close_reason(&long);
        assert!(cut.len() <= 123);
        assert!(long.starts_with(&cut));
    }
}
