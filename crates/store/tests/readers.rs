//! The read rule in SQL against the read rule in Rust: on a fresh PostgreSQL database and a fresh
//! SQLite file, for an owner, another user, staff and a deactivated owner, the lists (`page`,
//! its total) and `find` show exactly the cars `Car::readers` admits, and a write by someone
//! who may not read the car is "not found" rather than "forbidden".

#![allow(clippy::unwrap_used)]

mod common;

use domain::{Actor, Car, CarChanges, NewCar, Registered as _, Viewer, WriteError};
use store::records::{self, Table};
use store::DbPool;

async fn insert(pool: &DbPool, owner: i64, make: &str, private: bool) -> i64 {
    let make = make.to_owned();
    store::run(pool, move |conn| {
        Car::insert(
            conn,
            owner,
            &domain::NoParent,
            NewCar {
                make,
                model: "Octavia".into(),
                variant: String::new(),
                year: String::new(),
                private,
            },
        )
    })
    .await
    .unwrap()
}

async fn check(pool: &DbPool) {
    let alice = common::user(pool, "alice", false, true).await;
    let bob = common::user(pool, "bob", false, true).await;
    let staff = common::user(pool, "root", true, true).await;
    let gone = common::user(pool, "gone", false, false).await;
    let mut ids = Vec::new();
    for (owner, private) in [
        (alice, false),
        (alice, true),
        (bob, true),
        (bob, false),
        (gone, true),
    ] {
        ids.push(insert(pool, owner, "Skoda", private).await);
    }
    // The unowned private car (its owner's account deleted): staff's only.
    store::run(pool, {
        let id = ids[4];
        move |conn| {
            use diesel::prelude::*;
            diesel::sql_query(format!("UPDATE cars SET owner_id = NULL WHERE id = {id}"))
                .execute(conn)
        }
    })
    .await
    .unwrap();
    let mut every = Vec::new();
    for id in &ids {
        every.push(
            records::find_for_system::<Car>(pool, *id)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let viewers = [
        (
            alice,
            Viewer {
                user_id: alice,
                is_staff: false,
            },
        ),
        (
            bob,
            Viewer {
                user_id: bob,
                is_staff: false,
            },
        ),
        (
            staff,
            Viewer {
                user_id: staff,
                is_staff: true,
            },
        ),
        // Inactive: the database says it has no rights beyond its own.
        (
            gone,
            Viewer {
                user_id: gone,
                is_staff: false,
            },
        ),
    ];
    for (reader, viewer) in viewers {
        let expected: Vec<i64> = every
            .iter()
            .filter(|car| car.readable_by(viewer))
            .map(|car| car.id)
            .collect();
        let page = records::page::<Car>(pool, reader, None, None, 100)
            .await
            .unwrap();
        let listed: Vec<i64> = page.items.iter().map(|car| car.id).collect();
        assert_eq!(listed, expected, "page of {viewer:?}");
        assert_eq!(
            page.total_count,
            expected.len() as i64,
            "total of {viewer:?}"
        );
        // Paged one at a time, the same cars.
        let mut after = None;
        let mut walked = Vec::new();
        loop {
            let page = records::page::<Car>(pool, reader, None, after, 1)
                .await
                .unwrap();
            walked.extend(page.items.iter().map(|car| car.id));
            after = page.items.last().map(|car| car.id);
            if !page.has_next_page {
                break;
            }
        }
        assert_eq!(walked, expected, "pages of one for {viewer:?}");
        for car in &every {
            let found = records::find::<Car>(pool, reader, car.id).await.unwrap();
            assert_eq!(
                found.is_some(),
                car.readable_by(viewer),
                "find {} by {viewer:?}",
                car.id
            );
        }
    }
    assert_eq!(
        every[1].readers(),
        domain::Readers::OwnerAndStaff(Some(alice))
    );

    // bob may read alice's public car but not change it; her private car is not found for him.
    let changes = || CarChanges {
        make: Some("Tatra".into()),
        ..CarChanges::default()
    };
    let store = records::update::<Car>;
    let lease = chrono::Duration::seconds(10);
    let public = store(pool, Actor::User(bob), ids[0], changes(), lease, None).await;
    assert!(
        matches!(public, Err(WriteError::Forbidden("car"))),
        "{public:?}"
    );
    let private = store(pool, Actor::User(bob), ids[1], changes(), lease, None).await;
    assert!(
        matches!(private, Err(WriteError::NotFound("car"))),
        "{private:?}"
    );
    let deleted = records::delete::<Car>(pool, Actor::User(bob), ids[1], lease, None).await;
    assert!(
        matches!(deleted, Err(WriteError::NotFound("car"))),
        "{deleted:?}"
    );
}

#[tokio::test]
async fn lists_and_finds_follow_the_read_rule_on_postgres() {
    let db = test_support::TestDb::new();
    check(&common::pool(&db.url)).await;
}

#[tokio::test]
async fn lists_and_finds_follow_the_read_rule_on_sqlite() {
    let file = common::SqliteFile::new("readers");
    check(&common::pool(&file.url)).await;
}
