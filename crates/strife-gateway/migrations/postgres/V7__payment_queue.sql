-- The unfinished payments (undecided, or decided and not yet acknowledged by
-- every bank) in a small table of their own, the work queue, with who drives
-- each: a row is inserted with its payment and deleted with its
-- acknowledgement. The payments' own indexes then name no column that a
-- decision or an acknowledgement changes, so both are HOT updates of the
-- payment's row (no new index entries; the free space that takes is left on
-- each page by the fill factor) where they were five new index entries each.
CREATE TABLE payment_queue (
    txn_id      TEXT COLLATE "C" PRIMARY KEY,
    created_at  BIGINT NOT NULL,
    -- false while the payment is preparing
    decided     BOOLEAN NOT NULL,
    -- the gateway process (its instance id) that drives the payment: the
    -- one that began it, then whichever claimed its delivery last
    owner       UUID NOT NULL,
    -- until then (ms since the epoch) no other process claims it
    lease_until BIGINT NOT NULL
);
-- undecided payments: the deadline sweep
CREATE INDEX payment_queue_undecided ON payment_queue (created_at) WHERE NOT decided;
-- decided payments some bank may not have applied: what replicas claim
CREATE INDEX payment_queue_undelivered ON payment_queue (created_at) WHERE decided;

INSERT INTO payment_queue (txn_id, created_at, decided, owner, lease_until)
SELECT txn_id, created_at, state <> 'preparing', owner, lease_until FROM payments WHERE NOT acked;

DROP INDEX payments_preparing;
DROP INDEX payments_unfinished;
DROP INDEX payments_finished;
ALTER TABLE payments DROP COLUMN owner, DROP COLUMN lease_until;
-- what retention prunes: payments are appended in about created_at order,
-- so a block range index finds the old ones at next to no cost
CREATE INDEX payments_by_age ON payments USING brin (created_at);
ALTER TABLE payments SET (fillfactor = 75);
