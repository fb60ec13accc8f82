//! An experiment's data, prepared: load the spec's data, hold out the
//! validation split, build the attack and poison the training split.

use crate::data::{self, Dataset};
use crate::error::{Error, Result};
use crate::model::ModelInfo;
use crate::poison::{Attack, PoisonedDataset};
use crate::spec::ExperimentSpec;

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
