-- Each payment's 2PC timeline for the admin dashboard (begin, each bank's
-- vote, the decision, each acknowledgement), best-effort: written without
-- forcing (synchronous_commit off), so a crash may lose the last steps.
-- And every payment by time, for the dashboard's list of recent payments.
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
CREATE INDEX payments_by_time ON payments (created_at, txn_id);
