//! The shared first steps of every job: load the spec's data, hold out the
//! validation split, build the attack, poison the training split, and train a
//! model with epoch checkpoints (resuming from the last one).

use std::path::Path;
use tch::Device;

use crate::data::{self, Dataset};
use crate::error::{Error, Result};
use crate::eval::{self, Metrics};
use crate::model::{CheckpointMeta, Model, ModelInfo};
use crate::optim::Optimizer;
use crate::poison::{Attack, PoisonedDataset};
use crate::progress::Progress;
use crate::spec::ExperimentSpec;
use crate::train::{self, EpochReport};

/// Data of an experiment, ready to train on.
#[derive(Debug)]
pub struct Prepared {
    /// Clean training images (validation held out).
    pub train: Dataset,
    /// The training images with the attack applied (= `train` without attack).
    pub poisoned: PoisonedDataset,
    /// Clean validation split held out from the training data.
    pub val: Dataset,
    pub test: Dataset,
    pub attack: Option<Attack>,
}

impl Prepared {
    /// Loads and splits the data of a spec and applies its attack, within
    /// the local CLI's [`data::DataLimits::default`].
    pub fn from_spec(spec: &ExperimentSpec) -> Result<Prepared> {
        Self::from_spec_with(spec, &data::DataLimits::default())
    }

    /// [`Prepared::from_spec`] with the data read within `limits`.
    pub fn from_spec_with(spec: &ExperimentSpec, limits: &data::DataLimits) -> Result<Prepared> {
        let splits = data::load_with(&spec.dataset, limits)?;
        let (train, val) = splits
            .train
            .stratified_split(spec.dataset.validation_fraction, spec.seed);
        if train.is_empty() {
            return Err(Error::EmptyDataset(
                "training split after validation hold-out".into(),
            ));
        }
        let attack = spec
            .attack
            .as_ref()
            .map(|a| Attack::for_dataset(a, &train))
            .transpose()?;
        let poisoned = match &attack {
            Some(a) => a.poison(&train)?,
            None => PoisonedDataset {
                data: train.clone(),
                poisoned: vec![],
            },
        };
        Ok(Prepared {
            train,
            poisoned,
            val,
            test: splits.test,
            attack,
        })
    }

    pub fn model_info(&self, spec: &ExperimentSpec) -> ModelInfo {
        ModelInfo {
            arch: spec.model.arch,
            classes: self.train.classes,
            input_shape: self.train.image_shape(),
        }
    }
}

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
