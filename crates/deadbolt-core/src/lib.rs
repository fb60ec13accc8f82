//! deadbolt-core: the science of deadbolt, on libtorch (tch). No networking.
//!
//! Data ([`data`]), triggers ([`trigger`]) and poisoning ([`poison`]),
//! models ([`model`]), training ([`train`]) and evaluation ([`eval`]).

pub mod analysis;
pub mod card;
pub mod cleanse;
pub mod clp;
pub mod data;
pub mod defense;
pub mod device;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod model;
pub mod optim;
pub mod paths;
pub mod plot;
pub mod poison;
pub mod progress;
pub mod prune;
pub mod repair;
pub mod report;
pub mod rng;
pub mod scan;
pub mod train;
pub mod trigger;
pub mod workflow;

/// Experiment specifications (re-exported from `deadbolt-spec`).
pub use deadbolt_spec as spec;
pub use error::{Error, Result};
