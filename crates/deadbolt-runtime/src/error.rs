//! Why a stage job failed: a gRPC code (what the stage RPC answers), a
//! message, the field at fault when there is one, and whether another
//! attempt could succeed. Stored in the job row as structured data
//! ([`JobFailure`]: code, message, field), never as text to parse back.

use deadbolt_proto::error::{code_from_name, code_name, ServiceError};
use deadbolt_store::{JobFailure, StoreError};
use tonic::Code;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct JobError {
    pub code: Code,
    pub message: String,
    /// The dotted spec or request field at fault, when one is.
    pub field: Option<String>,
    /// Transient: a retry may succeed (I/O, a dependency that went away).
    pub retryable: bool,
}

impl JobError {
    pub fn new(code: Code, message: impl Into<String>, retryable: bool) -> Self {
        JobError {
            code,
            message: message.into(),
            field: None,
            retryable,
        }
    }
    /// A failure another attempt may not hit (I/O, a crashed dependency).
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message, true)
    }
    /// A failure every attempt would hit (a bad spec, a corrupt input).
    pub fn permanent(code: Code, message: impl Into<String>) -> Self {
        Self::new(code, message, false)
    }
    /// A bad value of a spec field: INVALID_ARGUMENT naming it, not retried.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        JobError {
            field: Some(field.into()),
            ..Self::permanent(Code::InvalidArgument, message)
        }
    }
    pub fn cancelled() -> Self {
        Self::new(Code::Cancelled, "cancelled", false)
    }
    /// A panic in a stage: a bug, which every attempt would hit again.
    pub fn panicked(message: &str) -> Self {
        Self::permanent(Code::Internal, format!("stage panicked: {message}"))
    }
    /// A stage's output that does not (de)serialise: a bug, not retried.
    pub fn encoding(what: &str, e: impl std::fmt::Display) -> Self {
        Self::permanent(Code::Internal, format!("{what}: {e}"))
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// How the error is stored in the job row.
    pub fn to_failure(&self) -> JobFailure {
        JobFailure {
            code: code_name(self.code).to_string(),
            message: self.message.clone(),
            field: self.field.clone(),
        }
    }

    /// The error a stored failure stands for (no longer retryable: the job
    /// is over).
    pub fn from_failure(f: &JobFailure) -> Self {
        JobError {
            code: code_from_name(&f.code),
            message: f.message.clone(),
            field: f.field.clone(),
            retryable: false,
        }
    }
}

impl ServiceError for JobError {
    fn code(&self) -> Code {
        self.code
    }
    fn field(&self) -> Option<String> {
        self.field.clone()
    }
}

impl From<JobError> for tonic::Status {
    fn from(e: JobError) -> Self {
        deadbolt_proto::status(&e)
    }
}

impl From<StoreError> for JobError {
    fn from(e: StoreError) -> Self {
        let code = ServiceError::code(&e);
        let retryable = matches!(code, Code::Unavailable | Code::Internal | Code::Aborted);
        JobError {
            code,
            message: e.to_string(),
            field: ServiceError::field(&e),
            retryable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_round_trip_with_their_field() {
        let e = JobError::invalid("training.epochs", "must be at least 1");
        let f = e.to_failure();
        assert_eq!(f.code, "invalid_argument");
        assert_eq!(f.field.as_deref(), Some("training.epochs"));
        let back = JobError::from_failure(&f);
        assert_eq!((back.code, back.field), (e.code, e.field.clone()));
        let s = tonic::Status::from(e);
        assert_eq!(
            deadbolt_proto::validate::field_violations(&s)[0].0,
            "training.epochs"
        );
        let p = JobError::panicked("index out of bounds");
        assert!(!p.retryable);
        assert!(p.message.contains("index out of bounds"));
    }
}
