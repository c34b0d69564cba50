//! The one GraphQL schema (juniper), served by api-service over HTTP and by the subscription
//! gateway over websocket: types, resolvers, the per-request [`Context`] holding the verified
//! claims (or why there are none), errors with a stable `extensions.code`, document limits, and
//! [`sdl`], which prints the schema checked in as `schema.graphql`.

use std::collections::HashMap;
use std::fmt::Write as _;

use futures_util::StreamExt as _;
use juniper::{
    graphql_object, graphql_subscription, DefaultScalarValue, FieldError, GraphQLInputObject,
    GraphQLObject, IntoFieldError, Object, RootNode, ScalarValue, Value, ID,
};

use crate::auth::AuthError;
use crate::db::cars::{Actor, Car, CarChanges, NewCar, Owner, WriteError};
use crate::db::{self, DbError};
use crate::events::{EventType, SharedEventSource};
use crate::jwt::Claims;
use crate::repository::Store;

pub type Schema = RootNode<Query, Mutation, Subscription>;

/// Bounds on documents, checked by juniper's parser before validation and execution (depth of
/// selections with fragments expanded, fields after fragment expansion, aliases included, and
/// tokens).
#[derive(Debug, Clone, Copy)]
pub struct DocumentLimits {
    pub max_depth: usize,
    pub max_fields: usize,
    pub max_tokens: usize,
}

impl Default for DocumentLimits {
    fn default() -> Self {
        // The introspection queries of Playground and GraphiQL nest about 20 levels once their
        // fragments are expanded (TypeRef's chain of `ofType`); queries of this schema need 4.
        // The field limit, not the depth, is what bounds the work of a hostile document.
        Self {
            max_depth: 24,
            max_fields: 500,
            max_tokens: 5_000,
        }
    }
}

/// Builds the schema once per process; share it (it is `Sync`).
pub fn schema(limits: DocumentLimits) -> Schema {
    Schema::new(Query, Mutation, Subscription)
        .limit_depth(limits.max_depth)
        .limit_fields(limits.max_fields)
        .limit_tokens(limits.max_tokens)
}

/// Largest page of `cars`.
pub const MAX_PAGE_SIZE: i32 = 100;
/// What a subscription's root selects, fragments expanded, as the GraphQL spec's "single root
/// field" rule counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootFields {
    pub count: usize,
    /// The first root field's name (the metric label), if any.
    pub first: Option<String>,
}

/// The root fields of a subscription document: `None` when the document does not parse, names
/// no such operation, is not a subscription or has a fragment cycle (juniper's own validation
/// reports those).
pub fn subscription_root_fields(
    schema: &Schema,
    query: &str,
    operation_name: Option<&str>,
) -> Option<RootFields> {
    let document = juniper::parser::parse_document_source(query, &schema.schema).ok()?;
    let walk = DocumentWalk::new(&document)?;
    let operation = walk.operation(operation_name)?;
    if operation.operation_type != juniper::OperationType::Subscription {
        return None;
    }
    let mut memo = HashMap::new();
    let (count, first) = walk.root_fields(&operation.selection_set, &mut memo);
    Some(RootFields {
        count,
        first: first.map(str::to_owned),
    })
}

/// Whether the operation a request names is a query, a mutation or a subscription; `None` when
/// the document does not parse within the schema's limits or names no such operation (its
/// execution then reports why).
pub fn operation_type(
    schema: &Schema,
    query: &str,
    operation_name: Option<&str>,
) -> Option<juniper::OperationType> {
    let document = juniper::parser::parse_document_source(query, &schema.schema).ok()?;
    let walk = DocumentWalk::new(&document)?;
    Some(walk.operation(operation_name)?.operation_type)
}

/// How many fields an operation selects, fragments expanded and aliases counted, as the
/// document field limit counts them: what a batch's operations add up to. `None` when the
/// document does not parse within the schema's limits, names no such operation or has a
/// fragment cycle (its own execution then reports why).
pub fn operation_field_count(
    schema: &Schema,
    query: &str,
    operation_name: Option<&str>,
) -> Option<usize> {
    let document = juniper::parser::parse_document_source(query, &schema.schema).ok()?;
    let walk = DocumentWalk::new(&document)?;
    let operation = walk.operation(operation_name)?;
    Some(walk.fields(&operation.selection_set, &mut HashMap::new()))
}

/// A variable whose type the schema does not know, if the document has one. juniper's
/// validation panics on such a variable when it has a default value (`query($v: Nope = 1)`,
/// found by the `graphql_limits` fuzz target); checked before validation, it is an error instead.
pub fn unknown_variable_type(schema: &Schema, query: &str) -> Option<String> {
    // A document without `$` has no variables: the common case is spared a second parse.
    if !query.contains('$') {
        return None;
    }
    let document = juniper::parser::parse_document_source(query, &schema.schema).ok()?;
    document.iter().find_map(|definition| {
        let juniper::Definition::Operation(operation) = definition else {
            return None;
        };
        let variables = operation.item.variables_definition.as_ref()?;
        variables.item.iter().find_map(|(name, definition)| {
            let type_name = definition.var_type.item.innermost_name();
            schema
                .schema
                .concrete_type_by_name(type_name)
                .is_none()
                .then(|| {
                    format!(
                        "Unknown type \"{type_name}\" of variable \"${}\"",
                        name.item
                    )
                })
        })
    })
}

type Selections<'d> = [juniper::Selection<'d, DefaultScalarValue>];

/// A parsed document's operations and fragments, for walks that expand fragment spreads. Each
/// fragment's result is computed once (memoized), so a walk costs the size of the document,
/// not of its expansion; documents with a fragment cycle are not walked at all.
struct DocumentWalk<'d> {
    document: &'d [juniper::Definition<'d, DefaultScalarValue>],
    fragments: HashMap<&'d str, &'d Selections<'d>>,
}

impl<'d> DocumentWalk<'d> {
    fn new(document: &'d [juniper::Definition<'d, DefaultScalarValue>]) -> Option<Self> {
        let fragments = document
            .iter()
            .filter_map(|definition| match definition {
                juniper::Definition::Fragment(fragment) => Some((
                    fragment.item.name.item,
                    fragment.item.selection_set.as_slice(),
                )),
                juniper::Definition::Operation(_) => None,
            })
            .collect();
        let walk = Self {
            document,
            fragments,
        };
        (!walk.has_cycle()).then_some(walk)
    }

    fn operation(
        &self,
        name: Option<&str>,
    ) -> Option<&'d juniper::Operation<'d, DefaultScalarValue>> {
        let mut operations = self
            .document
            .iter()
            .filter_map(|definition| match definition {
                juniper::Definition::Operation(operation) => Some(&operation.item),
                juniper::Definition::Fragment(_) => None,
            });
        match name {
            Some(name) => operations.find(|op| op.name.as_ref().is_some_and(|n| n.item == name)),
            None => {
                let only = operations.next()?;
                operations.next().is_none().then_some(only)
            }
        }
    }

    /// Whether some fragment spreads itself, directly or through others (depth-first search
    /// with three colours over the spread graph).
    fn has_cycle(&self) -> bool {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            Open,
            Done,
        }
        fn spreads<'d>(selections: &'d Selections<'d>, out: &mut Vec<&'d str>) {
            for selection in selections {
                match selection {
                    juniper::Selection::Field(field) => {
                        if let Some(nested) = field.item.selection_set.as_deref() {
                            spreads(nested, out);
                        }
                    }
                    juniper::Selection::InlineFragment(inline) => {
                        spreads(&inline.item.selection_set, out)
                    }
                    juniper::Selection::FragmentSpread(spread) => out.push(spread.item.name.item),
                }
            }
        }
        let mut marks: HashMap<&str, Mark> = HashMap::new();
        for &start in self.fragments.keys() {
            if marks.contains_key(start) {
                continue;
            }
            // An explicit stack: (fragment, its spreads, next index).
            let mut stack: Vec<(&str, Vec<&str>, usize)> = Vec::new();
            let mut targets = Vec::new();
            spreads(self.fragments[start], &mut targets);
            marks.insert(start, Mark::Open);
            stack.push((start, targets, 0));
            while let Some((name, targets, next)) = stack.last_mut() {
                let Some(&target) = targets.get(*next) else {
                    marks.insert(name, Mark::Done);
                    stack.pop();
                    continue;
                };
                *next += 1;
                match marks.get(target) {
                    Some(Mark::Open) => return true,
                    Some(Mark::Done) => {}
                    None => {
                        if let Some(selections) = self.fragments.get(target) {
                            let mut nested = Vec::new();
                            spreads(selections, &mut nested);
                            marks.insert(target, Mark::Open);
                            stack.push((target, nested, 0));
                        }
                    }
                }
            }
        }
        false
    }

    fn fields(&self, selections: &'d Selections<'d>, memo: &mut HashMap<&'d str, usize>) -> usize {
        let mut count = 0usize;
        for selection in selections {
            count = count.saturating_add(match selection {
                juniper::Selection::Field(field) => field
                    .item
                    .selection_set
                    .as_deref()
                    .map_or(0, |nested| self.fields(nested, memo))
                    .saturating_add(1),
                juniper::Selection::InlineFragment(inline) => {
                    self.fields(&inline.item.selection_set, memo)
                }
                juniper::Selection::FragmentSpread(spread) => {
                    let name = spread.item.name.item;
                    match (memo.get(name), self.fragments.get(name)) {
                        (Some(known), _) => *known,
                        (None, Some(selections)) => {
                            let counted = self.fields(selections, memo);
                            memo.insert(name, counted);
                            counted
                        }
                        (None, None) => 0,
                    }
                }
            });
        }
        count
    }

    /// The number of root fields and the first one's name.
    fn root_fields(
        &self,
        selections: &'d Selections<'d>,
        memo: &mut HashMap<&'d str, (usize, Option<&'d str>)>,
    ) -> (usize, Option<&'d str>) {
        let mut count = 0usize;
        let mut first = None;
        for selection in selections {
            let (more, name) = match selection {
                // Aliases name the response key; the rule is about fields, so `a: f, b: f`
                // selects two.
                juniper::Selection::Field(field) => (1, Some(field.item.name.item)),
                juniper::Selection::InlineFragment(inline) => {
                    self.root_fields(&inline.item.selection_set, memo)
                }
                juniper::Selection::FragmentSpread(spread) => {
                    let name = spread.item.name.item;
                    match (memo.get(name), self.fragments.get(name)) {
                        (Some(known), _) => *known,
                        (None, Some(selections)) => {
                            let found = self.root_fields(selections, memo);
                            memo.insert(name, found);
                            found
                        }
                        (None, None) => (0, None),
                    }
                }
            };
            count = count.saturating_add(more);
            first = first.or(name);
        }
        (count, first)
    }
}

/// Whether `name` is a field of the schema's Subscription type: metric labels are taken only
/// from the schema, so clients cannot create label values.
pub fn is_subscription_field(schema: &Schema, name: &str) -> bool {
    schema
        .schema
        .concrete_subscription_type()
        .and_then(|ty| ty.field_by_name(name))
        .is_some()
}

/// Longest value of a car's text fields, in characters (the columns are VARCHAR(100)).
pub const MAX_FIELD_CHARS: usize = 100;

/// What resolvers know about the request.
pub struct Context {
    /// The verified access token's claims, or why there are none. Resolvers that need a user call
    /// [`Context::claims`], which turns the reason into an `UNAUTHENTICATED` error.
    pub auth: Result<Claims, AuthError>,
    /// Storage and the write path; api-service has it, the gateway (which never writes) not.
    pub store: Option<Store>,
    /// Where subscriptions read events; the gateway has it, api-service not.
    pub events: Option<SharedEventSource>,
}

impl juniper::Context for Context {}

impl Context {
    pub fn new(auth: Result<Claims, AuthError>) -> Self {
        Self {
            auth,
            store: None,
            events: None,
        }
    }

    pub fn with_store(mut self, store: Store) -> Self {
        self.store = Some(store);
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

    fn store(&self) -> Result<&Store, GraphQLError> {
        self.store.as_ref().ok_or_else(|| {
            GraphQLError::BadRequest(
                "queries and mutations are served over HTTP at /graphql/, not on this endpoint"
                    .into(),
            )
        })
    }
}

/// Errors of resolvers, each with a stable `extensions.code`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GraphQLError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadUserInput(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("service temporarily unavailable, try again later")]
    Unavailable,
    #[error("{0}")]
    KeysUnavailable(String),
    #[error("internal server error")]
    Internal,
}

impl GraphQLError {
    pub fn code(&self) -> &'static str {
        match self {
            GraphQLError::Unauthenticated(_) => "UNAUTHENTICATED",
            GraphQLError::Forbidden(_) => "FORBIDDEN",
            GraphQLError::NotFound(_) => "NOT_FOUND",
            GraphQLError::BadUserInput(_) => "BAD_USER_INPUT",
            GraphQLError::BadRequest(_) => "BAD_REQUEST",
            GraphQLError::Unavailable | GraphQLError::KeysUnavailable(_) => "SERVICE_UNAVAILABLE",
            GraphQLError::Internal => "INTERNAL_SERVER_ERROR",
        }
    }
}

/// juniper's request-level errors (the document did not parse, passed a limit or did not
/// validate) as a GraphQL `errors` list, each with an `extensions.code`. One function for HTTP
/// (api-service) and the socket (the gateway), so that a refused document reads the same on both.
pub fn request_errors(err: &juniper::GraphQLError) -> serde_json::Value {
    use juniper::{GraphQLError as Refused, ParseError};
    let code = match err {
        Refused::ParseError(parse) => match parse.item {
            ParseError::DepthLimitExceeded(_) => "QUERY_TOO_DEEP",
            ParseError::FieldLimitExceeded(_) => "QUERY_TOO_COMPLEX",
            ParseError::TokenLimitExceeded(_) => "QUERY_TOO_LARGE",
            _ => "GRAPHQL_PARSE_FAILED",
        },
        Refused::ValidationError(_) => "GRAPHQL_VALIDATION_FAILED",
        _ => "BAD_REQUEST",
    };
    let mut errors = serde_json::to_value(err)
        .ok()
        .filter(serde_json::Value::is_array)
        .unwrap_or_else(|| serde_json::json!([{"message": err.to_string()}]));
    if let serde_json::Value::Array(items) = &mut errors {
        for item in items {
            if let serde_json::Value::Object(map) = item {
                map.insert("extensions".into(), serde_json::json!({ "code": code }));
            }
        }
    }
    errors
}

/// `{"code": "<CODE>"}`, the `extensions` of an error.
pub fn extensions<S: ScalarValue>(code: &str) -> Value<S> {
    let mut object = Object::with_capacity(1);
    object.add_field("code", Value::scalar(code.to_owned()));
    Value::Object(object)
}

impl<S: ScalarValue> IntoFieldError<S> for GraphQLError {
    fn into_field_error(self) -> FieldError<S> {
        FieldError::new(self.to_string(), extensions(self.code()))
    }
}

impl From<DbError> for GraphQLError {
    fn from(err: DbError) -> Self {
        match err {
            DbError::Unavailable(cause) => {
                tracing::warn!(%cause, "database unavailable");
                GraphQLError::Unavailable
            }
            other => {
                tracing::error!(error = %other, "database error");
                GraphQLError::Internal
            }
        }
    }
}

impl From<WriteError> for GraphQLError {
    fn from(err: WriteError) -> Self {
        match err {
            WriteError::NotFound => GraphQLError::NotFound("car not found".into()),
            WriteError::Forbidden => GraphQLError::Forbidden(err.to_string()),
            WriteError::UnknownUser => GraphQLError::Unauthenticated(err.to_string()),
            WriteError::Db(db) => db.into(),
        }
    }
}

type FieldResult<T> = Result<T, GraphQLError>;

/// A user: a car's owner, or the caller (`me`).
pub struct User {
    pub id: i64,
    pub username: String,
    pub is_staff: bool,
}

#[graphql_object(context = Context)]
impl User {
    fn id(&self) -> ID {
        ID::new(self.id.to_string())
    }
    fn username(&self) -> &str {
        &self.username
    }
    /// Staff may change any car.
    fn is_staff(&self) -> bool {
        self.is_staff
    }
}

impl From<Owner> for User {
    fn from(owner: Owner) -> Self {
        Self {
            id: owner.id,
            username: owner.username,
            is_staff: owner.is_staff,
        }
    }
}

/// A car, with the reference's fields.
#[graphql_object(name = "Car", context = Context)]
impl Car {
    fn id(&self) -> ID {
        ID::new(self.id.to_string())
    }
    fn make(&self) -> &str {
        &self.make
    }
    fn model(&self) -> &str {
        &self.model
    }
    fn variant(&self) -> &str {
        &self.variant
    }
    fn year(&self) -> &str {
        &self.year
    }
    /// Who may change it (besides staff); none for the demo fixture's Car 1.
    fn owner(&self) -> Option<User> {
        self.owner.clone().map(User::from)
    }
}

#[derive(GraphQLObject)]
#[graphql(context = Context)]
pub struct PageInfo {
    pub has_next_page: bool,
    /// Pass as `after` to get the next page.
    pub end_cursor: Option<ID>,
}

/// One page of cars, in id order.
pub struct CarPage {
    cars: Vec<Car>,
    total_count: i64,
    has_next_page: bool,
}

#[graphql_object(context = Context)]
impl CarPage {
    fn nodes(&self) -> &[Car] {
        &self.cars
    }
    /// All cars, not only this page's.
    fn total_count(&self) -> i32 {
        i32::try_from(self.total_count).unwrap_or(i32::MAX)
    }
    fn page_info(&self) -> PageInfo {
        PageInfo {
            has_next_page: self.has_next_page,
            end_cursor: self.cars.last().map(|car| ID::new(car.id.to_string())),
        }
    }
}

#[derive(GraphQLInputObject)]
pub struct CarInput {
    pub make: String,
    pub model: String,
    /// Empty when left out.
    pub variant: Option<String>,
    /// Empty when left out.
    pub year: Option<String>,
}

/// Fields to change; those left out keep their value.
#[derive(GraphQLInputObject)]
pub struct CarPatch {
    pub make: Option<String>,
    pub model: Option<String>,
    pub variant: Option<String>,
    pub year: Option<String>,
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
        let claims = context.claims()?;
        let store = context.store()?;
        let user = db::users::find_by_id(&store.pool, claims.user_id)
            .await?
            .filter(|user| user.is_active)
            .ok_or_else(|| {
                GraphQLError::Unauthenticated(
                    "the signed-in user no longer exists or is inactive".into(),
                )
            })?;
        Ok(User {
            id: user.id,
            username: user.username,
            is_staff: user.is_staff,
        })
    }

    /// One car, or null when there is none with this id.
    async fn car(context: &Context, pk: ID) -> FieldResult<Option<Car>> {
        context.claims()?;
        let Ok(id) = parse_pk(&pk) else {
            return Ok(None);
        };
        Ok(db::cars::find(&context.store()?.pool, id).await?)
    }

    /// Cars in id order, `first` (1-100) at a time after the cursor `after`.
    async fn cars(
        context: &Context,
        #[graphql(default = 20)] first: i32,
        after: Option<ID>,
    ) -> FieldResult<CarPage> {
        context.claims()?;
        if !(1..=MAX_PAGE_SIZE).contains(&first) {
            return Err(GraphQLError::BadUserInput(format!(
                "`first` must be between 1 and {MAX_PAGE_SIZE}"
            )));
        }
        let after = after.as_ref().map(parse_pk).transpose()?;
        let (cars, has_next_page, total_count) =
            db::cars::page(&context.store()?.pool, after, i64::from(first)).await?;
        Ok(CarPage {
            cars,
            total_count,
            has_next_page,
        })
    }
}

pub struct Mutation;

#[graphql_object(context = Context)]
impl Mutation {
    /// Creates a car owned by the signed-in user.
    async fn create_car(context: &Context, input: CarInput) -> FieldResult<Car> {
        let user_id = context.claims()?.user_id;
        let new = NewCar {
            make: required_text("make", input.make)?,
            model: required_text("model", input.model)?,
            variant: text("variant", input.variant.unwrap_or_default())?,
            year: text("year", input.year.unwrap_or_default())?,
        };
        Ok(context.store()?.create_car(user_id, new).await?)
    }

    /// Changes a car; only its owner or staff may.
    async fn update_car(context: &Context, pk: ID, input: CarPatch) -> FieldResult<Car> {
        let user_id = context.claims()?.user_id;
        let id = parse_pk(&pk)?;
        let changes = CarChanges {
            make: input.make.map(|v| required_text("make", v)).transpose()?,
            model: input.model.map(|v| required_text("model", v)).transpose()?,
            variant: input.variant.map(|v| text("variant", v)).transpose()?,
            year: input.year.map(|v| text("year", v)).transpose()?,
        };
        Ok(context
            .store()?
            .update_car(Actor::User(user_id), id, changes)
            .await?)
    }

    /// Deletes a car (only its owner or staff may) and returns it as it was.
    async fn delete_car(context: &Context, pk: ID) -> FieldResult<Car> {
        let user_id = context.claims()?.user_id;
        let id = parse_pk(&pk)?;
        Ok(context
            .store()?
            .delete_car(Actor::User(user_id), id)
            .await?)
    }
}

pub type CarStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = Car> + Send>>;

pub struct Subscription;

#[graphql_subscription(context = Context)]
impl Subscription {
    /// Every change of the car `pk` (the reference's subscription; `pk: 1` and `pk: "1"` both work).
    async fn car_model_updated(context: &Context, pk: ID) -> Result<CarStream, FieldError> {
        context.claims().map_err(IntoFieldError::into_field_error)?;
        let id = parse_pk(&pk).map_err(IntoFieldError::into_field_error)?;
        let stream = event_stream(context, EventType::CarUpdated)?
            .filter(move |car| std::future::ready(car.id == id));
        Ok(Box::pin(stream))
    }

    /// Every car created.
    async fn car_created(context: &Context) -> Result<CarStream, FieldError> {
        context.claims().map_err(IntoFieldError::into_field_error)?;
        event_stream(context, EventType::CarCreated)
    }

    /// Every car deleted, as it was before.
    async fn car_deleted(context: &Context) -> Result<CarStream, FieldError> {
        context.claims().map_err(IntoFieldError::into_field_error)?;
        event_stream(context, EventType::CarDeleted)
    }
}

fn event_stream(context: &Context, event_type: EventType) -> Result<CarStream, FieldError> {
    let source = context.events.as_ref().ok_or_else(|| {
        GraphQLError::BadRequest(SUBSCRIPTION_OVER_HTTP.into()).into_field_error()
    })?;
    Ok(Box::pin(
        source.subscribe(event_type).map(|envelope| envelope.data),
    ))
}

/// The answer to a subscription sent where only queries and mutations are served.
pub const SUBSCRIPTION_OVER_HTTP: &str = "subscriptions are not served over HTTP: connect a \
     websocket to this same URL (/graphql/) with the graphql-transport-ws or graphql-ws protocol";

fn parse_pk(pk: &ID) -> Result<i64, GraphQLError> {
    pk.trim()
        .parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| GraphQLError::BadUserInput(format!("`{}` is not a car id", &**pk)))
}

fn text(field: &str, value: String) -> Result<String, GraphQLError> {
    let value = value.trim().to_owned();
    if value.chars().count() > MAX_FIELD_CHARS {
        return Err(GraphQLError::BadUserInput(format!(
            "`{field}` must be at most {MAX_FIELD_CHARS} characters"
        )));
    }
    Ok(value)
}

fn required_text(field: &str, value: String) -> Result<String, GraphQLError> {
    let value = text(field, value)?;
    if value.is_empty() {
        return Err(GraphQLError::BadUserInput(format!(
            "`{field}` may not be blank"
        )));
    }
    Ok(value)
}

/// The schema in GraphQL SDL, printed from introspection: types sorted by name, fields in
/// declaration order. `schema.graphql` at the repository root holds this text; a test compares.
pub fn sdl() -> String {
    let schema = schema(DocumentLimits::default());
    let context = Context::new(Err(AuthError::MissingHeader));
    let (value, _errors) =
        match juniper::introspect(&schema, &context, juniper::IntrospectionFormat::All) {
            Ok(result) => result,
            Err(err) => return format!("# introspection failed: {err}\n"),
        };
    let json = serde_json::to_value(&value).unwrap_or_default();
    print_sdl(&json["__schema"])
}

fn print_sdl(schema: &serde_json::Value) -> String {
    use serde_json::Value as J;
    let name_of = |v: &J, key: &str| v[key]["name"].as_str().map(str::to_owned);
    let mut out = String::new();
    let _ = writeln!(out, "schema {{");
    for (kind, key) in [
        ("query", "queryType"),
        ("mutation", "mutationType"),
        ("subscription", "subscriptionType"),
    ] {
        if let Some(name) = name_of(schema, key) {
            let _ = writeln!(out, "  {kind}: {name}");
        }
    }
    let _ = writeln!(out, "}}");
    let mut types: Vec<&J> = schema["types"]
        .as_array()
        .map(|types| types.iter().collect())
        .unwrap_or_default();
    types.sort_by_key(|t| t["name"].as_str().unwrap_or_default().to_owned());
    for ty in types {
        let name = ty["name"].as_str().unwrap_or_default();
        let kind = ty["kind"].as_str().unwrap_or_default();
        if name.starts_with("__")
            || (kind == "SCALAR" && ["String", "Int", "Float", "Boolean", "ID"].contains(&name))
        {
            continue;
        }
        out.push('\n');
        description(&mut out, &ty["description"], "");
        match kind {
            "SCALAR" => {
                let _ = writeln!(out, "scalar {name}");
            }
            "ENUM" => {
                let _ = writeln!(out, "enum {name} {{");
                for value in ty["enumValues"].as_array().into_iter().flatten() {
                    description(&mut out, &value["description"], "  ");
                    let _ = writeln!(out, "  {}", value["name"].as_str().unwrap_or_default());
                }
                let _ = writeln!(out, "}}");
            }
            "UNION" => {
                let members: Vec<&str> = ty["possibleTypes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|t| t["name"].as_str())
                    .collect();
                let _ = writeln!(out, "union {name} = {}", members.join(" | "));
            }
            "INPUT_OBJECT" => {
                let _ = writeln!(out, "input {name} {{");
                for field in ty["inputFields"].as_array().into_iter().flatten() {
                    description(&mut out, &field["description"], "  ");
                    let _ = writeln!(out, "  {}", input_value(field));
                }
                let _ = writeln!(out, "}}");
            }
            _ => {
                let keyword = if kind == "INTERFACE" {
                    "interface"
                } else {
                    "type"
                };
                let interfaces: Vec<&str> = ty["interfaces"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|t| t["name"].as_str())
                    .collect();
                let implements = if interfaces.is_empty() {
                    String::new()
                } else {
                    format!(" implements {}", interfaces.join(" & "))
                };
                let _ = writeln!(out, "{keyword} {name}{implements} {{");
                for field in ty["fields"].as_array().into_iter().flatten() {
                    description(&mut out, &field["description"], "  ");
                    let args: Vec<String> = field["args"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(input_value)
                        .collect();
                    let args = if args.is_empty() {
                        String::new()
                    } else {
                        format!("({})", args.join(", "))
                    };
                    let deprecated = if field["isDeprecated"].as_bool() == Some(true) {
                        format!(
                            " @deprecated(reason: {})",
                            serde_json::Value::from(
                                field["deprecationReason"]
                                    .as_str()
                                    .unwrap_or("No longer supported")
                            )
                        )
                    } else {
                        String::new()
                    };
                    let _ = writeln!(
                        out,
                        "  {}{args}: {}{deprecated}",
                        field["name"].as_str().unwrap_or_default(),
                        type_ref(&field["type"])
                    );
                }
                let _ = writeln!(out, "}}");
            }
        }
    }
    out
}

fn description(out: &mut String, description: &serde_json::Value, indent: &str) {
    if let Some(text) = description.as_str().filter(|t| !t.is_empty()) {
        let _ = writeln!(out, "{indent}\"\"\"");
        for line in text.lines() {
            let _ = writeln!(out, "{indent}{line}");
        }
        let _ = writeln!(out, "{indent}\"\"\"");
    }
}

fn input_value(value: &serde_json::Value) -> String {
    let mut text = format!(
        "{}: {}",
        value["name"].as_str().unwrap_or_default(),
        type_ref(&value["type"])
    );
    if let Some(default) = value["defaultValue"].as_str() {
        let _ = write!(text, " = {default}");
    }
    text
}

fn type_ref(ty: &serde_json::Value) -> String {
    match ty["kind"].as_str() {
        Some("NON_NULL") => format!("{}!", type_ref(&ty["ofType"])),
        Some("LIST") => format!("[{}]", type_ref(&ty["ofType"])),
        _ => ty["name"].as_str().unwrap_or_default().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_fields_of_a_subscription_are_counted_through_fragments() {
        let schema = schema(DocumentLimits::default());
        let fields = |query: &str| subscription_root_fields(&schema, query, None);
        let count = |query: &str| fields(query).map(|f| f.count);
        assert_eq!(
            fields("subscription { carCreated { id } }"),
            Some(RootFields {
                count: 1,
                first: Some("carCreated".to_owned())
            })
        );
        assert_eq!(
            count("subscription { a: carCreated { id } b: carCreated { id } }"),
            Some(2)
        );
        assert_eq!(
            count(
                "subscription { ...Both } fragment Both on Subscription { carCreated { id } \
                 ... on Subscription { carDeleted { id } } }"
            ),
            Some(2)
        );
        // A cycle is juniper's to report; it is not walked.
        assert_eq!(
            fields("subscription { ...A } fragment A on Subscription { ...A }"),
            None
        );
        assert_eq!(fields("{ hi }"), None, "not a subscription");
        assert_eq!(fields("subscription {"), None, "does not parse");
        assert_eq!(
            subscription_root_fields(
                &schema,
                "query Q { hi } subscription S { carCreated { id } }",
                Some("S")
            )
            .and_then(|f| f.first),
            Some("carCreated".to_owned())
        );
        assert!(is_subscription_field(&schema, "carModelUpdated"));
        assert!(!is_subscription_field(&schema, "hi"));
    }

    #[test]
    fn field_counts_expand_fragments_and_count_aliases() {
        let schema = schema(DocumentLimits::default());
        let count = |query: &str| operation_field_count(&schema, query, None);
        assert_eq!(count("{ hi }"), Some(1));
        assert_eq!(count("{ a: hi b: hi }"), Some(2));
        assert_eq!(count("{ cars { id make } }"), Some(3));
        assert_eq!(
            count("{ ...F ...F } fragment F on Query { cars { id } }"),
            Some(4)
        );
        assert_eq!(count("{"), None);
        // Fragments spreading each other in a ring: refused without walking their paths (an
        // unmemoized walk of eleven such fragments took minutes: found by fuzzing).
        let ring: String = (0..11)
            .map(|n| {
                let others: String = (0..11)
                    .filter(|m| *m != n)
                    .map(|m| format!("...F{m} "))
                    .collect();
                format!("fragment F{n} on Query {{ {others} }} ")
            })
            .collect();
        assert_eq!(count(&format!("{{ ...F0 }} {ring}")), None);
        // A diamond (each fragment spreading the next twice) is counted once per fragment.
        assert_eq!(
            count(
                "{ ...A } fragment A on Query { ...B ...B } fragment B on Query { ...C ...C } \
                 fragment C on Query { hi }"
            ),
            Some(4)
        );
    }

    #[test]
    fn unknown_variable_types_are_found_before_validation() {
        let schema = schema(DocumentLimits::default());
        assert!(unknown_variable_type(&schema, "query($i: I = D) { hi }")
            .is_some_and(|message| message.contains("\"I\"")));
        assert_eq!(
            unknown_variable_type(&schema, "query($pk: ID!) { car(pk: $pk) { id } }"),
            None
        );
        assert_eq!(unknown_variable_type(&schema, "{ hi }"), None);
    }
}
