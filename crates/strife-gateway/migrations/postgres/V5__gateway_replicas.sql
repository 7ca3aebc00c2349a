-- Each gateway replica's heartbeat for the admin dashboard (issue 13): one
-- row per process (its boot id), rewritten about once a second with
-- synchronous_commit off (never forced); heartbeat_at is the database's
-- clock, so ages do not depend on the replicas' clocks. `report` is the
-- replica's own figures as JSON. Rows silent for an hour are deleted.
CREATE TABLE gateway_replicas (
    boot_id       TEXT PRIMARY KEY,
    address       TEXT NOT NULL,
    admin_address TEXT NOT NULL,
    started_at    BIGINT NOT NULL,
    heartbeat_at  BIGINT NOT NULL,
    report        TEXT NOT NULL
);
