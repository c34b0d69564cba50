//! The one write path for every domain type (where the reference used Django model signals):
//! each write commits the change and its event together (the outbox), publishes the event right after commit, and
//! [`run_relay`] re-publishes whatever that did not get out (Redis down, process killed between
//! commit and publish). Delivery is therefore at-least-once; the envelope `id` lets consumers
//! drop duplicates. Events that the relay publishes after an outage may arrive after newer ones.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use domain::{Accounts, Actor, Owner, Page, Repository, StoreError, WriteError};
use events::EventLog;
use futures_util::future::BoxFuture;
use prometheus::{IntCounterVec, IntGauge};
use service_kit::metrics::Metrics;
use tracing::Instrument as _;

use crate::outbox;
use crate::records::{self, Table, Written};
use crate::DbPool;

/// Timing of the outbox. The defaults suit production; tests shorten them.
#[derive(Debug, Clone, Copy)]
pub struct OutboxConfig {
    /// How often the relay looks for events that were not published.
    pub relay_interval: Duration,
    /// How long a writer (or a relay) owns an event it is publishing before others may take it.
    pub lease: Duration,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            relay_interval: Duration::from_secs(1),
            lease: Duration::from_secs(10),
        }
    }
}

/// The database, the event log and the outbox settings; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pub pool: DbPool,
    /// `None`: commit only, and leave publishing to the relay of another process (a
    /// `trigger-event` run beside the embedded server, which cannot reach its memory).
    log: Option<Arc<dyn EventLog>>,
    config: OutboxConfig,
    /// Published events by path (`inline` right after commit, `relay` later) and failures.
    published: IntCounterVec,
    /// Events waiting in the outbox, as of the relay's last pass: alert when it keeps growing.
    pending: IntGauge,
    /// Set for the writes of a request made under a client's idempotency key.
    idempotent: Option<Arc<crate::idempotency::IdempotentRequest>>,
}

impl Store {
    pub fn new(
        pool: DbPool,
        log: Arc<dyn EventLog>,
        config: OutboxConfig,
        metrics: &Metrics,
    ) -> Self {
        Self::with_log(pool, Some(log), config, metrics)
    }

    /// A store that commits writes and their events but publishes nothing: the events wait in
    /// the outbox, due at once, for the relay of the process that owns the log (the embedded
    /// server, whose in-memory log no other process can reach).
    pub fn commit_only(pool: DbPool, config: OutboxConfig, metrics: &Metrics) -> Self {
        Self::with_log(pool, None, config, metrics)
    }

    fn with_log(
        pool: DbPool,
        log: Option<Arc<dyn EventLog>>,
        config: OutboxConfig,
        metrics: &Metrics,
    ) -> Self {
        let published = metrics.counter_vec(
            "events_published_total",
            "Events appended to the event log, by path (inline after commit, or relay) and outcome.",
            &["path", "outcome"],
        );
        let pending = IntGauge::new(
            "outbox_pending_events",
            "Events committed but not yet published, as of the outbox relay's last pass.",
        )
        .expect("static metric definition is valid");
        if let Err(err) = metrics.registry.register(Box::new(pending.clone())) {
            tracing::warn!(%err, "outbox gauge registered twice; keeping the first");
        }
        Self {
            pool,
            log,
            config,
            published,
            pending,
            idempotent: None,
        }
    }

    /// This store for one request made under a client's idempotency key: each write it makes
    /// is made at most once ([`crate::idempotency`]).
    pub fn idempotent(&self, request: crate::idempotency::IdempotentRequest) -> Store {
        Store {
            idempotent: Some(Arc::new(request)),
            ..self.clone()
        }
    }

    fn once(&self) -> Option<crate::idempotency::Once> {
        self.idempotent.as_ref().map(|request| request.next())
    }

    pub fn config(&self) -> OutboxConfig {
        self.config
    }

    pub async fn create<T: Table>(
        &self,
        owner_id: i64,
        parent: Option<i64>,
        new: T::New,
    ) -> Result<T, WriteError> {
        let written =
            records::create(&self.pool, owner_id, parent, new, self.lease(), self.once()).await?;
        Ok(self.publish_written(written).await)
    }

    pub async fn update<T: Table>(
        &self,
        actor: Actor,
        id: i64,
        changes: T::Changes,
    ) -> Result<T, WriteError> {
        let written =
            records::update(&self.pool, actor, id, changes, self.lease(), self.once()).await?;
        Ok(self.publish_written(written).await)
    }

    /// Deletes it and what belongs to it (its type's children, as they declare).
    pub async fn delete<T: Table>(&self, actor: Actor, id: i64) -> Result<T, WriteError> {
        let written = records::delete(&self.pool, actor, id, self.lease(), self.once()).await?;
        Ok(self.publish_written(written).await)
    }

    /// How long a writer owns the events it committed before a relay may publish them.
    fn lease(&self) -> chrono::Duration {
        lease(self.config.lease)
    }

    /// Publishes a write's events in the order they were committed; returns its value.
    async fn publish_written<T>(&self, (value, events): Written<T>) -> T {
        for event in events {
            self.publish(event, Path::Inline).await;
        }
        value
    }

    /// Publishes an event, then removes it from the outbox. After a write (`inline`), a failure
    /// is logged, not returned: the write has committed, and the relay publishes the event once
    /// the log is back.
    async fn publish(&self, event: outbox::PendingEvent, path: Path) -> bool {
        let path = path.label();
        let Some(log) = &self.log else {
            // Due at once, for the relay of the process that owns the log.
            if let Err(err) = outbox::release(&self.pool, &event).await {
                tracing::warn!(%err, event_id = %event.event_id, "cannot release the event; it is relayed when its lease runs out");
            }
            return false;
        };
        // A span of its own when traced, linked to the write's (the relay's is in no request).
        let span = service_kit::telemetry::span(|| {
            let span = tracing::info_span!(
                "publish",
                otel.name = %format!("publish {}", event.event_type),
                otel.kind = "producer",
                path,
            );
            if let Some(traceparent) = &event.traceparent {
                service_kit::telemetry::link(&span, traceparent);
            }
            span
        });
        // By the name committed, known to this process or not: the relay drops nothing.
        let published = log
            .append(&event.event_type, &event.payload)
            .instrument(span)
            .await;
        match published {
            Ok(()) => {
                self.published.with_label_values(&[path, "ok"]).inc();
                if let Err(err) = outbox::delete(&self.pool, event.id).await {
                    // The relay will publish it again: a duplicate, which consumers drop by id.
                    tracing::warn!(%err, event_id = %event.event_id, "published, but cannot remove it from the outbox");
                }
                true
            }
            Err(err) => {
                self.published.with_label_values(&[path, "error"]).inc();
                tracing::warn!(%err, event_id = %event.event_id, attempts = event.attempts, path, "cannot publish event; it stays in the outbox");
                // Due again at once: the relay's next pass retries it before any newer event.
                if let Err(err) = outbox::release(&self.pool, &event).await {
                    tracing::warn!(%err, event_id = %event.event_id, "cannot release the event; it is retried when its lease runs out");
                }
                false
            }
        }
    }

    /// One pass of the relay: publishes due events oldest first, stopping at the first failure
    /// (the log is likely down, and the order of what is left is kept). The oldest event goes
    /// first on its own, as a probe, so that an outage costs one claim per pass rather than a
    /// batch. Returns how many went out.
    pub async fn relay_once(&self) -> usize {
        let mut published = 0;
        for batch in [1, RELAY_BATCH] {
            let due = match outbox::claim_due(&self.pool, batch, lease(self.config.lease)).await {
                Ok(due) => due,
                Err(err) => {
                    tracing::warn!(%err, "outbox relay cannot read the outbox");
                    break;
                }
            };
            let claimed = due.len();
            let mut events = due.into_iter();
            let mut failed = false;
            for event in events.by_ref() {
                if !self.publish(event, Path::Relay).await {
                    failed = true;
                    break;
                }
                published += 1;
            }
            // Events claimed after a failure go back too, keeping their order for the next pass.
            for event in events {
                let _ = outbox::release(&self.pool, &event).await;
            }
            if failed || claimed == 0 {
                break;
            }
        }
        if published > 0 {
            tracing::info!(published, "outbox relay published pending events");
        }
        if let Ok(pending) = outbox::pending_count(&self.pool).await {
            self.pending.set(pending);
        }
        published
    }
}

/// Who publishes: the writer right after commit, or the relay later.
#[derive(Debug, Clone, Copy)]
enum Path {
    Inline,
    Relay,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::Inline => "inline",
            Path::Relay => "relay",
        }
    }
}

/// Events per relay pass.
const RELAY_BATCH: i64 = 100;

/// Runs the relay until `shutdown` resolves.
pub async fn run_relay(store: Store, shutdown: impl Future<Output = ()>) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut interval = tokio::time::interval(store.config.relay_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = interval.tick() => {
                store.relay_once().await;
            }
        }
    }
}

fn lease(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::seconds(10))
}

impl<T: Table> Repository<T> for Store {
    fn find(&self, reader: i64, id: i64) -> BoxFuture<'_, Result<Option<T>, StoreError>> {
        Box::pin(async move { Ok(records::find(&self.pool, reader, id).await?) })
    }

    fn page(
        &self,
        reader: i64,
        parent: Option<i64>,
        after: Option<i64>,
        first: i64,
    ) -> BoxFuture<'_, Result<Page<T>, StoreError>> {
        Box::pin(async move { Ok(records::page(&self.pool, reader, parent, after, first).await?) })
    }

    fn create(
        &self,
        owner_id: i64,
        parent: Option<i64>,
        new: T::New,
    ) -> BoxFuture<'_, Result<T, WriteError>> {
        Box::pin(Store::create::<T>(self, owner_id, parent, new))
    }

    fn update(
        &self,
        actor: Actor,
        id: i64,
        changes: T::Changes,
    ) -> BoxFuture<'_, Result<T, WriteError>> {
        Box::pin(Store::update::<T>(self, actor, id, changes))
    }

    fn delete(&self, actor: Actor, id: i64) -> BoxFuture<'_, Result<T, WriteError>> {
        Box::pin(Store::delete::<T>(self, actor, id))
    }
}

impl Accounts for Store {
    fn active_user(&self, id: i64) -> BoxFuture<'_, Result<Option<Owner>, StoreError>> {
        Box::pin(async move {
            let user = crate::users::find_by_id(&self.pool, id).await?;
            Ok(user.filter(|user| user.is_active).map(|user| Owner {
                id: user.id,
                username: user.username,
                is_staff: user.is_staff,
            }))
        })
    }
}
