-- Statements of the events repository: progress events
-- (src/sql/events.rs).

-- name: event_lock
-- Postgres only, first in the transaction that appends an event, so that
-- commit order equals seq order (watchers polling `seq > n` never skip
-- one). 0x6465_6164_6576_7473, "deadevts".
SELECT pg_advisory_xact_lock(7234295460267455603)

-- name: event_insert
-- timed
INSERT INTO run_events (run_id, stage, kind, message, progress, created_at)
VALUES ($2, $3, $4, $5, $6, {now}) RETURNING seq

-- name: event_list
SELECT * FROM run_events WHERE run_id = $1 AND seq > $2 ORDER BY seq
