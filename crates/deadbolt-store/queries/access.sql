-- Statements of the access repository: teams and API keys
-- (src/sql/access.rs).

-- name: team_insert
-- timed
INSERT INTO teams (name, created_at) VALUES ($2, {now})
ON CONFLICT (name) DO NOTHING RETURNING name, created_at

-- name: team_list
SELECT name, created_at FROM teams ORDER BY name

-- name: api_key_insert
-- timed
INSERT INTO api_keys (id, team, name, key_hash, prefix, scopes,
created_at, expires_at)
VALUES ($2, $3, $4, $5, $6, $7, {now}, $8) RETURNING *

-- name: api_key_list
SELECT * FROM api_keys WHERE ($1 IS NULL OR team = $1)
ORDER BY team, created_at, id

-- name: api_key_revoke
-- timed
UPDATE api_keys SET revoked_at = COALESCE(revoked_at, {now})
WHERE id = $2 RETURNING *

-- name: api_key_set_expiry
UPDATE api_keys SET expires_at = $1 WHERE id = $2 RETURNING *

-- name: api_key_by_hash
-- timed
SELECT * FROM api_keys WHERE key_hash = $2 AND revoked_at IS NULL
AND (expires_at IS NULL OR expires_at > {now})

-- name: api_key_touch
-- timed
UPDATE api_keys SET last_used_at = {now} WHERE id = $2
