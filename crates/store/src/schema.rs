// The diesel schema, written by hand to match `migrations/postgres` and `migrations/sqlite`; keep
// the three in step. Only types that diesel's MultiConnection shares between both backends
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
    cars (id) {
        id -> Int8,
        make -> Varchar,
        model -> Varchar,
        variant -> Varchar,
        year -> Varchar,
        owner_id -> Nullable<Int8>,
        created_at -> Timestamp,
        updated_at -> Timestamp,
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
    }
}

diesel::joinable!(cars -> users (owner_id));

diesel::allow_tables_to_appear_in_same_query!(users, blacklisted_tokens, cars, event_outbox);
