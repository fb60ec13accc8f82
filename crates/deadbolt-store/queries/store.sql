-- Statements of the shared implementation (src/sql/mod.rs).
--
-- Format of every file here: `-- name: <statement>` starts a statement,
-- which runs to the next one; other `--` lines are comments. Dialect tokens
-- ({now}, {later $n}, {each $n}, {each_id $n}, {skip_locked}, {share_lock},
-- {update_lock}, {begin}) are expanded once per backend when a store is
-- built (src/queries.rs). A statement marked "timed" has the application's
-- clock bound as $1 (unused on Postgres, which reads its own clock).

-- name: begin_write
-- Starts a write transaction (SQLite: BEGIN IMMEDIATE, so that it waits on
-- busy_timeout instead of failing with SQLITE_BUSY when it upgrades).
{begin}

-- name: ping
SELECT 1

-- name: fence_check
-- Locks the fenced job's row until the write transaction ends.
SELECT run_id, lease_token, status FROM stage_jobs WHERE id = $1 {share_lock}

-- name: notify
-- Postgres only: tells other processes that a run changed ($1: payload).
SELECT pg_notify('deadbolt_changes', $1)

