// The diesel schema of the tables every service shares, written by hand to match
// `migrations/postgres` and `migrations/sqlite`. A domain type's table is declared beside its SQL
// (`cars.rs`). tests/schema.rs checks every `table!` of this crate against both migrations. Only types that diesel's MultiConnection shares between both backends
// (times are `Timestamp`, UTC without a zone).

diesel::table! {
    users (id) {
        id -> Int8,
        username -> Varchar,
        password_hash -> Text,
        is_active -> Bool,
        is_staff -> Bool,
        created_at -> Timestamp,
    }
}

diesel::table! {
    blacklisted_tokens (jti) {
        jti -> Varchar,
        user_id -> Int8,
        expires_at -> Timestamp,
        blacklisted_at -> Timestamp,
    }
}

diesel::table! {
    event_outbox (id) {
        id -> Int8,
        event_id -> Varchar,
        event_type -> Varchar,
        payload -> Text,
        created_at -> Timestamp,
        locked_until -> Nullable<Timestamp>,
        attempts -> Int4,
        traceparent -> Nullable<Varchar>,
    }
}

diesel::table! {
    idempotency_keys (user_id, key, seq) {
        user_id -> Int8,
        key -> Varchar,
        seq -> Int4,
        fingerprint -> Varchar,
        record -> Text,
        created_at -> Timestamp,
    }
}

diesel::allow_tables_to_appear_in_same_query!(
    users,
    blacklisted_tokens,
    event_outbox,
    idempotency_keys
);
