//! Progress reporting, decoupled from how it is shown (a terminal bar, a
//! gRPC stream, a job heartbeat).

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Progress of long work, and typed training events for whoever observes
/// a training (the trainer service uploads each epoch's checkpoint on
/// [`Progress::epoch_saved`]).
pub trait Progress: Send + Sync {
    /// A new phase with `total` units of work.
    fn start(&self, _phase: &str, _total: u64) {}
    /// `n` more units done.
    fn inc(&self, _n: u64) {}
    /// The phase is over.
    fn finish(&self, _message: &str) {}
    /// Training finished an epoch and saved its checkpoint (model and
    /// optimizer state) where the training writes them.
    fn epoch_saved(&self, _report: &EpochReport) {}
    /// Whether the work should stop (checked between batches).
    fn cancelled(&self) -> bool {
        false
    }
}

/// Reports nothing.
pub struct Silent;
impl Progress for Silent {}

/// A cancellation flag shared with whoever may cancel.
#[derive(Clone, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst)
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What a training epoch reports to whoever observes the training
/// ([`Progress::epoch_saved`]; also `crate::train::EpochReport`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    /// 1-based epoch number.
    pub epoch: usize,
    pub loss: f64,
    pub train_acc: f64,
    pub lr: f64,
    pub seconds: f64,
    pub images_per_sec: f64,
    /// CPU time of the process over the epoch (all threads; user + system),
    /// a measure of work that a busy machine disturbs less than `seconds`.
    #[serde(default)]
    pub cpu_seconds: f64,
}
