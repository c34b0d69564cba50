//! The event log's settings.

use clap::Args;

use crate::position::{Retention, MAX_PARTITIONS};

/// How the logs are laid out in Redis: set the same on every process that writes or reads them
/// (api-service, `trigger-event`, the gateways). A process configured otherwise than the logs
/// in Redis refuses to write or read them, and says why.
#[derive(Debug, Clone, Copy, Args)]
pub struct PartitionArgs {
    /// Partitions of each event type's log, by record (1..=256). On a Redis Cluster each
    /// partition is a stream in a slot of its own, so the logs spread over the shards; a few
    /// per primary is plenty. The count is recorded in Redis (`<prefix>events:partitions`): to
    /// change it, stop every api and gateway, delete that key and start them with the new
    /// count; cursors of the old layout resume with `recovered: false`.
    #[arg(long, env = "EVENT_LOG_PARTITIONS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=(MAX_PARTITIONS as i64)))]
    pub event_log_partitions: u16,
    /// Replicas an append waits for (`WAIT` after the `XADD`, up to 200 ms): with 1, a
    /// publication returns once a replica holds the event, so a primary's failover loses none
    /// of them; one no replica acknowledged in time (a shard left without replica) is logged
    /// as at risk. 0: the primary's acknowledgement suffices (Redis replication is
    /// asynchronous, so a failover may lose the last events it acknowledged).
    #[arg(long, env = "EVENT_LOG_REPLICA_ACKS", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=16))]
    pub event_log_replica_acks: u16,
}

impl Default for PartitionArgs {
    fn default() -> Self {
        Self {
            event_log_partitions: 1,
            event_log_replica_acks: 0,
        }
    }
}

/// The event log: how much history each event type keeps for subscribers that resume
/// . Set on the processes that publish (api-service, `trigger-event`, the
/// embedded server); a subscriber whose cursor is older gets `recovered: false`.
#[derive(Debug, Clone, Copy, Args)]
pub struct EventLogArgs {
    /// Events kept per event type (Redis `XADD … MAXLEN ~`, so a little more may stay).
    #[arg(long, env = "EVENT_RETENTION_COUNT", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub event_retention_count: u64,
    /// Longest an event is kept, in seconds (0 = no age limit; the count still applies).
    #[arg(long, env = "EVENT_RETENTION_SECS", default_value_t = 3_600)]
    pub event_retention_secs: u64,
    #[command(flatten)]
    pub layout: PartitionArgs,
}

impl Default for EventLogArgs {
    fn default() -> Self {
        let Retention {
            count,
            max_age_secs,
        } = Retention::default();
        Self {
            event_retention_count: count,
            event_retention_secs: max_age_secs,
            layout: PartitionArgs::default(),
        }
    }
}

impl From<&EventLogArgs> for Retention {
    fn from(args: &EventLogArgs) -> Self {
        Self {
            count: args.event_retention_count.max(1),
            max_age_secs: args.event_retention_secs,
        }
    }
}
