//! The typed contracts of the stages: each stage's name, input and output,
//! bound at compile time (see [`deadbolt_runtime::Stage`]). Stages read
//! each other's outputs only through these types, never through another
//! stage's module.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use deadbolt_core::defense::stats::{Norm, Separation};
use deadbolt_core::defense::Setting;
use deadbolt_core::eval::Metrics;
use deadbolt_core::pipeline::experiment::{AnalysisOutcome, TrainOutcome};
use deadbolt_core::pipeline::report::{
    CriterionReport, DataSummary, GradcamSummary, SyntheticSummary, TriggerSource,
};
use deadbolt_core::train::EpochReport;
use deadbolt_runtime::{Stage, StageKind};
use deadbolt_store::ArtifactRef;
use serde::{Deserialize, Serialize};

/// The input of a stage that needs nothing but its run (the run's spec is
/// read from the store): the job payload `{}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunOnly {}

/// `data`: load the base data, hold out validation, poison.
pub struct Data;
impl Stage for Data {
    const KIND: StageKind = StageKind::Data;
    type Input = RunOnly;
    type Output = DataOutput;
}

/// `train-clean`: the clean baseline model.
pub struct TrainClean;
impl Stage for TrainClean {
    const KIND: StageKind = StageKind::TrainClean;
    type Input = RunOnly;
    type Output = TrainOutput;
}

/// `train-backdoored`: the model trained on the poisoned split.
pub struct TrainBackdoored;
impl Stage for TrainBackdoored {
    const KIND: StageKind = StageKind::TrainBackdoored;
    type Input = RunOnly;
    type Output = TrainOutput;
}

/// `analyze`: synthetic trigger, activation statistics, Grad-CAM.
pub struct Analyze;
impl Stage for Analyze {
    const KIND: StageKind = StageKind::Analyze;
    type Input = RunOnly;
    type Output = AnalyzeOutput;
}

/// `prune`: every criterion's sweep and pruned model, then the report.
pub struct Prune;
impl Stage for Prune {
    const KIND: StageKind = StageKind::Prune;
    type Input = RunOnly;
    type Output = PruneOutput;
}

/// `scan`: a model a team brought, its verdict (bring your own model).
pub struct Scan;
impl Stage for Scan {
    const KIND: StageKind = StageKind::Scan;
    type Input = RunOnly;
    type Output = ScanOutput;
}

/// `repair`: the scanned model pruned and fine-tuned to the ASR target.
pub struct Repair;
impl Stage for Repair {
    const KIND: StageKind = StageKind::Repair;
    type Input = RunOnly;
    type Output = RepairOutput;
}

/// The output of `data`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataOutput {
    /// The splits (see [`crate::dataset_bundle::Bundle`]).
    pub dataset: ArtifactRef,
    pub poisoned_indices: ArtifactRef,
    pub poisoned_count: u64,
    pub summary: DataSummary,
    pub seconds: f64,
}

/// Which model a training stage trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelTag {
    Clean,
    Backdoored,
}

impl ModelTag {
    pub fn as_str(&self) -> &'static str {
        match self {
            ModelTag::Clean => "clean",
            ModelTag::Backdoored => "backdoored",
        }
    }
    pub fn kind(&self) -> StageKind {
        match self {
            ModelTag::Clean => StageKind::TrainClean,
            ModelTag::Backdoored => StageKind::TrainBackdoored,
        }
    }
}

/// The output of `train-clean` and `train-backdoored`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOutput {
    pub tag: ModelTag,
    pub checkpoint: ArtifactRef,
    pub sidecar: ArtifactRef,
    /// Test figures of the final model.
    pub metrics: Metrics,
    /// Epochs trained by the attempt that finished the job.
    pub epochs: Vec<EpochReport>,
    /// Epoch of the checkpoint the finishing attempt resumed from (0 = fresh).
    pub resumed_from: usize,
    /// The attempt (lease) that finished the job.
    pub attempt: i32,
    pub seconds: f64,
}

impl TrainOutput {
    /// The core's view of it (checkpoint = the local folder it was fetched to).
    pub fn outcome(&self, checkpoint: &Path) -> TrainOutcome {
        TrainOutcome {
            checkpoint: checkpoint.to_path_buf(),
            metrics: self.metrics.clone(),
            epochs: self.epochs.clone(),
            resumed_from: self.resumed_from,
            seconds: self.seconds,
        }
    }
}

/// The synthetic trigger of the suspect label, stored three ways.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TriggerArtifacts {
    /// Mask and pattern together (what the prune stage loads).
    pub trigger: ArtifactRef,
    /// The mask alone (`[1, H, W]`, safetensors tensor `mask`).
    pub mask: ArtifactRef,
    /// The pattern alone (`[C, H, W]`, safetensors tensor `pattern`).
    pub pattern: ArtifactRef,
}

/// The output of `analyze` (the core's [`AnalysisOutcome`] with paths
/// relative to the report folder, plus artifact references).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AnalyzeOutput {
    pub layer: String,
    pub channels: i64,
    pub stats_trigger: TriggerSource,
    pub separation: BTreeMap<Norm, Separation>,
    pub channel_means: BTreeMap<Setting, BTreeMap<Norm, Vec<f64>>>,
    pub gradcam: GradcamSummary,
    pub synthetic: SyntheticSummary,
    /// Figures, relative to the report folder.
    pub figures: Vec<PathBuf>,
    pub timings: BTreeMap<String, f64>,
    pub trigger: TriggerArtifacts,
    pub stats: ArtifactRef,
    /// Artifact of each figure and heatmap, by relative path.
    pub figure_refs: BTreeMap<String, ArtifactRef>,
    pub seconds: f64,
}

impl AnalyzeOutput {
    pub fn outcome(&self) -> AnalysisOutcome {
        AnalysisOutcome {
            layer: self.layer.clone(),
            channels: self.channels,
            stats_trigger: self.stats_trigger,
            separation: self.separation.clone(),
            channel_means: self.channel_means.clone(),
            gradcam: self.gradcam.clone(),
            synthetic: self.synthetic.clone(),
            figures: self.figures.clone(),
            timings: self.timings.clone(),
        }
    }
}

/// The output of `prune`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PruneOutput {
    pub pruning: BTreeMap<deadbolt_core::spec::Criterion, CriterionReport>,
    pub pruning_synthetic: BTreeMap<deadbolt_core::spec::Criterion, CriterionReport>,
    /// Pruned checkpoints by relative folder (`pruned/linf`).
    pub checkpoints: BTreeMap<String, ArtifactRef>,
    pub report_json: ArtifactRef,
    pub report_md: ArtifactRef,
    pub seconds: f64,
}

/// The output of `scan`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScanOutput {
    pub verdict: deadbolt_core::byom::scan::Verdict,
    pub reasons: Vec<String>,
    /// The analysed label (the top flagged one, else the most anomalous).
    pub suspect_label: i64,
    /// Its anomaly index.
    pub anomaly_index: f64,
    pub flagged_labels: Vec<i64>,
    pub clean_acc: f64,
    pub outlier_channels: Vec<i64>,
    /// Every file the scan wrote (report, figures, synthetic trigger), by
    /// artifact name (`scan/<file>`).
    pub files: BTreeMap<String, ArtifactRef>,
    pub seconds: f64,
}

/// The output of `repair`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepairOutput {
    pub met: bool,
    /// Why the budget was not met (empty when it was).
    pub reasons: Vec<String>,
    pub label: i64,
    pub k: usize,
    pub pruned_channels: Vec<i64>,
    /// On the held-out part: the original and the repaired model.
    pub original: deadbolt_core::byom::repair::HeldOutFigures,
    pub repaired: deadbolt_core::byom::repair::HeldOutFigures,
    /// Every file the repair wrote (model, card, report, figures), by
    /// artifact name (`repair/<file>`).
    pub files: BTreeMap<String, ArtifactRef>,
    pub seconds: f64,
}

impl RepairOutput {
    pub const MODEL: &'static str = "repair/model.safetensors";
    pub const CARD: &'static str = "repair/card.toml";
    pub const REPORT: &'static str = "repair/report.json";
}

impl ScanOutput {
    pub const REPORT: &'static str = "scan/report.json";
    pub const REPORT_MD: &'static str = "scan/report.md";

    /// The run's `scan_results` row as the scan leaves it (no repair
    /// figures yet); the repair stage fills those in on top of it.
    pub fn row(&self, model: &str) -> deadbolt_store::ScanResult {
        deadbolt_store::ScanResult {
            model: model.to_string(),
            verdict: self.verdict.as_str().to_string(),
            suspect_label: Some(self.suspect_label),
            anomaly_index: self.anomaly_index.is_finite().then_some(self.anomaly_index),
            clean_acc: self.clean_acc,
            repaired: false,
            acc_before: None,
            asr_before: None,
            acc_after: None,
            asr_after: None,
            pruned_channels: None,
            met: None,
        }
    }
}
