//! The gateway: `ExperimentService` (submit, get, list, watch, cancel) and
//! one driver task per run that walks the stages by calling the stage
//! services over gRPC (poisoner -> trainer (clean, backdoored) -> analyzer
//! -> pruner), retrying calls that fail with a transient code (a stage
//! instance died: the call goes to another one, which waits on the same
//! stage job). Every transition is recorded (`append_event`,
//! `set_run_status`). On start the gateway resumes every unfinished run, so
//! runs continue across a gateway restart. No libtorch here.

pub mod driver;
pub mod error;
pub mod service;
pub mod transfer;
pub mod watch;

pub use driver::Clients;
pub use service::{routes, Gateway};
