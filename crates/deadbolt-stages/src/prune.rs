//! The `prune` stage: runs
//! [`deadbolt_core::pipeline::experiment::stage_prune`] for every criterion of the
//! spec on the backdoored model (ranking with the real and/or the synthetic
//! trigger), records each criterion's test curve (`put_pruning_curve`) and
//! operating point (`set_pruning_choice`), stores the pruned checkpoints
//! (`pruned/<criterion>[-synthetic]/model.safetensors`) and figures, and
//! finally assembles the run's report with the core's
//! [`deadbolt_core::pipeline::experiment::assemble_report`] (`report/report.json`,
//! `report/report.md`, next to the figures under `report/`).
//!
//! The core sweeps all criteria together (they share cached activations),
//! so `PrunerService.Prune` (the thin tonic adapter) for any criterion
//! waits on that one job and returns the criterion's part.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use deadbolt_core::defense::cleanse;
use deadbolt_core::pipeline::experiment::{self, PruneOutcome};
use deadbolt_core::report::Document;
use deadbolt_core::spec::ExperimentSpec;
use deadbolt_proto::v1 as pb;
use deadbolt_proto::v1::pruner_service_server::{PrunerService, PrunerServiceServer};
use deadbolt_runtime::{convert, stage, JobContext, JobError, Shared, Stage, Work};
use deadbolt_store::CurvePoint;
use tonic::{Request, Response, Status};

use crate::contract::{
    Analyze, Data, Prune, PruneOutput, Repair, RepairOutput, RunOnly, TrainBackdoored, TrainClean,
};
use crate::dataset_bundle::Bundle;
use crate::error::core;
use crate::job_files::{fetch_model, relative, upload_figures};
use crate::progress::JobProgress;

fn store_point(p: &deadbolt_core::eval::CurvePoint) -> CurvePoint {
    CurvePoint {
        k: p.k as i64,
        acc: p.acc,
        asr: p.asr,
        ra: p.ra,
    }
}

/// The work of the `prune` stage (which also assembles the report).
pub struct PruneWork;

impl Work<Prune> for PruneWork {
    fn run(&self, ctx: &JobContext, _input: RunOnly) -> Result<PruneOutput, JobError> {
        let t = Instant::now();
        let run_id = ctx.run_id();
        let spec: ExperimentSpec = ctx.experiment_spec()?;
        let bundle = Bundle::fetch(ctx)?;
        let attack = bundle.attack(&spec)?;
        let bd_dir = ctx.work_dir.join("backdoored");
        let backdoored = fetch_model::<TrainBackdoored>(ctx, &bd_dir)?;
        let clean = ctx.output::<TrainClean>()?;
        let analysis = ctx.output::<Analyze>()?;
        let data = ctx.output::<Data>()?;
        let trig_path = ctx.work_dir.join("trigger.safetensors");
        ctx.download(&analysis.trigger.trigger, &trig_path)?;
        let trig = core(cleanse::load_trigger(&trig_path))?.to_device(tch::Device::Cpu);
        let synthetic = cleanse::synthetic_attack(
            &trig,
            analysis.synthetic.suspect_label,
            bundle.train.classes,
        );
        let out = ctx.work_dir.join("prune");
        let p = core(experiment::stage_prune(
            &spec,
            &bd_dir,
            &bundle.val,
            &bundle.test,
            attack.as_ref(),
            &synthetic,
            &out,
            &JobProgress::new(ctx),
        ))?;
        let prune_seconds = t.elapsed().as_secs_f64();
        metrics::histogram!(deadbolt_runtime::metrics::names::PRUNE_SWEEP_SECONDS)
            .record(prune_seconds);
        for (c, r) in &p.pruning {
            let points: Vec<CurvePoint> = r.curve.iter().map(store_point).collect();
            ctx.put_pruning(c.as_str(), &points, store_point(&r.chosen))?;
            ctx.record_metric(
                Prune::KIND.as_str(),
                &format!("der_{}", c.as_str()),
                0,
                r.der,
            )?;
        }
        // pruned checkpoints, stored once each, paths made relative
        let mut checkpoints = BTreeMap::new();
        let mut tables = [p.pruning.clone(), p.pruning_synthetic.clone()];
        for table in tables.iter_mut() {
            for r in table.values_mut() {
                let Some(dir) = r.checkpoint.clone() else {
                    continue;
                };
                let name = relative(&out, &dir).to_string_lossy().replace('\\', "/");
                if !checkpoints.contains_key(&name) {
                    let w = ctx.put_file(
                        &format!("{name}/model.safetensors"),
                        &dir.join("model.safetensors"),
                        "application/octet-stream",
                    )?;
                    ctx.put_file(
                        &format!("{name}/model.json"),
                        &dir.join("model.json"),
                        "application/json",
                    )?;
                    checkpoints.insert(name.clone(), w);
                }
                r.checkpoint = Some(PathBuf::from(name));
            }
        }
        let [pruning, pruning_synthetic] = tables;
        let (figures, _) = upload_figures(ctx, &out, &p.figures)?;
        let run = ctx.block_on(ctx.store.get_run(run_id))?;
        let total =
            (chrono_now_secs() - run.created_at.timestamp_millis() as f64 / 1000.0).max(0.0);
        let timings = BTreeMap::from([
            ("data".to_string(), data.seconds),
            ("train_clean".to_string(), clean.seconds),
            ("train_backdoored".to_string(), backdoored.seconds),
            ("analyze".to_string(), analysis.seconds),
            ("prune".to_string(), prune_seconds),
            ("total".to_string(), total),
        ]);
        let report = experiment::assemble_report(
            &spec,
            data.summary.clone(),
            &clean.outcome(Path::new("clean")),
            &backdoored.outcome(Path::new("backdoored")),
            analysis.outcome(),
            PruneOutcome {
                pruning: pruning.clone(),
                pruning_synthetic: pruning_synthetic.clone(),
                figures,
                timings: p.timings.clone(),
            },
            timings,
        );
        let dir = ctx.work_dir.join("report");
        core(report.write(&dir))?;
        let report_json = ctx.put_file(
            "report/report.json",
            &dir.join("report.json"),
            "application/json",
        )?;
        let report_md =
            ctx.put_file("report/report.md", &dir.join("report.md"), "text/markdown")?;
        tracing::info!(run_id = %run_id, criteria = pruning.len(), "pruning done, report stored");
        Ok(PruneOutput {
            pruning,
            pruning_synthetic,
            checkpoints,
            report_json,
            report_md,
            seconds: t.elapsed().as_secs_f64(),
        })
    }
}

fn chrono_now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `PrunerService`: the `prune` stage over gRPC.
#[derive(Clone)]
pub struct Pruner {
    pub shared: Shared,
}

pub fn routes(shared: Shared) -> tonic::service::Routes {
    tonic::service::Routes::new(
        PrunerServiceServer::new(Pruner { shared })
            .max_decoding_message_size(deadbolt_runtime::server::MAX_REQUEST_BYTES)
            .max_encoding_message_size(deadbolt_runtime::server::MAX_RESPONSE_BYTES),
    )
}

fn point_to_proto(p: &deadbolt_core::eval::CurvePoint) -> pb::CurvePoint {
    convert::curve_point_to_proto(&store_point(p))
}

/// The prune job's result as the RPC returns it: every criterion of the
/// run's spec, in criterion order.
fn prune_response(r: &PruneOutput) -> pb::PruneResponse {
    let criteria = r
        .pruning
        .iter()
        .map(|(criterion, c)| {
            let ckpt = c
                .checkpoint
                .as_ref()
                .and_then(|p| r.checkpoints.get(&p.to_string_lossy().to_string()));
            pb::CriterionPruning {
                criterion: convert::criterion_to_proto(*criterion) as i32,
                curve: c.validation_curve.iter().map(point_to_proto).collect(),
                chosen: Some(point_to_proto(&c.chosen)),
                pruned_channels: c.pruned_channels.iter().map(|&k| k as u32).collect(),
                pruned_checkpoint: ckpt.map(convert::artifact_to_proto),
                test_metrics: Some(pb::Metrics {
                    acc: c.chosen.acc,
                    asr: Some(c.chosen.asr),
                    ra: Some(c.chosen.ra),
                    ..Default::default()
                }),
            }
        })
        .collect();
    pb::PruneResponse { criteria }
}

#[tonic::async_trait]
impl PrunerService for Pruner {
    async fn prune(
        &self,
        req: Request<pb::PruneRequest>,
    ) -> Result<Response<pb::PruneResponse>, Status> {
        let run_id = stage::parse_run_id("run_id", &req.get_ref().run_id)?;
        let r = self.shared.run_stage::<Prune>(run_id, RunOnly {}).await?;
        Ok(Response::new(prune_response(&r)))
    }

    async fn repair(
        &self,
        req: Request<pb::RepairRequest>,
    ) -> Result<Response<pb::RepairResponse>, Status> {
        let run_id = stage::parse_run_id("run_id", &req.get_ref().run_id)?;
        let r = self.shared.run_stage::<Repair>(run_id, RunOnly {}).await?;
        let fig = |p: &deadbolt_core::byom::repair::Proportion| pb::HeldOutFigure {
            value: p.value,
            low: p.low,
            high: p.high,
        };
        let file = |name: &str| r.files.get(name).map(convert::artifact_to_proto);
        Ok(Response::new(pb::RepairResponse {
            met: r.met,
            outcome: if r.met {
                "met".to_string()
            } else {
                r.reasons.join("; ")
            },
            label: r.label,
            pruned: r.k as u32,
            pruned_channels: r.pruned_channels.iter().map(|&c| c as u32).collect(),
            acc_before: Some(fig(&r.original.acc)),
            asr_before: Some(fig(&r.original.asr)),
            acc_after: Some(fig(&r.repaired.acc)),
            asr_after: Some(fig(&r.repaired.asr)),
            model: file(RepairOutput::MODEL),
            card: file(RepairOutput::CARD),
            report_json: file(RepairOutput::REPORT),
        }))
    }
}
