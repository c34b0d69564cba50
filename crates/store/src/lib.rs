//! Storage through diesel, on PostgreSQL (the distributed stack) or SQLite (the embedded mode):
//! the pool, the embedded migrations and the queries: users and tokens for auth-service, the
//! domain's tables ([`cars`]) behind the generic write path ([`records`]), the outbox and the
//! [`repository`] that publishes what the outbox holds. One code path serves both: every query is
//! written once against [`AnyConnection`], diesel's `MultiConnection` over the two backends; the
//! few statements one backend spells differently (`ON CONFLICT`, `setval`) go through
//! [`each_backend!`], which compiles the same expression for each. No other crate imports
//! diesel (Cargo enforces it: the others do not depend on it), so storage changes in one place.

pub mod blacklist;
pub mod cars;
pub mod idempotency;
pub mod outbox;
pub mod records;
pub mod repository;
pub mod schema;
pub mod service_visits;
pub mod settings;
pub mod users;

use std::time::{Duration, Instant};

use diesel::r2d2::{ManageConnection, Pool, PooledConnection};
use diesel::{Connection, PgConnection, QueryResult, RunQueryDsl, SqliteConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::settings::DatabaseArgs;
use service_kit::error::ApiError;

const PG_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// Any number; it only has to be the same in every process that migrates this database.
const MIGRATION_LOCK_KEY: i64 = 0x6771_6c77_735f_6d69;

/// How long an SQLite statement waits for another connection's (or process's) write lock.
const SQLITE_BUSY_TIMEOUT_MS: u32 = 5_000;

/// A connection to either backend. Queries written against it run on both.
#[derive(diesel::MultiConnection)]
pub enum AnyConnection {
    Postgresql(PgConnection),
    Sqlite(SqliteConnection),
}

/// Runs the same diesel expression on whichever backend `$conn` is, for the statements
/// `MultiConnection` cannot express (it has no `ON CONFLICT`). The body is compiled once per
/// backend, so it is still one piece of code.
macro_rules! each_backend {
    ($conn:expr, |$inner:ident| $body:expr) => {
        match $conn {
            $crate::AnyConnection::Postgresql($inner) => $body,
            $crate::AnyConnection::Sqlite($inner) => $body,
        }
    };
}
pub(crate) use each_backend;

/// Which database a URL names: `postgres://…`/`postgresql://…`, or `sqlite://path`/`file:path`
/// (a bare path ending in `.db`/`.sqlite` too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    pub fn of_url(database_url: &str) -> Result<Backend, String> {
        let url = database_url.trim();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("sqlite:")
            || url.starts_with("file:")
            || url.ends_with(".db")
            || url.ends_with(".sqlite")
            || url == ":memory:"
        {
            Ok(Backend::Sqlite)
        } else {
            Err("expected postgres://… or sqlite://<path>".to_owned())
        }
    }
}

/// The file an SQLite URL names (`None` for an in-memory database), so callers can create its
/// directory.
pub fn sqlite_path(database_url: &str) -> Option<std::path::PathBuf> {
    let rest = database_url
        .strip_prefix("sqlite://")
        .or_else(|| database_url.strip_prefix("sqlite:"))
        .or_else(|| database_url.strip_prefix("file:"))
        .unwrap_or(database_url);
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && path != ":memory:").then(|| std::path::PathBuf::from(path))
}

/// Opens a connection to the backend the URL names (never guessing by trial, so a PostgreSQL URL
/// whose server is down is an error, not an SQLite file of that name). SQLite connections get WAL
/// (readers do not block the writer), a busy timeout (the server and a `trigger-event` process
/// both write the file) and foreign keys.
pub fn establish(database_url: &str) -> Result<AnyConnection, diesel::ConnectionError> {
    let backend =
        Backend::of_url(database_url).map_err(diesel::ConnectionError::InvalidConnectionUrl)?;
    match backend {
        Backend::Postgres => PgConnection::establish(database_url).map(AnyConnection::Postgresql),
        Backend::Sqlite => {
            let url = match database_url
                .strip_prefix("sqlite:")
                .filter(|_| !database_url.starts_with("sqlite://"))
            {
                // `sqlite:path` (one colon, as sqlx writes it) → a path.
                Some(path) => path.to_owned(),
                None => database_url.to_owned(),
            };
            let mut conn = SqliteConnection::establish(&url)?;
            for pragma in [
                format!("PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}"),
                "PRAGMA journal_mode = WAL".to_owned(),
                "PRAGMA synchronous = NORMAL".to_owned(),
                "PRAGMA foreign_keys = ON".to_owned(),
            ] {
                diesel::sql_query(pragma)
                    .execute(&mut conn)
                    .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
            }
            Ok(AnyConnection::Sqlite(conn))
        }
    }
}

/// The r2d2 manager: [`establish`] per connection, and the backend's own validity check.
#[derive(Debug, Clone)]
pub struct Manager {
    database_url: String,
}

impl ManageConnection for Manager {
    type Connection = AnyConnection;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<AnyConnection, Self::Error> {
        establish(&self.database_url).map_err(diesel::r2d2::Error::ConnectionError)
    }

    fn is_valid(&self, conn: &mut AnyConnection) -> Result<(), Self::Error> {
        diesel::sql_query("SELECT 1")
            .execute(conn)
            .map(|_| ())
            .map_err(diesel::r2d2::Error::QueryError)
    }

    /// Also true for the connection [`run`] just found dead: diesel's own check only knows of
    /// a broken transaction, so a connection whose server side was terminated (a restart, an
    /// administrator's `pg_terminate_backend`) would go back to the pool and fail every caller
    /// that draws it, until r2d2 retires it minutes later.
    fn has_broken(&self, conn: &mut AnyConnection) -> bool {
        use diesel::r2d2::R2D2Connection;
        DISCARD.with(std::cell::Cell::take) || conn.is_broken()
    }
}

thread_local! {
    /// Set by [`run`] right before it drops a connection it found dead; read by `has_broken`,
    /// which r2d2 calls on the same thread as the connection goes back.
    static DISCARD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Until when (unix ms) connections are checked before use: a connection was found dead lately,
/// and the pool's other idle ones most likely died with it.
static SUSPECT_UNTIL_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// How long after a dead connection every checkout is checked first.
const SUSPECT_FOR_MS: i64 = 30_000;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Gives a dead connection back for r2d2 to discard.
fn discard(conn: DbConn) {
    DISCARD.with(|discard| discard.set(true));
    drop(conn);
    // Cleared in case r2d2 did not ask (a pool being dropped).
    DISCARD.with(|discard| discard.set(false));
}

/// A connection from the pool; after a connection was found dead lately, one that answers
/// `SELECT 1` (the dead ones met on the way are discarded).
fn checkout(pool: &DbPool) -> Result<DbConn, DbError> {
    let attempts = pool.max_size() + 1;
    for _ in 0..attempts {
        let mut conn = pool
            .get()
            .map_err(|err| DbError::Unavailable(err.to_string()))?;
        if SUSPECT_UNTIL_MS.load(std::sync::atomic::Ordering::Relaxed) < now_ms() {
            return Ok(conn);
        }
        if diesel::sql_query("SELECT 1").execute(&mut *conn).is_ok() {
            return Ok(conn);
        }
        discard(conn);
    }
    Err(DbError::Unavailable(
        "no pooled connection answers; the database may be restarting".into(),
    ))
}

pub type DbPool = Pool<Manager>;
type DbConn = PooledConnection<Manager>;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("no database connection available: {0}")]
    Unavailable(String),
    #[error("database query failed: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("database task was cancelled")]
    Cancelled,
}

impl From<DbError> for ApiError {
    fn from(err: DbError) -> Self {
        match err {
            DbError::Unavailable(msg) => ApiError::Unavailable(format!("database: {msg}")),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<DbError> for domain::StoreError {
    fn from(err: DbError) -> Self {
        match err {
            DbError::Unavailable(msg) => domain::StoreError::Unavailable(msg),
            other => domain::StoreError::Failed(other.to_string()),
        }
    }
}

/// The `/readyz` check of the database.
pub fn readiness_probe(pool: DbPool) -> service_kit::http::Probe {
    std::sync::Arc::new(move || {
        let pool = pool.clone();
        Box::pin(async move { ping(&pool).await.map_err(|err| err.to_string()) })
    })
}

/// Builds the pool without connecting, so a process can start (and say "not ready") while the
/// database is away; connections are made on first use and re-made after a failure. On SQLite
/// the pool holds one connection: SQLite has one writer at a time anyway, and a single connection
/// keeps a read-then-write transaction from ever meeting a busy lock inside the process.
pub fn pool(args: &DatabaseArgs) -> DbPool {
    let size = match Backend::of_url(&args.database_url) {
        Ok(Backend::Sqlite) => 1,
        _ => args.database_pool_size,
    };
    Pool::builder()
        .max_size(size)
        .min_idle(Some(0))
        .connection_timeout(args.timeout())
        .test_on_check_out(false)
        .build_unchecked(Manager {
            database_url: args.database_url.clone(),
        })
}

/// Runs blocking diesel work on tokio's blocking pool so it never stalls the async workers.
pub async fn run<T, F>(pool: &DbPool, work: F) -> Result<T, DbError>
where
    T: Send + 'static,
    F: FnOnce(&mut AnyConnection) -> Result<T, diesel::result::Error> + Send + 'static,
{
    let pool = pool.clone();
    // The caller's span, for what the work traces (a transaction's span is its child).
    let span = service_kit::telemetry::span(tracing::Span::current);
    // The blocking pool is bounded (`service_kit::http::ServerOptions::blocking_threads`): past its
    // size, calls wait in its queue, not in threads of their own.
    tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        let mut conn = checkout(&pool)?;
        match work(&mut conn) {
            Ok(value) => Ok(value),
            Err(err) => {
                let err = classify(err, &mut conn);
                if matches!(err, DbError::Unavailable(_)) {
                    SUSPECT_UNTIL_MS.store(
                        now_ms() + SUSPECT_FOR_MS,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    discard(conn);
                }
                Err(err)
            }
        }
    })
    .await
    .map_err(|_| DbError::Cancelled)?
}

/// Runs `work` in one transaction. On SQLite it is `BEGIN IMMEDIATE`: the write lock is taken up
/// front (waiting up to the busy timeout), because a deferred transaction that reads and then
/// writes fails at once, without waiting, when another process (a `trigger-event`) wrote in
/// between. PostgreSQL uses diesel's ordinary transaction. An `Err` from `work` rolls back.
pub(crate) fn write_transaction<T, F>(conn: &mut AnyConnection, work: F) -> QueryResult<T>
where
    F: FnOnce(&mut AnyConnection) -> QueryResult<T>,
{
    if !matches!(conn, AnyConnection::Sqlite(_)) {
        return conn.transaction(work);
    }
    diesel::sql_query("BEGIN IMMEDIATE").execute(conn)?;
    let outcome = work(conn).and_then(|value| {
        diesel::sql_query("COMMIT").execute(conn)?;
        Ok(value)
    });
    if outcome.is_err() {
        // Nothing to do when it fails too: the connection is then broken and the pool drops it.
        let _ = diesel::sql_query("ROLLBACK").execute(conn);
    }
    outcome
}

/// The current time as stored: UTC without a zone, to the microsecond (both backends' precision,
/// so that a value read back compares equal).
pub fn now() -> chrono::NaiveDateTime {
    use chrono::SubsecRound as _;
    chrono::Utc::now().naive_utc().trunc_subsecs(6)
}

/// A short digest of the embedded migrations' names, so that test harnesses can keep one
/// migrated template database per migration set.
pub fn migration_fingerprint() -> String {
    use diesel::migration::MigrationSource;
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    if let Ok(migrations) = MigrationSource::<diesel::pg::Pg>::migrations(&PG_MIGRATIONS) {
        for migration in migrations {
            hasher.update(migration.name().to_string().as_bytes());
        }
    }
    hasher.finalize()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Tells a lost database (dropped connection, server shut down, database gone) from a failing
/// query: a database error is followed by a `SELECT 1` on the same connection, and if that fails
/// too the database is unavailable. Only the error path pays for the probe.
fn classify(err: diesel::result::Error, conn: &mut AnyConnection) -> DbError {
    use diesel::result::{DatabaseErrorKind, Error};
    match &err {
        Error::DatabaseError(DatabaseErrorKind::ClosedConnection, info) => {
            DbError::Unavailable(info.message().to_owned())
        }
        Error::DatabaseError(_, info) => {
            if diesel::sql_query("SELECT 1").execute(conn).is_err() {
                DbError::Unavailable(info.message().to_owned())
            } else {
                DbError::Query(err)
            }
        }
        _ => DbError::Query(err),
    }
}

/// `SELECT 1`, for `/readyz`. Once more when it fails for want of a connection: the first
/// query after the database came back meets a connection that died with it (and discards
/// it); that says nothing of the database now.
pub async fn ping(pool: &DbPool) -> Result<(), DbError> {
    let once = || {
        run(pool, |conn| {
            diesel::sql_query("SELECT 1").execute(conn).map(|_| ())
        })
    };
    match once().await {
        Err(DbError::Unavailable(_)) => once().await,
        other => other,
    }
}

/// [`migrate`] on the blocking pool (it blocks while it waits for the database), logging what
/// it applied: how every service and command migrates.
pub async fn migrate_async(database_url: &str, wait: Duration) -> Result<usize, String> {
    let url = database_url.to_owned();
    let applied = tokio::task::spawn_blocking(move || migrate(&url, wait))
        .await
        .map_err(|err| format!("the migration task failed: {err}"))??;
    if applied > 0 {
        tracing::info!(applied, "database migrations applied");
    }
    Ok(applied)
}

/// Applies pending migrations, waiting up to `wait` for the database to accept connections (in a
/// compose stack the services may start first). On PostgreSQL an advisory lock serialises
/// replicas that start together; on SQLite the file's own write lock does (and the file's
/// directory is created first).
pub fn migrate(database_url: &str, wait: Duration) -> Result<usize, String> {
    let backend =
        Backend::of_url(database_url).map_err(|err| format!("bad database URL: {err}"))?;
    if backend == Backend::Sqlite {
        if let Some(dir) = sqlite_path(database_url)
            .as_deref()
            .and_then(std::path::Path::parent)
        {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
            }
        }
    }
    let deadline = Instant::now() + wait;
    let conn = loop {
        match establish(database_url) {
            Ok(conn) => break conn,
            Err(err) if Instant::now() < deadline => {
                tracing::warn!(error = %err, "database not reachable yet; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(err) => return Err(format!("cannot connect to the database: {err}")),
        }
    };
    match conn {
        AnyConnection::Postgresql(mut conn) => migrate_postgres(&mut conn),
        AnyConnection::Sqlite(mut conn) => conn
            .run_pending_migrations(SQLITE_MIGRATIONS)
            .map(|applied| applied.len())
            .map_err(|err| format!("migration failed: {err}")),
    }
}

fn migrate_postgres(conn: &mut PgConnection) -> Result<usize, String> {
    diesel::sql_query(format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))
        .execute(conn)
        .map_err(|err| format!("cannot take the migration lock: {err}"))?;
    let result = conn
        .run_pending_migrations(PG_MIGRATIONS)
        .map(|applied| applied.len())
        .map_err(|err| format!("migration failed: {err}"));
    // Closing the connection releases the lock too; unlocking explicitly just frees it sooner.
    let _ =
        diesel::sql_query(format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})")).execute(conn);
    result
}
