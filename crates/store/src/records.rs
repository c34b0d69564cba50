//! The write path every domain type shares: authorization, the change and its outbox row in one
//! transaction, and the reads. A type plugs in with [`Table`], which holds only its own SQL; all
//! the rest (who may write, the transaction, the event) is here, once.

use diesel::prelude::*;
use domain::{Actor, Page, Registered, Viewer, WriteError};

use super::outbox::{self, NewEvent, PendingEvent};
use super::schema::users;
use super::{run, AnyConnection, DbError, DbPool};

/// A [`Registered`] domain type's table: its reads and its three writes, nothing else.
pub trait Table: Registered {
    fn load(conn: &mut AnyConnection, id: i64) -> QueryResult<Option<Self>>;
    /// At most `limit` with an id above `after` that `viewer` may read, in id order: the type's
    /// `Record::readers` as a filter in SQL (the store's tests hold the two to one answer).
    fn load_page(
        conn: &mut AnyConnection,
        viewer: Viewer,
        after: i64,
        limit: i64,
    ) -> QueryResult<Vec<Self>>;
    /// How many `viewer` may read.
    fn count(conn: &mut AnyConnection, viewer: Viewer) -> QueryResult<i64>;
    /// Inserts one owned by `owner_id`; returns its id.
    fn insert(conn: &mut AnyConnection, owner_id: i64, new: Self::New) -> QueryResult<i64>;
    fn update(conn: &mut AnyConnection, id: i64, changes: Self::Changes) -> QueryResult<()>;
    fn delete(conn: &mut AnyConnection, id: i64) -> QueryResult<()>;
}

/// Builds the outbox row of a write from the value as written; runs inside the transaction.
pub type EventDraft<T> = Box<dyn FnOnce(&T) -> Result<NewEvent, diesel::result::Error> + Send>;

/// One by its id, if `reader` may read it.
pub async fn find<T: Table>(pool: &DbPool, reader: i64, id: i64) -> Result<Option<T>, DbError> {
    run(pool, move |conn| {
        let viewer = viewer(conn, reader)?;
        Ok(T::load(conn, id)?.filter(|value| value.readable_by(viewer)))
    })
    .await
}

/// One by its id, whoever may read it: for the system (`trigger-event`), as writes by
/// [`Actor::System`] are.
pub async fn find_for_system<T: Table>(pool: &DbPool, id: i64) -> Result<Option<T>, DbError> {
    run(pool, move |conn| T::load(conn, id)).await
}

/// One page of what `reader` may read, in id order. Keyset pagination stays cheap and stable
/// while rows come and go.
pub async fn page<T: Table>(
    pool: &DbPool,
    reader: i64,
    after: Option<i64>,
    limit: i64,
) -> Result<Page<T>, DbError> {
    run(pool, move |conn| {
        let viewer = viewer(conn, reader)?;
        let mut items = T::load_page(conn, viewer, after.unwrap_or(0), limit + 1)?;
        let has_next_page = items.len() as i64 > limit;
        items.truncate(usize::try_from(limit).unwrap_or(0));
        Ok(Page {
            items,
            has_next_page,
            total_count: T::count(conn, viewer)?,
        })
    })
    .await
}

/// The reader as the database knows it now: staff rights are read here, not from the token, so
/// that a demotion counts at once. A user no longer active reads as one without rights (its
/// tokens are revoked with its deactivation anyway).
fn viewer(conn: &mut AnyConnection, user_id: i64) -> QueryResult<Viewer> {
    Ok(Viewer {
        user_id,
        is_staff: active_user(conn, user_id)?.unwrap_or(false),
    })
}

/// Inserts one owned by the active user `owner_id` together with its event.
pub async fn create<T: Table>(
    pool: &DbPool,
    owner_id: i64,
    new: T::New,
    event: EventDraft<T>,
) -> Result<(T, PendingEvent), WriteError> {
    transaction(pool, move |conn| {
        if active_user(conn, owner_id)?.is_none() {
            return Ok(Err(WriteError::UnknownUser));
        }
        let id = T::insert(conn, owner_id, new)?;
        let value = T::load(conn, id)?.ok_or(diesel::result::Error::NotFound)?;
        let pending = outbox::insert(conn, event(&value)?)?;
        Ok(Ok((value, pending)))
    })
    .await
}

/// Applies `changes` when `actor` may; returns the value as updated and its event.
pub async fn update<T: Table>(
    pool: &DbPool,
    actor: Actor,
    id: i64,
    changes: T::Changes,
    event: EventDraft<T>,
) -> Result<(T, PendingEvent), WriteError> {
    transaction(pool, move |conn| {
        if let Err(refused) = authorize::<T>(conn, actor, id)? {
            return Ok(Err(refused));
        }
        T::update(conn, id, changes)?;
        let value = T::load(conn, id)?.ok_or(diesel::result::Error::NotFound)?;
        let pending = outbox::insert(conn, event(&value)?)?;
        Ok(Ok((value, pending)))
    })
    .await
}

/// Deletes it when `actor` may; returns it as it was and its event.
pub async fn delete<T: Table>(
    pool: &DbPool,
    actor: Actor,
    id: i64,
    event: EventDraft<T>,
) -> Result<(T, PendingEvent), WriteError> {
    transaction(pool, move |conn| {
        let value = match authorize::<T>(conn, actor, id)? {
            Ok(value) => value,
            Err(refused) => return Ok(Err(refused)),
        };
        T::delete(conn, id)?;
        let pending = outbox::insert(conn, event(&value)?)?;
        Ok(Ok((value, pending)))
    })
    .await
}

/// `Ok(value)` when `actor` may change `id`: the system, staff, or the owner. Someone who may
/// not even read it is told it does not exist.
fn authorize<T: Table>(
    conn: &mut AnyConnection,
    actor: Actor,
    id: i64,
) -> QueryResult<Result<T, WriteError>> {
    let user = match actor {
        Actor::System => None,
        Actor::User(user_id) => match active_user(conn, user_id)? {
            Some(is_staff) => Some((user_id, is_staff)),
            None => return Ok(Err(WriteError::UnknownUser)),
        },
    };
    let Some(value) = T::load(conn, id)? else {
        return Ok(Err(WriteError::NotFound(T::NAME)));
    };
    let (user_id, is_staff) = match user {
        None | Some((_, true)) => return Ok(Ok(value)),
        Some(user) => user,
    };
    Ok(if value.owner_id() == Some(user_id) {
        Ok(value)
    } else if value.readable_by(Viewer { user_id, is_staff }) {
        Err(WriteError::Forbidden(T::NAME))
    } else {
        Err(WriteError::NotFound(T::NAME))
    })
}

/// `Some(is_staff)` for an active user.
pub(crate) fn active_user(conn: &mut AnyConnection, user_id: i64) -> QueryResult<Option<bool>> {
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
    .map_err(|err| WriteError::Store(err.into()))?
}
