//! Analysis of a (possibly backdoored) model: per-channel activation
//! statistics in the paper's four settings ([`stats`]), Grad-CAM
//! ([`gradcam`]) and Neural Cleanse-style trigger reverse engineering
//! ([`reverse`]).

pub mod gradcam;
pub mod reverse;
pub mod stats;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::data::Dataset;

/// A seeded random subset of `n` samples in random order (all samples,
/// shuffled, when `n` is 0 or at least the set's size). Datasets are often
/// sorted by class (the MNIST IDX files are), so "the first n" would see
/// only a few classes.
pub fn shuffled_subset(ds: &Dataset, n: usize, seed: u64) -> Dataset {
    ds.select_vec(&shuffled_indices(ds, n, seed))
}

/// The indices into `ds` that [`shuffled_subset`] picks, in its order.
pub fn shuffled_indices(ds: &Dataset, n: usize, seed: u64) -> Vec<i64> {
    let mut idx: Vec<i64> = (0..ds.len()).collect();
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    if n > 0 && n < idx.len() {
        idx.truncate(n);
    }
    idx
}

/// The paper's four settings: {clean, backdoored} model x {clean, triggered} input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Setting {
    CleanModelCleanInput,
    CleanModelTriggeredInput,
    BackdooredModelCleanInput,
    BackdooredModelTriggeredInput,
}

impl Setting {
    pub const ALL: [Setting; 4] = [
        Setting::CleanModelCleanInput,
        Setting::CleanModelTriggeredInput,
        Setting::BackdooredModelCleanInput,
        Setting::BackdooredModelTriggeredInput,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Setting::CleanModelCleanInput => "clean-model-clean-input",
            Setting::CleanModelTriggeredInput => "clean-model-triggered-input",
            Setting::BackdooredModelCleanInput => "backdoored-model-clean-input",
            Setting::BackdooredModelTriggeredInput => "backdoored-model-triggered-input",
        }
    }

    /// Short human label for figures.
    pub fn label(&self) -> &'static str {
        match self {
            Setting::CleanModelCleanInput => "clean model / clean input",
            Setting::CleanModelTriggeredInput => "clean model / triggered input",
            Setting::BackdooredModelCleanInput => "backdoored model / clean input",
            Setting::BackdooredModelTriggeredInput => "backdoored model / triggered input",
        }
    }

    pub fn backdoored_model(&self) -> bool {
        matches!(
            self,
            Setting::BackdooredModelCleanInput | Setting::BackdooredModelTriggeredInput
        )
    }

    pub fn triggered_input(&self) -> bool {
        matches!(
            self,
            Setting::CleanModelTriggeredInput | Setting::BackdooredModelTriggeredInput
        )
    }
}

/// Median of a slice (NaNs sorted last); 0 for an empty slice.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Median absolute deviation from the median (unscaled).
pub fn mad(values: &[f64]) -> f64 {
    let m = median(values);
    let dev: Vec<f64> = values.iter().map(|v| (v - m).abs()).collect();
    median(&dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffled_subset_mixes_classes() {
        let y = tch::Tensor::arange(100, (tch::Kind::Int64, tch::Device::Cpu))
            .divide_scalar_mode(10, "floor");
        let x = tch::Tensor::zeros([100, 1, 2, 2], (tch::Kind::Float, tch::Device::Cpu));
        let ds = Dataset::new(x, y, 10, "sorted").unwrap();
        let s = shuffled_subset(&ds, 20, 1);
        assert_eq!(s.len(), 20);
        let mut classes = s.labels_vec();
        classes.sort();
        classes.dedup();
        assert!(classes.len() >= 6, "{classes:?}");
        assert_eq!(s.labels_vec(), shuffled_subset(&ds, 20, 1).labels_vec());
        assert_eq!(shuffled_subset(&ds, 0, 1).len(), 100);
    }

    #[test]
    fn median_and_mad() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
        assert_eq!(mad(&[1.0, 2.0, 3.0, 4.0, 100.0]), 1.0);
    }
}
