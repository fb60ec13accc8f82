-- Bring-your-own-model runs (issue 10): one row per scanned model with its
-- verdict and, when the run repaired it, the figures before and after the
-- repair (on the held-out part of the clean data the repair never tuned
-- on; ASR is the synthetic trigger's, since the real one is unknown).
CREATE TABLE scan_results (
    run_id          UUID PRIMARY KEY REFERENCES runs (id) ON DELETE CASCADE,
    model           TEXT NOT NULL,
    verdict         TEXT NOT NULL CHECK (verdict IN ('backdoored', 'clean', 'inconclusive')),
    suspect_label   BIGINT,
    anomaly_index   DOUBLE PRECISION,
    clean_acc       DOUBLE PRECISION NOT NULL,
    repaired        BOOLEAN NOT NULL DEFAULT FALSE,
    acc_before      DOUBLE PRECISION,
    asr_before      DOUBLE PRECISION,
    acc_after       DOUBLE PRECISION,
    asr_after       DOUBLE PRECISION,
    pruned_channels BIGINT,
    met             BOOLEAN,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
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
