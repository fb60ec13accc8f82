//! The production metadata store: Postgres.
//!
//! Times come from the database clock (`now()`), so workers on machines with
//! skewed clocks agree on lease expiry. Leasing takes the oldest runnable job
//! with `SELECT ... FOR UPDATE SKIP LOCKED` inside a transaction, so
//! concurrent leasers never wait on or take the same row.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::Row;
use uuid::Uuid;

use crate::error::{map_db, Result, StoreError};
use crate::metadata::MetadataStore;
use crate::model::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

/// Key of the advisory lock that serialises event appends (so that commit
/// order equals seq order and watchers polling `seq > n` never skip one).
const EVENT_LOCK_KEY: i64 = 0x6465_6164_6576_7473; // "deadevts"

/// Metadata in Postgres.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

fn run_from_row(row: &PgRow) -> Result<Run> {
    Ok(Run {
        id: row.try_get("id")?,
        client_request_id: row.try_get("client_request_id")?,
        name: row.try_get("name")?,
        status: RunStatus::from_str(row.try_get::<&str, _>("status")?)?,
        error: row.try_get("error")?,
        spec_json: row.try_get::<Json<Value>, _>("spec_json")?.0,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn job_from_row(row: &PgRow) -> Result<Job> {
    Ok(Job {
        id: row.try_get("id")?,
        run_id: row.try_get("run_id")?,
        stage: row.try_get("stage")?,
        status: JobStatus::from_str(row.try_get::<&str, _>("status")?)?,
        payload: row.try_get::<Json<Value>, _>("payload")?.0,
        result: row
            .try_get::<Option<Json<Value>>, _>("result")?
            .map(|j| j.0),
        error: row.try_get("error")?,
        attempts: row.try_get("attempts")?,
        max_attempts: row.try_get("max_attempts")?,
        lease_token: row.try_get("lease_token")?,
        leased_by: row.try_get("leased_by")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
        run_after: row.try_get("run_after")?,
        progress: row.try_get("progress")?,
        progress_message: row.try_get("progress_message")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn point_from_row(row: &PgRow) -> Result<CurvePoint> {
    Ok(CurvePoint {
        k: row.try_get("k")?,
        acc: row.try_get("acc")?,
        asr: row.try_get("asr")?,
        ra: row.try_get("ra")?,
    })
}

fn artifact_from_row(row: &PgRow) -> Result<ArtifactRecord> {
    Ok(ArtifactRecord {
        run_id: row.try_get("run_id")?,
        name: row.try_get("name")?,
        uri: row.try_get("uri")?,
        sha256: row.try_get("sha256")?,
        size: row.try_get::<i64, _>("size")? as u64,
        content_type: row.try_get("content_type")?,
    })
}

impl PgStore {
    /// Connects to `url` (postgres://...) and runs the migrations.
    pub async fn connect(url: &str) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(Duration::from_secs(30))
            .connect(url)
            .await?;
        Self::from_pool(pool).await
    }

    /// Wraps an existing pool and runs the migrations.
    pub async fn from_pool(pool: PgPool) -> Result<Self> {
        MIGRATOR.run(&pool).await?;
        tracing::info!("postgres metadata store ready");
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn fetch_job(&self, id: Uuid) -> Result<Option<Job>> {
        sqlx::query("SELECT * FROM stage_jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| job_from_row(&r))
            .transpose()
    }

    async fn lease_lost(&self, job_id: Uuid) -> StoreError {
        match self.fetch_job(job_id).await {
            Ok(Some(_)) => StoreError::LeaseLost { job_id },
            Ok(None) => StoreError::not_found("job", job_id),
            Err(e) => e,
        }
    }
}

#[async_trait]
impl MetadataStore for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn create_run(&self, new: NewRun) -> Result<(Run, bool)> {
        let inserted = sqlx::query(
            "INSERT INTO runs (id, client_request_id, name, status, spec_json) \
             VALUES ($1, $2, $3, 'queued', $4) \
             ON CONFLICT (client_request_id) DO NOTHING RETURNING *",
        )
        .bind(Uuid::new_v4())
        .bind(&new.client_request_id)
        .bind(&new.name)
        .bind(Json(&new.spec_json))
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = inserted {
            let run = run_from_row(&row)?;
            tracing::info!(run_id = %run.id, name = %run.name, "created run");
            return Ok((run, true));
        }
        let row = sqlx::query("SELECT * FROM runs WHERE client_request_id = $1")
            .bind(&new.client_request_id)
            .fetch_one(&self.pool)
            .await?;
        let run = run_from_row(&row)?;
        crate::check_same_request(&run, &new)?;
        Ok((run, false))
    }

    async fn get_run(&self, id: Uuid) -> Result<Run> {
        let row = sqlx::query("SELECT * FROM runs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found("run", id))?;
        run_from_row(&row)
    }

    async fn list_runs(&self, limit: i64, offset: i64) -> Result<Vec<Run>> {
        sqlx::query("SELECT * FROM runs ORDER BY created_at DESC, id LIMIT $1 OFFSET $2")
            .bind(limit.max(0))
            .bind(offset.max(0))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(run_from_row)
            .collect()
    }

    async fn set_run_status(
        &self,
        id: Uuid,
        status: RunStatus,
        error: Option<String>,
    ) -> Result<Run> {
        let row = sqlx::query(
            "UPDATE runs SET status = $1, error = $2, updated_at = now() WHERE id = $3 RETURNING *",
        )
        .bind(status.as_str())
        .bind(&error)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::not_found("run", id))?;
        tracing::info!(run_id = %id, status = %status, "run status set");
        run_from_row(&row)
    }

    async fn cancel_run(&self, id: Uuid) -> Result<Run> {
        let mut tx = self.pool.begin().await?;
        let exists = sqlx::query("SELECT 1 FROM runs WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(StoreError::not_found("run", id));
        }
        sqlx::query(
            "UPDATE runs SET status = 'cancelled', updated_at = now() \
             WHERE id = $1 AND status IN ('queued', 'running')",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let jobs = sqlx::query(
            "UPDATE stage_jobs SET status = 'cancelled', updated_at = now() \
             WHERE run_id = $1 AND status IN ('queued', 'leased')",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(run_id = %id, jobs = jobs.rows_affected(), "run cancelled");
        self.get_run(id).await
    }

    async fn enqueue_job(&self, job: NewJob) -> Result<(Job, bool)> {
        validate_job(&job)?;
        let inserted = sqlx::query(
            "INSERT INTO stage_jobs (id, run_id, stage, status, payload, attempts, max_attempts) \
             VALUES ($1, $2, $3, 'queued', $4, 0, $5) \
             ON CONFLICT (run_id, stage) DO NOTHING RETURNING *",
        )
        .bind(Uuid::new_v4())
        .bind(job.run_id)
        .bind(&job.stage)
        .bind(Json(&job.payload))
        .bind(job.max_attempts)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| map_db(e, Some(job.run_id)))?;
        if let Some(row) = inserted {
            let j = job_from_row(&row)?;
            tracing::debug!(job_id = %j.id, run_id = %j.run_id, stage = %j.stage, "enqueued job");
            return Ok((j, true));
        }
        let row = sqlx::query("SELECT * FROM stage_jobs WHERE run_id = $1 AND stage = $2")
            .bind(job.run_id)
            .bind(&job.stage)
            .fetch_one(&self.pool)
            .await?;
        Ok((job_from_row(&row)?, false))
    }

    async fn lease_job(
        &self,
        worker_id: &str,
        stages: &[String],
        lease: Duration,
    ) -> Result<Option<Job>> {
        let expired = sqlx::query(
            "UPDATE stage_jobs SET status = 'failed', updated_at = now(), \
             error = COALESCE(error || '; ', '') || 'lease expired with no attempts left' \
             WHERE status = 'leased' AND lease_expires_at < now() AND attempts >= max_attempts \
             AND stage = ANY($1)",
        )
        .bind(stages)
        .execute(&self.pool)
        .await?;
        if expired.rows_affected() > 0 {
            tracing::warn!(
                jobs = expired.rows_affected(),
                "failed jobs whose lease expired with no attempts left"
            );
        }
        let mut tx = self.pool.begin().await?;
        let id: Option<Uuid> = sqlx::query_scalar(
            "SELECT id FROM stage_jobs \
             WHERE stage = ANY($1) \
               AND ((status = 'queued' AND run_after <= now()) \
                 OR (status = 'leased' AND lease_expires_at < now() AND attempts < max_attempts)) \
             ORDER BY created_at, id LIMIT 1 \
             FOR UPDATE SKIP LOCKED",
        )
        .bind(stages)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(id) = id else {
            tx.commit().await?;
            return Ok(None);
        };
        let row = sqlx::query(
            "UPDATE stage_jobs SET status = 'leased', attempts = attempts + 1, lease_token = $1, \
             leased_by = $2, lease_expires_at = now() + make_interval(secs => $3), \
             updated_at = now() WHERE id = $4 RETURNING *",
        )
        .bind(Uuid::new_v4())
        .bind(worker_id)
        .bind(secs(lease))
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        let j = job_from_row(&row)?;
        tracing::info!(job_id = %j.id, stage = %j.stage, attempt = j.attempts, worker = worker_id, "leased job");
        Ok(Some(j))
    }

    async fn heartbeat(
        &self,
        job_id: Uuid,
        lease_token: Uuid,
        lease: Duration,
        progress: Option<(f64, String)>,
    ) -> Result<Job> {
        let (p, msg) = progress.unzip();
        let row = sqlx::query(
            "UPDATE stage_jobs SET lease_expires_at = now() + make_interval(secs => $1), \
             updated_at = now(), progress = COALESCE($2, progress), \
             progress_message = COALESCE($3, progress_message) \
             WHERE id = $4 AND lease_token = $5 AND status = 'leased' RETURNING *",
        )
        .bind(secs(lease))
        .bind(p)
        .bind(msg)
        .bind(job_id)
        .bind(lease_token)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => job_from_row(&r),
            None => Err(self.lease_lost(job_id).await),
        }
    }

    async fn complete_job(&self, job_id: Uuid, lease_token: Uuid, result: Value) -> Result<Job> {
        let row = sqlx::query(
            "UPDATE stage_jobs SET status = 'succeeded', result = $1, error = NULL, progress = 1.0, \
             lease_expires_at = NULL, updated_at = now() \
             WHERE id = $2 AND lease_token = $3 AND status = 'leased' RETURNING *",
        )
        .bind(Json(&result))
        .bind(job_id)
        .bind(lease_token)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => {
                tracing::info!(job_id = %job_id, "job succeeded");
                job_from_row(&r)
            }
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
        error: &str,
        backoff: Duration,
    ) -> Result<Job> {
        let row = sqlx::query(
            "UPDATE stage_jobs SET \
             status = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END, \
             error = $1, run_after = now() + make_interval(secs => $2), lease_token = NULL, \
             lease_expires_at = NULL, updated_at = now() \
             WHERE id = $3 AND lease_token = $4 AND status = 'leased' RETURNING *",
        )
        .bind(error)
        .bind(secs(backoff))
        .bind(job_id)
        .bind(lease_token)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => {
                let j = job_from_row(&r)?;
                tracing::warn!(job_id = %job_id, status = %j.status, attempt = j.attempts, error, "job attempt failed");
                Ok(j)
            }
            None => Err(self.lease_lost(job_id).await),
        }
    }

    async fn abort_job(&self, job_id: Uuid, lease_token: Uuid, error: &str) -> Result<Job> {
        let row = sqlx::query(
            "UPDATE stage_jobs SET status = 'failed', error = $1, lease_token = NULL, \
             lease_expires_at = NULL, updated_at = now() \
             WHERE id = $2 AND lease_token = $3 AND status = 'leased' RETURNING *",
        )
        .bind(error)
        .bind(job_id)
        .bind(lease_token)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => {
                let j = job_from_row(&r)?;
                tracing::warn!(job_id = %job_id, attempt = j.attempts, error, "job aborted");
                Ok(j)
            }
            None => Err(self.lease_lost(job_id).await),
        }
    }

    async fn get_job(&self, id: Uuid) -> Result<Job> {
        self.fetch_job(id)
            .await?
            .ok_or_else(|| StoreError::not_found("job", id))
    }

    async fn list_jobs(&self, run_id: Uuid) -> Result<Vec<Job>> {
        sqlx::query("SELECT * FROM stage_jobs WHERE run_id = $1 ORDER BY created_at, id")
            .bind(run_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(job_from_row)
            .collect()
    }

    async fn record_metric(
        &self,
        run_id: Uuid,
        stage: &str,
        name: &str,
        step: i64,
        value: f64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO metrics (run_id, stage, name, step, value) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (run_id, stage, name, step) \
             DO UPDATE SET value = excluded.value, recorded_at = now()",
        )
        .bind(run_id)
        .bind(stage)
        .bind(name)
        .bind(step)
        .bind(value)
        .execute(&self.pool)
        .await
        .map_err(|e| map_db(e, Some(run_id)))?;
        Ok(())
    }

    async fn list_metrics(&self, run_id: Uuid) -> Result<Vec<Metric>> {
        sqlx::query("SELECT * FROM metrics WHERE run_id = $1 ORDER BY stage, name, step")
            .bind(run_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                Ok(Metric {
                    run_id,
                    stage: r.try_get("stage")?,
                    name: r.try_get("name")?,
                    step: r.try_get("step")?,
                    value: r.try_get("value")?,
                })
            })
            .collect()
    }

    async fn put_neuron_stats(&self, run_id: Uuid, rows: &[NeuronStat]) -> Result<()> {
        for r in rows {
            r.validate()?;
        }
        let mut tx = self.pool.begin().await?;
        for r in rows {
            sqlx::query(
                "INSERT INTO neuron_stats (run_id, layer, model, input, norm, channel, value) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (run_id, layer, model, input, norm, channel) \
                 DO UPDATE SET value = excluded.value",
            )
            .bind(run_id)
            .bind(&r.layer)
            .bind(&r.model)
            .bind(&r.input)
            .bind(&r.norm)
            .bind(r.channel)
            .bind(r.value)
            .execute(&mut *tx)
            .await
            .map_err(|e| map_db(e, Some(run_id)))?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn list_neuron_stats(&self, run_id: Uuid) -> Result<Vec<NeuronStat>> {
        sqlx::query(
            "SELECT layer, model, input, norm, channel, value FROM neuron_stats_v \
             WHERE run_id = $1 ORDER BY layer, model, input, norm, channel",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(NeuronStat {
                layer: r.try_get("layer")?,
                model: r.try_get("model")?,
                input: r.try_get("input")?,
                norm: r.try_get("norm")?,
                channel: r.try_get("channel")?,
                value: r.try_get("value")?,
            })
        })
        .collect()
    }

    async fn put_pruning_curve(
        &self,
        run_id: Uuid,
        criterion: &str,
        points: &[CurvePoint],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for p in points {
            sqlx::query(
                "INSERT INTO pruning_curves (run_id, criterion, k, acc, asr, ra) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (run_id, criterion, k) \
                 DO UPDATE SET acc = excluded.acc, asr = excluded.asr, ra = excluded.ra",
            )
            .bind(run_id)
            .bind(criterion)
            .bind(p.k)
            .bind(p.acc)
            .bind(p.asr)
            .bind(p.ra)
            .execute(&mut *tx)
            .await
            .map_err(|e| map_db(e, Some(run_id)))?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn set_pruning_choice(
        &self,
        run_id: Uuid,
        criterion: &str,
        point: CurvePoint,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO pruning_choices (run_id, criterion, k, acc, asr, ra) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (run_id, criterion) \
             DO UPDATE SET k = excluded.k, acc = excluded.acc, asr = excluded.asr, ra = excluded.ra",
        )
        .bind(run_id)
        .bind(criterion)
        .bind(point.k)
        .bind(point.acc)
        .bind(point.asr)
        .bind(point.ra)
        .execute(&self.pool)
        .await
        .map_err(|e| map_db(e, Some(run_id)))?;
        Ok(())
    }

    async fn list_pruning_curves(&self, run_id: Uuid) -> Result<Vec<PruningCurve>> {
        let rows = sqlx::query(
            "SELECT criterion, k, acc, asr, ra, chosen FROM pruning_curves_v \
             WHERE run_id = $1 ORDER BY criterion, k",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for r in &rows {
            let criterion: String = r.try_get("criterion")?;
            let chosen: bool = r.try_get("chosen")?;
            crate::push_curve_point(&mut out, criterion, point_from_row(r)?, chosen);
        }
        Ok(out)
    }

    async fn list_pruning_choices(&self, run_id: Uuid) -> Result<Vec<PruningChoice>> {
        sqlx::query("SELECT * FROM pruning_choices WHERE run_id = $1 ORDER BY criterion")
            .bind(run_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                Ok(PruningChoice {
                    criterion: r.try_get("criterion")?,
                    point: point_from_row(r)?,
                })
            })
            .collect()
    }

    async fn record_artifact(&self, rec: ArtifactRecord) -> Result<()> {
        validate_sha256(&rec.sha256)?;
        sqlx::query(
            "INSERT INTO artifacts (run_id, name, uri, sha256, size, content_type) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (run_id, name) DO UPDATE SET uri = excluded.uri, \
             sha256 = excluded.sha256, size = excluded.size, content_type = excluded.content_type",
        )
        .bind(rec.run_id)
        .bind(&rec.name)
        .bind(&rec.uri)
        .bind(rec.sha256.to_ascii_lowercase())
        .bind(rec.size as i64)
        .bind(&rec.content_type)
        .execute(&self.pool)
        .await
        .map_err(|e| map_db(e, Some(rec.run_id)))?;
        Ok(())
    }

    async fn get_artifact(&self, run_id: Uuid, name: &str) -> Result<ArtifactRecord> {
        let row = sqlx::query("SELECT * FROM artifacts WHERE run_id = $1 AND name = $2")
            .bind(run_id)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found("artifact", format!("{run_id}/{name}")))?;
        artifact_from_row(&row)
    }

    async fn list_artifacts(&self, run_id: Uuid) -> Result<Vec<ArtifactRecord>> {
        sqlx::query("SELECT * FROM artifacts WHERE run_id = $1 ORDER BY name")
            .bind(run_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(artifact_from_row)
            .collect()
    }

    async fn append_event(
        &self,
        run_id: Uuid,
        stage: &str,
        kind: &str,
        message: &str,
        progress: Option<f64>,
    ) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(EVENT_LOCK_KEY)
            .execute(&mut *tx)
            .await?;
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO run_events (run_id, stage, kind, message, progress) \
             VALUES ($1, $2, $3, $4, $5) RETURNING seq",
        )
        .bind(run_id)
        .bind(stage)
        .bind(kind)
        .bind(message)
        .bind(progress)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| map_db(e, Some(run_id)))?;
        tx.commit().await?;
        Ok(seq)
    }

    async fn list_events(&self, run_id: Uuid, after_seq: i64) -> Result<Vec<RunEvent>> {
        sqlx::query("SELECT * FROM run_events WHERE run_id = $1 AND seq > $2 ORDER BY seq")
            .bind(run_id)
            .bind(after_seq)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                Ok(RunEvent {
                    seq: r.try_get("seq")?,
                    run_id,
                    stage: r.try_get("stage")?,
                    kind: r.try_get("kind")?,
                    message: r.try_get("message")?,
                    progress: r.try_get("progress")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    async fn create_api_key(&self, name: &str) -> Result<String> {
        let key = new_api_key();
        sqlx::query("INSERT INTO api_keys (id, name, key_hash) VALUES ($1, $2, $3)")
            .bind(Uuid::new_v4())
            .bind(name)
            .bind(sha256_hex(key.as_bytes()))
            .execute(&self.pool)
            .await?;
        tracing::info!(name, "created api key");
        Ok(key)
    }

    async fn verify_api_key(&self, key: &str) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT name FROM api_keys WHERE key_hash = $1")
                .bind(sha256_hex(key.as_bytes()))
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn run_summary(&self, run_id: Uuid) -> Result<RunSummary> {
        let r = sqlx::query("SELECT * FROM run_summary WHERE id = $1")
            .bind(run_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found("run", run_id))?;
        let linf = match r.try_get::<Option<i64>, _>("linf_k")? {
            Some(k) => Some(CurvePoint {
                k,
                acc: r.try_get("linf_acc")?,
                asr: r.try_get("linf_asr")?,
                ra: r.try_get("linf_ra")?,
            }),
            None => None,
        };
        Ok(RunSummary {
            id: run_id,
            name: r.try_get("name")?,
            status: RunStatus::from_str(r.try_get::<&str, _>("status")?)?,
            error: r.try_get("error")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
            clean_acc: r.try_get("clean_acc")?,
            backdoored_acc: r.try_get("backdoored_acc")?,
            backdoored_asr: r.try_get("backdoored_asr")?,
            linf,
        })
    }
}
