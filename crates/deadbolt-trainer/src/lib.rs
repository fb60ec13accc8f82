//! The trainer service: `TrainerService.Train` runs the run's
//! `train-clean` or `train-backdoored` stage job, which trains with
//! [`deadbolt_core::experiment::stage_train`] (epoch checkpoints via
//! `workflow::train_checkpointed`). After every epoch the checkpoint is
//! uploaded as `<tag>/epoch-<n>/model.safetensors` (+ `model.json` and
//! the optimizer's `optimizer.safetensors`) and
//! recorded, with the epoch's metrics (upserts: a retried job writes no
//! duplicate rows). A retried job (attempt > 1) downloads the latest epoch
//! checkpoint (sha256-verified: a corrupted one fails the job with a
//! checksum error) and resumes from it. The final model is recorded as
//! `<tag>/model.safetensors` + `<tag>/model.json`.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use deadbolt_core::eval::Metrics;
use deadbolt_core::experiment::{self, TrainOutcome};
use deadbolt_core::model::CheckpointMeta;
use deadbolt_core::progress::Progress;
use deadbolt_core::spec::ExperimentSpec;
use deadbolt_core::train::EpochReport;
use deadbolt_core::workflow;
use deadbolt_poisoner::dataset::Bundle;
use deadbolt_poisoner::error::{core, io};
use deadbolt_poisoner::progress::JobProgress;
use deadbolt_proto::v1 as pb;
use deadbolt_proto::v1::trainer_service_server::{TrainerService, TrainerServiceServer};
use deadbolt_proto::validate::invalid_argument;
use deadbolt_runtime::{convert, stage, stages, JobContext, JobError, Shared, StageHandler};
use deadbolt_store::{metric_names, ArtifactRef};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tonic::{Request, Response, Status};

/// The result of a training stage job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainResult {
    /// "clean" or "backdoored".
    pub tag: String,
    pub checkpoint: ArtifactRef,
    pub sidecar: ArtifactRef,
    /// Test figures of the final model.
    pub metrics: Metrics,
    /// Epochs trained by the attempt that finished the job.
    pub epochs: Vec<EpochReport>,
    /// Epoch of the checkpoint the finishing attempt resumed from (0 = fresh).
    pub resumed_from: usize,
    /// The attempt (lease) that finished the job.
    pub attempt: i32,
    pub seconds: f64,
}

impl TrainResult {
    /// The core's view of it (checkpoint = the local folder it was fetched to).
    pub fn outcome(&self, checkpoint: &Path) -> TrainOutcome {
        TrainOutcome {
            checkpoint: checkpoint.to_path_buf(),
            metrics: self.metrics.clone(),
            epochs: self.epochs.clone(),
            resumed_from: self.resumed_from,
            seconds: self.seconds,
        }
    }
}

pub fn tag_of_stage(stage: &str) -> &'static str {
    if stage == stages::TRAIN_CLEAN {
        "clean"
    } else {
        "backdoored"
    }
}

/// Downloads (sha256-verified) the final model of a training stage into
/// `dir` (`model.safetensors` + `model.json`).
pub fn fetch_model(ctx: &JobContext, stage: &str, dir: &Path) -> Result<TrainResult, JobError> {
    let r: TrainResult = ctx.stage_result(stage)?;
    ctx.download(&r.checkpoint, &dir.join("model.safetensors"))?;
    ctx.download(&r.sidecar, &dir.join("model.json"))?;
    Ok(r)
}

/// Uploads the checkpoint in `out` after every epoch (the core calls
/// `start("epoch k/N")` once epoch k-1 is saved), forwarding progress.
struct EpochUploader<'a> {
    ctx: &'a JobContext,
    inner: JobProgress<'a>,
    tag: &'static str,
    stage: String,
    out: &'a Path,
    uploaded: Mutex<BTreeSet<usize>>,
    error: Mutex<Option<JobError>>,
}

impl EpochUploader<'_> {
    fn sync(&self) -> Result<(), JobError> {
        let Ok(text) = std::fs::read(self.out.join("model.json")) else {
            return Ok(());
        };
        let meta: CheckpointMeta =
            serde_json::from_slice(&text).map_err(|e| io("model.json", e))?;
        if meta.epoch == 0 || !self.uploaded.lock().expect("lock").insert(meta.epoch) {
            return Ok(());
        }
        upload_epoch(self.ctx, self.tag, self.out, meta.epoch)?;
        // the epoch's own report is the last of the sidecar's history
        if let Some(rep) = meta.metrics["train"]
            .as_array()
            .and_then(|h| h.last())
            .and_then(|v| serde_json::from_value::<EpochReport>(v.clone()).ok())
        {
            record_epoch(self.ctx, &self.stage, &rep)?;
        }
        Ok(())
    }
}

impl Progress for EpochUploader<'_> {
    fn start(&self, phase: &str, total: u64) {
        if phase.starts_with("epoch ") {
            if let Err(e) = self.sync() {
                tracing::warn!(error = %e, "epoch checkpoint upload failed");
                self.error.lock().expect("lock").get_or_insert(e);
            }
        }
        self.inner.start(phase, total)
    }
    fn inc(&self, n: u64) {
        self.inner.inc(n)
    }
    fn finish(&self, message: &str) {
        self.inner.finish(message)
    }
    fn cancelled(&self) -> bool {
        self.inner.cancelled() || self.error.lock().map(|e| e.is_some()).unwrap_or(true)
    }
}

fn upload_epoch(
    ctx: &JobContext,
    tag: &str,
    out: &Path,
    epoch: usize,
) -> Result<(ArtifactRef, ArtifactRef), JobError> {
    // the optimizer's state first: an epoch whose sidecar is stored has
    // all its files
    let state = out.join(workflow::OPTIMIZER_STATE);
    if state.is_file() {
        ctx.put_file(
            &format!("{tag}/epoch-{epoch}/{}", workflow::OPTIMIZER_STATE),
            &state,
            "application/octet-stream",
        )?;
    }
    let w = ctx.put_file(
        &format!("{tag}/epoch-{epoch}/model.safetensors"),
        &out.join("model.safetensors"),
        "application/octet-stream",
    )?;
    let s = ctx.put_file(
        &format!("{tag}/epoch-{epoch}/model.json"),
        &out.join("model.json"),
        "application/json",
    )?;
    tracing::info!(run_id = %ctx.run_id(), tag, epoch, sha256 = %w.sha256, "epoch checkpoint stored");
    Ok((w, s))
}

fn record_epoch(ctx: &JobContext, stage: &str, rep: &EpochReport) -> Result<(), JobError> {
    let step = rep.epoch as i64;
    ctx.block_on(async {
        ctx.store
            .record_metric(ctx.run_id(), stage, "train_loss", step, rep.loss)
            .await?;
        ctx.store
            .record_metric(ctx.run_id(), stage, "train_acc", step, rep.train_acc)
            .await
    })?;
    Ok(())
}

/// The latest epoch checkpoint recorded for `tag`.
struct EpochCheckpoint {
    epoch: usize,
    weights: ArtifactRef,
    sidecar: ArtifactRef,
    /// The optimizer's state, when it was stored.
    optimizer: Option<ArtifactRef>,
}

fn latest_epoch(ctx: &JobContext, tag: &str) -> Result<Option<EpochCheckpoint>, JobError> {
    let recs = ctx.block_on(ctx.store.list_artifacts(ctx.run_id()))?;
    let prefix = format!("{tag}/epoch-");
    let best = recs
        .iter()
        .filter_map(|r| {
            let n = r
                .name
                .strip_prefix(&prefix)?
                .strip_suffix("/model.safetensors")?
                .parse::<usize>()
                .ok()?;
            let side = recs
                .iter()
                .find(|s| s.name == format!("{prefix}{n}/model.json"))?;
            Some((n, r, side))
        })
        .max_by_key(|(n, _, _)| *n);
    let Some((n, w, s)) = best else {
        return Ok(None);
    };
    let opt_name = format!("{prefix}{n}/{}", workflow::OPTIMIZER_STATE);
    let optimizer = match recs.iter().find(|r| r.name == opt_name) {
        Some(r) => Some(ctx.artifacts.ref_from_record(r)?),
        None => None,
    };
    Ok(Some(EpochCheckpoint {
        epoch: n,
        weights: ctx.artifacts.ref_from_record(w)?,
        sidecar: ctx.artifacts.ref_from_record(s)?,
        optimizer,
    }))
}

/// Runs the training stages.
pub struct TrainHandler;

impl deadbolt_runtime::StageHandler for TrainHandler {
    fn run(&self, ctx: &JobContext) -> Result<Value, JobError> {
        let t = Instant::now();
        let stage = ctx.job.stage.clone();
        let tag = tag_of_stage(&stage);
        let spec: ExperimentSpec = ctx.spec()?;
        let bundle = Bundle::fetch(ctx)?;
        let attack = bundle.attack(&spec)?;
        let data = if tag == "clean" {
            &bundle.train
        } else {
            &bundle.poisoned
        };
        let out = ctx.work_dir.join(tag);
        std::fs::create_dir_all(&out).map_err(|e| io(out.display(), e))?;
        let mut uploaded = BTreeSet::new();
        if ctx.job.attempts > 1 {
            if let Some(c) = latest_epoch(ctx, tag)? {
                let epoch = c.epoch;
                ctx.download(&c.weights, &out.join("model.safetensors"))?;
                ctx.download(&c.sidecar, &out.join("model.json"))?;
                if let Some(o) = &c.optimizer {
                    ctx.download(o, &out.join(workflow::OPTIMIZER_STATE))?;
                }
                uploaded.insert(epoch);
                tracing::info!(run_id = %ctx.run_id(), tag, epoch, attempt = ctx.job.attempts, "resuming from epoch checkpoint");
            }
        }
        let progress = EpochUploader {
            ctx,
            inner: JobProgress::new(ctx),
            tag,
            stage: stage.clone(),
            out: &out,
            uploaded: Mutex::new(uploaded),
            error: Mutex::new(None),
        };
        let trained =
            experiment::stage_train(&spec, data, &bundle.test, attack.as_ref(), &out, &progress);
        if let Some(e) = progress.error.lock().expect("lock").take() {
            return Err(e);
        }
        let trained = core(trained)?;
        let epochs = spec.training.epochs;
        let (checkpoint, sidecar) = upload_epoch(ctx, tag, &out, epochs)?;
        for (name, r, ct) in [
            ("model.safetensors", &checkpoint, "application/octet-stream"),
            ("model.json", &sidecar, "application/json"),
        ] {
            ctx.block_on(ctx.store.record_artifact(r.to_record(
                ctx.run_id(),
                &format!("{tag}/{name}"),
                Some(ct.into()),
            )))?;
        }
        for rep in &trained.epochs {
            record_epoch(ctx, &stage, rep)?;
        }
        let m = &trained.metrics;
        let step = epochs as i64;
        let mut rows = vec![("acc", Some(m.acc)), ("asr", m.asr), ("ra", m.ra)];
        if tag == "clean" {
            rows.push((metric_names::CLEAN_ACC, Some(m.acc)));
        } else {
            rows.push((metric_names::BACKDOORED_ACC, Some(m.acc)));
            rows.push((metric_names::BACKDOORED_ASR, m.asr));
        }
        for (name, v) in rows {
            if let Some(v) = v {
                ctx.block_on(ctx.store.record_metric(ctx.run_id(), &stage, name, step, v))?;
            }
        }
        let r = TrainResult {
            tag: tag.to_string(),
            checkpoint,
            sidecar,
            metrics: trained.metrics,
            epochs: trained.epochs,
            resumed_from: trained.resumed_from,
            attempt: ctx.job.attempts,
            seconds: t.elapsed().as_secs_f64(),
        };
        Ok(serde_json::to_value(r).expect("result serializes"))
    }
}

pub fn handler() -> Arc<dyn StageHandler> {
    Arc::new(TrainHandler)
}

pub fn metrics_to_proto(m: &Metrics) -> pb::Metrics {
    pb::Metrics {
        acc: m.acc,
        asr: m.asr,
        ra: m.ra,
        per_class_acc: m.per_class_acc.clone(),
        loss: None,
    }
}

/// The gRPC service.
#[derive(Clone)]
pub struct Trainer {
    pub shared: Shared,
}

pub fn routes(shared: Shared) -> tonic::service::Routes {
    tonic::service::Routes::new(TrainerServiceServer::new(Trainer { shared }))
}

impl Trainer {
    async fn train_job(&self, req: &pb::TrainRequest) -> Result<pb::TrainResponse, Status> {
        let run_id = stage::parse_run_id("run_id", &req.run_id)?;
        let stage = match pb::ModelTag::try_from(req.tag) {
            Ok(pb::ModelTag::Clean) => stages::TRAIN_CLEAN,
            Ok(pb::ModelTag::Backdoored) => stages::TRAIN_BACKDOORED,
            _ => {
                return Err(invalid_argument(
                    "tag",
                    "must be MODEL_TAG_CLEAN or MODEL_TAG_BACKDOORED",
                ))
            }
        };
        let job = self
            .shared
            .run_stage(
                run_id,
                stage,
                serde_json::json!({ "tag": tag_of_stage(stage) }),
            )
            .await?;
        let r: TrainResult = stage::decode_result(&job)?;
        Ok(pb::TrainResponse {
            checkpoint: Some(convert::artifact_to_proto(&r.checkpoint)),
            metrics: Some(metrics_to_proto(&r.metrics)),
            epochs_done: r
                .epochs
                .last()
                .map(|e| e.epoch as u32)
                .unwrap_or(r.resumed_from as u32),
        })
    }
}

type UpdateStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::TrainUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl TrainerService for Trainer {
    async fn train(
        &self,
        req: Request<pb::TrainRequest>,
    ) -> Result<Response<pb::TrainResponse>, Status> {
        Ok(Response::new(self.train_job(req.get_ref()).await?))
    }

    type TrainStreamStream = UpdateStream;

    /// The same job; streams its final result (progress is in the run's events).
    async fn train_stream(
        &self,
        req: Request<pb::TrainRequest>,
    ) -> Result<Response<Self::TrainStreamStream>, Status> {
        let done = self.train_job(req.get_ref()).await?;
        let item = pb::TrainUpdate {
            update: Some(pb::train_update::Update::Done(done)),
        };
        Ok(Response::new(Box::pin(futures_util_stream(item))))
    }
}

fn futures_util_stream(
    item: pb::TrainUpdate,
) -> impl futures::Stream<Item = Result<pb::TrainUpdate, Status>> + Send {
    tokio_stream::once(Ok(item))
}
