//! A type that belongs to another, on a fresh PostgreSQL database and a fresh SQLite file: its
//! writes are authorized by its parent's rules, its lists are its parent's, deleting the parent
//! deletes it with an event each in the same transaction, the foreign key refuses a deletion
//! that forgets it, and an update that sets nothing writes nothing and answers the record.

#![allow(clippy::unwrap_used)]

mod common;

use domain::{
    Actor, Car, CarChanges, NewCar, NewServiceVisit, ServiceVisit, ServiceVisitChanges, WriteError,
};
use store::records;
use store::DbPool;

const LEASE: chrono::Duration = chrono::Duration::seconds(10);

async fn car(pool: &DbPool, owner: i64, private: bool) -> Car {
    let new = NewCar {
        make: "Skoda".into(),
        model: "Octavia".into(),
        variant: String::new(),
        year: String::new(),
        private,
    };
    records::create::<Car>(pool, owner, None, new, LEASE, None)
        .await
        .unwrap()
        .0
}

fn visit(garage: &str) -> NewServiceVisit {
    NewServiceVisit {
        garage: garage.to_owned(),
        mileage: 1000,
        notes: String::new(),
        visited_on: "2026-12-04".into(),
    }
}

async fn add(
    pool: &DbPool,
    user: i64,
    car_id: i64,
    garage: &str,
) -> Result<ServiceVisit, WriteError> {
    records::create::<ServiceVisit>(pool, user, Some(car_id), visit(garage), LEASE, None)
        .await
        .map(|(visit, events)| {
            assert_eq!(events.len(), 1, "one created event");
            visit
        })
}

/// The event types of the outbox rows, oldest first, and forgets them.
async fn outbox(pool: &DbPool) -> Vec<(String, serde_json::Value)> {
    let rows = store::run(pool, |conn| {
        use diesel::prelude::*;
        use store::schema::event_outbox;
        let rows = event_outbox::table
            .order(event_outbox::id.asc())
            .select((event_outbox::event_type, event_outbox::payload))
            .load::<(String, String)>(conn)?;
        diesel::delete(event_outbox::table).execute(conn)?;
        Ok(rows)
    })
    .await
    .unwrap();
    rows.into_iter()
        .map(|(event_type, payload)| (event_type, serde_json::from_str(&payload).unwrap()))
        .collect()
}

async fn check(pool: &DbPool) {
    let alice = common::user(pool, "alice", false, true).await;
    let bob = common::user(pool, "bob", false, true).await;
    let staff = common::user(pool, "root", true, true).await;
    let public = car(pool, alice, false).await;
    let private = car(pool, alice, true).await;
    let other = car(pool, bob, false).await;

    // Creating: whoever may change the car; someone who may not even read it is told it is
    // not there.
    let first = add(pool, alice, public.id, "Alice's garage").await.unwrap();
    assert_eq!(first.car, public, "the visit carries its car");
    let by_staff = add(pool, staff, public.id, "Staff garage").await.unwrap();
    add(pool, alice, private.id, "Private").await.unwrap();
    add(pool, bob, other.id, "Bob's").await.unwrap();
    let refused = add(pool, bob, public.id, "Intruder").await;
    assert!(
        matches!(refused, Err(WriteError::Forbidden("car"))),
        "{refused:?}"
    );
    let refused = add(pool, bob, private.id, "Intruder").await;
    assert!(
        matches!(refused, Err(WriteError::NotFound("car"))),
        "{refused:?}"
    );
    let refused = add(pool, alice, 999_999, "Nowhere").await;
    assert!(
        matches!(refused, Err(WriteError::NotFound("car"))),
        "{refused:?}"
    );
    outbox(pool).await;

    // Changing and deleting: the same rule, through the visit's car.
    let garage = |name: &str| ServiceVisitChanges {
        garage: Some(name.to_owned()),
        ..ServiceVisitChanges::default()
    };
    let refused =
        records::update::<ServiceVisit>(pool, Actor::User(bob), first.id, garage("X"), LEASE, None)
            .await;
    assert!(
        matches!(refused, Err(WriteError::Forbidden("service visit"))),
        "{refused:?}"
    );
    let refused =
        records::delete::<ServiceVisit>(pool, Actor::User(bob), first.id, LEASE, None).await;
    assert!(
        matches!(refused, Err(WriteError::Forbidden("service visit"))),
        "{refused:?}"
    );
    let private_visit = records::page::<ServiceVisit>(pool, alice, Some(private.id), None, 10)
        .await
        .unwrap()
        .items[0]
        .clone();
    let refused =
        records::delete::<ServiceVisit>(pool, Actor::User(bob), private_visit.id, LEASE, None)
            .await;
    assert!(
        matches!(refused, Err(WriteError::NotFound("service visit"))),
        "{refused:?}"
    );
    let (changed, events) = records::update::<ServiceVisit>(
        pool,
        Actor::User(alice),
        first.id,
        garage("Renamed"),
        LEASE,
        None,
    )
    .await
    .unwrap();
    assert_eq!((changed.garage.as_str(), events.len()), ("Renamed", 1));
    assert!(records::find::<ServiceVisit>(pool, bob, private_visit.id)
        .await
        .unwrap()
        .is_none());
    assert!(records::find::<ServiceVisit>(pool, bob, first.id)
        .await
        .unwrap()
        .is_some());

    // An update that sets nothing: the record as it is, no write, no event (both types).
    let (same, events) = records::update::<ServiceVisit>(
        pool,
        Actor::User(alice),
        first.id,
        ServiceVisitChanges::default(),
        LEASE,
        None,
    )
    .await
    .unwrap();
    assert_eq!((same, events.len()), (changed.clone(), 0));
    let (same, events) = records::update::<Car>(
        pool,
        Actor::User(alice),
        public.id,
        CarChanges::default(),
        LEASE,
        None,
    )
    .await
    .unwrap();
    assert_eq!((same, events.len()), (public.clone(), 0));
    // Still authorized: someone else's empty update is refused as any other.
    let refused = records::update::<Car>(
        pool,
        Actor::User(bob),
        private.id,
        CarChanges::default(),
        LEASE,
        None,
    )
    .await;
    assert!(
        matches!(refused, Err(WriteError::NotFound("car"))),
        "{refused:?}"
    );
    outbox(pool).await;

    // Lists are one car's; a car bob may not read lists nothing (rather than "not found").
    let page = records::page::<ServiceVisit>(pool, bob, Some(public.id), None, 1)
        .await
        .unwrap();
    assert_eq!(
        page.items.iter().map(|v| v.id).collect::<Vec<_>>(),
        [first.id]
    );
    assert!(page.has_next_page);
    assert_eq!(page.total_count, 2);
    let next = records::page::<ServiceVisit>(pool, bob, Some(public.id), Some(first.id), 1)
        .await
        .unwrap();
    assert_eq!(
        next.items.iter().map(|v| v.id).collect::<Vec<_>>(),
        [by_staff.id]
    );
    let hidden = records::page::<ServiceVisit>(pool, bob, Some(private.id), None, 10)
        .await
        .unwrap();
    assert_eq!((hidden.items.len(), hidden.total_count), (0, 0));
    let owners = records::page::<ServiceVisit>(pool, alice, Some(private.id), None, 10)
        .await
        .unwrap();
    assert_eq!(owners.total_count, 1);

    // The foreign key is a guard: a deletion of the car that forgets its visits fails.
    let id = public.id;
    let raw = store::run(pool, move |conn| {
        use diesel::prelude::*;
        diesel::sql_query(format!("DELETE FROM cars WHERE id = {id}")).execute(conn)
    })
    .await;
    assert!(raw.is_err(), "the foreign key refuses: {raw:?}");

    // Deleting the car deletes its visits in the same transaction, each with its event, first.
    let (deleted, events) =
        records::delete::<Car>(pool, Actor::User(alice), public.id, LEASE, None)
            .await
            .unwrap();
    assert_eq!(deleted.id, public.id);
    assert_eq!(events.len(), 3);
    let committed = outbox(pool).await;
    let types: Vec<&str> = committed.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "service_visit.deleted",
            "service_visit.deleted",
            "car.deleted"
        ]
    );
    let ids: Vec<i64> = committed[..2]
        .iter()
        .map(|(_, envelope)| envelope["data"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [first.id, by_staff.id]);
    assert_eq!(committed[0].1["data"]["garage"], "Renamed");
    assert_eq!(committed[0].1["data"]["car"]["id"], public.id);
    assert!(records::find::<ServiceVisit>(pool, alice, first.id)
        .await
        .unwrap()
        .is_none());
    let gone = records::page::<ServiceVisit>(pool, staff, Some(public.id), None, 10)
        .await
        .unwrap();
    assert_eq!(gone.total_count, 0);
    // The others' visits are untouched.
    let kept = records::page::<ServiceVisit>(pool, bob, Some(other.id), None, 10)
        .await
        .unwrap();
    assert_eq!(kept.total_count, 1);
}

#[tokio::test]
async fn a_child_follows_its_parent_on_postgres() {
    let db = test_support::TestDb::new();
    check(&common::pool(&db.url)).await;
}

#[tokio::test]
async fn a_child_follows_its_parent_on_sqlite() {
    let file = common::SqliteFile::new("children");
    check(&common::pool(&file.url)).await;
}
