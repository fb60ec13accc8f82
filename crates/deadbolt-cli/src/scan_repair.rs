//! `deadbolt scan` and `deadbolt repair`: bring your own model, locally
//! (no servers). Both take a PyTorch state_dict in safetensors, its model
//! card and a folder of clean labelled data, and write report.json,
//! report.md and figures into `--out`.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

use crate::args::{Inputs, RepairArgs, ScanArgs};

use deadbolt_core::byom::repair::{self, Outcome, RepairOptions};
use deadbolt_core::byom::scan::{self, ScanOptions, Subject};
use deadbolt_core::data::folder::Split;
use deadbolt_core::defense::cleanse::CleanseSpec;
use deadbolt_core::progress::Progress;

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

fn scan(args: &ScanArgs, progress: &dyn Progress) -> Result<scan::ScanReport> {
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

fn repair(args: &RepairArgs, progress: &dyn Progress) -> Result<repair::RepairReport> {
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

/// `deadbolt scan`: prints [`scan_summary`].
pub fn scan_command(args: &ScanArgs, progress: &dyn Progress) -> Result<()> {
    print_json(&scan_summary(&scan(args, progress)?))
}

/// `deadbolt repair`: prints [`repair_summary`].
pub fn repair_command(args: &RepairArgs, progress: &dyn Progress) -> Result<()> {
    print_json(&repair_summary(&repair(args, progress)?))
}

fn print_json(v: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// One JSON line for scripts: the verdict and its headline figures.
fn scan_summary(r: &scan::ScanReport) -> serde_json::Value {
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
fn repair_summary(r: &repair::RepairReport) -> serde_json::Value {
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
