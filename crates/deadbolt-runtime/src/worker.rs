//! The stage-job worker: lease a job of this service's stages, run its
//! typed [`Work`](crate::stage::Work) on the tensor thread (tensor work
//! never runs on the async runtime) while a heartbeat task renews the lease
//! and reports progress, then complete or fail the job.
//!
//! - Only transient errors are retried; a deterministic error or a panic
//!   fails the job after one attempt, with its structured failure.
//! - **Fencing**: every write the job makes (artifact records, metrics,
//!   neuron statistics, curves, events) carries the job's lease
//!   ([`Fence`]); the store refuses it once the lease is no longer current,
//!   and artifact objects are written under a per-attempt key, so a worker
//!   that lost its lease (paused, partitioned) can change nothing the
//!   winning attempt wrote. A worker that cannot renew its lease for a
//!   whole lease period stops its job.
//! - **Drain** ([`Drain`]): on SIGTERM the worker stops leasing; its
//!   current job may finish its epoch (the trainer stops at the next epoch
//!   boundary) within the drain deadline, then it is stopped and released
//!   (`release_job`: queued again at once, the attempt not counted), and
//!   its work folder removed.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use deadbolt_store::{
    ArtifactRecord, ArtifactRef, ArtifactStore, ChangeKind, CurvePoint, Fence, Job, JobStatus,
    MetadataStore, NeuronStat, RunStatus, StoreError,
};
use serde_json::Value;
use tonic::Code;
use tracing::Instrument;
use uuid::Uuid;

use crate::error::JobError;
use crate::metrics::names;
use crate::stage::{decode_output, Handlers, Stage, StageKind};

/// The process-wide drain signal (SIGTERM, Ctrl-C): workers stop leasing
/// and wind their jobs down.
#[derive(Clone, Debug, Default)]
pub struct Drain {
    flag: Arc<AtomicBool>,
    notify: Arc<tokio::sync::Notify>,
}

impl Drain {
    pub fn new() -> Drain {
        Drain::default()
    }
    /// Starts draining (idempotent).
    pub fn start(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
    pub fn is_draining(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
    /// Resolves once draining started.
    pub async fn wait(&self) {
        while !self.is_draining() {
            let n = self.notify.notified();
            if self.is_draining() {
                return;
            }
            n.await;
        }
    }
}

/// What a stage's work sees of its job. Every write goes through the
/// methods here, fenced by the job's lease.
pub struct JobContext {
    pub job: Job,
    /// For reads; writes go through this context's fenced methods.
    pub store: Arc<dyn MetadataStore>,
    pub artifacts: ArtifactStore,
    /// A fresh folder for this attempt (removed afterwards).
    pub work_dir: PathBuf,
    fence: Fence,
    keep_epochs: usize,
    handle: tokio::runtime::Handle,
    progress: Arc<Mutex<Option<(f64, String)>>>,
    cancelled: Arc<AtomicBool>,
    drain: Drain,
}

impl JobContext {
    pub fn run_id(&self) -> Uuid {
        self.job.run_id
    }

    /// The job's lease, which every write carries.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Epoch checkpoints a training job keeps (config `keep_epochs`).
    pub fn keep_epochs(&self) -> usize {
        self.keep_epochs
    }

    /// Deletes artifact `name` of the run: its record (fenced), then its
    /// object. Nothing to delete is fine.
    pub fn delete_artifact(&self, name: &str) -> Result<(), JobError> {
        self.block_on(async {
            if let Some(rec) = self
                .store
                .delete_artifact(Some(&self.fence), self.run_id(), name)
                .await?
            {
                let r = self.artifacts.ref_from_record(&rec)?;
                self.artifacts.delete(&r).await?;
            }
            Ok::<_, StoreError>(())
        })
        .map_err(JobError::from)
    }

    /// Runs a future to completion from the work's thread.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.handle.block_on(f)
    }

    /// Progress of the job (sent with the next heartbeat).
    pub fn set_progress(&self, fraction: f64, message: &str) {
        if let Ok(mut p) = self.progress.lock() {
            *p = Some((fraction.clamp(0.0, 1.0), message.to_string()));
        }
    }

    /// True once the run was cancelled, the lease was lost, or the drain
    /// deadline passed: stop at the next batch.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// True once the process drains: stop at the next point where the work
    /// can be resumed (the trainer: the end of the current epoch).
    pub fn is_draining(&self) -> bool {
        self.drain.is_draining()
    }

    /// The run's spec, typed ([`deadbolt_store::Run::spec`]).
    pub fn spec(&self) -> Result<deadbolt_spec::RunSpec, JobError> {
        let run = self.block_on(self.store.get_run(self.run_id()))?;
        Ok(run.spec()?)
    }

    /// The run's experiment spec, with its uploaded files (dataset folder,
    /// trigger image) fetched into this attempt's work folder and checked
    /// against their stored sha256.
    pub fn experiment_spec(&self) -> Result<deadbolt_spec::ExperimentSpec, JobError> {
        let mut spec = match self.spec()? {
            deadbolt_spec::RunSpec::Experiment(s) => s,
            other => return Err(self.not_a(other.kind(), deadbolt_spec::RunKind::Experiment)),
        };
        let dir = self.work_dir.join("uploads");
        self.block_on(crate::uploads::materialize(
            &self.artifacts,
            &mut spec,
            &dir,
        ))?;
        Ok(spec)
    }

    /// The spec of a scan run, with its model and data uploads fetched into
    /// this attempt's work folder and checked against their stored sha256.
    pub fn scan_spec(&self) -> Result<(deadbolt_spec::ScanSpec, crate::scan::ScanFiles), JobError> {
        let spec = match self.spec()? {
            deadbolt_spec::RunSpec::Scan(s) => s,
            other => return Err(self.not_a(other.kind(), deadbolt_spec::RunKind::Scan)),
        };
        let dir = self.work_dir.join("uploads");
        let (model, data) = (dir.join("model"), dir.join("data"));
        self.block_on(async {
            crate::uploads::fetch_folder(&self.artifacts, &spec.model_location, &model).await?;
            crate::uploads::fetch_folder(&self.artifacts, &spec.data_location, &data).await
        })?;
        let files = crate::scan::ScanFiles::find(&model, data)
            .map_err(|m| JobError::permanent(Code::InvalidArgument, m).with_field("model"))?;
        Ok((spec, files))
    }

    /// A job of one kind of run leased for a run of another.
    fn not_a(&self, is: deadbolt_spec::RunKind, wanted: deadbolt_spec::RunKind) -> JobError {
        JobError::permanent(
            Code::FailedPrecondition,
            format!(
                "run {} is a {is} run, not a {wanted} run: stage {} cannot run",
                self.run_id(),
                self.job.stage
            ),
        )
    }

    /// The output of this run's succeeded job of stage `S`, as its type.
    /// Only a stage that runs before this job's stage may be read (the
    /// order is [`deadbolt_spec::RunSpec::stages`]); reading any other is a
    /// bug, INTERNAL.
    pub fn output<S: Stage>(&self) -> Result<S::Output, JobError> {
        let earlier = StageKind::parse(&self.job.stage).map(|k| k.earlier().contains(&S::KIND));
        if earlier != Some(true) {
            return Err(JobError::permanent(
                Code::Internal,
                format!(
                    "stage {} reads the output of stage {}, which does not run before it",
                    self.job.stage,
                    S::KIND
                ),
            ));
        }
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

    /// The object name of artifact `name` for this attempt: each attempt
    /// writes its own objects, so a late writer never replaces the objects
    /// the winning attempt recorded.
    fn object_name(&self, name: &str) -> String {
        format!(
            "jobs/{}/a{}/{name}",
            self.job.id.simple(),
            self.job.attempts
        )
    }

    /// Stores `bytes` as artifact `name` of the run and records it (upsert,
    /// fenced).
    pub fn put_artifact(
        &self,
        name: &str,
        bytes: Bytes,
        content_type: &str,
    ) -> Result<ArtifactRef, JobError> {
        deadbolt_store::validate_name(name)?;
        self.block_on(async {
            let r = self
                .artifacts
                .put(self.run_id(), &self.object_name(name), bytes)
                .await?;
            self.store
                .record_artifact(
                    Some(&self.fence),
                    r.to_record(self.run_id(), name, Some(content_type.into())),
                )
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

    /// Records an already stored object under another name (fenced).
    pub fn record_artifact(&self, rec: ArtifactRecord) -> Result<(), JobError> {
        Ok(self.block_on(self.store.record_artifact(Some(&self.fence), rec))?)
    }

    /// Records a metric of the run (upsert, fenced).
    pub fn record_metric(
        &self,
        stage: &str,
        name: &str,
        step: i64,
        value: f64,
    ) -> Result<(), JobError> {
        Ok(self.block_on(self.store.record_metric(
            Some(&self.fence),
            self.run_id(),
            stage,
            name,
            step,
            value,
        ))?)
    }

    /// Stores per-channel statistics (upsert, fenced).
    pub fn put_neuron_stats(&self, rows: &[NeuronStat]) -> Result<(), JobError> {
        Ok(self.block_on(
            self.store
                .put_neuron_stats(Some(&self.fence), self.run_id(), rows),
        )?)
    }

    /// Stores a criterion's pruning curve and chosen point (fenced).
    pub fn put_pruning(
        &self,
        criterion: &str,
        points: &[CurvePoint],
        chosen: CurvePoint,
    ) -> Result<(), JobError> {
        self.block_on(async {
            self.store
                .put_pruning_curve(Some(&self.fence), self.run_id(), criterion, points)
                .await?;
            self.store
                .set_pruning_choice(Some(&self.fence), self.run_id(), criterion, chosen)
                .await
        })?;
        Ok(())
    }

    /// Stores the run's scan verdict and repair figures (upsert, fenced).
    pub fn put_scan_result(&self, r: &deadbolt_store::ScanResult) -> Result<(), JobError> {
        Ok(self.block_on(
            self.store
                .put_scan_result(Some(&self.fence), self.run_id(), r),
        )?)
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

/// How long an idle worker sleeps when no job change wakes it: until the
/// store's next lease time (a retry's backoff ends, a lease may expire),
/// at least `poll` and at most the fallback poll (notifications can be
/// lost; `next` is by the store's clock, which may be skewed from ours).
fn idle_wait(next: Option<DateTime<Utc>>, poll: Duration) -> Duration {
    let most = crate::stage::fallback(poll);
    match next {
        Some(at) => (at - Utc::now())
            .to_std()
            .unwrap_or_default()
            .clamp(poll, most),
        None => most,
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
    /// The process's drain signal.
    pub drain: Drain,
    /// How long a draining job may go on before it is stopped.
    pub drain_deadline: Duration,
    /// Epoch checkpoints a training job keeps.
    pub keep_epochs: usize,
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

/// How a job attempt ended, as the heartbeat saw it.
struct Flags {
    cancelled: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
}

impl Worker {
    /// Leases and runs jobs until the task is dropped, or until the drain
    /// started and the current job was wound down.
    pub async fn run(self) {
        let stages: Vec<String> = self
            .handlers
            .kinds()
            .iter()
            .map(|k| k.as_str().to_string())
            .collect();
        tracing::info!(service = self.service, worker_id = %self.worker_id, stages = ?stages, "worker started");
        let up = |v: f64| {
            for s in &stages {
                metrics::gauge!(names::WORKER_UP, "stage" => s.clone(), "service" => self.service)
                    .set(v);
            }
        };
        up(1.0);
        // an idle worker wakes on a job change (a stage job enqueued or
        // released: LISTEN/NOTIFY across processes on Postgres, in-process
        // on SQLite), or when the store says a retry or an expired lease
        // is due, polling only as a fallback
        let mut changes = self.store.changes();
        while !self.drain.is_draining() {
            match self
                .store
                .lease_job(&self.worker_id, &stages, self.lease)
                .await
            {
                Ok(Some(job)) => {
                    metrics::counter!(names::JOBS_LEASED, "stage" => job.stage.clone())
                        .increment(1);
                    self.run_job(job).await
                }
                Ok(None) => {
                    let next = match self.store.next_lease_at(&stages).await {
                        Ok(next) => next,
                        Err(e) => {
                            tracing::warn!(service = self.service, error = %e, "next lease time unknown");
                            None
                        }
                    };
                    tokio::select! {
                        _ = tokio::time::sleep(idle_wait(next, self.poll)) => {}
                        // a job of any run enqueued, ended or released;
                        // other changes (events, results, run statuses)
                        // cannot make a job leasable
                        _ = crate::stage::next_change(&mut changes, |c| c.kind == ChangeKind::Job) => {}
                        _ = self.drain.wait() => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(service = self.service, error = %e, "lease failed");
                    tokio::select! {
                        _ = tokio::time::sleep(self.poll * 5) => {}
                        _ = self.drain.wait() => {}
                    }
                }
            }
        }
        up(0.0);
        tracing::info!(service = self.service, worker_id = %self.worker_id, "worker drained");
    }

    /// Runs one leased job; every log line of the job (here and on the
    /// tensor thread) carries its run, job, stage and attempt.
    async fn run_job(&self, job: Job) {
        let span = tracing::info_span!(
            "job",
            run_id = %job.run_id,
            job_id = %job.id,
            stage = %job.stage,
            attempt = job.attempts
        );
        self.run_job_in(job, span.clone()).instrument(span).await
    }

    async fn run_job_in(&self, job: Job, span: tracing::Span) {
        let Some(token) = job.lease_token else {
            tracing::error!(job_id = %job.id, "leased job without a lease token");
            return;
        };
        let fence = Fence {
            job_id: job.id,
            lease_token: token,
        };
        let (job_id, run_id, stage, attempt) =
            (job.id, job.run_id, job.stage.clone(), job.attempts);
        tracing::info!(service = self.service, "job leased");
        let _ = self
            .store
            .append_event(
                Some(&fence),
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
                self.finish(fence, &stage, Err(err), attempt).await;
                return;
            }
        };
        let progress = Arc::new(Mutex::new(None));
        let flags = Flags {
            cancelled: Arc::new(AtomicBool::new(false)),
            lost: Arc::new(AtomicBool::new(false)),
        };
        let ctx = JobContext {
            job,
            store: self.store.clone(),
            artifacts: self.artifacts.clone(),
            work_dir: work_dir.path().to_path_buf(),
            fence,
            keep_epochs: self.keep_epochs,
            handle: tokio::runtime::Handle::current(),
            progress: progress.clone(),
            cancelled: flags.cancelled.clone(),
            drain: self.drain.clone(),
        };
        let heartbeat = tokio::spawn(heartbeat_loop(
            self.store.clone(),
            fence,
            run_id,
            stage.clone(),
            self.lease,
            self.heartbeat,
            progress,
            flags.cancelled.clone(),
            flags.lost.clone(),
        ));
        // past the drain deadline, the job is stopped at its next batch
        let deadline = {
            let (drain, after, cancelled) = (
                self.drain.clone(),
                self.drain_deadline,
                flags.cancelled.clone(),
            );
            tokio::spawn(async move {
                drain.wait().await;
                tokio::time::sleep(after).await;
                tracing::warn!("drain deadline passed; stopping the job");
                cancelled.store(true, Ordering::SeqCst);
            })
        };
        let work =
            crate::stage::StageKind::parse(&stage).and_then(|k| self.handlers.0.get(&k).cloned());
        let outcome = match work {
            Some(work) => crate::tensor_thread::run(move || {
                let _enter = span.enter();
                work.run(&ctx)
            })
            .await
            .unwrap_or_else(|panic| Err(JobError::panicked(&panic))),
            None => Err(JobError::permanent(
                Code::Unimplemented,
                format!("{} has no work for stage {stage}", self.service),
            )),
        };
        heartbeat.abort();
        deadline.abort();
        // a failure's message reaches the client: it names the job's files
        // relative to its scratch folder, never a path of this server
        let outcome = outcome.map_err(|mut e| {
            let root = format!("{}/", work_dir.path().display());
            e.message = e.message.replace(&root, "");
            e
        });
        drop(work_dir);
        if flags.lost.load(Ordering::SeqCst) {
            metrics::counter!(names::JOBS_LEASE_LOST, "stage" => stage.clone()).increment(1);
            tracing::warn!("lease lost; result dropped");
            return;
        }
        let stopped_by_drain =
            self.drain.is_draining() && matches!(&outcome, Err(e) if e.code == Code::Cancelled);
        if stopped_by_drain {
            match self.store.release_job(job_id, token).await {
                Ok(_) => {
                    metrics::counter!(names::JOBS_RELEASED, "stage" => stage.clone()).increment(1);
                    tracing::info!("job released for another worker (drain)");
                    let _ = self
                        .store
                        .append_event(
                            None,
                            run_id,
                            &stage,
                            "released",
                            &format!("attempt {attempt} released by draining {}", self.worker_id),
                            None,
                        )
                        .await;
                }
                Err(e) => tracing::warn!(error = %e, "could not release the job"),
            }
            return;
        }
        self.finish(fence, &stage, outcome, attempt).await;
    }

    async fn finish(
        &self,
        fence: Fence,
        stage: &str,
        outcome: Result<Value, JobError>,
        attempt: i32,
    ) {
        let (job_id, token) = (fence.job_id, fence.lease_token);
        let counter = match &outcome {
            Ok(_) => names::JOBS_SUCCEEDED,
            Err(e) if e.retryable => names::JOBS_RETRIED,
            Err(_) => names::JOBS_FAILED,
        };
        metrics::counter!(counter, "stage" => stage.to_string()).increment(1);
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

/// Renews the lease every `every`, reports progress as run events, and
/// watches for cancellation. Marks the attempt lost when the store says
/// the lease is gone, or when no renewal succeeded for a whole lease
/// period (the store may have given the job to another worker meanwhile).
#[allow(clippy::too_many_arguments)]
async fn heartbeat_loop(
    store: Arc<dyn MetadataStore>,
    fence: Fence,
    run_id: Uuid,
    stage: String,
    lease: Duration,
    every: Duration,
    progress: Arc<Mutex<Option<(f64, String)>>>,
    cancelled: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
) {
    let mut last: Option<(f64, String)> = None;
    let mut renewed = Instant::now();
    let lose = |why: &str| {
        tracing::warn!(job_id = %fence.job_id, stage = %stage, reason = why, "lease lost; stopping the job");
        lost.store(true, Ordering::SeqCst);
        cancelled.store(true, Ordering::SeqCst);
    };
    // the first report comes after half a period, so that a job shorter
    // than two periods still shows its progress once
    let mut wait = every / 2;
    loop {
        tokio::time::sleep(wait).await;
        wait = every;
        let p = progress.lock().ok().and_then(|p| p.clone());
        match store
            .heartbeat(fence.job_id, fence.lease_token, lease, p.clone())
            .await
        {
            Ok(_) => renewed = Instant::now(),
            Err(StoreError::LeaseLost { .. }) => {
                lose("the store refused the renewal");
                return;
            }
            Err(e) => {
                tracing::warn!(job_id = %fence.job_id, error = %e, "heartbeat failed");
                if renewed.elapsed() >= lease {
                    lose("no renewal for a whole lease period");
                    return;
                }
                continue;
            }
        }
        if let Some((f, m)) = &p {
            let changed = last
                .as_ref()
                .is_none_or(|(lf, lm)| lm != m || (f - lf).abs() >= 0.05);
            if changed {
                let _ = store
                    .append_event(Some(&fence), run_id, &stage, "progress", m, Some(*f))
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
    fn idle_waits_until_the_next_lease_time_within_bounds() {
        let poll = Duration::from_millis(200);
        let most = crate::stage::fallback(poll);
        assert_eq!(idle_wait(None, poll), most);
        // due (or overdue, by a skewed store clock): the poll, not a spin
        assert_eq!(
            idle_wait(Some(Utc::now() - chrono::TimeDelta::seconds(5)), poll),
            poll
        );
        let soon = idle_wait(
            Some(Utc::now() + chrono::TimeDelta::milliseconds(700)),
            poll,
        );
        assert!(
            soon > poll && soon <= Duration::from_millis(700),
            "{soon:?}"
        );
        assert_eq!(
            idle_wait(Some(Utc::now() + chrono::TimeDelta::hours(1)), poll),
            most
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) < backoff(3));
        assert!(backoff(100) <= Duration::from_secs(30));
    }

    #[tokio::test]
    async fn drain_wakes_waiters() {
        let d = Drain::new();
        assert!(!d.is_draining());
        let w = tokio::spawn({
            let d = d.clone();
            async move { d.wait().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        d.start();
        tokio::time::timeout(Duration::from_secs(2), w)
            .await
            .expect("the waiter woke")
            .unwrap();
        d.wait().await; // already draining: returns at once
    }
}
