//! Prometheus metrics. Each application owns its own registry (not the process-global one) so that
//! tests can run several applications in one process without their counters mixing.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{web, HttpResponse};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};
use tracing::Instrument as _;

/// The registry and the request metrics every service has; services register their own metrics
/// on [`Metrics::registry`].
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
}

impl Metrics {
    pub fn new(service: &str) -> Self {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by route, method and status.",
            )
            .const_label("service", service),
            &["route", "method", "status"],
        )
        .expect("static metric definition is valid");
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "HTTP request latency by route and method.",
            )
            .const_label("service", service)
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["route", "method"],
        )
        .expect("static metric definition is valid");
        registry
            .register(Box::new(http_requests.clone()))
            .expect("first registration in a new registry");
        registry
            .register(Box::new(http_duration.clone()))
            .expect("first registration in a new registry");
        Self {
            registry,
            http_requests,
            http_duration,
        }
    }

    /// Registers a service's own counter, e.g. tokens issued.
    pub fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        let counter =
            IntCounterVec::new(Opts::new(name, help), labels).expect("metric definition is valid");
        if let Err(err) = self.registry.register(Box::new(counter.clone())) {
            tracing::warn!(%err, name, "metric registered twice; keeping the first");
        }
        counter
    }

    fn render(&self) -> Result<String, prometheus::Error> {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer)?;
        Ok(String::from_utf8_lossy(&buffer).into_owned())
    }
}

/// Middleware recording count and latency per route pattern. It labels by pattern (`/users/{id}`),
/// never by the raw path, so that clients cannot grow the number of series.
pub async fn record(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let metrics = req.app_data::<web::Data<Metrics>>().cloned();
    let method = method_label(req.method());
    let span = crate::telemetry::span(|| request_span(&req, method));
    let response = next.call(req).instrument(span.clone()).await?;
    span.record("http.response.status_code", response.status().as_u16());
    if response.status().is_server_error() {
        crate::telemetry::set_error(&span, response.status().as_str());
    }
    if let Some(metrics) = metrics {
        let route = response
            .request()
            .match_pattern()
            .unwrap_or_else(|| "unmatched".to_owned());
        let status = response.status().as_u16().to_string();
        metrics
            .http_requests
            .with_label_values(&[route.as_str(), method, status.as_str()])
            .inc();
        metrics
            .http_duration
            .with_label_values(&[route.as_str(), method])
            .observe(started.elapsed().as_secs_f64());
    }
    Ok(response)
}

/// A server span for one request, the child of the client's (or NGINX's) `traceparent`.
fn request_span(req: &ServiceRequest, method: &'static str) -> tracing::Span {
    // Named by the route pattern, never the raw path (a span's name is how traces are grouped);
    // the name is fixed when the span starts.
    let route = req.match_pattern();
    let span = tracing::info_span!(
        "HTTP request",
        otel.name = %format!("{method} {}", route.as_deref().unwrap_or("unmatched")),
        otel.kind = "server",
        http.request.method = method,
        url.path = req.path(),
        http.response.status_code = tracing::field::Empty,
    );
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    if let Some(parent) = header("traceparent") {
        crate::telemetry::set_parent(&span, parent, header("tracestate"));
    }
    span
}

/// The `method` label: one of HTTP's own methods, else `other`. A method is any token a client
/// likes, and each distinct label value is a series kept for the life of the process, so a
/// client must not be able to choose it.
fn method_label(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// `GET /metrics`.
pub async fn handler(metrics: web::Data<Metrics>) -> HttpResponse {
    match metrics.render() {
        Ok(text) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4; charset=utf-8")
            .body(text),
        Err(err) => {
            tracing::error!(%err, "cannot encode metrics");
            HttpResponse::InternalServerError().finish()
        }
    }
}

#[cfg(test)]
mod tests {
    use actix_web::{middleware, test, web, App, HttpResponse};

    use super::*;

    #[actix_web::test]
    async fn client_chosen_methods_and_paths_share_one_label_each() {
        let metrics = Metrics::new("test");
        let app = test::init_service(
            App::new()
                .app_data(web::Data::new(metrics.clone()))
                .wrap(middleware::from_fn(record))
                .route("/known", web::get().to(HttpResponse::Ok)),
        )
        .await;
        for n in 0..500 {
            let method = actix_web::http::Method::from_bytes(format!("RANDOM{n}").as_bytes())
                .expect("a valid extension method");
            let path = if n % 2 == 0 {
                "/known".to_owned()
            } else {
                format!("/nowhere/{n}")
            };
            let request = test::TestRequest::default()
                .method(method)
                .uri(&path)
                .to_request();
            let _ = test::call_service(&app, request).await;
        }
        let request = test::TestRequest::get().uri("/known").to_request();
        let _ = test::call_service(&app, request).await;

        let text = metrics.render().expect("renders");
        let counters: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("http_requests_total{"))
            .collect();
        // GET /known 200, other /known 404 or 405, other unmatched 404.
        assert!(counters.len() <= 3, "{counters:#?}");
        assert!(!text.contains("RANDOM"), "a client's method became a label");
        assert!(text.contains("method=\"other\""));
        assert!(text.contains("method=\"GET\""));
    }
}
