//! The `data` stage: load the base data, hold out validation, poison the
//! training split ([`deadbolt_core::pipeline::experiment::stage_data`]); stores the
//! splits as one safetensors artifact (`data/dataset.safetensors`) and the
//! poisoned indices (`data/poisoned_indices.json`). `PoisonerService` is
//! its thin tonic adapter.

use std::time::Instant;

use bytes::Bytes;
use deadbolt_core::pipeline::experiment;
use deadbolt_core::spec::ExperimentSpec;
use deadbolt_proto::v1 as pb;
use deadbolt_proto::v1::poisoner_service_server::{PoisonerService, PoisonerServiceServer};
use deadbolt_runtime::{convert, stage, JobContext, JobError, Shared, Stage, Work};
use tonic::{Request, Response, Status};

use crate::contract::{Data, DataOutput, RunOnly};
use crate::dataset_bundle::Bundle;
use crate::error::{core, io};

/// The work of the `data` stage: the dataset (an operator's or a team's
/// upload) read within the operator's data limits.
pub struct DataWork {
    pub limits: deadbolt_core::data::DataLimits,
}

impl Work<Data> for DataWork {
    fn run(&self, ctx: &JobContext, _input: RunOnly) -> Result<DataOutput, JobError> {
        let t = Instant::now();
        let spec: ExperimentSpec = ctx.experiment_spec()?;
        ctx.set_progress(0.0, "loading and poisoning data");
        let prepared = core(experiment::stage_data_with(&spec, &self.limits))?;
        let summary = experiment::data_summary(&prepared);
        let bundle = Bundle::from_prepared(&prepared);
        let prepared_seconds = t.elapsed().as_secs_f64();
        let path = ctx.work_dir.join("dataset.safetensors");
        let dataset = bundle.store(ctx, &path, "data/dataset.safetensors")?;
        let stored_seconds = t.elapsed().as_secs_f64() - prepared_seconds;
        let indices =
            serde_json::to_vec(&bundle.poisoned_indices).map_err(|e| io("poisoned indices", e))?;
        let poisoned_indices = ctx.put_artifact(
            "data/poisoned_indices.json",
            Bytes::from(indices),
            "application/json",
        )?;
        ctx.record_metric(
            Data::KIND.as_str(),
            "poisoned_count",
            0,
            bundle.poisoned_indices.len() as f64,
        )?;
        tracing::info!(
            run_id = %ctx.run_id(),
            train = summary.train,
            val = summary.validation,
            test = summary.test,
            poisoned = summary.poisoned,
            prepared_seconds,
            stored_seconds,
            "dataset stored"
        );
        Ok(DataOutput {
            dataset,
            poisoned_indices,
            poisoned_count: bundle.poisoned_indices.len() as u64,
            summary,
            seconds: t.elapsed().as_secs_f64(),
        })
    }
}

/// `PoisonerService`: the `data` stage over gRPC.
#[derive(Clone)]
pub struct Poisoner {
    pub shared: Shared,
}

pub fn routes(shared: Shared) -> tonic::service::Routes {
    tonic::service::Routes::new(
        PoisonerServiceServer::new(Poisoner { shared })
            .max_decoding_message_size(deadbolt_runtime::server::MAX_REQUEST_BYTES)
            .max_encoding_message_size(deadbolt_runtime::server::MAX_RESPONSE_BYTES),
    )
}

#[tonic::async_trait]
impl PoisonerService for Poisoner {
    async fn poison(
        &self,
        req: Request<pb::PoisonRequest>,
    ) -> Result<Response<pb::PoisonResponse>, Status> {
        let run_id = stage::parse_run_id("run_id", &req.get_ref().run_id)?;
        let r = self.shared.run_stage::<Data>(run_id, RunOnly {}).await?;
        let run = self.shared.store.get_run(run_id).await?;
        let Some(spec) = run.spec()?.experiment().cloned() else {
            return Err(JobError::permanent(
                tonic::Code::FailedPrecondition,
                format!("run {run_id} is not an experiment"),
            )
            .into());
        };
        Ok(Response::new(pb::PoisonResponse {
            dataset: Some(convert::artifact_to_proto(&r.dataset)),
            poisoned_count: r.poisoned_count,
            poisoned_indices: Some(convert::artifact_to_proto(&r.poisoned_indices)),
            poisoned_dataset: Some(convert::dataset_artifact_ref(&spec.dataset, &r.dataset)),
        }))
    }
}
