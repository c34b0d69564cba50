-- The reference's Car model (all fields strings, as graphene exposed them), plus its owner. A car
-- without an owner (the demo fixture's Car 1) can be changed by staff only.
CREATE TABLE cars (
    id BIGSERIAL PRIMARY KEY,
    make VARCHAR(100) NOT NULL,
    model VARCHAR(100) NOT NULL,
    variant VARCHAR(100) NOT NULL DEFAULT '',
    year VARCHAR(100) NOT NULL DEFAULT '',
    owner_id BIGINT REFERENCES users (id) ON DELETE SET NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX cars_owner_id ON cars (owner_id);

-- The transactional outbox: a write inserts its event here in the same transaction as the change,
-- so an event can be late (Redis down, process killed after commit) but never lost. A row is
-- deleted once the event is on Redis. `locked_until` is a lease: the process that wrote the row
-- publishes it right after commit; when the lease runs out without that having happened, any
-- relay may claim the row (a conditional UPDATE, portable to SQLite, instead of SKIP LOCKED).
CREATE TABLE event_outbox (
    id BIGSERIAL PRIMARY KEY,
    event_id VARCHAR(64) NOT NULL UNIQUE,
    event_type VARCHAR(64) NOT NULL,
    payload TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    locked_until TIMESTAMPTZ,
    attempts INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX event_outbox_locked_until ON event_outbox (locked_until);
