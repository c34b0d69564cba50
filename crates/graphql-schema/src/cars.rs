//! [`Car`] in the schema: its object, its page, and the inputs of its writes.

use domain::{Car, CarChanges, NewCar};
use juniper::{graphql_object, GraphQLInputObject, ID};

use crate::{required_text, text, Context, GraphQLError, User};

/// [`Car`] as the schema shows it (juniper's traits cannot be implemented on another crate's
/// type, so each domain type has its object wrapper).
pub struct CarObject(pub Car);

/// A car, with the reference's fields.
#[graphql_object(name = "Car", context = Context)]
impl CarObject {
    fn id(&self) -> ID {
        ID::new(self.0.id.to_string())
    }

    fn make(&self) -> &str {
        &self.0.make
    }

    fn model(&self) -> &str {
        &self.0.model
    }

    fn variant(&self) -> &str {
        &self.0.variant
    }

    fn year(&self) -> &str {
        &self.0.year
    }

    /// Visible to its owner and staff only.
    fn private(&self) -> bool {
        self.0.private
    }

    /// Who may change it (besides staff); none for the demo fixture's Car 1.
    fn owner(&self) -> Option<User> {
        self.0.owner.clone().map(User)
    }
}

page_object!(
    /// One page of cars, in id order.
    CarPage,
    Car,
    CarObject
);

#[derive(GraphQLInputObject)]
pub struct CarInput {
    pub make: String,
    pub model: String,
    /// Empty when left out.
    pub variant: Option<String>,
    /// Empty when left out.
    pub year: Option<String>,
    /// Visible to its owner and staff only; false when left out.
    pub private: Option<bool>,
}

impl CarInput {
    pub(crate) fn validate(self) -> Result<NewCar, GraphQLError> {
        Ok(NewCar {
            make: required_text("make", self.make)?,
            model: required_text("model", self.model)?,
            variant: text("variant", self.variant.unwrap_or_default())?,
            year: text("year", self.year.unwrap_or_default())?,
            private: self.private.unwrap_or(false),
        })
    }
}

/// Fields to change; those left out keep their value.
#[derive(GraphQLInputObject)]
pub struct CarPatch {
    pub make: Option<String>,
    pub model: Option<String>,
    pub variant: Option<String>,
    pub year: Option<String>,
    pub private: Option<bool>,
}

impl CarPatch {
    pub(crate) fn validate(self) -> Result<CarChanges, GraphQLError> {
        Ok(CarChanges {
            make: self.make.map(|v| required_text("make", v)).transpose()?,
            model: self.model.map(|v| required_text("model", v)).transpose()?,
            variant: self.variant.map(|v| text("variant", v)).transpose()?,
            year: self.year.map(|v| text("year", v)).transpose()?,
            private: self.private,
        })
    }
}
