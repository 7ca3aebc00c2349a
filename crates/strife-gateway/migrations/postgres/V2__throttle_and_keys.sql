-- Failed logins, counted here so that every replica counts into the same
-- rows and the counts survive restarts (the rule is crate::throttle's).
CREATE TABLE login_throttle (
    key             TEXT PRIMARY KEY,
    failures        INTEGER NOT NULL,
    locks           INTEGER NOT NULL,
    -- ms since the epoch; 0 when never locked
    locked_until    BIGINT NOT NULL,
    last_failure_at BIGINT NOT NULL
);
CREATE INDEX login_throttle_by_last_failure ON login_throttle (last_failure_at);

-- The token-signing keys every replica uses: the newest (highest seq)
-- signs, the newest three verify. A key added to any replica's key file
-- (strife certs rotate-token-key) lands here at that replica's next pass.
CREATE TABLE token_keys (
    seq      BIGSERIAL PRIMARY KEY,
    kid      TEXT NOT NULL UNIQUE,
    secret   BYTEA NOT NULL,
    added_at BIGINT NOT NULL
);
