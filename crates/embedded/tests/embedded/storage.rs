//! The SQLite file shared by the server and separate `trigger-event` processes.

use crate::helpers::TestApp;

#[actix_web::test]
async fn the_server_and_trigger_event_processes_write_the_file_at_the_same_time() {
    let app = std::sync::Arc::new(TestApp::spawn().await);
    let (access, _) = app.login().await;
    let triggers = {
        let app = app.clone();
        tokio::task::spawn_blocking(move || {
            (0..3).map(|_| app.trigger_event()).collect::<Vec<String>>()
        })
    };
    for make in ["Skoda", "Skoda (VAG)"].iter().cycle().take(20) {
        let body = app
            .graphql(
                Some(&access),
                &format!(
                    r#"mutation {{ updateCar(pk: 1, input: {{make: "{make}"}}) {{ make }} }}"#
                ),
            )
            .await;
        assert_eq!(body["data"]["updateCar"]["make"], *make, "{body}");
    }
    let printed = triggers.await.unwrap();
    assert!(
        printed.iter().all(|line| line.starts_with("car 1: make")),
        "{printed:?}"
    );
    // Every event reached the log: the relay emptied the outbox.
    for _ in 0..100 {
        if store::outbox::pending_count(app.pool()).await.unwrap() == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("events stayed in the outbox");
}
