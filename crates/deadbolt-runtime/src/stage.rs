//! Typed stages.
//!
//! A [`Stage`] binds a job stage's name ([`StageKind`]) to its input (the
//! job's payload) and output (the job's result) at compile time; a
//! [`Work`] is the code that runs it. The worker decodes and encodes them
//! (see [`Handlers`]), and every reader of a result names the stage type,
//! so a stage's result is always read as the type it was written as.
//!
//! Stage-RPC semantics ([`run_stage`]): a stage RPC (e.g.
//! `TrainerService.Train`) is accepted only for a run that is *at* that
//! stage: running, with every earlier stage of the pipeline succeeded;
//! anything else answers FAILED_PRECONDITION and changes nothing. (A stage
//! whose job already succeeded answers with its stored output, whatever the
//! run's state: a replay that changes nothing.) An accepted call enqueues
//! the run's job of that stage (idempotent per (run, stage)) and waits
//! until the job succeeded or failed; whichever worker of the service
//! leases the job does the work. A caller whose RPC died with its process
//! calls again (any instance) and waits on the same job.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use deadbolt_store::{Change, ChangeKind, Job, JobStatus, MetadataStore, NewJob, RunStatus};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tonic::{Code, Status};
use uuid::Uuid;

use crate::error::JobError;
use crate::worker::JobContext;

pub use deadbolt_spec::StageKind;

/// A stage's contract: its name, input and output, fixed at compile time.
pub trait Stage: Send + Sync + 'static {
    const KIND: StageKind;
    /// The job's payload.
    type Input: Serialize + DeserializeOwned + Send + 'static;
    /// The job's result.
    type Output: Serialize + DeserializeOwned + Send + 'static;
}

/// The work of stage `S`. Runs on the process's tensor thread; use
/// [`JobContext::block_on`] for store calls.
pub trait Work<S: Stage>: Send + Sync + 'static {
    fn run(&self, ctx: &JobContext, input: S::Input) -> Result<S::Output, JobError>;
}

/// A [`Work`] with its payload decoding and result encoding.
pub(crate) trait ErasedWork: Send + Sync {
    fn run(&self, ctx: &JobContext) -> Result<Value, JobError>;
}

struct Typed<S, W>(W, PhantomData<fn() -> S>);

impl<S: Stage, W: Work<S>> ErasedWork for Typed<S, W> {
    fn run(&self, ctx: &JobContext) -> Result<Value, JobError> {
        let input: S::Input = serde_json::from_value(ctx.job.payload.clone()).map_err(|e| {
            JobError::permanent(
                Code::InvalidArgument,
                format!("payload of stage {}: {e}", S::KIND),
            )
        })?;
        let out = self.0.run(ctx, input)?;
        serde_json::to_value(out).map_err(|e| JobError::encoding(S::KIND.as_str(), e))
    }
}

/// The stages one worker runs, each with its work.
#[derive(Clone, Default)]
pub struct Handlers(pub(crate) BTreeMap<StageKind, Arc<dyn ErasedWork>>);

impl Handlers {
    pub fn new() -> Handlers {
        Handlers::default()
    }
    /// Adds the work of stage `S`.
    pub fn with<S: Stage, W: Work<S>>(mut self, work: W) -> Handlers {
        self.0
            .insert(S::KIND, Arc::new(Typed::<S, W>(work, PhantomData)));
        self
    }
    pub fn kinds(&self) -> Vec<StageKind> {
        self.0.keys().copied().collect()
    }
}

/// Parses a run id (INVALID_ARGUMENT naming `field`).
pub fn parse_run_id(field: &str, s: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(s.trim()).map_err(|e| {
        deadbolt_proto::validate::invalid_argument(field, format!("{s:?} is not a uuid: {e}"))
    })
}

/// FAILED_PRECONDITION unless the run is at stage `kind`: running, and
/// every earlier stage succeeded.
pub async fn check_at_stage(
    store: &dyn MetadataStore,
    run_id: Uuid,
    kind: StageKind,
) -> Result<(), Status> {
    let run = store.get_run(run_id).await?;
    if !run.spec()?.stages().contains(&kind) {
        return Err(JobError::permanent(
            Code::FailedPrecondition,
            format!(
                "run {run_id} is not a {} run that has stage {kind}: stage {kind} cannot run",
                kind.run_kind()
            ),
        )
        .into());
    }
    if run.status != RunStatus::Running {
        return Err(JobError::permanent(
            Code::FailedPrecondition,
            format!(
                "run {run_id} is {}, not running: stage {kind} cannot run",
                run.status
            ),
        )
        .into());
    }
    let jobs = store.list_jobs(run_id).await?;
    for earlier in kind.earlier() {
        let done = jobs
            .iter()
            .any(|j| j.stage == earlier.as_str() && j.status == JobStatus::Succeeded);
        if !done {
            return Err(JobError::permanent(
                Code::FailedPrecondition,
                format!("run {run_id} is not at stage {kind}: stage {earlier} has not succeeded"),
            )
            .into());
        }
    }
    Ok(())
}

/// Enqueues (or finds) the job of stage `S` for `run_id`, when the run is at
/// that stage, and waits for its typed output.
pub async fn run_stage<S: Stage>(
    store: &dyn MetadataStore,
    run_id: Uuid,
    input: S::Input,
    max_attempts: i32,
    poll: Duration,
) -> Result<S::Output, Status> {
    let done = store
        .list_jobs(run_id)
        .await?
        .into_iter()
        .find(|j| j.stage == S::KIND.as_str() && j.status == JobStatus::Succeeded);
    if let Some(job) = done {
        return decode_output::<S>(&job).map_err(Status::from);
    }
    check_at_stage(store, run_id, S::KIND).await?;
    let payload = serde_json::to_value(&input)
        .map_err(|e| JobError::encoding(&format!("payload of stage {}", S::KIND), e))?;
    let (job, created) = store
        .enqueue_job(NewJob {
            run_id,
            stage: S::KIND.as_str().to_string(),
            payload: payload.clone(),
            max_attempts,
        })
        .await?;
    if created {
        tracing::info!(run_id = %run_id, stage = %S::KIND, job_id = %job.id, "stage job enqueued");
    } else if job.payload != payload {
        return Err(JobError::permanent(
            Code::FailedPrecondition,
            format!(
                "stage {} of run {run_id} already runs with another input",
                S::KIND
            ),
        )
        .into());
    }
    let job = wait_job(store, job.id, poll).await?;
    decode_output::<S>(&job).map_err(Status::from)
}

/// Resolves at the next change notification that `wanted` accepts, or at
/// once when notifications were lost (a lag: the caller re-reads either
/// way); never when the channel is closed (the caller's timed wait then
/// takes over).
pub async fn next_change(
    rx: &mut tokio::sync::broadcast::Receiver<Change>,
    wanted: impl Fn(&Change) -> bool,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match rx.recv().await {
            Ok(c) if wanted(&c) => return,
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => return,
            Err(RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

/// Resolves when the store says run `run_id` changed in one of `kinds`
/// (see [`next_change`]).
pub async fn changed(
    rx: &mut tokio::sync::broadcast::Receiver<Change>,
    run_id: Uuid,
    kinds: &[ChangeKind],
) {
    next_change(rx, |c| c.run_id == run_id && kinds.contains(&c.kind)).await
}

/// How long a waiter sleeps without a change notification before it
/// re-reads anyway (notifications can be lost: a listener reconnecting).
pub fn fallback(poll: Duration) -> Duration {
    (poll * 10).max(Duration::from_secs(1))
}

/// Waits until a job succeeded (Ok) or failed/was cancelled (its error),
/// woken by the store's change notifications (a slow poll as fallback).
pub async fn wait_job(
    store: &dyn MetadataStore,
    job_id: Uuid,
    poll: Duration,
) -> Result<Job, Status> {
    let mut changes = store.changes();
    loop {
        let j = store.get_job(job_id).await?;
        match j.status {
            JobStatus::Succeeded => return Ok(j),
            JobStatus::Failed => {
                let e = j
                    .error
                    .as_ref()
                    .map(JobError::from_failure)
                    .unwrap_or_else(|| JobError::permanent(Code::Internal, "job failed"));
                return Err(e.into());
            }
            JobStatus::Cancelled => {
                return Err(JobError::permanent(
                    Code::Cancelled,
                    format!("job {job_id} was cancelled"),
                )
                .into())
            }
            JobStatus::Queued | JobStatus::Leased => {
                tokio::select! {
                    _ = changed(&mut changes, j.run_id, &[ChangeKind::Job, ChangeKind::Run]) => {}
                    _ = tokio::time::sleep(fallback(poll)) => {}
                }
            }
        }
    }
}

/// A succeeded job's result as the output type of its stage.
pub fn decode_output<S: Stage>(job: &Job) -> Result<S::Output, JobError> {
    if job.stage != S::KIND.as_str() {
        return Err(JobError::permanent(
            Code::Internal,
            format!("job {} is of stage {}, not {}", job.id, job.stage, S::KIND),
        ));
    }
    serde_json::from_value(job.result.clone().unwrap_or(Value::Null))
        .map_err(|e| JobError::encoding(&format!("result of stage {}", S::KIND), e))
}
