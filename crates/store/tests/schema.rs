//! The hand-written diesel schema (every `table!` of `src/`) against the migrations: after migrating a
//! fresh PostgreSQL database and a fresh SQLite file, every table and column `schema.rs`
//! declares exists with a matching type and nullability, and no migrated table or column is
//! missing from it. A migration without its `table!` (or the reverse) fails here, not at the
//! first query in production.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use diesel::sql_types::{BigInt, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl, SqliteConnection};

/// table → column → (diesel type without `Nullable`, nullable)
type Columns = BTreeMap<String, BTreeMap<String, (String, bool)>>;

/// The `diesel::table!` blocks of every file of `src/` (the shared tables in `schema.rs`, each
/// domain type's beside its SQL).
fn declared() -> Columns {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut source = String::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|ext| ext == "rs") {
            source.push_str(&std::fs::read_to_string(&path).unwrap());
            source.push('\n');
        }
    }
    let mut tables = Columns::new();
    let mut current: Option<String> = None;
    let mut in_table = false;
    for line in source.lines().map(str::trim) {
        if line == "diesel::table! {" {
            in_table = true;
            continue;
        }
        if !in_table {
            continue;
        }
        if let Some(name) = line.strip_suffix('{').and_then(|head| {
            let head = head.trim();
            head.contains('(')
                .then(|| head.split('(').next().unwrap_or("").trim().to_owned())
        }) {
            tables.entry(name.clone()).or_default();
            current = Some(name);
        } else if let (Some(table), Some((column, ty))) = (&current, line.split_once("->")) {
            let ty = ty.trim().trim_end_matches(',').trim();
            let (ty, nullable) = match ty.strip_prefix("Nullable<") {
                Some(inner) => (inner.trim_end_matches('>').to_owned(), true),
                None => (ty.to_owned(), false),
            };
            tables
                .get_mut(table)
                .unwrap()
                .insert(column.trim().to_owned(), (ty, nullable));
        } else if line == "}" && current.take().is_none() {
            in_table = false;
        }
    }
    assert!(tables.len() >= 4, "schema.rs parsed to {tables:?}");
    tables
}

/// The diesel type a database's column type maps to.
fn diesel_type(database_type: &str) -> String {
    let upper = database_type.to_ascii_uppercase();
    let base = upper.split('(').next().unwrap_or("").trim();
    match base {
        "BIGINT" | "INT8" => "Int8",
        "INTEGER" | "INT4" | "INT" => "Int4",
        "CHARACTER VARYING" | "VARCHAR" => "Varchar",
        "TEXT" => "Text",
        "BOOLEAN" => "Bool",
        "TIMESTAMP WITHOUT TIME ZONE" | "TIMESTAMP" => "Timestamp",
        other => other,
    }
    .to_owned()
}

fn compare(backend: &str, migrated: &Columns) {
    let declared = declared();
    let names = |c: &Columns| c.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&declared),
        names(migrated),
        "{backend}: the tables declared with `table!` and those of the migrations differ"
    );
    for (table, columns) in &declared {
        let actual = &migrated[table];
        assert_eq!(
            columns.keys().collect::<Vec<_>>(),
            actual.keys().collect::<Vec<_>>(),
            "{backend}: the columns of `{table}` differ"
        );
        for (column, (ty, nullable)) in columns {
            let (actual_ty, actual_nullable) = &actual[column];
            // SQLite's rowid alias is declared INTEGER and holds 64 bits.
            let compatible =
                actual_ty == ty || (backend == "sqlite" && ty == "Int8" && actual_ty == "Int4");
            assert!(
                compatible,
                "{backend}: `{table}.{column}` is {ty} in schema.rs, {actual_ty} migrated"
            );
            assert_eq!(
                nullable, actual_nullable,
                "{backend}: `{table}.{column}` nullability differs"
            );
        }
    }
}

#[derive(QueryableByName)]
struct PgColumn {
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = Text)]
    column_name: String,
    #[diesel(sql_type = Text)]
    data_type: String,
    #[diesel(sql_type = Text)]
    is_nullable: String,
}

#[test]
fn schema_rs_matches_the_postgres_migrations() {
    let admin = test_support::admin_url();
    let database = format!("gqlws_schema_check_{}", test_support::random_suffix());
    let mut conn = PgConnection::establish(&admin).unwrap();
    diesel::sql_query(format!("CREATE DATABASE {database}"))
        .execute(&mut conn)
        .unwrap();
    let url = test_support::with_database(&admin, &database);
    let outcome = std::panic::catch_unwind(|| {
        store::migrate(&url, Duration::from_secs(10)).unwrap();
        let mut db = PgConnection::establish(&url).unwrap();
        let rows: Vec<PgColumn> = diesel::sql_query(
            "SELECT table_name::text, column_name::text, data_type::text, is_nullable::text \
             FROM information_schema.columns WHERE table_schema = 'public' \
             AND table_name <> '__diesel_schema_migrations'",
        )
        .load(&mut db)
        .unwrap();
        let mut migrated = Columns::new();
        for row in rows {
            migrated.entry(row.table_name).or_default().insert(
                row.column_name,
                (diesel_type(&row.data_type), row.is_nullable == "YES"),
            );
        }
        compare("postgres", &migrated);
    });
    let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        .execute(&mut conn);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

#[derive(QueryableByName)]
struct SqliteName {
    #[diesel(sql_type = Text)]
    name: String,
}

#[derive(QueryableByName)]
struct SqliteColumn {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Text, column_name = "type")]
    ty: String,
    #[diesel(sql_type = BigInt)]
    notnull: i64,
    #[diesel(sql_type = BigInt)]
    pk: i64,
}

#[test]
fn schema_rs_matches_the_sqlite_migrations() {
    let path = std::env::temp_dir().join(format!(
        "gqlws-schema-check-{}.db",
        test_support::random_suffix()
    ));
    let url = format!("sqlite://{}", path.display());
    store::migrate(&url, Duration::from_secs(10)).unwrap();
    let mut db = SqliteConnection::establish(&path.display().to_string()).unwrap();
    let tables: Vec<SqliteName> = diesel::sql_query(
        "SELECT name FROM sqlite_master WHERE type = 'table' \
         AND name NOT LIKE 'sqlite_%' AND name <> '__diesel_schema_migrations'",
    )
    .load(&mut db)
    .unwrap();
    let mut migrated = Columns::new();
    for table in tables {
        let columns: Vec<SqliteColumn> = diesel::sql_query(format!(
            "SELECT name, type, \"notnull\", pk FROM pragma_table_info('{}')",
            table.name
        ))
        .load(&mut db)
        .unwrap();
        let entry = migrated.entry(table.name).or_default();
        for column in columns {
            // A primary key is never NULL, whatever its declaration says.
            let nullable = column.notnull == 0 && column.pk == 0;
            entry.insert(column.name, (diesel_type(&column.ty), nullable));
        }
    }
    let _ = std::fs::remove_file(&path);
    compare("sqlite", &migrated);
}

#[test]
fn a_column_missing_from_schema_rs_is_found() {
    // The comparison itself can fail: a migrated column schema.rs does not declare.
    let mut migrated = declared();
    migrated
        .get_mut("cars")
        .unwrap()
        .insert("colour".into(), ("Varchar".into(), true));
    let refused = std::panic::catch_unwind(|| compare("postgres", &migrated));
    assert!(refused.is_err());
}
