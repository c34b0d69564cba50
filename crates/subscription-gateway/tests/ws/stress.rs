//! Executions that finish while subscribers join them from other workers: the race in which a
//! finished execution's last reference was dropped inside `Executions::join` with the registry
//! locked, deadlocking that worker (its `Drop` locks the registry again). Every subscriber here
//! joins an operation that fails at once, on two workers, hundreds of times over; a frozen
//! worker leaves its clients without an answer, and the test fails on the first of them. The
//! window is a few instructions wide: with the drop order reverted, this load did not hit it in
//! three runs, so it guards the path under load rather than proving the order. The order itself
//! is proven by the unit test in `executions.rs`, which makes the race happen every time through
//! a hook between the lookup and the unlock (with the order reverted it fails, deadlocked).

use futures_util::future::join_all;
use serde_json::json;

use crate::helpers::{access, TestGateway, WsClient};

/// Valid as a document, refused by juniper's validation: the execution finishes at its start.
const FAILING: &str = "subscription { carModelUpdated(pk: 1) { noSuchField } }";

#[actix_web::test]
async fn executions_finishing_while_others_join_on_other_workers_never_freeze_a_worker() {
    let gateway = TestGateway::spawn(&[
        "--http-workers=2",
        "--max-subscriptions-per-connection=1000",
    ])
    .await;
    let url = gateway.url();
    let clients = (0..16).map(|client| {
        let url = url.clone();
        async move {
            let mut ws = WsClient::connect(&url, "graphql-transport-ws").await;
            ws.init(&access(1)).await;
            for round in 0..60 {
                // Several in flight at once, so that joins and drops overlap.
                for n in 0..4 {
                    ws.send(json!({"id": format!("{round}-{n}"), "type": "subscribe",
                        "payload": {"query": FAILING}}))
                        .await;
                }
                for _ in 0..4 {
                    let error = ws.expect_json().await;
                    assert_eq!(error["type"], "error", "client {client}: {error}");
                }
            }
            ws.send(json!({"type": "ping"})).await;
            assert_eq!(ws.expect_json().await["type"], "pong", "client {client}");
        }
    });
    join_all(clients).await;
}
