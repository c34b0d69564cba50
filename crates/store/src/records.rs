//! The write path every domain type shares: authorization, the change and its outbox row in one
//! transaction, and the reads. A type plugs in with [`Table`], which holds only its own SQL; all
//! the rest (who may write, the transaction, the event, a child's parent and a parent's
//! children) is here, once.

use diesel::prelude::*;
use domain::{Actor, Child, NoParent, OnParentDelete, Page, Registered, Viewer, WriteError};
use events::{Envelope, EventType};

use super::idempotency::{self, Once, Recorded};
use super::outbox::{self, NewEvent, PendingEvent};
use super::schema::users;
use super::{run, AnyConnection, DbError, DbPool};

/// A [`Registered`] domain type's table: its reads and its three writes, nothing else. A child
/// type's rules (who may write it, which list it is in, what its parent's deletion does) are
/// not here: the functions below derive them from its declaration.
pub trait Table: Registered<Parent: Parent, Children: Cascade<Self>> {
    /// A child's value includes its parent, loaded here too (`Car::load`).
    fn load(conn: &mut AnyConnection, id: i64) -> QueryResult<Option<Self>>;
    /// At most `limit` with an id above `after`, in id order: for a root type, those `viewer`
    /// may read (its `Root::readers` as a filter in SQL; the store's tests hold the two to one
    /// answer); for a child, those of `parent`, which `viewer` may read (so all of them).
    fn load_page(
        conn: &mut AnyConnection,
        viewer: Viewer,
        parent: &Self::Parent,
        after: i64,
        limit: i64,
    ) -> QueryResult<Vec<Self>>;
    /// How many of those `load_page` reads there are.
    fn count(conn: &mut AnyConnection, viewer: Viewer, parent: &Self::Parent) -> QueryResult<i64>;
    /// Inserts one owned by `owner_id` (a child: in `parent`); returns its id.
    fn insert(
        conn: &mut AnyConnection,
        owner_id: i64,
        parent: &Self::Parent,
        new: Self::New,
    ) -> QueryResult<i64>;
    fn update(conn: &mut AnyConnection, id: i64, changes: Self::Changes) -> QueryResult<()>;
    fn delete(conn: &mut AnyConnection, id: i64) -> QueryResult<()>;
}

/// What a type's parent is to the write path: [`NoParent`] for a root type, or the parent's
/// [`Table`].
pub trait Parent: Sized + Send + Sync + 'static {
    /// The parent `id` names when `viewer` may read it (`NoParent` takes no id).
    fn readable(
        conn: &mut AnyConnection,
        viewer: Viewer,
        id: Option<i64>,
    ) -> QueryResult<Option<Self>>;
    /// The parent `id` when `actor` may add a child to it: when it may change the parent.
    /// (`NoParent` takes no id.)
    fn may_add(
        conn: &mut AnyConnection,
        actor: Actor,
        id: Option<i64>,
    ) -> QueryResult<Result<Self, WriteError>>;
}

impl Parent for NoParent {
    fn readable(_: &mut AnyConnection, _: Viewer, id: Option<i64>) -> QueryResult<Option<Self>> {
        Ok(id.is_none().then_some(NoParent))
    }

    fn may_add(
        _: &mut AnyConnection,
        _: Actor,
        _: Option<i64>,
    ) -> QueryResult<Result<Self, WriteError>> {
        Ok(Ok(NoParent))
    }
}

impl<P: Table> Parent for P {
    fn readable(
        conn: &mut AnyConnection,
        viewer: Viewer,
        id: Option<i64>,
    ) -> QueryResult<Option<Self>> {
        let Some(id) = id else { return Ok(None) };
        Ok(P::load(conn, id)?.filter(|parent| parent.readable_by(viewer)))
    }

    fn may_add(
        conn: &mut AnyConnection,
        actor: Actor,
        id: Option<i64>,
    ) -> QueryResult<Result<Self, WriteError>> {
        let Some(id) = id else {
            return Ok(Err(WriteError::NotFound(P::NAME)));
        };
        authorize::<P>(conn, actor, id)
    }
}

/// What deleting a `P` does to the types that belong to it ([`Registered::Children`], a tuple):
/// each type's [`Child::ON_PARENT_DELETE`].
pub trait Cascade<P> {
    /// Runs before `parent` is deleted, in its transaction: deletes its children (theirs
    /// first), each with its `deleted` event, or refuses.
    fn on_delete(
        conn: &mut AnyConnection,
        parent: &P,
        lease: chrono::Duration,
    ) -> QueryResult<Result<Vec<PendingEvent>, WriteError>>;
}

impl<P> Cascade<P> for () {
    fn on_delete(
        _: &mut AnyConnection,
        _: &P,
        _: chrono::Duration,
    ) -> QueryResult<Result<Vec<PendingEvent>, WriteError>> {
        Ok(Ok(Vec::new()))
    }
}

/// Reads every row: the children of a parent being deleted, whoever may read them.
const SYSTEM: Viewer = Viewer {
    user_id: 0,
    is_staff: true,
};

fn delete_children<P: Registered, C: Table + Registered<Parent = P> + Child>(
    conn: &mut AnyConnection,
    parent: &P,
    lease: chrono::Duration,
) -> QueryResult<Result<Vec<PendingEvent>, WriteError>> {
    if C::ON_PARENT_DELETE == OnParentDelete::Refuse {
        let count = C::count(conn, SYSTEM, parent)?;
        return Ok(if count == 0 {
            Ok(Vec::new())
        } else {
            Err(WriteError::HasChildren {
                parent: P::NAME,
                child: C::NAME,
                count,
            })
        });
    }
    let mut events = Vec::new();
    for child in C::load_page(conn, SYSTEM, parent, 0, i64::MAX)? {
        match <C::Children as Cascade<C>>::on_delete(conn, &child, lease)? {
            Ok(theirs) => events.extend(theirs),
            Err(refused) => return Ok(Err(refused)),
        }
        C::delete(conn, child.id())?;
        events.push(outbox::insert(
            conn,
            draft(C::EVENTS.deleted, &child, lease)?,
        )?);
    }
    Ok(Ok(events))
}

macro_rules! cascade_tuple {
    ($($child:ident),+) => {
        impl<P: Registered, $($child: Table + Registered<Parent = P> + Child),+> Cascade<P>
            for ($($child,)+)
        {
            fn on_delete(
                conn: &mut AnyConnection,
                parent: &P,
                lease: chrono::Duration,
            ) -> QueryResult<Result<Vec<PendingEvent>, WriteError>> {
                let mut events = Vec::new();
                $(
                    match delete_children::<P, $child>(conn, parent, lease)? {
                        Ok(theirs) => events.extend(theirs),
                        Err(refused) => return Ok(Err(refused)),
                    }
                )+
                Ok(Ok(events))
            }
        }
    };
}

cascade_tuple!(A);
cascade_tuple!(A, B);
cascade_tuple!(A, B, C);
cascade_tuple!(A, B, C, D);

/// The outbox row of a write, leased to this process for `lease` so that no relay publishes it
/// while the writer does (right after commit).
fn draft<T: Registered>(
    event_type: EventType,
    value: &T,
    lease: chrono::Duration,
) -> QueryResult<NewEvent> {
    let mut envelope = Envelope::new(event_type, value);
    // The transaction's span, entered by `transaction` when tracing is on.
    envelope.traceparent = service_kit::telemetry::traceparent();
    let payload = serde_json::to_string(&envelope)
        .map_err(|err| diesel::result::Error::SerializationError(Box::new(err)))?;
    Ok(NewEvent {
        event_id: envelope.id,
        event_type: event_type.as_str().to_owned(),
        payload,
        locked_until: Some(outbox::lease_until(lease)),
        traceparent: envelope.traceparent,
    })
}

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

/// One page of what `reader` may read (of a child type: of the record `parent`), in id order.
/// Keyset pagination stays cheap and stable while rows come and go.
pub async fn page<T: Table>(
    pool: &DbPool,
    reader: i64,
    parent: Option<i64>,
    after: Option<i64>,
    limit: i64,
) -> Result<Page<T>, DbError> {
    run(pool, move |conn| {
        let viewer = viewer(conn, reader)?;
        let Some(parent) = T::Parent::readable(conn, viewer, parent)? else {
            // Not "not found": an empty page says nothing of whether the parent exists.
            return Ok(Page {
                items: Vec::new(),
                has_next_page: false,
                total_count: 0,
            });
        };
        let mut items = T::load_page(conn, viewer, &parent, after.unwrap_or(0), limit + 1)?;
        let has_next_page = items.len() as i64 > limit;
        items.truncate(usize::try_from(limit).unwrap_or(0));
        Ok(Page {
            items,
            has_next_page,
            total_count: T::count(conn, viewer, &parent)?,
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

/// A write's value and the events it committed, to publish after the commit.
pub type Written<T> = (T, Vec<PendingEvent>);

/// Inserts one owned by the active user `owner_id` (a child: in the record `parent`, which the
/// user may change) together with its event.
pub async fn create<T: Table>(
    pool: &DbPool,
    owner_id: i64,
    parent: Option<i64>,
    new: T::New,
    lease: chrono::Duration,
    once: Option<Once>,
) -> Result<Written<T>, WriteError> {
    transaction(pool, move |conn| {
        if let Some(made) = made_before::<T>(conn, once.as_ref())? {
            return Ok(made);
        }
        if active_user(conn, owner_id)?.is_none() {
            return Ok(Err(WriteError::UnknownUser));
        }
        let parent = match T::Parent::may_add(conn, Actor::User(owner_id), parent)? {
            Ok(parent) => parent,
            Err(refused) => return Ok(Err(refused)),
        };
        let id = T::insert(conn, owner_id, &parent, new)?;
        let value = T::load(conn, id)?.ok_or(diesel::result::Error::NotFound)?;
        let pending = outbox::insert(conn, draft(T::EVENTS.created, &value, lease)?)?;
        made_now(conn, once.as_ref(), &value)?;
        Ok(Ok((value, vec![pending])))
    })
    .await
}

/// Applies `changes` when `actor` may; returns the value as updated and its event. Changes that
/// set nothing write nothing: the answer is the value as it is, with no event.
pub async fn update<T: Table>(
    pool: &DbPool,
    actor: Actor,
    id: i64,
    changes: T::Changes,
    lease: chrono::Duration,
    once: Option<Once>,
) -> Result<Written<T>, WriteError> {
    transaction(pool, move |conn| {
        if let Some(made) = made_before::<T>(conn, once.as_ref())? {
            return Ok(made);
        }
        let value = match authorize::<T>(conn, actor, id)? {
            Ok(value) => value,
            Err(refused) => return Ok(Err(refused)),
        };
        if changes == T::Changes::default() {
            return Ok(Ok((value, Vec::new())));
        }
        T::update(conn, id, changes)?;
        let value = T::load(conn, id)?.ok_or(diesel::result::Error::NotFound)?;
        let pending = outbox::insert(conn, draft(T::EVENTS.updated, &value, lease)?)?;
        made_now(conn, once.as_ref(), &value)?;
        Ok(Ok((value, vec![pending])))
    })
    .await
}

/// Deletes it when `actor` may, with what belongs to it as its type declares
/// ([`Child::ON_PARENT_DELETE`]); returns it as it was and the events: its children's
/// deletions first, then its own.
pub async fn delete<T: Table>(
    pool: &DbPool,
    actor: Actor,
    id: i64,
    lease: chrono::Duration,
    once: Option<Once>,
) -> Result<Written<T>, WriteError> {
    transaction(pool, move |conn| {
        if let Some(made) = made_before::<T>(conn, once.as_ref())? {
            return Ok(made);
        }
        let value = match authorize::<T>(conn, actor, id)? {
            Ok(value) => value,
            Err(refused) => return Ok(Err(refused)),
        };
        let mut events = match T::Children::on_delete(conn, &value, lease)? {
            Ok(events) => events,
            Err(refused) => return Ok(Err(refused)),
        };
        T::delete(conn, id)?;
        events.push(outbox::insert(
            conn,
            draft(T::EVENTS.deleted, &value, lease)?,
        )?);
        made_now(conn, once.as_ref(), &value)?;
        Ok(Ok((value, events)))
    })
    .await
}

/// For a write under an idempotency key: the answer when it was made before (the value it
/// committed, with no event to publish again), or a refusal when the key was used for another
/// request; `None`: make it. Holds the key until the transaction ends.
fn made_before<T: Table>(
    conn: &mut AnyConnection,
    once: Option<&Once>,
) -> QueryResult<Option<Result<Written<T>, WriteError>>> {
    let Some(once) = once else { return Ok(None) };
    idempotency::lock(conn, once)?;
    Ok(match idempotency::recorded::<T>(conn, once)? {
        Recorded::Nothing => None,
        Recorded::Made(value) => Some(Ok((value, Vec::new()))),
        Recorded::OtherRequest => Some(Err(WriteError::IdempotencyKeyReused)),
    })
}

/// Records a write made under an idempotency key, in its transaction.
fn made_now<T: Table>(conn: &mut AnyConnection, once: Option<&Once>, value: &T) -> QueryResult<()> {
    match once {
        Some(once) => idempotency::record(conn, once, value),
        None => Ok(()),
    }
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
        let span = service_kit::telemetry::span(|| {
            tracing::info_span!("db transaction", otel.kind = "client")
        });
        let _entered = span.enter();
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
