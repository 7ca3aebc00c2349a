-- A batch from the gateway as a handful of statements over the whole batch
-- instead of three or four per leg: the rows are locked and read once, the
-- legs are made one after the other in memory (the same rules and the same
-- order as `prepare_leg` / `decide_leg`, one leg seeing what the legs
-- before it in the batch did), and then written with one statement per
-- table. Same signatures and answers as the V3 functions they replace; the
-- single-leg functions stay for single calls.
--
-- A record another process wrote meanwhile (two replicas, or a prepare and
-- an abort of one payment, writing its first record at once) makes the
-- batch's insert skip a row: the whole statement is then rolled back with a
-- serialization failure, and the process runs it again (up to 8 times),
-- finding that record at the start of the next run.

CREATE OR REPLACE FUNCTION prepare_legs(
    p_txn_ids TEXT[], p_payment_ids TEXT[], p_payer_users TEXT[], p_payer_banks TEXT[],
    p_payee_users TEXT[], p_payee_banks TEXT[], p_amounts_minor BIGINT[],
    p_debit_users TEXT[], p_credit_users TEXT[], p_now BIGINT, p_balance_max_minor BIGINT)
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
    -- The batch's accounts, locked and read in name order; held and
    -- incoming then follow the batch's legs.
    names TEXT[];
    balances BIGINT[];
    helds BIGINT[];
    incomings BIGINT[];
    changed BOOLEAN[];
    -- The records of the batch's payments: those found, then those this
    -- batch writes (a leg repeated in the batch gets the first one's answer).
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
        IF p_debit_users[i] IS NOT NULL AND d IS NULL THEN
            decline := 'unknown_payer';
        ELSIF p_debit_users[i] IS NOT NULL AND balances[d]::NUMERIC - helds[d] < amount THEN
            decline := 'insufficient_funds';
        ELSIF p_credit_users[i] IS NOT NULL AND c IS NULL THEN
            decline := 'unknown_payee';
        ELSIF p_credit_users[i] IS NOT NULL
              AND balances[c]::NUMERIC + incomings[c] + amount > p_balance_max_minor THEN
            decline := 'balance_limit';
        END IF;
        IF decline IS NULL THEN
            IF d IS NOT NULL THEN
                helds[d] := helds[d] + amount;
                changed[d] := TRUE;
            END IF;
            IF c IS NOT NULL THEN
                incomings[c] := incomings[c] + amount;
                changed[c] := TRUE;
            END IF;
        END IF;
        a_written_state[i] := CASE WHEN decline IS NULL THEN 'prepared' ELSE 'aborted' END;
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
           CASE WHEN a_written_reason[j] IS NULL THEN NULL ELSE p_now END
    FROM unnest(new_items) AS j
    ON CONFLICT (txn_id) DO NOTHING;
    GET DIAGNOSTICS inserted = ROW_COUNT;
    IF inserted < cardinality(new_items) THEN
        RAISE EXCEPTION 'a leg of this batch was recorded meanwhile' USING ERRCODE = 'serialization_failure';
    END IF;
    UPDATE accounts a SET held_minor = x.held_minor, incoming_minor = x.incoming_minor
    FROM unnest(names, helds, incomings, changed) AS x(user_name, held_minor, incoming_minor, changed)
    WHERE a.user_name = ANY(names) AND a.user_name = x.user_name AND x.changed;
    RETURN QUERY
    SELECT t.n::INT, t.ps, t.pr, t.pa, t.ws, t.wr
    FROM unnest(a_prior_state, a_prior_reason, a_prior_amount, a_written_state, a_written_reason)
         WITH ORDINALITY AS t(ps, pr, pa, ws, wr, n);
END
$$;

CREATE OR REPLACE FUNCTION decide_legs(p_txn_ids TEXT[], p_decisions TEXT[], p_now BIGINT)
RETURNS TABLE (item INT, prior_state TEXT, written_state TEXT)
LANGUAGE plpgsql
-- As for prepare_legs; and the accounts are updated one after the other in
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
           coalesce(array_agg(l.credit_user ORDER BY l.txn_id), '{}')
    INTO ids, states, amounts, debits, credits
    FROM (SELECT x.txn_id, x.state, x.amount_minor, x.debit_user, x.credit_user FROM legs x
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

-- A leg names an account of this bank on one side only when the payment
-- crosses banks: the other side's NULL needs no index entry (a history
-- lookup names its account, so it finds these partial indexes).
DROP INDEX legs_by_debit;
DROP INDEX legs_by_credit;
CREATE INDEX legs_by_debit ON legs (debit_user, prepared_at) WHERE debit_user IS NOT NULL;
CREATE INDEX legs_by_credit ON legs (credit_user, prepared_at) WHERE credit_user IS NOT NULL;
