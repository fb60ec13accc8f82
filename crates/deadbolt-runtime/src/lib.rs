//! deadbolt-runtime: what every deadbolt service shares, without libtorch.
//!
//! - [`config`]: one TOML file plus `DEADBOLT_*` environment overrides
//!   (database, object store, listen and peer addresses, job leases);
//! - [`server`]: a tonic server with `grpc.health.v1` and reflection;
//! - [`convert`]: every proto <-> spec/store conversion, with validation at
//!   the edge (INVALID_ARGUMENT naming the dotted field, e.g.
//!   `spec.attack.rate`);
//! - [`worker`]: the stage-job worker loop (lease, heartbeat, complete or
//!   fail) that runs a stage handler on a blocking thread;
//! - [`stage`]: the stage-RPC semantics: enqueue the (run, stage) job
//!   idempotently and wait for its outcome.

pub mod config;
pub mod convert;
pub mod server;
pub mod stage;
pub mod tensor_thread;
pub mod worker;

pub use config::Config;
pub use worker::{JobContext, JobError, StageHandler, Worker};

use std::sync::Arc;

use deadbolt_store::{ArtifactStore, MetadataStore};

/// Stage names (one job per run and stage).
pub mod stages {
    pub const DATA: &str = "data";
    pub const TRAIN_CLEAN: &str = "train-clean";
    pub const TRAIN_BACKDOORED: &str = "train-backdoored";
    pub const ANALYZE: &str = "analyze";
    pub const PRUNE: &str = "prune";
    /// In pipeline order.
    pub const ALL: [&str; 5] = [DATA, TRAIN_CLEAN, TRAIN_BACKDOORED, ANALYZE, PRUNE];
}

/// The stores and settings a service process shares between its servers and
/// workers.
#[derive(Clone, Debug)]
pub struct Shared {
    pub store: Arc<dyn MetadataStore>,
    pub artifacts: ArtifactStore,
    pub config: Config,
}

impl Shared {
    /// Connects the metadata store (running its migrations) and opens the
    /// artifact store named by the config.
    pub async fn connect(config: Config) -> anyhow::Result<Shared> {
        let store = deadbolt_store::connect(&config.database_url).await?;
        let artifacts =
            ArtifactStore::from_url_with(&config.artifact_url, &config.s3.to_options())?;
        Ok(Shared {
            store,
            artifacts,
            config,
        })
    }

    /// A worker of `service` for `stages`, with this process's settings.
    pub fn worker(
        &self,
        service: &'static str,
        stages: &[&str],
        handler: Arc<dyn StageHandler>,
    ) -> anyhow::Result<Worker> {
        let work_root = self
            .config
            .work_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("deadbolt-work"));
        std::fs::create_dir_all(&work_root)?;
        Ok(Worker {
            service,
            worker_id: worker::worker_id(service),
            stages: stages.iter().map(|s| s.to_string()).collect(),
            handler,
            store: self.store.clone(),
            artifacts: self.artifacts.clone(),
            lease: self.config.lease(),
            heartbeat: self.config.heartbeat(),
            poll: self.config.poll(),
            work_root,
        })
    }

    /// Stage-RPC semantics (see [`stage::run_stage`]) with this process's settings.
    pub async fn run_stage(
        &self,
        run_id: uuid::Uuid,
        stage: &str,
        payload: serde_json::Value,
    ) -> Result<deadbolt_store::Job, tonic::Status> {
        stage::run_stage(
            self.store.as_ref(),
            run_id,
            stage,
            payload,
            self.config.max_attempts,
            self.config.poll(),
        )
        .await
    }
}
