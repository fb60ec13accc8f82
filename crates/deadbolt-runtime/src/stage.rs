//! Stage-RPC semantics: a stage RPC (e.g. `TrainerService.Train`) enqueues
//! the run's job of that stage (idempotent per (run, stage)) and waits until
//! the job succeeded or failed; whichever worker of the service leases the
//! job does the work. A caller whose RPC died with its process calls again
//! (any instance) and waits on the same job.

use std::time::Duration;

use deadbolt_store::{Job, JobStatus, MetadataStore, NewJob};
use serde_json::Value;
use tonic::Status;
use uuid::Uuid;

use crate::worker::JobError;

/// Parses a run id (INVALID_ARGUMENT naming `field`).
pub fn parse_run_id(field: &str, s: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(s.trim()).map_err(|e| {
        deadbolt_proto::validate::invalid_argument(field, format!("{s:?} is not a uuid: {e}"))
    })
}

/// Enqueues (or finds) the job of `stage` for `run_id` and waits for it.
pub async fn run_stage(
    store: &dyn MetadataStore,
    run_id: Uuid,
    stage: &str,
    payload: Value,
    max_attempts: i32,
    poll: Duration,
) -> Result<Job, Status> {
    store.get_run(run_id).await?;
    let (job, created) = store
        .enqueue_job(NewJob {
            run_id,
            stage: stage.to_string(),
            payload,
            max_attempts,
        })
        .await?;
    if created {
        tracing::info!(run_id = %run_id, stage, job_id = %job.id, "stage job enqueued");
    }
    wait_job(store, job.id, poll).await
}

/// Waits until a job succeeded (Ok) or failed/was cancelled (its error).
pub async fn wait_job(
    store: &dyn MetadataStore,
    job_id: Uuid,
    poll: Duration,
) -> Result<Job, Status> {
    loop {
        let j = store.get_job(job_id).await?;
        match j.status {
            JobStatus::Succeeded => return Ok(j),
            JobStatus::Failed => {
                return Err(JobError::status_from_job_text(
                    j.error.as_deref().unwrap_or("[internal] job failed"),
                ))
            }
            JobStatus::Cancelled => {
                return Err(Status::cancelled(format!("job {job_id} was cancelled")))
            }
            JobStatus::Queued | JobStatus::Leased => tokio::time::sleep(poll).await,
        }
    }
}

/// Decodes a job result into a stage's result type.
pub fn decode_result<T: serde::de::DeserializeOwned>(job: &Job) -> Result<T, Status> {
    serde_json::from_value(job.result.clone().unwrap_or(Value::Null))
        .map_err(|e| Status::internal(format!("result of job {} ({}): {e}", job.id, job.stage)))
}
