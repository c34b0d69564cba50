//! The one GraphQL schema (juniper), served by api-service over HTTP and by the subscription
//! gateway over websocket: the root types, the per-request [`Context`] holding the verified
//! claims (or why there are none), errors with a stable `extensions.code` ([`errors`]),
//! document limits and checks ([`documents`]), persisted queries ([`persisted`]: APQ and trusted
//! documents), and [`sdl`], which prints the schema checked in as `schema.graphql`.
//!
//! Resolvers read and write through the domain's interfaces ([`domain::DataSource`]) and read
//! events from an [`EventSource`]; neither is a database, so the gateway serves this schema
//! without linking one. Each domain type has a module of its own ([`cars`]) with its objects
//! and inputs; the roots below name its fields.

/// A page object for a type, in id order: `page_object!(CarPage, Car, CarObject)`.
macro_rules! page_object {
    ($(#[$meta:meta])* $page:ident, $record:ty, $object:ident) => {
        $(#[$meta])*
        pub struct $page(pub domain::Page<$record>);

        #[juniper::graphql_object(context = $crate::Context)]
        impl $page {
            fn nodes(&self) -> Vec<$object> {
                self.0.items.iter().cloned().map($object).collect()
            }

            /// All of those the signed-in user may see, not only this page's.
            fn total_count(&self) -> i32 {
                i32::try_from(self.0.total_count).unwrap_or(i32::MAX)
            }

            fn page_info(&self) -> $crate::PageInfo {
                $crate::PageInfo::of(&self.0)
            }
        }
    };
}

pub mod cars;
pub mod documents;
pub mod errors;
pub mod persisted;
pub mod sdl;
pub mod service_visits;

use std::sync::Arc;

use domain::{Actor, Car, DataSource, Page, Record, Registered, Repository, ServiceVisit};
use events::{EventSource, EventType, Key, SharedEventSource};
use futures_util::StreamExt as _;
use juniper::{graphql_object, graphql_subscription, FieldError, IntoFieldError, RootNode, ID};
use tokens::auth::AuthError;
use tokens::jwt::Claims;

pub use cars::{CarInput, CarObject, CarPage, CarPatch};
pub use documents::{
    inspect, is_subscription_field, operation_field_count, unknown_variable_type, DocumentLimits,
    Inspected, RootFields,
};
pub use errors::{extensions, request_errors, GraphQLError};
pub use sdl::sdl;
pub use service_visits::{
    ServiceVisitInput, ServiceVisitObject, ServiceVisitPage, ServiceVisitPatch,
};

pub type Schema = RootNode<Query, Mutation, Subscription>;

/// Builds the schema once per process; share it (it is `Sync`).
pub fn schema(limits: DocumentLimits) -> Schema {
    Schema::new(Query, Mutation, Subscription)
        .limit_depth(limits.max_depth)
        .limit_fields(limits.max_fields)
        .limit_tokens(limits.max_tokens)
}

/// Largest page of a list (`cars`).
pub const MAX_PAGE_SIZE: i32 = 100;

/// Longest value of a text field, in characters (the columns are VARCHAR(100)).
pub const MAX_FIELD_CHARS: usize = 100;

/// What resolvers know about the request.
pub struct Context {
    /// The verified access token's claims, or why there are none. Resolvers that need a user call
    /// [`Context::claims`], which turns the reason into an `UNAUTHENTICATED` error.
    pub auth: Result<Claims, AuthError>,
    /// Reads and writes; api-service has them, the gateway (which never writes) not.
    pub data: Option<Arc<dyn DataSource>>,
    /// Where subscriptions read events; the gateway has it, api-service not.
    pub events: Option<SharedEventSource>,
}

impl juniper::Context for Context {}

impl Context {
    pub fn new(auth: Result<Claims, AuthError>) -> Self {
        Self {
            auth,
            data: None,
            events: None,
        }
    }

    pub fn with_data(mut self, data: Arc<dyn DataSource>) -> Self {
        self.data = Some(data);
        self
    }

    pub fn with_events(mut self, events: SharedEventSource) -> Self {
        self.events = Some(events);
        self
    }

    pub fn claims(&self) -> Result<&Claims, GraphQLError> {
        self.auth.as_ref().map_err(|err| match err {
            // The client's token may be fine; telling it UNAUTHENTICATED would make it log in again.
            AuthError::KeysUnavailable => GraphQLError::KeysUnavailable(err.to_string()),
            _ => GraphQLError::Unauthenticated(err.to_string()),
        })
    }

    /// The signed-in user's id and the reads and writes: sign-in is checked first, so a
    /// stranger learns nothing of what the request asks.
    fn signed_in(&self) -> Result<(i64, &(dyn DataSource + 'static)), GraphQLError> {
        let user_id = self.claims()?.user_id;
        let data = self.data.as_deref().ok_or_else(|| {
            GraphQLError::BadRequest(
                "queries and mutations are served over HTTP at /graphql/, not on this endpoint"
                    .into(),
            )
        })?;
        Ok((user_id, data))
    }
}

type FieldResult<T> = Result<T, GraphQLError>;

/// A user: an owner, or the caller (`me`).
pub struct User(pub domain::Owner);

#[graphql_object(context = Context)]
impl User {
    fn id(&self) -> ID {
        ID::new(self.0.id.to_string())
    }

    fn username(&self) -> &str {
        &self.0.username
    }

    /// Staff may change any car.
    fn is_staff(&self) -> bool {
        self.0.is_staff
    }
}

#[derive(juniper::GraphQLObject)]
#[graphql(context = Context)]
pub struct PageInfo {
    pub has_next_page: bool,
    /// Pass as `after` to get the next page.
    pub end_cursor: Option<ID>,
}

impl PageInfo {
    fn of<T: domain::Record>(page: &Page<T>) -> Self {
        PageInfo {
            has_next_page: page.has_next_page,
            end_cursor: page.items.last().map(|item| ID::new(item.id().to_string())),
        }
    }
}

pub struct Query;

#[graphql_object(context = Context)]
impl Query {
    /// Answers "Hi!" to a signed-in user, as the reference does.
    fn hi(context: &Context) -> FieldResult<&'static str> {
        context.claims()?;
        Ok("Hi!")
    }

    /// The signed-in user.
    async fn me(context: &Context) -> FieldResult<User> {
        let (user_id, data) = context.signed_in()?;
        let user = data.active_user(user_id).await?.ok_or_else(|| {
            GraphQLError::Unauthenticated(
                "the signed-in user no longer exists or is inactive".into(),
            )
        })?;
        Ok(User(user))
    }

    /// One car, or null when there is none with this id that the signed-in user may see.
    async fn car(context: &Context, pk: ID) -> FieldResult<Option<CarObject>> {
        Ok(find::<Car>(context, &pk).await?.map(CarObject))
    }

    /// The cars the signed-in user may see, in id order, `first` (1-100) at a time after the
    /// cursor `after`.
    async fn cars(
        context: &Context,
        #[graphql(default = 20)] first: i32,
        after: Option<ID>,
    ) -> FieldResult<CarPage> {
        page::<Car>(context, None, first, after).await.map(CarPage)
    }

    /// One service visit, or null when there is none with this id that the signed-in user may
    /// see (one of a car they may see).
    async fn service_visit(context: &Context, pk: ID) -> FieldResult<Option<ServiceVisitObject>> {
        Ok(find::<ServiceVisit>(context, &pk)
            .await?
            .map(ServiceVisitObject))
    }

    /// The service visits of the car `carPk`, in id order, `first` (1-100) at a time after the
    /// cursor `after`; none when the signed-in user may not see the car.
    async fn service_visits(
        context: &Context,
        car_pk: ID,
        #[graphql(default = 20)] first: i32,
        after: Option<ID>,
    ) -> FieldResult<ServiceVisitPage> {
        page(context, Some(&car_pk), first, after)
            .await
            .map(ServiceVisitPage)
    }
}

pub struct Mutation;

#[graphql_object(context = Context)]
impl Mutation {
    /// Creates a car owned by the signed-in user.
    async fn create_car(context: &Context, input: CarInput) -> FieldResult<CarObject> {
        create(context, None, || input.validate())
            .await
            .map(CarObject)
    }

    /// Changes a car; only its owner or staff may (`NOT_FOUND` for a private car of someone else).
    /// Setting nothing changes nothing: the answer is the car as it is.
    async fn update_car(context: &Context, pk: ID, input: CarPatch) -> FieldResult<CarObject> {
        update(context, &pk, || input.validate())
            .await
            .map(CarObject)
    }

    /// Deletes a car (only its owner or staff may) with its service visits, and returns it as
    /// it was.
    async fn delete_car(context: &Context, pk: ID) -> FieldResult<CarObject> {
        delete(context, &pk).await.map(CarObject)
    }

    /// Records a service visit of the car `carPk`; only the car's owner or staff may.
    async fn create_service_visit(
        context: &Context,
        car_pk: ID,
        input: ServiceVisitInput,
    ) -> FieldResult<ServiceVisitObject> {
        create(context, Some(&car_pk), || input.validate())
            .await
            .map(ServiceVisitObject)
    }

    /// Changes a service visit; only its car's owner or staff may.
    async fn update_service_visit(
        context: &Context,
        pk: ID,
        input: ServiceVisitPatch,
    ) -> FieldResult<ServiceVisitObject> {
        update(context, &pk, || input.validate())
            .await
            .map(ServiceVisitObject)
    }

    /// Deletes a service visit (only its car's owner or staff may) and returns it as it was.
    async fn delete_service_visit(context: &Context, pk: ID) -> FieldResult<ServiceVisitObject> {
        delete(context, &pk).await.map(ServiceVisitObject)
    }
}

pub type Stream<T> = std::pin::Pin<Box<dyn futures_util::Stream<Item = T> + Send>>;

pub struct Subscription;

#[graphql_subscription(context = Context)]
impl Subscription {
    /// Every change of the car `pk` (the reference's subscription; `pk: 1` and `pk: "1"` both
    /// work) that the subscriber may see: nothing while it is private to someone else.
    async fn car_model_updated(context: &Context, pk: ID) -> Result<Stream<CarObject>, FieldError> {
        context.claims().map_err(IntoFieldError::into_field_error)?;
        let id = parse_pk::<Car>(&pk).map_err(IntoFieldError::into_field_error)?;
        Ok(Box::pin(
            events::<Car>(context, |e| e.updated, Some(Key::id(id)))?.map(CarObject),
        ))
    }

    /// Every car created that the subscriber may see.
    async fn car_created(context: &Context) -> Result<Stream<CarObject>, FieldError> {
        Ok(Box::pin(
            events::<Car>(context, |e| e.created, None)?.map(CarObject),
        ))
    }

    /// Every car deleted that the subscriber may see, as it was before.
    async fn car_deleted(context: &Context) -> Result<Stream<CarObject>, FieldError> {
        Ok(Box::pin(
            events::<Car>(context, |e| e.deleted, None)?.map(CarObject),
        ))
    }

    /// Every service visit recorded for the car `carPk`, while the subscriber may see the car.
    async fn service_visit_created(
        context: &Context,
        car_pk: ID,
    ) -> Result<Stream<ServiceVisitObject>, FieldError> {
        let visits = events_of_parent::<ServiceVisit>(context, |e| e.created, &car_pk)?;
        Ok(Box::pin(visits.map(ServiceVisitObject)))
    }

    /// Every change of the service visit `pk`.
    async fn service_visit_updated(
        context: &Context,
        pk: ID,
    ) -> Result<Stream<ServiceVisitObject>, FieldError> {
        let key = Key::id(parse_pk::<ServiceVisit>(&pk)?);
        let visits = events::<ServiceVisit>(context, |e| e.updated, Some(key))?;
        Ok(Box::pin(visits.map(ServiceVisitObject)))
    }

    /// Every service visit of the car `carPk` deleted, as it was before: also each visit of
    /// the car when the car is deleted.
    async fn service_visit_deleted(
        context: &Context,
        car_pk: ID,
    ) -> Result<Stream<ServiceVisitObject>, FieldError> {
        let visits = events_of_parent::<ServiceVisit>(context, |e| e.deleted, &car_pk)?;
        Ok(Box::pin(visits.map(ServiceVisitObject)))
    }
}

/// One `T` by its id, or none.
async fn find<T: Registered>(context: &Context, pk: &ID) -> FieldResult<Option<T>>
where
    dyn DataSource: Repository<T>,
{
    let (user_id, data) = context.signed_in()?;
    let Ok(id) = parse_pk::<T>(pk) else {
        return Ok(None);
    };
    Ok(Repository::<T>::find(data, user_id, id).await?)
}

/// A page of `T`, `first` after the cursor `after`: of a child type, those of the record
/// `parent`.
async fn page<T: Registered>(
    context: &Context,
    parent: Option<&ID>,
    first: i32,
    after: Option<ID>,
) -> FieldResult<Page<T>>
where
    dyn DataSource: Repository<T>,
{
    let (user_id, data) = context.signed_in()?;
    if !(1..=MAX_PAGE_SIZE).contains(&first) {
        return Err(GraphQLError::BadUserInput(format!(
            "`first` must be between 1 and {MAX_PAGE_SIZE}"
        )));
    }
    let parent = parent.map(|pk| parse_id(T::PARENT, pk)).transpose()?;
    let after = after.as_ref().map(parse_pk::<T>).transpose()?;
    Ok(Repository::<T>::page(data, user_id, parent, after, i64::from(first)).await?)
}

/// Creates a `T` from the input `validate` checks, for the signed-in user (sign-in first: a
/// stranger learns nothing of the input); a child type's in the record `parent`.
async fn create<T: Registered>(
    context: &Context,
    parent: Option<&ID>,
    validate: impl FnOnce() -> FieldResult<T::New>,
) -> FieldResult<T>
where
    dyn DataSource: Repository<T>,
{
    let (user_id, data) = context.signed_in()?;
    let parent = parent.map(|pk| parse_id(T::PARENT, pk)).transpose()?;
    let new = validate()?;
    Ok(Repository::<T>::create(data, user_id, parent, new).await?)
}

/// Changes the `T` `pk` as the signed-in user.
async fn update<T: Registered>(
    context: &Context,
    pk: &ID,
    validate: impl FnOnce() -> FieldResult<T::Changes>,
) -> FieldResult<T>
where
    dyn DataSource: Repository<T>,
{
    let (user_id, data) = context.signed_in()?;
    let id = parse_pk::<T>(pk)?;
    let changes = validate()?;
    Ok(Repository::<T>::update(data, Actor::User(user_id), id, changes).await?)
}

/// Deletes the `T` `pk` as the signed-in user; returns it as it was.
async fn delete<T: Registered>(context: &Context, pk: &ID) -> FieldResult<T>
where
    dyn DataSource: Repository<T>,
{
    let (user_id, data) = context.signed_in()?;
    let id = parse_pk::<T>(pk)?;
    Ok(Repository::<T>::delete(data, Actor::User(user_id), id).await?)
}

/// The `T`s of one of its event types, for a signed-in user, from when the subscription starts
/// (or from its resume cursor: the gateway's event source decides): all of them, or with `key`
/// those routed by it (`Record::keys`), which only they cost the gateway anything for.
fn events<T: Registered>(
    context: &Context,
    event_type: fn(&domain::Events) -> EventType,
    key: Option<Key>,
) -> Result<Stream<T>, FieldError> {
    context.claims().map_err(IntoFieldError::into_field_error)?;
    let source = context.events.as_ref().ok_or_else(|| {
        GraphQLError::BadRequest(SUBSCRIPTION_OVER_HTTP.into()).into_field_error()
    })?;
    Ok(typed(source.as_ref(), event_type(&T::EVENTS), key))
}

/// [`events`] of a child type routed by its parent `parent_pk`: those of one parent's records.
fn events_of_parent<T: Registered>(
    context: &Context,
    event_type: fn(&domain::Events) -> EventType,
    parent_pk: &ID,
) -> Result<Stream<T>, FieldError> {
    context.claims().map_err(IntoFieldError::into_field_error)?;
    let parent = parse_id(T::PARENT, parent_pk).map_err(IntoFieldError::into_field_error)?;
    events::<T>(context, event_type, Some(Key::new(T::PARENT, parent)))
}

/// The envelopes of `event_type` as `T`s: the data was decoded once, by the type the registry
/// names for it, so the downcast only fails for a type registered under another's event.
fn typed<T: Registered>(
    source: &dyn EventSource,
    event_type: EventType,
    key: Option<Key>,
) -> Stream<T> {
    Box::pin(
        source
            .subscribe(event_type, key)
            .filter_map(|envelope| std::future::ready(envelope.data.downcast_ref::<T>().cloned())),
    )
}

/// The answer to a subscription sent where only queries and mutations are served (a plain
/// request; with a streaming `Accept` the gateway serves it).
pub const SUBSCRIPTION_OVER_HTTP: &str = "a subscription needs a stream: send it with \
     `Accept: text/event-stream` (GraphQL over SSE) or `Accept: multipart/mixed;subscriptionSpec=\"1.0\"`, \
     or connect a websocket to this same URL (/graphql/) with the graphql-transport-ws or \
     graphql-ws protocol";

fn parse_pk<T: Record>(pk: &ID) -> Result<i64, GraphQLError> {
    parse_id(T::NAME, pk)
}

/// The id `pk` of a record of the type called `name`.
fn parse_id(name: &str, pk: &ID) -> Result<i64, GraphQLError> {
    pk.trim()
        .parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| GraphQLError::BadUserInput(format!("`{}` is not a {name} id", &**pk)))
}

/// A text input trimmed, at most [`MAX_FIELD_CHARS`] long.
pub(crate) fn text(field: &str, value: String) -> Result<String, GraphQLError> {
    let value = value.trim().to_owned();
    // PostgreSQL's text cannot hold U+0000 and SQLite's can: refused here, the same on both.
    if value.contains('\0') {
        return Err(GraphQLError::BadUserInput(format!(
            "`{field}` may not contain the NUL character (U+0000)"
        )));
    }
    if value.chars().count() > MAX_FIELD_CHARS {
        return Err(GraphQLError::BadUserInput(format!(
            "`{field}` must be at most {MAX_FIELD_CHARS} characters"
        )));
    }
    Ok(value)
}

/// [`text`], and not blank.
pub(crate) fn required_text(field: &str, value: String) -> Result<String, GraphQLError> {
    let value = text(field, value)?;
    if value.is_empty() {
        return Err(GraphQLError::BadUserInput(format!(
            "`{field}` may not be blank"
        )));
    }
    Ok(value)
}

/// A calendar date, `YYYY-MM-DD` (checked to be one: month 1-12, day 1-31).
pub(crate) fn date(field: &str, value: String) -> Result<String, GraphQLError> {
    let value = value.trim().to_owned();
    let parts: Vec<&str> = value.split('-').collect();
    let number = |part: &str, digits: usize, range: std::ops::RangeInclusive<u32>| {
        part.len() == digits
            && part.bytes().all(|b| b.is_ascii_digit())
            && part.parse::<u32>().is_ok_and(|n| range.contains(&n))
    };
    let valid = matches!(parts.as_slice(), [year, month, day]
        if number(year, 4, 1..=9999) && number(month, 2, 1..=12) && number(day, 2, 1..=31));
    if !valid {
        return Err(GraphQLError::BadUserInput(format!(
            "`{field}` must be a date, YYYY-MM-DD"
        )));
    }
    Ok(value)
}

/// A whole number, 0 or more.
pub(crate) fn non_negative(field: &str, value: i32) -> Result<i64, GraphQLError> {
    if value < 0 {
        return Err(GraphQLError::BadUserInput(format!(
            "`{field}` may not be negative"
        )));
    }
    Ok(i64::from(value))
}
