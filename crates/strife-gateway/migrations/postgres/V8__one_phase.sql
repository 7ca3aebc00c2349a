-- One-phase payments (issue 14): a payment within one bank may be decided
-- by that bank. While undecided, such a payment is asked about (its bank
-- fences it if it never saw it), never aborted by a gateway; see
-- `strife_twopc::coordinator::on_abandoned`. Every existing payment is
-- two-phase, as it was.
ALTER TABLE payments ADD COLUMN one_phase BOOLEAN NOT NULL DEFAULT FALSE;
