//! Authentication at `connection_init`, in both protocols, and closing at expiry or revocation.

use crate::helpers::CAR_UPDATED;
use std::time::Duration;

use events::revocation_channel;
use serde_json::json;
use tokens::jwt::TokenType;

use crate::helpers::{access, car, token, Incoming, TestGateway, WsClient, MODEL_UPDATED};

async fn refused_transport_ws(
    gateway: &TestGateway,
    payload: serde_json::Value,
) -> (Option<u16>, String) {
    let mut client = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    client
        .send(json!({"type": "connection_init", "payload": payload}))
        .await;
    client.expect_close().await
}

#[actix_web::test]
async fn bad_tokens_close_graphql_transport_ws_with_4403_and_a_reason() {
    let gateway = TestGateway::spawn(&[]).await;
    let cases = [
        (serde_json::Value::Null, "no token"),
        (json!({}), "no token"),
        (json!({"Authorization": "Token abc"}), "malformed"),
        (json!({"Authorization": "Bearer not.a.jwt"}), "malformed"),
        (
            json!({"Authorization": format!("Bearer {}", token(1, TokenType::Access, -5))}),
            "expired",
        ),
        (
            json!({"Authorization": format!("Bearer {}", token(1, TokenType::Refresh, 300))}),
            "refresh token",
        ),
        (
            json!({"Authorization": format!("Bearer {}", with_foreign_signature(&access(1)))}),
            "signature",
        ),
    ];
    for (payload, expected) in cases {
        let (code, reason) = refused_transport_ws(&gateway, payload.clone()).await;
        assert_eq!(code, Some(4403), "{payload}: {reason}");
        assert!(
            reason.contains(expected),
            "{payload}: `{reason}` lacks `{expected}`"
        );
    }
}

#[actix_web::test]
async fn bad_tokens_get_connection_error_in_the_legacy_protocol() {
    let gateway = TestGateway::spawn(&[]).await;
    let mut client = WsClient::connect(&gateway.url(), "graphql-ws").await;
    let expired = token(1, TokenType::Access, -5);
    client
        .send(json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {expired}")}}))
        .await;
    let error = client.expect_json().await;
    assert_eq!(error["type"], "connection_error");
    assert!(error["payload"]["message"]
        .as_str()
        .unwrap()
        .contains("expired"));
    let (code, _) = client.expect_close().await;
    assert_eq!(code, Some(4403));
}

#[actix_web::test]
async fn the_upgrade_requests_authorization_header_is_the_fallback() {
    let gateway = TestGateway::spawn(&[]).await;
    let header = format!("Bearer {}", access(1));
    let mut client =
        WsClient::try_connect(&gateway.url(), Some("graphql-transport-ws"), Some(&header))
            .await
            .unwrap();
    client.send(json!({"type": "connection_init"})).await;
    assert_eq!(client.expect_json().await["type"], "connection_ack");
}

#[actix_web::test]
async fn subscribing_before_the_ack_is_4401_in_both_protocols() {
    let gateway = TestGateway::spawn(&[]).await;
    for (protocol, kind) in [
        ("graphql-transport-ws", "subscribe"),
        ("graphql-ws", "start"),
    ] {
        let mut client = WsClient::connect(&gateway.url(), protocol).await;
        client
            .send(json!({"id": "1", "type": kind, "payload": {"query": MODEL_UPDATED}}))
            .await;
        let (code, _) = client.expect_close().await;
        assert_eq!(code, Some(4401), "{protocol}");
    }
}

#[actix_web::test]
async fn the_socket_closes_when_the_access_token_expires() {
    let gateway = TestGateway::spawn(&[]).await;
    let mut client = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    client.init(&token(1, TokenType::Access, 2)).await;
    match client.recv_within(Duration::from_secs(15)).await {
        Incoming::Close(code, reason) => {
            assert_eq!(code, Some(4403));
            assert_eq!(reason, "token expired");
        }
        Incoming::Json(message) => panic!("expected the close, got {message}"),
    }
}

#[actix_web::test]
async fn a_revocation_closes_only_that_users_sockets() {
    let gateway = TestGateway::spawn(&[]).await;
    let mut alice = WsClient::connect(&gateway.url(), "graphql-transport-ws").await;
    alice.init(&access(1)).await;
    let mut bob = WsClient::connect(&gateway.url(), "graphql-ws").await;
    bob.send(json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {}", access(2))}}))
        .await;
    assert_eq!(bob.expect_json().await["type"], "connection_ack");
    bob.send(json!({"id": "1", "type": "start", "payload": {"query": MODEL_UPDATED}}))
        .await;
    gateway.settle().await;

    let channel = revocation_channel(&gateway.prefix);
    let suffix = channel.trim_start_matches(&gateway.prefix).to_owned();
    gateway
        .publish_raw(
            &suffix,
            &json!({"user_id": 1, "jti": "abc", "cutoff_ms": chrono::Utc::now().timestamp_millis()})
                .to_string(),
        )
        .await;
    let (code, reason) = alice.expect_close().await;
    assert_eq!(code, Some(4403));
    assert!(reason.contains("revoked"), "{reason}");

    gateway.publish(CAR_UPDATED, car(1, "Still here")).await;
    let data = bob.expect_json().await;
    assert_eq!(
        data["payload"]["data"]["carModelUpdated"]["make"],
        "Still here"
    );
}

/// The token with the (well-formed) signature of another token: a forgery.
fn with_foreign_signature(token: &str) -> String {
    let other = access(99);
    let (head, _) = token.rsplit_once('.').unwrap();
    let (_, signature) = other.rsplit_once('.').unwrap();
    format!("{head}.{signature}")
}
