-- The embedded mode's schema: the same tables as migrations/postgres after all its migrations,
-- in SQLite's types. Times are UTC text as diesel writes them ("YYYY-MM-DD HH:MM:SS.ffffff"), so
-- they compare in order as strings.
CREATE TABLE users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    username VARCHAR(150) NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    is_active BOOLEAN NOT NULL DEFAULT 1,
    is_staff BOOLEAN NOT NULL DEFAULT 0,
    created_at TIMESTAMP NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);

CREATE TABLE blacklisted_tokens (
    jti VARCHAR(64) PRIMARY KEY NOT NULL,
    user_id BIGINT NOT NULL,
    expires_at TIMESTAMP NOT NULL,
    blacklisted_at TIMESTAMP NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);

CREATE INDEX blacklisted_tokens_expires_at ON blacklisted_tokens (expires_at);

CREATE TABLE cars (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    make VARCHAR(100) NOT NULL,
    model VARCHAR(100) NOT NULL,
    variant VARCHAR(100) NOT NULL DEFAULT '',
    year VARCHAR(100) NOT NULL DEFAULT '',
    owner_id BIGINT REFERENCES users (id) ON DELETE SET NULL,
    created_at TIMESTAMP NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    updated_at TIMESTAMP NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);

CREATE INDEX cars_owner_id ON cars (owner_id);

CREATE TABLE event_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id VARCHAR(64) NOT NULL UNIQUE,
    event_type VARCHAR(64) NOT NULL,
    payload TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    locked_until TIMESTAMP,
    attempts INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX event_outbox_locked_until ON event_outbox (locked_until);
