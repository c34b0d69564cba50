//! The `cars` table. Every write also inserts its event into the outbox in the same transaction
//! (see [`super::outbox`] and [`crate::repository`]); nothing else writes cars.

use diesel::prelude::*;
use serde::{Deserialize, Serialize};

use super::outbox::{self, NewEvent, PendingEvent};
use super::schema::{cars, users};
use super::{each_backend, run, AnyConnection, DbError, DbPool};

/// A car as readers see it: the reference's fields plus its owner. This is also the `data` of an
/// event envelope, so a subscriber needs no database to show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Car {
    pub id: i64,
    pub make: String,
    pub model: String,
    pub variant: String,
    pub year: String,
    pub owner: Option<Owner>,
}

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
}

/// The fields an update sets; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct CarChanges {
    pub make: Option<String>,
    pub model: Option<String>,
    pub variant: Option<String>,
    pub year: Option<String>,
}

/// Who is writing. Users may change their own cars (staff: any car); the system (the
/// `trigger-event` command) may change any car.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    User(i64),
    System,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("car not found")]
    NotFound,
    #[error("only the car's owner or a staff user may change it")]
    Forbidden,
    #[error("the signed-in user no longer exists or is inactive")]
    UnknownUser,
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Builds the outbox row of a write from the car as written; runs inside the transaction.
pub type EventDraft = Box<dyn FnOnce(&Car) -> Result<NewEvent, diesel::result::Error> + Send>;

type CarRow = (
    i64,
    String,
    String,
    String,
    String,
    Option<(i64, String, bool)>,
);

fn into_car((id, make, model, variant, year, owner): CarRow) -> Car {
    Car {
        id,
        make,
        model,
        variant,
        year,
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
            (users::id, users::username, users::is_staff).nullable(),
        )
    };
}

fn load(conn: &mut AnyConnection, id: i64) -> QueryResult<Option<Car>> {
    cars::table
        .left_join(users::table)
        .filter(cars::id.eq(id))
        .select(car_columns!())
        .first::<CarRow>(conn)
        .optional()
        .map(|row| row.map(into_car))
}

pub async fn find(pool: &DbPool, id: i64) -> Result<Option<Car>, DbError> {
    run(pool, move |conn| load(conn, id)).await
}

/// One page of cars in id order: at most `limit` cars with an id above `after`, whether more
/// follow, and the total number of cars. Keyset pagination stays cheap and stable while cars are
/// added and removed.
pub async fn page(
    pool: &DbPool,
    after: Option<i64>,
    limit: i64,
) -> Result<(Vec<Car>, bool, i64), DbError> {
    run(pool, move |conn| {
        let rows = cars::table
            .left_join(users::table)
            .filter(cars::id.gt(after.unwrap_or(0)))
            .order(cars::id.asc())
            .limit(limit + 1)
            .select(car_columns!())
            .load::<CarRow>(conn)?;
        let has_next = rows.len() as i64 > limit;
        let cars: Vec<Car> = rows
            .into_iter()
            .take(limit as usize)
            .map(into_car)
            .collect();
        let total = cars::table.count().get_result::<i64>(conn)?;
        Ok((cars, has_next, total))
    })
    .await
}

/// Inserts the car owned by `owner_id` together with its event; returns the car and its event.
pub async fn create(
    pool: &DbPool,
    owner_id: i64,
    new: NewCar,
    event: EventDraft,
) -> Result<(Car, PendingEvent), WriteError> {
    transaction(pool, move |conn| {
        if active_user(conn, owner_id)?.is_none() {
            return Ok(Err(WriteError::UnknownUser));
        }
        let id = diesel::insert_into(cars::table)
            .values((
                cars::make.eq(new.make),
                cars::model.eq(new.model),
                cars::variant.eq(new.variant),
                cars::year.eq(new.year),
                cars::owner_id.eq(owner_id),
            ))
            .returning(cars::id)
            .get_result::<i64>(conn)?;
        let car = load(conn, id)?.ok_or(diesel::result::Error::NotFound)?;
        let pending = outbox::insert(conn, event(&car)?)?;
        Ok(Ok((car, pending)))
    })
    .await
}

/// Applies `changes` when `actor` may; returns the updated car and its event.
pub async fn update(
    pool: &DbPool,
    actor: Actor,
    id: i64,
    changes: CarChanges,
    event: EventDraft,
) -> Result<(Car, PendingEvent), WriteError> {
    transaction(pool, move |conn| {
        if let Err(refused) = authorize(conn, actor, id)? {
            return Ok(Err(refused));
        }
        diesel::update(cars::table.filter(cars::id.eq(id)))
            .set((
                changes.make.map(|v| cars::make.eq(v)),
                changes.model.map(|v| cars::model.eq(v)),
                changes.variant.map(|v| cars::variant.eq(v)),
                changes.year.map(|v| cars::year.eq(v)),
                cars::updated_at.eq(super::now()),
            ))
            .execute(conn)?;
        let car = load(conn, id)?.ok_or(diesel::result::Error::NotFound)?;
        let pending = outbox::insert(conn, event(&car)?)?;
        Ok(Ok((car, pending)))
    })
    .await
}

/// Deletes the car when `actor` may; returns it as it was and its event.
pub async fn delete(
    pool: &DbPool,
    actor: Actor,
    id: i64,
    event: EventDraft,
) -> Result<(Car, PendingEvent), WriteError> {
    transaction(pool, move |conn| {
        let car = match authorize(conn, actor, id)? {
            Ok(car) => car,
            Err(refused) => return Ok(Err(refused)),
        };
        diesel::delete(cars::table.filter(cars::id.eq(id))).execute(conn)?;
        let pending = outbox::insert(conn, event(&car)?)?;
        Ok(Ok((car, pending)))
    })
    .await
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

/// `Ok(car)` when `actor` may change car `id`, else the refusal.
fn authorize(
    conn: &mut AnyConnection,
    actor: Actor,
    id: i64,
) -> QueryResult<Result<Car, WriteError>> {
    let is_staff = match actor {
        Actor::System => None,
        Actor::User(user_id) => match active_user(conn, user_id)? {
            Some(is_staff) => Some((user_id, is_staff)),
            None => return Ok(Err(WriteError::UnknownUser)),
        },
    };
    let Some(car) = load(conn, id)? else {
        return Ok(Err(WriteError::NotFound));
    };
    let allowed = match is_staff {
        None => true,
        Some((_, true)) => true,
        Some((user_id, false)) => car.owner.as_ref().is_some_and(|o| o.id == user_id),
    };
    Ok(if allowed {
        Ok(car)
    } else {
        Err(WriteError::Forbidden)
    })
}

/// `Some(is_staff)` for an active user.
fn active_user(conn: &mut AnyConnection, user_id: i64) -> QueryResult<Option<bool>> {
    users::table
        .filter(users::id.eq(user_id))
        .filter(users::is_active.eq(true))
        .select(users::is_staff)
        .first::<bool>(conn)
        .optional()
}

/// Runs `work` in one transaction, rolled back when it returns a refusal (the inner `Err`).
async fn transaction<T, F>(pool: &DbPool, work: F) -> Result<T, WriteError>
where
    T: Send + 'static,
    F: FnOnce(&mut AnyConnection) -> QueryResult<Result<T, WriteError>> + Send + 'static,
{
    run(pool, move |conn| {
        let mut refusal = None;
        let outcome = super::write_transaction(conn, |conn| match work(conn)? {
            Ok(value) => Ok(Some(value)),
            Err(refused) => {
                refusal = Some(refused);
                Err(diesel::result::Error::RollbackTransaction)
            }
        });
        match (outcome, refusal) {
            (_, Some(refused)) => Ok(Err(refused)),
            (Ok(Some(value)), None) => Ok(Ok(value)),
            (Ok(None), None) => Err(diesel::result::Error::NotFound),
            (Err(err), None) => Err(err),
        }
    })
    .await
    .map_err(WriteError::Db)?
}
