//! The dataset artifact: the prepared splits of a run in one safetensors
//! file (float32 images exactly as the core holds them, so every stage sees
//! bit-identical data to an in-process run).

use std::path::Path;

use deadbolt_core::data::Dataset;
use deadbolt_core::poison::Attack;
use deadbolt_core::spec::ExperimentSpec;
use deadbolt_core::workflow::Prepared;
use deadbolt_runtime::{JobContext, JobError};
use tch::{Kind, Tensor};

use crate::contract::Data;
use crate::error::{core, io};

/// The splits of a run.
#[derive(Debug)]
pub struct Bundle {
    /// Clean training split (validation held out).
    pub train: Dataset,
    /// The training split with the attack applied.
    pub poisoned: Dataset,
    pub poisoned_indices: Vec<i64>,
    pub val: Dataset,
    pub test: Dataset,
}

const SPLITS: [&str; 4] = ["train", "poisoned", "val", "test"];

impl Bundle {
    pub fn from_prepared(p: &Prepared) -> Bundle {
        Bundle {
            train: p.train.clone(),
            poisoned: p.poisoned.data.clone(),
            poisoned_indices: p.poisoned.poisoned.clone(),
            val: p.val.clone(),
            test: p.test.clone(),
        }
    }

    fn split(&self, name: &str) -> &Dataset {
        match name {
            "train" => &self.train,
            "poisoned" => &self.poisoned,
            "val" => &self.val,
            _ => &self.test,
        }
    }

    pub fn write(&self, path: &Path) -> Result<(), JobError> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for s in SPLITS {
            let d = self.split(s);
            tensors.push((
                format!("{s}.images"),
                d.images.to_kind(Kind::Float).contiguous(),
            ));
            tensors.push((
                format!("{s}.labels"),
                d.labels.to_kind(Kind::Int64).contiguous(),
            ));
        }
        tensors.push(("classes".into(), Tensor::from_slice(&[self.train.classes])));
        tensors.push((
            "poisoned_indices".into(),
            Tensor::from_slice(&self.poisoned_indices),
        ));
        Tensor::write_safetensors(&tensors, path).map_err(|e| io(path.display(), e))
    }

    pub fn read(path: &Path) -> Result<Bundle, JobError> {
        let mut map: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(path)
            .map_err(|e| io(path.display(), e))?
            .into_iter()
            .collect();
        let mut take = |k: &str| {
            map.remove(k).ok_or_else(|| {
                JobError::permanent(tonic::Code::DataLoss, format!("dataset artifact lacks {k}"))
            })
        };
        let classes = take("classes")?.int64_value(&[0]);
        let poisoned_indices = Vec::<i64>::try_from(&take("poisoned_indices")?)
            .map_err(|e| io("poisoned_indices", e))?;
        let mut ds = Vec::new();
        for s in SPLITS {
            let images = take(&format!("{s}.images"))?;
            let labels = take(&format!("{s}.labels"))?;
            ds.push(core(Dataset::new(images, labels, classes, s))?);
        }
        let mut it = ds.into_iter();
        let mut next = || it.next().expect("four splits");
        Ok(Bundle {
            train: next(),
            poisoned: next(),
            val: next(),
            test: next(),
            poisoned_indices,
        })
    }

    /// The run's attack, rebuilt from the spec for the clean training split
    /// (as [`Prepared::from_spec`] builds it).
    pub fn attack(&self, spec: &ExperimentSpec) -> Result<Option<Attack>, JobError> {
        core(
            spec.attack
                .as_ref()
                .map(|a| Attack::for_dataset(a, &self.train))
                .transpose(),
        )
    }

    /// Downloads (sha256-verified) and reads the dataset of the run's data stage.
    pub fn fetch(ctx: &JobContext) -> Result<Bundle, JobError> {
        let data = ctx.output::<Data>()?;
        let path = ctx.work_dir.join("dataset.safetensors");
        ctx.download(&data.dataset, &path)?;
        Bundle::read(&path)
    }
}
