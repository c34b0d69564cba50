//! GraphQL over HTTP on the embedded server: `/graphql` without an upgrade is the API.

use crate::helpers::TestApp;

#[actix_web::test]
async fn hi_and_the_demo_car_need_a_valid_access_token() {
    let app = TestApp::spawn().await;
    let (access, refresh) = app.login().await;

    let body = app
        .graphql(
            Some(&access),
            "{ hi me { username isStaff } car(pk: 1) { make model variant year } }",
        )
        .await;
    assert_eq!(body["data"]["hi"], "Hi!", "{body}");
    assert_eq!(body["data"]["me"]["username"], "admin");
    assert_eq!(body["data"]["car"]["model"], "Octavia");
    assert_eq!(body["data"]["car"]["variant"], "Scout");
    assert_eq!(body["data"]["car"]["year"], "2011");

    for token in [None, Some("garbage"), Some(refresh.as_str())] {
        let body = app.graphql(token, "{ hi }").await;
        assert_eq!(
            body["errors"][0]["extensions"]["code"], "UNAUTHENTICATED",
            "{body}"
        );
    }
}

#[actix_web::test]
async fn cars_are_created_updated_and_deleted() {
    let app = TestApp::spawn().await;
    let (access, _) = app.login().await;
    let body = app
        .graphql(
            Some(&access),
            r#"mutation { createCar(input: {make: "VW", model: "Golf", variant: "GTI", year: "2020"}) { id make owner { username } } }"#,
        )
        .await;
    let id = body["data"]["createCar"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_owned();
    assert_ne!(id, "1");
    assert_eq!(body["data"]["createCar"]["owner"]["username"], "admin");

    let body = app
        .graphql(
            Some(&access),
            &format!(r#"mutation {{ updateCar(pk: {id}, input: {{make: "Volkswagen"}}) {{ make model }} }}"#),
        )
        .await;
    assert_eq!(body["data"]["updateCar"]["make"], "Volkswagen", "{body}");

    let body = app.graphql(Some(&access), "{ cars { totalCount } }").await;
    assert_eq!(body["data"]["cars"]["totalCount"], 3, "{body}");

    let body = app
        .graphql(
            Some(&access),
            &format!("mutation {{ deleteCar(pk: {id}) {{ id }} }}"),
        )
        .await;
    assert_eq!(body["data"]["deleteCar"]["id"], id.as_str(), "{body}");
    let body = app
        .graphql(Some(&access), &format!("{{ car(pk: {id}) {{ id }} }}"))
        .await;
    assert!(body["data"]["car"].is_null(), "{body}");
}

#[actix_web::test]
async fn a_browser_gets_playground_and_a_subscription_over_http_is_refused() {
    let app = TestApp::spawn().await;
    let (status, page) = app.get("/graphql/", &[("Accept", "text/html")]).await;
    assert_eq!(status, 200);
    assert!(page.to_lowercase().contains("playground"), "{page}");
    let (access, _) = app.login().await;
    let body = app
        .graphql(Some(&access), crate::helpers::MODEL_UPDATED)
        .await;
    assert!(body["errors"][0]["message"].is_string(), "{body}");
}
