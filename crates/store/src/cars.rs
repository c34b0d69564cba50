//! The `cars` table: [`Car`]'s SQL for the generic write path ([`crate::records`]), which adds
//! the authorization and the event of every write, and the demo fixture.

use diesel::prelude::*;
use domain::{Car, CarChanges, NewCar, NoParent, Owner, Viewer};

use super::records::Table;
use super::schema::users;
use super::{each_backend, run, AnyConnection, DbError, DbPool};

// Declared here rather than in schema.rs: a domain type's table is its own file's business.
diesel::table! {
    cars (id) {
        id -> Int8,
        make -> Varchar,
        model -> Varchar,
        variant -> Varchar,
        year -> Varchar,
        private -> Bool,
        owner_id -> Nullable<Int8>,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::joinable!(cars -> users (owner_id));
diesel::allow_tables_to_appear_in_same_query!(cars, users);

type CarRow = (
    i64,
    String,
    String,
    String,
    String,
    bool,
    Option<(i64, String, bool)>,
);

fn into_car((id, make, model, variant, year, private, owner): CarRow) -> Car {
    Car {
        id,
        make,
        model,
        variant,
        year,
        private,
        owner: owner.map(|(id, username, is_staff)| Owner {
            id,
            username,
            is_staff,
        }),
    }
}

macro_rules! car_columns {
    () => {
        (
            cars::id,
            cars::make,
            cars::model,
            cars::variant,
            cars::year,
            cars::private,
            (users::id, users::username, users::is_staff).nullable(),
        )
    };
}

impl Table for Car {
    fn load(conn: &mut AnyConnection, id: i64) -> QueryResult<Option<Car>> {
        cars::table
            .left_join(users::table)
            .filter(cars::id.eq(id))
            .select(car_columns!())
            .first::<CarRow>(conn)
            .optional()
            .map(|row| row.map(into_car))
    }

    fn load_page(
        conn: &mut AnyConnection,
        viewer: Viewer,
        _: &NoParent,
        after: i64,
        limit: i64,
    ) -> QueryResult<Vec<Car>> {
        let rows = cars::table
            .left_join(users::table)
            .filter(cars::id.gt(after))
            .order(cars::id.asc())
            .limit(limit)
            .select(car_columns!());
        if viewer.is_staff {
            rows.load::<CarRow>(conn)
        } else {
            rows.filter(readable_by(viewer.user_id))
                .load::<CarRow>(conn)
        }
        .map(|rows| rows.into_iter().map(into_car).collect())
    }

    fn count(conn: &mut AnyConnection, viewer: Viewer, _: &NoParent) -> QueryResult<i64> {
        if viewer.is_staff {
            cars::table.count().get_result(conn)
        } else {
            cars::table
                .filter(readable_by(viewer.user_id))
                .count()
                .get_result(conn)
        }
    }

    fn insert(
        conn: &mut AnyConnection,
        owner_id: i64,
        _: &NoParent,
        new: NewCar,
    ) -> QueryResult<i64> {
        diesel::insert_into(cars::table)
            .values((
                cars::make.eq(new.make),
                cars::model.eq(new.model),
                cars::variant.eq(new.variant),
                cars::year.eq(new.year),
                cars::private.eq(new.private),
                cars::owner_id.eq(owner_id),
            ))
            .returning(cars::id)
            .get_result(conn)
    }

    fn update(conn: &mut AnyConnection, id: i64, changes: CarChanges) -> QueryResult<()> {
        diesel::update(cars::table.filter(cars::id.eq(id)))
            .set((
                changes.make.map(|v| cars::make.eq(v)),
                changes.model.map(|v| cars::model.eq(v)),
                changes.variant.map(|v| cars::variant.eq(v)),
                changes.year.map(|v| cars::year.eq(v)),
                changes.private.map(|v| cars::private.eq(v)),
                cars::updated_at.eq(super::now()),
            ))
            .execute(conn)
            .map(|_| ())
    }

    fn delete(conn: &mut AnyConnection, id: i64) -> QueryResult<()> {
        diesel::delete(cars::table.filter(cars::id.eq(id)))
            .execute(conn)
            .map(|_| ())
    }
}

/// `Car::readers` for a user who is not staff, in SQL: public, or its own.
fn readable_by(
    user_id: i64,
) -> diesel::dsl::Or<diesel::dsl::Eq<cars::private, bool>, diesel::dsl::Eq<cars::owner_id, i64>> {
    cars::private.eq(false).or(cars::owner_id.eq(user_id))
}

/// The staff user `admin` (password `letmein`) when absent, and the reference's fixture cars:
/// Car 1 Skoda Octavia Scout 2011 (no owner: staff may change it) and Car 2 Skoda Octavia Tour
/// 2007 owned by `admin`. Existing rows are left alone. Demo mode only.
pub async fn seed_demo(pool: &DbPool) -> Result<(), DbError> {
    run(pool, |conn| {
        super::write_transaction(conn, |conn| {
            each_backend!(conn, |conn| diesel::insert_into(users::table)
                .values((
                    users::username.eq(DEMO_USERNAME),
                    users::password_hash.eq(DEMO_PASSWORD_HASH),
                    users::is_active.eq(true),
                    users::is_staff.eq(true),
                ))
                .on_conflict(users::username)
                .do_nothing()
                .execute(conn))?;
            let admin_id = users::table
                .filter(users::username.eq(DEMO_USERNAME))
                .select(users::id)
                .first::<i64>(conn)?;
            for (id, variant, year, owner) in [
                (1_i64, "Scout", "2011", None),
                (2_i64, "Tour", "2007", Some(admin_id)),
            ] {
                let row = (
                    cars::id.eq(id),
                    cars::make.eq("Skoda"),
                    cars::model.eq("Octavia"),
                    cars::variant.eq(variant),
                    cars::year.eq(year),
                    cars::owner_id.eq(owner),
                );
                each_backend!(conn, |conn| diesel::insert_into(cars::table)
                    .values(row)
                    .on_conflict(cars::id)
                    .do_nothing()
                    .execute(conn))?;
            }
            // Explicit ids do not advance PostgreSQL's sequence; without this the next createCar
            // would collide with Car 1. (SQLite's AUTOINCREMENT follows the largest id by itself.)
            if let AnyConnection::Postgresql(conn) = conn {
                diesel::sql_query(
                    "SELECT setval(pg_get_serial_sequence('cars', 'id'), \
                     GREATEST((SELECT MAX(id) FROM cars), 1))",
                )
                .execute(conn)?;
            }
            Ok(())
        })
    })
    .await
}

/// The demo user, as auth-service's demo mode creates it; seeded here too so that the demo cars
/// have their owner whichever service starts first.
pub const DEMO_USERNAME: &str = "admin";

/// argon2id hash of `letmein` (PHC string, the parameters auth-service uses).
const DEMO_PASSWORD_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$qwFI03M6+nW5uwQVKAyNCA$kTvLILVo1M/VrLWgttMf5cmliYn2Xwr1qP+z48UuQ9s";
