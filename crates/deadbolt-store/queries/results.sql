-- Statements of the results repository: metrics, neuron statistics,
-- pruning curves and choices, scan results (src/sql/results.rs).

-- name: metric_upsert
-- timed
INSERT INTO metrics (run_id, stage, name, step, value, recorded_at)
VALUES ($2, $3, $4, $5, $6, {now})
ON CONFLICT (run_id, stage, name, step)
DO UPDATE SET value = excluded.value, recorded_at = excluded.recorded_at

-- name: metric_list
SELECT * FROM metrics WHERE run_id = $1 ORDER BY stage, name, step

-- name: neuron_stats_insert
-- The head of a multi-row insert: VALUES rows of 7 follow, then
-- neuron_stats_on_conflict.
INSERT INTO neuron_stats (run_id, layer, model, input, norm, channel, value)

-- name: neuron_stats_on_conflict
ON CONFLICT (run_id, layer, model, input, norm, channel)
DO UPDATE SET value = excluded.value

-- name: neuron_stats_list
SELECT layer, model, input, norm, channel, value FROM neuron_stats_v
WHERE run_id = $1 ORDER BY layer, model, input, norm, channel

-- name: curve_insert
-- The head of a multi-row insert: VALUES rows of 6 follow, then
-- curve_on_conflict.
INSERT INTO pruning_curves (run_id, criterion, k, acc, asr, ra)

-- name: curve_on_conflict
ON CONFLICT (run_id, criterion, k)
DO UPDATE SET acc = excluded.acc, asr = excluded.asr, ra = excluded.ra

-- name: curve_list
SELECT criterion, k, acc, asr, ra, chosen FROM pruning_curves_v
WHERE run_id = $1 ORDER BY criterion, k

-- name: choice_upsert
INSERT INTO pruning_choices (run_id, criterion, k, acc, asr, ra)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (run_id, criterion) DO UPDATE SET
k = excluded.k, acc = excluded.acc, asr = excluded.asr, ra = excluded.ra

-- name: choice_list
SELECT criterion, k, acc, asr, ra FROM pruning_choices
WHERE run_id = $1 ORDER BY criterion

-- name: scan_result_upsert
-- timed
INSERT INTO scan_results (run_id, model, verdict, suspect_label,
anomaly_index, clean_acc, repaired, acc_before, asr_before, acc_after,
asr_after, pruned_channels, met, updated_at)
VALUES ($2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, {now})
ON CONFLICT (run_id) DO UPDATE SET model = excluded.model,
verdict = excluded.verdict, suspect_label = excluded.suspect_label,
anomaly_index = excluded.anomaly_index, clean_acc = excluded.clean_acc,
repaired = excluded.repaired, acc_before = excluded.acc_before,
asr_before = excluded.asr_before, acc_after = excluded.acc_after,
asr_after = excluded.asr_after, pruned_channels = excluded.pruned_channels,
met = excluded.met, updated_at = excluded.updated_at

-- name: scan_result_get
SELECT model, verdict, suspect_label, anomaly_index, clean_acc, repaired,
acc_before, asr_before, acc_after, asr_after, pruned_channels, met
FROM scan_results WHERE run_id = $1
