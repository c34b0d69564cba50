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

use std::fmt;

use events::{AnyData, EventKind, EventType, Key, Registry};
pub use events::{Readers, Viewer};
use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use cars::{Car, CarChanges, NewCar, Owner};

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
/// the `data` of its envelopes.
pub trait Record:
    Clone + fmt::Debug + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// How messages name it: "car not found".
    const NAME: &'static str;
    const EVENTS: Events;
    /// What creating one takes.
    type New: Send + 'static;
    /// What an update sets.
    type Changes: Send + 'static;

    fn id(&self) -> i64;
    /// The user who may change it besides staff; `None`: staff only.
    fn owner_id(&self) -> Option<i64>;

    /// Who may read it, as this version of it shows it: the one read rule of the type, asked
    /// by every read (a query, the record a write returns, each live or replayed event, for
    /// each subscriber). No default: a type says `Readers::Everyone` if that is what it means.
    /// The store's lists filter by the same rule in SQL ([`Repository::page`]), which its tests
    /// hold to this one.
    fn readers(&self) -> Readers;

    /// Whether `viewer` may read it.
    fn readable_by(&self, viewer: Viewer) -> bool {
        self.readers().admit(viewer)
    }

    /// What its events are routed by: its own id, so that a subscription to one record costs
    /// the gateway nothing for the others. A type that belongs to another adds the parent's id
    /// (`Key::new("car", self.car_id)`), so that "every visit of car 7" is routed too.
    fn keys(&self) -> Vec<Key> {
        vec![Key::id(self.id())]
    }
}

/// [`Record::keys`] of an event's decoded data, as the registry calls it.
fn keys_of<T: Record>(data: &AnyData) -> Vec<Key> {
    data.downcast_ref::<T>().map(T::keys).unwrap_or_default()
}

/// [`Record::readers`] of an event's decoded data, as the registry calls it.
fn readers_of<T: Record>(data: &AnyData) -> Readers {
    data.downcast_ref::<T>().map_or(Readers::Staff, T::readers)
}

mod sealed {
    pub trait Sealed {}
}

/// A [`Record`] named in [`register!`]: only that macro implements this, so the write path and
/// the subscription streams, which require it, cannot serve a type whose events no gateway
/// would read.
pub trait Registered: Record + sealed::Sealed {}

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
    #[error("only the {0}'s owner or a staff user may change it")]
    Forbidden(&'static str),
    #[error("the signed-in user no longer exists or is inactive")]
    UnknownUser,
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
    /// total counts those too.
    fn page(
        &self,
        reader: i64,
        after: Option<i64>,
        first: i64,
    ) -> BoxFuture<'_, Result<Page<T>, StoreError>>;
    /// Creates one owned by the active user `owner_id`.
    fn create(&self, owner_id: i64, new: T::New) -> BoxFuture<'_, Result<T, WriteError>>;
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

/// Registers the domain's types: makes each [`Registered`], lists their events in
/// [`registry()`], and makes [`DataSource`] every interface the schema needs.
macro_rules! register {
    ($($record:ty),+ $(,)?) => {
        $(
            impl sealed::Sealed for $record {}
            impl Registered for $record {}
        )+

        /// Every event type of the domain, with its decoder. An error names a type registered
        /// twice (a process refuses to start with it).
        pub fn registry() -> Result<Registry, String> {
            let mut kinds = Vec::new();
            $(
                kinds.extend(<$record as Record>::EVENTS.all().map(|event_type| {
                    EventKind::of::<$record>(event_type, readers_of::<$record>)
                        .routed_by(keys_of::<$record>)
                }));
            )+
            Registry::new(kinds)
        }

        /// What the schema reads and writes through: the accounts and a repository per type.
        pub trait DataSource: Accounts $(+ Repository<$record>)+ {}

        impl<S: Accounts $(+ Repository<$record>)+> DataSource for S {}
    };
}

register!(Car);

#[cfg(test)]
mod tests {
    #[test]
    fn every_registered_event_type_is_known_once() {
        let registry = super::registry().expect("no event type is registered twice");
        let names: Vec<&str> = registry.event_types().map(|t| t.as_str()).collect();
        assert_eq!(names, ["car.created", "car.updated", "car.deleted"]);
    }

    #[test]
    fn a_cars_events_are_routed_by_its_id() {
        use super::{Car, Record as _};
        let registry = super::registry().expect("valid");
        let car = Car {
            id: 7,
            make: "Skoda".into(),
            model: "Octavia".into(),
            variant: String::new(),
            year: String::new(),
            private: false,
            owner: None,
        };
        let data: events::AnyData = std::sync::Arc::new(car);
        for event_type in Car::EVENTS.all() {
            assert_eq!(registry.keys(event_type, &data), [events::Key::id(7)]);
        }
    }
}
