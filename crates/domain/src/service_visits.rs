//! A car's service visit: the domain's example of a type that belongs to another. Who may read
//! and change one, which lists hold it and where its events are routed all follow from its
//! [`Child`] declaration; nothing here repeats them.

use events::EventType;
use serde::{Deserialize, Serialize};

use crate::{Car, Child, Events, OnParentDelete, Record};

/// A visit as readers see it, with its car as the visit's write found it: the `data` of its
/// events, so a subscription result shows the car without a database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceVisit {
    pub id: i64,
    pub garage: String,
    pub mileage: i64,
    pub notes: String,
    /// `YYYY-MM-DD`.
    pub visited_on: String,
    pub car: Car,
}

#[derive(Debug, Clone)]
pub struct NewServiceVisit {
    pub garage: String,
    pub mileage: i64,
    pub notes: String,
    pub visited_on: String,
}

/// The fields an update sets; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceVisitChanges {
    pub garage: Option<String>,
    pub mileage: Option<i64>,
    pub notes: Option<String>,
    pub visited_on: Option<String>,
}

impl Record for ServiceVisit {
    const NAME: &'static str = "service visit";
    const EVENTS: Events = Events {
        created: EventType::new("service_visit.created"),
        updated: EventType::new("service_visit.updated"),
        deleted: EventType::new("service_visit.deleted"),
    };
    type New = NewServiceVisit;
    type Changes = ServiceVisitChanges;

    fn id(&self) -> i64 {
        self.id
    }
}

impl Child for ServiceVisit {
    type Parent = Car;
    /// A car's history goes with it, and its subscribers hear of each visit's end.
    const ON_PARENT_DELETE: OnParentDelete = OnParentDelete::Cascade;

    fn parent(&self) -> &Car {
        &self.car
    }
}
