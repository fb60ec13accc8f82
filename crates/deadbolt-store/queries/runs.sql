-- Statements of the runs repository (src/sql/runs.rs).

-- name: run_insert_idempotent
-- timed
INSERT INTO runs (id, team, client_request_id, name, status, spec_json,
created_at, updated_at)
VALUES ($2, $3, $4, $5, 'queued', $6, {now}, {now})
ON CONFLICT (team, client_request_id) DO NOTHING RETURNING *

-- name: run_insert
-- timed
INSERT INTO runs (id, team, client_request_id, name, status, spec_json,
created_at, updated_at)
VALUES ($2, $3, $4, $5, 'queued', $6, {now}, {now}) RETURNING *

-- name: run_by_request
SELECT * FROM runs WHERE team = $1 AND client_request_id = $2

-- name: team_lock
-- One submit of a team at a time: the team's row stays locked until the
-- transaction ends.
SELECT name FROM teams WHERE name = $1 {update_lock}

-- name: run_count_in_flight
SELECT count(*) FROM runs WHERE team = $1
AND status IN ('queued', 'running')

-- name: run_get
SELECT * FROM runs WHERE id = $1

-- name: run_list_team
-- Two texts rather than `$1 IS NULL OR team = $1`, so that each gets its
-- own plan (the team's uses its index).
SELECT * FROM runs WHERE team = $3
ORDER BY created_at DESC, id LIMIT $1 OFFSET $2

-- name: run_list_all
SELECT * FROM runs ORDER BY created_at DESC, id LIMIT $1 OFFSET $2

-- name: run_summaries_of
SELECT * FROM run_summary WHERE id IN ({each_id $1})

-- name: run_choices_of
SELECT run_id, criterion, k, acc, asr, ra FROM pruning_choices
WHERE run_id IN ({each_id $1}) ORDER BY criterion

-- name: run_artifacts_of
SELECT * FROM artifacts WHERE run_id IN ({each_id $1}) ORDER BY name

-- name: run_jobs_of
SELECT * FROM stage_jobs WHERE run_id IN ({each_id $1})
ORDER BY created_at, id

-- name: run_count_status
SELECT count(*) FROM runs WHERE team = $1 AND status IN ({each $2})

-- name: run_set_status
-- timed. The compare-and-set: a finished run never changes, a running run
-- does not go back to queued; $5, when set, must be the drive token.
UPDATE runs SET status = $2, error = $3, updated_at = {now}
WHERE id = $4 AND status IN ('queued', 'running')
  AND NOT (status = 'running' AND $2 = 'queued')
  AND ($5 IS NULL OR driver_token = $5)
RETURNING *

-- name: run_status_and_driver
SELECT status, driver_token FROM runs WHERE id = $1

-- name: run_cancel
-- timed
UPDATE runs SET status = 'cancelled', updated_at = {now}
WHERE id = $2 AND status IN ('queued', 'running') RETURNING *

-- name: run_cancel_jobs
-- timed
UPDATE stage_jobs SET status = 'cancelled', updated_at = {now}
WHERE run_id = $2 AND status IN ('queued', 'leased')

-- name: run_summary
SELECT * FROM run_summary WHERE id = $1
