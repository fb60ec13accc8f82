//! The experiment report: a JSON-able [`Report`] and its Markdown rendering.
//!
//! `report.json` keys: `clean_model.{acc,asr,ra}`,
//! `backdoored_model.{acc,asr,ra}`, `separation.{l1,l2,linf,mean}`,
//! `synthetic_trigger.{flagged_labels,anomaly_index,...}`,
//! `gradcam.mass_in_trigger.<setting>`, `pruning.<criterion>.{curve,chosen,der,...}`
//! (channels ranked with the real trigger when it is known and
//! `defense.use_real_trigger`, else the synthetic one), `pruning_synthetic.<criterion>`
//! (ranked and chosen with the synthetic trigger; test figures always use
//! the real trigger when it is known), `timings` (seconds per stage) and `spec`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use crate::defense::cleanse::ReverseSummary;
use crate::defense::gradcam::RegionMass;
use crate::defense::prune::Choice;
use crate::defense::search::Candidate;
use crate::defense::stats::{Norm, Separation};
use crate::defense::Setting;
use crate::error::{Error, Result};
use crate::eval::CurvePoint;
use crate::report::Document;
use crate::spec::{Criterion, ExperimentSpec};

/// Test figures of a trained model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelFigures {
    pub acc: f64,
    pub asr: Option<f64>,
    pub ra: Option<f64>,
    pub checkpoint: PathBuf,
    pub train_seconds: f64,
}

/// Sizes of the data splits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSummary {
    pub train: i64,
    pub validation: i64,
    pub test: i64,
    pub poisoned: usize,
    pub image_shape: (i64, i64, i64),
    pub classes: i64,
}

/// Grad-CAM share of heatmap mass inside the trigger region, per setting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GradcamSummary {
    pub layer: String,
    /// `(row, col, height, width)` of the trigger region.
    pub region: (i64, i64, i64, i64),
    pub mass_in_trigger: BTreeMap<Setting, RegionMass>,
    /// The explained images of the figure (the backdoored model's, clean
    /// and triggered), one heatmap overlay each.
    #[serde(default)]
    pub heatmaps: Vec<HeatmapImage>,
}

/// One Grad-CAM heatmap: which image, what the model said, how much of the
/// heat falls on the trigger region, and the overlay PNG.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeatmapImage {
    pub setting: Setting,
    /// Index of the image in the validation split.
    pub index: i64,
    pub label: i64,
    pub predicted: i64,
    /// Share of the heat inside the trigger region (None: an all-zero map).
    pub trigger_share: Option<f64>,
    /// The overlay PNG, relative to the analysis folder.
    pub file: PathBuf,
}

/// The synthetic trigger: reverse-engineering summary and where it is saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyntheticSummary {
    #[serde(flatten)]
    pub summary: ReverseSummary,
    /// The label whose trigger is used as the synthetic trigger (the most
    /// anomalous flagged label, else the highest anomaly index).
    pub suspect_label: i64,
    /// Whether the real attack's target is among the flagged labels (when known).
    pub target_flagged: Option<bool>,
    pub trigger_file: PathBuf,
}

/// Which trigger made the triggered inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TriggerSource {
    Real,
    Synthetic,
}

impl TriggerSource {
    pub fn as_str(&self) -> &'static str {
        match self {
            TriggerSource::Real => "real",
            TriggerSource::Synthetic => "synthetic",
        }
    }
}

/// One pruning criterion end to end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CriterionReport {
    pub criterion: Criterion,
    /// The trigger that made the triggered inputs used to rank channels and
    /// to choose `k` on validation data.
    pub ranked_with: TriggerSource,
    /// The trigger of the test ASR/RA (the real one when known).
    pub evaluated_with: TriggerSource,
    /// Channels in pruning order.
    pub order: Vec<i64>,
    /// Criterion value per channel.
    pub scores: Vec<f64>,
    /// Test ACC/ASR/RA for k = 0..=C.
    pub curve: Vec<CurvePoint>,
    /// Validation ACC/ASR/RA for k = 0..=C (with the ranking trigger).
    pub validation_curve: Vec<CurvePoint>,
    /// Test figures at the chosen k.
    pub chosen: CurvePoint,
    pub choice: Choice,
    pub validation_point: CurvePoint,
    /// DER of the chosen point against k = 0 (test figures).
    pub der: f64,
    /// Smallest k whose test ASR is at or below the target (for comparing
    /// criteria; not used to choose).
    pub k_for_target_asr: Option<usize>,
    pub pruned_channels: Vec<i64>,
    pub checkpoint: Option<PathBuf>,
    /// Test figures after fine-tuning, when `defense.fine_tune_epochs > 0`.
    pub fine_tuned: Option<CurvePoint>,
    pub fine_tuned_der: Option<f64>,
    /// With `defense.fine_tune_epochs > 0`, k is chosen with the
    /// fine-tuning in the loop (as `deadbolt repair` does): every k tried,
    /// with its fine-tuned figures on the check part of the validation data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fine_tune_search: Option<FineTuneSearch>,
    pub seconds: f64,
}

/// How k was chosen with the fine-tuning in the loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FineTuneSearch {
    /// Validation images fine-tuned on (before the unlearning copies) and
    /// those that judged each k.
    pub fit_images: i64,
    pub check_images: i64,
    /// Share of the fit images added again stamped with the ranking
    /// trigger and their true labels.
    pub unlearn_fraction: f64,
    pub candidates: Vec<Candidate>,
}

/// The whole experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub name: String,
    pub device: String,
    pub layer: String,
    pub channels: i64,
    pub data: DataSummary,
    pub clean_model: ModelFigures,
    pub backdoored_model: ModelFigures,
    /// Backdoored model, triggered vs clean inputs, per norm.
    pub separation: BTreeMap<Norm, Separation>,
    /// Per setting and norm, the mean value of each channel.
    pub channel_means: BTreeMap<Setting, BTreeMap<Norm, Vec<f64>>>,
    /// The trigger behind the triggered inputs of the statistics.
    pub stats_trigger: TriggerSource,
    pub gradcam: GradcamSummary,
    pub synthetic_trigger: SyntheticSummary,
    pub pruning: BTreeMap<Criterion, CriterionReport>,
    pub pruning_synthetic: BTreeMap<Criterion, CriterionReport>,
    /// Seconds per stage.
    pub timings: BTreeMap<String, f64>,
    pub figures: Vec<PathBuf>,
    pub spec: ExperimentSpec,
}

fn pct(v: Option<f64>) -> String {
    v.map(|v| format!("{:.2}%", 100.0 * v))
        .unwrap_or_else(|| "-".into())
}

impl Report {
    pub fn from_json(text: &str) -> Result<Report> {
        serde_json::from_str(text).map_err(|e| Error::Other(format!("report.json: {e}")))
    }
}

impl Document for Report {
    const WHAT: &'static str = "an experiment report";

    /// A Markdown summary.
    fn to_markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# deadbolt experiment `{}`\n", self.name);
        let d = &self.data;
        let _ = writeln!(
            s,
            "Device {}; layer `{}` ({} channels); train {} images ({} poisoned), validation {}, test {}.\n",
            self.device, self.layer, self.channels, d.train, d.poisoned, d.validation, d.test
        );
        let _ = writeln!(
            s,
            "## Models (test set)\n\n| model | ACC | ASR | RA |\n|---|---|---|---|"
        );
        for (name, m) in [
            ("clean", &self.clean_model),
            ("backdoored", &self.backdoored_model),
        ] {
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} |",
                pct(Some(m.acc)),
                pct(m.asr),
                pct(m.ra)
            );
        }
        let _ = writeln!(
            s,
            "\n## Activation separation (backdoored model, triggered / clean channel means)\n\n| norm | max ratio | top channel | channels >= 2x | robust outliers |\n|---|---|---|---|---|"
        );
        for (n, sep) in &self.separation {
            let _ = writeln!(
                s,
                "| {} | {:.2} | {} | {} | {} |",
                n.as_str(),
                sep.max_ratio,
                sep.top_channel,
                sep.above_threshold,
                sep.outliers
            );
        }
        let _ = writeln!(
            s,
            "\n## Grad-CAM mass inside the trigger region {:?}\n\n| setting | mass | area share |\n|---|---|---|",
            self.gradcam.region
        );
        for (st, m) in &self.gradcam.mass_in_trigger {
            let _ = writeln!(
                s,
                "| {} | {:.3} | {:.3} |",
                st.label(),
                m.mass_in_region,
                m.area_share
            );
        }
        let syn = &self.synthetic_trigger;
        let _ = writeln!(
            s,
            "\n## Synthetic trigger\n\nFlagged labels: {:?} (suspect {}, {:.1} s).\n\n| label | mask L1 | attack success | anomaly index |\n|---|---|---|---|",
            syn.summary.flagged_labels, syn.suspect_label, syn.summary.seconds
        );
        for l in &syn.summary.labels {
            let _ = writeln!(
                s,
                "| {}{} | {:.1} | {} | {:.2} |",
                l.label,
                if l.flagged { " (flagged)" } else { "" },
                l.mask_l1,
                pct(Some(l.attack_success)),
                l.anomaly_index
            );
        }
        for (title, table) in [
            ("ranked with the primary trigger", &self.pruning),
            ("ranked with the synthetic trigger", &self.pruning_synthetic),
        ] {
            if table.is_empty() {
                continue;
            }
            let _ = writeln!(
                s,
                "\n## Pruning, {title} (chosen on validation, test figures)\n\n| criterion | ranked with | k | ACC | ASR | RA | DER | k for target ASR (test) | fine-tuned ACC | fine-tuned ASR | fine-tuned DER |\n|---|---|---|---|---|---|---|---|---|---|---|"
            );
            for (c, r) in table {
                let ft = r.fine_tuned.as_ref();
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {:.3} | {} | {} | {} | {} |",
                    c.as_str(),
                    r.ranked_with.as_str(),
                    r.chosen.k,
                    pct(Some(r.chosen.acc)),
                    pct(Some(r.chosen.asr)),
                    pct(Some(r.chosen.ra)),
                    r.der,
                    r.k_for_target_asr
                        .map(|k| k.to_string())
                        .unwrap_or_else(|| "-".into()),
                    pct(ft.map(|p| p.acc)),
                    pct(ft.map(|p| p.asr)),
                    r.fine_tuned_der
                        .map(|d| format!("{d:.3}"))
                        .unwrap_or_else(|| "-".into()),
                );
            }
            if table.values().any(|r| r.fine_tune_search.is_some()) {
                let _ = writeln!(
                    s,
                    "\nk was chosen with the fine-tuning in the loop: the smallest k whose pruned and fine-tuned model met the ASR target within the ACC budget on the check part of the validation data (ACC and ASR columns: pruning only at that k; fine-tuned columns: the delivered model)."
                );
            }
        }
        let _ = writeln!(s, "\n## Timings (s)\n");
        for (k, v) in &self.timings {
            let _ = writeln!(s, "- {k}: {v:.1}");
        }
        if !self.figures.is_empty() {
            let _ = writeln!(s, "\n## Figures\n");
            for f in &self.figures {
                let name = f
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default();
                let _ = writeln!(s, "![{name}]({})", f.display());
            }
        }
        s
    }
}
