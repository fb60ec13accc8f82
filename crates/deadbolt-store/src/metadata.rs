//! The metadata store trait and the URL-based constructor.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use uuid::Uuid;

use crate::error::{Result, StoreError};
use crate::model::*;

/// Run metadata: runs, the stage-job queue, metrics, neuron statistics,
/// pruning curves, artifacts, progress events and API keys.
///
/// Implemented by [`crate::PgStore`] (production) and
/// [`crate::SqliteStore`] (embedded default); both pass the same test suite.
#[async_trait]
pub trait MetadataStore: Send + Sync + std::fmt::Debug {
    /// "postgres" or "sqlite".
    fn backend(&self) -> &'static str;

    /// Round-trips to the database (for health checks).
    async fn ping(&self) -> Result<()>;

    // ---- runs ----
    /// Creates a run; the same `client_request_id` returns the existing run
    /// with `created == false` (Conflict if its spec differs).
    async fn create_run(&self, new: NewRun) -> Result<(Run, bool)>;
    async fn get_run(&self, id: Uuid) -> Result<Run>;
    /// Newest first.
    async fn list_runs(&self, limit: i64, offset: i64) -> Result<Vec<Run>>;
    async fn set_run_status(
        &self,
        id: Uuid,
        status: RunStatus,
        error: Option<String>,
    ) -> Result<Run>;
    /// Marks the run cancelled (unless already finished) and its queued and
    /// leased jobs cancelled. Idempotent.
    async fn cancel_run(&self, id: Uuid) -> Result<Run>;

    // ---- stage jobs ----
    /// Idempotent per (run_id, stage): returns the existing job with
    /// `created == false`.
    async fn enqueue_job(&self, job: NewJob) -> Result<(Job, bool)>;
    /// Leases the oldest runnable job of one of `stages`: queued with
    /// `run_after <= now`, or leased with an expired lease. Increments
    /// `attempts` and sets a fresh lease token. Jobs whose lease expired with
    /// no attempts left are marked failed instead.
    async fn lease_job(
        &self,
        worker_id: &str,
        stages: &[String],
        lease: Duration,
    ) -> Result<Option<Job>>;
    /// Extends the lease; LeaseLost if the token is stale or the job is no
    /// longer leased.
    async fn heartbeat(
        &self,
        job_id: Uuid,
        lease_token: Uuid,
        lease: Duration,
        progress: Option<(f64, String)>,
    ) -> Result<Job>;
    /// Marks the job succeeded. Repeating it with the same token is a no-op.
    async fn complete_job(&self, job_id: Uuid, lease_token: Uuid, result: Value) -> Result<Job>;
    /// Requeues the job after `backoff` if attempts remain, else marks it failed.
    async fn fail_job(
        &self,
        job_id: Uuid,
        lease_token: Uuid,
        error: &str,
        backoff: Duration,
    ) -> Result<Job>;
    /// Marks the job failed now, whatever attempts remain (errors that a
    /// retry cannot fix, e.g. a corrupted input artifact).
    async fn abort_job(&self, job_id: Uuid, lease_token: Uuid, error: &str) -> Result<Job>;
    async fn get_job(&self, id: Uuid) -> Result<Job>;
    /// Oldest first.
    async fn list_jobs(&self, run_id: Uuid) -> Result<Vec<Job>>;

    // ---- metrics ----
    /// Upsert on (run_id, stage, name, step).
    async fn record_metric(
        &self,
        run_id: Uuid,
        stage: &str,
        name: &str,
        step: i64,
        value: f64,
    ) -> Result<()>;
    async fn list_metrics(&self, run_id: Uuid) -> Result<Vec<Metric>>;

    // ---- neuron statistics ----
    /// Upsert on (run_id, layer, model, input, norm, channel).
    async fn put_neuron_stats(&self, run_id: Uuid, rows: &[NeuronStat]) -> Result<()>;
    /// Read from the `neuron_stats_v` view.
    async fn list_neuron_stats(&self, run_id: Uuid) -> Result<Vec<NeuronStat>>;

    // ---- pruning ----
    /// Upsert on (run_id, criterion, k).
    async fn put_pruning_curve(
        &self,
        run_id: Uuid,
        criterion: &str,
        points: &[CurvePoint],
    ) -> Result<()>;
    /// Upsert on (run_id, criterion).
    async fn set_pruning_choice(
        &self,
        run_id: Uuid,
        criterion: &str,
        point: CurvePoint,
    ) -> Result<()>;
    /// Read from the `pruning_curves_v` view, by criterion then k.
    async fn list_pruning_curves(&self, run_id: Uuid) -> Result<Vec<PruningCurve>>;
    async fn list_pruning_choices(&self, run_id: Uuid) -> Result<Vec<PruningChoice>>;

    // ---- artifacts ----
    /// Upsert on (run_id, name).
    async fn record_artifact(&self, rec: ArtifactRecord) -> Result<()>;
    async fn get_artifact(&self, run_id: Uuid, name: &str) -> Result<ArtifactRecord>;
    async fn list_artifacts(&self, run_id: Uuid) -> Result<Vec<ArtifactRecord>>;

    // ---- events ----
    /// Returns the event's seq, monotonic across the store.
    async fn append_event(
        &self,
        run_id: Uuid,
        stage: &str,
        kind: &str,
        message: &str,
        progress: Option<f64>,
    ) -> Result<i64>;
    /// Events with seq > `after_seq`, in seq order.
    async fn list_events(&self, run_id: Uuid, after_seq: i64) -> Result<Vec<RunEvent>>;

    // ---- API keys ----
    /// Returns the plaintext key (shown once); only its sha256 is stored.
    async fn create_api_key(&self, name: &str) -> Result<String>;
    /// The key's name, or None for an unknown key.
    async fn verify_api_key(&self, key: &str) -> Result<Option<String>>;

    // ---- dashboard views ----
    /// The run's row of the `run_summary` view.
    async fn run_summary(&self, run_id: Uuid) -> Result<RunSummary>;
}

/// Opens the metadata store named by `url` and runs its migrations:
/// `postgres://...` / `postgresql://...` → [`crate::PgStore`];
/// `sqlite://path` (or `sqlite:path`) → [`crate::SqliteStore`], a file created
/// when missing, in WAL mode with foreign keys on; `sqlite::memory:` → a
/// private in-memory database.
pub async fn connect(url: &str) -> Result<Arc<dyn MetadataStore>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(crate::PgStore::connect(url).await?))
    } else if url == "sqlite::memory:" {
        Ok(Arc::new(crate::SqliteStore::in_memory().await?))
    } else if let Some(path) = url.strip_prefix("sqlite:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        let path = path.split('?').next().unwrap_or_default();
        if path.is_empty() {
            return Err(StoreError::InvalidUrl {
                url: url.into(),
                reason: "sqlite url needs a file path (sqlite://path/to/file.db)".into(),
            });
        }
        Ok(Arc::new(
            crate::SqliteStore::open(std::path::Path::new(path)).await?,
        ))
    } else {
        Err(StoreError::InvalidUrl {
            url: url.into(),
            reason: "expected postgres://... or sqlite://path".into(),
        })
    }
}
