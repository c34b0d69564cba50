//! Readiness that tells the truth: PostgreSQL terminates every connection of a stack's database
//! and refuses new ones for three seconds; while it does, auth-service and api-service say "not
//! ready"; once it takes connections again, the first `/readyz` of each says ready, and the
//! next login, query and mutation each succeed on their first try (no pooled dead connection is
//! handed out, no stale error is reported).

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::client::{admin_tokens, create_car, graphql, http};
use crate::stack::Stack;

fn psql(sql: &str) {
    let status = std::process::Command::new("psql")
        .arg(test_support::admin_url())
        .args(["-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .status()
        .unwrap();
    assert!(status.success(), "psql: {sql}");
}

/// The status of a replica's `/readyz`, and its body.
async fn readyz(port: u16) -> (u16, String) {
    match http()
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .send()
        .await
    {
        Ok(mut response) => {
            let body = response.body().await.unwrap_or_default();
            (
                response.status().as_u16(),
                String::from_utf8_lossy(&body).into_owned(),
            )
        }
        Err(err) => (0, err.to_string()),
    }
}

#[actix_web::test]
async fn after_a_database_outage_the_first_requests_succeed_and_readiness_is_current() {
    let stack = Stack::start("readiness");
    let database = stack
        .database_url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let (access, _) = admin_tokens(&stack).await;
    let bearer = format!("Bearer {access}");
    // Every pool holds connections to lose.
    for _ in 0..4 {
        create_car(&stack, &access, "Before").await;
    }
    let services: Vec<u16> = std::iter::once(stack.auth_port)
        .chain(stack.api_ports.iter().copied())
        .collect();

    psql(&format!(
        "ALTER DATABASE \"{database}\" WITH ALLOW_CONNECTIONS false"
    ));
    psql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'"
    ));
    let refused_until = Instant::now() + Duration::from_secs(3);
    let mut said_not_ready = vec![false; services.len()];
    while Instant::now() < refused_until {
        for (port, seen) in services.iter().zip(said_not_ready.iter_mut()) {
            if readyz(*port).await.0 == 503 {
                *seen = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        said_not_ready,
        vec![true; services.len()],
        "each said not ready during the outage"
    );
    psql(&format!(
        "ALTER DATABASE \"{database}\" WITH ALLOW_CONNECTIONS true"
    ));
    let back = Instant::now();

    // The first answer of each after the database is back.
    for port in &services {
        let (status, body) = readyz(*port).await;
        assert_eq!(status, 200, "replica on {port} after the outage: {body}");
    }
    let ready_after = back.elapsed();

    // First tries, through NGINX: a login, a query, a mutation.
    let (status, body) = crate::client::post_token(&stack.url, "admin", "letmein").await;
    assert_eq!(status, 200, "login: {body}");
    let cars = graphql(
        &stack,
        Some(&bearer),
        "{ cars { totalCount } }",
        Value::Null,
    )
    .await;
    assert!(
        cars["data"]["cars"]["totalCount"].as_i64().unwrap_or(0) >= 4,
        "query: {cars}"
    );
    let created = graphql(
        &stack,
        Some(&bearer),
        "mutation { createCar(input: {make: \"After\", model: \"Octavia\"}) { id } }",
        Value::Null,
    )
    .await;
    assert!(
        created["data"]["createCar"]["id"].is_string(),
        "mutation: {created}"
    );
    eprintln!("every /readyz said ready {ready_after:?} after the database took connections again");
}
