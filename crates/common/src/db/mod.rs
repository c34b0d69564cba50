//! PostgreSQL through diesel: the pool, the embedded migrations and the queries. No other module or
//! crate imports diesel, so the storage can change in one place.

pub mod cars;
pub mod outbox;
pub mod schema;
pub mod tokens;
pub mod users;

use std::time::{Duration, Instant};

use diesel::r2d2::{ConnectionManager, Pool, PooledConnection};
use diesel::{Connection, PgConnection, RunQueryDsl};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::config::DatabaseArgs;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Any number; it only has to be the same in every process that migrates this database.
const MIGRATION_LOCK_KEY: i64 = 0x6771_6c77_735f_6d69;

pub type DbPool = Pool<ConnectionManager<PgConnection>>;
type DbConn = PooledConnection<ConnectionManager<PgConnection>>;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("no database connection available: {0}")]
    Unavailable(String),
    #[error("database query failed: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("database task was cancelled")]
    Cancelled,
}

/// Builds the pool without connecting, so a process can start (and say "not ready") while the
/// database is away; connections are made on first use and re-made after a failure.
pub fn pool(args: &DatabaseArgs) -> DbPool {
    let manager = ConnectionManager::<PgConnection>::new(&args.database_url);
    Pool::builder()
        .max_size(args.database_pool_size)
        .min_idle(Some(0))
        .connection_timeout(args.timeout())
        .test_on_check_out(false)
        .build_unchecked(manager)
}

/// Runs blocking diesel work on tokio's blocking pool so it never stalls the async workers.
pub async fn run<T, F>(pool: &DbPool, work: F) -> Result<T, DbError>
where
    T: Send + 'static,
    F: FnOnce(&mut PgConnection) -> Result<T, diesel::result::Error> + Send + 'static,
{
    let pool = pool.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn: DbConn = pool
            .get()
            .map_err(|err| DbError::Unavailable(err.to_string()))?;
        work(&mut conn).map_err(|err| classify(err, &mut conn))
    })
    .await
    .map_err(|_| DbError::Cancelled)?
}

/// A short digest of the embedded migrations' names, so that test harnesses can keep one
/// migrated template database per migration set.
pub fn migration_fingerprint() -> String {
    use diesel::migration::MigrationSource;
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    if let Ok(migrations) = MigrationSource::<diesel::pg::Pg>::migrations(&MIGRATIONS) {
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
fn classify(err: diesel::result::Error, conn: &mut PgConnection) -> DbError {
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

/// `SELECT 1`, for `/readyz`.
pub async fn ping(pool: &DbPool) -> Result<(), DbError> {
    run(pool, |conn| {
        diesel::sql_query("SELECT 1").execute(conn).map(|_| ())
    })
    .await
}

/// Applies pending migrations, waiting up to `wait` for the database to accept connections (in a
/// compose stack the services may start first). A PostgreSQL advisory lock serialises replicas
/// that start together.
pub fn migrate(database_url: &str, wait: Duration) -> Result<usize, String> {
    let deadline = Instant::now() + wait;
    let mut conn = loop {
        match PgConnection::establish(database_url) {
            Ok(conn) => break conn,
            Err(err) if Instant::now() < deadline => {
                tracing::warn!(error = %err, "database not reachable yet; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(err) => return Err(format!("cannot connect to the database: {err}")),
        }
    };
    diesel::sql_query(format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))
        .execute(&mut conn)
        .map_err(|err| format!("cannot take the migration lock: {err}"))?;
    let result = conn
        .run_pending_migrations(MIGRATIONS)
        .map(|applied| applied.len())
        .map_err(|err| format!("migration failed: {err}"));
    // Closing the connection releases the lock too; unlocking explicitly just frees it sooner.
    let _ = diesel::sql_query(format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"))
        .execute(&mut conn);
    result
}
