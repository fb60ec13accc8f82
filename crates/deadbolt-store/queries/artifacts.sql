-- Statements of the artifacts repository: artifact records
-- (src/sql/artifacts.rs).

-- name: artifact_upsert
-- timed
INSERT INTO artifacts
(run_id, name, uri, sha256, size, content_type, created_at)
VALUES ($2, $3, $4, $5, $6, $7, {now})
ON CONFLICT (run_id, name) DO UPDATE SET uri = excluded.uri,
sha256 = excluded.sha256, size = excluded.size,
content_type = excluded.content_type

-- name: artifact_get
SELECT * FROM artifacts WHERE run_id = $1 AND name = $2

-- name: artifact_list
SELECT * FROM artifacts WHERE run_id = $1 ORDER BY name

-- name: artifact_delete
DELETE FROM artifacts WHERE run_id = $1 AND name = $2 RETURNING *
