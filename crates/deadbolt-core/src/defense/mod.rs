//! The defense layer: the pieces of a defense that both the experiment
//! pipeline ([`crate::experiment`]) and the bring-your-own-model commands
//! ([`crate::scan`], [`crate::repair`]) build on. It names nothing above
//! it (tests/module_graph.rs keeps the module graph acyclic).
//!
//! So far: the fine-tuned k search ([`search`]). The norms and statistics
//! ([`crate::analysis::stats`]), trigger reverse engineering
//! ([`crate::analysis::reverse`], [`crate::cleanse`]), CLP ([`crate::clp`]),
//! the pruning criteria ([`crate::prune`]) and the optimisers
//! ([`crate::optim`]) are this layer too and are to move under it.

pub mod search;
