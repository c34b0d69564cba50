//! The one task of an execution: runs the juniper stream once for every subscriber, turns
//! each result into a [`Batch`] with what the hub said of its event, and hands it to the groups.

use std::cell::Cell;
use std::sync::{Arc, Weak};

use futures_util::{FutureExt as _, StreamExt as _};
use graphql_schema::Context;
use juniper::{DefaultScalarValue, SubscriptionCoordinator as _};
use service_kit::error::ErrorCode;
use tokio::sync::Notify;

use events::Readers;

use super::group::Batch;
use super::result::ResultText;
use super::{Coordinator, Execution};
use crate::hub::{EventMark, CURRENT_EVENT};
use crate::protocol;

/// Runs the juniper stream once for every subscriber of the operation.
pub(super) async fn drive(
    coordinator: Arc<Coordinator>,
    request: juniper::http::GraphQLRequest<DefaultScalarValue>,
    context: Context,
    execution: Weak<Execution>,
    lagged: Arc<Notify>,
) {
    let subscribed = coordinator.subscribe(&request, &context).await;
    if let Some(execution) = execution.upgrade() {
        execution.started.send_replace(true);
    }
    let stream = match subscribed {
        Ok(stream) => stream,
        Err(err) => {
            let errors = not_started(&err);
            if let Some(execution) = execution.upgrade() {
                execution.mark_finished();
                execution
                    .broadcast(Batch::Finish(Some(errors.to_string())))
                    .await;
            }
            return;
        }
    };
    tokio::pin!(stream);
    while let Some(output) = stream.next().await {
        let mark = CURRENT_EVENT.try_with(Cell::take).ok().flatten();
        let Some(execution) = execution.upgrade() else {
            return;
        };
        let skipped = mark.as_ref().map_or(0, |m| m.skipped);
        if skipped > 0 {
            // Superseded while waiting for this execution (its route held the newest); the
            // group says so in the payload, with what it skips itself.
            if let Some(registry) = execution.registry.upgrade() {
                registry.metrics.results_superseded.inc_by(skipped);
            }
        }
        let result = Arc::new(ResultText::new(
            &output,
            mark.as_ref().map(|m| m.cursor.clone()),
        ));
        let span = mark.as_ref().and_then(delivery_span);
        let batch = Batch::Next {
            result,
            event_type: mark.as_ref().map(|m| m.event_type),
            event_at: mark.as_ref().map(|m| m.at),
            readers: readers_of(mark.as_ref()),
            supersedable: mark.as_ref().is_some_and(|m| m.supersedable),
            skipped,
            position: mark.map(|m| m.log_at),
        };
        match span {
            Some(span) => {
                use tracing::Instrument as _;
                execution.broadcast(batch).instrument(span).await;
            }
            None => execution.broadcast(batch).await,
        }
    }
    let Some(execution) = execution.upgrade() else {
        return;
    };
    execution.mark_finished();
    if lagged.notified().now_or_never().is_some() {
        execution.broadcast(Batch::CutOff).await;
    } else {
        execution.broadcast(Batch::Finish(None)).await;
    }
}

/// Why an operation did not start, as the errors its members are sent.
fn not_started(err: &juniper::GraphQLError) -> serde_json::Value {
    match err {
        juniper::GraphQLError::NotSubscription => protocol::errors(
            "this operation is not a subscription",
            ErrorCode::BadRequest,
        ),
        other => graphql_schema::request_errors(other),
    }
}

/// One span per event and execution (not per subscriber), linked to the write's trace; none
/// when the write was not traced or this process does not trace.
fn delivery_span(mark: &EventMark) -> Option<tracing::Span> {
    let traceparent = mark.traceparent.as_deref()?;
    let span = tracing::info_span!(
        "deliver",
        otel.name = %format!("deliver {}", mark.event_type.as_str()),
        otel.kind = "consumer",
        gqlws.cursor = &*mark.cursor,
    );
    service_kit::telemetry::link(&span, traceparent);
    Some(span)
}

/// Who may receive a result: the readers of the event behind it. Every record reaches a
/// subscription through an event, so a result without one carries no record; it goes to staff
/// only all the same, so that a result whose event was not traced cannot show a private record.
pub(super) fn readers_of(mark: Option<&EventMark>) -> Readers {
    mark.map_or(Readers::Staff, |mark| mark.readers)
}
