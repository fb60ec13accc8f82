//! The analyzer service: the run's `analyze` stage job runs
//! [`deadbolt_core::experiment::stage_analyze`] (synthetic trigger, activation
//! statistics in the four settings, Grad-CAM) on the two trained models,
//! writes the per-channel statistics to the metadata store
//! (`put_neuron_stats`), and stores the figures (`report/...png`), the
//! synthetic trigger (`synthetic/trigger.safetensors`) and the statistics
//! (`analysis/stats.json`) as artifacts. The core computes the three
//! analyses together, so `Statistics`, `GradCam` and `ReverseEngineer` all
//! wait on that one job and each returns its part.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use deadbolt_core::analysis::stats::{Norm, Separation};
use deadbolt_core::analysis::Setting;
use deadbolt_core::experiment::{self, AnalysisOutcome};
use deadbolt_core::report::{GradcamSummary, SyntheticSummary, TriggerSource};
use deadbolt_core::spec::ExperimentSpec;
use deadbolt_poisoner::dataset::Bundle;
use deadbolt_poisoner::error::core;
use deadbolt_poisoner::progress::JobProgress;
use deadbolt_proto::v1 as pb;
use deadbolt_proto::v1::analyzer_service_server::{AnalyzerService, AnalyzerServiceServer};
use deadbolt_runtime::{convert, stage, stages, JobContext, JobError, Shared, StageHandler};
use deadbolt_store::{ArtifactRef, NeuronStat};
use deadbolt_trainer::fetch_model;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tonic::{Request, Response, Status};

/// Artifact name of the synthetic trigger.
pub const TRIGGER_ARTIFACT: &str = "synthetic/trigger.safetensors";

/// The result of the `analyze` stage job (the core's [`AnalysisOutcome`]
/// with paths relative to the report folder, plus artifact references).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AnalyzeResult {
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
    pub trigger: ArtifactRef,
    pub stats: ArtifactRef,
    /// Artifact of each figure, by relative path.
    pub figure_refs: BTreeMap<String, ArtifactRef>,
    pub seconds: f64,
}

impl AnalyzeResult {
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

/// Uploads each figure under `out` as `report/<relative path>`; returns the
/// relative paths and their references.
pub fn upload_figures(
    ctx: &JobContext,
    out: &Path,
    figures: &[PathBuf],
) -> Result<(Vec<PathBuf>, BTreeMap<String, ArtifactRef>), JobError> {
    let mut rel = Vec::new();
    let mut refs = BTreeMap::new();
    for f in figures {
        let r = f.strip_prefix(out).unwrap_or(f).to_path_buf();
        let name = r.to_string_lossy().replace('\\', "/");
        let a = ctx.put_file(&format!("report/{name}"), f, "image/png")?;
        refs.insert(name, a);
        rel.push(r);
    }
    Ok((rel, refs))
}

fn neuron_rows(a: &AnalysisOutcome) -> Vec<NeuronStat> {
    let mut rows = Vec::new();
    for (s, norms) in &a.channel_means {
        for (n, values) in norms {
            for (c, v) in values.iter().enumerate() {
                rows.push(NeuronStat {
                    layer: a.layer.clone(),
                    model: if s.backdoored_model() {
                        "backdoored"
                    } else {
                        "clean"
                    }
                    .into(),
                    input: if s.triggered_input() {
                        "triggered"
                    } else {
                        "clean"
                    }
                    .into(),
                    norm: n.as_str().into(),
                    channel: c as i32,
                    value: *v,
                });
            }
        }
    }
    rows
}

/// Runs the `analyze` stage.
pub struct AnalyzeHandler;

impl StageHandler for AnalyzeHandler {
    fn run(&self, ctx: &JobContext) -> Result<Value, JobError> {
        let t = Instant::now();
        let spec: ExperimentSpec = ctx.spec()?;
        let bundle = Bundle::fetch(ctx)?;
        let attack = bundle.attack(&spec)?;
        let (clean_dir, bd_dir) = (ctx.work_dir.join("clean"), ctx.work_dir.join("backdoored"));
        fetch_model(ctx, stages::TRAIN_CLEAN, &clean_dir)?;
        fetch_model(ctx, stages::TRAIN_BACKDOORED, &bd_dir)?;
        let out = ctx.work_dir.join("analysis");
        let a = core(experiment::stage_analyze(
            &spec,
            &clean_dir,
            &bd_dir,
            &bundle.val,
            attack.as_ref(),
            &out,
            &JobProgress::new(ctx),
        ))?;
        ctx.block_on(ctx.store.put_neuron_stats(ctx.run_id(), &neuron_rows(&a)))?;
        for (n, s) in &a.separation {
            ctx.block_on(ctx.store.record_metric(
                ctx.run_id(),
                stages::ANALYZE,
                &format!("separation_{}", n.as_str()),
                0,
                s.max_ratio,
            ))?;
        }
        let trigger = ctx.put_file(
            TRIGGER_ARTIFACT,
            &a.synthetic.trigger_file,
            "application/octet-stream",
        )?;
        let stats_json = serde_json::json!({
            "layer": a.layer,
            "channel_means": a.channel_means,
            "separation": a.separation,
        });
        let stats = ctx.put_artifact(
            "analysis/stats.json",
            Bytes::from(serde_json::to_vec_pretty(&stats_json).expect("stats serialize")),
            "application/json",
        )?;
        let (figures, figure_refs) = upload_figures(ctx, &out, &a.figures)?;
        let mut synthetic = a.synthetic.clone();
        synthetic.trigger_file = PathBuf::from(TRIGGER_ARTIFACT);
        let r = AnalyzeResult {
            layer: a.layer.clone(),
            channels: a.channels,
            stats_trigger: a.stats_trigger,
            separation: a.separation.clone(),
            channel_means: a.channel_means.clone(),
            gradcam: a.gradcam.clone(),
            synthetic,
            figures,
            timings: a.timings.clone(),
            trigger,
            stats,
            figure_refs,
            seconds: t.elapsed().as_secs_f64(),
        };
        Ok(serde_json::to_value(r).expect("result serializes"))
    }
}

pub fn handler() -> Arc<dyn StageHandler> {
    Arc::new(AnalyzeHandler)
}

/// The gRPC service.
#[derive(Clone)]
pub struct Analyzer {
    pub shared: Shared,
}

pub fn routes(shared: Shared) -> tonic::service::Routes {
    tonic::service::Routes::new(AnalyzerServiceServer::new(Analyzer { shared }))
}

fn norm_to_proto(n: Norm) -> pb::Norm {
    match n {
        Norm::L1 => pb::Norm::L1,
        Norm::L2 => pb::Norm::L2,
        Norm::Linf => pb::Norm::Linf,
        Norm::Mean => pb::Norm::Mean,
    }
}

impl Analyzer {
    async fn analysis(&self, run_id: &str) -> Result<AnalyzeResult, Status> {
        let run_id = stage::parse_run_id("run_id", run_id)?;
        let job = self
            .shared
            .run_stage(run_id, stages::ANALYZE, serde_json::json!({}))
            .await?;
        stage::decode_result(&job)
    }
}

#[tonic::async_trait]
impl AnalyzerService for Analyzer {
    async fn statistics(
        &self,
        req: Request<pb::StatisticsRequest>,
    ) -> Result<Response<pb::StatisticsResponse>, Status> {
        let a = self.analysis(&req.get_ref().run_id).await?;
        let settings = a
            .channel_means
            .iter()
            .map(|(s, norms)| {
                let get = |n: Norm, c: usize| {
                    norms.get(&n).and_then(|v| v.get(c)).copied().unwrap_or(0.0)
                };
                pb::SettingStats {
                    model: if s.backdoored_model() {
                        pb::ModelTag::Backdoored
                    } else {
                        pb::ModelTag::Clean
                    } as i32,
                    input: if s.triggered_input() {
                        pb::InputKind::Triggered
                    } else {
                        pb::InputKind::Clean
                    } as i32,
                    channels: (0..a.channels.max(0) as usize)
                        .map(|c| pb::ChannelStat {
                            channel: c as u32,
                            l1: get(Norm::L1, c),
                            l2: get(Norm::L2, c),
                            linf: get(Norm::Linf, c),
                            mean: get(Norm::Mean, c),
                        })
                        .collect(),
                }
            })
            .collect();
        let separation = a
            .separation
            .iter()
            .map(|(n, s)| pb::Separation {
                norm: norm_to_proto(*n) as i32,
                ratio: s.max_ratio,
                top_channels: vec![s.top_channel as u32],
            })
            .collect();
        Ok(Response::new(pb::StatisticsResponse {
            layer: a.layer.clone(),
            channels: a.channels.max(0) as u32,
            settings,
            separation,
            stats: Some(convert::artifact_to_proto(&a.stats)),
        }))
    }

    async fn grad_cam(
        &self,
        req: Request<pb::GradCamRequest>,
    ) -> Result<Response<pb::GradCamResponse>, Status> {
        let a = self.analysis(&req.get_ref().run_id).await?;
        let share = |s: Setting| {
            a.gradcam
                .mass_in_trigger
                .get(&s)
                .map(|m| m.mass_in_region)
                .unwrap_or(0.0)
        };
        Ok(Response::new(pb::GradCamResponse {
            heatmaps: vec![],
            clean_trigger_share: share(Setting::BackdooredModelCleanInput),
            triggered_trigger_share: share(Setting::BackdooredModelTriggeredInput),
            montage: a
                .figure_refs
                .get("gradcam.png")
                .map(convert::artifact_to_proto),
        }))
    }

    async fn reverse_engineer(
        &self,
        req: Request<pb::ReverseEngineerRequest>,
    ) -> Result<Response<pb::ReverseEngineerResponse>, Status> {
        let a = self.analysis(&req.get_ref().run_id).await?;
        let s = &a.synthetic;
        let best = pb::SyntheticTrigger {
            mask: Some(convert::artifact_to_proto(&a.trigger)),
            pattern: Some(convert::artifact_to_proto(&a.trigger)),
            target_label: s.suspect_label,
        };
        Ok(Response::new(pb::ReverseEngineerResponse {
            triggers: s
                .summary
                .labels
                .iter()
                .map(|l| pb::LabelTrigger {
                    label: l.label,
                    mask_l1: l.mask_l1,
                    anomaly_index: l.anomaly_index,
                    attack_success: l.attack_success,
                    trigger: (l.label == s.suspect_label).then(|| best.clone()),
                })
                .collect(),
            flagged_labels: s.summary.flagged_labels.clone(),
            best: Some(best),
        }))
    }
}
