//! The `users` table.

use chrono::NaiveDateTime;
use diesel::prelude::*;

use super::schema::users;
use super::{each_backend, run, DbError, DbPool};

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = users)]
pub struct User {
    pub id: i64,
    pub username: String,
    pub password_hash: String,
    pub is_active: bool,
    pub is_staff: bool,
    /// UTC.
    pub created_at: NaiveDateTime,
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = users)]
pub struct NewUser {
    pub username: String,
    pub password_hash: String,
    pub is_active: bool,
    pub is_staff: bool,
}

pub async fn find_by_username(pool: &DbPool, name: String) -> Result<Option<User>, DbError> {
    // No user is named with U+0000 (PostgreSQL's text cannot hold it, and would answer an
    // error rather than "no such user"), so a login with one is an unknown user on both backends.
    if name.contains('\0') {
        return Ok(None);
    }
    run(pool, move |conn| {
        users::table
            .filter(users::username.eq(name))
            .select(User::as_select())
            .first(conn)
            .optional()
    })
    .await
}

pub async fn find_by_id(pool: &DbPool, id: i64) -> Result<Option<User>, DbError> {
    run(pool, move |conn| {
        users::table
            .find(id)
            .select(User::as_select())
            .first(conn)
            .optional()
    })
    .await
}

/// Inserts the user, or returns `None` when the username is taken.
pub async fn create(pool: &DbPool, new: NewUser) -> Result<Option<User>, DbError> {
    run(pool, move |conn| {
        each_backend!(conn, |conn| diesel::insert_into(users::table)
            .values(&new)
            .on_conflict(users::username)
            .do_nothing()
            .returning(User::as_returning())
            .get_result(conn)
            .optional())
    })
    .await
}

/// Sets the password hash and flags of an existing user; returns whether one was found.
pub async fn update_credentials(
    pool: &DbPool,
    name: String,
    password_hash: String,
    is_staff: bool,
) -> Result<bool, DbError> {
    run(pool, move |conn| {
        diesel::update(users::table.filter(users::username.eq(name)))
            .set((
                users::password_hash.eq(password_hash),
                users::is_staff.eq(is_staff),
            ))
            .execute(conn)
            .map(|rows| rows > 0)
    })
    .await
}

pub async fn set_active(pool: &DbPool, name: String, active: bool) -> Result<bool, DbError> {
    run(pool, move |conn| {
        diesel::update(users::table.filter(users::username.eq(name)))
            .set(users::is_active.eq(active))
            .execute(conn)
            .map(|rows| rows > 0)
    })
    .await
}
