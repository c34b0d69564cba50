//! What the subscribers saw. Each subscriber task counts into a tally of its own, merged into its
//! client thread's when it ends and into the run's when the thread ends, so that a delivery
//! touches nothing shared but its event's counter.

use std::collections::BTreeMap;

/// What one client thread saw.
#[derive(Default)]
pub(super) struct Tally {
    /// (event index, receipt time in ns since `base`).
    pub(super) receipts: Vec<(u32, u64)>,
    /// Upgrade request to `connection_ack`, in µs.
    pub(super) handshake_us: Vec<u32>,
    pub(super) connect_errors: BTreeMap<String, u64>,
    pub(super) closes: BTreeMap<String, u64>,
    /// `error` / `complete` / `connection_error` and anything unexpected, by type.
    pub(super) protocol_errors: BTreeMap<String, u64>,
    pub(super) keepalives: u64,
    /// Deliveries whose make was not of this run or not parseable.
    pub(super) foreign: u64,
    /// Deliveries of an event this subscriber had already received (not counted as receipts).
    pub(super) duplicates: u64,
    /// With --resume: one per reconnect that subscribed again.
    pub(super) resumes: Vec<Resumed>,
    /// Resumed subscriptions whose first result said `recovered: false`.
    pub(super) unrecovered: u64,
    /// Results the gateway said it skipped for a subscriber (`extensions.skipped`, conflation
    /// past capacity), read from every result the subscriber received, this run's events or
    /// another's: missing deliveries the subscriber was told of.
    pub(super) skipped_told: u64,
    /// Subscribers that gave up reconnecting.
    pub(super) gave_up: u64,
    /// Renewal `ping`s sent, and the time to their `pong {"exp"}` in µs.
    pub(super) renewals_sent: u64,
    pub(super) renewal_us: Vec<u32>,
}

/// One reconnect of a resuming subscriber; times in ns since `base`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Resumed {
    /// When its socket was closed.
    pub(super) dropped_ns: u64,
    /// When it subscribed again with its cursor.
    pub(super) resubscribed_ns: u64,
    /// When it held every event published before `resubscribed_ns`.
    pub(super) caught_up_ns: u64,
}

pub(super) fn merge(total: &mut Tally, tally: Tally) {
    total.receipts.extend(tally.receipts);
    total.handshake_us.extend(tally.handshake_us);
    for (map, from) in [
        (&mut total.connect_errors, tally.connect_errors),
        (&mut total.closes, tally.closes),
        (&mut total.protocol_errors, tally.protocol_errors),
    ] {
        for (kind, n) in from {
            *map.entry(kind).or_insert(0) += n;
        }
    }
    total.keepalives += tally.keepalives;
    total.foreign += tally.foreign;
    total.duplicates += tally.duplicates;
    total.resumes.extend(tally.resumes);
    total.unrecovered += tally.unrecovered;
    total.skipped_told += tally.skipped_told;
    total.gave_up += tally.gave_up;
    total.renewals_sent += tally.renewals_sent;
    total.renewal_us.extend(tally.renewal_us);
}
