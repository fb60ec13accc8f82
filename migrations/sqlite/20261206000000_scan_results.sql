-- Bring-your-own-model runs (issue 10): one row per scanned model with its
-- verdict and, when the run repaired it, the figures before and after the
-- repair (on the held-out part of the clean data the repair never tuned
-- on; ASR is the synthetic trigger's, since the real one is unknown).
CREATE TABLE scan_results (
    run_id          TEXT PRIMARY KEY REFERENCES runs (id) ON DELETE CASCADE,
    model           TEXT NOT NULL,
    verdict         TEXT NOT NULL CHECK (verdict IN ('backdoored', 'clean', 'inconclusive')),
    suspect_label   INTEGER,
    anomaly_index   REAL,
    clean_acc       REAL NOT NULL,
    repaired        INTEGER NOT NULL DEFAULT 0,
    acc_before      REAL,
    asr_before      REAL,
    acc_after       REAL,
    asr_after       REAL,
    pruned_channels INTEGER,
    met             INTEGER,
    updated_at      TEXT NOT NULL
);

-- The dashboards' view of scanned models: one row per scan or repair run.
CREATE VIEW scan_summary AS
SELECT
    r.id AS run_id,
    r.team,
    r.name,
    r.status,
    r.created_at,
    s.model,
    s.verdict,
    s.suspect_label,
    s.anomaly_index,
    s.clean_acc,
    s.repaired,
    s.acc_before,
    s.asr_before,
    s.acc_after,
    s.asr_after,
    s.pruned_channels,
    s.met
FROM scan_results s
JOIN runs r ON r.id = s.run_id;
