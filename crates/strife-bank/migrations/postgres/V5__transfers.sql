-- One-phase commit for payments within this bank (issue 14): the bank
-- decides. As in V3, each call is one autocommitted statement that makes
-- the writes of the participant rules (`on_transfer`, `on_resolve` in
-- crates/strife-twopc/src/participant.rs) and returns what it read and
-- wrote; crates/strife-bank/src/postgres.rs checks every answer against
-- those rules. (Numbered 5: V4 is taken by another change in flight.)

-- A transfer: both sides at this bank. An existing record answers (nothing
-- is written: a repeat repeats the decision). A new one that arrives at or
-- after its deadline (`p_now` is the bank process's clock) is recorded as
-- aborted ('timeout') without looking at the accounts; otherwise its
-- accounts are locked (in name order, as a prepare locks them), checked as
-- `ledger::check_leg` checks a leg, and the transfer is recorded as
-- committed with both balances moved, or as aborted with the reason. A
-- process that loses the race for the record (a repeat at another replica,
-- or a fence) writes nothing and answers with the winner's record.
CREATE FUNCTION transfer_leg(
    p_txn_id TEXT, p_payment_id TEXT, p_payer_user TEXT, p_payer_bank TEXT,
    p_payee_user TEXT, p_payee_bank TEXT, p_amount_minor BIGINT,
    p_debit_user TEXT, p_credit_user TEXT, p_deadline BIGINT, p_now BIGINT, p_balance_max_minor BIGINT,
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
    IF p_now >= p_deadline THEN
        decline := 'timeout';
    ELSE
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
        IF NOT payer_found THEN
            decline := 'unknown_payer';
        ELSIF payer_available < p_amount_minor THEN
            decline := 'insufficient_funds';
        ELSIF NOT payee_found THEN
            decline := 'unknown_payee';
        ELSIF payee_reserved + p_amount_minor > p_balance_max_minor THEN
            decline := 'balance_limit';
        END IF;
    END IF;
    INSERT INTO legs (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor,
                      debit_user, credit_user, state, reason, prepared_at, decided_at)
    VALUES (p_txn_id, p_payment_id, p_payer_user, p_payer_bank, p_payee_user, p_payee_bank, p_amount_minor,
            p_debit_user, p_credit_user, CASE WHEN decline IS NULL THEN 'committed' ELSE 'aborted' END,
            decline, p_now, p_now)
    ON CONFLICT (txn_id) DO NOTHING;
    IF NOT FOUND THEN
        SELECT l.state, l.reason, l.amount_minor INTO STRICT prior_state, prior_reason, prior_amount_minor
        FROM legs l WHERE l.txn_id = p_txn_id;
        RETURN;
    END IF;
    IF decline IS NULL THEN
        UPDATE accounts a SET
            balance_minor = a.balance_minor
                - CASE WHEN a.user_name = p_debit_user THEN p_amount_minor ELSE 0 END
                + CASE WHEN a.user_name = p_credit_user THEN p_amount_minor ELSE 0 END
        WHERE a.user_name IN (p_debit_user, p_credit_user);
    END IF;
    written_state := CASE WHEN decline IS NULL THEN 'committed' ELSE 'aborted' END;
    written_reason := decline;
END
$$;

-- A batch of transfers as one statement, each made as `transfer_leg` makes
-- it, in order, after the batch's accounts are locked in name order in one
-- statement (as `prepare_legs` does), so two batches never wait for each
-- other in a circle.
CREATE FUNCTION transfer_legs(
    p_txn_ids TEXT[], p_payment_ids TEXT[], p_payer_users TEXT[], p_payer_banks TEXT[],
    p_payee_users TEXT[], p_payee_banks TEXT[], p_amounts_minor BIGINT[],
    p_debit_users TEXT[], p_credit_users TEXT[], p_deadlines BIGINT[], p_now BIGINT,
    p_balance_max_minor BIGINT)
RETURNS TABLE (item INT, prior_state TEXT, prior_reason TEXT, prior_amount_minor BIGINT,
               written_state TEXT, written_reason TEXT)
LANGUAGE plpgsql
-- As for prepare_legs: every statement finds its rows by key.
SET enable_seqscan = off
AS $$
DECLARE
    answer RECORD;
BEGIN
    PERFORM 1 FROM accounts a WHERE a.user_name = ANY(p_debit_users || p_credit_users)
    ORDER BY a.user_name FOR UPDATE;
    FOR i IN 1..coalesce(cardinality(p_txn_ids), 0) LOOP
        answer := transfer_leg(p_txn_ids[i], p_payment_ids[i], p_payer_users[i], p_payer_banks[i],
                               p_payee_users[i], p_payee_banks[i], p_amounts_minor[i],
                               p_debit_users[i], p_credit_users[i], p_deadlines[i], p_now,
                               p_balance_max_minor);
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

-- What became of a transfer: its record answers; a transfer never heard of
-- is recorded as aborted with `p_reason` first (a fence), so that it is
-- refused if it comes later. When the fence loses the race to the transfer
-- (the insert waits for it), the transfer's record answers.
CREATE FUNCTION resolve_transfer(p_txn_id TEXT, p_reason TEXT, p_now BIGINT,
                                 OUT prior_state TEXT, OUT prior_reason TEXT, OUT written_state TEXT)
LANGUAGE plpgsql AS $$
BEGIN
    SELECT l.state, l.reason INTO prior_state, prior_reason FROM legs l WHERE l.txn_id = p_txn_id;
    IF FOUND THEN
        RETURN;
    END IF;
    INSERT INTO legs (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank,
                      amount_minor, state, reason, prepared_at, decided_at)
    VALUES (p_txn_id, '', '', '', '', '', 0, 'aborted', p_reason, p_now, p_now)
    ON CONFLICT (txn_id) DO NOTHING;
    IF FOUND THEN
        written_state := 'aborted';
        RETURN;
    END IF;
    SELECT l.state, l.reason INTO STRICT prior_state, prior_reason FROM legs l WHERE l.txn_id = p_txn_id;
END
$$;
