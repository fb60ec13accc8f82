//! The dataset artifact: the prepared splits of a run in one safetensors
//! file. Images whose every pixel is a byte over 255 (MNIST, CIFAR-10,
//! patch triggers) travel as uint8 (`<split>.images_u8`, a quarter of the
//! bytes) and are decoded as the core decodes them, `u8 as f32 / 255`; an
//! encoding is used only when decoding it gives back the float32 tensor
//! bit for bit (checked on write), else the split travels as float32
//! (`<split>.images`: e.g. a blended trigger). Either way every stage sees
//! bit-identical data to an in-process run.
//!
//! A process keeps the last bundle it fetched, decoded, by its sha256 (see
//! [`Bundle::fetch`]), and the one its data stage stored when it also runs
//! a stage that reads it ([`keep_written`]): the stages of one run that
//! share a process (the trainer's two trainings; every stage of `deadbolt
//! experiment`) download, verify and decode it once, as the direct pipeline
//! does.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use deadbolt_core::data::Dataset;
use deadbolt_core::pipeline::prepare::Prepared;
use deadbolt_core::poison::Attack;
use deadbolt_core::spec::ExperimentSpec;
use deadbolt_runtime::{JobContext, JobError};
use tch::{Kind, Tensor};

use crate::contract::Data;
use crate::error::{core, io};

/// Images per slice that [`as_bytes`] checks at a time: its float scratch
/// (3 MB for MNIST, 12 MB for CIFAR-10) is reused from slice to slice, where
/// one scratch of the dataset's size would cost its pages faulted in.
const CHECK_IMAGES: i64 = 1024;

/// `x` (float32, contiguous) as uint8 when `from_bytes` of that gives `x`
/// back bit for bit (its decoding is then `x` itself).
fn as_bytes(x: &Tensor) -> Result<Option<Tensor>, tch::TchError> {
    let Some(&n) = x.size().first() else {
        return Ok(None);
    };
    if x.numel() == 0 {
        return Ok(None);
    }
    let u = Tensor::f_empty(x.size(), (Kind::Uint8, x.device()))?;
    let mut start = 0;
    while start < n {
        let len = CHECK_IMAGES.min(n - start);
        let xs = x.f_narrow(0, start, len)?;
        let mut back = xs.f_mul_scalar(255.0)?;
        let _ = back.f_round_()?;
        let _ = back.f_clamp_(0.0, 255.0)?;
        let us = back.f_to_kind(Kind::Uint8)?;
        // the decoding of those bytes, as `from_bytes` computes it
        back.f_copy_(&us)?;
        let _ = back.f_div_scalar_(255.0)?;
        if !back.f_equal(&xs)? {
            return Ok(None);
        }
        u.f_narrow(0, start, len)?.f_copy_(&us)?;
        start += len;
    }
    Ok(Some(u))
}

/// The core's decoding of image bytes (`data::idx`, `data::cifar`): the
/// byte as a float, divided by 255 (in place: one buffer).
fn from_bytes(u: &Tensor) -> Result<Tensor, tch::TchError> {
    let mut f = u.f_to_kind(Kind::Float)?;
    let _ = f.f_div_scalar_(255.0)?;
    Ok(f)
}

/// The largest bundle (decoded images, in bytes) that a process keeps for
/// its next stage: every dataset deadbolt ships (CIFAR-10 whole, poisoned
/// copy included, is 1.4 GB), not an unbounded store.
const KEEP_BYTES: i64 = 2 << 30;

/// The last bundle fetched (or stored, see [`keep_written`]), by the
/// sha256 of its artifact.
static LAST: Mutex<Option<(String, Bundle)>> = Mutex::new(None);

fn last() -> std::sync::MutexGuard<'static, Option<(String, Bundle)>> {
    LAST.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether the data stage keeps the bundle it stored (see [`keep_written`]).
static KEEP_WRITTEN: AtomicBool = AtomicBool::new(false);

/// Set when a process runs the data stage beside a stage that reads the
/// dataset (`deadbolt experiment`; a `serve` of the poisoner with the
/// trainer): the data stage then keeps the bundle it stored, so the next
/// stage does not download and decode it again. A poisoner alone keeps
/// nothing (it would hold a dataset that it never reads).
pub fn keep_written(on: bool) {
    KEEP_WRITTEN.store(on, Ordering::Relaxed);
}

/// The splits of a run.
#[derive(Debug, Clone)]
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

    /// Writes the splits to `path`; returns them as [`Bundle::read`] will
    /// read them back (the same tensors, bit for bit, kind and layout).
    pub fn write(&self, path: &Path) -> Result<Bundle, JobError> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        let mut read = Vec::new();
        for s in SPLITS {
            let d = self.split(s);
            let images = d.images.to_kind(Kind::Float).contiguous();
            match as_bytes(&images).map_err(|e| io(format!("encoding {s}.images"), e))? {
                Some(u8s) => tensors.push((format!("{s}.images_u8"), u8s)),
                None => tensors.push((format!("{s}.images"), images.shallow_clone())),
            }
            let labels = d.labels.to_kind(Kind::Int64).contiguous();
            tensors.push((format!("{s}.labels"), labels.shallow_clone()));
            read.push(core(Dataset::new(images, labels, self.train.classes, s))?);
        }
        tensors.push(("classes".into(), Tensor::from_slice(&[self.train.classes])));
        tensors.push((
            "poisoned_indices".into(),
            Tensor::from_slice(&self.poisoned_indices),
        ));
        Tensor::write_safetensors(&tensors, path).map_err(|e| io(path.display(), e))?;
        Ok(Bundle::from_splits(read, self.poisoned_indices.clone()))
    }

    /// The bundle of the four splits, in [`SPLITS`] order.
    fn from_splits(splits: Vec<Dataset>, poisoned_indices: Vec<i64>) -> Bundle {
        let [train, poisoned, val, test]: [Dataset; 4] =
            splits.try_into().expect("one dataset per split");
        Bundle {
            train,
            poisoned,
            val,
            test,
            poisoned_indices,
        }
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
            let images = match take(&format!("{s}.images_u8")) {
                Ok(u8s) => {
                    from_bytes(&u8s).map_err(|e| io(format!("decoding {s}.images_u8"), e))?
                }
                Err(_) => take(&format!("{s}.images"))?,
            };
            let labels = take(&format!("{s}.labels"))?;
            ds.push(core(Dataset::new(images, labels, classes, s))?);
        }
        Ok(Bundle::from_splits(ds, poisoned_indices))
    }

    /// Bytes written by [`Bundle::write`] for these splits (for tests and
    /// benchmarks).
    pub fn encoded_bytes(&self) -> usize {
        SPLITS
            .iter()
            .map(|s| {
                let i = &self.split(s).images;
                let n = i.numel();
                if matches!(as_bytes(&i.to_kind(Kind::Float).contiguous()), Ok(Some(_))) {
                    n
                } else {
                    4 * n
                }
            })
            .sum()
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

    /// Downloads (sha256-verified) and reads the dataset of the run's data
    /// stage, or takes the one this process fetched last when its artifact
    /// has the same sha256: the same bytes, decoded once. The tensors are
    /// shared (shallow copies), which is safe because no stage changes a
    /// dataset in place (the direct pipeline shares them the same way).
    pub fn fetch(ctx: &JobContext) -> Result<Bundle, JobError> {
        let data = ctx.output::<Data>()?;
        let sha = &data.dataset.sha256;
        if let Some((_, b)) = last().as_ref().filter(|(k, _)| k == sha) {
            tracing::debug!(sha256 = %sha, "dataset from this process's last fetch");
            return Ok(b.clone());
        }
        let path = ctx.work_dir.join("dataset.safetensors");
        ctx.download(&data.dataset, &path)?;
        let b = Bundle::read(&path)?;
        b.remember(sha);
        Ok(b)
    }

    /// Keeps this bundle as the process's last one, the content of the
    /// artifact with `sha256` (replacing the one kept before: one run's
    /// dataset at a time, and none larger than [`KEEP_BYTES`]).
    fn remember(&self, sha256: &str) {
        let bytes: i64 = SPLITS
            .iter()
            .map(|s| self.split(s).images.numel() as i64 * 4)
            .sum();
        *last() = (bytes <= KEEP_BYTES).then(|| (sha256.to_string(), self.clone()));
    }

    /// Writes the splits to `path` and stores them as the run's dataset
    /// artifact `name`. When this process also runs a stage that reads the
    /// dataset ([`keep_written`]), the bundle is kept for it, as it will
    /// read it back.
    pub fn store(
        &self,
        ctx: &JobContext,
        path: &Path,
        name: &str,
    ) -> Result<deadbolt_store::ArtifactRef, JobError> {
        let as_read = self.write(path)?;
        let r = ctx.put_file(name, path, "application/octet-stream")?;
        if KEEP_WRITTEN.load(Ordering::Relaxed) {
            as_read.remember(&r.sha256);
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds(images: Tensor) -> Dataset {
        let n = images.size()[0];
        Dataset::new(
            images,
            Tensor::arange(n, (Kind::Int64, tch::Device::Cpu)).remainder(10),
            10,
            "t",
        )
        .unwrap()
    }

    #[test]
    fn byte_images_travel_as_bytes_and_come_back_bit_for_bit() {
        let bytes = (Tensor::rand([6, 1, 5, 5], (Kind::Float, tch::Device::Cpu)) * 255.0)
            .round()
            .to_kind(Kind::Uint8);
        let clean = from_bytes(&bytes).unwrap();
        // a blend: values that are not bytes over 255
        let blended = &clean * 0.8 + 0.2 * 0.3137;
        let b = Bundle {
            train: ds(clean.shallow_clone()),
            poisoned: ds(blended.shallow_clone()),
            poisoned_indices: vec![1, 4],
            val: ds(clean.narrow(0, 0, 2)),
            test: ds(clean.narrow(0, 2, 4)),
        };
        assert_eq!(b.encoded_bytes(), 150 + 4 * 150 + 50 + 100);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.safetensors");
        let as_read = b.write(&p).unwrap();
        let names: Vec<String> = Tensor::read_safetensors(&p)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(names.contains(&"train.images_u8".to_string()), "{names:?}");
        assert!(names.contains(&"poisoned.images".to_string()), "{names:?}");
        let r = Bundle::read(&p).unwrap();
        for (a, b) in [
            (&r.train, &b.train),
            (&r.poisoned, &b.poisoned),
            (&r.val, &b.val),
            (&r.test, &b.test),
        ] {
            assert!(a.images.equal(&b.images), "images differ");
            assert!(a.labels.equal(&b.labels));
        }
        assert_eq!(r.poisoned_indices, vec![1, 4]);
        // what the writer keeps is what a reader reads: values, kind,
        // shape and layout
        for (a, k) in [
            (&r.train, &as_read.train),
            (&r.poisoned, &as_read.poisoned),
            (&r.val, &as_read.val),
            (&r.test, &as_read.test),
        ] {
            for (x, y) in [(&a.images, &k.images), (&a.labels, &k.labels)] {
                assert!(x.equal(y));
                assert_eq!(x.kind(), y.kind());
                assert_eq!(x.size(), y.size());
                assert_eq!(x.stride(), y.stride());
            }
            assert_eq!(a.classes, k.classes);
        }
        assert_eq!(as_read.poisoned_indices, r.poisoned_indices);
    }
}
