//! The domain: the types the product serves ([`Car`]), what a write of one is ([`Record`]), and
//! the interfaces through which the GraphQL schema reads and writes them ([`Repository`],
//! [`Accounts`]). No storage and no GraphQL here: the store implements these interfaces with
//! diesel, the schema calls them, and the gateway (which only needs the event types) links
//! neither.
//!
//! A type is served once it is named in [`register!`] below. That one line makes it
//! [`Registered`], which both the store's write path and the schema's subscription streams
//! require, so a type that is written but not registered does not compile; and it adds the
//! type's events to [`registry()`], from which every gateway learns which logs to read.

pub mod cars;
pub mod service_visits;

use std::fmt;

use events::{AnyData, EventKind, EventType, Key, Registry};
pub use events::{Readers, Viewer};
use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use cars::{Car, CarChanges, NewCar, Owner};
pub use service_visits::{NewServiceVisit, ServiceVisit, ServiceVisitChanges};

/// The events of a type's writes: one per kind of change.
#[derive(Debug, Clone, Copy)]
pub struct Events {
    pub created: EventType,
    pub updated: EventType,
    /// The envelope carries the value as it was before the deletion.
    pub deleted: EventType,
}

impl Events {
    pub fn all(&self) -> [EventType; 3] {
        [self.created, self.updated, self.deleted]
    }
}

/// A domain type whose writes are events: a row in its table, an object in the schema, and
/// the `data` of its envelopes. Besides this, a type is either a [`Root`] (it has an owner and a
/// read rule of its own) or a [`Child`] (it belongs to a record of another type, whose rules are
/// its rules); [`register!`] requires one of the two.
pub trait Record:
    Clone + fmt::Debug + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// How messages name it ("car not found"); also the field of the key its children's events
    /// are routed by ([`Registered::keys`]).
    const NAME: &'static str;
    const EVENTS: Events;
    /// What creating one takes.
    type New: Send + 'static;
    /// What an update sets. The default value sets nothing: an update with it is a no-op that
    /// answers the record as it is (no write, no event).
    type Changes: Default + PartialEq + Send + 'static;

    fn id(&self) -> i64;
}

/// A type of its own: its records have an owner and a read rule.
pub trait Root: Record {
    /// The user who may change it besides staff; `None`: staff only.
    fn owner_id(&self) -> Option<i64>;

    /// Who may read it, as this version of it shows it: the one read rule of the type, asked
    /// by every read (a query, the record a write returns, each live or replayed event, for
    /// each subscriber). No default: a type says `Readers::Everyone` if that is what it means.
    /// The store's lists filter by the same rule in SQL ([`Repository::page`]), which its tests
    /// hold to this one.
    fn readers(&self) -> Readers;
}

/// A type that belongs to another (a service visit to a car): whoever may change its parent
/// may create, change and delete it, whoever may read its parent may read it, lists of it are
/// lists of one parent's, and its events are routed by its parent's id too. None of that is
/// the type's to write: the write path, the reads and the gateway derive it from here.
pub trait Child: Record {
    /// The registered type it belongs to.
    type Parent: Registered;
    /// What deleting its parent does to it. No default: a cascade that loses events, or a
    /// deletion that fails on a foreign key, is not something to find out in production.
    const ON_PARENT_DELETE: OnParentDelete;

    /// Its parent as of this version of it. A child's value carries its parent, read in the
    /// same transaction as the write: so a subscription result resolves the relation without
    /// a database, and the gateway knows who may read the event.
    fn parent(&self) -> &Self::Parent;
}

/// What deleting a parent does to its children.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnParentDelete {
    /// They are deleted with it, in the same transaction, each with its `deleted` event.
    Cascade,
    /// The parent cannot be deleted while it has any (`WriteError::HasChildren`).
    Refuse,
}

/// The parent of a [`Root`] type: none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoParent;

/// [`Registered::keys`] of an event's decoded data, as the registry calls it.
fn keys_of<T: Registered>(data: &AnyData) -> Vec<Key> {
    data.downcast_ref::<T>().map(T::keys).unwrap_or_default()
}

/// [`Registered::readers`] of an event's decoded data, as the registry calls it.
fn readers_of<T: Registered>(data: &AnyData) -> Readers {
    data.downcast_ref::<T>().map_or(Readers::Staff, T::readers)
}

mod sealed {
    pub trait Sealed {}
    /// Implemented by [`register!`] for a child listed under its parent.
    pub trait ListedUnder<P> {}
}

/// A [`Record`] named in [`register!`]: only that macro implements this, so the write path and
/// the subscription streams, which require it, cannot serve a type whose events no gateway
/// would read. Its rules are the type's own ([`Root`]) or its parent's ([`Child`]), chosen by
/// the macro, so that no generic code asks a child for a rule it does not have.
pub trait Registered: Record + sealed::Sealed {
    /// [`NoParent`] for a root type, or [`Child::Parent`].
    type Parent: Send + Sync + 'static;
    /// The registered types that belong to it, as a tuple: `()`, `(ServiceVisit,)`.
    type Children: 'static;
    /// The parent type's [`Record::NAME`] (for messages and routing keys); empty for a root type.
    const PARENT: &'static str;

    /// Who may change it besides staff.
    fn owner_id(&self) -> Option<i64>;
    /// Who may read it.
    fn readers(&self) -> Readers;
    /// What its events are routed by: its own id, so that a subscription to one record costs
    /// the gateway nothing for the others; for a child, its parent's too (`car=7`), so that
    /// "every visit of car 7" is routed as well.
    fn keys(&self) -> Vec<Key>;

    /// Whether `viewer` may read it.
    fn readable_by(&self, viewer: Viewer) -> bool {
        self.readers().admit(viewer)
    }
}

/// The key a child's events are routed by for its parent `P`'s record `id`: a subscription to
/// "the visits of car 7" asks for `parent_key::<Car>(7)`.
pub fn parent_key<P: Record>(id: i64) -> Key {
    Key::new(P::NAME, id)
}

/// Who is writing. Users may change what they own (staff: anything); the system (the
/// `trigger-event` command) may change anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    User(i64),
    System,
}

/// Why storage could not answer, without saying which storage.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("no database connection available: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Failed(String),
}

/// Why a write did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// Also when the writer may not read it: a private record is not found by others, rather
    /// than forbidden, which would say that it exists.
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("only the owner or a staff user may change this {0}")]
    Forbidden(&'static str),
    #[error("the signed-in user no longer exists or is inactive")]
    UnknownUser,
    /// A parent whose children refuse its deletion ([`OnParentDelete::Refuse`]).
    #[error("the {parent} still has {count} {child} record(s); delete them first")]
    HasChildren {
        parent: &'static str,
        child: &'static str,
        count: i64,
    },
    /// The request's `Idempotency-Key` was used before for another request.
    #[error("this Idempotency-Key was used for another request; use a new key for a new request")]
    IdempotencyKeyReused,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One page of a type, in id order.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub has_next_page: bool,
    /// All of them, not only this page's.
    pub total_count: i64,
}

/// Reads and writes of one type. Every write commits the change and its event together and
/// publishes the event after the commit.
/// Reads are for a `reader`, the signed-in user's id: only what [`Record::readers`] admits for
/// it (whether it is staff is the database's answer, read in the same connection).
pub trait Repository<T: Registered>: Send + Sync {
    /// None also when `reader` may not read it.
    fn find(&self, reader: i64, id: i64) -> BoxFuture<'_, Result<Option<T>, StoreError>>;
    /// At most `first` after the id `after` of those `reader` may read, in id order; the
    /// total counts those too. A child type's are those of one `parent` (an empty page when
    /// `reader` may not read it); a root type's take no parent (`None`).
    fn page(
        &self,
        reader: i64,
        parent: Option<i64>,
        after: Option<i64>,
        first: i64,
    ) -> BoxFuture<'_, Result<Page<T>, StoreError>>;
    /// Creates one owned by the active user `owner_id`; a child in the record `parent`, which
    /// `owner_id` must be allowed to change (a root type takes `None`).
    fn create(
        &self,
        owner_id: i64,
        parent: Option<i64>,
        new: T::New,
    ) -> BoxFuture<'_, Result<T, WriteError>>;
    fn update(
        &self,
        actor: Actor,
        id: i64,
        changes: T::Changes,
    ) -> BoxFuture<'_, Result<T, WriteError>>;
    /// Returns it as it was.
    fn delete(&self, actor: Actor, id: i64) -> BoxFuture<'_, Result<T, WriteError>>;
}

/// The users, as the schema sees them.
pub trait Accounts: Send + Sync {
    /// The user `id` when active.
    fn active_user(&self, id: i64) -> BoxFuture<'_, Result<Option<Owner>, StoreError>>;
}

/// Registers the domain's types: makes each [`Registered`] with the rules of a [`Root`] or of
/// its parent for a [`Child`] (`ServiceVisit in Car`), lists their events in [`registry()`], and
/// makes [`DataSource`] every interface the schema needs. Each type lists the types that belong
/// to it (`=> [ServiceVisit]`), which a deletion of one of its records takes care of; a child
/// registered under a parent that does not list it, or a type named in the wrong place, does
/// not compile.
macro_rules! register {
    ($($record:ident $(in $parent:ident)? => [$($child:ident),* $(,)?]),+ $(,)?) => {
        $(
            impl sealed::Sealed for $record {}
            $(impl sealed::ListedUnder<$record> for $child {})*
            register!(@rules $record $(in $parent)? => [$($child),*]);
        )+

        /// Every event type of the domain, with its decoder. An error names a type registered
        /// twice (a process refuses to start with it).
        pub fn registry() -> Result<Registry, String> {
            let mut kinds = Vec::new();
            $(
                kinds.extend(<$record as Record>::EVENTS.all().map(|event_type| {
                    EventKind::of::<$record>(event_type, readers_of::<$record>)
                        .routed_by(keys_of::<$record>)
                        .with_state(event_type == <$record as Record>::EVENTS.updated)
                }));
            )+
            Registry::new(kinds)
        }

        /// What the schema reads and writes through: the accounts and a repository per type.
        pub trait DataSource: Accounts $(+ Repository<$record>)+ {}

        impl<S: Accounts $(+ Repository<$record>)+> DataSource for S {}
    };
    (@rules $record:ident => [$($child:ident),*]) => {
        impl Registered for $record {
            type Parent = NoParent;
            type Children = ($($child,)*);
            const PARENT: &'static str = "";

            fn owner_id(&self) -> Option<i64> {
                Root::owner_id(self)
            }
            fn readers(&self) -> Readers {
                Root::readers(self)
            }
            fn keys(&self) -> Vec<Key> {
                vec![Key::id(self.id())]
            }
        }
    };
    (@rules $record:ident in $parent:ident => [$($child:ident),*]) => {
        impl Registered for $record
        where
            $record: Child<Parent = $parent> + sealed::ListedUnder<$parent>,
        {
            type Parent = $parent;
            type Children = ($($child,)*);
            const PARENT: &'static str = <$parent as Record>::NAME;

            fn owner_id(&self) -> Option<i64> {
                Registered::owner_id(self.parent())
            }
            fn readers(&self) -> Readers {
                Registered::readers(self.parent())
            }
            fn keys(&self) -> Vec<Key> {
                let parent = self.parent();
                vec![Key::id(self.id()), parent_key::<$parent>(parent.id())]
            }
        }
    };
}

register! {
    Car => [ServiceVisit],
    ServiceVisit in Car => [],
}

#[cfg(test)]
mod tests {
    use super::{Car, Readers, Record as _, ServiceVisit, Viewer};
    use events::{AnyData, Key};

    fn car(private: bool) -> Car {
        Car {
            id: 7,
            make: "Skoda".into(),
            model: "Octavia".into(),
            variant: String::new(),
            year: String::new(),
            private,
            owner: Some(super::Owner {
                id: 3,
                username: "alice".into(),
                is_staff: false,
            }),
        }
    }

    #[test]
    fn every_registered_event_type_is_known_once() {
        let registry = super::registry().expect("no event type is registered twice");
        let names: Vec<&str> = registry.event_types().map(|t| t.as_str()).collect();
        assert_eq!(
            names,
            [
                "car.created",
                "car.updated",
                "car.deleted",
                "service_visit.created",
                "service_visit.updated",
                "service_visit.deleted"
            ]
        );
    }

    #[test]
    fn a_cars_events_are_routed_by_its_id() {
        let registry = super::registry().expect("valid");
        let data: AnyData = std::sync::Arc::new(car(false));
        for event_type in Car::EVENTS.all() {
            assert_eq!(registry.keys(event_type, &data), [Key::id(7)]);
        }
    }

    /// Only a record's own `updated` events, to a subscription keyed by its id, supersede one
    /// another: a visit's update does not supersede another visit's of the same car.
    #[test]
    fn only_updates_of_one_record_supersede_each_other() {
        let registry = super::registry().expect("valid");
        for events in [Car::EVENTS, ServiceVisit::EVENTS] {
            assert!(registry.supersedes(events.updated, Some(Key::id(7))));
            assert!(!registry.supersedes(events.updated, None));
            assert!(!registry.supersedes(events.created, Some(Key::id(7))));
            assert!(!registry.supersedes(events.deleted, Some(Key::id(7))));
        }
        assert!(!registry.supersedes(ServiceVisit::EVENTS.updated, Some(Key::new("car", 7))));
    }

    /// A child's events are routed by its parent too, and read by whom its parent is read by.
    #[test]
    fn a_visits_rules_are_its_cars() {
        let registry = super::registry().expect("valid");
        for private in [false, true] {
            let visit = ServiceVisit {
                id: 40,
                garage: "Garage".into(),
                mileage: 1000,
                notes: String::new(),
                visited_on: "2026-12-04".into(),
                car: car(private),
            };
            let data: AnyData = std::sync::Arc::new(visit);
            for event_type in ServiceVisit::EVENTS.all() {
                assert_eq!(
                    registry.keys(event_type, &data),
                    [Key::new("car", 7), Key::id(40)]
                );
                let readers = registry.readers(event_type, &data);
                let expected = if private {
                    Readers::OwnerAndStaff(Some(3))
                } else {
                    Readers::Everyone
                };
                assert_eq!(readers, expected);
                let stranger = Viewer {
                    user_id: 4,
                    is_staff: false,
                };
                assert_eq!(readers.admit(stranger), !private);
            }
        }
    }
}
