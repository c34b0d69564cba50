//! The graphql-ws and graphql-transport-ws messages: the two a subscriber sends
//! (`connection_init` and its subscription) and what it makes of those that arrive. Deliveries
//! are told apart and matched to their event by byte prefix and substring rather than by parsing
//! JSON, since loadgen's CPU per delivery is taken from the cores it shares with the gateway.

use serde_json::{json, Value};

use super::args::WsProtocol;

/// `connection_init` with the token, which both protocols open with.
pub(super) fn init_message(protocol: WsProtocol, token: &str) -> String {
    let _ = protocol; // Both protocols open with the same `connection_init`.
    json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {token}")}})
        .to_string()
}

/// The subscription request, resuming after `resume_from` when given.
pub(super) fn subscribe_message(
    protocol: WsProtocol,
    pk: i64,
    resume_from: Option<&str>,
) -> String {
    let kind = match protocol {
        WsProtocol::LegacyWs => "start",
        _ => "subscribe",
    };
    let mut payload = json!({
        "query": format!("subscription {{ carModelUpdated(pk: {pk}) {{ id make model }} }}"),
    });
    if let Some(cursor) = resume_from {
        payload["extensions"] = json!({ "resumeFrom": cursor });
    }
    json!({"id": "1", "type": kind, "payload": payload}).to_string()
}

/// What an incoming text frame is, as far as a subscriber cares.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Incoming {
    /// `next` / `data`: a delivery.
    Data,
    /// graphql-transport-ws `ping`: answered with `pong`.
    Ping,
    /// Legacy `ka`, or a `pong`.
    KeepAlive,
    /// Anything else, by its `type`.
    Other(String),
}

/// Tells messages apart by their leading `type`, which the gateway writes first; only the rare
/// other messages are parsed as JSON.
pub(super) fn classify(text: &[u8]) -> Incoming {
    if text.starts_with(br#"{"type":"next""#) || text.starts_with(br#"{"type":"data""#) {
        return Incoming::Data;
    }
    if text.starts_with(br#"{"type":"ping""#) {
        return Incoming::Ping;
    }
    if text.starts_with(br#"{"type":"ka""#) || text.starts_with(br#"{"type":"pong""#) {
        return Incoming::KeepAlive;
    }
    let message = serde_json::from_slice::<Value>(text).ok();
    let kind = message
        .as_ref()
        .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| "not a message".into());
    // An operation's `error` says why in its first error's code.
    if kind == "error" {
        if let Some(code) = message
            .as_ref()
            .and_then(|v| v["payload"][0]["extensions"]["code"].as_str())
        {
            return Incoming::Other(format!("error {code}"));
        }
    }
    match kind.as_str() {
        "next" | "data" => Incoming::Data,
        "ping" => Incoming::Ping,
        "ka" | "pong" => Incoming::KeepAlive,
        _ => Incoming::Other(kind),
    }
}

/// The event index in a delivery's make (`"make":"<run>-<index>"`), when it is of this run.
pub(super) fn event_index(text: &[u8], run: &str) -> Option<usize> {
    let key = br#""make":""#;
    let start = text.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = &text[start..];
    let end = rest.iter().position(|b| *b == b'"')?;
    let make = std::str::from_utf8(&rest[..end]).ok()?;
    make.strip_prefix(run)?.strip_prefix('-')?.parse().ok()
}

/// Whether `needle` (not empty) occurs in `text`.
pub(super) fn contains(text: &[u8], needle: &[u8]) -> bool {
    text.windows(needle.len()).any(|w| w == needle)
}

/// `extensions.cursor` of a result, which the gateway writes as a plain string.
pub(super) fn result_cursor(text: &[u8]) -> Option<&str> {
    let key = br#""cursor":""#;
    let start = text.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = &text[start..];
    let end = rest.iter().position(|b| *b == b'"')?;
    std::str::from_utf8(&rest[..end]).ok()
}

/// `extensions.skipped` of a result: the earlier results of its subscription it stands for
/// (the gateway conflated them past capacity); 0 when absent.
pub(super) fn result_skipped(text: &[u8]) -> u64 {
    let key = br#""skipped":"#;
    let Some(start) = text.windows(key.len()).position(|w| w == key) else {
        return 0;
    };
    let digits = &text[start + key.len()..];
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end])
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conflated_results_skipped_count_is_read() {
        let text = br#"{"type":"next","id":"1","payload":{"data":{},"extensions":{"cursor":"e:t:1-0","skipped":12}}}"#;
        assert_eq!(result_skipped(text), 12);
        assert_eq!(
            result_skipped(br#"{"payload":{"extensions":{"cursor":"c"}}}"#),
            0
        );
    }

    #[test]
    fn messages_are_classified_by_their_leading_type() {
        assert_eq!(classify(br#"{"type":"next","id":"1"}"#), Incoming::Data);
        assert_eq!(classify(br#"{"type":"data","id":"1"}"#), Incoming::Data);
        assert_eq!(classify(br#"{"type":"ping"}"#), Incoming::Ping);
        assert_eq!(classify(br#"{"type":"ka"}"#), Incoming::KeepAlive);
        assert_eq!(classify(br#"{"id":"1","type":"next"}"#), Incoming::Data);
        assert_eq!(
            classify(br#"{"type":"connection_ack"}"#),
            Incoming::Other("connection_ack".into())
        );
        assert_eq!(classify(b"nope"), Incoming::Other("not a message".into()));
        assert_eq!(
            classify(br#"{"type":"error","id":"1","payload":[{"message":"x","extensions":{"code":"SERVICE_UNAVAILABLE"}}]}"#),
            Incoming::Other("error SERVICE_UNAVAILABLE".into())
        );
    }

    #[test]
    fn a_result_s_cursor_is_kept_and_sent_back_as_resume_from() {
        let text = br#"{"type":"next","id":"1","payload":{"data":{"carModelUpdated":{"make":"lgab-3"}},"extensions":{"cursor":"e1:car.updated:17-0","recovered":false}}}"#;
        assert_eq!(result_cursor(text), Some("e1:car.updated:17-0"));
        assert!(contains(text, br#""recovered":false"#));
        assert_eq!(
            result_cursor(br#"{"type":"next","payload":{"data":{}}}"#),
            None
        );
        let resume: Value = serde_json::from_str(&subscribe_message(
            WsProtocol::TransportWs,
            1,
            Some("e1:car.updated:17-0"),
        ))
        .expect("JSON");
        assert_eq!(resume["type"], "subscribe");
        assert_eq!(
            resume["payload"]["extensions"]["resumeFrom"],
            "e1:car.updated:17-0"
        );
        let first: Value =
            serde_json::from_str(&subscribe_message(WsProtocol::LegacyWs, 2, None)).expect("JSON");
        assert_eq!(first["type"], "start");
        assert!(first["payload"].get("extensions").is_none());
    }

    #[test]
    fn deliveries_are_matched_by_the_make() {
        let text = br#"{"type":"next","id":"1","payload":{"data":{"carModelUpdated":{"id":"1","make":"lgab-17","model":"Octavia"}}}}"#;
        assert_eq!(event_index(text, "lgab"), Some(17));
        assert_eq!(event_index(text, "lgcd"), None);
        assert_eq!(event_index(br#"{"make":"Skoda"}"#, "lgab"), None);
    }
}
