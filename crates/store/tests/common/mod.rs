//! What the store's tests that run on both backends share: a migrated pool, a user, and an SQLite
//! file of the test's own.

#![allow(dead_code, clippy::unwrap_used)] // each test binary uses its part

use std::path::PathBuf;
use std::time::Duration;

use store::users::{self, NewUser};
use store::DbPool;

/// A pool of two on the database `url`, migrated.
pub fn pool(url: &str) -> DbPool {
    store::migrate(url, Duration::from_secs(10)).unwrap();
    store::pool(&store::settings::DatabaseArgs {
        database_url: url.to_owned(),
        database_pool_size: 2,
        database_timeout_secs: 5,
    })
}

/// A user created in the database (its password is never used); its id.
pub async fn user(pool: &DbPool, name: &str, is_staff: bool, is_active: bool) -> i64 {
    let new = NewUser {
        username: name.to_owned(),
        password_hash: "unused".into(),
        is_active,
        is_staff,
    };
    users::create(pool, new).await.unwrap().unwrap().id
}

/// A fresh SQLite file in a directory of its own, removed on drop.
pub struct SqliteFile {
    dir: PathBuf,
    pub url: String,
}

impl SqliteFile {
    pub fn new(label: &str) -> SqliteFile {
        let dir =
            std::env::temp_dir().join(format!("gqlws-{label}-{}", test_support::random_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}", dir.join("db.sqlite").display());
        SqliteFile { dir, url }
    }
}

impl Drop for SqliteFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
