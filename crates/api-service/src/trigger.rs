//! `trigger-event`: the reference's `trigger_event.py`. Gives a car a random make through the
//! same write path as `updateCar` (change and event in one transaction, published after commit),
//! so every `carModelUpdated` subscriber sees it.

use domain::{Actor, Car, CarChanges};
use rand::seq::SliceRandom as _;
use store::repository::Store;

/// The makes `trigger_event.py` picks from.
pub const MAKES: [&str; 3] = ["Skoda", "Skoda Autogroup", "Skoda (VAG)"];

/// Sets a random make on car `pk`; returns the car before and after.
pub async fn trigger_event(store: &Store, pk: i64) -> Result<(Car, Car), String> {
    let before = store::records::find_for_system::<Car>(&store.pool, pk)
        .await
        .map_err(|err| err.to_string())?
        .ok_or_else(|| format!("car {pk} does not exist"))?;
    let make = MAKES
        .choose(&mut rand::thread_rng())
        .copied()
        .unwrap_or(MAKES[0]);
    let changes = CarChanges {
        make: Some(make.to_owned()),
        ..CarChanges::default()
    };
    let after = store
        .update::<Car>(Actor::System, pk, changes)
        .await
        .map_err(|err| err.to_string())?;
    Ok((before, after))
}
