//! A PostgreSQL database per test, cloned from a migrated template.

use std::time::Duration;

use diesel::{Connection, PgConnection, RunQueryDsl};

use crate::{admin_url, random_suffix};

/// Replaces the database name (the path) of a PostgreSQL URL.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = base[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(base.len());
    let mut out = format!("{}/{}", &base[..path_start], database);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// A database of the test's own, dropped (with its connections) when this value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

/// Any number; the same in every test process so that only one of them builds a template.
const TEMPLATE_LOCK_KEY: i64 = 0x7465_7374_5f74_706c;

impl TestDb {
    pub fn new() -> Self {
        let admin = admin_url();
        let template = format!("gqlws_template_{}", store::migration_fingerprint());
        let mut conn = PgConnection::establish(&admin)
            .unwrap_or_else(|err| panic!("cannot connect to TEST_DATABASE_URL {admin}: {err}"));
        ensure_template(&mut conn, &admin, &template);
        let name = format!("gqlws_test_{}", random_suffix());
        diesel::sql_query(format!("CREATE DATABASE {name} TEMPLATE {template}"))
            .execute(&mut conn)
            .unwrap();
        Self {
            url: with_database(&admin, &name),
            name,
        }
    }
}

impl TestDb {
    /// Drops the database now, under whatever is connected to it: how a test makes the
    /// database vanish from under a running service.
    pub fn drop_now(&self) {
        let mut conn = PgConnection::establish(&admin_url()).unwrap();
        diesel::sql_query(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut conn)
        .unwrap();
    }
}

impl Default for TestDb {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut conn) = PgConnection::establish(&admin_url()) {
            let _ = diesel::sql_query(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut conn);
        }
    }
}

fn ensure_template(conn: &mut PgConnection, admin: &str, template: &str) {
    #[derive(diesel::QueryableByName)]
    struct Exists {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        exists: bool,
    }
    let exists = |conn: &mut PgConnection| -> bool {
        diesel::sql_query(format!(
            "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = '{template}') AS exists"
        ))
        .get_result::<Exists>(conn)
        .unwrap()
        .exists
    };
    if exists(conn) {
        return;
    }
    // Test binaries (and nextest's per-test processes) race here; the lock makes one build it.
    diesel::sql_query(format!("SELECT pg_advisory_lock({TEMPLATE_LOCK_KEY})"))
        .execute(conn)
        .unwrap();
    if !exists(conn) {
        let building = format!("{template}_building");
        diesel::sql_query(format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"))
            .execute(conn)
            .unwrap();
        diesel::sql_query(format!("CREATE DATABASE {building}"))
            .execute(conn)
            .unwrap();
        store::migrate(&with_database(admin, &building), Duration::from_secs(10)).unwrap();
        // Renaming last means a template that exists is always complete.
        diesel::sql_query(format!("ALTER DATABASE {building} RENAME TO {template}"))
            .execute(conn)
            .unwrap();
    }
    diesel::sql_query(format!("SELECT pg_advisory_unlock({TEMPLATE_LOCK_KEY})"))
        .execute(conn)
        .unwrap();
}
