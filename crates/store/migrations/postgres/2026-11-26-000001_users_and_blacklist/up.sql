CREATE TABLE users (
    id BIGSERIAL PRIMARY KEY,
    username VARCHAR(150) NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    is_active BOOLEAN NOT NULL DEFAULT TRUE,
    is_staff BOOLEAN NOT NULL DEFAULT FALSE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Refresh tokens that may no longer be used: rotated or explicitly blacklisted. The primary key
-- makes "blacklist if not already" one atomic INSERT, which is what stops two replicas from both
-- accepting the same refresh token during a race.
CREATE TABLE blacklisted_tokens (
    jti VARCHAR(64) PRIMARY KEY,
    user_id BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    blacklisted_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX blacklisted_tokens_expires_at ON blacklisted_tokens (expires_at);
