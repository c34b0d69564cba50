//! [`ServiceVisit`] in the schema: its object, its page, and the inputs of its writes.

use domain::{NewServiceVisit, ServiceVisit, ServiceVisitChanges};
use juniper::{graphql_object, GraphQLInputObject, ID};

use crate::{date, non_negative, required_text, text, CarObject, Context, GraphQLError};

pub struct ServiceVisitObject(pub ServiceVisit);

/// A car's service visit.
#[graphql_object(name = "ServiceVisit", context = Context)]
impl ServiceVisitObject {
    fn id(&self) -> ID {
        ID::new(self.0.id.to_string())
    }

    fn garage(&self) -> &str {
        &self.0.garage
    }

    /// Kilometres on the odometer.
    fn mileage(&self) -> i32 {
        i32::try_from(self.0.mileage).unwrap_or(i32::MAX)
    }

    fn notes(&self) -> &str {
        &self.0.notes
    }

    /// `YYYY-MM-DD`.
    fn visited_on(&self) -> &str {
        &self.0.visited_on
    }

    /// The car, as of this version of the visit: in a subscription result, as the visit's
    /// write found it.
    fn car(&self) -> CarObject {
        CarObject(self.0.car.clone())
    }
}

page_object!(
    /// One page of a car's service visits, in id order.
    ServiceVisitPage,
    ServiceVisit,
    ServiceVisitObject
);

#[derive(GraphQLInputObject)]
pub struct ServiceVisitInput {
    pub garage: String,
    /// Kilometres on the odometer, 0 or more.
    pub mileage: i32,
    /// Empty when left out.
    pub notes: Option<String>,
    /// `YYYY-MM-DD`.
    pub visited_on: String,
}

impl ServiceVisitInput {
    pub(crate) fn validate(self) -> Result<NewServiceVisit, GraphQLError> {
        Ok(NewServiceVisit {
            garage: required_text("garage", self.garage)?,
            mileage: non_negative("mileage", self.mileage)?,
            notes: text("notes", self.notes.unwrap_or_default())?,
            visited_on: date("visitedOn", self.visited_on)?,
        })
    }
}

/// Fields to change; those left out keep their value.
#[derive(GraphQLInputObject)]
pub struct ServiceVisitPatch {
    pub garage: Option<String>,
    pub mileage: Option<i32>,
    pub notes: Option<String>,
    pub visited_on: Option<String>,
}

impl ServiceVisitPatch {
    pub(crate) fn validate(self) -> Result<ServiceVisitChanges, GraphQLError> {
        Ok(ServiceVisitChanges {
            garage: self
                .garage
                .map(|v| required_text("garage", v))
                .transpose()?,
            mileage: self
                .mileage
                .map(|v| non_negative("mileage", v))
                .transpose()?,
            notes: self.notes.map(|v| text("notes", v)).transpose()?,
            visited_on: self.visited_on.map(|v| date("visitedOn", v)).transpose()?,
        })
    }
}
