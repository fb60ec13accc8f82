//! Options of a scan and a repair of a model deadbolt did not train
//! (`deadbolt scan`, `deadbolt repair`, and the `[scan]` and `[repair]`
//! tables of a scan run). Here, without libtorch, so that the gateway
//! checks a submitted scan's options fully, as the stages will read them.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::Criterion;

/// CLP's default threshold, in standard deviations above the mean.
pub const DEFAULT_CLP_U: f64 = 3.0;

/// Budget and thresholds of the reverse engineering.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CleanseSpec {
    /// Optimisation steps (every label takes each one).
    pub steps: usize,
    /// Clean images used (a seeded random subset).
    pub images: usize,
    /// Images per label and step.
    pub minibatch: i64,
    /// Most stamped images per forward pass (labels are chunked to fit).
    pub max_batch: i64,
    pub lr: f64,
    /// Initial weight of the mask's L1 norm.
    pub lambda: f64,
    /// Adapt the weight per label (Neural Cleanse's schedule).
    pub adapt: bool,
    /// Success on a window at which a trigger counts as working.
    pub success_target: f64,
    pub anomaly_threshold: f64,
    /// Success a flagged label's trigger needs on all images used.
    pub min_success: f64,
    pub seed: u64,
}

impl Default for CleanseSpec {
    fn default() -> Self {
        CleanseSpec {
            steps: 300,
            images: 256,
            minibatch: 16,
            max_batch: 512,
            lr: 0.1,
            lambda: 0.01,
            adapt: true,
            success_target: 0.9,
            anomaly_threshold: 2.0,
            min_success: 0.75,
            seed: 0x4e43,
        }
    }
}

impl CleanseSpec {
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, m: &str| Err(Error::invalid(format!("cleanse.{f}"), m.to_string()));
        if self.steps == 0 {
            return bad("steps", "must be at least 1");
        }
        if self.images == 0 {
            return bad("images", "must be at least 1");
        }
        if self.minibatch < 1 || self.max_batch < 1 {
            return bad("minibatch", "minibatch and max_batch must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", "must be > 0");
        }
        if !(self.lambda >= 0.0 && self.lambda.is_finite()) {
            return bad("lambda", "must be >= 0");
        }
        for (f, v) in [
            ("success_target", self.success_target),
            ("min_success", self.min_success),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(f, "must lie in [0, 1]");
            }
        }
        if self.anomaly_threshold.is_nan() || self.anomaly_threshold <= 0.0 {
            return bad("anomaly_threshold", "must be > 0");
        }
        Ok(())
    }
}

/// What a scan does besides the defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScanOptions {
    pub cleanse: CleanseSpec,
    /// Clean images for the activation statistics (0 = all).
    pub stats_images: usize,
    /// Images whose Grad-CAM is averaged.
    pub gradcam_images: usize,
    /// CLP threshold in standard deviations.
    pub clp_u: f64,
    pub seed: u64,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            cleanse: CleanseSpec::default(),
            stats_images: 500,
            gradcam_images: 100,
            clp_u: DEFAULT_CLP_U,
            seed: 0,
        }
    }
}

/// How a repair runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RepairOptions {
    pub cleanse: CleanseSpec,
    pub criterion: Criterion,
    /// ASR the repaired model must not exceed.
    pub target_asr: f64,
    /// ACC (fraction) the repaired model may lose.
    pub max_acc_drop: f64,
    /// Share of the clean data held out for the final figures.
    pub holdout: f64,
    /// Share of the tuning part that chooses k (the rest is fine-tuned on).
    pub check_fraction: f64,
    /// Share of the fit images added again stamped with the synthetic
    /// trigger and their true labels while fine-tuning (0: clean only).
    pub unlearn_fraction: f64,
    /// Fine-tuning on the tuning part after pruning.
    pub fine_tune_epochs: usize,
    pub fine_tune_lr: f64,
    pub fine_tune_batch: usize,
    /// Tuning images for the activation statistics that rank channels (0 = all).
    pub stats_images: usize,
    /// Repair against this label's trigger instead of the suspect's.
    pub label: Option<i64>,
    /// Reverse-engineer again on the repaired model.
    pub verify: bool,
    pub seed: u64,
}

impl Default for RepairOptions {
    fn default() -> Self {
        RepairOptions {
            cleanse: CleanseSpec::default(),
            criterion: Criterion::Linf,
            target_asr: 0.05,
            max_acc_drop: 0.02,
            holdout: 0.3,
            check_fraction: 0.2,
            unlearn_fraction: 0.2,
            fine_tune_epochs: 5,
            fine_tune_lr: 0.01,
            fine_tune_batch: 32,
            stats_images: 500,
            label: None,
            verify: true,
            seed: 0,
        }
    }
}

impl ScanOptions {
    pub fn validate(&self) -> Result<()> {
        self.cleanse.validate()?;
        if !(self.clp_u > 0.0 && self.clp_u.is_finite()) {
            return Err(Error::invalid("clp_u", "must be > 0"));
        }
        Ok(())
    }
}

impl RepairOptions {
    /// Checks every value; `classes` bounds `label` (pass `i64::MAX` when
    /// the class count is not known yet).
    pub fn validate(&self, classes: i64) -> Result<()> {
        self.cleanse.validate()?;
        if !(0.0..=1.0).contains(&self.target_asr) {
            return Err(Error::invalid("target_asr", "must lie in [0, 1]"));
        }
        if !(0.0..=1.0).contains(&self.max_acc_drop) {
            return Err(Error::invalid("max_acc_drop", "must lie in [0, 1]"));
        }
        if !(self.holdout > 0.0 && self.holdout < 1.0) {
            return Err(Error::invalid(
                "holdout",
                format!("must lie strictly between 0 and 1, got {}", self.holdout),
            ));
        }
        if !(self.check_fraction > 0.0 && self.check_fraction < 1.0) {
            return Err(Error::invalid(
                "check_fraction",
                format!(
                    "must lie strictly between 0 and 1, got {}",
                    self.check_fraction
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.unlearn_fraction) {
            return Err(Error::invalid("unlearn_fraction", "must lie in [0, 1]"));
        }
        if self.fine_tune_epochs > 0 && !(self.fine_tune_lr > 0.0 && self.fine_tune_lr.is_finite())
        {
            return Err(Error::invalid("fine_tune_lr", "must be > 0"));
        }
        if self.fine_tune_batch == 0 {
            return Err(Error::invalid("fine_tune_batch", "must be at least 1"));
        }
        if let Some(l) = self.label {
            if l < 0 || l >= classes {
                return Err(Error::invalid(
                    "label",
                    format!("label {l} out of range for {classes} classes"),
                ));
            }
        }
        Ok(())
    }
}
