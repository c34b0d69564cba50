// The diesel schema, written by hand to match `migrations/`; keep the two in step.

diesel::table! {
    users (id) {
        id -> Int8,
        username -> Varchar,
        password_hash -> Text,
        is_active -> Bool,
        is_staff -> Bool,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    blacklisted_tokens (jti) {
        jti -> Varchar,
        user_id -> Int8,
        expires_at -> Timestamptz,
        blacklisted_at -> Timestamptz,
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
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    event_outbox (id) {
        id -> Int8,
        event_id -> Varchar,
        event_type -> Varchar,
        payload -> Text,
        created_at -> Timestamptz,
        locked_until -> Nullable<Timestamptz>,
        attempts -> Int4,
    }
}

diesel::joinable!(cars -> users (owner_id));

diesel::allow_tables_to_appear_in_same_query!(users, blacklisted_tokens, cars, event_outbox);
