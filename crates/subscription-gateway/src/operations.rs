//! Starting one operation for a subscriber, whatever carries it (a websocket's `subscribe`, or
//! a streamed HTTP request, [`crate::streamed`]): the checks before it starts, then a
//! subscription joins (or starts) its shared execution and a query or mutation is forwarded to
//! api-service. What is running is an [`Active`]; dropping it stops it.

use service_kit::error::{ErrorCode, Refusal};
use std::net::IpAddr;
use std::sync::Arc;

use juniper::DefaultScalarValue;
use prometheus::IntGauge;
use serde_json::Value;
use tokens::jwt::Claims;

use crate::executions::{Gate, Membership, Start, Subscriber};
use crate::protocol::Protocol;
use crate::socket::Link;
use crate::state::Shared;

/// A running operation; dropping it stops it (and lowers the subscriptions gauge).
pub struct Active {
    /// `gateway_subscriptions_active` of its field; none for a forwarded query or mutation.
    gauge: Option<IntGauge>,
    _work: Work,
}

impl Drop for Active {
    fn drop(&mut self) {
        if let Some(gauge) = &self.gauge {
            gauge.dec();
        }
    }
}

/// What an active operation holds.
enum Work {
    /// A subscription's place in its shared execution.
    Subscription { _membership: Membership },
    /// A query or mutation under way at api-service.
    Forwarded { _task: AbortOnDrop },
}

struct AbortOnDrop(actix_web::rt::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Who starts the operation: the connection's verified token and where it comes from.
pub struct Caller<'a> {
    pub claims: &'a Claims,
    /// The `Authorization` value the claims came from, for a forwarded operation.
    pub authorization: &'a str,
    /// The client's address (behind NGINX, the one it forwarded).
    pub address: IpAddr,
    /// The connection's replays running (MAX_REPLAYS_PER_CONNECTION).
    pub replay_slots: &'a Arc<tokio::sync::Semaphore>,
}

/// An operation let in: a query or mutation to forward, or a subscription to run.
enum Admitted {
    Forward(GraphQLRequest),
    Subscribe {
        request: GraphQLRequest,
        /// Its root field: the metric's label (from the schema, so clients cannot create
        /// label values).
        field: String,
        /// `extensions.resumeFrom`.
        resume: Option<events::Cursor>,
    },
}

type GraphQLRequest = juniper::http::GraphQLRequest<DefaultScalarValue>;

/// The checks before an operation starts, on one parse of its document: a persisted query
/// resolved, the cursor and the request read, a variable of an unknown type refused (juniper's
/// validation would panic on it), and a subscription held to the spec's "single root field"
/// rule, which juniper does not check (with two, one event would be answered for one field and
/// the other silently dropped).
async fn admit(shared: &Shared, mut payload: Value) -> Result<Admitted, Refusal> {
    // A persisted query (APQ, or a trusted document) becomes its document first.
    if let Value::Object(map) = &mut payload {
        Box::pin(shared.persisted.resolve(map)).await?;
    }
    let resume = resume_from(&payload, shared.hub.registry())
        .map_err(|message| Refusal::new(message, ErrorCode::BadUserInput))?;
    let request =
        graphql_request(payload).map_err(|message| Refusal::new(message, ErrorCode::BadRequest))?;
    let inspected = graphql_schema::inspect(
        &shared.schema,
        &request.query,
        request.operation_name.as_deref(),
    );
    if let Some(message) = inspected.unknown_variable_type {
        return Err(Refusal::new(message, ErrorCode::GraphqlValidationFailed));
    }
    if let Some(juniper::OperationType::Query | juniper::OperationType::Mutation) =
        inspected.operation_type
    {
        return Ok(Admitted::Forward(request));
    }
    if let Some(fields) = inspected.root_fields.as_ref().filter(|f| f.count != 1) {
        return Err(Refusal::new(
            format!(
                "a subscription must select exactly one root field; this one selects {}",
                fields.count
            ),
            ErrorCode::GraphqlValidationFailed,
        ));
    }
    let field = inspected
        .root_fields
        .and_then(|fields| fields.first)
        .filter(|field| graphql_schema::is_subscription_field(&shared.schema, field))
        .unwrap_or_else(|| "unknown".to_owned());
    Ok(Admitted::Subscribe {
        request,
        field,
        resume,
    })
}

/// Starts operation `id` of `payload` (`{query, operationName?, variables?, extensions?}`) for
/// `caller`, its messages going to `link` framed by `protocol`, or says why it was refused.
pub async fn start(
    shared: &Shared,
    protocol: Protocol,
    link: &Arc<Link>,
    id: &str,
    payload: Value,
    caller: Caller<'_>,
) -> Result<Active, Refusal> {
    Ok(match admit(shared, payload).await? {
        Admitted::Forward(request) => forward(shared, protocol, link, id, request, &caller),
        Admitted::Subscribe {
            request,
            field,
            resume,
        } => subscribe(
            shared,
            protocol,
            link,
            id,
            (request, field, resume),
            &caller,
        ),
    })
}

/// A query or mutation sent on the socket: forwarded to api-service.
fn forward(
    shared: &Shared,
    protocol: Protocol,
    link: &Arc<Link>,
    id: &str,
    request: GraphQLRequest,
    caller: &Caller<'_>,
) -> Active {
    let operation = crate::forward::Operation {
        protocol,
        id: id.to_owned(),
        request: serde_json::to_value(&request).unwrap_or_default(),
        authorization: caller.authorization.to_owned(),
        client: caller.address,
    };
    let task = actix_web::rt::spawn(crate::forward::run(
        shared.upstream.clone(),
        link.clone(),
        operation,
    ));
    Active {
        gauge: None,
        _work: Work::Forwarded {
            _task: AbortOnDrop(task),
        },
    }
}

/// A subscription: joins (or starts) its shared execution, after a catch-up when it resumes.
fn subscribe(
    shared: &Shared,
    protocol: Protocol,
    link: &Arc<Link>,
    id: &str,
    (request, field, resume): (GraphQLRequest, String, Option<events::Cursor>),
    caller: &Caller<'_>,
) -> Active {
    let claims = caller.claims;
    let membership = shared.executions.join(Start {
        coordinator: &shared.coordinator,
        hub: &shared.hub,
        claims,
        request,
        subscriber: Subscriber {
            protocol,
            id: id.to_owned(),
            link: link.clone(),
            gate: resume
                .as_ref()
                .map(|_| Gate::new(shared.limits.outbound_queue)),
            viewer: events::Viewer {
                user_id: claims.user_id,
                is_staff: claims.is_staff,
            },
        },
        resume: resume.map(|cursor| {
            (
                cursor,
                crate::replays::ReplayAdmission {
                    replays: shared.replays.clone(),
                    connection: caller.replay_slots.clone(),
                    user_id: claims.user_id,
                },
            )
        }),
    });
    let gauge = shared
        .metrics
        .subscriptions_active
        .with_label_values(&[&field]);
    gauge.inc();
    Active {
        gauge: Some(gauge),
        _work: Work::Subscription {
            _membership: membership,
        },
    }
}

/// `extensions.resumeFrom` of a `subscribe`/`start` payload, if any.
fn resume_from(
    payload: &Value,
    registry: &events::Registry,
) -> Result<Option<events::Cursor>, String> {
    match payload
        .get("extensions")
        .and_then(|extensions| extensions.get("resumeFrom"))
    {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => events::Cursor::parse(text, registry).map(Some),
        Some(_) => Err(
            "`extensions.resumeFrom` must be a string: a result's `extensions.cursor`".to_owned(),
        ),
    }
}

fn graphql_request(payload: Value) -> Result<GraphQLRequest, String> {
    // Only the three standard fields; clients also send `extensions`, which we do not use.
    let Value::Object(mut map) = payload else {
        return Err("payload must be an object".into());
    };
    let mut request = serde_json::Map::new();
    for key in ["query", "operationName", "variables"] {
        if let Some(value) = map.remove(key) {
            if !value.is_null() {
                request.insert(key.to_owned(), value);
            }
        }
    }
    if !request.contains_key("query") {
        return Err("payload has no `query`".into());
    }
    serde_json::from_value(Value::Object(request))
        .map_err(|err| format!("invalid subscription payload: {err}"))
}
