//! deadbolt-core: the science of deadbolt, on libtorch (tch). No networking.
//!
//! In layers, each naming only the ones below it (tests/module_graph.rs
//! fails on a cycle or an upward reach):
//! - the base: data ([`data`]), models ([`model`]), triggers ([`trigger`])
//!   and poisoning ([`poison`]), training ([`train`], [`optim`]),
//!   evaluation ([`eval`]), input normalisation ([`normalize`]), figures
//!   ([`plot`]), the one report writer ([`report`]) and the plumbing
//!   ([`device`], [`error`], [`paths`], [`progress`], [`rng`]);
//! - [`defense`]: activation statistics, Grad-CAM, trigger reverse
//!   engineering, CLP, pruning and the fine-tuned pruning-count search;
//! - above it, side by side and naming nothing of each other:
//!   [`pipeline`] (the planted-backdoor experiment) and [`byom`] (scan and
//!   repair of a model deadbolt did not train).

pub mod byom;
pub mod data;
pub mod defense;
pub mod device;
pub mod error;
pub mod eval;
pub mod model;
pub mod normalize;
pub mod optim;
pub mod paths;
pub mod pipeline;
pub mod plot;
pub mod poison;
pub mod progress;
pub mod report;
pub mod rng;
pub mod train;
pub mod trigger;

/// Experiment specifications (re-exported from `deadbolt-spec`).
pub use deadbolt_spec as spec;
pub use error::{Error, Result};
