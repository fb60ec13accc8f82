-- The fair lease (the jobs repository's job_lease) orders candidates by how
-- many jobs the candidate's team has leased now: a correlated count over
-- stage_jobs WHERE status = 'leased', joined to runs by run_id. This index
-- answers that count from the leased jobs alone (and their runs), instead
-- of scanning every job of every stage.
CREATE INDEX stage_jobs_status_run_idx ON stage_jobs (status, run_id);
