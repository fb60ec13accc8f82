-- Run driver leases: any gateway replica may drive any run, one at a time.
-- A driver claims a non-terminal run whose lease is missing or expired
-- (driver_token is the fencing token of that claim), renews the lease while
-- it drives, and releases it when it stops. Nothing about who drives a run
-- lives only in a process's memory. Times are fixed-width RFC 3339 UTC text.
ALTER TABLE runs ADD COLUMN driver_id TEXT;
ALTER TABLE runs ADD COLUMN driver_token TEXT;
ALTER TABLE runs ADD COLUMN driver_expires_at TEXT;
-- Claimable runs, oldest first.
CREATE INDEX runs_unfinished_idx ON runs (created_at, id)
    WHERE status IN ('queued', 'running');
