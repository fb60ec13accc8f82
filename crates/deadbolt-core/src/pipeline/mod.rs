//! The planted-backdoor experiment (`deadbolt experiment`), above the
//! defense layer: a backdoor is planted by poisoning, a clean and a
//! backdoored model are trained, and the defense is measured against the
//! known trigger.
//!
//! - [`prepare`]: the spec's data, split and poisoned ([`prepare::Prepared`]);
//! - [`checkpointed`]: training with epoch checkpoints that resume;
//! - [`experiment`]: the experiment's stages (data, train, analyze, prune),
//!   which the services run one by one, and [`experiment::run`], which runs
//!   them all on one machine;
//! - [`report`]: the experiment's report (`report.json`, `report.md`).
//!
//! It names nothing of [`crate::byom`] (tests/module_graph.rs).

pub mod checkpointed;
pub mod experiment;
pub mod prepare;
pub mod report;
