//! Traces from a write to its deliveries, at an OTLP receiver run here (OTLP over HTTP, decoded
//! with the official protobuf definitions): a mutation sent through NGINX with a `traceparent`
//! yields, in the client's trace, api-service's request and GraphQL operation, the database
//! transaction and the publish of the event; the gateway's delivery of that event to its
//! subscriber is a span linked to that trace (one per event and execution, not per socket). A
//! query sent on the socket is forwarded with the gateway's context: api-service's request is a
//! child of the gateway's span.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpResponse, HttpServer};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;
use serde_json::{json, Value};

use crate::client::{admin_tokens, create_car, http, ws_subscribed};
use crate::stack::Stack;

/// A span as received: its service, name, trace, ids, and the traces it links to.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    linked_traces: Vec<String>,
}

type Spans = Arc<Mutex<Vec<Received>>>;

async fn export(body: web::Bytes, spans: web::Data<Spans>) -> HttpResponse {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return HttpResponse::BadRequest().finish();
    };
    let mut received = spans.lock().unwrap();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|r| r.attributes.iter())
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                AnyValue::StringValue(name) => Some(name.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                received.push(Received {
                    service: service.clone(),
                    name: span.name.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    linked_traces: span.links.iter().map(|l| hex(&l.trace_id)).collect(),
                });
            }
        }
    }
    HttpResponse::Ok()
        .content_type("application/x-protobuf")
        .finish()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The receiver on a free port; its base URL and what it received.
fn receiver() -> (String, Spans) {
    let spans: Spans = Arc::default();
    let data = web::Data::new(spans.clone());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(web::PayloadConfig::new(16 << 20))
            .route("/v1/traces", web::post().to(export))
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .unwrap();
    let port = server.addrs()[0].port();
    actix_web::rt::spawn(server.run());
    (format!("http://127.0.0.1:{port}"), spans)
}

#[actix_web::test]
async fn a_mutations_trace_holds_its_write_and_links_its_deliveries() {
    let (url, spans) = receiver();
    let stack = Stack::start_with(
        "traces",
        &test_support::redis_url(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", url.as_str()),
            ("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    );
    let (access, _) = admin_tokens(&stack).await;
    let pk = create_car(&stack, &access, "Traced").await;
    let query = format!("subscription {{ carModelUpdated(pk: {pk}) {{ make }} }}");
    let mut subscriber = ws_subscribed(&stack, "graphql-transport-ws", &access, &query).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The client's own trace: a random trace id, its span as the parent.
    let trace_id = format!(
        "{}{}",
        test_support::random_suffix(),
        test_support::random_suffix()
    );
    let client_span = "00f067aa0ba902b7";
    let mut response = http()
        .post(format!("{}/graphql/", stack.url))
        .insert_header(("Authorization", format!("Bearer {access}")))
        .insert_header(("traceparent", format!("00-{trace_id}-{client_span}-01")))
        .send_json(&json!({
            "query": "mutation Rename($pk: ID!) { updateCar(pk: $pk, input: {make: \"Traced again\"}) { make } }",
            "operationName": "Rename",
            "variables": {"pk": pk},
        }))
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["data"]["updateCar"]["make"], "Traced again", "{body}");
    let next = subscriber.expect_json().await;
    assert_eq!(
        next["payload"]["data"]["carModelUpdated"]["make"], "Traced again",
        "{next}"
    );

    // Exported in batches (OTEL_BSP_SCHEDULE_DELAY): wait for all four.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (in_trace, deliveries) = loop {
        let received = spans.lock().unwrap().clone();
        let in_trace: Vec<Received> = received
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect();
        let deliveries: Vec<Received> = received
            .iter()
            .filter(|s| s.linked_traces.contains(&trace_id) && s.name.starts_with("deliver"))
            .cloned()
            .collect();
        let has = |name: &str| in_trace.iter().any(|s| s.name == name);
        if (has("mutation Rename")
            && has("db transaction")
            && has("publish car.updated")
            && !deliveries.is_empty())
            || Instant::now() > deadline
        {
            break (in_trace, deliveries);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let names: Vec<(&str, &str)> = in_trace
        .iter()
        .map(|s| (s.service.as_str(), s.name.as_str()))
        .collect();
    for expected in [
        "POST /graphql/",
        "mutation Rename",
        "db transaction",
        "publish car.updated",
    ] {
        assert!(
            names
                .iter()
                .any(|(service, name)| *service == "api-service" && *name == expected),
            "no api-service span {expected:?} in the client's trace: {names:?}"
        );
    }
    // The request's span is the child of the client's, through NGINX.
    let request = in_trace
        .iter()
        .find(|s| s.name == "POST /graphql/")
        .unwrap();
    assert_eq!(request.parent_span_id, client_span);
    // The operation holds the transaction and the publish.
    let operation = in_trace
        .iter()
        .find(|s| s.name == "mutation Rename")
        .unwrap();
    assert_eq!(operation.parent_span_id, request.span_id);
    for child in ["db transaction", "publish car.updated"] {
        let span = in_trace.iter().find(|s| s.name == child).unwrap();
        assert_eq!(span.parent_span_id, operation.span_id, "{child}");
    }
    for process in [
        "auth-service:auth-service-0",
        "api-service:api-service-0",
        "subscription-gateway:subscription-gateway-0",
    ] {
        assert_eq!(exporter_threads(stack.pid_of(process)), 1, "{process}");
    }
    // The gateway's delivery: in a trace of its own, linked to the mutation's.
    assert_eq!(
        deliveries.len(),
        1,
        "one delivery span for one event and execution: {deliveries:?}"
    );
    assert_eq!(deliveries[0].service, "subscription-gateway");
    assert_eq!(deliveries[0].name, "deliver car.updated");
    assert_ne!(deliveries[0].trace_id, trace_id);

    // A query sent on the socket: the gateway's span, and api-service's request as its child.
    subscriber.subscribe("2", "query OnTheSocket { hi }").await;
    let answer = subscriber.expect_json().await;
    assert_eq!(answer["payload"]["data"]["hi"], "Hi!", "{answer}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let (forwarded, served) = loop {
        let received = spans.lock().unwrap().clone();
        let forwarded = received
            .iter()
            .find(|s| s.service == "subscription-gateway" && s.name == "socket operation")
            .cloned();
        let served = forwarded.as_ref().and_then(|f| {
            received
                .iter()
                .find(|s| s.service == "api-service" && s.parent_span_id == f.span_id)
                .cloned()
        });
        if served.is_some() || Instant::now() > deadline {
            break (forwarded, served);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let forwarded = forwarded.expect("the gateway's span of the socket operation");
    let served = served.expect("api-service's request, a child of the gateway's span");
    assert_eq!(served.trace_id, forwarded.trace_id);
    // The gateway forwards to /graphql, a route of its own beside /graphql/.
    assert!(served.name.starts_with("POST /graphql"), "{served:?}");
}

/// Threads of the process named like the SDK's batch exporter ("OpenTelemetry.Traces.BatchProcessor",
/// which the kernel shortens to 15 characters).
fn exporter_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|name| name.starts_with("OpenTelemetry"))
        })
        .count()
}

/// With no receiver named (the shared stack), no exporter runs in any service; with one, each
/// service has its exporter thread.
#[actix_web::test]
async fn without_a_receiver_no_exporter_runs() {
    let shared = Stack::shared();
    for process in [
        "auth-service:auth-service-0",
        "api-service:api-service-0",
        "subscription-gateway:subscription-gateway-0",
    ] {
        assert_eq!(exporter_threads(shared.pid_of(process)), 0, "{process}");
    }
}
