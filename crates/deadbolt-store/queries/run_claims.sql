-- Statements of the run-claims repository: the drive leases of runs
-- (src/sql/run_claims.rs).

-- name: run_claim
-- timed. One statement: on Postgres a concurrent claimer waits for the row
-- and then re-checks the lease, so only one wins.
UPDATE runs SET driver_id = $2, driver_token = $3,
driver_expires_at = {later $4}
WHERE id = $5 AND status IN ('queued', 'running')
  AND (driver_token IS NULL OR driver_expires_at < {now})

-- name: run_claimable
-- timed. Locks the claimable runs, skipping those that concurrent claimers
-- hold (SQLite: the write transaction excludes them).
SELECT id FROM runs WHERE status IN ('queued', 'running')
  AND (driver_token IS NULL OR driver_expires_at < {now})
ORDER BY created_at, id LIMIT $2 {skip_locked}

-- name: run_claim_locked
-- timed
UPDATE runs SET driver_id = $2, driver_token = $3,
driver_expires_at = {later $4} WHERE id = $5 RETURNING *

-- name: run_renew
-- timed
UPDATE runs SET driver_expires_at = {later $2}
WHERE id = $3 AND driver_token = $4

-- name: run_release
UPDATE runs SET driver_id = NULL, driver_token = NULL,
driver_expires_at = NULL WHERE id = $1 AND driver_token = $2
