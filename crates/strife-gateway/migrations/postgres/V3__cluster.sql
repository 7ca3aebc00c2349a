-- The cluster's id: made once with the database, the same at every
-- gateway that shares it (one payment log). Banks use the gateways of one
-- cluster only.
CREATE TABLE cluster (
    only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
    id       TEXT NOT NULL
);
INSERT INTO cluster (id) VALUES (gen_random_uuid()::text);
