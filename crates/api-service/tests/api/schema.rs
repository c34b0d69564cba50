//! The checked-in SDL matches the code, and the served schema introspects completely (Playground
//! needs the Subscription type).

#![allow(clippy::unwrap_used)]

use serde_json::json;

use crate::helpers::TestApp;

#[test]
fn schema_graphql_matches_the_code() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schema.graphql");
    let printed = graphql_schema::sdl();
    if std::env::var("UPDATE_SCHEMA").is_ok() {
        std::fs::write(&path, &printed).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == printed,
        "schema.graphql differs from the schema in crates/graphql-schema; regenerate it \
         with `UPDATE_SCHEMA=1 cargo test -p api-service --test api schema` (or \
         `api-service print-schema > schema.graphql`) and review the diff"
    );
}

/// graphql-js's `getIntrospectionQuery()`, which GraphQL Playground and GraphiQL send.
const PLAYGROUND_INTROSPECTION: &str = r#"
query IntrospectionQuery {
  __schema {
    queryType { name } mutationType { name } subscriptionType { name }
    types { ...FullType }
    directives { name description locations args { ...InputValue } }
  }
}
fragment FullType on __Type {
  kind name description
  fields(includeDeprecated: true) {
    name description args { ...InputValue } type { ...TypeRef } isDeprecated deprecationReason
  }
  inputFields { ...InputValue }
  interfaces { ...TypeRef }
  enumValues(includeDeprecated: true) { name description isDeprecated deprecationReason }
  possibleTypes { ...TypeRef }
}
fragment InputValue on __InputValue { name description type { ...TypeRef } defaultValue }
fragment TypeRef on __Type {
  kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name
  ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name
  } } } } } } } } }
}
"#;

#[actix_web::test]
async fn introspection_works_without_a_token_and_shows_the_subscriptions() {
    let app = TestApp::spawn(&[]).await;
    let response = app.graphql(None, PLAYGROUND_INTROSPECTION, json!({})).await;
    assert_eq!(
        response.body["errors"],
        serde_json::Value::Null,
        "{}",
        response.body
    );
    let schema = &response.body["data"]["__schema"];
    assert_eq!(schema["subscriptionType"]["name"], "Subscription");
    let subscription = schema["types"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "Subscription")
        .unwrap();
    let fields: Vec<&str> = subscription["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    // The reference's subscriptions are there; the exact schema, every field of every type, is
    // pinned by `schema_graphql_matches_the_code` against schema.graphql.
    for field in ["carModelUpdated", "carCreated", "carDeleted"] {
        assert!(fields.contains(&field), "{field} missing from {fields:?}");
    }
}
