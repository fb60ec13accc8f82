//! The per-run driver: calls the stage services in order, with retries.

use std::future::Future;
use std::time::{Duration, Instant};

use deadbolt_proto::v1 as pb;
use deadbolt_proto::v1::analyzer_service_client::AnalyzerServiceClient;
use deadbolt_proto::v1::poisoner_service_client::PoisonerServiceClient;
use deadbolt_proto::v1::pruner_service_client::PrunerServiceClient;
use deadbolt_proto::v1::trainer_service_client::TrainerServiceClient;
use deadbolt_runtime::auth::WithBearer;
use deadbolt_runtime::config::ServiceKind;
use deadbolt_runtime::server::balanced_channel;
use deadbolt_runtime::{convert, Shared, StageKind};
use deadbolt_store::{ChangeKind, RunStatus, StoreError};
use tonic::transport::Channel;
use tonic::Status;
use uuid::Uuid;

use crate::error::GatewayError;

/// Give up on a stage whose calls keep failing transiently for this long.
pub const STAGE_RETRY_WINDOW: Duration = Duration::from_secs(15 * 60);

/// How long the driver waits for a replayed result of a job that ended
/// while its call hung.
const REPLAY_WAIT: Duration = Duration::from_secs(5);

/// A channel to a stage service that presents the internal credential.
pub type StageChannel = WithBearer<Channel>;

/// Clients of the four stage services (each over all configured addresses).
#[derive(Clone)]
pub struct Clients {
    pub poisoner: PoisonerServiceClient<StageChannel>,
    pub trainer: TrainerServiceClient<StageChannel>,
    pub analyzer: AnalyzerServiceClient<StageChannel>,
    pub pruner: PrunerServiceClient<StageChannel>,
    /// The same channels, by service, for health checks.
    channels: Vec<(ServiceKind, StageChannel)>,
}

impl Clients {
    /// Must be called inside a tokio runtime.
    pub fn from_config(c: &deadbolt_runtime::Config) -> anyhow::Result<Clients> {
        let ch = |k: ServiceKind| {
            WithBearer::new(
                balanced_channel(&c.peer_urls(k), Some(&c.tls))?,
                c.internal_token.as_deref(),
                "internal_token",
            )
        };
        let poisoner = ch(ServiceKind::Poisoner)?;
        let trainer = ch(ServiceKind::Trainer)?;
        let analyzer = ch(ServiceKind::Analyzer)?;
        let pruner = ch(ServiceKind::Pruner)?;
        Ok(Clients {
            poisoner: PoisonerServiceClient::new(poisoner.clone()),
            trainer: TrainerServiceClient::new(trainer.clone()),
            analyzer: AnalyzerServiceClient::new(analyzer.clone()),
            pruner: PrunerServiceClient::new(pruner.clone()),
            channels: vec![
                (ServiceKind::Poisoner, poisoner),
                (ServiceKind::Trainer, trainer),
                (ServiceKind::Analyzer, analyzer),
                (ServiceKind::Pruner, pruner),
            ],
        })
    }

    /// Opens the connections to every stage instance now (one health check
    /// per service: the balanced channel connects to all its addresses
    /// when first polled), so the first run does not wait for them.
    /// Best effort: an instance that is not up yet is connected on first
    /// use, as before.
    pub async fn warm(&self) {
        let checks = self.channels.iter().map(|(kind, ch)| async move {
            let t0 = Instant::now();
            let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
            let req = tonic_health::pb::HealthCheckRequest { service: String::new() };
            match tokio::time::timeout(Duration::from_secs(5), health.check(req)).await {
                Ok(Ok(_)) => tracing::debug!(
                    service = kind.as_str(),
                    ms = t0.elapsed().as_secs_f64() * 1e3,
                    "stage channel warm"
                ),
                Ok(Err(s)) => tracing::debug!(service = kind.as_str(), code = ?s.code(), error = %s.message(), "stage channel not warmed"),
                Err(_) => tracing::debug!(service = kind.as_str(), "stage channel not warmed: timed out"),
            }
        });
        futures::future::join_all(checks).await;
    }
}

/// Drives one run while it holds the run's drive lease (`token`).
pub struct Driver {
    pub shared: Shared,
    pub clients: Clients,
    pub run_id: Uuid,
    pub driver_id: String,
    pub token: Uuid,
}

/// Why a driver stopped before the run ended.
enum Stop {
    /// Another replica holds the drive now (our lease expired).
    Lost,
    /// This process drains; the drive is released for another replica.
    Drain,
}

impl Driver {
    async fn event(&self, stage: &str, kind: &str, message: &str) {
        if let Err(e) = self
            .shared
            .store
            .append_event(None, self.run_id, stage, kind, message, None)
            .await
        {
            tracing::warn!(run_id = %self.run_id, error = %e, "could not record event");
        }
    }

    async fn check_cancelled(&self) -> Result<(), GatewayError> {
        let run = self.shared.store.get_run(self.run_id).await?;
        if run.status == RunStatus::Cancelled {
            return Err(GatewayError::Cancelled(self.run_id));
        }
        Ok(())
    }

    /// Calls the RPC of stage `kind` until it succeeds, fails for good, or
    /// the run is cancelled. The `finished` event carries the time and the
    /// job's result in words (when the call, not the store, saw it end).
    async fn stage<F, Fut>(&self, kind: StageKind, mut call: F) -> Result<(), GatewayError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<String, Status>>,
    {
        let stage = kind.as_str();
        self.check_cancelled().await?;
        self.event(stage, "started", "").await;
        let t0 = Instant::now();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            // the call, or the stage's job ending in the store, whichever
            // comes first: a call stuck on an instance that stopped
            // answering (paused, partitioned) does not hold the run up,
            // since another worker leases the job once its lease expires
            let outcome = tokio::select! {
                r = call() => r.map(Some),
                // the job's result then comes from a second call, which
                // replays the stored output (briefly: the instance may be
                // the one that stopped answering)
                r = self.job_ended(kind) => match r {
                    Ok(()) => Ok(tokio::time::timeout(REPLAY_WAIT, call()).await.ok().and_then(Result::ok)),
                    Err(e) => Err(e),
                },
            };
            match outcome {
                Ok(result) => {
                    let secs = t0.elapsed().as_secs_f64();
                    let result = result.unwrap_or_default();
                    tracing::info!(run_id = %self.run_id, stage, attempt, seconds = secs, result = %result, "stage done");
                    let message = match result.is_empty() {
                        true => format!("{secs:.1} s"),
                        false => format!("{secs:.1} s: {result}"),
                    };
                    self.event(stage, "finished", &message).await;
                    return Ok(());
                }
                Err(s) => {
                    self.check_cancelled().await?;
                    // a job that failed for good answers with its own code
                    // (RESOURCE_EXHAUSTED for a file over a limit, say):
                    // that is the stage's verdict, not a busy instance; the
                    // rest is the one retry rule's, for a call's status
                    let ended = self.job_failed(kind).await;
                    if !ended
                        && deadbolt_proto::retryable(s.code(), deadbolt_proto::Origin::Call)
                        && t0.elapsed() < STAGE_RETRY_WINDOW
                    {
                        let wait = Duration::from_millis((250u64 << attempt.min(4)).min(3000));
                        tracing::warn!(run_id = %self.run_id, stage, attempt, code = ?s.code(), error = %s.message(), "stage call failed; retrying");
                        self.event(stage, "retry", &format!("{:?}: {}", s.code(), s.message()))
                            .await;
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    self.event(stage, "failed", &format!("{:?}: {}", s.code(), s.message()))
                        .await;
                    return Err(GatewayError::Stage {
                        stage: stage.to_string(),
                        status: s,
                    });
                }
            }
        }
    }

    /// Whether the run's job of `kind` has failed for good.
    async fn job_failed(&self, kind: StageKind) -> bool {
        match self.shared.store.list_jobs(self.run_id).await {
            Ok(jobs) => jobs
                .iter()
                .any(|j| j.stage == kind.as_str() && j.status == deadbolt_store::JobStatus::Failed),
            Err(_) => false,
        }
    }

    /// Resolves once the run's job of `kind` succeeded (Ok) or failed for
    /// good (its error), woken by the store's change notifications.
    async fn job_ended(&self, kind: StageKind) -> Result<(), Status> {
        let store = &self.shared.store;
        let mut changes = store.changes();
        let fallback = deadbolt_runtime::stage::fallback(self.shared.config.poll());
        loop {
            let jobs = store.list_jobs(self.run_id).await?;
            if let Some(j) = jobs.iter().find(|j| j.stage == kind.as_str()) {
                match j.status {
                    deadbolt_store::JobStatus::Succeeded => return Ok(()),
                    deadbolt_store::JobStatus::Failed => {
                        let e = j
                            .error
                            .as_ref()
                            .map(deadbolt_runtime::JobError::from_failure)
                            .unwrap_or_else(|| {
                                deadbolt_runtime::JobError::permanent(
                                    tonic::Code::Internal,
                                    "job failed",
                                )
                            });
                        return Err(e.into());
                    }
                    _ => {}
                }
            }
            tokio::select! {
                _ = deadbolt_runtime::stage::changed(&mut changes, self.run_id, &[ChangeKind::Job, ChangeKind::Run]) => {}
                _ = tokio::time::sleep(fallback) => {}
            }
        }
    }

    /// Drives the run to its end and records the outcome. The final
    /// status is compare-and-set in the store: a run cancelled meanwhile
    /// stays cancelled (the store refuses the transition), and the events
    /// say what really happened.
    pub async fn run(self) {
        self.event("run", "driver", &format!("claimed by {}", self.driver_id))
            .await;
        let outcome = tokio::select! {
            o = self.drive() => o,
            stop = self.keep_lease() => {
                match stop {
                    Stop::Lost => tracing::warn!(run_id = %self.run_id, driver = %self.driver_id, "drive lost to another replica; stopping"),
                    Stop::Drain => {
                        let _ = self.shared.store.release_run(self.run_id, self.token).await;
                        self.event("run", "driver", &format!("released by draining {}", self.driver_id)).await;
                        tracing::info!(run_id = %self.run_id, "drive released (drain)");
                    }
                }
                return;
            }
        };
        self.finish(outcome).await;
        let _ = self.shared.store.release_run(self.run_id, self.token).await;
    }

    /// Renews the drive lease every third of a lease; returns when it is
    /// lost (to another replica) or the process drains.
    async fn keep_lease(&self) -> Stop {
        let lease = self.shared.config.lease();
        let drain = &self.shared.drain;
        let mut renewed = std::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(lease / 3) => {}
                _ = drain.wait() => return Stop::Drain,
            }
            match self
                .shared
                .store
                .renew_run(self.run_id, self.token, lease)
                .await
            {
                Ok(()) => renewed = std::time::Instant::now(),
                Err(StoreError::DriveLost { .. }) => return Stop::Lost,
                Err(e) => {
                    tracing::warn!(run_id = %self.run_id, error = %e, "renewing the drive failed");
                    if renewed.elapsed() >= lease {
                        return Stop::Lost;
                    }
                }
            }
        }
    }

    async fn finish(&self, outcome: Result<(), GatewayError>) {
        let store = &self.shared.store;
        let (status, error, what) = match &outcome {
            Ok(()) => (RunStatus::Succeeded, None, "succeeded".to_string()),
            Err(GatewayError::Cancelled(_)) => {
                self.event("run", "cancelled", "").await;
                tracing::info!(run_id = %self.run_id, "run cancelled");
                return;
            }
            Err(e) => (RunStatus::Failed, Some(e.to_string()), e.to_string()),
        };
        // the outcome's event first, then the status: a watcher's stream
        // ends at the final status, so every event must be recorded by then
        if status == RunStatus::Succeeded {
            self.event("run", "finished", "succeeded").await;
        } else {
            self.event("run", "failed", &what).await;
        }
        match store
            .set_run_status_fenced(self.run_id, self.token, status, error)
            .await
        {
            Ok(_) if status == RunStatus::Succeeded => {
                tracing::info!(run_id = %self.run_id, "run succeeded");
            }
            Ok(_) => {
                tracing::warn!(run_id = %self.run_id, error = %what, "run failed");
            }
            Err(StoreError::DriveLost { .. }) => {
                tracing::warn!(run_id = %self.run_id, outcome = %what, "drive lost before the outcome was recorded; the new driver records it");
            }
            Err(StoreError::FailedPrecondition(why)) => {
                // cancelled (or already ended) while the last stage
                // finished: the store keeps the status it has, and says so
                self.event("run", "outcome-not-recorded", &why).await;
                tracing::info!(run_id = %self.run_id, outcome = %what, reason = %why, "run ended elsewhere; outcome not recorded");
            }
            Err(e) => {
                tracing::error!(run_id = %self.run_id, error = %e, outcome = %what, "could not record the run's outcome");
            }
        }
    }

    async fn drive(&self) -> Result<(), GatewayError> {
        let store = &self.shared.store;
        let run = store.get_run(self.run_id).await?;
        if run.status.is_terminal() {
            return Ok(());
        }
        let spec = run.spec()?;
        if run.status != RunStatus::Running {
            match store
                .set_run_status_fenced(self.run_id, self.token, RunStatus::Running, None)
                .await
            {
                Ok(_) => self.event("run", "status", "running").await,
                // cancelled between the read and the write
                Err(StoreError::FailedPrecondition(_)) => {
                    return Err(GatewayError::Cancelled(self.run_id))
                }
                Err(e) => return Err(e.into()),
            }
        }
        // the stages in the one order the spec declares, one RPC (one job)
        // each
        for &kind in spec.stages() {
            self.stage(kind, || call_stage(&self.clients, self.run_id, kind))
                .await?;
        }
        Ok(())
    }
}

/// Calls stage `kind`'s RPC for run `run_id` (its one job) and says what
/// the job found, in words.
async fn call_stage(c: &Clients, run_id: Uuid, kind: StageKind) -> Result<String, Status> {
    let run_id = run_id.to_string();
    Ok(match kind {
        StageKind::Data => {
            let r = c
                .poisoner
                .clone()
                .poison(pb::PoisonRequest { run_id })
                .await?;
            format!("{} images poisoned", r.get_ref().poisoned_count)
        }
        StageKind::TrainClean | StageKind::TrainBackdoored => {
            let tag = match kind {
                StageKind::TrainClean => pb::ModelTag::Clean,
                _ => pb::ModelTag::Backdoored,
            };
            let req = pb::TrainRequest {
                run_id,
                tag: tag as i32,
            };
            let r = c.trainer.clone().train(req).await?.into_inner();
            let m = r.metrics.unwrap_or_default();
            match m.asr {
                Some(asr) => format!("acc {:.4}, asr {asr:.4}", m.acc),
                None => format!("acc {:.4}", m.acc),
            }
        }
        StageKind::Analyze => {
            let req = pb::AnalyzeRequest { run_id };
            let r = c.analyzer.clone().analyze(req).await?.into_inner();
            let best = r.synthetic.and_then(|s| s.best).map(|b| b.target_label);
            let layer = r.statistics.map(|s| s.layer).unwrap_or_default();
            match best {
                Some(label) => format!("layer {layer}, synthetic trigger toward label {label}"),
                None => format!("layer {layer}"),
            }
        }
        StageKind::Prune => {
            let r = c.pruner.clone().prune(pb::PruneRequest { run_id }).await?;
            let chosen: Vec<String> = r
                .get_ref()
                .criteria
                .iter()
                .map(|p| {
                    let name = convert::criterion_from_proto("criterion", p.criterion)
                        .map(|c| c.as_str())
                        .unwrap_or("?");
                    let k = p.chosen.as_ref().map(|c| c.k).unwrap_or_default();
                    format!("{name} k={k}")
                })
                .collect();
            chosen.join(", ")
        }
        StageKind::Scan => {
            let r = c.analyzer.clone().scan(pb::ScanRequest { run_id }).await?;
            let r = r.get_ref();
            format!("{} (label {})", r.verdict, r.suspect_label)
        }
        StageKind::Repair => {
            let r = c
                .pruner
                .clone()
                .repair(pb::RepairRequest { run_id })
                .await?;
            let r = r.get_ref();
            format!("{} (pruned {})", r.outcome, r.pruned)
        }
    })
}
