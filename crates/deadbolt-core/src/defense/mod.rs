//! The defense layer: what a defense is made of, shared by the planted-
//! backdoor experiment ([`crate::pipeline`]) and the bring-your-own-model
//! commands ([`crate::byom`]). It builds on the base modules (data, models,
//! triggers, training, evaluation, the optimisers) and names nothing of the
//! layers above it (tests/module_graph.rs enforces it).
//!
//! - [`stats`]: per-channel activation norms and statistics in the paper's
//!   four [`Setting`]s;
//! - [`gradcam`]: Grad-CAM and the heat mass in a trigger's region;
//! - [`cleanse`]: the one trigger reverse-engineering engine (Neural
//!   Cleanse), with the experiment's and the scan's settings;
//! - [`clp`]: data-free channel Lipschitz scores;
//! - [`prune`]: the pruning criteria, sweeps over the pruning count and the
//!   operating point;
//! - [`search`]: the pruning count chosen with fine-tuning in the loop.
//!
//! The one optimiser for loose tensors (the reversed triggers) is
//! [`crate::optim::TensorAdam`], beside the training optimisers it shares
//! its update rule with.

pub mod cleanse;
pub mod clp;
pub mod gradcam;
pub mod prune;
pub mod search;
pub mod stats;

use serde::{Deserialize, Serialize};

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
    fn median_and_mad() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
        assert_eq!(mad(&[1.0, 2.0, 3.0, 4.0, 100.0]), 1.0);
    }
}
