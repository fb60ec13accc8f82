-- Structured job failures: the error message column `error` gets a gRPC code
-- name (`invalid_argument`, `data_loss`, `unavailable`, ...) and the field at
-- fault, if any. Failures recorded before this migration get `unknown`.
ALTER TABLE stage_jobs ADD COLUMN error_code TEXT;
ALTER TABLE stage_jobs ADD COLUMN error_field TEXT;
UPDATE stage_jobs SET error_code = 'unknown' WHERE error IS NOT NULL;
