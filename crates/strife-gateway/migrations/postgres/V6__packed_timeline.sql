-- The payments' timelines, packed: one row per payment and lazy write (a
-- batch of steps: usually two rows per payment, the begin with the votes,
-- then the decision with the acknowledgements) instead of one row per step,
-- each with three index entries. Same contents, read back step by step in
-- the same order (by time, then as written).
CREATE TABLE payment_timeline (
    -- the order rows were written in (no index: only a tie-break)
    id      BIGINT GENERATED ALWAYS AS IDENTITY,
    txn_id  TEXT COLLATE "C" NOT NULL,
    -- the newest step of the row: what retention prunes by
    last_at BIGINT NOT NULL,
    -- the steps, one per place in the arrays, as written
    ats     BIGINT[] NOT NULL,
    kinds   TEXT[] NOT NULL,
    banks   TEXT[] NOT NULL,
    details TEXT[] NOT NULL
);
CREATE INDEX payment_timeline_by_txn ON payment_timeline (txn_id);
-- rows are appended in about time order: a block range index costs next to
-- nothing to keep and finds the old rows for pruning
CREATE INDEX payment_timeline_by_time ON payment_timeline USING brin (last_at);

INSERT INTO payment_timeline (txn_id, last_at, ats, kinds, banks, details)
SELECT txn_id, max(at), array_agg(at ORDER BY at, id), array_agg(kind ORDER BY at, id),
       array_agg(bank ORDER BY at, id), array_agg(detail ORDER BY at, id)
FROM payment_events
GROUP BY txn_id;
DROP TABLE payment_events;
