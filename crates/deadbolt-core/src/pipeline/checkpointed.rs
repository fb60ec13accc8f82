//! Training with epoch checkpoints: a model of an experiment's spec is
//! trained with a checkpoint (weights, sidecar and optimizer state) after
//! every epoch, and an interrupted run resumes from the last one.

use std::path::Path;
use tch::Device;

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::eval::{self, Metrics};
use crate::model::{CheckpointMeta, Model, ModelInfo};
use crate::optim::Optimizer;
use crate::poison::Attack;
use crate::progress::Progress;
use crate::spec::ExperimentSpec;
use crate::train::{self, EpochReport};

/// What [`train_checkpointed`] produced.
#[derive(Debug)]
pub struct Trained {
    pub model: Model,
    pub epochs: Vec<EpochReport>,
    /// Epochs already done in the checkpoint it resumed from (0 = fresh).
    pub resumed_from: usize,
    pub metrics: Metrics,
}

/// The optimizer's state beside an epoch checkpoint (see [`crate::optim`]).
pub const OPTIMIZER_STATE: &str = "optimizer.safetensors";

/// One training job.
pub struct TrainJob<'a> {
    pub spec: &'a ExperimentSpec,
    pub info: ModelInfo,
    /// Training data (poisoned or clean).
    pub data: &'a Dataset,
    /// Clean test data for the final metrics.
    pub test: &'a Dataset,
    /// The attack whose ASR/RA the final metrics report.
    pub attack: Option<&'a Attack>,
    /// Checkpoint folder.
    pub out: &'a Path,
    pub device: Device,
    /// Continue from a checkpoint in `out` if there is one.
    pub resume: bool,
}

/// Trains a model on `job.data` with `spec.training`, saving a checkpoint in
/// `out` after every epoch (`model.safetensors` + `model.json`, and the
/// optimizer's state in `optimizer.safetensors`, removed once training is
/// done). With `resume`, an
/// existing checkpoint in `out` is continued from its epoch, exactly as the
/// uninterrupted run would have gone on.
/// Test metrics (with the attack, when given) go into the final sidecar.
pub fn train_checkpointed(job: TrainJob<'_>, progress: &dyn Progress) -> Result<Trained> {
    let TrainJob {
        spec,
        info,
        data,
        test,
        attack,
        out,
        device,
        resume,
    } = job;
    let spec_text = spec.to_toml_string();
    let (mut model, start) = match resume.then(|| existing_checkpoint(out)).flatten() {
        Some(meta) => {
            if meta.model != info {
                return Err(Error::checkpoint(
                    out,
                    format!(
                        "checkpoint is for {:?}, spec asks for {:?}",
                        meta.model, info
                    ),
                ));
            }
            let (m, meta) = Model::load(out, device)?;
            tracing::info!(dir = %out.display(), epoch = meta.epoch, "resuming from checkpoint");
            (m, meta.epoch)
        }
        None => (Model::seeded(info, device, spec.seed)?, 0),
    };
    let state = out.join(OPTIMIZER_STATE);
    let mut optimizer = None;
    if start > 0 {
        let mut opt = Optimizer::new(&model, &spec.training);
        match opt.load(&state, start) {
            Ok(()) => optimizer = Some(opt),
            // a checkpoint without (or with a stale) optimizer state still
            // resumes, with the optimizer restarted
            Err(e) => tracing::warn!(error = %e, "resuming without optimizer state"),
        }
    }
    let mut history: Vec<EpochReport> = Vec::new();
    let epochs = train::train(
        &mut model,
        data,
        &spec.training,
        spec.seed,
        train::Start {
            epoch: start,
            optimizer,
        },
        progress,
        |m, opt, report| {
            history.push(report.clone());
            opt.save(&state, report.epoch)?;
            let mut meta = CheckpointMeta::new(&m.info);
            meta.epoch = report.epoch;
            meta.metrics = serde_json::json!({ "train": history });
            meta.spec = Some(spec_text.clone());
            m.save(out, &meta)?;
            Ok(())
        },
    )?;
    let metrics = eval::evaluate(&model, test, attack)?;
    let mut meta = CheckpointMeta::new(&model.info);
    meta.epoch = spec.training.epochs;
    meta.metrics = serde_json::json!({ "train": epochs, "test": metrics });
    meta.spec = Some(spec_text);
    model.save(out, &meta)?;
    // a finished checkpoint is reused, never resumed: its optimizer state
    // has served its purpose
    if let Err(e) = std::fs::remove_file(&state) {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(Error::io(&state, e));
        }
    }
    Ok(Trained {
        model,
        epochs,
        resumed_from: start,
        metrics,
    })
}

/// The sidecar of a readable checkpoint in `dir`, if there is one.
pub fn existing_checkpoint(dir: &Path) -> Option<CheckpointMeta> {
    let text = std::fs::read(dir.join("model.json")).ok()?;
    if !dir.join("model.safetensors").is_file() {
        return None;
    }
    serde_json::from_slice(&text).ok()
}
