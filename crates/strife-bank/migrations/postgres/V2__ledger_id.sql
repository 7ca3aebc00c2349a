-- The ledger's id: random, made once (an existing ledger gets one now, a
-- new one when its row is written) and never changed. A bank sends it when
-- it registers, so that a gateway takes two processes of one bank as
-- replicas only when they share this ledger.
ALTER TABLE ledger ADD COLUMN id UUID NOT NULL DEFAULT gen_random_uuid();
