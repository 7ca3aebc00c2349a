-- The bank's ledger in PostgreSQL: the same tables as the SQLite store
-- (crates/strife-bank/src/store.rs), with the same money rules as CHECKs.

-- Which bank this database belongs to: one row, written by the first
-- process of the bank that opens it; a process of another bank is refused.
CREATE TABLE ledger (
    only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
    bank     TEXT NOT NULL
);

CREATE TABLE accounts (
    user_name      TEXT PRIMARY KEY,
    password_hash  TEXT NOT NULL,
    balance_minor  BIGINT NOT NULL CHECK (balance_minor >= 0),
    -- money on hold for prepared debits: not available, not yet gone
    held_minor     BIGINT NOT NULL DEFAULT 0 CHECK (held_minor >= 0 AND held_minor <= balance_minor),
    -- money of prepared credits: not yet here, but reserved against the maximum
    incoming_minor BIGINT NOT NULL DEFAULT 0 CHECK (incoming_minor >= 0),
    -- the balance the account was created with, for the audit's conservation check
    opening_minor  BIGINT NOT NULL
);

CREATE TABLE legs (
    txn_id       TEXT PRIMARY KEY,
    payment_id   TEXT NOT NULL,
    payer_user   TEXT NOT NULL,
    payer_bank   TEXT NOT NULL,
    payee_user   TEXT NOT NULL,
    payee_bank   TEXT NOT NULL,
    -- 0 only for an abort that arrived before (or instead of) its prepare
    amount_minor BIGINT NOT NULL CHECK (amount_minor >= 0),
    debit_user   TEXT,
    credit_user  TEXT,
    state        TEXT NOT NULL CHECK (state IN ('prepared', 'committed', 'aborted')),
    reason       TEXT,
    prepared_at  BIGINT NOT NULL,
    decided_at   BIGINT
);

CREATE INDEX legs_by_debit ON legs (debit_user, prepared_at);
CREATE INDEX legs_by_credit ON legs (credit_user, prepared_at);
CREATE INDEX legs_open ON legs (prepared_at) WHERE state = 'prepared';
