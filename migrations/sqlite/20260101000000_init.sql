-- deadbolt metadata schema, SQLite flavour. The Postgres flavour in
-- migrations/postgres keeps the same tables, columns and views.

CREATE TABLE runs (
    id                TEXT PRIMARY KEY,
    client_request_id TEXT UNIQUE,
    name              TEXT NOT NULL,
    status            TEXT NOT NULL DEFAULT 'queued'
                      CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    error             TEXT,
    spec_json         TEXT NOT NULL,
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL
);
CREATE INDEX runs_created_at_idx ON runs (created_at DESC, id);

-- The job queue: one row per (run, stage). Workers lease rows with one
-- UPDATE ... WHERE id = (SELECT ... LIMIT 1) RETURNING *; a lease expires unless renewed.
-- Times are fixed-width RFC 3339 UTC text (YYYY-MM-DDTHH:MM:SS.ffffffZ), so they sort as text.
CREATE TABLE stage_jobs (
    id               TEXT PRIMARY KEY,
    run_id           TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    stage            TEXT NOT NULL,
    status           TEXT NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'leased', 'succeeded', 'failed', 'cancelled')),
    payload          TEXT NOT NULL,
    result           TEXT,
    error            TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL CHECK (max_attempts >= 1),
    lease_token      TEXT,
    leased_by        TEXT,
    lease_expires_at TEXT,
    run_after        TEXT NOT NULL,
    progress         REAL,
    progress_message TEXT,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    UNIQUE (run_id, stage)
);
CREATE INDEX stage_jobs_runnable_idx ON stage_jobs (stage, status, run_after, created_at);

CREATE TABLE metrics (
    run_id      TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    stage       TEXT NOT NULL,
    name        TEXT NOT NULL,
    step        INTEGER NOT NULL,
    value       REAL NOT NULL,
    recorded_at TEXT NOT NULL,
    PRIMARY KEY (run_id, stage, name, step)
);
CREATE INDEX metrics_run_name_idx ON metrics (run_id, name, step);

CREATE TABLE neuron_stats (
    run_id  TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    layer   TEXT NOT NULL,
    model   TEXT NOT NULL CHECK (model IN ('clean', 'backdoored')),
    input   TEXT NOT NULL CHECK (input IN ('clean', 'triggered')),
    norm    TEXT NOT NULL CHECK (norm IN ('l1', 'l2', 'linf', 'mean')),
    channel INTEGER NOT NULL,
    value   REAL NOT NULL,
    PRIMARY KEY (run_id, layer, model, input, norm, channel)
);

CREATE TABLE pruning_curves (
    run_id    TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    criterion TEXT NOT NULL,
    k         INTEGER NOT NULL,
    acc       REAL NOT NULL,
    asr       REAL NOT NULL,
    ra        REAL NOT NULL,
    PRIMARY KEY (run_id, criterion, k)
);

CREATE TABLE pruning_choices (
    run_id    TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    criterion TEXT NOT NULL,
    k         INTEGER NOT NULL,
    acc       REAL NOT NULL,
    asr       REAL NOT NULL,
    ra        REAL NOT NULL,
    PRIMARY KEY (run_id, criterion)
);

CREATE TABLE artifacts (
    run_id       TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    uri          TEXT NOT NULL,
    sha256       TEXT NOT NULL CHECK (length(sha256) = 64),
    size         INTEGER NOT NULL CHECK (size >= 0),
    content_type TEXT,
    created_at   TEXT NOT NULL,
    PRIMARY KEY (run_id, name)
);

-- Progress events; seq is monotonic across the store (SQLite serialises writers).
CREATE TABLE run_events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id     TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    stage      TEXT NOT NULL,
    kind       TEXT NOT NULL,
    message    TEXT NOT NULL,
    progress   REAL,
    created_at TEXT NOT NULL
);
CREATE INDEX run_events_run_seq_idx ON run_events (run_id, seq);

-- Only the sha256 of a key is stored.
CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    key_hash   TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);

-- Stable views for dashboards (same names and columns on SQLite).
-- Headline figures come from metrics named clean_acc, backdoored_acc and
-- backdoored_asr (any stage; the value at the highest step wins).
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
    ch.ra  AS linf_ra
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
