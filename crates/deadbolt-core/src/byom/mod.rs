//! Bring your own model (`deadbolt scan`, `deadbolt repair`), above the
//! defense layer: a model deadbolt did not train, whose trigger is never
//! known.
//!
//! - [`card`]: the model card and strict state_dict loading and saving;
//! - [`scan`]: is the model backdoored, toward which label, through which
//!   channels;
//! - [`repair`]: prune and fine-tune, measured on data it never tuned on.
//!
//! It names nothing of [`crate::pipeline`] (tests/module_graph.rs).

pub mod card;
pub mod repair;
pub mod scan;
