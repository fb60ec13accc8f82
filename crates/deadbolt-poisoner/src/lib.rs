//! The poisoner service: `PoisonerService.Poison` runs the run's `data`
//! stage job (load the base data, hold out validation, poison the training
//! split with [`deadbolt_core::experiment::stage_data`]) and stores the
//! result as one safetensors artifact (`data/dataset.safetensors`) plus the
//! poisoned indices (`data/poisoned_indices.json`).
//!
//! Also home of what every stage service that links libtorch shares:
//! the dataset artifact format ([`dataset`]), the bridge from the core's
//! progress reporting to job heartbeats ([`progress`]) and core error
//! mapping ([`error`]).

pub mod dataset;
pub mod error;
pub mod progress;
pub mod service;

pub use service::{handler, routes, DataResult, PoisonHandler, Poisoner};
