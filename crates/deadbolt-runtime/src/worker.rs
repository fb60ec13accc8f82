//! The stage-job worker: lease a job of this service's stages, run its
//! typed [`Work`](crate::stage::Work) on the tensor thread (tensor work
//! never runs on the async runtime) while a heartbeat task renews the lease
//! and reports progress, then complete or fail the job. A lost lease
//! (another worker took the job over) cancels the work and drops its
//! result. Only transient errors are retried; a deterministic error or a
//! panic fails the job after one attempt, with its structured failure.

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

use crate::error::JobError;
use crate::stage::{decode_output, Handlers, Stage};

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

    /// The output of this run's succeeded job of stage `S`, as its type.
    pub fn output<S: Stage>(&self) -> Result<S::Output, JobError> {
        let jobs = self.block_on(self.store.list_jobs(self.run_id()))?;
        let job = jobs
            .into_iter()
            .find(|j| j.stage == S::KIND.as_str() && j.status == JobStatus::Succeeded)
            .ok_or_else(|| {
                JobError::permanent(
                    Code::FailedPrecondition,
                    format!(
                        "stage {} has not succeeded for run {}",
                        S::KIND,
                        self.run_id()
                    ),
                )
            })?;
        decode_output::<S>(&job)
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
    pub handlers: Handlers,
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
        let stages: Vec<String> = self
            .handlers
            .kinds()
            .iter()
            .map(|k| k.as_str().to_string())
            .collect();
        tracing::info!(service = self.service, worker_id = %self.worker_id, stages = ?stages, "worker started");
        loop {
            match self
                .store
                .lease_job(&self.worker_id, &stages, self.lease)
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
        let work =
            crate::stage::StageKind::parse(&stage).and_then(|k| self.handlers.0.get(&k).cloned());
        let outcome = match work {
            Some(work) => crate::tensor_thread::run(move || work.run(&ctx))
                .await
                .unwrap_or_else(|panic| Err(JobError::panicked(&panic))),
            None => Err(JobError::permanent(
                Code::Unimplemented,
                format!("{} has no work for stage {stage}", self.service),
            )),
        };
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
                    .fail_job(job_id, token, &e.to_failure(), backoff(attempt))
                    .await
            }
            Err(e) => {
                tracing::error!(job_id = %job_id, stage, error = %e, "job failed");
                self.store.abort_job(job_id, token, &e.to_failure()).await
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
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) < backoff(3));
        assert!(backoff(100) <= Duration::from_secs(30));
    }
}
