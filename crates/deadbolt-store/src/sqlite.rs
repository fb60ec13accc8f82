//! The embedded metadata store: one SQLite file in WAL mode.
//!
//! Ids are stored as hyphenated UUID text and times as fixed-width RFC 3339
//! UTC text (`YYYY-MM-DDTHH:MM:SS.ffffffZ`), so times compare correctly as
//! text. Leasing is a single `UPDATE ... WHERE id = (SELECT ... LIMIT 1)
//! RETURNING *`: SQLite takes the write lock when such a statement starts, so
//! two leasers can never pick the same job. Multi-statement writes use
//! `BEGIN IMMEDIATE`.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::types::Json;
use sqlx::Row;
use uuid::Uuid;

use crate::error::{map_db, Result, StoreError};
use crate::metadata::MetadataStore;
use crate::model::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");

/// Metadata in a SQLite file (the embedded default).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

fn ts(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

fn now() -> String {
    ts(Utc::now())
}

fn later(d: Duration) -> String {
    ts(Utc::now() + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX))
}

fn parse_ts(s: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Database(sqlx::Error::Decode(Box::new(e))))
}

fn parse_uuid(s: &str) -> Result<Uuid> {
    Uuid::parse_str(s).map_err(|e| StoreError::Database(sqlx::Error::Decode(Box::new(e))))
}

fn get_ts(row: &SqliteRow, col: &str) -> Result<DateTime<Utc>> {
    parse_ts(&row.try_get::<String, _>(col)?)
}

fn get_opt_ts(row: &SqliteRow, col: &str) -> Result<Option<DateTime<Utc>>> {
    row.try_get::<Option<String>, _>(col)?
        .map(|s| parse_ts(&s))
        .transpose()
}

fn get_uuid(row: &SqliteRow, col: &str) -> Result<Uuid> {
    parse_uuid(&row.try_get::<String, _>(col)?)
}

fn run_from_row(row: &SqliteRow) -> Result<Run> {
    Ok(Run {
        id: get_uuid(row, "id")?,
        client_request_id: row.try_get("client_request_id")?,
        name: row.try_get("name")?,
        status: RunStatus::from_str(&row.try_get::<String, _>("status")?)?,
        error: row.try_get("error")?,
        spec_json: row.try_get::<Json<Value>, _>("spec_json")?.0,
        created_at: get_ts(row, "created_at")?,
        updated_at: get_ts(row, "updated_at")?,
    })
}

fn job_from_row(row: &SqliteRow) -> Result<Job> {
    Ok(Job {
        id: get_uuid(row, "id")?,
        run_id: get_uuid(row, "run_id")?,
        stage: row.try_get("stage")?,
        status: JobStatus::from_str(&row.try_get::<String, _>("status")?)?,
        payload: row.try_get::<Json<Value>, _>("payload")?.0,
        result: row
            .try_get::<Option<Json<Value>>, _>("result")?
            .map(|j| j.0),
        error: row.try_get("error")?,
        attempts: row.try_get("attempts")?,
        max_attempts: row.try_get("max_attempts")?,
        lease_token: row
            .try_get::<Option<String>, _>("lease_token")?
            .map(|s| parse_uuid(&s))
            .transpose()?,
        leased_by: row.try_get("leased_by")?,
        lease_expires_at: get_opt_ts(row, "lease_expires_at")?,
        run_after: get_ts(row, "run_after")?,
        progress: row.try_get("progress")?,
        progress_message: row.try_get("progress_message")?,
        created_at: get_ts(row, "created_at")?,
        updated_at: get_ts(row, "updated_at")?,
    })
}

fn point_from_row(row: &SqliteRow) -> Result<CurvePoint> {
    Ok(CurvePoint {
        k: row.try_get("k")?,
        acc: row.try_get("acc")?,
        asr: row.try_get("asr")?,
        ra: row.try_get("ra")?,
    })
}

fn artifact_from_row(row: &SqliteRow) -> Result<ArtifactRecord> {
    Ok(ArtifactRecord {
        run_id: get_uuid(row, "run_id")?,
        name: row.try_get("name")?,
        uri: row.try_get("uri")?,
        sha256: row.try_get("sha256")?,
        size: row.try_get::<i64, _>("size")? as u64,
        content_type: row.try_get("content_type")?,
    })
}

impl SqliteStore {
    /// Opens (creating when missing) the SQLite file at `path` and migrates it.
    pub async fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Database(sqlx::Error::Io(std::io::Error::new(
                    e.kind(),
                    format!("creating {}: {e}", dir.display()),
                )))
            })?;
        }
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        MIGRATOR.run(&pool).await?;
        tracing::info!(path = %path.display(), "sqlite metadata store ready");
        Ok(Self { pool })
    }

    /// A private in-memory database (one connection, gone when dropped), for
    /// tests of code that needs a metadata store.
    pub async fn in_memory() -> Result<Self> {
        let opts = SqliteConnectOptions::new()
            .in_memory(true)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .min_connections(1)
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(opts)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(Self { pool })
    }

    /// The underlying pool (for ad-hoc dashboard queries and tests).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// A write transaction that takes the write lock up front (BEGIN
    /// IMMEDIATE), so it waits on busy_timeout instead of failing with
    /// SQLITE_BUSY when it upgrades from a read.
    async fn write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    async fn fetch_job(&self, id: Uuid) -> Result<Option<Job>> {
        sqlx::query("SELECT * FROM stage_jobs WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .map(|r| job_from_row(&r))
            .transpose()
    }

    /// After a guarded update matched nothing: NotFound or LeaseLost.
    async fn lease_lost(&self, job_id: Uuid) -> StoreError {
        match self.fetch_job(job_id).await {
            Ok(Some(_)) => StoreError::LeaseLost { job_id },
            Ok(None) => StoreError::not_found("job", job_id),
            Err(e) => e,
        }
    }
}

#[async_trait]
impl MetadataStore for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn create_run(&self, new: NewRun) -> Result<(Run, bool)> {
        let now = now();
        let inserted = sqlx::query(
            "INSERT INTO runs (id, client_request_id, name, status, spec_json, created_at, updated_at) \
             VALUES (?, ?, ?, 'queued', ?, ?, ?) \
             ON CONFLICT (client_request_id) DO NOTHING RETURNING *",
        )
        .bind(Uuid::new_v4().to_string())
        .bind(&new.client_request_id)
        .bind(&new.name)
        .bind(Json(&new.spec_json))
        .bind(&now)
        .bind(&now)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = inserted {
            let run = run_from_row(&row)?;
            tracing::info!(run_id = %run.id, name = %run.name, "created run");
            return Ok((run, true));
        }
        let key = new.client_request_id.clone().unwrap_or_default();
        let row = sqlx::query("SELECT * FROM runs WHERE client_request_id = ?")
            .bind(&key)
            .fetch_one(&self.pool)
            .await?;
        let run = run_from_row(&row)?;
        crate::check_same_request(&run, &new)?;
        Ok((run, false))
    }

    async fn get_run(&self, id: Uuid) -> Result<Run> {
        let row = sqlx::query("SELECT * FROM runs WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found("run", id))?;
        run_from_row(&row)
    }

    async fn list_runs(&self, limit: i64, offset: i64) -> Result<Vec<Run>> {
        sqlx::query("SELECT * FROM runs ORDER BY created_at DESC, id LIMIT ? OFFSET ?")
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
            "UPDATE runs SET status = ?, error = ?, updated_at = ? WHERE id = ? RETURNING *",
        )
        .bind(status.as_str())
        .bind(&error)
        .bind(now())
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::not_found("run", id))?;
        tracing::info!(run_id = %id, status = %status, "run status set");
        run_from_row(&row)
    }

    async fn cancel_run(&self, id: Uuid) -> Result<Run> {
        let now = now();
        let mut tx = self.write_tx().await?;
        let exists = sqlx::query("SELECT 1 FROM runs WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(StoreError::not_found("run", id));
        }
        sqlx::query(
            "UPDATE runs SET status = 'cancelled', updated_at = ? \
             WHERE id = ? AND status IN ('queued', 'running')",
        )
        .bind(&now)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        let jobs = sqlx::query(
            "UPDATE stage_jobs SET status = 'cancelled', updated_at = ? \
             WHERE run_id = ? AND status IN ('queued', 'leased')",
        )
        .bind(&now)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(run_id = %id, jobs = jobs.rows_affected(), "run cancelled");
        self.get_run(id).await
    }

    async fn enqueue_job(&self, job: NewJob) -> Result<(Job, bool)> {
        validate_job(&job)?;
        let now = now();
        let inserted = sqlx::query(
            "INSERT INTO stage_jobs (id, run_id, stage, status, payload, attempts, max_attempts, \
             run_after, created_at, updated_at) \
             VALUES (?, ?, ?, 'queued', ?, 0, ?, ?, ?, ?) \
             ON CONFLICT (run_id, stage) DO NOTHING RETURNING *",
        )
        .bind(Uuid::new_v4().to_string())
        .bind(job.run_id.to_string())
        .bind(&job.stage)
        .bind(Json(&job.payload))
        .bind(job.max_attempts)
        .bind(&now)
        .bind(&now)
        .bind(&now)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| map_db(e, Some(job.run_id)))?;
        if let Some(row) = inserted {
            let j = job_from_row(&row)?;
            tracing::debug!(job_id = %j.id, run_id = %j.run_id, stage = %j.stage, "enqueued job");
            return Ok((j, true));
        }
        let row = sqlx::query("SELECT * FROM stage_jobs WHERE run_id = ? AND stage = ?")
            .bind(job.run_id.to_string())
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
        let stages_json = serde_json::to_string(stages).expect("strings serialize");
        let now = now();
        let expired = sqlx::query(
            "UPDATE stage_jobs SET status = 'failed', updated_at = ?, \
             error = COALESCE(error || '; ', '') || 'lease expired with no attempts left' \
             WHERE status = 'leased' AND lease_expires_at < ? AND attempts >= max_attempts \
             AND stage IN (SELECT value FROM json_each(?))",
        )
        .bind(&now)
        .bind(&now)
        .bind(&stages_json)
        .execute(&self.pool)
        .await?;
        if expired.rows_affected() > 0 {
            tracing::warn!(
                jobs = expired.rows_affected(),
                "failed jobs whose lease expired with no attempts left"
            );
        }
        let token = Uuid::new_v4();
        let row = sqlx::query(
            "UPDATE stage_jobs SET status = 'leased', attempts = attempts + 1, lease_token = ?, \
             leased_by = ?, lease_expires_at = ?, updated_at = ? \
             WHERE id = ( \
               SELECT id FROM stage_jobs \
               WHERE stage IN (SELECT value FROM json_each(?)) \
                 AND ((status = 'queued' AND run_after <= ?) \
                   OR (status = 'leased' AND lease_expires_at < ? AND attempts < max_attempts)) \
               ORDER BY created_at, id LIMIT 1) \
             RETURNING *",
        )
        .bind(token.to_string())
        .bind(worker_id)
        .bind(later(lease))
        .bind(&now)
        .bind(&stages_json)
        .bind(&now)
        .bind(&now)
        .fetch_optional(&self.pool)
        .await?;
        let job = row.map(|r| job_from_row(&r)).transpose()?;
        if let Some(j) = &job {
            tracing::info!(job_id = %j.id, stage = %j.stage, attempt = j.attempts, worker = worker_id, "leased job");
        }
        Ok(job)
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
            "UPDATE stage_jobs SET lease_expires_at = ?, updated_at = ?, \
             progress = COALESCE(?, progress), progress_message = COALESCE(?, progress_message) \
             WHERE id = ? AND lease_token = ? AND status = 'leased' RETURNING *",
        )
        .bind(later(lease))
        .bind(now())
        .bind(p)
        .bind(msg)
        .bind(job_id.to_string())
        .bind(lease_token.to_string())
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => job_from_row(&r),
            None => Err(self.lease_lost(job_id).await),
        }
    }

    async fn complete_job(&self, job_id: Uuid, lease_token: Uuid, result: Value) -> Result<Job> {
        let row = sqlx::query(
            "UPDATE stage_jobs SET status = 'succeeded', result = ?, error = NULL, progress = 1.0, \
             lease_expires_at = NULL, updated_at = ? \
             WHERE id = ? AND lease_token = ? AND status = 'leased' RETURNING *",
        )
        .bind(Json(&result))
        .bind(now())
        .bind(job_id.to_string())
        .bind(lease_token.to_string())
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
             error = ?, run_after = ?, lease_token = NULL, lease_expires_at = NULL, updated_at = ? \
             WHERE id = ? AND lease_token = ? AND status = 'leased' RETURNING *",
        )
        .bind(error)
        .bind(later(backoff))
        .bind(now())
        .bind(job_id.to_string())
        .bind(lease_token.to_string())
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
            "UPDATE stage_jobs SET status = 'failed', error = ?, lease_token = NULL, \
             lease_expires_at = NULL, updated_at = ? \
             WHERE id = ? AND lease_token = ? AND status = 'leased' RETURNING *",
        )
        .bind(error)
        .bind(now())
        .bind(job_id.to_string())
        .bind(lease_token.to_string())
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
        sqlx::query("SELECT * FROM stage_jobs WHERE run_id = ? ORDER BY created_at, id")
            .bind(run_id.to_string())
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
            "INSERT INTO metrics (run_id, stage, name, step, value, recorded_at) \
             VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (run_id, stage, name, step) \
             DO UPDATE SET value = excluded.value, recorded_at = excluded.recorded_at",
        )
        .bind(run_id.to_string())
        .bind(stage)
        .bind(name)
        .bind(step)
        .bind(value)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(|e| map_db(e, Some(run_id)))?;
        Ok(())
    }

    async fn list_metrics(&self, run_id: Uuid) -> Result<Vec<Metric>> {
        sqlx::query("SELECT * FROM metrics WHERE run_id = ? ORDER BY stage, name, step")
            .bind(run_id.to_string())
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
        let mut tx = self.write_tx().await?;
        for r in rows {
            sqlx::query(
                "INSERT INTO neuron_stats (run_id, layer, model, input, norm, channel, value) \
                 VALUES (?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (run_id, layer, model, input, norm, channel) \
                 DO UPDATE SET value = excluded.value",
            )
            .bind(run_id.to_string())
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
             WHERE run_id = ? ORDER BY layer, model, input, norm, channel",
        )
        .bind(run_id.to_string())
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
        let mut tx = self.write_tx().await?;
        for p in points {
            sqlx::query(
                "INSERT INTO pruning_curves (run_id, criterion, k, acc, asr, ra) \
                 VALUES (?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (run_id, criterion, k) \
                 DO UPDATE SET acc = excluded.acc, asr = excluded.asr, ra = excluded.ra",
            )
            .bind(run_id.to_string())
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
             VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (run_id, criterion) \
             DO UPDATE SET k = excluded.k, acc = excluded.acc, asr = excluded.asr, ra = excluded.ra",
        )
        .bind(run_id.to_string())
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
             WHERE run_id = ? ORDER BY criterion, k",
        )
        .bind(run_id.to_string())
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
        sqlx::query("SELECT * FROM pruning_choices WHERE run_id = ? ORDER BY criterion")
            .bind(run_id.to_string())
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
            "INSERT INTO artifacts (run_id, name, uri, sha256, size, content_type, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (run_id, name) DO UPDATE SET uri = excluded.uri, \
             sha256 = excluded.sha256, size = excluded.size, content_type = excluded.content_type",
        )
        .bind(rec.run_id.to_string())
        .bind(&rec.name)
        .bind(&rec.uri)
        .bind(rec.sha256.to_ascii_lowercase())
        .bind(rec.size as i64)
        .bind(&rec.content_type)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(|e| map_db(e, Some(rec.run_id)))?;
        Ok(())
    }

    async fn get_artifact(&self, run_id: Uuid, name: &str) -> Result<ArtifactRecord> {
        let row = sqlx::query("SELECT * FROM artifacts WHERE run_id = ? AND name = ?")
            .bind(run_id.to_string())
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found("artifact", format!("{run_id}/{name}")))?;
        artifact_from_row(&row)
    }

    async fn list_artifacts(&self, run_id: Uuid) -> Result<Vec<ArtifactRecord>> {
        sqlx::query("SELECT * FROM artifacts WHERE run_id = ? ORDER BY name")
            .bind(run_id.to_string())
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
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO run_events (run_id, stage, kind, message, progress, created_at) \
             VALUES (?, ?, ?, ?, ?, ?) RETURNING seq",
        )
        .bind(run_id.to_string())
        .bind(stage)
        .bind(kind)
        .bind(message)
        .bind(progress)
        .bind(now())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| map_db(e, Some(run_id)))?;
        Ok(seq)
    }

    async fn list_events(&self, run_id: Uuid, after_seq: i64) -> Result<Vec<RunEvent>> {
        sqlx::query("SELECT * FROM run_events WHERE run_id = ? AND seq > ? ORDER BY seq")
            .bind(run_id.to_string())
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
                    created_at: get_ts(r, "created_at")?,
                })
            })
            .collect()
    }

    async fn create_api_key(&self, name: &str) -> Result<String> {
        let key = new_api_key();
        sqlx::query("INSERT INTO api_keys (id, name, key_hash, created_at) VALUES (?, ?, ?, ?)")
            .bind(Uuid::new_v4().to_string())
            .bind(name)
            .bind(sha256_hex(key.as_bytes()))
            .bind(now())
            .execute(&self.pool)
            .await?;
        tracing::info!(name, "created api key");
        Ok(key)
    }

    async fn verify_api_key(&self, key: &str) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT name FROM api_keys WHERE key_hash = ?")
                .bind(sha256_hex(key.as_bytes()))
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn run_summary(&self, run_id: Uuid) -> Result<RunSummary> {
        let r = sqlx::query("SELECT * FROM run_summary WHERE id = ?")
            .bind(run_id.to_string())
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
            status: RunStatus::from_str(&r.try_get::<String, _>("status")?)?,
            error: r.try_get("error")?,
            created_at: get_ts(&r, "created_at")?,
            updated_at: get_ts(&r, "updated_at")?,
            clean_acc: r.try_get("clean_acc")?,
            backdoored_acc: r.try_get("backdoored_acc")?,
            backdoored_asr: r.try_get("backdoored_asr")?,
            linf,
        })
    }
}
