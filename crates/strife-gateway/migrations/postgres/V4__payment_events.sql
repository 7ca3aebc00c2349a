-- Each payment's 2PC timeline for the admin dashboard (begin, each bank's
-- vote, the decision, each acknowledgement), best-effort: written without
-- forcing (synchronous_commit off), so a crash may lose the last steps.
-- (The dashboard lists recent payments by txn_id, which is time-ordered:
-- no new index on the payments' write path.)
CREATE TABLE payment_events (
    id     BIGSERIAL PRIMARY KEY,
    txn_id TEXT NOT NULL,
    at     BIGINT NOT NULL,
    kind   TEXT NOT NULL,
    bank   TEXT,
    detail TEXT NOT NULL
);
CREATE INDEX payment_events_by_txn ON payment_events (txn_id, at);
CREATE INDEX payment_events_by_time ON payment_events (at);
