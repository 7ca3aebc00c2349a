-- The gateway's store in PostgreSQL: the tables of the SQLite store
-- (crates/strife-gateway/src/store.rs, schema version 3), shared by every
-- gateway replica, plus who is delivering each decided payment.

CREATE TABLE payments (
    -- "C" collation: ordered byte by byte, as SQLite orders text (the audit
    -- merges the payments and every bank's legs in txn_id order)
    txn_id       TEXT COLLATE "C" PRIMARY KEY,
    payment_id   TEXT NOT NULL,
    payer_user   TEXT NOT NULL,
    payer_bank   TEXT NOT NULL,
    payee_user   TEXT NOT NULL,
    payee_bank   TEXT NOT NULL,
    amount_minor BIGINT NOT NULL CHECK (amount_minor > 0),
    -- SHA-256 of the canonical request (payer, payee, amount): the
    -- idempotency check compares it before naming the fields that differ
    fingerprint  BYTEA NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('preparing', 'committed', 'aborted')),
    reason       TEXT,
    -- true once every bank involved acknowledged the decision
    acked        BOOLEAN NOT NULL DEFAULT FALSE,
    created_at   BIGINT NOT NULL,
    deadline_at  BIGINT NOT NULL,
    decided_at   BIGINT,
    -- the gateway process (its instance id) that drives the payment: the
    -- one that began it, then whichever claimed its delivery last
    owner        UUID NOT NULL,
    -- until then (ms since the epoch) no other process claims it
    lease_until  BIGINT NOT NULL
);

-- the idempotency key, scoped to the paying customer; it starts with
-- payment_id, so it also finds a payment someone received by its id
CREATE UNIQUE INDEX payments_by_id ON payments (payment_id, payer_bank, payer_user);
-- history pages: each arm of a page is a range of one of these, already in
-- (created_at, txn_id) order
CREATE INDEX payments_by_payer ON payments (payer_bank, payer_user, created_at, txn_id);
CREATE INDEX payments_by_payee ON payments (payee_bank, payee_user, created_at, txn_id);
-- decided payments some bank may not have applied: what replicas claim
CREATE INDEX payments_unfinished ON payments (created_at) WHERE NOT acked AND state <> 'preparing';
-- undecided payments: the deadline sweep
CREATE INDEX payments_preparing ON payments (created_at) WHERE state = 'preparing';
-- finished payments: what retention prunes
CREATE INDEX payments_finished ON payments (created_at) WHERE acked;

-- a bank may run as several processes (replicas), each at its own address
CREATE TABLE banks (
    name          TEXT NOT NULL,
    address       TEXT NOT NULL,
    registered_at BIGINT NOT NULL,
    PRIMARY KEY (name, address)
);

CREATE TABLE revoked_tokens (
    jti        TEXT PRIMARY KEY,
    -- seconds since the epoch; the row goes once the token has expired
    expires_at BIGINT NOT NULL
);
CREATE INDEX revoked_tokens_by_expiry ON revoked_tokens (expires_at);
