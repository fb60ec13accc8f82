//! The repositories of [`crate::repos`] over SQL: one `impl` block per
//! repository, each written once for both backends (`DB: Backend`), with
//! the shared machinery (statement table, fenced writes, notifications) in
//! the parent module.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use uuid::Uuid;

use super::{
    At, FencedWrite, Id, Later, SqlStore, LAST_USED_PRECISION, LEASE_EXPIRED, MAX_API_KEY_LEN,
    ROWS_PER_INSERT,
};
use crate::backend::Backend;
use crate::changes::{Change, ChangeKind};
use crate::error::{map_db, map_db_missing, Result, StoreError};
use crate::queries::Stmt;
use crate::records::*;
use crate::repos::*;
use crate::rows::*;

// ---- Health ----

#[async_trait]
impl<DB: Backend> Health for SqlStore<DB> {
    fn backend(&self) -> &'static str {
        DB::BACKEND
    }

    async fn ping(&self) -> Result<()> {
        self.q(Stmt::ping).execute(&self.pool).await?;
        Ok(())
    }

    fn pool_stats(&self) -> (u32, u32) {
        (self.pool.size(), self.pool.num_idle() as u32)
    }
}

// ---- Runs ----

// Crate-private helpers only: `Backend` stays crate-private.
#[allow(private_bounds)]
impl<DB: Backend> SqlStore<DB> {
    /// The compare-and-set of a run's status (a finished run never
    /// changes, a running run does not go back to queued), also requiring
    /// the drive token when `token` is given.
    async fn set_status(
        &self,
        id: Uuid,
        token: Option<Uuid>,
        status: RunStatus,
        error: Option<String>,
    ) -> Result<Run> {
        let row: Option<RunRow> = self
            .timed(Stmt::run_set_status)
            .bind(status.as_str())
            .bind(&error)
            .bind(Id(id))
            .bind(token.map(Id))
            .fetch_optional(&self.pool)
            .await?;
        if let Some(row) = row {
            tracing::info!(run_id = %id, status = %status, "run status set");
            self.changed(id, ChangeKind::Run).await;
            return Ok(Run::from(row));
        }
        let current: Option<(String, Option<Id>)> = self
            .q(Stmt::run_status_and_driver)
            .bind(Id(id))
            .fetch_optional(&self.pool)
            .await?;
        let Some((current, driver_token)) = current else {
            return Err(StoreError::not_found("run", id));
        };
        if let Some(token) = token {
            if driver_token != Some(Id(token)) {
                return Err(StoreError::DriveLost { run_id: id });
            }
        }
        Err(StoreError::FailedPrecondition(format!(
            "run {id} is {current}; it cannot become {status}"
        )))
    }
}

#[async_trait]
impl<DB: Backend> RunRepo for SqlStore<DB> {
    async fn create_run(&self, new: NewRun) -> Result<(Run, bool)> {
        let inserted: Option<RunRow> = self
            .timed(Stmt::run_insert_idempotent)
            .bind(Id(Uuid::new_v4()))
            .bind(&new.team)
            .bind(&new.client_request_id)
            .bind(&new.name)
            .bind(Json(&new.spec_json))
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| map_db_missing(e, "team", &new.team))?;
        if let Some(row) = inserted {
            let run = Run::from(row);
            tracing::info!(
                run_id = %run.id, team = %run.team, name = %run.name, "created run"
            );
            return Ok((run, true));
        }
        let row: RunRow = self
            .q(Stmt::run_by_request)
            .bind(&new.team)
            .bind(&new.client_request_id)
            .fetch_one(&self.pool)
            .await?;
        let run = Run::from(row);
        crate::check_same_request(&run, &new)?;
        Ok((run, false))
    }

    async fn create_run_within(&self, new: NewRun, max_in_flight: i64) -> Result<(Run, bool)> {
        let mut tx = self.write_tx().await?;
        // one submit of a team at a time: the team's row stays locked until
        // this transaction ends, so the count below sees every run an
        // earlier submit created
        let team: Option<(String,)> = self
            .q(Stmt::team_lock)
            .bind(&new.team)
            .fetch_optional(&mut tx)
            .await?;
        if team.is_none() {
            return Err(StoreError::not_found("team", &new.team));
        }
        if let Some(crid) = &new.client_request_id {
            let existing: Option<RunRow> = self
                .q(Stmt::run_by_request)
                .bind(&new.team)
                .bind(crid)
                .fetch_optional(&mut tx)
                .await?;
            if let Some(row) = existing {
                // an idempotent retry answers its run, at quota too
                let run = Run::from(row);
                crate::check_same_request(&run, &new)?;
                return Ok((run, false));
            }
        }
        let (in_flight,): (i64,) = self
            .q(Stmt::run_count_in_flight)
            .bind(&new.team)
            .fetch_one(&mut tx)
            .await?;
        if in_flight >= max_in_flight {
            return Err(StoreError::QuotaExceeded(format!(
                "team {} has {in_flight} runs queued or running, its quota is {max_in_flight}",
                new.team
            )));
        }
        let row: RunRow = self
            .timed(Stmt::run_insert)
            .bind(Id(Uuid::new_v4()))
            .bind(&new.team)
            .bind(&new.client_request_id)
            .bind(&new.name)
            .bind(Json(&new.spec_json))
            .fetch_one(&mut tx)
            .await
            .map_err(|e| map_db_missing(e, "team", &new.team))?;
        tx.commit().await?;
        let run = Run::from(row);
        tracing::info!(
            run_id = %run.id, team = %run.team, name = %run.name, in_flight,
            "created run"
        );
        Ok((run, true))
    }

    async fn get_run(&self, id: Uuid) -> Result<Run> {
        self.fetch_run(id)
            .await?
            .ok_or_else(|| StoreError::not_found("run", id))
    }

    async fn list_runs(&self, team: Option<&str>, limit: i64, offset: i64) -> Result<Vec<Run>> {
        let query = match team {
            Some(team) => self
                .q(Stmt::run_list_team)
                .bind(limit.max(0))
                .bind(offset.max(0))
                .bind(team),
            None => self
                .q(Stmt::run_list_all)
                .bind(limit.max(0))
                .bind(offset.max(0)),
        };
        self.all::<RunRow, _>(query).await
    }

    async fn list_run_pages(
        &self,
        team: Option<&str>,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<RunPage>> {
        let runs = self.list_runs(team, limit, offset).await?;
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = runs.iter().map(|r| r.id.to_string()).collect();
        let of_runs = |stmt| self.q(stmt).bind(Json(&ids));
        let summaries: Vec<RunSummary> = self
            .all::<SummaryRow, _>(of_runs(Stmt::run_summaries_of))
            .await?;
        let choices: Vec<ChoiceRow> = self.all(of_runs(Stmt::run_choices_of)).await?;
        let artifacts: Vec<ArtifactRecord> = self
            .all::<ArtifactRow, _>(of_runs(Stmt::run_artifacts_of))
            .await?;
        let jobs: Vec<Job> = self.all::<JobRow, _>(of_runs(Stmt::run_jobs_of)).await?;

        let at: std::collections::HashMap<Uuid, usize> =
            runs.iter().enumerate().map(|(i, r)| (r.id, i)).collect();
        let mut pages: Vec<RunPage> = runs
            .into_iter()
            .map(|run| RunPage {
                run,
                summary: None,
                choices: Vec::new(),
                artifacts: Vec::new(),
                jobs: Vec::new(),
            })
            .collect();
        // Each kind comes in its per-run order, so pushing keeps it.
        for r in summaries {
            if let Some(&i) = at.get(&r.id) {
                pages[i].summary = Some(r);
            }
        }
        for r in choices {
            if let Some(&i) = at.get(&r.run_id.0) {
                pages[i].choices.push(r.choice);
            }
        }
        for r in artifacts {
            if let Some(&i) = at.get(&r.run_id) {
                pages[i].artifacts.push(r);
            }
        }
        for r in jobs {
            if let Some(&i) = at.get(&r.run_id) {
                pages[i].jobs.push(r);
            }
        }
        Ok(pages)
    }

    async fn count_runs(&self, team: &str, statuses: &[RunStatus]) -> Result<i64> {
        if statuses.is_empty() {
            return Ok(0);
        }
        let statuses: Vec<&str> = statuses.iter().map(RunStatus::as_str).collect();
        let (count,): (i64,) = self
            .q(Stmt::run_count_status)
            .bind(team)
            .bind(Json(&statuses))
            .fetch_one(&self.pool)
            .await?;
        Ok(count)
    }

    async fn set_run_status(
        &self,
        id: Uuid,
        status: RunStatus,
        error: Option<String>,
    ) -> Result<Run> {
        self.set_status(id, None, status, error).await
    }

    async fn cancel_run(&self, id: Uuid) -> Result<Run> {
        let mut tx = self.write_tx().await?;
        let cancelled: Option<RunRow> = self
            .timed(Stmt::run_cancel)
            .bind(Id(id))
            .fetch_optional(&mut tx)
            .await?;
        let run = match cancelled {
            Some(row) => Run::from(row),
            None => {
                let row: Option<RunRow> = self
                    .q(Stmt::run_get)
                    .bind(Id(id))
                    .fetch_optional(&mut tx)
                    .await?;
                let run = Run::from(row.ok_or_else(|| StoreError::not_found("run", id))?);
                if run.status != RunStatus::Cancelled {
                    return Err(StoreError::FailedPrecondition(format!(
                        "run {id} already {}",
                        run.status
                    )));
                }
                run
            }
        };
        // Also on a repeated cancel: a job enqueued since is cancelled too.
        let jobs = self
            .timed(Stmt::run_cancel_jobs)
            .bind(Id(id))
            .execute(&mut tx)
            .await?;
        tx.commit().await?;
        tracing::info!(run_id = %id, jobs, "run cancelled");
        self.changed(id, ChangeKind::Run).await;
        Ok(run)
    }

    async fn run_summary(&self, run_id: Uuid) -> Result<RunSummary> {
        let q = self.q(Stmt::run_summary).bind(Id(run_id));
        self.one::<SummaryRow, _>(q, || StoreError::not_found("run", run_id))
            .await
    }
}

// ---- Run claims (drive leases) ----

#[async_trait]
impl<DB: Backend> RunClaimRepo for SqlStore<DB> {
    async fn claim_run(
        &self,
        run_id: Uuid,
        driver_id: &str,
        lease: Duration,
    ) -> Result<Option<Uuid>> {
        let token = Uuid::new_v4();
        let claimed = self
            .timed(Stmt::run_claim)
            .bind(driver_id)
            .bind(Id(token))
            .bind(Later(lease))
            .bind(Id(run_id))
            .execute(&self.pool)
            .await?;
        if claimed == 0 {
            self.get_run(run_id).await?;
            return Ok(None);
        }
        tracing::info!(%run_id, driver = driver_id, "claimed the drive of a run");
        Ok(Some(token))
    }

    async fn claim_runs(
        &self,
        driver_id: &str,
        lease: Duration,
        limit: i64,
    ) -> Result<Vec<(Run, Uuid)>> {
        if limit <= 0 {
            return Ok(Vec::new());
        }
        let mut tx = self.write_tx().await?;
        let ids: Vec<(Id,)> = self
            .timed(Stmt::run_claimable)
            .bind(limit)
            .fetch_all(&mut tx)
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for (id,) in ids {
            let token = Uuid::new_v4();
            let row: RunRow = self
                .timed(Stmt::run_claim_locked)
                .bind(driver_id)
                .bind(Id(token))
                .bind(Later(lease))
                .bind(id)
                .fetch_one(&mut tx)
                .await?;
            out.push((Run::from(row), token));
        }
        tx.commit().await?;
        if !out.is_empty() {
            tracing::info!(
                runs = out.len(),
                driver = driver_id,
                "claimed the drive of runs"
            );
        }
        Ok(out)
    }

    async fn renew_run(&self, run_id: Uuid, token: Uuid, lease: Duration) -> Result<()> {
        let renewed = self
            .timed(Stmt::run_renew)
            .bind(Later(lease))
            .bind(Id(run_id))
            .bind(Id(token))
            .execute(&self.pool)
            .await?;
        if renewed == 0 {
            self.get_run(run_id).await?;
            return Err(StoreError::DriveLost { run_id });
        }
        Ok(())
    }

    async fn release_run(&self, run_id: Uuid, token: Uuid) -> Result<()> {
        let released = self
            .q(Stmt::run_release)
            .bind(Id(run_id))
            .bind(Id(token))
            .execute(&self.pool)
            .await?;
        if released > 0 {
            tracing::info!(%run_id, "released the drive of a run");
        }
        Ok(())
    }

    async fn set_run_status_fenced(
        &self,
        id: Uuid,
        token: Uuid,
        status: RunStatus,
        error: Option<String>,
    ) -> Result<Run> {
        self.set_status(id, Some(token), status, error).await
    }
}

// ---- Jobs (the stage-job queue) ----

// Crate-private helpers only: `Backend` stays crate-private.
#[allow(private_bounds)]
impl<DB: Backend> SqlStore<DB> {
    /// Ends the leased attempt of a job with `error`: requeued after
    /// `retry_after` if given and attempts remain, else failed.
    async fn end_attempt(
        &self,
        job_id: Uuid,
        lease_token: Uuid,
        error: &JobFailure,
        retry_after: Option<Duration>,
    ) -> Result<Job> {
        error.validate()?;
        let row: Option<JobRow> = self
            .timed(Stmt::job_end_attempt)
            .bind(retry_after.is_some())
            .bind(&error.message)
            .bind(&error.code)
            .bind(&error.field)
            .bind(Later(retry_after.unwrap_or_default()))
            .bind(Id(job_id))
            .bind(Id(lease_token))
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else {
            return Err(self.lease_lost(job_id).await);
        };
        let j = Job::from(row);
        tracing::warn!(
            job_id = %job_id, status = %j.status, attempt = j.attempts, %error,
            "job attempt failed"
        );
        self.changed(j.run_id, ChangeKind::Job).await;
        Ok(j)
    }
}

#[async_trait]
impl<DB: Backend> JobRepo for SqlStore<DB> {
    async fn enqueue_job(&self, job: NewJob) -> Result<(Job, bool)> {
        validate_job(&job)?;
        let inserted: Option<JobRow> = self
            .timed(Stmt::job_insert)
            .bind(Id(Uuid::new_v4()))
            .bind(Id(job.run_id))
            .bind(&job.stage)
            .bind(Json(&job.payload))
            .bind(job.max_attempts)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| map_db(e, Some(job.run_id)))?;
        if let Some(row) = inserted {
            let j = Job::from(row);
            tracing::debug!(
                job_id = %j.id, run_id = %j.run_id, stage = %j.stage, "enqueued job"
            );
            // idle workers wake on it
            self.changed(j.run_id, ChangeKind::Job).await;
            return Ok((j, true));
        }
        let row: JobRow = self
            .q(Stmt::job_by_stage)
            .bind(Id(job.run_id))
            .bind(&job.stage)
            .fetch_one(&self.pool)
            .await?;
        Ok((Job::from(row), false))
    }

    async fn lease_job(
        &self,
        worker_id: &str,
        stages: &[String],
        lease: Duration,
    ) -> Result<Option<Job>> {
        let expired = self
            .timed(Stmt::job_fail_expired)
            .bind(LEASE_EXPIRED)
            .bind(JobFailure::LEASE_EXPIRED_CODE)
            .bind(Json(stages))
            .execute(&self.pool)
            .await?;
        if expired > 0 {
            tracing::warn!(
                jobs = expired,
                "failed jobs whose lease expired with no attempts left"
            );
        }
        let row: Option<JobRow> = self
            .timed(Stmt::job_lease)
            .bind(Id(Uuid::new_v4()))
            .bind(worker_id)
            .bind(Later(lease))
            .bind(Json(stages))
            .fetch_optional(&self.pool)
            .await?;
        let job = row.map(Job::from);
        if let Some(j) = &job {
            tracing::info!(
                job_id = %j.id, stage = %j.stage, attempt = j.attempts,
                worker = worker_id, "leased job"
            );
        }
        Ok(job)
    }

    async fn next_lease_at(&self, stages: &[String]) -> Result<Option<DateTime<Utc>>> {
        let (at,): (Option<DateTime<Utc>>,) = self
            .q(Stmt::job_next_lease_at)
            .bind(Json(stages))
            .fetch_one(&self.pool)
            .await?;
        Ok(at)
    }

    async fn heartbeat(
        &self,
        job_id: Uuid,
        lease_token: Uuid,
        lease: Duration,
        progress: Option<(f64, String)>,
    ) -> Result<Job> {
        let (p, msg) = progress.unzip();
        let row: Option<JobRow> = self
            .timed(Stmt::job_heartbeat)
            .bind(Later(lease))
            .bind(p)
            .bind(msg)
            .bind(Id(job_id))
            .bind(Id(lease_token))
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => Ok(Job::from(row)),
            None => Err(self.lease_lost(job_id).await),
        }
    }

    async fn complete_job(&self, job_id: Uuid, lease_token: Uuid, result: Value) -> Result<Job> {
        let row: Option<JobRow> = self
            .timed(Stmt::job_complete)
            .bind(Json(&result))
            .bind(Id(job_id))
            .bind(Id(lease_token))
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => {
                tracing::info!(job_id = %job_id, "job succeeded");
                let j = Job::from(row);
                self.changed(j.run_id, ChangeKind::Job).await;
                Ok(j)
            }
            // Repeating the completion with the same token is a no-op.
            None => match self.fetch_job(job_id).await? {
                Some(j)
                    if j.status == JobStatus::Succeeded && j.lease_token == Some(lease_token) =>
                {
                    Ok(j)
                }
                Some(_) => Err(StoreError::LeaseLost { job_id }),
                None => Err(StoreError::not_found("job", job_id)),
            },
        }
    }

    async fn fail_job(
        &self,
        job_id: Uuid,
        lease_token: Uuid,
        error: &JobFailure,
        backoff: Duration,
    ) -> Result<Job> {
        self.end_attempt(job_id, lease_token, error, Some(backoff))
            .await
    }

    async fn abort_job(&self, job_id: Uuid, lease_token: Uuid, error: &JobFailure) -> Result<Job> {
        self.end_attempt(job_id, lease_token, error, None).await
    }

    async fn release_job(&self, job_id: Uuid, lease_token: Uuid) -> Result<Job> {
        let row: Option<JobRow> = self
            .timed(Stmt::job_release)
            .bind(Id(job_id))
            .bind(Id(lease_token))
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else {
            return Err(self.lease_lost(job_id).await);
        };
        let j = Job::from(row);
        tracing::info!(job_id = %job_id, attempts = j.attempts, "job released");
        self.changed(j.run_id, ChangeKind::Job).await;
        Ok(j)
    }

    async fn get_job(&self, id: Uuid) -> Result<Job> {
        self.fetch_job(id)
            .await?
            .ok_or_else(|| StoreError::not_found("job", id))
    }

    async fn list_jobs(&self, run_id: Uuid) -> Result<Vec<Job>> {
        self.all::<JobRow, _>(self.q(Stmt::job_list).bind(Id(run_id)))
            .await
    }

    async fn queue_stats(&self) -> Result<Vec<QueueStat>> {
        let rows: Vec<(String, i64, Option<DateTime<Utc>>)> = self
            .timed(Stmt::job_queue_stats)
            .fetch_all(&self.pool)
            .await?;
        let now = Utc::now();
        Ok(rows
            .into_iter()
            .map(|(stage, queued, oldest)| QueueStat {
                stage,
                queued,
                oldest_seconds: oldest
                    .map(|t| (now - t).num_milliseconds().max(0) as f64 / 1000.0)
                    .unwrap_or(0.0),
            })
            .collect())
    }
}

// ---- Results ----

#[async_trait]
impl<DB: Backend> ResultRepo for SqlStore<DB> {
    async fn record_metric(
        &self,
        fence: Option<&Fence>,
        run_id: Uuid,
        stage: &str,
        name: &str,
        step: i64,
        value: f64,
    ) -> Result<()> {
        self.fenced_execute(FencedWrite::RecordMetric, fence, run_id, || {
            vec![self
                .timed(Stmt::metric_upsert)
                .bind(Id(run_id))
                .bind(stage)
                .bind(name)
                .bind(step)
                .bind(value)]
        })
        .await
    }

    async fn list_metrics(&self, run_id: Uuid) -> Result<Vec<Metric>> {
        self.all::<MetricRow, _>(self.q(Stmt::metric_list).bind(Id(run_id)))
            .await
    }

    async fn put_neuron_stats(
        &self,
        fence: Option<&Fence>,
        run_id: Uuid,
        rows: &[NeuronStat],
    ) -> Result<()> {
        for r in rows {
            r.validate()?;
        }
        // the last value of each key, as row-by-row upserts would leave it
        // (one statement cannot update a row twice)
        let mut last = std::collections::BTreeMap::new();
        for r in rows {
            last.insert((&r.layer, &r.model, &r.input, &r.norm, r.channel), r.value);
        }
        let last: Vec<_> = last.into_iter().collect();
        // a few multi-row statements, not one round trip per row
        self.fenced_execute(FencedWrite::PutNeuronStats, fence, run_id, || {
            let (head, tail) = (Stmt::neuron_stats_insert, Stmt::neuron_stats_on_conflict);
            let rows = last.chunks(ROWS_PER_INSERT).map(|chunk| {
                let q = self.multi_row(head, tail, chunk.len(), 7);
                chunk
                    .iter()
                    .fold(q, |q, ((layer, model, input, norm, channel), value)| {
                        q.bind(Id(run_id))
                            .bind(*layer)
                            .bind(*model)
                            .bind(*input)
                            .bind(*norm)
                            .bind(*channel)
                            .bind(*value)
                    })
            });
            rows.collect()
        })
        .await
    }

    async fn list_neuron_stats(&self, run_id: Uuid) -> Result<Vec<NeuronStat>> {
        self.all::<NeuronStat, _>(self.q(Stmt::neuron_stats_list).bind(Id(run_id)))
            .await
    }

    async fn put_pruning_curve(
        &self,
        fence: Option<&Fence>,
        run_id: Uuid,
        criterion: &str,
        points: &[CurvePoint],
    ) -> Result<()> {
        let mut last = std::collections::BTreeMap::new();
        for p in points {
            last.insert(p.k, p);
        }
        let last: Vec<_> = last.into_values().collect();
        self.fenced_execute(FencedWrite::PutPruningCurve, fence, run_id, || {
            let (head, tail) = (Stmt::curve_insert, Stmt::curve_on_conflict);
            let rows = last.chunks(ROWS_PER_INSERT).map(|chunk| {
                let q = self.multi_row(head, tail, chunk.len(), 6);
                chunk.iter().fold(q, |q, p| {
                    let q = q.bind(Id(run_id)).bind(criterion);
                    q.bind(p.k).bind(p.acc).bind(p.asr).bind(p.ra)
                })
            });
            rows.collect()
        })
        .await
    }

    async fn set_pruning_choice(
        &self,
        fence: Option<&Fence>,
        run_id: Uuid,
        criterion: &str,
        point: CurvePoint,
    ) -> Result<()> {
        self.fenced_execute(FencedWrite::SetPruningChoice, fence, run_id, || {
            let q = self.q(Stmt::choice_upsert).bind(Id(run_id)).bind(criterion);
            vec![q
                .bind(point.k)
                .bind(point.acc)
                .bind(point.asr)
                .bind(point.ra)]
        })
        .await
    }

    async fn list_pruning_curves(&self, run_id: Uuid) -> Result<Vec<PruningCurve>> {
        let rows: Vec<CurveRow> = self.all(self.q(Stmt::curve_list).bind(Id(run_id))).await?;
        let mut out = Vec::new();
        for r in rows {
            crate::push_curve_point(&mut out, r.criterion, r.point, r.chosen);
        }
        Ok(out)
    }

    async fn list_pruning_choices(&self, run_id: Uuid) -> Result<Vec<PruningChoice>> {
        self.all::<PruningChoice, _>(self.q(Stmt::choice_list).bind(Id(run_id)))
            .await
    }

    async fn put_scan_result(
        &self,
        fence: Option<&Fence>,
        run_id: Uuid,
        r: &ScanResult,
    ) -> Result<()> {
        if !ScanResult::VERDICTS.contains(&r.verdict.as_str()) {
            return Err(StoreError::invalid(
                "verdict",
                format!("{:?} is not one of {:?}", r.verdict, ScanResult::VERDICTS),
            ));
        }
        self.fenced_execute(FencedWrite::PutScanResult, fence, run_id, || {
            let q = self.timed(Stmt::scan_result_upsert).bind(Id(run_id));
            let q = q.bind(&r.model).bind(&r.verdict).bind(r.suspect_label);
            let q = q.bind(r.anomaly_index).bind(r.clean_acc).bind(r.repaired);
            let q = q.bind(r.acc_before).bind(r.asr_before).bind(r.acc_after);
            vec![q.bind(r.asr_after).bind(r.pruned_channels).bind(r.met)]
        })
        .await?;
        self.changed(run_id, ChangeKind::Event).await;
        Ok(())
    }

    async fn get_scan_result(&self, run_id: Uuid) -> Result<ScanResult> {
        let q = self.q(Stmt::scan_result_get).bind(Id(run_id));
        self.one::<ScanResult, _>(q, || StoreError::not_found("scan result", run_id))
            .await
    }
}

// ---- Artifact records ----

#[async_trait]
impl<DB: Backend> ArtifactRepo for SqlStore<DB> {
    async fn record_artifact(&self, fence: Option<&Fence>, rec: ArtifactRecord) -> Result<()> {
        validate_sha256(&rec.sha256)?;
        let run_id = rec.run_id;
        self.fenced_execute(FencedWrite::RecordArtifact, fence, run_id, || {
            let q = self.timed(Stmt::artifact_upsert).bind(Id(rec.run_id));
            let q = q.bind(&rec.name).bind(&rec.uri);
            let q = q
                .bind(rec.sha256.to_ascii_lowercase())
                .bind(rec.size as i64);
            vec![q.bind(&rec.content_type)]
        })
        .await
    }

    async fn get_artifact(&self, run_id: Uuid, name: &str) -> Result<ArtifactRecord> {
        let q = self.q(Stmt::artifact_get).bind(Id(run_id)).bind(name);
        self.one::<ArtifactRow, _>(q, || {
            StoreError::not_found("artifact", format!("{run_id}/{name}"))
        })
        .await
    }

    async fn list_artifacts(&self, run_id: Uuid) -> Result<Vec<ArtifactRecord>> {
        self.all::<ArtifactRow, _>(self.q(Stmt::artifact_list).bind(Id(run_id)))
            .await
    }

    async fn delete_artifact(
        &self,
        fence: Option<&Fence>,
        run_id: Uuid,
        name: &str,
    ) -> Result<Option<ArtifactRecord>> {
        let row: Option<ArtifactRow> = self
            .fenced(
                FencedWrite::DeleteArtifact,
                fence,
                run_id,
                |mut tx| async move {
                    let row = self
                        .q(Stmt::artifact_delete)
                        .bind(Id(run_id))
                        .bind(name)
                        .fetch_optional(&mut tx)
                        .await?;
                    Ok((tx, row))
                },
            )
            .await?;
        let rec = row.map(ArtifactRecord::from);
        if let Some(r) = &rec {
            tracing::info!(%run_id, name, uri = %r.uri, "deleted artifact record");
        }
        Ok(rec)
    }
}

// ---- Events ----

#[async_trait]
impl<DB: Backend> EventRepo for SqlStore<DB> {
    async fn append_event(
        &self,
        fence: Option<&Fence>,
        run_id: Uuid,
        stage: &str,
        kind: &str,
        message: &str,
        progress: Option<f64>,
    ) -> Result<i64> {
        let seq = self
            .fenced(
                FencedWrite::AppendEvent,
                fence,
                run_id,
                |mut tx| async move {
                    let (seq,): (i64,) = self
                        .timed(Stmt::event_insert)
                        .bind(Id(run_id))
                        .bind(stage)
                        .bind(kind)
                        .bind(message)
                        .bind(progress)
                        .fetch_one(&mut tx)
                        .await
                        .map_err(|e| map_db(e, Some(run_id)))?;
                    Ok((tx, seq))
                },
            )
            .await?;
        self.changed(run_id, ChangeKind::Event).await;
        Ok(seq)
    }

    async fn list_events(&self, run_id: Uuid, after_seq: i64) -> Result<Vec<RunEvent>> {
        let q = self.q(Stmt::event_list).bind(Id(run_id)).bind(after_seq);
        self.all::<EventRow, _>(q).await
    }

    fn changes(&self) -> tokio::sync::broadcast::Receiver<Change> {
        DB::listen(&self.pool, &self.changes);
        self.changes.subscribe()
    }
}

// ---- Teams and API keys ----

#[async_trait]
impl<DB: Backend> AccessRepo for SqlStore<DB> {
    async fn create_team(&self, name: &str) -> Result<Team> {
        validate_team_name(name)?;
        let team: Option<Team> = self
            .timed(Stmt::team_insert)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        let team =
            team.ok_or_else(|| StoreError::Conflict(format!("team {name:?} already exists")))?;
        tracing::info!(team = name, "created team");
        Ok(team)
    }

    async fn list_teams(&self) -> Result<Vec<Team>> {
        self.all::<Team, _>(self.q(Stmt::team_list)).await
    }

    async fn create_api_key(
        &self,
        team: &str,
        name: &str,
        scopes: &[Scope],
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<(ApiKey, String)> {
        if name.is_empty() || name.chars().count() > 128 {
            return Err(StoreError::invalid(
                "api_key.name",
                "must be 1 to 128 characters",
            ));
        }
        if scopes.is_empty() {
            return Err(StoreError::invalid(
                "api_key.scopes",
                "a key needs at least one scope",
            ));
        }
        let key = new_api_key()?;
        let row: ApiKeyRow = self
            .timed(Stmt::api_key_insert)
            .bind(Id(Uuid::new_v4()))
            .bind(team)
            .bind(name)
            .bind(sha256_hex(key.as_bytes()))
            .bind(&key[..API_KEY_SHOWN])
            .bind(scopes_text(scopes))
            .bind(expires_at.map(At))
            .fetch_one(&self.pool)
            .await
            .map_err(|e| map_db_missing(e, "team", team))?;
        let k = ApiKey::from(row);
        tracing::info!(
            key_id = %k.id, team, name, prefix = %k.prefix, "created api key"
        );
        Ok((k, key))
    }

    async fn list_api_keys(&self, team: Option<&str>) -> Result<Vec<ApiKey>> {
        self.all::<ApiKeyRow, _>(self.q(Stmt::api_key_list).bind(team))
            .await
    }

    async fn revoke_api_key(&self, id: Uuid) -> Result<ApiKey> {
        let q = self.timed(Stmt::api_key_revoke).bind(Id(id));
        let k: ApiKey = self
            .one::<ApiKeyRow, _>(q, || StoreError::not_found("api key", id))
            .await?;
        tracing::info!(key_id = %id, team = %k.team, "revoked api key");
        Ok(k)
    }

    async fn set_api_key_expiry(
        &self,
        id: Uuid,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<ApiKey> {
        let q = self.q(Stmt::api_key_set_expiry).bind(expires_at.map(At));
        let k: ApiKey = self
            .one::<ApiKeyRow, _>(q.bind(Id(id)), || StoreError::not_found("api key", id))
            .await?;
        tracing::info!(key_id = %id, team = %k.team, expires_at = ?k.expires_at, "set api key expiry");
        Ok(k)
    }

    async fn authenticate(&self, key: &str) -> Result<Option<Principal>> {
        if key.is_empty() || key.len() > MAX_API_KEY_LEN {
            return Ok(None);
        }
        let hash = sha256_hex(key.as_bytes());
        let row: Option<ApiKeyRow> = self
            .timed(Stmt::api_key_by_hash)
            .bind(&hash)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        if !constant_time_eq(row.key_hash.as_bytes(), hash.as_bytes()) {
            return Ok(None);
        }
        let k = ApiKey::from(row);
        let stale = k
            .last_used_at
            .is_none_or(|t| Utc::now().signed_duration_since(t) >= LAST_USED_PRECISION);
        if stale {
            self.timed(Stmt::api_key_touch)
                .bind(Id(k.id))
                .execute(&self.pool)
                .await?;
        }
        Ok(Some(Principal {
            team: k.team,
            key_id: k.id,
            key_name: k.name,
            scopes: k.scopes,
        }))
    }
}
