//! Connections the server terminated (a PostgreSQL restart, an administrator's
//! `pg_terminate_backend`) are discarded, not given to the next caller: `/readyz` says ready as
//! soon as the database answers again, and no request after it meets a dead connection.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use diesel::{Connection, PgConnection, RunQueryDsl};

fn select_one(conn: &mut store::AnyConnection) -> diesel::QueryResult<()> {
    diesel::sql_query("SELECT 1").execute(conn).map(|_| ())
}

#[tokio::test]
async fn connections_terminated_by_the_server_are_replaced_not_reused() {
    let db = test_support::TestDb::new();
    let pool = store::pool(&store::settings::DatabaseArgs {
        database_url: db.url.clone(),
        database_pool_size: 4,
        database_timeout_secs: 5,
    });
    // Four connections in the pool, all idle afterwards.
    let busy = |pool: store::DbPool| async move {
        store::run(&pool, |conn| {
            diesel::sql_query("SELECT pg_sleep(0.2)")
                .execute(conn)
                .map(|_| ())
        })
        .await
    };
    let (a, b, c, d) = tokio::join!(
        busy(pool.clone()),
        busy(pool.clone()),
        busy(pool.clone()),
        busy(pool.clone())
    );
    assert!(a.is_ok() && b.is_ok() && c.is_ok() && d.is_ok());
    assert_eq!(pool.state().connections, 4);

    let mut admin = PgConnection::establish(&test_support::admin_url()).unwrap();
    diesel::sql_query(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = '{}' AND pid <> pg_backend_pid()",
        db.name
    ))
    .execute(&mut admin)
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Ready at once: the probe's first try may meet a dead connection, never its second.
    store::ping(&pool).await.unwrap();
    // And every request after it gets a live connection, however many idle ones died.
    for attempt in 0..12 {
        let answered = store::run(&pool, select_one).await;
        assert!(
            answered.is_ok(),
            "request {attempt} after the restart: {answered:?}"
        );
    }
}
