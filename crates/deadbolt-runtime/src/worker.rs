//! The stage-job worker: lease a job of this service's stages, run its
//! handler on a blocking thread (tensor work never runs on the async
//! runtime) while a heartbeat task renews the lease and reports progress,
//! then complete or fail the job. A lost lease (another worker took the job
//! over) cancels the handler and drops its result.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use deadbolt_store::{
    ArtifactRef, ArtifactStore, Job, JobStatus, MetadataStore, RunStatus, StoreError,
};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tonic::Code;
use uuid::Uuid;

/// Why a job attempt failed: a gRPC code (what the stage RPC returns), a
/// message, and whether another attempt could succeed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct JobError {
    pub code: Code,
    pub message: String,
    pub retryable: bool,
}

impl JobError {
    pub fn new(code: Code, message: impl Into<String>, retryable: bool) -> Self {
        JobError {
            code,
            message: message.into(),
            retryable,
        }
    }
    /// A failure another attempt may not hit (I/O, a crashed dependency).
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message, true)
    }
    /// A failure every attempt would hit.
    pub fn permanent(code: Code, message: impl Into<String>) -> Self {
        Self::new(code, message, false)
    }
    pub fn cancelled() -> Self {
        Self::new(Code::Cancelled, "cancelled", false)
    }

    /// How the error is stored in the job row: `[code] message`.
    pub fn to_job_text(&self) -> String {
        format!("[{}] {}", code_name(self.code), self.message)
    }

    /// The status a stage RPC returns for a job that failed with `text`.
    pub fn status_from_job_text(text: &str) -> tonic::Status {
        let (code, msg) = text
            .strip_prefix('[')
            .and_then(|r| r.split_once("] "))
            .map(|(c, m)| (code_from_name(c), m))
            .unwrap_or((Code::Internal, text));
        tonic::Status::new(code, msg.to_string())
    }
}

const CODES: [(Code, &str); 10] = [
    (Code::InvalidArgument, "invalid_argument"),
    (Code::NotFound, "not_found"),
    (Code::DataLoss, "data_loss"),
    (Code::FailedPrecondition, "failed_precondition"),
    (Code::Cancelled, "cancelled"),
    (Code::Aborted, "aborted"),
    (Code::Unavailable, "unavailable"),
    (Code::AlreadyExists, "already_exists"),
    (Code::ResourceExhausted, "resource_exhausted"),
    (Code::Internal, "internal"),
];

fn code_name(c: Code) -> &'static str {
    CODES
        .iter()
        .find(|(k, _)| *k == c)
        .map(|(_, n)| *n)
        .unwrap_or("internal")
}

fn code_from_name(n: &str) -> Code {
    CODES
        .iter()
        .find(|(_, k)| *k == n)
        .map(|(c, _)| *c)
        .unwrap_or(Code::Internal)
}

impl From<StoreError> for JobError {
    fn from(e: StoreError) -> Self {
        let status = tonic::Status::from(e);
        let retryable = matches!(
            status.code(),
            Code::Unavailable | Code::Internal | Code::Aborted
        );
        JobError::new(status.code(), status.message(), retryable)
    }
}

/// The work of one stage. Runs on a blocking thread; use
/// [`JobContext::block_on`] for store calls.
pub trait StageHandler: Send + Sync + 'static {
    fn run(&self, ctx: &JobContext) -> Result<Value, JobError>;
}

/// What a handler sees of its job.
pub struct JobContext {
    pub job: Job,
    pub store: Arc<dyn MetadataStore>,
    pub artifacts: ArtifactStore,
    /// A fresh folder for this attempt (removed afterwards).
    pub work_dir: PathBuf,
    handle: tokio::runtime::Handle,
    progress: Arc<Mutex<Option<(f64, String)>>>,
    cancelled: Arc<AtomicBool>,
}

impl JobContext {
    pub fn run_id(&self) -> Uuid {
        self.job.run_id
    }

    /// Runs a future to completion from the handler's blocking thread.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.handle.block_on(f)
    }

    /// Progress of the job (sent with the next heartbeat).
    pub fn set_progress(&self, fraction: f64, message: &str) {
        if let Ok(mut p) = self.progress.lock() {
            *p = Some((fraction.clamp(0.0, 1.0), message.to_string()));
        }
    }

    /// True once the run was cancelled or the lease was lost.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// The run's spec (its `spec_json`).
    pub fn spec<T: DeserializeOwned>(&self) -> Result<T, JobError> {
        let run = self.block_on(self.store.get_run(self.run_id()))?;
        serde_json::from_value(run.spec_json)
            .map_err(|e| JobError::permanent(Code::FailedPrecondition, format!("run spec: {e}")))
    }

    /// The result of this run's succeeded job of `stage`.
    pub fn stage_result<T: DeserializeOwned>(&self, stage: &str) -> Result<T, JobError> {
        let jobs = self.block_on(self.store.list_jobs(self.run_id()))?;
        let job = jobs
            .into_iter()
            .find(|j| j.stage == stage && j.status == JobStatus::Succeeded)
            .ok_or_else(|| {
                JobError::permanent(
                    Code::FailedPrecondition,
                    format!("stage {stage} has not succeeded for run {}", self.run_id()),
                )
            })?;
        serde_json::from_value(job.result.unwrap_or(Value::Null)).map_err(|e| {
            JobError::permanent(Code::Internal, format!("result of stage {stage}: {e}"))
        })
    }

    /// Stores `bytes` as artifact `name` of the run and records it (upsert).
    pub fn put_artifact(
        &self,
        name: &str,
        bytes: Bytes,
        content_type: &str,
    ) -> Result<ArtifactRef, JobError> {
        self.block_on(async {
            let r = self.artifacts.put(self.run_id(), name, bytes).await?;
            self.store
                .record_artifact(r.to_record(self.run_id(), name, Some(content_type.into())))
                .await?;
            Ok::<_, StoreError>(r)
        })
        .map_err(JobError::from)
    }

    /// Uploads a file as artifact `name`.
    pub fn put_file(
        &self,
        name: &str,
        path: &Path,
        content_type: &str,
    ) -> Result<ArtifactRef, JobError> {
        let bytes = std::fs::read(path)
            .map_err(|e| JobError::transient(format!("reading {}: {e}", path.display())))?;
        self.put_artifact(name, Bytes::from(bytes), content_type)
    }

    /// Downloads an artifact (sha256-verified) into `path`.
    pub fn download(&self, r: &ArtifactRef, path: &Path) -> Result<(), JobError> {
        let bytes = self.block_on(self.artifacts.get(r))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| JobError::transient(format!("{}: {e}", dir.display())))?;
        }
        std::fs::write(path, &bytes)
            .map_err(|e| JobError::transient(format!("writing {}: {e}", path.display())))
    }

    /// The recorded artifact `name` of this run, as a reference.
    pub fn artifact(&self, name: &str) -> Result<ArtifactRef, JobError> {
        let rec = self.block_on(self.store.get_artifact(self.run_id(), name))?;
        Ok(self.artifacts.ref_from_record(&rec)?)
    }
}

/// Runs the jobs of some stages for one service.
pub struct Worker {
    pub service: &'static str,
    pub worker_id: String,
    pub stages: Vec<String>,
    pub handler: Arc<dyn StageHandler>,
    pub store: Arc<dyn MetadataStore>,
    pub artifacts: ArtifactStore,
    pub lease: Duration,
    pub heartbeat: Duration,
    pub poll: Duration,
    pub work_root: PathBuf,
}

/// `<service>-<pid>-<random>`: the pid lets operators (and tests) find the
/// process holding a lease.
pub fn worker_id(service: &str) -> String {
    format!(
        "{service}-{}-{}",
        std::process::id(),
        &Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Retry delay after the `attempts`-th failed attempt.
pub fn backoff(attempts: i32) -> Duration {
    Duration::from_millis((250u64 << attempts.clamp(0, 7) as u64).min(30_000))
}

impl Worker {
    /// Leases and runs jobs until the task is dropped.
    pub async fn run(self) {
        tracing::info!(service = self.service, worker_id = %self.worker_id, stages = ?self.stages, "worker started");
        loop {
            match self
                .store
                .lease_job(&self.worker_id, &self.stages, self.lease)
                .await
            {
                Ok(Some(job)) => self.run_job(job).await,
                Ok(None) => tokio::time::sleep(self.poll).await,
                Err(e) => {
                    tracing::warn!(service = self.service, error = %e, "lease failed");
                    tokio::time::sleep(self.poll * 5).await;
                }
            }
        }
    }

    async fn run_job(&self, job: Job) {
        let Some(token) = job.lease_token else {
            tracing::error!(job_id = %job.id, "leased job without a lease token");
            return;
        };
        let (job_id, run_id, stage, attempt) =
            (job.id, job.run_id, job.stage.clone(), job.attempts);
        tracing::info!(service = self.service, job_id = %job_id, run_id = %run_id, stage = %stage, attempt, "job leased");
        let _ = self
            .store
            .append_event(
                run_id,
                &stage,
                "leased",
                &format!("attempt {attempt} on {}", self.worker_id),
                None,
            )
            .await;
        let work_dir = match tempfile::Builder::new()
            .prefix(&format!("{stage}-"))
            .tempdir_in(&self.work_root)
        {
            Ok(d) => d,
            Err(e) => {
                let err = JobError::transient(format!(
                    "work dir under {}: {e}",
                    self.work_root.display()
                ));
                self.finish(job_id, token, &stage, Err(err), attempt).await;
                return;
            }
        };
        let progress = Arc::new(Mutex::new(None));
        let cancelled = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        let ctx = JobContext {
            job,
            store: self.store.clone(),
            artifacts: self.artifacts.clone(),
            work_dir: work_dir.path().to_path_buf(),
            handle: tokio::runtime::Handle::current(),
            progress: progress.clone(),
            cancelled: cancelled.clone(),
        };
        let heartbeat = tokio::spawn(heartbeat_loop(
            self.store.clone(),
            job_id,
            run_id,
            token,
            stage.clone(),
            self.lease,
            self.heartbeat,
            progress,
            cancelled,
            lost.clone(),
        ));
        let handler = self.handler.clone();
        let outcome = crate::tensor_thread::run(move || handler.run(&ctx))
            .await
            .unwrap_or_else(|e| Err(JobError::transient(format!("handler panicked: {e}"))));
        heartbeat.abort();
        drop(work_dir);
        if lost.load(Ordering::SeqCst) {
            tracing::warn!(job_id = %job_id, stage = %stage, "lease lost; result dropped");
            return;
        }
        self.finish(job_id, token, &stage, outcome, attempt).await;
    }

    async fn finish(
        &self,
        job_id: Uuid,
        token: Uuid,
        stage: &str,
        outcome: Result<Value, JobError>,
        attempt: i32,
    ) {
        let r = match outcome {
            Ok(v) => {
                tracing::info!(job_id = %job_id, stage, "job succeeded");
                self.store.complete_job(job_id, token, v).await
            }
            Err(e) if e.retryable => {
                tracing::warn!(job_id = %job_id, stage, error = %e, attempt, "job attempt failed");
                self.store
                    .fail_job(job_id, token, &e.to_job_text(), backoff(attempt))
                    .await
            }
            Err(e) => {
                tracing::error!(job_id = %job_id, stage, error = %e, "job failed");
                self.store.abort_job(job_id, token, &e.to_job_text()).await
            }
        };
        if let Err(e) = r {
            tracing::warn!(job_id = %job_id, stage, error = %e, "could not record the job outcome");
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn heartbeat_loop(
    store: Arc<dyn MetadataStore>,
    job_id: Uuid,
    run_id: Uuid,
    token: Uuid,
    stage: String,
    lease: Duration,
    every: Duration,
    progress: Arc<Mutex<Option<(f64, String)>>>,
    cancelled: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
) {
    let mut last: Option<(f64, String)> = None;
    loop {
        tokio::time::sleep(every).await;
        let p = progress.lock().ok().and_then(|p| p.clone());
        match store.heartbeat(job_id, token, lease, p.clone()).await {
            Ok(_) => {}
            Err(StoreError::LeaseLost { .. }) => {
                tracing::warn!(job_id = %job_id, stage = %stage, "lease lost");
                lost.store(true, Ordering::SeqCst);
                cancelled.store(true, Ordering::SeqCst);
                return;
            }
            Err(e) => tracing::warn!(job_id = %job_id, error = %e, "heartbeat failed"),
        }
        if let Some((f, m)) = &p {
            let changed = last
                .as_ref()
                .is_none_or(|(lf, lm)| lm != m || (f - lf).abs() >= 0.05);
            if changed {
                let _ = store
                    .append_event(run_id, &stage, "progress", m, Some(*f))
                    .await;
                last = p.clone();
            }
        }
        if let Ok(run) = store.get_run(run_id).await {
            if run.status == RunStatus::Cancelled {
                cancelled.store(true, Ordering::SeqCst);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_error_text_round_trips_to_a_status() {
        let e = JobError::permanent(Code::DataLoss, "checksum mismatch for x");
        let s = JobError::status_from_job_text(&e.to_job_text());
        assert_eq!(s.code(), Code::DataLoss);
        assert_eq!(s.message(), "checksum mismatch for x");
        assert_eq!(
            JobError::status_from_job_text("plain").code(),
            Code::Internal
        );
        assert!(backoff(1) < backoff(3));
        assert!(backoff(100) <= Duration::from_secs(30));
    }
}
