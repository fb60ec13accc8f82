//! Why a stage job failed: a gRPC code (what the stage RPC answers), a
//! message, the field at fault when there is one, and whether another
//! attempt could succeed. Stored in the job row as structured data
//! ([`JobFailure`]: code, message, field), never as text to parse back.

use deadbolt_proto::error::{code_from_name, code_name, ServiceError};
use deadbolt_proto::retry::{retryable, Origin};
use deadbolt_store::{JobFailure, Scope, StoreError};
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
    /// A failure of this process with `code` chosen for its kind, retried
    /// as [the one rule](deadbolt_proto::retry) says of our own errors
    /// (UNAVAILABLE, ABORTED and INTERNAL are).
    pub fn local(code: Code, message: impl Into<String>) -> Self {
        Self::new(code, message, retryable(code, Origin::Local))
    }
    /// A failure another attempt may not hit (I/O, a crashed dependency):
    /// INTERNAL, retried.
    pub fn transient(message: impl Into<String>) -> Self {
        Self::local(Code::Internal, message)
    }
    /// A failure every attempt would hit (a bad spec, a corrupt input, a
    /// bug): a verdict, never retried whatever its code.
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
        JobError {
            field: ServiceError::field(&e),
            ..Self::local(ServiceError::code(&e), e.to_string())
        }
    }
}

/// What a server's own layers answer before (or instead of) a handler:
/// the auth layers' denials and the request deadline. Each says its code;
/// [`deadbolt_proto::status`] makes the status.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LayerError {
    /// A handler behind no auth layer asked for the caller's principal.
    #[error("no principal (the auth layer is missing)")]
    NoPrincipal,
    /// The caller's address used up its budget of failed authentications.
    #[error("too many failed authentications from this address; retry later")]
    TooManyFailures,
    #[error("missing `authorization: Bearer <api key>`")]
    MissingKey,
    #[error("unknown, revoked or expired api key")]
    UnknownKey,
    #[error("key {key_name:?} of team {team} lacks the {scope} scope")]
    LacksScope {
        key_name: String,
        team: String,
        scope: Scope,
    },
    /// A stage-service call without the internal credential.
    #[error("stage services answer only the gateway (internal credential required)")]
    NotTheGateway,
    /// The fixed request timeout ran out: CANCELLED "Timeout expired",
    /// what tonic's own timeout answers.
    #[error("Timeout expired")]
    TimeoutExpired,
}

impl ServiceError for LayerError {
    fn code(&self) -> Code {
        match self {
            LayerError::NoPrincipal
            | LayerError::MissingKey
            | LayerError::UnknownKey
            | LayerError::NotTheGateway => Code::Unauthenticated,
            LayerError::TooManyFailures => Code::ResourceExhausted,
            LayerError::LacksScope { .. } => Code::PermissionDenied,
            LayerError::TimeoutExpired => Code::Cancelled,
        }
    }
}

impl From<LayerError> for tonic::Status {
    fn from(e: LayerError) -> Self {
        deadbolt_proto::status(&e)
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

    #[test]
    fn store_errors_are_retried_by_the_one_rule() {
        let id = uuid::Uuid::nil();
        // (error, retried): the codes UNAVAILABLE, ABORTED, INTERNAL are
        let cases = [
            (StoreError::LeaseLost { job_id: id }, true),
            (StoreError::QuotaExceeded("runs".into()), false),
            (
                StoreError::Checksum {
                    key: "k".into(),
                    expected: "a".into(),
                    actual: "b".into(),
                },
                false,
            ),
            (StoreError::not_found("run", id), false),
            (StoreError::invalid("name", "too long"), false),
        ];
        for (e, retried) in cases {
            let msg = e.to_string();
            let j = JobError::from(e);
            assert_eq!(j.retryable, retried, "{msg}");
            assert_eq!(j.message, msg);
        }
        assert!(JobError::transient("disk full").retryable);
        assert!(JobError::local(Code::Unavailable, "pool timed out").retryable);
        assert!(JobError::local(Code::Internal, "object store").retryable);
        assert!(!JobError::permanent(Code::Unavailable, "a verdict").retryable);
        assert!(!JobError::local(Code::ResourceExhausted, "max_classes").retryable);
    }

    #[test]
    fn layer_errors_keep_their_codes_and_words() {
        let cases = [
            (LayerError::NoPrincipal, Code::Unauthenticated),
            (LayerError::TooManyFailures, Code::ResourceExhausted),
            (LayerError::MissingKey, Code::Unauthenticated),
            (LayerError::UnknownKey, Code::Unauthenticated),
            (
                LayerError::LacksScope {
                    key_name: "ci".into(),
                    team: "red".into(),
                    scope: Scope::Admin,
                },
                Code::PermissionDenied,
            ),
            (LayerError::NotTheGateway, Code::Unauthenticated),
            (LayerError::TimeoutExpired, Code::Cancelled),
        ];
        for (e, code) in cases {
            let msg = e.to_string();
            let s = tonic::Status::from(e);
            assert_eq!((s.code(), s.message()), (code, msg.as_str()));
            assert!(s.details().is_empty());
        }
        assert_eq!(
            tonic::Status::from(LayerError::TimeoutExpired).message(),
            "Timeout expired"
        );
    }
}
