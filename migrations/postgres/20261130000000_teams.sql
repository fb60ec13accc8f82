-- Teams and team API keys (issue 9). Runs, their events, jobs and artifacts
-- belong to a team; `client_request_id` is unique per team. The team
-- `local` always exists: the embedded `deadbolt experiment` runs as it, and
-- runs and keys made before this migration are moved to it.

CREATE TABLE teams (
    name       TEXT PRIMARY KEY CHECK (name ~ '^[a-z0-9-]{1,64}$'),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO teams (name) VALUES ('local');

-- API keys: only the sha256 of a key is stored, with a short non-secret
-- prefix of it for operators. `scopes` is a space-separated subset of
-- `submit read admin`. Keys made before this migration keep working as keys
-- of team `local` with the scopes `read submit` (their prefix is unknown).
ALTER TABLE api_keys ADD COLUMN team TEXT NOT NULL DEFAULT 'local' REFERENCES teams (name);
ALTER TABLE api_keys ALTER COLUMN team DROP DEFAULT;
ALTER TABLE api_keys ADD COLUMN scopes TEXT NOT NULL DEFAULT 'read submit' CHECK (scopes <> '');
ALTER TABLE api_keys ALTER COLUMN scopes DROP DEFAULT;
ALTER TABLE api_keys ADD COLUMN prefix TEXT NOT NULL DEFAULT '';
ALTER TABLE api_keys ALTER COLUMN prefix DROP DEFAULT;
ALTER TABLE api_keys ADD COLUMN expires_at TIMESTAMPTZ;
ALTER TABLE api_keys ADD COLUMN revoked_at TIMESTAMPTZ;
ALTER TABLE api_keys ADD COLUMN last_used_at TIMESTAMPTZ;
CREATE INDEX api_keys_team_idx ON api_keys (team, created_at, id);

-- Runs belong to a team; a client_request_id is unique within its team.
ALTER TABLE runs ADD COLUMN team TEXT NOT NULL DEFAULT 'local' REFERENCES teams (name);
ALTER TABLE runs DROP CONSTRAINT runs_client_request_id_key;
CREATE UNIQUE INDEX runs_team_request_idx ON runs (team, client_request_id);
CREATE INDEX runs_team_created_at_idx ON runs (team, created_at DESC, id);
CREATE INDEX runs_team_status_idx ON runs (team, status);

-- The dashboards' run view gains the team (a new last column).
CREATE OR REPLACE VIEW run_summary AS
SELECT
    r.id,
    r.name,
    r.status,
    r.error,
    r.created_at,
    r.updated_at,
    (SELECT m.value FROM metrics m WHERE m.run_id = r.id AND m.name = 'clean_acc'
      ORDER BY m.step DESC, m.recorded_at DESC LIMIT 1) AS clean_acc,
    (SELECT m.value FROM metrics m WHERE m.run_id = r.id AND m.name = 'backdoored_acc'
      ORDER BY m.step DESC, m.recorded_at DESC LIMIT 1) AS backdoored_acc,
    (SELECT m.value FROM metrics m WHERE m.run_id = r.id AND m.name = 'backdoored_asr'
      ORDER BY m.step DESC, m.recorded_at DESC LIMIT 1) AS backdoored_asr,
    ch.k   AS linf_k,
    ch.acc AS linf_acc,
    ch.asr AS linf_asr,
    ch.ra  AS linf_ra,
    r.team
FROM runs r
LEFT JOIN pruning_choices ch ON ch.run_id = r.id AND ch.criterion = 'linf';
