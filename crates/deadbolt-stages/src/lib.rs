//! deadbolt-stages: every stage of the pipeline as plain domain code on
//! deadbolt-core, plus one thin tonic adapter per stage service.
//!
//! | stage (job) | module | service |
//! |---|---|---|
//! | `data` | [`data`] | `PoisonerService` |
//! | `train-clean`, `train-backdoored` | [`train`] | `TrainerService` |
//! | `analyze` | [`analyze`] | `AnalyzerService` |
//! | `prune` (+ the report) | [`prune`] | `PrunerService` |
//! | `scan` (a model a team brought) | [`scan`] | `AnalyzerService` |
//! | `repair` (of that model) | [`repair`] | `PrunerService` |
//!
//! Each stage is typed ([`contract`]: name, input and output bound at
//! compile time through [`deadbolt_runtime::Stage`]); a stage reads another
//! stage's output only through its contract type, never through the other
//! stage's module (a test checks that no stage module imports another).
//! Shared machinery lives apart: the dataset artifact ([`dataset_bundle`]),
//! progress bridging ([`progress`]), model and figure transfer
//! ([`job_files`]), and the mapping of core errors to job failures
//! ([`error`]).

pub mod analyze;
pub mod contract;
pub mod data;
pub mod dataset_bundle;
pub mod error;
pub mod job_files;
pub mod progress;
pub mod prune;
pub mod repair;
pub mod scan;
pub mod train;

use deadbolt_runtime::config::ServiceKind;
use deadbolt_runtime::{Handlers, Shared};

/// The stage service `kind` of this process: its gRPC routes, its fully
/// qualified service name, and the stage work its worker runs. `None` for
/// the gateway (not a stage service).
pub fn service(
    kind: ServiceKind,
    shared: Shared,
) -> Option<(tonic::service::Routes, &'static str, Handlers)> {
    use contract::*;
    let limits = job_files::data_limits(&shared.config.limits);
    Some(match kind {
        ServiceKind::Poisoner => (
            data::routes(shared),
            "deadbolt.v1.PoisonerService",
            Handlers::new().with::<Data, _>(data::DataWork { limits }),
        ),
        ServiceKind::Trainer => (
            train::routes(shared),
            "deadbolt.v1.TrainerService",
            Handlers::new()
                .with::<TrainClean, _>(train::TrainWork)
                .with::<TrainBackdoored, _>(train::TrainWork),
        ),
        ServiceKind::Analyzer => (
            analyze::routes(shared),
            "deadbolt.v1.AnalyzerService",
            Handlers::new()
                .with::<Analyze, _>(analyze::AnalyzeWork)
                .with::<Scan, _>(scan::ScanWork { limits }),
        ),
        ServiceKind::Pruner => (
            prune::routes(shared),
            "deadbolt.v1.PrunerService",
            Handlers::new()
                .with::<Prune, _>(prune::PruneWork)
                .with::<Repair, _>(repair::RepairWork { limits }),
        ),
        ServiceKind::Gateway => return None,
    })
}

#[cfg(test)]
mod tests {
    /// No stage module imports another stage module: they share only the
    /// contracts and the machinery modules.
    #[test]
    fn no_stage_imports_another() {
        let stages = ["data", "train", "analyze", "prune", "scan", "repair"];
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        for s in stages {
            let text = std::fs::read_to_string(dir.join(format!("{s}.rs"))).unwrap();
            for other in stages.iter().filter(|o| **o != s) {
                for pat in [
                    format!("crate::{other}::"),
                    format!("crate::{other};"),
                    format!("crate::{{{other}"),
                    format!("super::{other}"),
                ] {
                    assert!(
                        !text.contains(&pat),
                        "stage {s} imports stage {other} ({pat})"
                    );
                }
            }
        }
    }
}
