//! The car, the reference's domain type.

use events::EventType;
use serde::{Deserialize, Serialize};

use crate::{Events, Readers, Record, Root};

/// A car as readers see it: the reference's fields plus its owner. This is also the `data` of an
/// event envelope, so a subscriber needs no database to show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Car {
    pub id: i64,
    pub make: String,
    pub model: String,
    pub variant: String,
    pub year: String,
    /// Visible to its owner and staff only. Absent from events written before it existed,
    /// which were all of public cars.
    #[serde(default)]
    pub private: bool,
    pub owner: Option<Owner>,
}

/// A user as others see it: a car's owner, or the caller (`me`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub id: i64,
    pub username: String,
    pub is_staff: bool,
}

#[derive(Debug, Clone)]
pub struct NewCar {
    pub make: String,
    pub model: String,
    pub variant: String,
    pub year: String,
    pub private: bool,
}

/// The fields an update sets; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CarChanges {
    pub make: Option<String>,
    pub model: Option<String>,
    pub variant: Option<String>,
    pub year: Option<String>,
    pub private: Option<bool>,
}

impl Record for Car {
    const NAME: &'static str = "car";
    const EVENTS: Events = Events {
        created: EventType::new("car.created"),
        updated: EventType::new("car.updated"),
        deleted: EventType::new("car.deleted"),
    };
    type New = NewCar;
    type Changes = CarChanges;

    fn id(&self) -> i64 {
        self.id
    }
}

impl Root for Car {
    fn owner_id(&self) -> Option<i64> {
        self.owner.as_ref().map(|owner| owner.id)
    }

    /// A public car is everyone's to read; a private one its owner's and staff's.
    fn readers(&self) -> Readers {
        if self.private {
            Readers::OwnerAndStaff(self.owner_id())
        } else {
            Readers::Everyone
        }
    }
}
