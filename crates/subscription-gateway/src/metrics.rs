//! The gateway's own metrics, registered on the service registry next to the HTTP ones.

use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};

/// Seconds, from a millisecond to ten: where a delivery's latency falls.
const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Declares the gateway's metrics once: the struct's fields, and a `register` that creates
/// each and registers it in the same step, so that none is left unregistered.
macro_rules! gateway_metrics {
    ($($field:ident: $type:ty = $make:ident($($arg:expr),* $(,)?),)*) => {
        #[derive(Clone)]
        pub struct GatewayMetrics {
            $(pub $field: $type,)*
        }

        impl GatewayMetrics {
            pub fn register(metrics: &service_kit::metrics::Metrics) -> Self {
                let register = Register(&metrics.registry);
                let this = Self {
                    $($field: register.$make($($arg),*),)*
                };
                // Known label values start at 0, so that a dashboard shows 0, not "no data".
                for transport in ["graphql-sse", "multipart"] {
                    this.streams_open.with_label_values(&[transport]).set(0);
                }
                this
            }
        }
    };
}

gateway_metrics! {
    connections_open: IntGauge = int_gauge(
        "gateway_connections_open",
        "Open websocket connections."
    ),
    streams_open: IntGaugeVec = int_gauge_vec(
        "gateway_streams_open",
        "Open streamed HTTP subscriptions, by transport (graphql-sse, multipart).",
        "transport"
    ),
    connections_closed: IntCounterVec = counter_vec(
        "gateway_connections_closed_total",
        "Closed connections, by close code; `fin`: the client closed the TCP \
        connection without a close frame, `reset`: the connection failed (reset, \
        timed out).",
        "code"
    ),
    subscriptions_active: IntGaugeVec = int_gauge_vec(
        "gateway_subscriptions_active",
        "Active subscriptions, by root field.",
        "field"
    ),
    executions_active: IntGauge = int_gauge(
        "gateway_executions_active",
        "Distinct subscription operations being executed (subscribers of one share it)."
    ),
    events_received: IntCounterVec = counter_vec(
        "gateway_events_received_total",
        "Events received from Redis, by type.",
        "type"
    ),
    events_duplicate: IntCounter = counter(
        "gateway_events_duplicate_total",
        "Events dropped because their id was seen already (at-least-once delivery)."
    ),
    log_gaps: IntCounterVec = counter_vec(
        "gateway_log_gaps_total",
        "Times entries of a log were trimmed before the hub read them (it fell behind by the \
         retention, or lost Redis that long), by type: the type's subscribers were closed as \
         slow and resume.",
        "type"
    ),
    events_malformed: IntCounter = counter(
        "gateway_events_malformed_total",
        "Messages on the event channels that were not a valid envelope."
    ),
    messages_sent: IntCounter = counter(
        "gateway_messages_sent_total",
        "Protocol messages written to clients."
    ),
    results_withheld: IntCounter = counter(
        "gateway_results_withheld_total",
        "Subscription results not sent to a subscriber because the record's read rule \
        does not admit it (a private record of someone else)."
    ),
    results_superseded: IntCounter = counter(
        "gateway_results_superseded_total",
        "Results of state subscriptions (a record's updates, keyed by its id) not \
        delivered because a newer one of the same record replaced them while the \
        gateway was behind; the newer one says how many (`extensions.skipped`). Counted \
        per execution, not per subscriber."
    ),
    upgrades_shed: IntCounter = counter(
        "gateway_upgrades_shed_total",
        "Websocket upgrades answered 503 with Retry-After because the gateway was \
        behind on its deliveries (OVERLOAD_LAG_MS) and past the upgrades it admits \
        meanwhile (UPGRADES_PER_SEC_WHILE_LAGGING)."
    ),
    slow_consumers: IntCounter = counter(
        "gateway_slow_consumers_total",
        "Connections closed because the client read too slowly (events dropped for it)."
    ),
    delivery_latency: HistogramVec = latency_vec(
        "gateway_delivery_latency_seconds",
        "From the event's commit (the envelope's `at`) to its frame written to the \
        client, by event type.",
        "type"
    ),
    publish_latency: HistogramVec = latency_vec(
        "gateway_publish_latency_seconds",
        "From the event's append to its Redis log to its frame written to the client, \
        by event type (not observed on the in-memory log).",
        "type"
    ),
    hub_lag: GaugeVec = gauge_vec(
        "gateway_hub_lag_seconds",
        "How long after its append to the Redis log the hub read the last event of \
        each log.",
        "type"
    ),
    redis_connected: IntGauge = int_gauge(
        "gateway_redis_connected",
        "1 while the Redis event connection is up."
    ),
    replays: IntCounterVec = counter_vec(
        "gateway_replays_total",
        "Reads of a log after a resuming subscription's cursor, by whether the \
        history covered it.",
        "recovered"
    ),
    replay_entries_read: IntCounter = counter(
        "gateway_replay_entries_read_total",
        "Log entries read for resuming subscriptions."
    ),
    replays_refused: IntCounter = counter(
        "gateway_replays_refused_total",
        "Resumes answered `recovered: false` at once: their user's line of replays was full."
    ),
    replays_shared: IntCounter = counter(
        "gateway_replays_shared_total",
        "Resumes that joined a replay of the same operation and cursor instead of running their own."
    ),
    replay_events_paced: IntCounter = counter(
        "gateway_replay_events_paced_total",
        "Replayed events that waited for their user's budget (REPLAY_EVENTS_PER_SEC_PER_USER)."
    ),
}

struct Register<'a>(&'a prometheus::Registry);

impl Register<'_> {
    fn add<C: prometheus::core::Collector + Clone + 'static>(&self, collector: C) -> C {
        if let Err(err) = self.0.register(Box::new(collector.clone())) {
            tracing::warn!(%err, "gateway metric registered twice");
        }
        collector
    }

    fn int_gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect("valid metric"))
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help).expect("valid metric"))
    }

    fn int_gauge_vec(&self, name: &str, help: &str, label: &str) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric"))
    }

    fn counter_vec(&self, name: &str, help: &str, label: &str) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric"))
    }

    fn gauge_vec(&self, name: &str, help: &str, label: &str) -> GaugeVec {
        self.add(GaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric"))
    }

    fn latency_vec(&self, name: &str, help: &str, label: &str) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
        self.add(HistogramVec::new(opts, &[label]).expect("valid metric"))
    }
}
