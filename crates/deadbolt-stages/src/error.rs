//! The errors of the stages, and how each becomes a job failure (and so a
//! gRPC code, through [`deadbolt_proto::status`]): one place.
//!
//! Each error says its code, and whether the job is retried is the one
//! rule's ([`deadbolt_proto::retry`], as [`JobError::local`] asks it):
//! deterministic errors (a bad spec value, a corrupt checkpoint or data
//! file, a value over a limit, a cancellation) fail the job at once; only
//! transient ones (I/O, libtorch: INTERNAL; the store being unavailable or
//! failing) are retried.

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
                let (code, field) = match &c {
                    C::Invalid { field, .. } => (Code::InvalidArgument, Some(field.clone())),
                    C::Spec(_) => (Code::InvalidArgument, Some("spec".to_string())),
                    C::UnknownLayer { .. } => {
                        (Code::InvalidArgument, Some("defense.layer".to_string()))
                    }
                    C::EmptyDataset(_) => (Code::InvalidArgument, None),
                    C::TooLarge { what, .. } => (Code::ResourceExhausted, Some(what.clone())),
                    C::Checkpoint { .. } | C::BadFile { .. } => (Code::DataLoss, None),
                    C::Cancelled => return JobError::cancelled(),
                    C::Io { .. } | C::Torch(_) | C::Other(_) => (Code::Internal, None),
                };
                let e = JobError::local(code, c.to_string());
                match field {
                    Some(f) => e.with_field(f),
                    None => e,
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
        let other = core::<()>(Err(deadbolt_core::Error::Other(
            "libtorch went away".into(),
        )))
        .unwrap_err();
        assert_eq!((other.code, other.retryable), (Code::Internal, true));
        let stopped = core::<()>(Err(deadbolt_core::Error::Cancelled)).unwrap_err();
        assert_eq!((stopped.code, stopped.retryable), (Code::Cancelled, false));
    }
}
