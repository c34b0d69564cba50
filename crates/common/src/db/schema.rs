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

diesel::allow_tables_to_appear_in_same_query!(users, blacklisted_tokens);
