//! The training stages `train-clean` and `train-backdoored`: train with
//! [`deadbolt_core::pipeline::experiment::stage_train`] (epoch checkpoints via
//! `checkpointed::train_checkpointed`). Each epoch's checkpoint reaches the
//! stage through the typed training observer ([`Progress::epoch_saved`])
//! and is uploaded as `<tag>/epoch-<n>/model.safetensors` (+ `model.json`
//! and the optimizer's `optimizer.safetensors`) and recorded, with the
//! epoch's metrics (upserts: a retried job writes no duplicate rows). A
//! job that an earlier attempt worked on (it crashed, or was released by a
//! draining worker) downloads the latest epoch checkpoint (sha256-verified:
//! a corrupted one fails the job with a checksum error) and resumes from
//! it. The final model is recorded as
//! `<tag>/model.safetensors` + `<tag>/model.json`. `TrainerService` is the
//! thin tonic adapter.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use deadbolt_core::eval::Metrics;
use deadbolt_core::pipeline::checkpointed;
use deadbolt_core::pipeline::experiment;
use deadbolt_core::progress::Progress;
use deadbolt_core::spec::ExperimentSpec;
use deadbolt_core::train::EpochReport;
use deadbolt_proto::v1 as pb;
use deadbolt_proto::v1::trainer_service_server::{TrainerService, TrainerServiceServer};
use deadbolt_proto::validate::invalid_argument;
use deadbolt_runtime::metrics::names;
use deadbolt_runtime::{convert, stage, JobContext, JobError, Shared, Work};
use deadbolt_store::{metric_names, ArtifactRef};
use tonic::{Request, Response, Status};

use crate::contract::{ModelTag, RunOnly, TrainBackdoored, TrainClean, TrainOutput};
use crate::dataset_bundle::Bundle;
use crate::error::{core, io};
use crate::progress::JobProgress;

/// Uploads each epoch's checkpoint as soon as training saved it (the typed
/// [`Progress::epoch_saved`] event), forwarding progress.
struct EpochUploader<'a> {
    ctx: &'a JobContext,
    inner: JobProgress<'a>,
    tag: ModelTag,
    out: &'a Path,
    uploaded: Mutex<BTreeSet<usize>>,
    error: Mutex<Option<JobError>>,
    /// Set once an epoch was stored while the process drains: training
    /// stops there (the next attempt resumes from that epoch).
    stop: AtomicBool,
}

impl EpochUploader<'_> {
    fn sync(&self, report: &EpochReport) -> Result<(), JobError> {
        if !self.uploaded.lock().expect("lock").insert(report.epoch) {
            return Ok(());
        }
        // the epoch's metrics first, its sidecar last: an epoch whose
        // checkpoint is complete (what a resumed attempt starts from) has
        // its metrics recorded
        record_epoch(self.ctx, self.tag, report)?;
        upload_epoch(self.ctx, self.tag, self.out, report.epoch)?;
        // keep the last `keep_epochs` epoch checkpoints (resuming needs
        // only the latest): storage stays bounded by the model size
        let keep = self.ctx.keep_epochs().max(1);
        if report.epoch > keep {
            let old = report.epoch - keep;
            for f in [
                "model.safetensors",
                "model.json",
                checkpointed::OPTIMIZER_STATE,
            ] {
                self.ctx
                    .delete_artifact(&format!("{}/epoch-{old}/{f}", self.tag.as_str()))?;
            }
        }
        Ok(())
    }
}

impl Progress for EpochUploader<'_> {
    fn start(&self, phase: &str, total: u64) {
        self.inner.start(phase, total)
    }
    fn inc(&self, n: u64) {
        self.inner.inc(n)
    }
    fn finish(&self, message: &str) {
        self.inner.finish(message)
    }
    fn epoch_saved(&self, report: &EpochReport) {
        let stage = self.tag.kind().as_str();
        metrics::gauge!(names::TRAIN_IMAGES_PER_SECOND, "stage" => stage)
            .set(report.images_per_sec);
        metrics::histogram!(names::TRAIN_EPOCH_SECONDS, "stage" => stage).record(report.seconds);
        match self.sync(report) {
            Err(e) => {
                tracing::warn!(error = %e, epoch = report.epoch, "epoch checkpoint upload failed");
                self.error.lock().expect("lock").get_or_insert(e);
            }
            Ok(()) if self.ctx.is_draining() => {
                tracing::info!(
                    epoch = report.epoch,
                    "draining: stopping after the stored epoch"
                );
                self.stop.store(true, Ordering::SeqCst);
            }
            Ok(()) => {}
        }
    }
    fn cancelled(&self) -> bool {
        self.inner.cancelled()
            || self.stop.load(Ordering::SeqCst)
            || self.error.lock().map(|e| e.is_some()).unwrap_or(true)
    }
}

fn upload_epoch(
    ctx: &JobContext,
    tag: ModelTag,
    out: &Path,
    epoch: usize,
) -> Result<(ArtifactRef, ArtifactRef), JobError> {
    let tag = tag.as_str();
    // the optimizer's state first: an epoch whose sidecar is stored has
    // all its files
    let state = out.join(checkpointed::OPTIMIZER_STATE);
    if state.is_file() {
        ctx.put_file(
            &format!("{tag}/epoch-{epoch}/{}", checkpointed::OPTIMIZER_STATE),
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

fn record_epoch(ctx: &JobContext, tag: ModelTag, rep: &EpochReport) -> Result<(), JobError> {
    let step = rep.epoch as i64;
    let stage = tag.kind().as_str();
    ctx.record_metric(stage, "train_loss", step, rep.loss)?;
    ctx.record_metric(stage, "train_acc", step, rep.train_acc)
}

/// The latest epoch checkpoint recorded for `tag`.
struct EpochCheckpoint {
    epoch: usize,
    weights: ArtifactRef,
    sidecar: ArtifactRef,
    /// The optimizer's state, when it was stored.
    optimizer: Option<ArtifactRef>,
}

fn latest_epoch(ctx: &JobContext, tag: ModelTag) -> Result<Option<EpochCheckpoint>, JobError> {
    let recs = ctx.block_on(ctx.store.list_artifacts(ctx.run_id()))?;
    let prefix = format!("{}/epoch-", tag.as_str());
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
    let opt_name = format!("{prefix}{n}/{}", checkpointed::OPTIMIZER_STATE);
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

/// The work of both training stages.
pub struct TrainWork;

impl Work<TrainClean> for TrainWork {
    fn run(&self, ctx: &JobContext, _input: RunOnly) -> Result<TrainOutput, JobError> {
        train(ctx, ModelTag::Clean)
    }
}

impl Work<TrainBackdoored> for TrainWork {
    fn run(&self, ctx: &JobContext, _input: RunOnly) -> Result<TrainOutput, JobError> {
        train(ctx, ModelTag::Backdoored)
    }
}

fn train(ctx: &JobContext, tag: ModelTag) -> Result<TrainOutput, JobError> {
    let t = Instant::now();
    let stage = tag.kind().as_str();
    let spec: ExperimentSpec = ctx.experiment_spec()?;
    let bundle = Bundle::fetch(ctx)?;
    let attack = bundle.attack(&spec)?;
    let data = match tag {
        ModelTag::Clean => &bundle.train,
        ModelTag::Backdoored => &bundle.poisoned,
    };
    let out = ctx.work_dir.join(tag.as_str());
    std::fs::create_dir_all(&out).map_err(|e| io(out.display(), e))?;
    let mut uploaded = BTreeSet::new();
    // an earlier attempt (crashed, or released by a drain, which does not
    // count as an attempt) may have stored epochs: resume from the latest
    if let Some(c) = latest_epoch(ctx, tag)? {
        let epoch = c.epoch;
        ctx.download(&c.weights, &out.join("model.safetensors"))?;
        ctx.download(&c.sidecar, &out.join("model.json"))?;
        if let Some(o) = &c.optimizer {
            ctx.download(o, &out.join(checkpointed::OPTIMIZER_STATE))?;
        }
        uploaded.insert(epoch);
        tracing::info!(run_id = %ctx.run_id(), tag = tag.as_str(), epoch, attempt = ctx.job.attempts, "resuming from epoch checkpoint");
    }
    let progress = EpochUploader {
        ctx,
        inner: JobProgress::new(ctx),
        tag,
        out: &out,
        uploaded: Mutex::new(uploaded),
        error: Mutex::new(None),
        stop: AtomicBool::new(false),
    };
    // `training.threads` applies to this job only: the process's libtorch
    // thread count is put back afterwards, so one spec cannot slow every
    // later job of this trainer
    let threads = tch::get_num_threads();
    let trained =
        experiment::stage_train(&spec, data, &bundle.test, attack.as_ref(), &out, &progress);
    tch::set_num_threads(threads);
    if let Some(e) = progress.error.lock().expect("lock").take() {
        return Err(e);
    }
    let trained = core(trained)?;
    let epochs = spec.training.epochs;
    // the final checkpoint: the last epoch's weights with the test figures
    // in its sidecar
    let (checkpoint, sidecar) = upload_epoch(ctx, tag, &out, epochs)?;
    for (name, r, ct) in [
        ("model.safetensors", &checkpoint, "application/octet-stream"),
        ("model.json", &sidecar, "application/json"),
    ] {
        ctx.record_artifact(r.to_record(
            ctx.run_id(),
            &format!("{}/{name}", tag.as_str()),
            Some(ct.into()),
        ))?;
    }
    for rep in &trained.epochs {
        record_epoch(ctx, tag, rep)?;
    }
    let m = &trained.metrics;
    let step = epochs as i64;
    let mut rows = vec![("acc", Some(m.acc)), ("asr", m.asr), ("ra", m.ra)];
    match tag {
        ModelTag::Clean => rows.push((metric_names::CLEAN_ACC, Some(m.acc))),
        ModelTag::Backdoored => {
            rows.push((metric_names::BACKDOORED_ACC, Some(m.acc)));
            rows.push((metric_names::BACKDOORED_ASR, m.asr));
        }
    }
    for (name, v) in rows {
        if let Some(v) = v {
            ctx.record_metric(stage, name, step, v)?;
        }
    }
    Ok(TrainOutput {
        tag,
        checkpoint,
        sidecar,
        metrics: trained.metrics,
        epochs: trained.epochs,
        resumed_from: trained.resumed_from,
        attempt: ctx.job.attempts,
        seconds: t.elapsed().as_secs_f64(),
    })
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

/// `TrainerService`: the training stages over gRPC.
#[derive(Clone)]
pub struct Trainer {
    pub shared: Shared,
}

pub fn routes(shared: Shared) -> tonic::service::Routes {
    tonic::service::Routes::new(
        TrainerServiceServer::new(Trainer { shared })
            .max_decoding_message_size(deadbolt_runtime::server::MAX_REQUEST_BYTES)
            .max_encoding_message_size(deadbolt_runtime::server::MAX_RESPONSE_BYTES),
    )
}

#[tonic::async_trait]
impl TrainerService for Trainer {
    async fn train(
        &self,
        req: Request<pb::TrainRequest>,
    ) -> Result<Response<pb::TrainResponse>, Status> {
        let req = req.into_inner();
        let run_id = stage::parse_run_id("run_id", &req.run_id)?;
        let r = match pb::ModelTag::try_from(req.tag) {
            Ok(pb::ModelTag::Clean) => {
                self.shared
                    .run_stage::<TrainClean>(run_id, RunOnly {})
                    .await?
            }
            Ok(pb::ModelTag::Backdoored) => {
                self.shared
                    .run_stage::<TrainBackdoored>(run_id, RunOnly {})
                    .await?
            }
            _ => {
                return Err(invalid_argument(
                    "tag",
                    "must be MODEL_TAG_CLEAN or MODEL_TAG_BACKDOORED",
                ))
            }
        };
        Ok(Response::new(pb::TrainResponse {
            checkpoint: Some(convert::artifact_to_proto(&r.checkpoint)),
            metrics: Some(metrics_to_proto(&r.metrics)),
            epochs_done: r
                .epochs
                .last()
                .map(|e| e.epoch as u32)
                .unwrap_or(r.resumed_from as u32),
            resumed_from: r.resumed_from as u32,
            attempt: r.attempt.max(0) as u32,
        }))
    }
}
