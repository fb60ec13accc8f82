//! deadbolt-store: run metadata and artifacts.
//!
//! - [`MetadataStore`]: the run metadata as one repository trait per entity
//!   ([`repos`]: runs, run claims, the stage-job queue with leases, results
//!   (metrics, neuron statistics, pruning curves, scan results), artifact
//!   records, progress events, teams and API keys, health), with a Postgres
//!   implementation ([`PgStore`]) and an embedded SQLite one
//!   ([`SqliteStore`]); [`connect`] picks one from a URL. Callers hold an
//!   `Arc<dyn MetadataStore>` and `use deadbolt_store::repos::*;`.
//! - [`ArtifactStore`]: artifacts in object storage (local filesystem or
//!   S3-compatible), keyed `runs/<run_id>/<name>`, with sha256 checksums
//!   verified on read.
//!
//! No libtorch here: services link this crate without the science.
//!
//! Conventions the dashboards rely on:
//! - the `run_summary` view reads metrics named [`metric_names::CLEAN_ACC`],
//!   [`metric_names::BACKDOORED_ACC`] and [`metric_names::BACKDOORED_ASR`]
//!   (any stage, highest step wins) and the chosen point of criterion
//!   [`HEADLINE_CRITERION`] (`linf`);
//! - criterion names are the spec's (`linf`, `l1`, `l2`, `linf-diff`,
//!   `fine-pruning`, `random`);
//! - a worker that must resume after a crash records its latest checkpoint
//!   as an artifact (upsert on (run, name)) and reads it back when it leases
//!   the job again (`attempts > 1`);
//! - a stage job's writes carry its [`Fence`] (job id + lease token) and are
//!   refused with [`StoreError::LeaseLost`] once that lease is no longer
//!   current; a draining worker gives its job back with
//!   [`JobRepo::release_job`] (no attempt counted);
//! - runs belong to a team ([`Run::team`]; `client_request_id` is unique per
//!   team); API keys belong to a team, carry [`Scope`]s, and are stored
//!   only as their sha256 ([`AccessRepo::authenticate`] turns a key into
//!   a [`Principal`]); the team [`LOCAL_TEAM`] always exists;
//! - driving a run is leased in the store ([`RunClaimRepo::claim_run`],
//!   `claim_runs`, `renew_run`, `release_run`), and the driver's status
//!   changes go through [`RunClaimRepo::set_run_status_fenced`]
//!   ([`StoreError::DriveLost`] once another driver took over).
//!
//! Both metadata backends are one implementation ([`SqlStore`], generic
//! over the backend, one module per repository in `sql/`): shared row types
//! and statements (`queries/*.sql`, expanded once per dialect when a store
//! is built, see `queries.rs`), with the dialects differing only in time
//! functions, row locking and transaction start.
//!
//! Tests: `cargo test -p deadbolt-store` runs every case of the metadata
//! suite as its own test on each backend (`sqlite_file::<case>`,
//! `sqlite_memory::<case>`, `postgres::<case>`), each on a fresh store (for
//! Postgres a fresh database on `DEADBOLT_TEST_PG_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`), and the artifact suite
//! likewise on the filesystem and on `moto_server`
//! (`scripts/setup-test-deps.sh` installs it); the helpers are in
//! `deadbolt-test-support`.

pub mod artifacts;
mod backend;
pub mod changes;
pub mod error;
pub mod liveness;
pub mod metadata;
pub mod postgres;
mod queries;
pub mod records;
pub mod repos;
mod rows;
mod sql;
pub mod sqlite;

pub use artifacts::{
    artifact_key, validate_name, ArtifactEntry, ArtifactRef, ArtifactStore, S3Options,
};
pub use changes::{Change, ChangeKind};
pub use error::{Result, StoreError};
pub use liveness::{Failpoints, SessionLimits};
pub use metadata::{connect, connect_with, connect_with_options, MetadataStore};
pub use postgres::PgStore;
pub use records::*;
pub use repos::*;
pub use sql::SqlStore;
pub use sqlite::SqliteStore;

/// A reused client_request_id must carry the same name and spec. The
/// message names neither the existing run nor its spec: the id is the
/// client's, the run may not be.
pub(crate) fn check_same_request(existing: &Run, new: &NewRun) -> Result<()> {
    if existing.spec_json != new.spec_json || existing.name != new.name {
        return Err(StoreError::Conflict(format!(
            "client_request_id {:?} was already used with a different name or spec",
            new.client_request_id.as_deref().unwrap_or_default(),
        )));
    }
    Ok(())
}

/// Groups view rows (ordered by criterion, k) into curves.
pub(crate) fn push_curve_point(
    out: &mut Vec<PruningCurve>,
    criterion: String,
    point: CurvePoint,
    chosen: bool,
) {
    match out.last_mut() {
        Some(c) if c.criterion == criterion => {}
        _ => out.push(PruningCurve {
            criterion,
            points: Vec::new(),
            chosen_k: None,
        }),
    }
    let c = out.last_mut().expect("just pushed");
    if chosen {
        c.chosen_k = Some(point.k);
    }
    c.points.push(point);
}
