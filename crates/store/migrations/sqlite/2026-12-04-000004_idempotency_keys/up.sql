-- Writes made under a client's idempotency key (the `Idempotency-Key` header), recorded in the
-- write's own transaction: a retry of the same request finds its write here and is answered
-- with the value it committed instead of writing again. `seq` numbers the writes of one
-- request (mutations run one after another); `fingerprint` is a digest of the request, so that
-- a key reused for another request is refused rather than answered with the first one's value.
CREATE TABLE idempotency_keys (
    user_id BIGINT NOT NULL,
    key VARCHAR(255) NOT NULL,
    seq INTEGER NOT NULL,
    fingerprint VARCHAR(64) NOT NULL,
    record TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    PRIMARY KEY (user_id, key, seq)
);

CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
