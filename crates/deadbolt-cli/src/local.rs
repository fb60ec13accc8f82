//! `deadbolt scan` and `deadbolt repair`: bring your own model, locally
//! (no servers). Both take a PyTorch state_dict in safetensors, its model
//! card and a folder of clean labelled data, and write report.json,
//! report.md and figures into `--out`.

use anyhow::{Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};

use deadbolt_core::byom::repair::{self, Outcome, RepairOptions};
use deadbolt_core::byom::scan::{self, ScanOptions, Subject};
use deadbolt_core::data::folder::Split;
use deadbolt_core::defense::cleanse::CleanseSpec;
use deadbolt_core::progress::Progress;
use deadbolt_core::spec::{Criterion, DeviceSpec};

/// What scan and repair share: the model, its card, the data.
#[derive(Args, Debug, Clone)]
pub struct Inputs {
    /// The model: a PyTorch state_dict saved as safetensors.
    pub model: PathBuf,
    /// Model card (TOML or JSON: arch, input_shape, classes, mean, std).
    /// Default: <stem>.card.toml, card.toml or card.json beside the model.
    #[arg(long)]
    pub card: Option<PathBuf>,
    /// Clean labelled data: an image folder (<class>/*.png|jpg), MNIST IDX
    /// files or CIFAR-10 batches.
    #[arg(long)]
    pub data: PathBuf,
    /// For IDX/CIFAR folders: which files to use (train, test or all).
    #[arg(long, default_value = "test")]
    pub split: String,
    /// The layer to analyse and prune (default: the card's, else the
    /// architecture's last conv feature map).
    #[arg(long)]
    pub layer: Option<String>,
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// libtorch CPU threads (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Reverse-engineering steps (every label takes each one).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Clean images used to reverse-engineer the triggers.
    #[arg(long)]
    pub images: Option<usize>,
    /// Anomaly index above which a label is flagged.
    #[arg(long)]
    pub anomaly_threshold: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl Inputs {
    fn open(&self) -> Result<Subject> {
        let device = deadbolt_core::device::resolve(self.device)?;
        deadbolt_core::device::set_threads(self.threads);
        let split: Split = self.split.parse()?;
        Ok(scan::open(
            &self.model,
            self.card.as_deref(),
            &self.data,
            split,
            self.layer.as_deref(),
            device,
        )?)
    }

    fn cleanse(&self) -> CleanseSpec {
        let mut c = CleanseSpec::default();
        if let Some(s) = self.steps {
            c.steps = s;
        }
        if let Some(n) = self.images {
            c.images = n;
        }
        if let Some(t) = self.anomaly_threshold {
            c.anomaly_threshold = t;
        }
        c.seed ^= self.seed;
        c
    }
}

#[derive(Args, Debug, Clone)]
pub struct ScanArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    /// Where report.json, report.md and the figures go (default:
    /// <model stem>-scan beside the model).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct RepairArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    /// Where model.safetensors (the repaired model), card.toml, report.json,
    /// report.md and the figures go.
    #[arg(long)]
    pub out: PathBuf,
    /// Pruning criterion (linf, l1, l2, linf-diff, fine-pruning, random).
    #[arg(long, default_value = "linf")]
    pub criterion: Criterion,
    /// ASR the repaired model must not exceed (fraction).
    #[arg(long, default_value_t = 0.05)]
    pub target_asr: f64,
    /// ACC the repaired model may lose (fraction).
    #[arg(long, default_value_t = 0.02)]
    pub max_acc_drop: f64,
    /// Share of the clean data held out for the final figures.
    #[arg(long, default_value_t = 0.3)]
    pub holdout: f64,
    /// Share of the tuning part used to choose k (the rest is fine-tuned on).
    #[arg(long, default_value_t = 0.2)]
    pub check_fraction: f64,
    /// Share of the fine-tuning images added again stamped with the
    /// synthetic trigger under their true labels (0: clean images only).
    #[arg(long, default_value_t = 0.2)]
    pub unlearn: f64,
    /// Fine-tuning epochs on the tuning part after pruning.
    #[arg(long, default_value_t = 5)]
    pub fine_tune_epochs: usize,
    #[arg(long, default_value_t = 0.01)]
    pub fine_tune_lr: f64,
    /// Repair against this label's trigger instead of the suspect's.
    #[arg(long)]
    pub label: Option<i64>,
    /// Skip reverse-engineering the repaired model again.
    #[arg(long)]
    pub no_verify: bool,
}

fn default_scan_out(model: &Path) -> PathBuf {
    let stem = model
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("model");
    model
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!("{stem}-scan"))
}

pub fn scan(args: &ScanArgs, progress: &dyn Progress) -> Result<scan::ScanReport> {
    let subject = args.inputs.open()?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| default_scan_out(&args.inputs.model));
    let opts = ScanOptions {
        cleanse: args.inputs.cleanse(),
        seed: args.inputs.seed,
        ..ScanOptions::default()
    };
    let report = scan::scan(&subject, &opts, &out, progress)
        .with_context(|| format!("scanning {}", args.inputs.model.display()))?;
    eprintln!("report written to {}", out.join("report.md").display());
    Ok(report)
}

pub fn repair(args: &RepairArgs, progress: &dyn Progress) -> Result<repair::RepairReport> {
    let subject = args.inputs.open()?;
    let opts = RepairOptions {
        cleanse: args.inputs.cleanse(),
        criterion: args.criterion,
        target_asr: args.target_asr,
        max_acc_drop: args.max_acc_drop,
        holdout: args.holdout,
        check_fraction: args.check_fraction,
        unlearn_fraction: args.unlearn,
        fine_tune_epochs: args.fine_tune_epochs,
        fine_tune_lr: args.fine_tune_lr,
        label: args.label,
        verify: !args.no_verify,
        seed: args.inputs.seed,
        ..RepairOptions::default()
    };
    let report = repair::repair(&subject, &opts, &args.out, progress)
        .with_context(|| format!("repairing {}", args.inputs.model.display()))?;
    eprintln!(
        "repaired model and report written to {}",
        args.out.display()
    );
    Ok(report)
}

/// One JSON line for scripts: the verdict and its headline figures.
pub fn scan_summary(r: &scan::ScanReport) -> serde_json::Value {
    serde_json::json!({
        "verdict": r.verdict,
        "suspect_labels": r.suspect_labels,
        "analysed_label": r.analysed_label,
        "anomaly_index": r.reverse.anomaly_index,
        "clean_accuracy": r.clean_accuracy,
        "outlier_channels": r.activations.outlier_channels,
        "clp_outliers": r.clp.outliers,
        "reasons": r.reasons,
        "report": r.figures.first().and_then(|f| f.parent()).map(|d| d.join("report.md")),
    })
}

/// One JSON line for scripts: did the repair meet its budget, with what.
pub fn repair_summary(r: &repair::RepairReport) -> serde_json::Value {
    serde_json::json!({
        "met": r.met(),
        "reasons": match &r.outcome { Outcome::Met => Vec::new(), Outcome::NotMet { reasons } => reasons.clone() },
        "label": r.label,
        "label_flagged": r.label_flagged,
        "k": r.k,
        "pruned_channels": r.pruned_channels,
        "acc_before": r.original.acc.value,
        "acc_after": r.repaired.acc.value,
        "acc_after_ci": [r.repaired.acc.low, r.repaired.acc.high],
        "asr_before": r.original.asr.value,
        "asr_after": r.repaired.asr.value,
        "asr_after_ci": [r.repaired.asr.low, r.repaired.asr.high],
        "acc_drop": r.acc_drop,
        "repaired_model": r.repaired_model,
    })
}
