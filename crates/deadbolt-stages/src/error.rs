//! The errors of the stages, and how each becomes a job failure (and so a
//! gRPC code, through [`deadbolt_proto::status`]): one place.
//!
//! Deterministic errors (a bad spec value, a corrupt checkpoint or data
//! file) fail the job at once; only transient ones (I/O, libtorch, the
//! store being unavailable) are retried.

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
    /// Local I/O of the job's work folder.
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
            StageError::Core(c) => {
                let message = c.to_string();
                match &c {
                    C::Invalid { field, .. } => JobError::invalid(field.clone(), message),
                    C::Spec(_) => JobError::invalid("spec", message),
                    C::UnknownLayer { .. } => JobError::invalid("defense.layer", message),
                    C::EmptyDataset(_) => JobError::permanent(Code::InvalidArgument, message),
                    C::TooLarge { what, .. } => {
                        JobError::permanent(Code::ResourceExhausted, message)
                            .with_field(what.clone())
                    }
                    C::Checkpoint { .. } | C::BadFile { .. } => {
                        JobError::permanent(Code::DataLoss, message)
                    }
                    C::Cancelled => JobError::cancelled(),
                    C::Io { .. } | C::Torch(_) | C::Other(_) => JobError::transient(message),
                }
            }
        }
    }
}

/// `?` on core results inside a stage.
pub fn core<T>(r: deadbolt_core::Result<T>) -> Result<T, JobError> {
    r.map_err(|e| StageError::from(e).into())
}

/// An I/O failure of the work folder as a (retryable) job error.
pub fn io(what: impl std::fmt::Display, e: impl std::fmt::Display) -> JobError {
    StageError::Io(format!("{what}: {e}")).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_errors_are_not_retried() {
        let bad = core::<()>(Err(deadbolt_core::Error::invalid(
            "training.lr",
            "must be positive",
        )))
        .unwrap_err();
        assert!(!bad.retryable);
        assert_eq!(bad.code, Code::InvalidArgument);
        assert_eq!(bad.field.as_deref(), Some("training.lr"));
        let corrupt = core::<()>(Err(deadbolt_core::Error::checkpoint(
            "model.json",
            "truncated",
        )))
        .unwrap_err();
        assert_eq!((corrupt.code, corrupt.retryable), (Code::DataLoss, false));
        let big = core::<()>(Err(deadbolt_core::Error::too_large(
            "classes",
            "max_classes",
            "4000000 classes exceed the limit of 100",
        )))
        .unwrap_err();
        assert_eq!((big.code, big.retryable), (Code::ResourceExhausted, false));
        assert_eq!(big.field.as_deref(), Some("classes"));
        let flaky = io("dataset.safetensors", "disk full");
        assert!(flaky.retryable);
    }
}
