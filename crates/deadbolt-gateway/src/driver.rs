//! The per-run driver: calls the stage services in order, with retries.

use std::future::Future;
use std::time::{Duration, Instant};

use deadbolt_proto::v1 as pb;
use deadbolt_proto::v1::analyzer_service_client::AnalyzerServiceClient;
use deadbolt_proto::v1::poisoner_service_client::PoisonerServiceClient;
use deadbolt_proto::v1::pruner_service_client::PrunerServiceClient;
use deadbolt_proto::v1::trainer_service_client::TrainerServiceClient;
use deadbolt_runtime::auth::WithBearer;
use deadbolt_runtime::byom::{ByomSpec, RunKind};
use deadbolt_runtime::config::ServiceKind;
use deadbolt_runtime::server::balanced_channel;
use deadbolt_runtime::{convert, Shared, StageKind};
use deadbolt_spec::ExperimentSpec;
use deadbolt_store::{ChangeKind, RunStatus, StoreError};
use tonic::transport::Channel;
use tonic::Status;
use uuid::Uuid;

use crate::error::GatewayError;

/// Give up on a stage whose calls keep failing transiently for this long.
pub const STAGE_RETRY_WINDOW: Duration = Duration::from_secs(15 * 60);

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

    /// Calls a stage until it succeeds, fails for good, or the run is cancelled.
    async fn stage<T, F, Fut>(
        &self,
        stage: &str,
        kind: StageKind,
        mut call: F,
    ) -> Result<(), GatewayError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
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
                r = call() => r.map(|_| ()),
                r = self.job_ended(kind) => r,
            };
            match outcome {
                Ok(()) => {
                    let secs = t0.elapsed().as_secs_f64();
                    tracing::info!(run_id = %self.run_id, stage, attempt, seconds = secs, "stage done");
                    self.event(stage, "finished", &format!("{secs:.1} s")).await;
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
        let kind = RunKind::of(&run.spec_json);
        let byom = match kind {
            RunKind::Byom => {
                Some(ByomSpec::from_json(&run.spec_json).map_err(GatewayError::BadSpec)?)
            }
            RunKind::Experiment => None,
        };
        let spec: Option<ExperimentSpec> = match kind {
            RunKind::Experiment => Some(
                serde_json::from_value(run.spec_json)
                    .map_err(|e| GatewayError::BadSpec(e.to_string()))?,
            ),
            RunKind::Byom => None,
        };
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
        let id = self.run_id.to_string();
        let c = &self.clients;
        match (spec, byom) {
            (Some(spec), _) => self.drive_experiment(&spec, &id, c).await,
            (None, Some(byom)) => self.drive_scan(&byom, &id, c).await,
            (None, None) => Err(GatewayError::BadSpec("run has no spec".into())),
        }
    }

    /// A scan run: the scan, then (when asked for) the repair.
    async fn drive_scan(&self, byom: &ByomSpec, id: &str, c: &Clients) -> Result<(), GatewayError> {
        self.stage(StageKind::Scan.as_str(), StageKind::Scan, || {
            let mut cl = c.analyzer.clone();
            let req = pb::ScanRequest {
                run_id: id.to_string(),
            };
            async move { cl.scan(req).await }
        })
        .await?;
        if byom.repair {
            self.stage(StageKind::Repair.as_str(), StageKind::Repair, || {
                let mut cl = c.pruner.clone();
                let req = pb::RepairRequest {
                    run_id: id.to_string(),
                };
                async move { cl.repair(req).await }
            })
            .await?;
        }
        Ok(())
    }

    /// An experiment: data, two trainings, analyze, prune every criterion.
    async fn drive_experiment(
        &self,
        spec: &ExperimentSpec,
        id: &str,
        c: &Clients,
    ) -> Result<(), GatewayError> {
        let id = id.to_string();
        self.stage(StageKind::Data.as_str(), StageKind::Data, || {
            let mut cl = c.poisoner.clone();
            let req = pb::PoisonRequest { run_id: id.clone() };
            async move { cl.poison(req).await }
        })
        .await?;
        for (stage, tag) in [
            (StageKind::TrainClean, pb::ModelTag::Clean),
            (StageKind::TrainBackdoored, pb::ModelTag::Backdoored),
        ] {
            self.stage(stage.as_str(), stage, || {
                let mut cl = c.trainer.clone();
                let req = pb::TrainRequest {
                    run_id: id.clone(),
                    tag: tag as i32,
                };
                async move { cl.train(req).await }
            })
            .await?;
        }
        // the synthetic trigger, statistics and Grad-CAM are parts of the
        // one analyze job
        self.stage(StageKind::Analyze.as_str(), StageKind::Analyze, || {
            let mut cl = c.analyzer.clone();
            let req = pb::ReverseEngineerRequest { run_id: id.clone() };
            async move { cl.reverse_engineer(req).await }
        })
        .await?;
        self.stage("analyze-statistics", StageKind::Analyze, || {
            let mut cl = c.analyzer.clone();
            let req = pb::StatisticsRequest { run_id: id.clone() };
            async move { cl.statistics(req).await }
        })
        .await?;
        self.stage("analyze-gradcam", StageKind::Analyze, || {
            let mut cl = c.analyzer.clone();
            let req = pb::GradCamRequest { run_id: id.clone() };
            async move { cl.grad_cam(req).await }
        })
        .await?;

        for criterion in &spec.defense.criteria {
            let stage = format!("{}-{}", StageKind::Prune, criterion.as_str());
            self.stage(&stage, StageKind::Prune, || {
                let mut cl = c.pruner.clone();
                let req = pb::PruneRequest {
                    run_id: id.clone(),
                    criterion: convert::criterion_to_proto(*criterion) as i32,
                };
                async move { cl.prune(req).await }
            })
            .await?;
        }
        Ok(())
    }
}
