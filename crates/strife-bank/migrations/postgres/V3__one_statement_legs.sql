-- Each phase of a leg as one autocommitted statement: one round trip and one
-- transaction instead of BEGIN, reads, writes and COMMIT from the process.
-- The functions make the writes the participant rules of `strife-twopc`
-- make (crates/strife-twopc/src/participant.rs) and return what they read
-- and what they wrote; the process checks every answer against those
-- rules (crates/strife-bank/src/postgres.rs), so the two cannot drift
-- apart unnoticed. Plain statements in a function run at READ COMMITTED
-- with a fresh snapshot each, which the race handling below relies on.

-- Phase one for a leg. An existing record answers (nothing is written: a
-- repeated prepare repeats its vote). A new leg locks its accounts (in name
-- order, as a decision does), checks them as `ledger::check_leg` does, and
-- writes its record: prepared with its hold and reservation, or aborted
-- with the reason. A process that loses the race for the record (another
-- prepare or an abort of the same payment committed it first) writes
-- nothing and answers with the winner's record.
CREATE FUNCTION prepare_leg(
    p_txn_id TEXT, p_payment_id TEXT, p_payer_user TEXT, p_payer_bank TEXT,
    p_payee_user TEXT, p_payee_bank TEXT, p_amount_minor BIGINT,
    p_debit_user TEXT, p_credit_user TEXT, p_now BIGINT, p_balance_max_minor BIGINT,
    OUT prior_state TEXT, OUT prior_reason TEXT, OUT prior_amount_minor BIGINT,
    OUT written_state TEXT, OUT written_reason TEXT)
LANGUAGE plpgsql AS $$
DECLARE
    account RECORD;
    payer_found BOOLEAN := FALSE;
    payer_available NUMERIC;
    payee_found BOOLEAN := FALSE;
    payee_reserved NUMERIC;
    decline TEXT;
BEGIN
    SELECT l.state, l.reason, l.amount_minor INTO prior_state, prior_reason, prior_amount_minor
    FROM legs l WHERE l.txn_id = p_txn_id;
    IF FOUND THEN
        RETURN;
    END IF;
    FOR account IN
        SELECT a.user_name, a.balance_minor, a.held_minor, a.incoming_minor FROM accounts a
        WHERE a.user_name IN (p_debit_user, p_credit_user) ORDER BY a.user_name FOR UPDATE
    LOOP
        IF account.user_name = p_debit_user THEN
            payer_found := TRUE;
            payer_available := account.balance_minor::NUMERIC - account.held_minor;
        END IF;
        IF account.user_name = p_credit_user THEN
            payee_found := TRUE;
            payee_reserved := account.balance_minor::NUMERIC + account.incoming_minor;
        END IF;
    END LOOP;
    IF p_debit_user IS NOT NULL AND NOT payer_found THEN
        decline := 'unknown_payer';
    ELSIF p_debit_user IS NOT NULL AND payer_available < p_amount_minor THEN
        decline := 'insufficient_funds';
    ELSIF p_credit_user IS NOT NULL AND NOT payee_found THEN
        decline := 'unknown_payee';
    ELSIF p_credit_user IS NOT NULL AND payee_reserved + p_amount_minor > p_balance_max_minor THEN
        decline := 'balance_limit';
    END IF;
    INSERT INTO legs (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor,
                      debit_user, credit_user, state, reason, prepared_at, decided_at)
    VALUES (p_txn_id, p_payment_id, p_payer_user, p_payer_bank, p_payee_user, p_payee_bank, p_amount_minor,
            p_debit_user, p_credit_user, CASE WHEN decline IS NULL THEN 'prepared' ELSE 'aborted' END,
            decline, p_now, CASE WHEN decline IS NULL THEN NULL ELSE p_now END)
    ON CONFLICT (txn_id) DO NOTHING;
    IF NOT FOUND THEN
        -- Lost the race for the record (the insert waited for the winner to
        -- commit): the winner's record answers.
        SELECT l.state, l.reason, l.amount_minor INTO STRICT prior_state, prior_reason, prior_amount_minor
        FROM legs l WHERE l.txn_id = p_txn_id;
        RETURN;
    END IF;
    IF decline IS NULL THEN
        UPDATE accounts a SET
            held_minor = a.held_minor + CASE WHEN a.user_name = p_debit_user THEN p_amount_minor ELSE 0 END,
            incoming_minor = a.incoming_minor + CASE WHEN a.user_name = p_credit_user THEN p_amount_minor ELSE 0 END
        WHERE a.user_name IN (p_debit_user, p_credit_user);
    END IF;
    written_state := CASE WHEN decline IS NULL THEN 'prepared' ELSE 'aborted' END;
    written_reason := decline;
END
$$;

-- Phase two for a leg (`p_decision`: 'commit' or 'abort'). A prepared leg
-- is decided with its money (commit: the hold is paid and the credit
-- arrives; abort: both are released); an unknown leg that is aborted gets
-- a record, so that a late prepare votes no; anything else writes nothing
-- (a repeat, or a decision that contradicts the record, which the process
-- refuses). When an abort's record loses the race to the leg's prepare,
-- the decision is made again on the prepared record.
CREATE FUNCTION decide_leg(p_txn_id TEXT, p_decision TEXT, p_now BIGINT,
                           OUT prior_state TEXT, OUT written_state TEXT)
LANGUAGE plpgsql AS $$
DECLARE
    leg RECORD;
    release_minor BIGINT;
    apply_minor BIGINT;
BEGIN
    IF p_decision NOT IN ('commit', 'abort') THEN
        RAISE EXCEPTION 'decision %', p_decision;
    END IF;
    FOR attempt IN 1..2 LOOP
        SELECT l.state, l.amount_minor, l.debit_user, l.credit_user INTO leg
        FROM legs l WHERE l.txn_id = p_txn_id FOR UPDATE;
        IF NOT FOUND THEN
            IF p_decision = 'commit' THEN
                RETURN;
            END IF;
            INSERT INTO legs (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank,
                              amount_minor, state, reason, prepared_at, decided_at)
            VALUES (p_txn_id, '', '', '', '', '', 0, 'aborted', 'timeout', p_now, p_now)
            ON CONFLICT (txn_id) DO NOTHING;
            IF FOUND THEN
                written_state := 'aborted';
                RETURN;
            END IF;
            CONTINUE;
        END IF;
        prior_state := leg.state;
        IF leg.state <> 'prepared' THEN
            RETURN;
        END IF;
        release_minor := leg.amount_minor;
        apply_minor := CASE WHEN p_decision = 'commit' THEN leg.amount_minor ELSE 0 END;
        -- The accounts are locked in name order, as a prepare locks them.
        UPDATE accounts a SET
            held_minor = a.held_minor - CASE WHEN a.user_name = leg.debit_user THEN release_minor ELSE 0 END,
            incoming_minor = a.incoming_minor - CASE WHEN a.user_name = leg.credit_user THEN release_minor ELSE 0 END,
            balance_minor = a.balance_minor - CASE WHEN a.user_name = leg.debit_user THEN apply_minor ELSE 0 END
                                            + CASE WHEN a.user_name = leg.credit_user THEN apply_minor ELSE 0 END
        FROM (SELECT user_name FROM accounts WHERE user_name IN (leg.debit_user, leg.credit_user)
              ORDER BY user_name FOR UPDATE) locked
        WHERE a.user_name = locked.user_name;
        written_state := CASE WHEN p_decision = 'commit' THEN 'committed' ELSE 'aborted' END;
        UPDATE legs SET state = written_state, decided_at = p_now WHERE txn_id = p_txn_id;
        RETURN;
    END LOOP;
    RAISE EXCEPTION 'payment % kept changing under this bank''s write', p_txn_id;
END
$$;

-- A batch of legs from the gateway as one statement: one round trip, one
-- transaction and one commit for all of them; each leg is made as
-- `prepare_leg` makes it, in the batch's order (a leg repeated in a batch
-- gets the first one's answer). The accounts of the whole batch are locked
-- first, in name order, in one statement: a leg's accounts are then never
-- waited for while another leg's are held, so two batches never wait for
-- each other in a circle. `item` is the leg's place in the arrays (from 1).
CREATE FUNCTION prepare_legs(
    p_txn_ids TEXT[], p_payment_ids TEXT[], p_payer_users TEXT[], p_payer_banks TEXT[],
    p_payee_users TEXT[], p_payee_banks TEXT[], p_amounts_minor BIGINT[],
    p_debit_users TEXT[], p_credit_users TEXT[], p_now BIGINT, p_balance_max_minor BIGINT)
RETURNS TABLE (item INT, prior_state TEXT, prior_reason TEXT, prior_amount_minor BIGINT,
               written_state TEXT, written_reason TEXT)
LANGUAGE plpgsql
-- Every statement here finds its rows by key. Given an array of keys, the
-- planner would scan a small table (a few thousand accounts) instead of its
-- index, and compare every row with every key.
SET enable_seqscan = off
AS $$
DECLARE
    answer RECORD;
BEGIN
    PERFORM 1 FROM accounts a WHERE a.user_name = ANY(p_debit_users || p_credit_users)
    ORDER BY a.user_name FOR UPDATE;
    FOR i IN 1..coalesce(cardinality(p_txn_ids), 0) LOOP
        answer := prepare_leg(p_txn_ids[i], p_payment_ids[i], p_payer_users[i], p_payer_banks[i],
                              p_payee_users[i], p_payee_banks[i], p_amounts_minor[i],
                              p_debit_users[i], p_credit_users[i], p_now, p_balance_max_minor);
        item := i;
        prior_state := answer.prior_state;
        prior_reason := answer.prior_reason;
        prior_amount_minor := answer.prior_amount_minor;
        written_state := answer.written_state;
        written_reason := answer.written_reason;
        RETURN NEXT;
    END LOOP;
END
$$;

-- A batch of decisions as one statement, each made as `decide_leg` makes
-- it, in order. The legs of the batch are locked first (by id), then their
-- accounts (by name), each set in one statement, so two batches never wait
-- for each other in a circle.
CREATE FUNCTION decide_legs(p_txn_ids TEXT[], p_decisions TEXT[], p_now BIGINT)
RETURNS TABLE (item INT, prior_state TEXT, written_state TEXT)
LANGUAGE plpgsql
-- As for prepare_legs.
SET enable_seqscan = off
AS $$
DECLARE
    leg RECORD;
    users TEXT[] := '{}';
    answer RECORD;
BEGIN
    FOR leg IN
        SELECT l.state, l.debit_user, l.credit_user FROM legs l WHERE l.txn_id = ANY(p_txn_ids)
        ORDER BY l.txn_id FOR UPDATE
    LOOP
        IF leg.state = 'prepared' THEN
            users := users || leg.debit_user || leg.credit_user;
        END IF;
    END LOOP;
    PERFORM 1 FROM accounts a WHERE a.user_name = ANY(users) ORDER BY a.user_name FOR UPDATE;
    FOR i IN 1..coalesce(cardinality(p_txn_ids), 0) LOOP
        answer := decide_leg(p_txn_ids[i], p_decisions[i], p_now);
        item := i;
        prior_state := answer.prior_state;
        written_state := answer.written_state;
        RETURN NEXT;
    END LOOP;
END
$$;
