//! The `service_visits` table: [`ServiceVisit`]'s SQL. Its parent's rules, lists and deletion
//! are the generic path's ([`crate::records`]).

use diesel::prelude::*;
use domain::{Car, NewServiceVisit, ServiceVisit, ServiceVisitChanges, Viewer};

use super::records::Table;
use super::AnyConnection;

diesel::table! {
    service_visits (id) {
        id -> Int8,
        car_id -> Int8,
        garage -> Varchar,
        mileage -> Int8,
        notes -> Text,
        visited_on -> Varchar,
        created_at -> Timestamp,
    }
}

/// Every column, in order (`created_at` is the table's own).
type Row = (i64, i64, String, i64, String, String, chrono::NaiveDateTime);

fn visit((id, _, garage, mileage, notes, visited_on, _): Row, car: Car) -> ServiceVisit {
    ServiceVisit {
        id,
        garage,
        mileage,
        notes,
        visited_on,
        car,
    }
}

impl Table for ServiceVisit {
    fn load(conn: &mut AnyConnection, id: i64) -> QueryResult<Option<Self>> {
        let Some(row) = service_visits::table
            .find(id)
            .first::<Row>(conn)
            .optional()?
        else {
            return Ok(None);
        };
        let car = Car::load(conn, row.1)?.ok_or(diesel::result::Error::NotFound)?;
        Ok(Some(visit(row, car)))
    }

    fn load_page(
        conn: &mut AnyConnection,
        _: Viewer,
        car: &Car,
        after: i64,
        limit: i64,
    ) -> QueryResult<Vec<Self>> {
        let rows = service_visits::table
            .filter(service_visits::car_id.eq(car.id))
            .filter(service_visits::id.gt(after))
            .order(service_visits::id.asc())
            .limit(limit)
            .load::<Row>(conn)?;
        Ok(rows
            .into_iter()
            .map(|row| visit(row, car.clone()))
            .collect())
    }

    fn count(conn: &mut AnyConnection, _: Viewer, car: &Car) -> QueryResult<i64> {
        service_visits::table
            .filter(service_visits::car_id.eq(car.id))
            .count()
            .get_result(conn)
    }

    fn insert(
        conn: &mut AnyConnection,
        _: i64,
        car: &Car,
        new: NewServiceVisit,
    ) -> QueryResult<i64> {
        diesel::insert_into(service_visits::table)
            .values((
                service_visits::car_id.eq(car.id),
                service_visits::garage.eq(new.garage),
                service_visits::mileage.eq(new.mileage),
                service_visits::notes.eq(new.notes),
                service_visits::visited_on.eq(new.visited_on),
            ))
            .returning(service_visits::id)
            .get_result(conn)
    }

    fn update(conn: &mut AnyConnection, id: i64, changes: ServiceVisitChanges) -> QueryResult<()> {
        diesel::update(service_visits::table.find(id))
            .set((
                changes.garage.map(|v| service_visits::garage.eq(v)),
                changes.mileage.map(|v| service_visits::mileage.eq(v)),
                changes.notes.map(|v| service_visits::notes.eq(v)),
                changes.visited_on.map(|v| service_visits::visited_on.eq(v)),
            ))
            .execute(conn)
            .map(|_| ())
    }

    fn delete(conn: &mut AnyConnection, id: i64) -> QueryResult<()> {
        diesel::delete(service_visits::table.find(id))
            .execute(conn)
            .map(|_| ())
    }
}
