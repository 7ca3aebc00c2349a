-- Less work per leg (BENCHMARKS.md, seventh session):
--
-- * The open legs are listed in a table of their own, `open_legs` (a row
--   made by the prepare, removed by the decision), instead of the partial
--   index `legs_open`, which named `state`: a decision changed a column an
--   index names, so it was never a HOT update and wrote a new entry into
--   every index of `legs`. Now no index of `legs` names a column that a
--   decision changes (`state`, `decided_at`), and its pages keep room
--   (fill factor) for the decided version beside the prepared one.
-- * A batch of transfers is made as a batch of prepares is (V4): the
--   accounts locked and read once in name order, the transfers made one
--   after the other in memory (each seeing the balances the ones before it
--   left), one statement per table to write them. One function,
--   `make_legs`, makes both; the single-item functions are batches of one.
--
-- Same signatures and answers as before, with one difference for a single
-- leg or transfer: when another process records it meanwhile, the call
-- fails with a serialization failure (as a batch always did) and the
-- process runs it again, finding that record.
--
-- An old process still running while this migrates calls these new bodies
-- (a function is looked up by name at each call). A call already running
-- the old body of `prepare_legs` when the lock below is taken may still
-- write a prepared leg without its `open_legs` row: that leg is then missed
-- only by the bank's own search for old open legs (the gateway decides it
-- as it decides every leg; its decision finds no row to remove).

-- Taken first (the strongest lock this migration needs, so that it never
-- waits for more while holding less), so that no leg is written between
-- the copy and the new bodies.
LOCK TABLE legs IN ACCESS EXCLUSIVE MODE;

-- Every prepared leg, by age (the bank's search for legs left open too
-- long and its count of legs in doubt read it in that order).
CREATE TABLE open_legs (
    prepared_at BIGINT NOT NULL,
    txn_id      TEXT NOT NULL,
    PRIMARY KEY (prepared_at, txn_id)
);
INSERT INTO open_legs (prepared_at, txn_id) SELECT prepared_at, txn_id FROM legs WHERE state = 'prepared';
DROP INDEX legs_open;
-- Room on each page for the decided version of its prepared legs.
ALTER TABLE legs SET (fillfactor = 85);

-- A batch of new legs: prepares (`p_one_phase` false: a leg is recorded
-- prepared with its hold and reservation, or aborted with the reason) or
-- one-phase transfers (true: a transfer at or after its deadline is
-- aborted 'timeout' without looking at the accounts; otherwise it is
-- recorded committed with both balances moved, or aborted with the
-- reason). The checks are those of `ledger::check_leg`; an existing
-- record answers and nothing is written (a leg repeated in the batch gets
-- the first one's answer). `item` is the leg's place in the arrays (from 1).
CREATE FUNCTION make_legs(
    p_one_phase BOOLEAN, p_txn_ids TEXT[], p_payment_ids TEXT[], p_payer_users TEXT[],
    p_payer_banks TEXT[], p_payee_users TEXT[], p_payee_banks TEXT[], p_amounts_minor BIGINT[],
    p_debit_users TEXT[], p_credit_users TEXT[], p_deadlines BIGINT[], p_now BIGINT,
    p_balance_max_minor BIGINT)
RETURNS TABLE (item INT, prior_state TEXT, prior_reason TEXT, prior_amount_minor BIGINT,
               written_state TEXT, written_reason TEXT)
LANGUAGE plpgsql
-- Every statement here finds its rows by key (see V3), and through the
-- index in key order (no bitmap of the keys, no sort before the lock).
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
DECLARE
    n INT := coalesce(cardinality(p_txn_ids), 0);
    -- The batch's accounts, locked and read in name order; their money
    -- then follows the batch's legs.
    names TEXT[];
    balances BIGINT[];
    helds BIGINT[];
    incomings BIGINT[];
    changed BOOLEAN[];
    -- The records of the batch's payments: those found, then those this
    -- batch writes.
    known TEXT[];
    known_states TEXT[];
    known_reasons TEXT[];
    known_amounts BIGINT[];
    -- What this batch inserts: places in the batch, and what is written there.
    new_items INT[] := '{}';
    -- The answers, by place in the batch.
    a_prior_state TEXT[] := array_fill(NULL::TEXT, ARRAY[n]);
    a_prior_reason TEXT[] := array_fill(NULL::TEXT, ARRAY[n]);
    a_prior_amount BIGINT[] := array_fill(NULL::BIGINT, ARRAY[n]);
    a_written_state TEXT[] := array_fill(NULL::TEXT, ARRAY[n]);
    a_written_reason TEXT[] := array_fill(NULL::TEXT, ARRAY[n]);
    k INT;
    d INT;
    c INT;
    amount BIGINT;
    decline TEXT;
    inserted BIGINT;
BEGIN
    SELECT coalesce(array_agg(a.user_name ORDER BY a.user_name), '{}'),
           coalesce(array_agg(a.balance_minor ORDER BY a.user_name), '{}'),
           coalesce(array_agg(a.held_minor ORDER BY a.user_name), '{}'),
           coalesce(array_agg(a.incoming_minor ORDER BY a.user_name), '{}')
    INTO names, balances, helds, incomings
    FROM (SELECT x.user_name, x.balance_minor, x.held_minor, x.incoming_minor FROM accounts x
          WHERE x.user_name = ANY(p_debit_users || p_credit_users)
          ORDER BY x.user_name FOR UPDATE) a;
    changed := array_fill(FALSE, ARRAY[cardinality(names)]);
    SELECT coalesce(array_agg(l.txn_id), '{}'), coalesce(array_agg(l.state), '{}'),
           coalesce(array_agg(l.reason), '{}'), coalesce(array_agg(l.amount_minor), '{}')
    INTO known, known_states, known_reasons, known_amounts
    FROM legs l WHERE l.txn_id = ANY(p_txn_ids);
    FOR i IN 1..n LOOP
        k := array_position(known, p_txn_ids[i]);
        IF k IS NOT NULL THEN
            -- A record answers; nothing is written.
            a_prior_state[i] := known_states[k];
            a_prior_reason[i] := known_reasons[k];
            a_prior_amount[i] := known_amounts[k];
            CONTINUE;
        END IF;
        amount := p_amounts_minor[i];
        d := CASE WHEN p_debit_users[i] IS NULL THEN NULL ELSE array_position(names, p_debit_users[i]) END;
        c := CASE WHEN p_credit_users[i] IS NULL THEN NULL ELSE array_position(names, p_credit_users[i]) END;
        decline := NULL;
        IF p_one_phase AND p_now >= p_deadlines[i] THEN
            decline := 'timeout';
        ELSIF p_debit_users[i] IS NOT NULL AND d IS NULL THEN
            decline := 'unknown_payer';
        ELSIF p_debit_users[i] IS NOT NULL AND balances[d]::NUMERIC - helds[d] < amount THEN
            decline := 'insufficient_funds';
        ELSIF p_credit_users[i] IS NOT NULL AND c IS NULL THEN
            decline := 'unknown_payee';
        ELSIF p_credit_users[i] IS NOT NULL
              AND balances[c]::NUMERIC + incomings[c] + amount > p_balance_max_minor THEN
            decline := 'balance_limit';
        END IF;
        IF decline IS NULL AND p_one_phase THEN
            -- Both sides are here (the process checked): the money moves.
            balances[d] := balances[d] - amount;
            balances[c] := balances[c] + amount;
            changed[d] := TRUE;
            changed[c] := TRUE;
        ELSIF decline IS NULL THEN
            IF d IS NOT NULL THEN
                helds[d] := helds[d] + amount;
                changed[d] := TRUE;
            END IF;
            IF c IS NOT NULL THEN
                incomings[c] := incomings[c] + amount;
                changed[c] := TRUE;
            END IF;
        END IF;
        a_written_state[i] := CASE WHEN decline IS NOT NULL THEN 'aborted'
                                   WHEN p_one_phase THEN 'committed' ELSE 'prepared' END;
        a_written_reason[i] := decline;
        new_items := new_items || i;
        known := known || p_txn_ids[i];
        known_states := known_states || a_written_state[i];
        known_reasons := known_reasons || decline;
        known_amounts := known_amounts || amount;
    END LOOP;
    INSERT INTO legs (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor,
                      debit_user, credit_user, state, reason, prepared_at, decided_at)
    SELECT p_txn_ids[j], p_payment_ids[j], p_payer_users[j], p_payer_banks[j], p_payee_users[j],
           p_payee_banks[j], p_amounts_minor[j], p_debit_users[j], p_credit_users[j],
           a_written_state[j], a_written_reason[j], p_now,
           CASE WHEN a_written_state[j] = 'prepared' THEN NULL ELSE p_now END
    FROM unnest(new_items) AS j
    ON CONFLICT (txn_id) DO NOTHING;
    GET DIAGNOSTICS inserted = ROW_COUNT;
    IF inserted < cardinality(new_items) THEN
        RAISE EXCEPTION 'a leg of this batch was recorded meanwhile' USING ERRCODE = 'serialization_failure';
    END IF;
    INSERT INTO open_legs (prepared_at, txn_id)
    SELECT p_now, p_txn_ids[j] FROM unnest(new_items) AS j WHERE a_written_state[j] = 'prepared';
    UPDATE accounts a
    SET balance_minor = x.balance_minor, held_minor = x.held_minor, incoming_minor = x.incoming_minor
    FROM unnest(names, balances, helds, incomings, changed)
         AS x(user_name, balance_minor, held_minor, incoming_minor, changed)
    WHERE a.user_name = ANY(names) AND a.user_name = x.user_name AND x.changed;
    RETURN QUERY
    SELECT t.n::INT, t.ps, t.pr, t.pa, t.ws, t.wr
    FROM unnest(a_prior_state, a_prior_reason, a_prior_amount, a_written_state, a_written_reason)
         WITH ORDINALITY AS t(ps, pr, pa, ws, wr, n);
END
$$;

CREATE OR REPLACE FUNCTION prepare_legs(
    p_txn_ids TEXT[], p_payment_ids TEXT[], p_payer_users TEXT[], p_payer_banks TEXT[],
    p_payee_users TEXT[], p_payee_banks TEXT[], p_amounts_minor BIGINT[],
    p_debit_users TEXT[], p_credit_users TEXT[], p_now BIGINT, p_balance_max_minor BIGINT)
RETURNS TABLE (item INT, prior_state TEXT, prior_reason TEXT, prior_amount_minor BIGINT,
               written_state TEXT, written_reason TEXT)
LANGUAGE sql AS $$
    SELECT * FROM make_legs(FALSE, p_txn_ids, p_payment_ids, p_payer_users, p_payer_banks, p_payee_users,
                            p_payee_banks, p_amounts_minor, p_debit_users, p_credit_users, NULL, p_now,
                            p_balance_max_minor)
$$;

CREATE OR REPLACE FUNCTION transfer_legs(
    p_txn_ids TEXT[], p_payment_ids TEXT[], p_payer_users TEXT[], p_payer_banks TEXT[],
    p_payee_users TEXT[], p_payee_banks TEXT[], p_amounts_minor BIGINT[],
    p_debit_users TEXT[], p_credit_users TEXT[], p_deadlines BIGINT[], p_now BIGINT,
    p_balance_max_minor BIGINT)
RETURNS TABLE (item INT, prior_state TEXT, prior_reason TEXT, prior_amount_minor BIGINT,
               written_state TEXT, written_reason TEXT)
LANGUAGE sql AS $$
    SELECT * FROM make_legs(TRUE, p_txn_ids, p_payment_ids, p_payer_users, p_payer_banks, p_payee_users,
                            p_payee_banks, p_amounts_minor, p_debit_users, p_credit_users, p_deadlines,
                            p_now, p_balance_max_minor)
$$;

-- A batch of decisions: as in V4, and a decided leg's row of `open_legs`
-- goes with its decision.
CREATE OR REPLACE FUNCTION decide_legs(p_txn_ids TEXT[], p_decisions TEXT[], p_now BIGINT)
RETURNS TABLE (item INT, prior_state TEXT, written_state TEXT)
LANGUAGE plpgsql
-- As for make_legs; and the accounts are updated one after the other in
-- name order (a nested loop over them in that order).
SET enable_seqscan = off
SET enable_bitmapscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
DECLARE
    n INT := coalesce(cardinality(p_txn_ids), 0);
    -- The batch's legs, locked and read by id; their states then follow
    -- the batch's decisions.
    ids TEXT[];
    states TEXT[];
    amounts BIGINT[];
    debits TEXT[];
    credits TEXT[];
    prepared_ats BIGINT[];
    -- The accounts of its prepared legs, in name order, and what the
    -- batch's decisions add to each. A decision needs no balance to be
    -- made: the accounts are not read, only changed by these amounts, at
    -- the end, each row once (and so locked then, in name order).
    names TEXT[];
    balance_deltas BIGINT[];
    held_deltas BIGINT[];
    incoming_deltas BIGINT[];
    changed BOOLEAN[];
    -- Unknown legs aborted here (each gets a record), and legs decided here.
    aborts TEXT[] := '{}';
    decided TEXT[] := '{}';
    decided_states TEXT[] := '{}';
    decided_prepared_ats BIGINT[] := '{}';
    a_prior_state TEXT[] := array_fill(NULL::TEXT, ARRAY[n]);
    a_written_state TEXT[] := array_fill(NULL::TEXT, ARRAY[n]);
    k INT;
    d INT;
    c INT;
    applied BIGINT;
    inserted BIGINT;
BEGIN
    IF EXISTS (SELECT 1 FROM unnest(p_decisions) AS x WHERE x IS DISTINCT FROM 'commit' AND x IS DISTINCT FROM 'abort') THEN
        RAISE EXCEPTION 'decisions %', p_decisions;
    END IF;
    SELECT coalesce(array_agg(l.txn_id ORDER BY l.txn_id), '{}'),
           coalesce(array_agg(l.state ORDER BY l.txn_id), '{}'),
           coalesce(array_agg(l.amount_minor ORDER BY l.txn_id), '{}'),
           coalesce(array_agg(l.debit_user ORDER BY l.txn_id), '{}'),
           coalesce(array_agg(l.credit_user ORDER BY l.txn_id), '{}'),
           coalesce(array_agg(l.prepared_at ORDER BY l.txn_id), '{}')
    INTO ids, states, amounts, debits, credits, prepared_ats
    FROM (SELECT x.txn_id, x.state, x.amount_minor, x.debit_user, x.credit_user, x.prepared_at FROM legs x
          WHERE x.txn_id = ANY(p_txn_ids) ORDER BY x.txn_id FOR UPDATE) l;
    names := ARRAY(
        SELECT DISTINCT u FROM unnest(states, debits, credits) AS l(state, debit, credit),
                               LATERAL (VALUES (l.debit), (l.credit)) AS v(u)
        WHERE l.state = 'prepared' AND u IS NOT NULL
        ORDER BY u);
    balance_deltas := array_fill(0::BIGINT, ARRAY[cardinality(names)]);
    held_deltas := array_fill(0::BIGINT, ARRAY[cardinality(names)]);
    incoming_deltas := array_fill(0::BIGINT, ARRAY[cardinality(names)]);
    changed := array_fill(FALSE, ARRAY[cardinality(names)]);
    FOR i IN 1..n LOOP
        k := array_position(ids, p_txn_ids[i]);
        IF k IS NULL THEN
            IF p_decisions[i] = 'abort' THEN
                -- An unknown leg's abort leaves a record, so that a late
                -- prepare votes no.
                aborts := aborts || p_txn_ids[i];
                ids := ids || p_txn_ids[i];
                states := states || 'aborted'::TEXT;
                amounts := amounts || 0::BIGINT;
                debits := debits || NULL::TEXT;
                credits := credits || NULL::TEXT;
                prepared_ats := prepared_ats || p_now;
                a_written_state[i] := 'aborted';
            END IF;
            CONTINUE;
        END IF;
        a_prior_state[i] := states[k];
        IF states[k] <> 'prepared' THEN
            CONTINUE;
        END IF;
        -- A prepared leg is decided with its money: the hold is paid and
        -- the credit arrives (commit), or both are released (abort).
        applied := CASE WHEN p_decisions[i] = 'commit' THEN amounts[k] ELSE 0 END;
        d := CASE WHEN debits[k] IS NULL THEN NULL ELSE array_position(names, debits[k]) END;
        c := CASE WHEN credits[k] IS NULL THEN NULL ELSE array_position(names, credits[k]) END;
        IF d IS NOT NULL THEN
            held_deltas[d] := held_deltas[d] - amounts[k];
            balance_deltas[d] := balance_deltas[d] - applied;
            changed[d] := TRUE;
        END IF;
        IF c IS NOT NULL THEN
            incoming_deltas[c] := incoming_deltas[c] - amounts[k];
            balance_deltas[c] := balance_deltas[c] + applied;
            changed[c] := TRUE;
        END IF;
        states[k] := CASE WHEN p_decisions[i] = 'commit' THEN 'committed' ELSE 'aborted' END;
        a_written_state[i] := states[k];
        decided := decided || p_txn_ids[i];
        decided_states := decided_states || states[k];
        decided_prepared_ats := decided_prepared_ats || prepared_ats[k];
    END LOOP;
    INSERT INTO legs (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank,
                      amount_minor, state, reason, prepared_at, decided_at)
    SELECT t, '', '', '', '', '', 0, 'aborted', 'timeout', p_now, p_now FROM unnest(aborts) AS t
    ON CONFLICT (txn_id) DO NOTHING;
    GET DIAGNOSTICS inserted = ROW_COUNT;
    IF inserted < cardinality(aborts) THEN
        -- A prepare recorded the leg meanwhile: decide on its record.
        RAISE EXCEPTION 'a leg of this batch was recorded meanwhile' USING ERRCODE = 'serialization_failure';
    END IF;
    UPDATE legs l SET state = x.state, decided_at = p_now
    FROM unnest(decided, decided_states) AS x(txn_id, state)
    WHERE l.txn_id = ANY(decided) AND l.txn_id = x.txn_id;
    DELETE FROM open_legs o
    USING unnest(decided_prepared_ats, decided) AS x(prepared_at, txn_id)
    WHERE o.prepared_at = x.prepared_at AND o.txn_id = x.txn_id;
    UPDATE accounts a SET balance_minor = a.balance_minor + x.balance_delta,
                          held_minor = a.held_minor + x.held_delta,
                          incoming_minor = a.incoming_minor + x.incoming_delta
    FROM (SELECT * FROM unnest(names, balance_deltas, held_deltas, incoming_deltas, changed)
              AS y(user_name, balance_delta, held_delta, incoming_delta, changed)
          WHERE y.changed ORDER BY y.user_name) AS x
    WHERE a.user_name = x.user_name;
    RETURN QUERY
    SELECT t.n::INT, t.ps, t.ws
    FROM unnest(a_prior_state, a_written_state) WITH ORDINALITY AS t(ps, ws, n);
END
$$;

-- The functions for a single leg, transfer or decision (V3, V5): batches of one.
CREATE OR REPLACE FUNCTION prepare_leg(
    p_txn_id TEXT, p_payment_id TEXT, p_payer_user TEXT, p_payer_bank TEXT,
    p_payee_user TEXT, p_payee_bank TEXT, p_amount_minor BIGINT,
    p_debit_user TEXT, p_credit_user TEXT, p_now BIGINT, p_balance_max_minor BIGINT,
    OUT prior_state TEXT, OUT prior_reason TEXT, OUT prior_amount_minor BIGINT,
    OUT written_state TEXT, OUT written_reason TEXT)
LANGUAGE sql AS $$
    SELECT b.prior_state, b.prior_reason, b.prior_amount_minor, b.written_state, b.written_reason
    FROM make_legs(FALSE, ARRAY[p_txn_id], ARRAY[p_payment_id], ARRAY[p_payer_user], ARRAY[p_payer_bank],
                   ARRAY[p_payee_user], ARRAY[p_payee_bank], ARRAY[p_amount_minor], ARRAY[p_debit_user],
                   ARRAY[p_credit_user], NULL, p_now, p_balance_max_minor) AS b
$$;

CREATE OR REPLACE FUNCTION transfer_leg(
    p_txn_id TEXT, p_payment_id TEXT, p_payer_user TEXT, p_payer_bank TEXT,
    p_payee_user TEXT, p_payee_bank TEXT, p_amount_minor BIGINT,
    p_debit_user TEXT, p_credit_user TEXT, p_deadline BIGINT, p_now BIGINT, p_balance_max_minor BIGINT,
    OUT prior_state TEXT, OUT prior_reason TEXT, OUT prior_amount_minor BIGINT,
    OUT written_state TEXT, OUT written_reason TEXT)
LANGUAGE sql AS $$
    SELECT b.prior_state, b.prior_reason, b.prior_amount_minor, b.written_state, b.written_reason
    FROM make_legs(TRUE, ARRAY[p_txn_id], ARRAY[p_payment_id], ARRAY[p_payer_user], ARRAY[p_payer_bank],
                   ARRAY[p_payee_user], ARRAY[p_payee_bank], ARRAY[p_amount_minor], ARRAY[p_debit_user],
                   ARRAY[p_credit_user], ARRAY[p_deadline], p_now, p_balance_max_minor) AS b
$$;

CREATE OR REPLACE FUNCTION decide_leg(p_txn_id TEXT, p_decision TEXT, p_now BIGINT,
                                      OUT prior_state TEXT, OUT written_state TEXT)
LANGUAGE sql AS $$
    SELECT b.prior_state, b.written_state FROM decide_legs(ARRAY[p_txn_id], ARRAY[p_decision], p_now) AS b
$$;
