-- Statements of the jobs repository: the stage-job queue (src/sql/jobs.rs).

-- name: job_queue_stats
-- timed
SELECT stage, count(*), min(created_at) FROM stage_jobs
WHERE status = 'queued' AND run_after <= {now} GROUP BY stage

-- name: job_insert
-- timed
INSERT INTO stage_jobs (id, run_id, stage, status, payload, attempts,
max_attempts, run_after, created_at, updated_at)
VALUES ($2, $3, $4, 'queued', $5, 0, $6, {now}, {now}, {now})
ON CONFLICT (run_id, stage) DO NOTHING RETURNING *

-- name: job_by_stage
SELECT * FROM stage_jobs WHERE run_id = $1 AND stage = $2

-- name: job_get
SELECT * FROM stage_jobs WHERE id = $1

-- name: job_list
SELECT * FROM stage_jobs WHERE run_id = $1 ORDER BY created_at, id

-- name: job_fail_expired
-- timed
UPDATE stage_jobs SET status = 'failed', updated_at = {now},
error = COALESCE(error || '; ', '') || $2, error_code = $3,
error_field = NULL
WHERE status = 'leased' AND lease_expires_at < {now}
  AND attempts >= max_attempts AND stage IN ({each $4})

-- name: job_lease
-- timed. One statement: a runnable job, locked (skipping rows other
-- leasers hold) and leased. Fair across teams: the team with the fewest
-- jobs running now goes first, and within it the oldest job (one team's
-- hundred queued runs do not starve another team's one).
UPDATE stage_jobs SET status = 'leased', attempts = attempts + 1,
lease_token = $2, leased_by = $3, lease_expires_at = {later $4},
updated_at = {now}
WHERE id = (
  SELECT cand.id FROM stage_jobs AS cand
  WHERE cand.stage IN ({each $5})
    AND ((cand.status = 'queued' AND cand.run_after <= {now})
      OR (cand.status = 'leased' AND cand.lease_expires_at < {now}
          AND cand.attempts < cand.max_attempts))
  ORDER BY (
      SELECT count(*) FROM stage_jobs AS busy
      JOIN runs AS busy_run ON busy_run.id = busy.run_id
      WHERE busy.status = 'leased' AND busy.lease_expires_at >= {now}
        AND busy_run.team =
          (SELECT team FROM runs WHERE runs.id = cand.run_id)),
    cand.created_at, cand.id
  LIMIT 1 {skip_locked})
RETURNING *

-- name: job_next_lease_at
SELECT min(t) FROM (
  SELECT run_after AS t FROM stage_jobs
  WHERE status = 'queued' AND stage IN ({each $1})
  UNION ALL
  SELECT lease_expires_at AS t FROM stage_jobs
  WHERE status = 'leased' AND stage IN ({each $1})) AS soon

-- name: job_heartbeat
-- timed
UPDATE stage_jobs SET lease_expires_at = {later $2}, updated_at = {now},
progress = COALESCE($3, progress),
progress_message = COALESCE($4, progress_message)
WHERE id = $5 AND lease_token = $6 AND status = 'leased' RETURNING *

-- name: job_complete
-- timed
UPDATE stage_jobs SET status = 'succeeded', result = $2, error = NULL,
error_code = NULL, error_field = NULL, progress = 1.0,
lease_expires_at = NULL, updated_at = {now}
WHERE id = $3 AND lease_token = $4 AND status = 'leased' RETURNING *

-- name: job_end_attempt
-- timed. Requeued after the backoff ($6) if $2 and attempts remain, else
-- failed.
UPDATE stage_jobs SET
status = CASE WHEN $2 AND attempts < max_attempts
  THEN 'queued' ELSE 'failed' END,
error = $3, error_code = $4, error_field = $5, run_after = {later $6},
lease_token = NULL, lease_expires_at = NULL, updated_at = {now}
WHERE id = $7 AND lease_token = $8 AND status = 'leased' RETURNING *

-- name: job_release
-- timed. The attempt that this lease counted is given back.
UPDATE stage_jobs SET status = 'queued', attempts = attempts - 1,
run_after = {now}, lease_token = NULL, leased_by = NULL,
lease_expires_at = NULL, updated_at = {now}
WHERE id = $2 AND lease_token = $3 AND status = 'leased' RETURNING *
