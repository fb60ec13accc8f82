//! `PoisonerService` (thin tonic adapter) and the `data` stage handler.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use deadbolt_core::experiment;
use deadbolt_core::report::DataSummary;
use deadbolt_core::spec::ExperimentSpec;
use deadbolt_proto::v1 as pb;
use deadbolt_proto::v1::poisoner_service_server::{PoisonerService, PoisonerServiceServer};
use deadbolt_runtime::{convert, stage, stages, JobContext, JobError, Shared, StageHandler};
use deadbolt_store::ArtifactRef;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tonic::{Request, Response, Status};

use crate::dataset::Bundle;
use crate::error::core;

/// The result of the `data` stage job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataResult {
    pub dataset: ArtifactRef,
    pub poisoned_indices: ArtifactRef,
    pub poisoned_count: u64,
    pub summary: DataSummary,
    pub seconds: f64,
}

/// Runs the `data` stage.
pub struct PoisonHandler;

impl StageHandler for PoisonHandler {
    fn run(&self, ctx: &JobContext) -> Result<Value, JobError> {
        let t = Instant::now();
        let spec: ExperimentSpec = ctx.spec()?;
        ctx.set_progress(0.0, "loading and poisoning data");
        let prepared = core(experiment::stage_data(&spec))?;
        let summary = experiment::data_summary(&prepared);
        let bundle = Bundle::from_prepared(&prepared);
        let path = ctx.work_dir.join("dataset.safetensors");
        bundle.write(&path)?;
        let dataset = ctx.put_file(
            "data/dataset.safetensors",
            &path,
            "application/octet-stream",
        )?;
        let indices = serde_json::to_vec(&bundle.poisoned_indices).expect("indices serialize");
        let poisoned_indices = ctx.put_artifact(
            "data/poisoned_indices.json",
            Bytes::from(indices),
            "application/json",
        )?;
        ctx.block_on(ctx.store.record_metric(
            ctx.run_id(),
            stages::DATA,
            "poisoned_count",
            0,
            bundle.poisoned_indices.len() as f64,
        ))?;
        tracing::info!(
            run_id = %ctx.run_id(),
            train = summary.train,
            val = summary.validation,
            test = summary.test,
            poisoned = summary.poisoned,
            "dataset stored"
        );
        let r = DataResult {
            dataset,
            poisoned_indices,
            poisoned_count: bundle.poisoned_indices.len() as u64,
            summary,
            seconds: t.elapsed().as_secs_f64(),
        };
        Ok(serde_json::to_value(r).expect("result serializes"))
    }
}

pub fn handler() -> Arc<dyn StageHandler> {
    Arc::new(PoisonHandler)
}

/// The gRPC service.
#[derive(Clone)]
pub struct Poisoner {
    pub shared: Shared,
}

pub fn routes(shared: Shared) -> tonic::service::Routes {
    tonic::service::Routes::new(PoisonerServiceServer::new(Poisoner { shared }))
}

#[tonic::async_trait]
impl PoisonerService for Poisoner {
    async fn poison(
        &self,
        req: Request<pb::PoisonRequest>,
    ) -> Result<Response<pb::PoisonResponse>, Status> {
        let req = req.into_inner();
        let run_id = stage::parse_run_id("run_id", &req.run_id)?;
        let job = self
            .shared
            .run_stage(run_id, stages::DATA, serde_json::json!({}))
            .await?;
        let r: DataResult = stage::decode_result(&job)?;
        let run = self.shared.store.get_run(run_id).await?;
        let spec: ExperimentSpec = serde_json::from_value(run.spec_json)
            .map_err(|e| Status::internal(format!("run spec: {e}")))?;
        Ok(Response::new(pb::PoisonResponse {
            dataset: Some(convert::artifact_to_proto(&r.dataset)),
            poisoned_count: r.poisoned_count,
            poisoned_indices: Some(convert::artifact_to_proto(&r.poisoned_indices)),
            poisoned_dataset: Some(convert::dataset_artifact_ref(&spec.dataset, &r.dataset)),
        }))
    }
}
