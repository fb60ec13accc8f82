//! Errors of the stage services on libtorch, mapped to job errors (and so
//! to gRPC codes) in one place.

use deadbolt_runtime::JobError;
use deadbolt_store::StoreError;
use tonic::Code;

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Core(#[from] deadbolt_core::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error("{0}")]
    Io(String),
}

impl From<StageError> for JobError {
    fn from(e: StageError) -> Self {
        use deadbolt_core::Error as C;
        match e {
            StageError::Job(j) => j,
            StageError::Store(s) => s.into(),
            StageError::Io(m) => JobError::transient(m),
            StageError::Core(c) => match &c {
                C::Spec(_) | C::Invalid { .. } | C::UnknownLayer { .. } | C::EmptyDataset(_) => {
                    JobError::permanent(Code::InvalidArgument, c.to_string())
                }
                C::Checkpoint { .. } | C::BadFile { .. } => {
                    JobError::permanent(Code::DataLoss, c.to_string())
                }
                C::Cancelled => JobError::cancelled(),
                C::Io { .. } | C::Torch(_) | C::Other(_) => JobError::transient(c.to_string()),
            },
        }
    }
}

/// `?` on core results inside a handler.
pub fn core<T>(r: deadbolt_core::Result<T>) -> Result<T, JobError> {
    r.map_err(|e| StageError::from(e).into())
}

/// An I/O failure as a (retryable) job error.
pub fn io(what: impl std::fmt::Display, e: impl std::fmt::Display) -> JobError {
    StageError::Io(format!("{what}: {e}")).into()
}
