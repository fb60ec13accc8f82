//! deadbolt-runtime: what every deadbolt service shares, without libtorch.
//!
//! - [`config`]: one TOML file plus `DEADBOLT_*` environment overrides
//!   (database, object store, listen and peer addresses, job leases);
//! - [`server`]: a tonic server with `grpc.health.v1` and reflection;
//! - [`convert`]: every proto <-> spec/store conversion, with validation at
//!   the edge (INVALID_ARGUMENT naming the dotted field, e.g.
//!   `spec.attack.rate`);
//! - [`stage`]: typed stages ([`Stage`]: name, input and output bound at
//!   compile time; [`Work`]: the code that runs one) and the stage-RPC
//!   semantics: accepted only for a run at that stage, enqueue the (run,
//!   stage) job idempotently and wait for its typed output;
//! - [`worker`]: the stage-job worker loop (lease, heartbeat, complete or
//!   fail) that runs a stage's work on the tensor thread;
//! - [`error`]: [`JobError`], a job's structured failure.

pub mod auth;
pub mod config;
pub mod convert;
pub mod error;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod scan;
pub mod server;
pub mod stage;
pub mod tensor_thread;
pub mod tls;
pub mod uploads;
pub mod worker;

pub use config::Config;
pub use error::JobError;
pub use stage::{Handlers, Stage, StageKind, Work};
pub use worker::{Drain, JobContext, Worker};

use std::sync::Arc;

use deadbolt_store::{ArtifactStore, MetadataStore};

/// The stores and settings a service process shares between its servers and
/// workers.
#[derive(Clone, Debug)]
pub struct Shared {
    pub store: Arc<dyn MetadataStore>,
    pub artifacts: ArtifactStore,
    pub config: Config,
    /// The process's drain signal (SIGTERM, Ctrl-C).
    pub drain: Drain,
}

impl Shared {
    /// Connects the metadata store (running its migrations unless
    /// `config.migrate` is false: then it only checks they were applied)
    /// and opens the artifact store named by the config.
    pub async fn connect(config: Config) -> anyhow::Result<Shared> {
        // no transaction of this process outlives the lease its workers hold
        let limits = deadbolt_store::SessionLimits::for_lease(config.lease());
        let store =
            deadbolt_store::connect_with_options(&config.database_url, limits, config.migrate)
                .await?;
        let artifacts =
            ArtifactStore::from_url_with(&config.artifact_url, &config.s3.to_options())?;
        Ok(Shared {
            store,
            artifacts,
            config,
            drain: Drain::new(),
        })
    }

    /// A worker of `service` running `handlers`, with this process's settings.
    pub fn worker(&self, service: &'static str, handlers: Handlers) -> anyhow::Result<Worker> {
        let work_root = self
            .config
            .work_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("deadbolt-work"));
        std::fs::create_dir_all(&work_root)?;
        Ok(Worker {
            service,
            worker_id: worker::worker_id(service),
            handlers,
            store: self.store.clone(),
            artifacts: self.artifacts.clone(),
            lease: self.config.lease(),
            heartbeat: self.config.heartbeat(),
            poll: self.config.poll(),
            work_root,
            drain: self.drain.clone(),
            drain_deadline: self.config.drain(),
            keep_epochs: self.config.keep_epochs,
        })
    }

    /// Stage-RPC semantics (see [`stage::run_stage`]) with this process's settings.
    pub async fn run_stage<S: Stage>(
        &self,
        run_id: uuid::Uuid,
        input: S::Input,
    ) -> Result<S::Output, tonic::Status> {
        stage::run_stage::<S>(
            self.store.as_ref(),
            run_id,
            input,
            self.config.max_attempts,
            self.config.poll(),
        )
        .await
    }
}
