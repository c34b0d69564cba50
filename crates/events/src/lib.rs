//! Events between services: the JSON envelope of every change, the log of each event type, the
//! [`EventLog`] that appends envelopes to it and reads them back (a Redis stream, or in memory for the embedded
//! mode), and the [`EventSource`] that subscription resolvers read them from.
//!
//! Envelope (version 1), one per committed write:
//! `{"v":1,"id":"<32 hex>","type":"car.updated","at":"<RFC 3339>","data":{…the car…}}`.
//! Nothing here knows a domain type: [`Envelope`] is generic over its `data`, an [`EventType`] is
//! a name a domain type declares, and the [`Registry`] (built by the domain crate) says which
//! names exist and how each one's envelopes decode.
//! Delivery is at-least-once (see the store's outbox): a consumer drops an `id` it has seen.
//!
//! Each event type has a log, `<REDIS_KEY_PREFIX>events:<type>`: a Redis stream whose entry ids
//! are the events' [`Position`]s, the same for every gateway, kept for a bounded retention
//! ([`EventLogArgs`]). A gateway reads it with `XREAD` from the last position it has seen, so a
//! reconnection to Redis loses nothing, and a client that resumes names a [`Cursor`] (the log's
//! [`epoch`](epoch_key), the type and the position) to get what it missed. The epoch changes
//! when the log is reset (a Redis that restarted empty): cursors of an older epoch are not
//! covered any more.
//!
//! By concept: [`envelope`] (the envelope and the type's name), [`registry`] (the types a
//! process knows: decoding, routing keys, readers), [`position`] (positions, cursors,
//! retention), [`log`] (the [`EventLog`] and its [`Follower`], revocation announcements, the
//! [`EventSource`] resolvers read), and its two homes, [`redis`] and [`memory`].

pub mod envelope;
pub mod log;
#[cfg(feature = "runtime")]
pub mod memory;
pub mod position;
#[cfg(feature = "runtime")]
pub mod redis;
pub mod registry;
#[cfg(feature = "runtime")]
pub mod settings;

pub use envelope::{new_event_id, AnyData, DecodeError, Envelope, EventType, ENVELOPE_VERSION};
pub use log::{
    new_epoch, EnvelopeStream, EventLog, EventSource, Follower, History, LogError, Revocation,
    SharedEventSource, REVOCATION_EVENT, REVOCATION_RETENTION,
};
#[cfg(feature = "runtime")]
pub use memory::MemoryLog;
pub use position::{
    partition_of, At, Cursor, LoggedEvent, Position, Positions, Retention, MAX_PARTITIONS,
};
#[cfg(feature = "runtime")]
pub use redis::{
    append_command, channel, epoch_key, events_connection_name, push_append, revocation_channel,
    RedisLog, ENTRY_FIELD,
};
pub use registry::{EventKind, Key, Readers, Registry, Viewer};

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};
    use std::sync::Arc;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Thing {
        id: i64,
        make: String,
    }

    const UPDATED: EventType = EventType::new("thing.updated");

    #[test]
    fn envelope_has_the_documented_shape() {
        let thing = Thing {
            id: 1,
            make: "Skoda".into(),
        };
        let envelope = Envelope::new(UPDATED, thing.clone());
        let json = serde_json::to_value(&envelope).unwrap_or_default();
        assert_eq!(json["v"], 1);
        assert_eq!(json["type"], "thing.updated");
        assert_eq!(json["data"]["make"], "Skoda");
        assert_eq!(json["id"].as_str().map(str::len), Some(32));
        let at = json["at"].as_str().unwrap_or_default();
        assert!(chrono::DateTime::parse_from_rfc3339(at).is_ok(), "{at}");
        let back: Envelope<Thing> = serde_json::from_value(json).expect("round trip");
        assert_eq!(back, envelope);
        assert_eq!(channel("p:", "thing.deleted"), "p:events:thing.deleted");
    }

    #[test]
    fn the_registry_decodes_what_it_knows_and_refuses_the_rest() {
        let registry = Registry::new(vec![EventKind::of::<Thing>(UPDATED, |_| Readers::Everyone)])
            .expect("valid");
        let payload = serde_json::to_vec(&Envelope::new(
            UPDATED,
            Thing {
                id: 3,
                make: "x".into(),
            },
        ))
        .unwrap_or_default();
        let decoded = registry.decode(UPDATED, &payload).expect("decodes");
        assert_eq!(decoded.data.downcast_ref::<Thing>().map(|t| t.id), Some(3));
        let other = EventType::new("thing.deleted");
        assert!(matches!(
            registry.decode(other, &payload),
            Err(DecodeError::Unregistered)
        ));
        assert_eq!(registry.get("thing.updated"), Some(UPDATED));
        assert_eq!(registry.get("thing.deleted"), None);
        let wrong = Registry::new(vec![
            EventKind::of::<Thing>(other, |_| Readers::Everyone),
            EventKind::of::<Thing>(UPDATED, |_| Readers::Everyone),
        ])
        .expect("valid");
        assert!(matches!(
            wrong.decode(other, &payload),
            Err(DecodeError::WrongType)
        ));
        assert!(Registry::new(vec![
            EventKind::of::<Thing>(UPDATED, |_| Readers::Everyone),
            EventKind::of::<Thing>(UPDATED, |_| Readers::Everyone)
        ])
        .is_err());
        assert!(
            Registry::new(vec![EventKind::of::<Thing>(EventType::new("a:b"), |_| {
                Readers::Everyone
            })])
            .is_err()
        );
    }

    #[test]
    fn a_cursor_past_every_log_is_refused_at_parse() {
        let registry = Registry::new(vec![EventKind::of::<Thing>(UPDATED, |_| Readers::Everyone)])
            .expect("valid");
        let max = format!("ab12:thing.updated:{}-{}", u64::MAX, u64::MAX);
        let err = Cursor::parse(&max, &registry).expect_err("refused");
        assert!(err.contains("no log reaches"), "{err}");
        let last_second = format!("ab12:thing.updated:{}-0", u64::MAX);
        assert!(Cursor::parse(&last_second, &registry).is_err());
        let fine = format!("ab12:thing.updated:{}-{}", u64::MAX - 1, u64::MAX);
        assert!(Cursor::parse(&fine, &registry).is_ok());
        assert!(Cursor::parse("ab12:thing.updated:1-2-3", &registry).is_err());
    }

    #[test]
    fn a_partitioned_cursor_names_one_event_and_where_every_partition_stood() {
        let registry = Registry::new(vec![EventKind::of::<Thing>(UPDATED, |_| Readers::Everyone)])
            .expect("valid");
        let text = "ab12:thing.updated:1:5-0,7-2,0-0";
        let cursor = Cursor::parse(text, &registry).expect("parses");
        assert_eq!(cursor.partition, 1);
        assert_eq!(cursor.position(), Position { ms: 7, seq: 2 });
        assert_eq!(cursor.positions.len(), 3);
        assert_eq!(cursor.to_string(), text);
        // One partition: the format of a log that was never split, unchanged.
        let single = Cursor::parse("ab12:thing.updated:5-1", &registry).expect("parses");
        assert_eq!((single.partition, single.positions.len()), (0, 1));
        assert_eq!(single.to_string(), "ab12:thing.updated:5-1");
        for bad in [
            "ab12:thing.updated:3:5-0,7-2,0-0",
            "ab12:thing.updated:x:5-0",
            "ab12:thing.updated:0:",
            "ab12:thing.updated:0:5-0,,1-1",
        ] {
            assert!(Cursor::parse(bad, &registry).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_events_of_one_record_share_a_partition_and_records_spread_over_all() {
        let keys = |id: i64| vec![Key::new("ownerId", 1), Key::id(id)];
        assert_eq!(partition_of(&keys(5), 1), 0);
        assert_eq!(partition_of(&keys(5), 8), partition_of(&[Key::id(5)], 8));
        assert_eq!(partition_of(&[], 8), 0);
        let mut seen = std::collections::HashSet::new();
        for id in 0..200 {
            seen.insert(partition_of(&keys(id), 8));
        }
        assert_eq!(seen.len(), 8, "200 records reach every partition");
    }

    #[test]
    fn readers_admit_the_owner_and_staff_of_a_private_record() {
        let owner = Viewer {
            user_id: 7,
            is_staff: false,
        };
        let other = Viewer {
            user_id: 8,
            is_staff: false,
        };
        let staff = Viewer {
            user_id: 9,
            is_staff: true,
        };
        let private = Readers::OwnerAndStaff(Some(7));
        assert!(private.admit(owner) && private.admit(staff) && !private.admit(other));
        let unowned = Readers::OwnerAndStaff(None);
        assert!(unowned.admit(staff) && !unowned.admit(owner));
        assert!(Readers::Everyone.admit(other));
        assert!(Readers::Staff.admit(staff) && !Readers::Staff.admit(owner));
    }

    #[test]
    fn an_unregistered_type_is_read_by_staff_only() {
        let registry = Registry::new(vec![EventKind::of::<Thing>(UPDATED, |_| Readers::Everyone)])
            .expect("valid");
        let data: AnyData = Arc::new(());
        assert_eq!(registry.readers(UPDATED, &data), Readers::Everyone);
        assert_eq!(
            registry.readers(EventType::new("other.updated"), &data),
            Readers::Staff
        );
    }
}
