//! The `analyze` stage: [`deadbolt_core::pipeline::experiment::stage_analyze`]
//! (synthetic trigger, activation statistics in the four settings,
//! Grad-CAM) on the two trained models. Writes the per-channel statistics
//! to the metadata store (`put_neuron_stats`) and stores the figures and
//! Grad-CAM heatmaps (`report/...png`), the synthetic trigger
//! (`synthetic/trigger.safetensors`, and its mask and pattern apart) and
//! the statistics (`analysis/stats.json`) as artifacts. The core computes
//! the three analyses together, so `Statistics`, `GradCam` and
//! `ReverseEngineer` of `AnalyzerService` (the thin tonic adapter) all wait
//! on that one job and each returns its part.

use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;
use deadbolt_core::defense::cleanse;
use deadbolt_core::defense::stats::Norm;
use deadbolt_core::defense::Setting;
use deadbolt_core::pipeline::experiment::{self, AnalysisOutcome};
use deadbolt_core::spec::ExperimentSpec;
use deadbolt_proto::v1 as pb;
use deadbolt_proto::v1::analyzer_service_server::{AnalyzerService, AnalyzerServiceServer};
use deadbolt_runtime::{convert, stage, JobContext, JobError, Shared, Stage, Work};
use deadbolt_store::NeuronStat;
use tonic::{Request, Response, Status};

use crate::contract::{
    Analyze, AnalyzeOutput, RunOnly, Scan, ScanOutput, TrainBackdoored, TrainClean,
    TriggerArtifacts,
};
use crate::dataset_bundle::Bundle;
use crate::error::{core, io};
use crate::job_files::{fetch_model, upload_figures};
use crate::progress::JobProgress;

/// Artifact name of the synthetic trigger (mask and pattern).
pub const TRIGGER_ARTIFACT: &str = "synthetic/trigger.safetensors";

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

/// Stores the trigger file, and its mask and its pattern each alone.
fn store_trigger(ctx: &JobContext, file: &std::path::Path) -> Result<TriggerArtifacts, JobError> {
    let trigger = ctx.put_file(TRIGGER_ARTIFACT, file, "application/octet-stream")?;
    let t = core(cleanse::load_trigger(file))?;
    let part = |name: &str, tensor: &tch::Tensor| {
        let path = ctx.work_dir.join(format!("{name}.safetensors"));
        tch::Tensor::write_safetensors(&[(name, tensor)], &path)
            .map_err(|e| io(path.display(), e))?;
        ctx.put_file(
            &format!("synthetic/{name}.safetensors"),
            &path,
            "application/octet-stream",
        )
    };
    let mask = part("mask", &t.mask.to_device(tch::Device::Cpu))?;
    let pattern = part("pattern", &t.pattern.to_device(tch::Device::Cpu))?;
    Ok(TriggerArtifacts {
        trigger,
        mask,
        pattern,
    })
}

/// The work of the `analyze` stage.
pub struct AnalyzeWork;

impl Work<Analyze> for AnalyzeWork {
    fn run(&self, ctx: &JobContext, _input: RunOnly) -> Result<AnalyzeOutput, JobError> {
        let t = Instant::now();
        let spec: ExperimentSpec = ctx.experiment_spec()?;
        let bundle = Bundle::fetch(ctx)?;
        let attack = bundle.attack(&spec)?;
        let (clean_dir, bd_dir) = (ctx.work_dir.join("clean"), ctx.work_dir.join("backdoored"));
        fetch_model::<TrainClean>(ctx, &clean_dir)?;
        fetch_model::<TrainBackdoored>(ctx, &bd_dir)?;
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
        ctx.put_neuron_stats(&neuron_rows(&a))?;
        for (n, s) in &a.separation {
            ctx.record_metric(
                Analyze::KIND.as_str(),
                &format!("separation_{}", n.as_str()),
                0,
                s.max_ratio,
            )?;
        }
        let trigger = store_trigger(ctx, &a.synthetic.trigger_file)?;
        let stats_json = serde_json::json!({
            "layer": a.layer,
            "channel_means": a.channel_means,
            "separation": a.separation,
        });
        let stats = ctx.put_artifact(
            "analysis/stats.json",
            Bytes::from(serde_json::to_vec_pretty(&stats_json).map_err(|e| io("stats", e))?),
            "application/json",
        )?;
        let (figures, mut figure_refs) = upload_figures(ctx, &out, &a.figures)?;
        let heatmap_files: Vec<PathBuf> =
            a.gradcam.heatmaps.iter().map(|h| h.file.clone()).collect();
        let (_, heatmap_refs) = upload_figures(ctx, &out, &heatmap_files)?;
        figure_refs.extend(heatmap_refs);
        let mut synthetic = a.synthetic.clone();
        synthetic.trigger_file = PathBuf::from(TRIGGER_ARTIFACT);
        Ok(AnalyzeOutput {
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
        })
    }
}

/// `AnalyzerService`: the `analyze` stage over gRPC.
#[derive(Clone)]
pub struct Analyzer {
    pub shared: Shared,
}

pub fn routes(shared: Shared) -> tonic::service::Routes {
    tonic::service::Routes::new(
        AnalyzerServiceServer::new(Analyzer { shared })
            .max_decoding_message_size(deadbolt_runtime::server::MAX_REQUEST_BYTES)
            .max_encoding_message_size(deadbolt_runtime::server::MAX_RESPONSE_BYTES),
    )
}

fn norm_to_proto(n: Norm) -> pb::Norm {
    match n {
        Norm::L1 => pb::Norm::L1,
        Norm::L2 => pb::Norm::L2,
        Norm::Linf => pb::Norm::Linf,
        Norm::Mean => pb::Norm::Mean,
    }
}

fn model_tag(s: Setting) -> pb::ModelTag {
    if s.backdoored_model() {
        pb::ModelTag::Backdoored
    } else {
        pb::ModelTag::Clean
    }
}

fn input_kind(s: Setting) -> pb::InputKind {
    if s.triggered_input() {
        pb::InputKind::Triggered
    } else {
        pb::InputKind::Clean
    }
}

/// The analyze job's result as the RPC returns it.
fn analyze_response(a: &AnalyzeOutput) -> pb::AnalyzeResponse {
    pb::AnalyzeResponse {
        statistics: Some(statistics(a)),
        grad_cam: Some(grad_cam(a)),
        synthetic: Some(synthetic(a)),
    }
}

fn statistics(a: &AnalyzeOutput) -> pb::ActivationStatistics {
    let settings = a
        .channel_means
        .iter()
        .map(|(s, norms)| {
            let get =
                |n: Norm, c: usize| norms.get(&n).and_then(|v| v.get(c)).copied().unwrap_or(0.0);
            pb::SettingStats {
                model: model_tag(*s) as i32,
                input: input_kind(*s) as i32,
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
    pb::ActivationStatistics {
        layer: a.layer.clone(),
        channels: a.channels.max(0) as u32,
        settings,
        separation,
        stats: Some(convert::artifact_to_proto(&a.stats)),
    }
}

fn grad_cam(a: &AnalyzeOutput) -> pb::GradCamSummary {
    let share = |s: Setting| {
        a.gradcam
            .mass_in_trigger
            .get(&s)
            .map(|m| m.mass_in_region)
            .unwrap_or(0.0)
    };
    let heatmaps = a
        .gradcam
        .heatmaps
        .iter()
        .map(|h| {
            let name = h.file.to_string_lossy().replace('\\', "/");
            pb::Heatmap {
                index: h.index.max(0) as u64,
                triggered: h.setting.triggered_input(),
                label: h.label,
                predicted: h.predicted,
                trigger_share: h.trigger_share.unwrap_or(0.0),
                image: a.figure_refs.get(&name).map(convert::artifact_to_proto),
            }
        })
        .collect();
    pb::GradCamSummary {
        heatmaps,
        clean_trigger_share: share(Setting::BackdooredModelCleanInput),
        triggered_trigger_share: share(Setting::BackdooredModelTriggeredInput),
        montage: a
            .figure_refs
            .get("gradcam.png")
            .map(convert::artifact_to_proto),
    }
}

fn synthetic(a: &AnalyzeOutput) -> pb::SyntheticTriggers {
    let s = &a.synthetic;
    let best = pb::SyntheticTrigger {
        mask: Some(convert::artifact_to_proto(&a.trigger.mask)),
        pattern: Some(convert::artifact_to_proto(&a.trigger.pattern)),
        target_label: s.suspect_label,
    };
    pb::SyntheticTriggers {
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
    }
}

#[tonic::async_trait]
impl AnalyzerService for Analyzer {
    async fn analyze(
        &self,
        req: Request<pb::AnalyzeRequest>,
    ) -> Result<Response<pb::AnalyzeResponse>, Status> {
        let run_id = stage::parse_run_id("run_id", &req.get_ref().run_id)?;
        let a = self.shared.run_stage::<Analyze>(run_id, RunOnly {}).await?;
        Ok(Response::new(analyze_response(&a)))
    }

    async fn scan(
        &self,
        req: Request<pb::ScanRequest>,
    ) -> Result<Response<pb::ScanResponse>, Status> {
        let run_id = stage::parse_run_id("run_id", &req.get_ref().run_id)?;
        let r = self.shared.run_stage::<Scan>(run_id, RunOnly {}).await?;
        let file = |name: &str| r.files.get(name).map(convert::artifact_to_proto);
        Ok(Response::new(pb::ScanResponse {
            verdict: r.verdict.as_str().to_string(),
            reasons: r.reasons.clone(),
            suspect_label: r.suspect_label,
            anomaly_index: r.anomaly_index,
            flagged_labels: r.flagged_labels.clone(),
            clean_acc: r.clean_acc,
            outlier_channels: r.outlier_channels.iter().map(|&c| c as u32).collect(),
            report_json: file(ScanOutput::REPORT),
            report_md: file(ScanOutput::REPORT_MD),
        }))
    }
}
