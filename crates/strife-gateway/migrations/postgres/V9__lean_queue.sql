-- Fewer writes per payment (issue 11):
-- * A payment's acknowledgement is its queue row's absence: a decided
--   payment is acknowledged once it has no row in `payment_queue` (which
--   holds exactly the unacknowledged payments since V7), so the `acked`
--   column goes, and an acknowledgement is the queue row's delete alone,
--   with no second update of the payment's row.
-- * The queue is found by `txn_id` through its two partial indexes only
--   (undecided; decided and undelivered), each in `txn_id` order, which is
--   time order (UUID v7): no primary key, so a payment costs the queue one
--   index entry at its begin and one at its decision instead of four. Each
--   row is inserted only with its new payment, so `txn_id` stays unique.
-- * The payment row keeps half of each page free for its one update (the
--   decision, or a one-phase payment's outcome), so that nearly every one
--   is a HOT update (measured: 98 %; 88 % at fill factor 60), at the price
--   of a table about twice the size of its rows.

-- Carried over as they were: each queue row's `decided` agrees with its
-- payment's state (both are set by one statement), and the queue holds
-- exactly the payments not acknowledged. Made sure of here, since the
-- acknowledgement is read from the queue from now on.
DELETE FROM payment_queue q USING payments p WHERE p.txn_id = q.txn_id AND p.acked;
INSERT INTO payment_queue (txn_id, created_at, decided, owner, lease_until)
SELECT p.txn_id, p.created_at, p.state <> 'preparing', gen_random_uuid(), 0
FROM payments p
WHERE NOT p.acked AND NOT EXISTS (SELECT 1 FROM payment_queue q WHERE q.txn_id = p.txn_id);
UPDATE payment_queue q SET decided = p.state <> 'preparing'
FROM payments p
WHERE p.txn_id = q.txn_id AND q.decided <> (p.state <> 'preparing');

ALTER TABLE payment_queue DROP CONSTRAINT payment_queue_pkey;
DROP INDEX payment_queue_undecided;
DROP INDEX payment_queue_undelivered;
-- undecided payments: the deadline sweep, and a decision's lookup
CREATE INDEX payment_queue_undecided ON payment_queue (txn_id) WHERE NOT decided;
-- decided payments some bank may not have applied: what replicas claim, and
-- an acknowledgement's lookup
CREATE INDEX payment_queue_undelivered ON payment_queue (txn_id) WHERE decided;

ALTER TABLE payments DROP COLUMN acked;
ALTER TABLE payments SET (fillfactor = 50);
