//! The gateway's own metrics, registered on the service registry next to the HTTP ones.

use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};

/// Seconds, from a millisecond to ten: where a delivery's latency falls.
const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Clone)]
pub struct GatewayMetrics {
    pub connections_open: IntGauge,
    pub streams_open: IntGaugeVec,
    pub connections_closed: IntCounterVec,
    pub subscriptions_active: IntGaugeVec,
    pub executions_active: IntGauge,
    pub events_received: IntCounterVec,
    pub events_duplicate: IntCounter,
    pub events_malformed: IntCounter,
    pub messages_sent: IntCounter,
    pub results_withheld: IntCounter,
    pub results_superseded: IntCounter,
    pub upgrades_shed: IntCounter,
    pub slow_consumers: IntCounter,
    pub delivery_latency: HistogramVec,
    pub publish_latency: HistogramVec,
    pub hub_lag: GaugeVec,
    pub redis_connected: IntGauge,
    pub replays: IntCounterVec,
    pub replay_entries_read: IntCounter,
    pub replays_refused: IntCounter,
    pub replays_shared: IntCounter,
    pub replay_events_paced: IntCounter,
}

impl GatewayMetrics {
    pub fn register(metrics: &service_kit::metrics::Metrics) -> Self {
        let registry = &metrics.registry;
        let this = Self {
            connections_open: IntGauge::new(
                "gateway_connections_open",
                "Open websocket connections.",
            )
            .expect("valid metric"),
            streams_open: IntGaugeVec::new(
                Opts::new(
                    "gateway_streams_open",
                    "Open streamed HTTP subscriptions, by transport (graphql-sse, multipart).",
                ),
                &["transport"],
            )
            .expect("valid metric"),
            connections_closed: IntCounterVec::new(
                Opts::new(
                    "gateway_connections_closed_total",
                    "Closed connections, by close code; `fin`: the client closed the TCP \
                     connection without a close frame, `reset`: the connection failed (reset, \
                     timed out).",
                ),
                &["code"],
            )
            .expect("valid metric"),
            subscriptions_active: IntGaugeVec::new(
                Opts::new(
                    "gateway_subscriptions_active",
                    "Active subscriptions, by root field.",
                ),
                &["field"],
            )
            .expect("valid metric"),
            executions_active: IntGauge::new(
                "gateway_executions_active",
                "Distinct subscription operations being executed (subscribers of one share it).",
            )
            .expect("valid metric"),
            events_received: IntCounterVec::new(
                Opts::new(
                    "gateway_events_received_total",
                    "Events received from Redis, by type.",
                ),
                &["type"],
            )
            .expect("valid metric"),
            events_duplicate: IntCounter::new(
                "gateway_events_duplicate_total",
                "Events dropped because their id was seen already (at-least-once delivery).",
            )
            .expect("valid metric"),
            events_malformed: IntCounter::new(
                "gateway_events_malformed_total",
                "Messages on the event channels that were not a valid envelope.",
            )
            .expect("valid metric"),
            messages_sent: IntCounter::new(
                "gateway_messages_sent_total",
                "Protocol messages written to clients.",
            )
            .expect("valid metric"),
            results_withheld: IntCounter::new(
                "gateway_results_withheld_total",
                "Subscription results not sent to a subscriber because the record's read rule \
                 does not admit it (a private record of someone else).",
            )
            .expect("valid metric"),
            results_superseded: IntCounter::new(
                "gateway_results_superseded_total",
                "Results of state subscriptions (a record's updates, keyed by its id) not \
                 delivered because a newer one of the same record replaced them while the \
                 gateway was behind; the newer one says how many (`extensions.skipped`). Counted \
                 per execution, not per subscriber.",
            )
            .expect("valid metric"),
            upgrades_shed: IntCounter::new(
                "gateway_upgrades_shed_total",
                "Websocket upgrades answered 503 with Retry-After because the gateway was \
                 behind on its deliveries (OVERLOAD_LAG_MS) and past the upgrades it admits \
                 meanwhile (UPGRADES_PER_SEC_WHILE_LAGGING).",
            )
            .expect("valid metric"),
            slow_consumers: IntCounter::new(
                "gateway_slow_consumers_total",
                "Connections closed because the client read too slowly (events dropped for it).",
            )
            .expect("valid metric"),
            delivery_latency: HistogramVec::new(
                HistogramOpts::new(
                    "gateway_delivery_latency_seconds",
                    "From the event's commit (the envelope's `at`) to its frame written to the \
                     client, by event type.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["type"],
            )
            .expect("valid metric"),
            publish_latency: HistogramVec::new(
                HistogramOpts::new(
                    "gateway_publish_latency_seconds",
                    "From the event's append to its Redis log to its frame written to the client, \
                     by event type (not observed on the in-memory bus).",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["type"],
            )
            .expect("valid metric"),
            hub_lag: GaugeVec::new(
                Opts::new(
                    "gateway_hub_lag_seconds",
                    "How long after its append to the Redis log the hub read the last event of \
                     each log.",
                ),
                &["type"],
            )
            .expect("valid metric"),
            redis_connected: IntGauge::new(
                "gateway_redis_connected",
                "1 while the Redis event connection is up.",
            )
            .expect("valid metric"),
            replays: IntCounterVec::new(
                Opts::new(
                    "gateway_replays_total",
                    "Reads of a log after a resuming subscription's cursor, by whether the \
                     history covered it.",
                ),
                &["recovered"],
            )
            .expect("valid metric"),
            replay_entries_read: IntCounter::new(
                "gateway_replay_entries_read_total",
                "Log entries read for resuming subscriptions.",
            )
            .expect("valid metric"),
            replays_refused: IntCounter::new(
                "gateway_replays_refused_total",
                "Resumes answered `recovered: false` at once: their user's line of replays was full.",
            )
            .expect("valid metric"),
            replays_shared: IntCounter::new(
                "gateway_replays_shared_total",
                "Resumes that joined a replay of the same operation and cursor instead of running their own.",
            )
            .expect("valid metric"),
            replay_events_paced: IntCounter::new(
                "gateway_replay_events_paced_total",
                "Replayed events that waited for their user's budget (REPLAY_EVENTS_PER_SEC_PER_USER).",
            )
            .expect("valid metric"),
        };
        // Known label values start at 0, so that a dashboard shows 0 rather than "no data".
        for transport in ["graphql-sse", "multipart"] {
            this.streams_open.with_label_values(&[transport]).set(0);
        }
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(this.connections_open.clone()),
            Box::new(this.streams_open.clone()),
            Box::new(this.connections_closed.clone()),
            Box::new(this.subscriptions_active.clone()),
            Box::new(this.executions_active.clone()),
            Box::new(this.events_received.clone()),
            Box::new(this.events_duplicate.clone()),
            Box::new(this.events_malformed.clone()),
            Box::new(this.messages_sent.clone()),
            Box::new(this.results_withheld.clone()),
            Box::new(this.results_superseded.clone()),
            Box::new(this.upgrades_shed.clone()),
            Box::new(this.slow_consumers.clone()),
            Box::new(this.delivery_latency.clone()),
            Box::new(this.publish_latency.clone()),
            Box::new(this.hub_lag.clone()),
            Box::new(this.redis_connected.clone()),
            Box::new(this.replays.clone()),
            Box::new(this.replay_entries_read.clone()),
            Box::new(this.replays_refused.clone()),
            Box::new(this.replays_shared.clone()),
            Box::new(this.replay_events_paced.clone()),
        ];
        for collector in collectors {
            if let Err(err) = registry.register(collector) {
                tracing::warn!(%err, "gateway metric registered twice");
            }
        }
        this
    }
}
