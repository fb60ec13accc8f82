-- no-transaction
-- Teams and team API keys (issue 9), SQLite flavour of the Postgres
-- migration of the same name. Runs, their events, jobs and artifacts belong
-- to a team; `client_request_id` is unique per team. The team `local` always
-- exists: the embedded `deadbolt experiment` runs as it, and runs and keys
-- made before this migration are moved to it.
--
-- SQLite cannot drop the old column-level UNIQUE of runs.client_request_id
-- nor add a column with a foreign key and a default, so `runs` and
-- `api_keys` are rebuilt (https://sqlite.org/lang_altertable.html, "making
-- other kinds of table schema changes"): with foreign keys off, so that
-- dropping the old `runs` does not cascade to its children, hence outside
-- sqlx's migration transaction, in a transaction of its own.
PRAGMA foreign_keys = OFF;
BEGIN IMMEDIATE;

CREATE TABLE teams (
    name       TEXT PRIMARY KEY
               CHECK (length(name) BETWEEN 1 AND 64 AND name NOT GLOB '*[^a-z0-9-]*'),
    created_at TEXT NOT NULL
);
INSERT INTO teams (name, created_at)
VALUES ('local', strftime('%Y-%m-%dT%H:%M:%S', 'now') || '.000000Z');

-- API keys: only the sha256 of a key is stored, with a short non-secret
-- prefix of it for operators. `scopes` is a space-separated subset of
-- `submit read admin`. Keys made before this migration keep working as keys
-- of team `local` with the scopes `read submit` (their prefix is unknown).
CREATE TABLE api_keys_new (
    id           TEXT PRIMARY KEY,
    team         TEXT NOT NULL REFERENCES teams (name),
    name         TEXT NOT NULL,
    key_hash     TEXT NOT NULL UNIQUE,
    prefix       TEXT NOT NULL,
    scopes       TEXT NOT NULL CHECK (scopes <> ''),
    created_at   TEXT NOT NULL,
    expires_at   TEXT,
    revoked_at   TEXT,
    last_used_at TEXT
);
INSERT INTO api_keys_new (id, team, name, key_hash, prefix, scopes, created_at)
SELECT id, 'local', name, key_hash, '', 'read submit', created_at FROM api_keys;
DROP TABLE api_keys;
ALTER TABLE api_keys_new RENAME TO api_keys;
CREATE INDEX api_keys_team_idx ON api_keys (team, created_at, id);

-- Runs belong to a team; a client_request_id is unique within its team.
-- The views read `runs`: dropped here, made again below.
DROP VIEW run_summary;
DROP VIEW pruning_curves_v;
DROP VIEW neuron_stats_v;
CREATE TABLE runs_new (
    id                TEXT PRIMARY KEY,
    client_request_id TEXT,
    name              TEXT NOT NULL,
    status            TEXT NOT NULL DEFAULT 'queued'
                      CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    error             TEXT,
    spec_json         TEXT NOT NULL,
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL,
    driver_id         TEXT,
    driver_token      TEXT,
    driver_expires_at TEXT,
    team              TEXT NOT NULL DEFAULT 'local' REFERENCES teams (name)
);
INSERT INTO runs_new (id, client_request_id, name, status, error, spec_json, created_at,
                      updated_at, driver_id, driver_token, driver_expires_at, team)
SELECT id, client_request_id, name, status, error, spec_json, created_at,
       updated_at, driver_id, driver_token, driver_expires_at, 'local'
FROM runs;
DROP TABLE runs;
ALTER TABLE runs_new RENAME TO runs;
CREATE INDEX runs_created_at_idx ON runs (created_at DESC, id);
CREATE INDEX runs_unfinished_idx ON runs (created_at, id)
    WHERE status IN ('queued', 'running');
CREATE UNIQUE INDEX runs_team_request_idx ON runs (team, client_request_id);
CREATE INDEX runs_team_created_at_idx ON runs (team, created_at DESC, id);
CREATE INDEX runs_team_status_idx ON runs (team, status);

-- The views as before; run_summary gains the team (a new last column).
CREATE VIEW run_summary AS
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

CREATE VIEW pruning_curves_v AS
SELECT
    pc.run_id,
    r.name AS run_name,
    pc.criterion,
    pc.k,
    pc.acc,
    pc.asr,
    pc.ra,
    COALESCE(ch.k = pc.k, false) AS chosen
FROM pruning_curves pc
JOIN runs r ON r.id = pc.run_id
LEFT JOIN pruning_choices ch ON ch.run_id = pc.run_id AND ch.criterion = pc.criterion;

CREATE VIEW neuron_stats_v AS
SELECT
    ns.run_id,
    r.name AS run_name,
    ns.layer,
    ns.model,
    ns.input,
    ns.model || '/' || ns.input AS setting,
    ns.norm,
    ns.channel,
    ns.value
FROM neuron_stats ns
JOIN runs r ON r.id = ns.run_id;

COMMIT;
PRAGMA foreign_keys = ON;
